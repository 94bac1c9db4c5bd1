"""``xinf-llama-vision doctor``: is the plugin installed, valid, and enabled where it must be?
``xinf-llama-vision estimate``: how much GPU memory a launch needs (:mod:`.memory`).

    xinf-llama-vision doctor                       # this environment
    xinf-llama-vision doctor --endpoint URL        # also a running Xinference server
    xinf-llama-vision doctor --endpoint URL --api-key KEY   # a server with authentication on

Without ``--api-key``, the token ``xinference login`` stored for that endpoint is used, as
Xinference's own CLI does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from importlib import metadata
from typing import List, Optional, Tuple

from ._version import __version__
from .api import STATUS_PATH
from .extension import ENTRY
from .memory import ARCHITECTURES, estimate, report
from .quantization import METHODS


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def stored_token(endpoint: str) -> Optional[str]:
    """The access token ``xinference login --endpoint ENDPOINT`` saved, if any (Xinference's CLI reads it too)."""
    import hashlib

    try:
        from xinference.constants import XINFERENCE_AUTH_DIR
    except ImportError:
        return None
    path = os.path.join(XINFERENCE_AUTH_DIR, hashlib.sha256(endpoint.encode()).hexdigest())
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def checks(endpoint: str = "", api_key: Optional[str] = None) -> List[Tuple[bool, str]]:
    """``(ok, line)`` for each check, in order."""
    out: List[Tuple[bool, str]] = [
        (True, f"xinf-llama-vision {__version__}, xinference {_version('xinference')}, "
               f"transformers {_version('transformers')}, vllm {_version('vllm')}"),
    ]
    try:
        from .schema import load_families

        names = [f.model_name for f in load_families()]
        out.append((True, f"specs valid: {', '.join(names)}"))
    except Exception as e:  # noqa: BLE001 - report any failure
        out.append((False, f"specs invalid: {e}"))
    enabled = ENTRY in [e.strip() for e in os.environ.get("XINFERENCE_EXTENSIONS", "").split(",")]
    out.append(
        (True, f"XINFERENCE_EXTENSIONS includes {ENTRY}")
        if enabled
        else (False, f"not enabled in this shell: export XINFERENCE_EXTENSIONS={ENTRY} "
                     "before starting xinference-local / -supervisor / -worker")
    )
    if endpoint:
        url = endpoint.rstrip("/") + STATUS_PATH
        credential = api_key or stored_token(endpoint)
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
                info = json.load(response)
            families = info.get("families", {})
            out.append((bool(families), f"server {endpoint}: plugin {info.get('version')} active, serving "
                                        + "; ".join(f"{k} -> {', '.join(v)}" for k, v in families.items())))
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                given = "--api-key" if api_key else "the token of xinference login" if credential else None
                why = (f"refused the credential given ({given}, HTTP {e.code}); it needs an admin's" if given
                       else "requires a credential (authentication is on); pass --api-key KEY with an admin's, "
                            "or run xinference login --endpoint " + endpoint)
                out.append((False, f"server {endpoint}: {why}"))
            else:
                hint = "installed but not enabled there" if e.code == 404 else f"HTTP {e.code}"
                out.append((False, f"server {endpoint}: plugin {hint}: start it with XINFERENCE_EXTENSIONS={ENTRY}"))
        except OSError as e:
            out.append((False, f"server {endpoint}: unreachable ({e})"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="xinf-llama-vision")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="check installation and activation")
    doctor.add_argument("--endpoint", default="", help="a running Xinference server to check, e.g. http://127.0.0.1:9997")
    doctor.add_argument("--api-key", "-ak", default=None,
                        help="an admin's access token or API key, for a server with authentication on "
                             "(default: the token xinference login stored for the endpoint)")
    est = sub.add_parser("estimate", help="the GPU memory a launch needs, and the GPUs that hold it")
    est.add_argument("--size", type=int, choices=sorted(ARCHITECTURES), required=True, help="billions of parameters")
    est.add_argument("--quantization", "-q", default="none", choices=list(METHODS))
    est.add_argument("--context-length", type=int, default=8192, help="tokens per sequence (vLLM's max_model_len)")
    est.add_argument("--max-num-seqs", type=int, default=1, help="sequences decoded at once")
    est.add_argument("--images", type=int, default=1, help="images per sequence (each up to 4 tiles)")
    est.add_argument("--engine", choices=("vllm", "transformers"), default="vllm",
                     help="the Transformers engine keeps room for its batch's rebuild (docs/reliability.md)")
    args = parser.parse_args(argv)
    if args.command == "estimate":
        e = estimate(ARCHITECTURES[args.size], args.quantization, args.context_length, args.max_num_seqs, args.images,
                     rebuild_room=args.engine == "transformers")
        print(report(args.size, e))
        return 0
    results = checks(args.endpoint, args.api_key)
    for ok, line in results:
        print(("ok   " if ok else "FAIL ") + line)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
