"""Exported directories as backbones: `load(DIR, engine=..., precision=...)` returns an object
called like the eager backbone, whatever runs underneath.

    from export.runtime import load
    net = load("artifacts/resnet")                       # onnxruntime, fp32
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
from typing import Optional, Union

from export.errors import ExportError
from export.onnx_runtime import OnnxBackbone
from export.runtime_base import ENGINES, RuntimeBackbone

__all__ = ["load", "ENGINES", "OnnxBackbone", "RuntimeBackbone"]


def load(directory: Union[str, Path], engine: str = "onnxruntime", precision: str = "fp32",
         threads: Optional[int] = None, device: str = "cpu", verify_hashes: bool = True,
         spin_wait: bool = True) -> RuntimeBackbone:
    """An export directory as a backbone with the `returnt` API, run by `engine`.

    Args:
        directory: an export directory (manifest.json and the engine's files).
        engine: onnxruntime (`<mode>.onnx`), openvino (the same files, compiled by OpenVINO
            for the CPU with an explicit precision hint), torchscript (`<mode>.pt`), exported
            (`<mode>.ep.pt2` through `torch.export.load(...).module()`) or aoti
            (`<mode>.aoti.pt2` / `<mode>.aoti.b<N>.pt2`, compiled C++).
        precision: fp32; bf16 (openvino, on CPUs with bf16 support); int8 (onnxruntime and
            openvino, from the files `python -m export quantize` writes).
        threads: intra-op threads (None: torch's thread count).
        device: cpu or cuda.
        verify_hashes: check every file against the manifest's sha256 first.
        spin_wait: onnxruntime's threads busy-wait between calls (its default, fastest alone on
            the cores); False where other processes share the cores (the `serve` replicas).
            The other engines have no such switch and ignore it.
    """
    if engine not in ENGINES:
        raise ExportError(f"unknown engine {engine!r}; allowed: {', '.join(ENGINES)}")
    if precision not in ENGINES[engine]:
        pairs = ", ".join(f"{e}+{p}" for e, ps in ENGINES.items() for p in ps)
        raise ExportError(f"engine {engine!r} has no precision {precision!r}; the pairs that exist: {pairs}")
    if engine == "onnxruntime":
        return OnnxBackbone(directory, threads=threads, device=device, verify_hashes=verify_hashes,
                            precision=precision, spin_wait=spin_wait)
    if engine == "openvino":
        from export.openvino_runtime import OpenVinoBackbone

        return OpenVinoBackbone(directory, precision=precision, threads=threads, verify_hashes=verify_hashes)
    from export.torch_runtime import TORCH_ENGINES

    return TORCH_ENGINES[engine](directory, threads=threads, device=device, verify_hashes=verify_hashes)
