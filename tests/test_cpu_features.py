"""Which CPUs run vLLM's CPU builds, and what the scripts do on one that cannot.

``data/cpuinfo/`` holds ``/proc/cpuinfo`` heads: ``intel-xeon-amx`` is this pool's Intel machine (AVX-512,
AVX512-BF16, AMX), ``amd-epyc-7763`` a Zen 3 EPYC as Linux lists it (AVX2, no AVX-512: the pool's AMD
machine, where importing ``vllm._C`` by hand died of SIGILL), ``intel-xeon-e5-2670`` a Sandy Bridge
(AVX, no AVX2). The V1 stage runs vLLM on its AVX2 kernels too
(tests/vllm_v1/test_fidelity_v1.py).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from xinf_llama_vision.cpu_features import cpu_flags, cpu_name, vllm_cpu_refusal, vllm_kernels

CPUINFO = Path(__file__).with_name("data") / "cpuinfo"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cpu, kernels", [("intel-xeon-amx", "_C"), ("amd-epyc-7763", "_C_AVX2")])
def test_cpus_with_avx2_run_vllm_and_get_their_kernels(cpu, kernels):
    flags = cpu_flags(str(CPUINFO / cpu))
    assert vllm_cpu_refusal(flags, "x86_64") is None
    assert vllm_kernels(flags) == kernels


def test_a_cpu_without_avx2_is_told_what_it_lacks():
    path = str(CPUINFO / "intel-xeon-e5-2670")
    assert vllm_cpu_refusal(cpu_flags(path), "x86_64", cpu_name(path)) == (
        "Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz lacks avx2, f16c, which vLLM's CPU builds "
        "(vllm-cpu 0.9.2 and 0.32) need on x86_64")


def test_this_machine_is_read():
    """The detection reads the real /proc/cpuinfo here (the scripts' default)."""
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    assert "sse2" in cpu_flags()


@pytest.mark.parametrize("script, line", [
    (["scripts/test-vllm.sh"], "vLLM stage skipped: Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz lacks avx2, f16c"),
    (["scripts/test-vllm.sh", "--v1"], "vLLM V1 stage skipped: Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz lacks avx2, f16c"),
])
def test_a_stage_on_such_a_cpu_is_one_line_and_a_pass(script, line):
    """The README's test command goes on (exit 0) with one line per vLLM stage, before any download."""
    env = dict(os.environ, XLV_CPUINFO=str(CPUINFO / "intel-xeon-e5-2670"))
    done = subprocess.run(["bash", *script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [line + ", which vLLM's CPU builds (vllm-cpu 0.9.2 and 0.32) need on x86_64"]


def test_setting_up_a_stage_on_such_a_cpu_says_why_in_words():
    env = dict(os.environ, XLV_CPUINFO=str(CPUINFO / "intel-xeon-e5-2670"), VENV="/nonexistent/venv")
    done = subprocess.run(["bash", "scripts/setup-vllm.sh", "--v1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3
    assert done.stderr.strip() == ("setup-vllm: not on this machine: Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz lacks "
                                   "avx2, f16c, which vLLM's CPU builds (vllm-cpu 0.9.2 and 0.32) need on x86_64")
    assert not os.path.exists("/nonexistent/venv")
