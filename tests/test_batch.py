"""The decode batch on its own: rows that join and leave at different steps (images with different
tile counts, two images, text only, base prompts), some prefilled together, each produce exactly the
token ids that unbatched raw ``generate`` produces for them, and a row dropped mid-way changes
nobody else's answer."""

from __future__ import annotations

import pytest

from oracle import png
from parity import BLUE, RED
from xinf_llama_vision.engines.transformers.batch import DecodeBatch, image_keys_mask, prefill, prefill_key

WIDE = png((20, 200, 20), size=(200, 50))


def chat(reference, images, question):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return reference.render([{"role": "user", "content": content}]), images


@pytest.fixture(scope="module")
def cases(reference):
    """(prompt, images, tokens to generate, step at which it joins). Rows joining at one step with
    the same image shape are prefilled together: 0 and 6 (one image, different lengths), 1 and 7
    (text only, different lengths), 4 and 5 apart (one image, one not)."""
    return [
        (*chat(reference, [RED], "What is this?"), 14, 0),
        (*chat(reference, [], "Write a haiku about the sea."), 10, 0),
        (*chat(reference, [BLUE, WIDE], "Compare them."), 18, 2),
        (*chat(reference, [WIDE], "Describe it in detail please, with many words."), 6, 3),
        ("<|image|><|begin_of_text|>If I had to", [RED], 12, 5),
        ("<|begin_of_text|>Once upon a time", [], 20, 5),
        (*chat(reference, [WIDE], "And this one, in a few more words than the first?"), 9, 0),
        ("<|begin_of_text|>The", [], 11, 0),
    ]


def run_batch(reference, cases, drop=None):
    """Greedy decoding of ``cases`` through one :class:`DecodeBatch`; ``drop=(case, step)`` removes a row."""
    model = reference.model
    batch, rows, out, step = DecodeBatch(model), [], {}, 0
    while len(out) + (drop is not None) < len(cases):
        joining = [(i, reference.inputs(prompt, images)) for i, (prompt, images, _, join) in enumerate(cases)
                   if join == step]
        for key in dict.fromkeys(prefill_key(inputs) for _, inputs in joining):
            group = [(i, inputs) for i, inputs in joining if prefill_key(inputs) == key]
            for (i, inputs), (logits, layers, length) in zip(group, prefill(model, [x for _, x in group])):
                batch.add(layers, length, image_keys_mask(model, inputs.get("cross_attention_mask")))
                rows.append((i, [int(logits.argmax(-1))]))
        step += 1
        if len(batch):
            for (i, ids), logits in zip(rows, batch.step([ids[-1] for _, ids in rows])):
                ids.append(int(logits.argmax()))
        leave = [r for r, (i, ids) in enumerate(rows) if len(ids) >= cases[i][2] or drop == (i, step)]
        for r in leave:
            i, ids = rows[r]
            if drop != (i, step):
                out[i] = ids[: cases[i][2]]
        batch.remove(leave)
        rows = [row for r, row in enumerate(rows) if r not in leave]
    assert len(batch) == 0
    return out


def test_every_row_equals_unbatched_generate(reference, cases):
    expected = [reference.generate_ids(prompt, images, n) for prompt, images, n, _ in cases]
    got = run_batch(reference, cases)
    assert [got[i] for i in range(len(cases))] == expected


def test_a_row_dropped_mid_batch_changes_no_other(reference, cases):
    expected = [reference.generate_ids(prompt, images, n) for prompt, images, n, _ in cases]
    got = run_batch(reference, cases, drop=(2, 6))  # the two-image row leaves after 4 of its 18 tokens
    assert 2 not in got
    assert {i: got[i] for i in got} == {i: expected[i] for i in got}


def test_the_batch_pads_only_what_its_rows_need(reference, cases):
    """Long rows leave: the padding they forced on the others is trimmed; images gone, cross keys too."""
    model = reference.model
    batch = DecodeBatch(model)
    for prompt, images, _, _ in (cases[2], cases[5]):  # a long two-image prompt, then a short text-only one
        inputs = reference.inputs(prompt, images)
        [(_, layers, length)] = prefill(model, [inputs])
        batch.add(layers, length, image_keys_mask(model, inputs.get("cross_attention_mask")))
    assert batch.pads[0] == 0 and batch.pads[1] > 0
    assert batch.cache.get_seq_length(model.config.text_config.cross_attention_layers[0]) > 0
    batch.remove([0])
    assert batch.pads == [0]
    assert batch.cache.get_seq_length(model.config.text_config.cross_attention_layers[0]) == 0
