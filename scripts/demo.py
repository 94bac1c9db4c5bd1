"""The main job, end to end: Xinference with the plugin serves Llama 3.2 Vision and answers an image question.

Real weights cannot be downloaded here, so by default this builds a tiny checkpoint (real
tokenizer, processor and architecture; random weights taught in a few seconds to name three
pictures), so that its answer shows the image got through: a red circle gets "A red circle.", a
blue square "A blue square.". With real weights, pass --model-path DIR (a local copy of
meta-llama/Llama-3.2-11B-Vision-Instruct).

    python scripts/demo.py [--model-path DIR] [--port 9997] [--keep-running]
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: the test checkpoint, and the demo's taught one
BIN = Path(sys.executable).parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help="a local Llama 3.2 Vision Instruct checkpoint (default: build a tiny one)")
    parser.add_argument("--port", type=int, default=9997)
    parser.add_argument("--keep-running", action="store_true", help="leave the server running afterwards")
    args = parser.parse_args()

    work = ROOT / ".demo"
    work.mkdir(exist_ok=True)
    model_path = args.model_path
    if not model_path:
        from tiny import build_taught

        model_path = str(work / "tiny-mllama-taught")
        if not (Path(model_path) / "config.json").exists():
            print(f"building a tiny Llama 3.2 Vision checkpoint in {model_path}: random weights, taught to name "
                  "a red circle, a blue square and a green triangle ...", flush=True)
            build_taught(model_path)

    endpoint = f"http://127.0.0.1:{args.port}"
    env = dict(
        os.environ,
        XINFERENCE_HOME=str(work / "xinference-home"),
        XINFERENCE_EXTENSIONS="xinf_llama_vision.extension:create",
        XINFERENCE_AUTH_ADVANCED="false",
        NO_PROXY="127.0.0.1,localhost",
    )
    log = open(work / "xinference.log", "w")
    print(f"starting xinference-local on {endpoint} (log: {log.name}) ...", flush=True)
    print("authentication is OFF for this one-command demo (XINFERENCE_AUTH_ADVANCED=false); a real server "
          "keeps Xinference's default (on): see README, 'With authentication'", flush=True)
    server = subprocess.Popen(
        [str(BIN / "xinference-local"), "-H", "127.0.0.1", "-p", str(args.port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(endpoint + "/v1/models", timeout=5)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"xinference-local exited; see {log.name}")
                time.sleep(1)
        subprocess.run([str(BIN / "xinf-llama-vision"), "doctor", "--endpoint", endpoint], env=env, check=True)

        launch = [str(BIN / "xinference"), "launch", "-e", endpoint, "--model-name", "llama-3.2-vision-instruct",
                  "--model-engine", "transformers", "--model_path", model_path, "--model-uid", "llama-vision"]
        print("$", " ".join(launch), flush=True)
        subprocess.run(launch, env=env, check=True)

        from openai import OpenAI

        from tiny import DEMO_QUESTION, demo_messages, picture

        client = OpenAI(base_url=endpoint + "/v1", api_key="not-needed")
        for name, image in (("a red circle", picture("circle", (220, 30, 30))),
                            ("a blue square", picture("square", (30, 60, 220)))):
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            reply = client.chat.completions.create(
                model="llama-vision",
                messages=demo_messages(url),  # the image, then the question: as the checkpoint was taught
                max_tokens=32,
                temperature=0,
            )
            print(f"\nQ: {DEMO_QUESTION} [+ a 224x224 PNG of {name}]")
            print(f"A: {reply.choices[0].message.content!r}")
            print(f"usage: {reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens")
        if not args.model_path:
            print("(a tiny checkpoint taught to name three pictures: the answers show the image reached the model; "
                  "pass --model-path for real weights)")
        if args.keep_running:
            print(f"\nserver still running at {endpoint}; stop it with: kill -- -{server.pid}")
            return 0
    finally:
        if not args.keep_running and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
