"""Exported directories as backbones: `load(DIR, engine=..., precision=...)` returns an object
called like the eager backbone, whatever runs underneath.

    from export.runtime import load
    net = load("artifacts/resnet")                       # auto: the fastest fp32 engine measured on
                                                         # this CPU (bench DIR --save), else onnxruntime
    net = load("artifacts/resnet", engine="aoti")        # AOTInductor packages (--formats aoti)
    logits = net(x)                              # numpy in -> numpy out, torch in -> torch out
    logits, feats = net(x, returnt="both")
    outs = net(x, returnt="full")                # [stage_0..stage_k, features, logits]
    net.set_params(v)                            # eager get_params() order, no re-export

Every engine checks each file against the manifest's sha256 before using it (construction
checks the whole set, so a changed, corrupt or mixed directory is refused at once; sessions and
modules are then made from the very bytes that were hashed; about 0.05 s per 45 MB file).

`OnnxBackbone` (the onnxruntime engine): one `InferenceSession` per mode, created on first use;
`set_params(v)` rebuilds the sessions from the ONNX models with the new vector, in memory.
"""

from pathlib import Path
from typing import List, Optional, Tuple, Union

from export.runtime.base import ENGINES, RuntimeBackbone, check_engine
from export.runtime.ort_engine import OnnxBackbone
from export.store.manifest import Manifest, artifact_name

__all__ = ["load", "available_pairs", "check_engine", "ENGINES", "OnnxBackbone", "RuntimeBackbone"]


def load(directory: Union[str, Path], engine: str = "auto", precision: str = "fp32",
         threads: Optional[int] = None, device: str = "cpu", verify_hashes: bool = True,
         spin_wait: bool = True, version: Union[int, str, None] = None) -> RuntimeBackbone:
    """An export directory as a backbone with the `returnt` API, run by `engine`.

    Args:
        directory: an export directory (manifest.json and the engine's files).
        engine: auto (default: the engine `python -m export bench DIR --save` measured fastest
            at `precision` on this CPU model, else onnxruntime (openvino for bf16); the choice
            and why are in the returned object's repr and `auto_choice`), onnxruntime
            (`<mode>.onnx`), openvino (the same files, compiled by OpenVINO
            for the CPU with an explicit precision hint), torchscript (`<mode>.pt`), exported
            (`<mode>.ep.pt2` through `torch.export.load(...).module()`) or aoti
            (`<mode>.aoti.pt2` / `<mode>.aoti.b<N>.pt2`, compiled C++) or executorch
            (`<mode>.pte`, XNNPACK, batches up to the bound it was lowered for).
        precision: fp32; bf16 (openvino, on CPUs with bf16 support); int8 (onnxruntime and
            openvino, from the files `python -m export quantize` writes).
        threads: intra-op threads (None: torch's thread count).
        device: cpu or cuda.
        verify_hashes: check every file against the manifest's sha256 first.
        spin_wait: onnxruntime's threads busy-wait between calls (its default, fastest alone on
            the cores); False where other processes share the cores (the `serve` replicas).
            The other engines have no such switch and ignore it.
        version: a published weight version (`python -m export publish`): its number, or
            'latest'. Default: the newest version of a directory that has any, else the
            export's own weights. The graphs are the export's; the version's weights are put in
            when loaded (from bytes checked against its record), in memory.
    """
    check_engine(engine, precision)
    why = None
    if engine == "auto":
        engine, why = choose_engine(Path(directory), precision)
    if engine == "onnxruntime":
        net: RuntimeBackbone = OnnxBackbone(directory, threads=threads, device=device, verify_hashes=verify_hashes,
                                            precision=precision, spin_wait=spin_wait)
    elif engine == "openvino":
        from export.runtime.openvino_engine import OpenVinoBackbone

        net = OpenVinoBackbone(directory, precision=precision, threads=threads, verify_hashes=verify_hashes)
    elif engine == "executorch":
        from export.runtime.executorch_engine import ExecutorchBackbone

        net = ExecutorchBackbone(directory, threads=threads, device=device, verify_hashes=verify_hashes)
    else:
        from export.runtime.torch_engines import TORCH_ENGINES

        net = TORCH_ENGINES[engine](directory, threads=threads, device=device, verify_hashes=verify_hashes)
    net.auto_choice = why
    if version is not None or net.manifest.weight_versions:
        net.use_version(version)
    return net


def choose_engine(directory: Path, precision: str) -> Tuple[str, str]:
    """(engine, why) for engine="auto": the fastest engine at `precision` that the bench recorded
    in the manifest for this CPU model and flags, if it can run here; else the first engine
    that runs `precision` (onnxruntime; openvino for bf16). Never another precision."""
    from export.runtime.cpu import cpu_name
    from export.store.manifest import read_manifest

    fallback = next(e for e, precisions in ENGINES.items() if precision in precisions)
    cpu = cpu_name()
    manifest = read_manifest(directory)
    record = manifest.engine_choice.get(cpu, {}).get(precision)
    if record is None:
        return fallback, (f"no bench record for {precision} on {cpu} (python -m export bench DIR --save "
                          f"records one); {fallback}")
    engine = record["engine"]
    if (engine, precision) not in available_pairs(manifest, "out"):
        return fallback, f"{engine} was measured fastest here ({record['date']}) but cannot run now; {fallback}"
    return engine, (f"{engine}: the fastest {precision} engine measured on {cpu} ({record['date']}, "
                    f"{record['speedup']:.2f}x {record['reference']})")


def available_pairs(manifest: Manifest, mode: str = "out") -> List[Tuple[str, str]]:
    """(engine, precision) pairs that can run `mode` of an export directory on this machine:
    its files are there, the engine is installed, the CPU has the precision."""
    from export.errors import ExportError

    files = manifest.files
    has = {kind: artifact_name(mode, kind) in files for kind in ("onnx", "int8", "torchscript", "exported")}
    pairs: List[Tuple[str, str]] = []
    if has["onnx"]:
        pairs.append(("onnxruntime", "fp32"))
    if has["int8"]:
        pairs.append(("onnxruntime", "int8"))
    try:
        from export.runtime.openvino_engine import cpu_supports_bf16, openvino_core

        core = openvino_core()
        if has["onnx"]:
            pairs.append(("openvino", "fp32"))
            if cpu_supports_bf16(core):
                pairs.append(("openvino", "bf16"))
        if has["int8"]:
            pairs.append(("openvino", "int8"))
    except ExportError:
        pass  # openvino not installed, or refused under a oneDNN cap: its pairs are not available here
    pairs += [(engine, "fp32") for engine in ("torchscript", "exported") if has[engine]]
    if artifact_name(mode, "pte") in files:
        try:
            from export.formats.pte import executorch_version

            executorch_version()
            pairs.append(("executorch", "fp32"))
        except ExportError:
            pass  # executorch not installed
    if None in manifest.aoti_packages(mode):
        pairs.append(("aoti", "fp32"))
    return pairs
