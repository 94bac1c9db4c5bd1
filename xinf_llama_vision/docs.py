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

from .request.messages import build_chat_prompt, build_completion_prompt
from .quantization import FORMATS, method_of, refusal
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


def variants():
    """``(size, format, quantization, engine, families, estimate, command)`` for every variant a launch can
    pick, from the specs (the instruct family's command; the base family differs only in its name)."""
    from .memory import ARCHITECTURES, estimate

    families = load_families()
    kinds: Dict[tuple, List[str]] = {}
    for family in families:
        for spec in family.specs:
            for quantization in spec.quantizations:
                kinds.setdefault((spec.model_size_in_billions, spec.model_format, quantization), []).append(family.kind)
    instruct = next(f for f in families if f.kind == "instruct")
    order = list(FORMATS)
    for (size, fmt, quantization), which in sorted(kinds.items(), key=lambda r: (r[0][0], order.index(r[0][1]),
                                                                                FORMATS[r[0][1]].index(r[0][2]))):
        spec = next(s for s in instruct.specs if (s.model_size_in_billions, s.model_format) == (size, fmt))
        method = method_of(fmt, quantization)
        e = estimate(ARCHITECTURES[size], method, context_length=8192, max_num_seqs=1)
        for engine in ("transformers", "vllm"):
            if refusal(engine, fmt, quantization) is not None or (engine == "vllm" and spec.vllm is None):
                continue
            command = f"xinference launch --model-engine {engine} {_common(instruct, spec, quantization)}"
            tp = spec.vllm.tensor_parallel_size if engine == "vllm" and spec.vllm else None
            command += f" --n-gpu {tp}" if tp else ""
            yield size, fmt, quantization, engine, sorted(which), e, command


def quantization_block() -> str:
    """Every size, format, quantization and engine a launch can pick: the estimate beside the card's
    figures, the GPUs that hold it, the launch command (from the specs and :mod:`.memory`)."""
    from .memory import GB

    out = ["| Size | Weights | Quantization | Engine | Families | Weights GB | Total GB | Card GB | GPUs that hold it | Launch |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for size, fmt, quantization, engine, kinds, e, command in variants():
        method = e.inputs["quantization"]
        gpus = ", ".join(f"{gb} GB x{n}" for gb, n in e.gpus().items() if n)
        out.append(f"| {size}B | {fmt} | {quantization} | {engine} | {', '.join(kinds)} "
                   f"| {e.weights / GB:.1f} | {e.total / GB:.1f} | {CARD_90B.get(method, '-') if size == 90 else '-'} "
                   f"| {gpus} | `{command}` |")
    return "\n".join(out) + "\n"


def guide_launch_block() -> str:
    """Every launch command, one per size, engine and quantization (the user guide's list)."""
    out = ["```bash"]
    for size, fmt, quantization, engine, kinds, e, command in variants():
        note = "" if len(kinds) == 2 else f"  # {', '.join(kinds)} only"
        out.append(command + note)
    return "\n".join(out + ["```"]) + "\n"


def launch_options_block() -> str:
    """Every launch option the plugin adds, or gives its own default, on each engine."""
    from .engines.common import SKIP_MEMORY_CHECK
    from .images.limits import KNOBS, default_text
    from .request.messages import DEFAULT_MAX_IMAGES

    instruct = next(f for f in load_families() if f.kind == "instruct")

    def per_size(name: str) -> str:
        spec_values = {}
        for spec in instruct.specs:
            if spec.vllm is not None:
                value = getattr(spec.vllm, name)
                spec_values.setdefault(value, []).append(f"{spec.model_size_in_billions}B {spec.model_format}")
        return "; ".join(f"{str(v).lower() if isinstance(v, bool) else v} ({', '.join(w)})"
                         for v, w in spec_values.items() if v is not None) or "vLLM's"

    rows = [
        ("max_images", "both", str(DEFAULT_MAX_IMAGES), "images per prompt (vLLM's `limit_mm_per_prompt` follows it)"),
        ("context_length", "Transformers", f"the checkpoint's `max_position_embeddings` ({instruct.context_length})",
         "longest prompt plus answer; longer requests get a 400"),
        ("max_num_seqs", "Transformers", "16 (Xinference's default)", "sequences decoded together by continuous batching"),
        ("kv_cache_memory", "Transformers", "what the device has left after the weights ([reliability.md](reliability.md))",
         "memory budget of the running batch's cache (`8GiB`, `512MiB`, bytes): admission, and the context it holds"),
        ("image_cache_memory", "Transformers", "an eighth of what the device has left after the weights ([performance.md](performance.md))",
         "memory of the image and prefix caches (`0`: none): pictures and conversations asked about again are not computed again"),
        ("torch_dtype", "Transformers", "bfloat16 on CUDA; Xinference's otherwise (float32 CPU, float16 MPS)", "the weights' dtype"),
        ("quantization_config", "Transformers", "the recipe of [quantization.md](quantization.md)",
         "single bitsandbytes settings for `--quantization 8-bit`/`4-bit`"),
        (SKIP_MEMORY_CHECK, "both", "false", "skip the launch-time memory check on CUDA ([quantization.md](quantization.md))"),
        ("max_model_len", "vLLM", per_size("max_model_len"), "longest prompt plus answer"),
        ("max_num_seqs", "vLLM", per_size("max_num_seqs"), "sequences vLLM schedules at once"),
        ("enforce_eager", "vLLM", per_size("enforce_eager"), "no CUDA graphs ([vllm.md](vllm.md) says why)"),
        ("gpu_memory_utilization", "vLLM", per_size("gpu_memory_utilization"), "share of each GPU vLLM takes"),
        ("tensor_parallel_size", "vLLM", per_size("tensor_parallel_size"), "GPUs to split over (launch with the same `--n-gpu`)"),
    ]
    rows += [(k.option, "both", default_text(k), k.reason) for k in KNOBS]
    out = ["| Launch option | Engine | Default | What it does |", "|---|---|---|---|"]
    out += [f"| `--{name}` | {engine} | {default} | {what} |" for name, engine, default, what in rows]
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
    from .request.options import table

    return table()


def guide_options_block() -> str:
    """The request parameters the engines honour, with what each means on each (:mod:`.options`)."""
    from .request.options import table

    return table(honoured_only=True)


def knobs_block() -> str:
    """Every image setting: launch option, environment variables, default (:data:`.images.limits.KNOBS`)."""
    from .images.limits import knobs_table

    return knobs_table()


#: file → generated block name → generator
BLOCKS: Dict[str, Dict[str, Callable[[], str]]] = {
    "families.md": {"families": families_block},
    "prompt-format.md": {"examples": prompt_examples_block},
    "vllm.md": {"vllm-launch": vllm_block},
    "api.md": {"options": options_block},
    "security.md": {"knobs": knobs_block},
    "quantization.md": {"variants": quantization_block},
    "guide.md": {"launch": guide_launch_block, "launch-options": launch_options_block, "options": guide_options_block},
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
