"""On ``PYTHONPATH``, makes torch see a CPU with AVX2 and nothing newer, as the pool's AMD EPYC (Zen 3):
vLLM then loads its ``_C_AVX2`` kernel library (it picks one by what torch says), and torch's own
kernels and compiler (inductor, which vLLM uses for a few functions) target AVX2 as well."""

import os

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")  # torch's own kernel dispatch

import torch  # noqa: E402

for name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_vnni_supported", "_is_amx_tile_supported",
             "_is_amx_fp16_supported"):
    setattr(torch.cpu, name, lambda: False)
