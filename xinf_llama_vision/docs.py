"""Generated parts of ``docs/``: written from the specs and the message adapter, checked for drift in CI.

    python -m xinf_llama_vision.docs          # rewrite the generated blocks in docs/
    python -m xinf_llama_vision.docs --check  # exit 1 if a generated block is out of date

A generated block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``;
everything outside those markers is hand-written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .messages import build_chat_prompt, build_completion_prompt
from .quantization import FORMATS, refusal
from .schema import load_families

DOCS = Path(__file__).resolve().parents[1] / "docs"
DATE = "26 Jul 2024"


def families_block() -> str:
    """Each family and size: repositories and launch commands, from ``model_specs/``."""
    out: List[str] = []
    for family in load_families():
        out += [
            f"### `{family.model_name}` ({family.kind})",
            "",
            family.description,
            "",
            f"- Abilities: {', '.join(family.abilities)}",
            f"- Languages: {', '.join(family.languages)}",
            f"- Context length: {family.context_length}",
            f"- Architecture: {', '.join(family.architectures)}",
            f"- Stop tokens: {', '.join(f'`{t.token}` ({t.id})' for t in family.stop_tokens)}",
            "",
            "| Size | Format | Quantizations | Hugging Face | ModelScope |",
            "|---|---|---|---|---|",
        ]
        for spec in family.specs:
            hubs = spec.hubs
            out.append(
                f"| {spec.model_size_in_billions}B | {spec.model_format} | {', '.join(spec.quantizations)} "
                f"| [`{hubs['huggingface']}`](https://huggingface.co/{hubs['huggingface']}) "
                f"| `{hubs.get('modelscope', '-')}` |"
            )
        out += ["", "```bash"]
        for spec in family.specs:
            if refusal("transformers", spec.model_format, spec.quantizations[0]) is None:
                out.append(f"xinference launch --model-engine transformers {_common(family, spec)}")
            if spec.vllm is not None:
                out.append(vllm_command(family, spec))
        out += ["```", ""]
        if any(spec.vllm is not None for spec in family.specs):
            out += ["The vLLM options written out are the defaults that apply when they are left off "
                    "([vllm.md](vllm.md) says why).", ""]
    return "\n".join(out).rstrip() + "\n"


def _common(family, spec, quantization: Optional[str] = None) -> str:
    """The options that pick one variant (``--quantization`` left off for ``none``, Xinference's default)."""
    quantization = spec.quantizations[0] if quantization is None else quantization
    return (f"--model-name {family.model_name} --size-in-billions {spec.model_size_in_billions} "
            f"--model-format {spec.model_format}" + (f" --quantization {quantization}" if quantization != "none" else ""))


#: The 90B model card's "Quantizations & VRAM" (GB): FP16, Q8_0 (8 bits), Q4_K_M (4.5 bits).
CARD_90B = {"none": "180.7 (FP16)", "8-bit": "89.8 (Q8_0)", "FP8": "89.8 (Q8_0)", "4-bit": "50.8 (Q4_K_M)"}


def quantization_block() -> str:
    """Every size, format, quantization and engine a launch can pick: the estimate beside the card's
    figures, the GPUs that hold it, the launch command (from the specs and :mod:`.memory`)."""
    from .memory import ARCHITECTURES, GB, estimate

    families = load_families()
    rows: Dict[tuple, List[str]] = {}
    for family in families:
        for spec in family.specs:
            for quantization in spec.quantizations:
                rows.setdefault((spec.model_size_in_billions, spec.model_format, quantization), []).append(family.kind)
    instruct = next(f for f in families if f.kind == "instruct")
    out = ["| Size | Weights | Quantization | Engine | Families | Weights GB | Total GB | Card GB | GPUs that hold it | Launch |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    order = list(FORMATS)
    for (size, fmt, quantization), kinds in sorted(rows.items(), key=lambda r: (r[0][0], order.index(r[0][1]),
                                                                                FORMATS[r[0][1]].index(r[0][2]))):
        spec = next(s for s in instruct.specs if (s.model_size_in_billions, s.model_format) == (size, fmt))
        method = {"bnb": "4-bit", "fp8": "FP8"}.get(fmt, quantization)
        e = estimate(ARCHITECTURES[size], method, context_length=8192, max_num_seqs=1)
        gpus = ", ".join(f"{gb} GB x{n}" for gb, n in e.gpus().items() if n)
        for engine in ("transformers", "vllm"):
            if refusal(engine, fmt, quantization) is not None or (engine == "vllm" and spec.vllm is None):
                continue
            command = f"xinference launch --model-engine {engine} {_common(instruct, spec, quantization)}"
            tp = spec.vllm.tensor_parallel_size if engine == "vllm" and spec.vllm else None
            command += f" --n-gpu {tp}" if tp else ""
            out.append(f"| {size}B | {fmt} | {quantization} | {engine} | {', '.join(sorted(kinds))} "
                       f"| {e.weights / GB:.1f} | {e.total / GB:.1f} | {CARD_90B.get(method, '-') if size == 90 else '-'} "
                       f"| {gpus} | `{command}` |")
    return "\n".join(out) + "\n"


def vllm_command(family, spec) -> str:
    """The vLLM launch command for one family and size, with our defaults written out."""
    defaults = spec.vllm.model_dump(exclude_none=True)
    gpus = f" --n-gpu {defaults['tensor_parallel_size']}" if defaults.get("tensor_parallel_size") else ""
    options = " ".join(f"--{name} {str(value).lower() if isinstance(value, bool) else value}"
                       for name, value in defaults.items())
    return f"xinference launch --model-engine vllm {_common(family, spec)}{gpus} \\\n  {options}"


def vllm_block() -> str:
    """The vLLM launch commands of every family and size, defaults written out (``vllm:`` in the specs)."""
    out = ["```bash"]
    for family in load_families():
        for spec in family.specs:
            if spec.vllm is not None:
                out.append(vllm_command(family, spec))
    return "\n".join(out + ["```"]) + "\n"


IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}

#: (title, request, launch options) for every chat shape the prompt-format page shows.
CHAT_EXAMPLES = [
    ("Image, then text (as Meta recommends)", {"messages": [{"role": "user", "content": [IMG, {"type": "text", "text": "Describe this image."}]}]}, {}),
    ("Text, then image (order kept)", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look: "}, IMG]}]}, {}),
    ("`image_url` as a plain string", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "https://example.com/cat.png"}, {"type": "text", "text": "What is it?"}]}]}, {}),
    ("Hugging Face image part with its URL", {"messages": [{"role": "user", "content": [{"type": "image", "url": "https://example.com/cat.png"}, {"type": "text", "text": "What is it?"}]}]}, {}),
    ("Hugging Face image part, the image in the request's `images` list", {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}], "images": ["data:image/png;base64,..."]}, {}),
    ("Text only (the template adds a system block)", {"messages": [{"role": "user", "content": "Hello!"}]}, {}),
    ("System message and text", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]}, {}),
    ("System message and image", {"messages": [{"role": "system", "content": "You describe images."}, {"role": "user", "content": [IMG, {"type": "text", "text": "What is it?"}]}]}, {}),
    ("Multi-turn: image first, text follow-ups, assistant turn as text parts", {"messages": [
        {"role": "user", "content": [IMG, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "What colour?"},
    ]}, {}),
    ("Multi-turn: assistant turn as a string", {"messages": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Name a river."},
    ]}, {}),
    ("Two images (launched with `--max_images 2`)", {"messages": [{"role": "user", "content": [IMG, {"type": "text", "text": "and"}, IMG, {"type": "text", "text": "What differs?"}]}]}, {"max_images": 2}),
    ("Tools (text only), in the first user message", {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [TOOL]}, {}),
    ("Tools in the system block", {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [TOOL], "chat_template_kwargs": {"tools_in_user_message": False}}, {}),
    ("A tool call and its result", {"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "content": "-3 degrees"},
    ], "tools": [TOOL]}, {}),
]
COMPLETION_EXAMPLES = [
    ("Base model, text", "Once upon a time", []),
    ("Base model, one image", "<|image|>If I had to write a haiku for this one", ["data:image/png;base64,..."]),
]


def prompt_examples_block() -> str:
    """One rendered example per shape, rendered by the adapter (whose output the tests compare
    byte for byte with the official template)."""
    out: List[str] = []
    for title, request, launch in CHAT_EXAMPLES:
        prompt = build_chat_prompt(
            request["messages"], date_string=DATE, max_images=launch.get("max_images"), tools=request.get("tools"),
            images=request.get("images", ()), **request.get("chat_template_kwargs", {}),
        )
        out += [f"#### {title}", "", "```json", json.dumps(request, ensure_ascii=False), "```", "",
                "```text", prompt.text, "```", ""]
    for title, text, images in COMPLETION_EXAMPLES:
        prompt = build_completion_prompt(text, images)
        request = {"prompt": text, **({"images": images} if images else {})}
        out += [f"#### {title}", "", "```json", json.dumps(request), "```", "", "```text", prompt.text, "```", ""]
    return "\n".join(out).rstrip() + "\n"


def options_block() -> str:
    """Every OpenAI request parameter and what each engine does with it (:mod:`.options`)."""
    from .options import table

    return table()


def knobs_block() -> str:
    """Every image setting: launch option, environment variables, default (:data:`.image_policy.KNOBS`)."""
    from .image_policy import knobs_table

    return knobs_table()


#: file → generated block name → generator
BLOCKS: Dict[str, Dict[str, Callable[[], str]]] = {
    "families.md": {"families": families_block},
    "prompt-format.md": {"examples": prompt_examples_block},
    "vllm.md": {"vllm-launch": vllm_block},
    "api.md": {"options": options_block},
    "security.md": {"knobs": knobs_block},
    "quantization.md": {"variants": quantization_block},
}


def _pattern(name: str) -> "re.Pattern[str]":
    return re.compile(rf"(<!-- generated: {re.escape(name)} -->\n).*?(<!-- end generated -->)", re.S)


def render(text: str, blocks: Dict[str, Callable[[], str]]) -> str:
    """``text`` with each named generated block replaced by its generator's output."""
    for name, generate in blocks.items():
        pattern = _pattern(name)
        if not pattern.search(text):
            raise ValueError(f"no '<!-- generated: {name} -->' block")
        text = pattern.sub(lambda m: m.group(1) + generate() + m.group(2), text)
    return text


def stale(docs: Path = DOCS) -> List[str]:
    """The doc files whose generated blocks differ from what the code generates now."""
    return [name for name, blocks in BLOCKS.items()
            if render((docs / name).read_text(encoding="utf-8"), blocks) != (docs / name).read_text(encoding="utf-8")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report out-of-date files")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale()
        for name in out_of_date:
            print(f"docs/{name} is out of date: run python -m xinf_llama_vision.docs")
        return 1 if out_of_date else 0
    for name, blocks in BLOCKS.items():
        path = DOCS / name
        path.write_text(render(path.read_text(encoding="utf-8"), blocks), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
