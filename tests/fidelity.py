"""The prompt shapes every engine is checked on against Meta's architecture (:mod:`meta_reference`), on
the structural checkpoint (:mod:`structural`): one image of 1, 2 and 4 tiles, two adjacent images,
two images with text between, an image in a later turn, a base completion with an image, text only.

Each shape is one the engines have got wrong somewhere (docs/fidelity.md): text before the first
image, the run of adjacent images, the per-image spans, the projector's intermediate layers (a base
prompt opening with its image, where nothing else differs).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import pytest

from oracle import data_uri

#: Greedy tokens compared per answer; every one of them wins by at least :data:`FAR` logits in Meta's model.
MAX, FAR = 10, 0.3


def picture(seed: int, size) -> "Image.Image":
    """A smooth random picture (colour blobs: small, compressible PNGs that still differ everywhere)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)


#: Pictures whose tiling the tests check: 1 tile, 2 tiles (2:1), 4 tiles (2x2) of 560 pixels.
ONE, TWO, FOUR = picture(1, (64, 48)), picture(2, (800, 400)), picture(3, (1100, 1100))
FIRST, SECOND = picture(4, (64, 64)), picture(5, (60, 90))


def image(p):
    return {"type": "image_url", "image_url": {"url": data_uri(p)}}


def text(words):
    return {"type": "text", "text": words}


@dataclass
class Case:
    images: List = field(default_factory=list)
    messages: Optional[list] = None  # a chat (instruct family)
    prompt: Optional[str] = None  # a completion (base family): <|image|> where each image goes

    def base_prompt(self) -> str:
        """A completion's prompt in Meta's base format: leading images, then ``<|begin_of_text|>``."""
        rest, head = self.prompt, ""
        while rest.startswith("<|image|>"):
            head, rest = head + "<|image|>", rest[len("<|image|>"):]
        return head + "<|begin_of_text|>" + rest


#: The date the chats are rendered with, on both sides (the template puts it in some prompts).
DATE = "26 Jul 2024"

CASES = {
    "one image, 1 tile": Case([ONE], [{"role": "user", "content": [image(ONE), text("Describe this picture.")]}]),
    "one image, 2 tiles": Case([TWO], [{"role": "user", "content": [image(TWO), text("Describe this picture.")]}]),
    "one image, 4 tiles": Case([FOUR], [{"role": "user", "content": [image(FOUR), text("Describe this picture.")]}]),
    "two adjacent images": Case([SECOND, FIRST], [{"role": "user", "content": [
        image(SECOND), image(FIRST), text("Compare them.")]}]),
    "two images, text between": Case([FIRST, SECOND], [{"role": "user", "content": [
        image(FIRST), text("This is the first."), image(SECOND), text("How do they differ?")]}]),
    "image in a later turn": Case([SECOND], [
        {"role": "user", "content": "Hello, can you see pictures?"},
        {"role": "assistant", "content": "Yes, send one."},
        {"role": "user", "content": [image(SECOND), text("What is this?")]}]),
    "base completion with an image": Case([FOUR], prompt="<|image|>If I had to write a haiku for this one"),
    "text only": Case([], [{"role": "user", "content": "Write a haiku about the sea."}]),
}
TILES = {"one image, 1 tile": [1], "one image, 2 tiles": [2], "one image, 4 tiles": [4]}


@dataclass
class Answer:
    """Meta's greedy answer to one case: its prompt's length, the tokens, the text a client reads, and
    how far each token won by."""

    prompt_tokens: int
    ids: List[int]
    text: str
    gaps: List[float]


def render(tokenizer, messages) -> str:
    """The official template's prompt, on :data:`DATE`."""
    from oracle import TEMPLATE, to_hf

    return tokenizer.apply_chat_template(to_hf(messages), chat_template=TEMPLATE.read_text(), tokenize=False,
                                         add_generation_prompt=True, date_string=DATE)


#: Where Meta's answers are kept between the test stages of one checkout (the main suite computes them,
#: the vLLM stages read them): keyed by everything they are a function of, so a change recomputes.
CACHE = Path(os.environ.get("XLV_TEST_CACHE", Path(__file__).resolve().parents[1] / ".cache")) / "meta-answers"


def _key(weights: str, inputs, stop: List[int]) -> str:
    """The weights' digest, the case's exact model inputs (token ids, pixels, tiling), the stop tokens,
    :data:`MAX` and the reference's own source."""
    import meta_reference

    digest = hashlib.sha256(f"{weights} {MAX} {stop}".encode())
    for name in sorted(inputs):
        digest.update(name.encode() + inputs[name].numpy().tobytes())
    digest.update(Path(meta_reference.__file__).read_bytes())
    return digest.hexdigest()


def meta_answers(path: str):
    """Every case's :class:`Answer` from Meta's architecture (:class:`meta_reference.MetaMllama`) on the
    checkpoint at ``path``: greedy, stopping at the instruct family's stop tokens (from :data:`CACHE` when
    the same inputs were answered before)."""
    from transformers import AutoProcessor

    from meta_reference import MetaMllama

    processor, meta = AutoProcessor.from_pretrained(path), None
    weights = hashlib.sha256(Path(path, "model.safetensors").read_bytes()).hexdigest()
    tokenizer = processor.tokenizer
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")]
    out = {}
    for name, case in CASES.items():
        prompt = render(tokenizer, case.messages) if case.messages is not None else case.base_prompt()
        inputs = processor(images=case.images or None, text=prompt, add_special_tokens=False, return_tensors="pt")
        prompt_ids = inputs["input_ids"][0].tolist()
        kept = CACHE / f"{_key(weights, inputs, stop)}.json"
        if kept.exists():
            out[name] = Answer(**json.loads(kept.read_text()))
            continue
        meta = meta or MetaMllama(path)
        ids, gaps = meta.greedy_gaps(prompt_ids, inputs, MAX, stop)
        text = tokenizer.decode([i for i in ids if i not in stop], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)
        out[name] = Answer(len(prompt_ids), ids, text, gaps)
        CACHE.mkdir(parents=True, exist_ok=True)
        kept.write_text(json.dumps(asdict(out[name])))
    return out


def ask(server, uid_of, name: str, stream: bool = False):
    """Case ``name`` through the OpenAI API (a chat on ``uid_of("instruct")``, a completion on
    ``uid_of("base")``), greedy, :data:`MAX` tokens: ``(text, prompt tokens, completion tokens)``."""
    case, client = CASES[name], server.openai()
    if case.messages is not None:
        call = functools.partial(client.chat.completions.create, model=uid_of("instruct"), messages=case.messages,
                                 extra_body={"chat_template_kwargs": {"date_string": DATE}})
        piece, whole = (lambda c: c.choices[0].delta.content or ""), (lambda r: r.choices[0].message.content)
    else:
        call = functools.partial(client.completions.create, model=uid_of("base"), prompt=case.prompt,
                                 extra_body={"images": [data_uri(p) for p in case.images]})
        piece, whole = (lambda c: c.choices[0].text), (lambda r: r.choices[0].text)
    if not stream:
        reply = call(max_tokens=MAX, temperature=0)
        return whole(reply), reply.usage.prompt_tokens, reply.usage.completion_tokens
    chunks = list(call(max_tokens=MAX, temperature=0, stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    return "".join(piece(c) for c in chunks if c.choices), usage.prompt_tokens, usage.completion_tokens


@pytest.fixture(scope="session")
def structural_checkpoint(tmp_path_factory) -> str:
    """The structural checkpoint (:mod:`structural`), built once a session."""
    import structural

    return structural.build(str(tmp_path_factory.mktemp("structural-mllama")))


@pytest.fixture(scope="session")
def meta(structural_checkpoint):
    """Meta's answer to every case, each token far from a tie (else a comparison could flip on rounding),
    each case's answer its own."""
    answers = meta_answers(structural_checkpoint)
    gaps = {name: round(min(a.gaps), 3) for name, a in answers.items()}
    assert min(gaps.values()) >= FAR, gaps
    assert len({a.text for a in answers.values()}) == len(answers), "every case must answer differently"
    return answers


FAMILIES = (("instruct", "llama-3.2-vision-instruct"), ("base", "llama-3.2-vision"))


def launch_families(server, launch, prefix: str):
    """Both families launched with ``launch(model name, uid)``; yields ``uid_of(kind)`` for :func:`ask`,
    then terminates them (a module fixture's body)."""
    uids = {kind: launch(name, f"{prefix}-{kind}") for kind, name in FAMILIES}
    yield uids.__getitem__
    for uid in uids.values():
        server.cli("terminate", "--model-uid", uid)


def check(got, want: Answer, name: str) -> None:
    """A served answer ``(text, prompt tokens, completion tokens)`` is Meta's."""
    assert got == (want.text, want.prompt_tokens, len(want.ids)), name
