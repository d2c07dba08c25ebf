"""The CPU at hand: its model and the flags that decide which kernels run. Figures and the
fastest-engine choice (`load(DIR, engine="auto")`) are recorded per CPU by these."""

from pathlib import Path
from typing import Any, Dict

#: the CPU flags that decide which kernels run (oneDNN, onnxruntime, OpenVINO pick by them)
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


def cpu_info() -> Dict[str, Any]:
    """The CPU's model name and which of KERNEL_FLAGS it has (Linux: /proc/cpuinfo)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    import platform

    return {"model": model or platform.processor() or "unknown CPU",
            "flags": [f for f in KERNEL_FLAGS if f in flags]}


def cpu_name() -> str:
    """`AMD EPYC (avx2, fma)`: the model and the kernel-relevant flags, for every figure."""
    info = cpu_info()
    return f"{info['model']} ({', '.join(info['flags']) or 'no AVX2'})"
