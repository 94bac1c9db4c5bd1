"""The README's first command does what it says: ``scripts/demo.py`` (what ``scripts/demo.sh`` runs
after setting up ``.venv``) starts Xinference with the plugin, launches the model through the CLI,
answers an image question over the OpenAI client, and stops its server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_demo_answers_an_image_question_and_cleans_up():
    port = free_port()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--port", str(port)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("ok   server http://127.0.0.1:") for line in lines), result.stdout  # doctor
    # The taught checkpoint names each picture: the image got through, and a different one gets a different answer.
    questions = [line for line in lines if line.startswith("Q: ")]
    assert questions == ["Q: What shape and colour is in this image? [+ a 224x224 PNG of a red circle]",
                         "Q: What shape and colour is in this image? [+ a 224x224 PNG of a blue square]"], lines
    assert [line for line in lines if line.startswith("A: ")] == ["A: 'A red circle.'", "A: 'A blue square.'"], lines
    for usage in [line for line in lines if line.startswith("usage: ")]:
        assert usage.endswith(" completion tokens") and " 0 completion" not in usage, usage
    # its server is gone: nothing listens on the port any more
    assert not [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
