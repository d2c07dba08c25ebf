"""The CPU at hand: its model and the flags that decide which kernels run. Figures and the
fastest-engine choice (`load(DIR, engine="auto")`) are recorded per CPU by these."""

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Set, Tuple

#: the CPU flags that decide which kernels run (oneDNN, onnxruntime, OpenVINO pick by them)
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")

#: oneDNN's instruction-set names, as ONEDNN_MAX_CPU_ISA takes them, oldest first, each with the
#: /proc/cpuinfo flags a CPU needs for it
ONEDNN_ISAS = (
    ("SSE41", ("sse4_1",)),
    ("AVX", ("avx",)),
    ("AVX2", ("avx2",)),
    ("AVX2_VNNI", ("avx_vnni",)),
    ("AVX2_VNNI_2", ("avx_vnni_int8", "avx_ne_convert")),
    ("AVX512_CORE", ("avx512f", "avx512bw", "avx512vl", "avx512dq")),
    ("AVX512_CORE_VNNI", ("avx512_vnni",)),
    ("AVX512_CORE_BF16", ("avx512_bf16",)),
    ("AVX10_1_512", ("avx512_fp16",)),
    ("AVX10_1_512_AMX", ("amx_tile", "amx_int8", "amx_bf16")),
    ("AVX10_1_512_AMX_FP16", ("amx_fp16",)),
)
_ONEDNN_ALIASES = {"AVX512_CORE_FP16": "AVX10_1_512", "AVX512_CORE_AMX": "AVX10_1_512_AMX",
                   "AVX512_CORE_AMX_FP16": "AVX10_1_512_AMX_FP16"}


def _first_cpu() -> Tuple[str, Set[str]]:
    """The model name and the flags /proc/cpuinfo lists for the first CPU ('' and none elsewhere)."""
    model, flags = "", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and flags is None:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags or set()


def cpu_flags() -> Set[str]:
    """Every flag of the CPU at hand, as /proc/cpuinfo names them."""
    return _first_cpu()[1]


def cpu_info() -> Dict[str, Any]:
    """The CPU's model name and which of KERNEL_FLAGS it has (Linux: /proc/cpuinfo)."""
    import platform

    model, flags = _first_cpu()
    return {"model": model or platform.processor() or "unknown CPU",
            "flags": [f for f in KERNEL_FLAGS if f in flags]}


def cpu_name() -> str:
    """`AMD EPYC (avx2, fma)`: the model and the kernel-relevant flags, for every figure."""
    info = cpu_info()
    return f"{info['model']} ({', '.join(info['flags']) or 'no AVX2'})"


def onednn_cap_below_cpu(environ: Mapping[str, str] = os.environ,
                         flags: Optional[Set[str]] = None) -> Optional[str]:
    """'ONEDNN_MAX_CPU_ISA=AVX2 (this CPU has AVX512_CORE_BF16)' when the environment caps oneDNN
    below an instruction set this CPU has, else None.

    OpenVINO's CPU plugin picks some of its own kernels by the CPU and others through its oneDNN,
    which obeys the cap; where the two disagree it computes wrong outputs without an error
    (measured with OpenVINO 2026.4 capped at AVX2 on an AVX-512 CPU: max |diff| 0.1-2.7 and NaN for the
    zoo's backbones, 16 on outputs of size 14 from a conv-pool-matmul graph; openvinotoolkit/openvino#38189).
    ALL, DEFAULT, unknown names and the CPU's own best or newer leave every kernel uncapped."""
    flags = cpu_flags() if flags is None else flags
    names = [name for name, _ in ONEDNN_ISAS]
    best = max((i for i, (_, needs) in enumerate(ONEDNN_ISAS) if set(needs) <= flags), default=-1)
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = environ.get(variable, "").strip()
        cap = _ONEDNN_ALIASES.get(value.upper(), value.upper())
        if cap in names and names.index(cap) < best:
            return f"{variable}={value} (this CPU has {names[best]})"
    return None
