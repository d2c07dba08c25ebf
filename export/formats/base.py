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


def verify_in_fresh_process(script: str, request: list, jobs: List[tuple]) -> List[Dict[str, dict]]:
    """Run `script` in a fresh Python (`-I`: no zoo, nothing of the process that wrote the files)
    on `request` (saved with torch.save, its path argv[1]); the script saves, per job, the outputs
    of each input to argv[2], which are compared with the jobs' (path, output names, inputs,
    expected). A child that fails fails every job with its last line (runtime log lines, which
    start with '[', skipped)."""
    import subprocess
    import sys
    import tempfile

    from export.store.tolerance import compare, failed_stats

    with tempfile.TemporaryDirectory(prefix="fresh-verify-") as tmp:
        request_path, reply = Path(tmp) / "jobs.pt", Path(tmp) / "outputs.pt"
        torch.save(request, request_path)
        proc = subprocess.run([sys.executable, "-I", "-c", script, str(request_path), str(reply)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            last = ([ln for ln in lines if not ln.startswith("[")] or lines or ["no output"])[-1]
            return [failed_stats(names, f"fresh process failed: {last[:200]}") for _, names, _, _ in jobs]
        outputs = torch.load(reply, weights_only=True)
    results = []
    for (_, names, inputs, expected), outs in zip(jobs, outputs):
        replies = iter(outs)
        results.append(compare(lambda x, r=replies: next(r), names, inputs, expected))
    return results


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
