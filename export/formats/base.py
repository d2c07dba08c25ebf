"""The one interface every format module implements, and what the torch.export-based formats
(programs and AOTInductor packages) share.

A format is a `Format` value named `FORMAT` in its own module (`export.formats.<module>`),
listed once in `export.formats.MODULES`: adding a format (ExecuTorch, TensorRT) is one module
and one line there. A format module never imports another format module.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch
from torch import Tensor

from export.store.manifest import LayoutEntry


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Raise logger `name` to ERROR for the block: torch modules that log a warning when first
    imported (torchao's pytree registration, cpp_extension's "No CUDA runtime is found" on a
    CPU machine) say nothing a user of this format can act on."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


#: a file's path, or its bytes already checked against the manifest
Source = Union[Path, bytes]
Layout = List[LayoutEntry]


@dataclass(frozen=True)
class Format:
    """name, file suffix and the five operations of one format.

    write(artifact, path, **options): write what the pipeline hands this format (a head module,
        an ONNX model, a torch.export program) to `path`; returns what the manifest records
        of the file (or None).
    load(source, device): the file as a callable on torch tensors (outputs in the mode's order).
    read_params(path, layout): the flat vector the file holds, in the layout's order.
    write_params(path, vector, out, layout, allow_nonfinite): a copy of the file at `out`
        holding `vector` (or a one-line ExportError where the format cannot be rewritten).
    """

    name: str
    suffix: str
    write: Callable[..., Optional[Dict[str, Any]]]
    load: Callable[[Source, str], Callable[[Tensor], Any]]
    read_params: Callable[[Path, Layout], Tensor]
    write_params: Callable[[Path, Tensor, Path, Layout, bool], Path]


def used_parameters(program: torch.export.ExportedProgram) -> set:
    """state_dict names of the parameters the program's outputs depend on (a 'features' head
    still traces the classifier, whose result it drops; compilers remove that)."""
    params = program.graph_signature.inputs_to_parameters
    output = next(n for n in program.graph.nodes if n.op == "output")
    seen, stack = set(), [output]
    while stack:
        node = stack.pop()
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return {params[n.name] for n in seen if n.op == "placeholder" and n.name in params}


class FreshProcess:
    """A fresh Python (`-I`: no zoo, nothing of the process that wrote the files) that checks
    exported files. It is started before its jobs exist, so its torch import (~4 s) overlaps the
    caller's work, and it runs each job as soon as it is submitted.

    `script` runs after `import sys, torch` (and `as_list(out)`: a model's output as a list of
    tensors) and defines `run(job, shared)`: a job's outputs, a list per input of the output
    tensors (`shared`: what `share` handed over, else None). Each job's outputs are compared with
    its (path, output names, inputs, expected). A child that fails fails every job with its last
    line (runtime log lines, which start with '[', skipped). Once its replies are saved it exits
    without the interpreter's teardown of torch's modules (~1 s that the caller would wait for).
    """

    _PREFIX = ("import os, sys, torch\n\n\ndef as_list(out):\n"
               "    return [out] if isinstance(out, torch.Tensor) else list(out)\n")
    _LOOP = """
shared, results = None, []
for line in sys.stdin:
    kind, _, path = line.rstrip("\\n").partition(" ")
    item = torch.load(path, weights_only=True)
    if kind == "shared":
        shared = item
    else:
        results.append(run(item, shared))
torch.save(results, sys.argv[1])
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # the replies are saved: tearing down torch's modules (~1 s) would only delay the caller
"""

    def __init__(self, script: str) -> None:
        import subprocess
        import sys
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="fresh-verify-")
        self._dir = Path(self._tmp.name)
        self._reply = self._dir / "outputs.pt"
        self._stderr = open(self._dir / "stderr.txt", "w+")
        self._proc = subprocess.Popen([sys.executable, "-I", "-c", self._PREFIX + script + self._LOOP,
                                       str(self._reply)],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr,
                                      text=True)
        self._jobs: List[tuple] = []

    def _send(self, kind: str, item: Any) -> None:
        path = self._dir / f"{kind}-{len(self._jobs)}.pt"
        torch.save(item, path)
        try:
            self._proc.stdin.write(f"{kind} {path}\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child failed already: results() reports its last line

    def share(self, item: Any) -> None:
        """What every later job's `run` receives as `shared` (sent once)."""
        self._send("shared", item)

    def submit(self, request: Any, job: tuple) -> None:
        """One job: `request` for the child's `run`, `job` = (path, output names, inputs, expected)."""
        self._send("job", request)
        self._jobs.append(job)

    def results(self) -> List[Dict[str, dict]]:
        """Wait for the child; every submitted job's comparison with eager."""
        from export.store.tolerance import compare, failed_stats

        try:
            self._end_input()
            returncode = self._proc.wait()
            if returncode != 0:
                self._stderr.seek(0)
                lines = self._stderr.read().strip().splitlines()
                last = ([ln for ln in lines if not ln.startswith("[")] or lines or ["no output"])[-1]
                return [failed_stats(names, f"fresh process failed: {last[:200]}") for _, names, _, _ in self._jobs]
            outputs = torch.load(self._reply, weights_only=True)
        finally:
            self.close()
        results = []
        for (_, names, inputs, expected), outs in zip(self._jobs, outputs):
            replies = iter(outs)
            results.append(compare(lambda x, r=replies: next(r), names, inputs, expected))
        return results

    def _end_input(self) -> None:
        if not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass

    def close(self) -> None:
        """Stop the child if it still runs (the caller failed first) and remove its files."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._end_input()
        self._stderr.close()
        self._tmp.cleanup()


def verify_in_fresh_process(script: str, request: list, jobs: List[tuple], shared: Any = None) -> List[Dict[str, dict]]:
    """`jobs` checked by `script` in a FreshProcess, waiting for it."""
    fresh = FreshProcess(script)
    if shared is not None:
        fresh.share(shared)
    for item, job in zip(request, jobs):
        fresh.submit(item, job)
    return fresh.results()


@contextmanager
def retrace_keeping_ranges(program: torch.export.ExportedProgram) -> Iterator[None]:
    """Lower or compile `program` (ExecuTorch's passes, inductor) without narrowing its dynamic
    dimensions.

    Re-tracing a program runs FakeTensor's convolution, which asks aten's backend choice; that
    choice includes NNPACK's `batch >= 16` heuristic, evaluated on the example's batch (2), and
    the program's ShapeEnv records the answer as a guard: the batch range becomes 2..15
    (CIFAR ResNet-18: ExecuTorch planned memory for 15 images, AOTInductor's input check refused
    16). The guard only picks a kernel for the fake tensor's memory format; the range the
    program was exported with holds, so guards are suppressed while the program is re-traced.
    """
    envs = {id(env): env for env in _shape_envs(program)}
    with _all(env.suppress_guards() for env in envs.values()):
        yield


def _shape_envs(program: torch.export.ExportedProgram) -> List[Any]:
    found = []
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and isinstance(value, torch.Tensor):
            found += [d.node.shape_env for d in value.shape if isinstance(d, torch.SymInt)]
    return found


@contextmanager
def _all(contexts) -> Iterator[None]:
    from contextlib import ExitStack

    with ExitStack() as stack:
        for ctx in contexts:
            stack.enter_context(ctx)
        yield
