"""The independent side of every parity check: the official template, and Meta's architecture.

Nothing here imports ``xinf_llama_vision``'s prompt or engine code.

Where images are involved, transformers computes something else than Meta's model (docs/fidelity.md):
its vision tower hands the projector other intermediate layers (transformers >= 4.55), and tokens
before the first image attend to it (every version). So the reference model here is transformers'
text decoder and generation, with Meta's vision tower (:mod:`meta_reference`, written from Meta's
code) in place of transformers', and Meta's rule for tokens that see no image added as a hook; the
fidelity tests check it against :class:`meta_reference.MetaMllama` alone, token for token, on a
checkpoint shaped like the real ones. Text-only prompts are transformers' own.
"""

from __future__ import annotations

import base64
import datetime
import functools
import io
import json
from pathlib import Path
from typing import List, Optional

from PIL import Image
from transformers import LogitsProcessor

TEMPLATE = Path(__file__).with_name("reference") / "llama-3.2-vision-instruct.chat_template.jinja"


def png(color, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def today() -> str:
    return datetime.date.today().strftime("%d %b %Y")


def to_hf(messages: List[dict]) -> List[dict]:
    """OpenAI message shapes → the HF shapes the official template reads.

    Images become ``{"type": "image"}``; tool-call arguments (a JSON string in OpenAI's API) become
    the dict HF templates expect; list content of system and tool turns becomes its text (the
    template would print the list's Python repr there).
    """
    out = []
    for m in messages:
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):
            if m["role"] in ("system", "tool"):
                m["content"] = "".join(p["text"] for p in content)
            else:
                m["content"] = [{"type": "image"} if p.get("type") in ("image_url", "image") else p for p in content]
        if m.get("tool_calls"):
            if not m.get("content"):
                m.pop("content", None)  # OpenAI sends null; the template iterates over it
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                if isinstance(c["function"].get("arguments"), str) else c
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


class Reference:
    """Raw transformers on a checkpoint: the official template, the processor, greedy ``generate``."""

    def __init__(self, path: str, quantization_config=None):
        import torch
        from transformers import AutoProcessor, MllamaForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(path)
        self.tokenizer = self.processor.tokenizer
        import transformers

        dtype = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # 4.x in .venv-vllm
        options = {} if quantization_config is None else {"quantization_config": quantization_config}
        self.model = MllamaForConditionalGeneration.from_pretrained(path, **{dtype: torch.float32}, **options).eval()
        as_meta(self.model, path)
        self.template = TEMPLATE.read_text()

    def render(self, messages: List[dict], date_string: Optional[str] = None, **kwargs) -> str:
        return self.tokenizer.apply_chat_template(
            to_hf(messages),
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=True,
            date_string=date_string or today(),
            **kwargs,
        )

    def inputs(self, prompt: str, images: List[Image.Image]):
        return self.processor(images=images or None, text=prompt, add_special_tokens=False, return_tensors="pt")

    def generate_ids(self, prompt: str, images: List[Image.Image], max_new_tokens: int) -> List[int]:
        """The generated token ids under greedy decoding (no stop tokens: exactly ``max_new_tokens``)."""
        import torch

        inputs = self.inputs(prompt, images)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                      do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    def decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def generate(self, prompt: str, images: List[Image.Image], max_new_tokens: int):
        """(text, prompt token count, generated token count) under greedy decoding."""
        import torch

        inputs = self.inputs(prompt, images)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        return self.decode(new), inputs["input_ids"].shape[1], len(new)

    def gaps(self, prompt: str, images: List[Image.Image], max_new_tokens: int) -> List[float]:
        """At each step of :meth:`generate`, how far the greedy token's logit is above the runner-up's
        (the same gap in log-probability): where it is small, another implementation's rounding can
        break the tie the other way."""
        import torch

        with torch.no_grad():
            out = self.model.generate(**self.inputs(prompt, images), max_new_tokens=max_new_tokens, do_sample=False,
                                      output_scores=True, return_dict_in_generate=True)
        return [float(first - second) for first, second in (s[0].float().topk(2).values for s in out.scores)]


def as_meta(model, path: str) -> None:
    """transformers' ``model`` with Meta's vision tower and Meta's rule for tokens that see no image (a
    cross-attention layer gives them nothing: Meta multiplies its attention output by the row's flag,
    transformers only its MLP)."""
    from meta_reference import MetaMllama
    from transformers.modeling_outputs import BaseModelOutput

    meta, vision = MetaMllama(path), model.model.vision_model

    def meta_vision(pixel_values, aspect_ratio_ids, aspect_ratio_mask, **kwargs):
        states = meta.vision_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return BaseModelOutput(last_hidden_state=states.to(vision.patch_embedding.weight.dtype))

    vision.forward = meta_vision
    for index in model.config.text_config.cross_attention_layers:
        layer = model.model.language_model.layers[index]
        layer.register_forward_pre_hook(_keep_row_flags, with_kwargs=True)
        layer.cross_attn.register_forward_hook(functools.partial(_blind_rows_get_nothing, layer))


def _keep_row_flags(layer, args, kwargs):
    layer.row_flags = kwargs["full_text_row_masked_out_mask"]


def _blind_rows_get_nothing(layer, attention, args, output):
    flags = layer.row_flags
    return output if flags is None else (output[0] * flags[:, 0], *output[1:])


def teach(checkpoint: str, out_dir: str, prompt: str, answer: str, max_steps: int = 300) -> str:
    """A copy of ``checkpoint`` taught (raw transformers, Adam) that greedy decoding of the text-only
    ``prompt`` gives exactly ``answer``: a model whose output a test knows in advance (a tool call, say)."""
    from tiny import teach as teach_examples

    return teach_examples(checkpoint, out_dir, [(prompt, [], answer)], max_steps)


class Raw:
    """Raw transformers on the checkpoint: ``generate`` for one request with its options (a seed,
    logits processors), as the engine is asked to serve it. Chats are rendered with ``date_string``
    (default: today, as the server renders them)."""

    def __init__(self, reference, date_string: Optional[str] = None):
        self.ref = reference
        self.date_string = date_string
        tok = reference.tokenizer
        self.stop_ids = [tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")]

    def render(self, messages) -> str:
        return self.ref.render(messages, self.date_string)

    def run(self, prompt, images, max_new_tokens, seed=None, processors=(), **options):
        """``(new token ids, raw logits per step)`` of ``model.generate`` for this prompt."""
        import torch

        inputs = self.ref.inputs(prompt, images)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = self.ref.model.generate(
                **inputs, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                pad_token_id=self.ref.tokenizer.convert_tokens_to_ids("<|finetune_right_pad_id|>"),
                logits_processor=list(processors), output_logits=True, return_dict_in_generate=True, **options)
        return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), [row[0] for row in out.logits]

    def text(self, ids):
        return self.ref.decode([i for i in ids if i not in self.stop_ids])

    def chat(self, messages, images, max_new_tokens, **kw):
        return self.run(self.render(messages), images, max_new_tokens, **kw)

    def grammar(self, response_format, separators=None):
        """xgrammar's own transformers processor, compiled here from the request's format (a schema
        without optional whitespace; ``separators``: as vLLM V1 compiles it, ``(",", ":")``)."""
        import xgrammar as xgr
        from xgrammar.contrib.hf import LogitsProcessor as XgrProcessor

        info = xgr.TokenizerInfo.from_huggingface(self.ref.tokenizer, vocab_size=self.ref.model.config.text_config.vocab_size,
                                                  stop_token_ids=self.stop_ids)
        compiler = xgr.GrammarCompiler(info)
        if response_format["type"] == "json_object":  # OpenAI's JSON mode: an object (vLLM's reading)
            schema = json.dumps({"type": "object"})
        else:
            schema = json.dumps(response_format["json_schema"]["schema"])
        return XgrProcessor(compiler.compile_json_schema(schema, any_whitespace=False, separators=separators))


class OpenAIFormula(LogitsProcessor):
    """OpenAI's documented penalties, written out: ``mu[j] - c[j] * frequency - (c[j] > 0) * presence``
    over the tokens generated so far."""

    def __init__(self, prompt_length, presence, frequency):
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for token in set(input_ids[0, self.prompt_length:].tolist()):
            count = int((input_ids[0, self.prompt_length:] == token).sum())
            scores[0, token] -= count * self.frequency + self.presence
        return scores
