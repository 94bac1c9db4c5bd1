"""What serving through Xinference + this plugin costs over raw transformers, side by side, in one run.

    .venv/bin/python scripts/bench.py [--requests 8] [--max-tokens 32] [--model-path DIR]

Same checkpoint and greedy decoding, so the same answer and length in every row (default: the tiny random one, where the model is so cheap that the table shows the
serving overhead itself; with real weights the model dominates), same prompt and image.
Rows: raw ``generate`` in-process; the plugin's API-process check (parse, validate, inline the
image); served non-streaming; served streaming (first token and whole answer). Each is the median
of ``--requests`` runs after one warm-up, with its ratio to raw ``generate``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import BIN, Server, base_env, free_port  # noqa: E402
from oracle import Reference, data_uri, png  # noqa: E402


def median_seconds(fn, n: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model-path", help="a Llama 3.2 Vision Instruct checkpoint (default: build a tiny one)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="xlv-bench-"))
    model_path = args.model_path
    if not model_path:
        from xinf_llama_vision.tiny import build

        model_path = build(str(work / "tiny"))
    image = png((200, 30, 30), size=(512, 384))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                             {"type": "text", "text": "What is in this image?"}]}]
    n, max_tokens = args.requests, args.max_tokens
    rows = []

    reference = Reference(model_path)
    prompt = reference.render(messages)

    def raw():
        import torch

        inputs = reference.inputs(prompt, [image])
        with torch.no_grad():
            reference.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)

    raw_s = median_seconds(raw, n)
    rows.append(("raw transformers generate (in-process)", raw_s))

    from xinf_llama_vision.validation import Policy, check_chat

    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    rows.append(("plugin request check in the API process", median_seconds(lambda: check_chat(body, Policy("instruct")), n)))

    port = free_port()
    server = Server([str(BIN / "xinference-local"), "-H", "127.0.0.1", "-p", str(port)], base_env(work / "home"),
                    work / "server.log", f"http://127.0.0.1:{port}")
    try:
        server.wait_ready()
        server.launch("llama-3.2-vision-instruct", "bench", model_path, "--disable-virtual-env")
        client = server.openai()

        def served():
            client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens, temperature=0)

        first = []

        def streamed():
            start = time.perf_counter()
            stream = client.chat.completions.create(model="bench", messages=messages, max_tokens=max_tokens,
                                                    temperature=0, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and len(first) < n + 1:
                    first.append(time.perf_counter() - start)
                    break
            for _ in stream:
                pass

        rows.append(("served through Xinference, non-streaming", median_seconds(served, n)))
        rows.append(("served through Xinference, streaming (whole answer)", median_seconds(streamed, n)))
        rows.append(("served through Xinference, streaming (first token)", statistics.median(first[1:])))
    finally:
        server.stop()

    print(f"\n{n} requests each (median), {max_tokens} new tokens, one 512x384 PNG, model {model_path}\n")
    print(f"{'':56}{'seconds':>10}{'vs raw':>10}")
    for name, seconds in rows:
        print(f"{name:56}{seconds:10.4f}{seconds / raw_s:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
