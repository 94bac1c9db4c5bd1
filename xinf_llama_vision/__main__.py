"""``xinf-llama-vision doctor``: is the plugin installed, valid, and enabled where it must be?

    xinf-llama-vision doctor                       # this environment
    xinf-llama-vision doctor --endpoint URL        # also a running Xinference server
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from importlib import metadata
from typing import List, Tuple

from . import __version__
from .extension import ENTRY, STATUS_PATH


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def checks(endpoint: str = "") -> List[Tuple[bool, str]]:
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
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                info = json.load(response)
            families = info.get("families", {})
            out.append((bool(families), f"server {endpoint}: plugin {info.get('version')} active, serving "
                                        + "; ".join(f"{k} -> {', '.join(v)}" for k, v in families.items())))
        except urllib.error.HTTPError as e:
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
    args = parser.parse_args(argv)
    results = checks(args.endpoint)
    for ok, line in results:
        print(("ok   " if ok else "FAIL ") + line)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
