"""Every OpenAI chat/completions request parameter and what each engine does with it (pure data).

One table serves three purposes: the API process refuses what cannot be honoured (a 400 that
names the option, never a silent 200), ``docs/api.md`` is generated from it, and the tests send
every refused option and check the refusal. Parameters not in the table (other servers'
extensions) are passed on as Xinference passes them for its own models: models that do not know
them ignore them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Tuple

from ..errors import RequestError

CHAT, COMPLETIONS = "chat", "completions"
BOTH = (CHAT, COMPLETIONS)


def _set(value: Any) -> bool:
    return value is not None


def _true(value: Any) -> bool:
    return bool(value)


@dataclass(frozen=True)
class Option:
    name: str
    endpoints: Tuple[str, ...]
    transformers: str  # what the Transformers engine does with it (a sentence for the docs)
    vllm: str
    #: ``(refused when the value is such, why and what to send instead)``, or ``None``: honoured.
    refused: Optional[Tuple[Callable[[Any], bool], str]] = None


SAME = "as Transformers"
NO_EFFECT = "accepted, no effect on the answer"

OPTIONS: Tuple[Option, ...] = (
    Option("messages", (CHAT,), "the official chat template, byte-exact; images as `image_url` parts", SAME),
    Option("prompt", (COMPLETIONS,), "raw text, `<|image|>` where each image goes (images in `images`)", SAME),
    Option("model", BOTH, "the model UID", SAME),
    Option("max_tokens", BOTH, "honoured; unset: all the context leaves", SAME),
    Option("max_completion_tokens", (CHAT,), "honoured (as `max_tokens`)", SAME),
    Option("temperature", BOTH, "honoured; unset: the checkpoint's `generation_config.json`", SAME),
    Option("top_p", BOTH, "honoured, above 0 and at most 1; unset: the checkpoint's, else 1", SAME),
    Option("stop", BOTH, "honoured; the stop string is not in the answer", SAME),
    Option("stream", BOTH, "honoured", SAME),
    Option("stream_options", BOTH, "`include_usage` honoured", SAME),
    Option("n", BOTH, "honoured: each choice is its own row in the running batch; usage counts all",
           "honoured when sampling (Xinference's REST layer drops `n`; the plugin carries it to vLLM); "
           "with temperature 0 refused, as vLLM refuses it"),
    Option("seed", BOTH, "honoured: a generator per choice (choice i uses seed + i), the same answer batched or not",
           "vLLM's per-request seed"),
    Option("presence_penalty", BOTH, "honoured, OpenAI's definition, over the generated tokens", "vLLM's (OpenAI's definition)"),
    Option("frequency_penalty", BOTH, "honoured, OpenAI's definition, over the generated tokens", "vLLM's (OpenAI's definition)"),
    Option("logprobs", BOTH, "honoured: the model's own distribution, the same under sampling "
           "(docs/api.md, \"Logprobs\"); chat: `true`, completions: a count; a chat entry's `bytes` are the token's "
           "own (also part of a character)",
           "as Transformers (V0: the plugin hands vLLM's sampler the model's logprobs; V1: vLLM's "
           "`raw_logprobs`); `bytes` from the token ids, as on Transformers"),
    Option("top_logprobs", (CHAT,), "honoured, at most 20; a token the format forbids reads -9999.0", SAME),
    Option("response_format", BOTH, "`json_object` (any object) and `json_schema` by constrained decoding "
           "(xgrammar), no optional whitespace; `text` is the default",
           "vLLM's structured outputs (xgrammar), no optional whitespace (V0: per request; V1: the launch's "
           "`structured_outputs_config`, which the plugin sets)"),
    Option("tools", (CHAT,), "honoured: Meta's tool-call format; one call per answer; not with `stream`", SAME),
    Option("tool_choice", (CHAT,), "`auto` only", SAME,
           (lambda v: v not in (None, "auto"), 'only "auto": Llama 3.2 Vision decides itself whether to call a tool; '
            "leave `tools` out for an answer without tool calls")),
    Option("parallel_tool_calls", (CHAT,), "accepted; the model makes at most one call per answer", SAME),
    Option("logit_bias", BOTH, "refused (400)", "refused (400)",
           (_set, "not supported by Llama 3.2 Vision's engines; use `response_format` to constrain the answer")),
    Option("best_of", (COMPLETIONS,), "refused unless 1", "refused unless 1",
           (lambda v: v not in (None, 1), "not supported; send `n` and choose among the answers (with `logprobs`)")),
    Option("echo", (COMPLETIONS,), "refused when true", "refused when true",
           (_true, "not supported; the prompt is not repeated in the answer, send false")),
    Option("suffix", (COMPLETIONS,), "refused unless empty", "refused unless empty",
           (_true, "not supported: Llama 3.2 Vision has no fill-in-the-middle format; leave it out")),
    Option("audio", (CHAT,), "refused", "refused", (_set, "Llama 3.2 Vision answers in text only; leave it out")),
    Option("modalities", (CHAT,), 'refused unless `["text"]`', 'refused unless `["text"]`',
           (lambda v: v not in (None, ["text"]), 'Llama 3.2 Vision answers in text only; send ["text"] or leave it out')),
    Option("prediction", (CHAT,), "refused", "refused", (_set, "predicted outputs are not supported; leave it out")),
    Option("web_search_options", (CHAT,), "refused", "refused", (_set, "this server does not search the web; leave it out")),
    Option("reasoning_effort", (CHAT,), "refused", "refused",
           (_set, "Llama 3.2 Vision is not a reasoning model; leave it out")),
    Option("verbosity", (CHAT,), "refused", "refused", (_set, "not supported; ask for brevity in the prompt")),
    Option("functions", (CHAT,), "refused", "refused", (_set, "deprecated by OpenAI; send `tools`")),
    Option("function_call", (CHAT,), "refused", "refused", (_set, "deprecated by OpenAI; send `tool_choice`")),
    Option("user", BOTH, NO_EFFECT, NO_EFFECT),
    Option("metadata", (CHAT,), NO_EFFECT, NO_EFFECT),
    Option("store", (CHAT,), NO_EFFECT, NO_EFFECT),
    Option("service_tier", (CHAT,), NO_EFFECT, NO_EFFECT),
    Option("prompt_cache_key", (CHAT,), NO_EFFECT, NO_EFFECT),
    Option("safety_identifier", (CHAT,), NO_EFFECT, NO_EFFECT),
)

#: Parameters that are not OpenAI's but that these engines take (Xinference's and vLLM's names).
EXTENSIONS: Tuple[Option, ...] = (
    Option("images", BOTH, "image URLs for a completion's `<|image|>` (or a chat's `image` parts)", SAME),
    Option("top_k", BOTH, "honoured; unset or 0: no top-k (unless the checkpoint's `generation_config.json` "
                          "sets one for unset); -1: Xinference's schema refuses it", SAME),
    Option("repetition_penalty", BOTH, "honoured: transformers' multiplicative penalty (1 is none)",
           "vLLM's (1 is none)"),
    Option("stop_token_ids", BOTH, "honoured", SAME),
    Option("chat_template_kwargs", BOTH, "`date_string`, `tools_in_user_message`", SAME),
    Option("ignore_eos", BOTH, "refused when true", "refused when true",
           (_true, "not supported: the answer ends at the model's end-of-turn token; use `max_tokens`")),
    Option("lora_name", BOTH, "refused", "refused", (_set, "LoRA adapters are not supported for Llama 3.2 Vision")),
)


def check_options(body: Mapping[str, Any], endpoint: str) -> None:
    """Refuse, naming it, the first parameter in ``body`` that neither engine can honour.

    >>> check_options({"logit_bias": {"42": 5}}, CHAT)
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: logit_bias: not supported by Llama 3.2 Vision's engines; use `response_format` to constrain the answer
    >>> check_options({"tool_choice": "auto", "echo": True}, CHAT)  # echo is a completion's
    """
    for option in OPTIONS + EXTENSIONS:
        if option.refused and endpoint in option.endpoints and option.name in body:
            refused, why = option.refused
            if refused(body[option.name]):
                raise RequestError(f"{option.name}: {why}")


def table(honoured_only: bool = False) -> str:
    """``docs/api.md``'s table: every parameter, where it applies and what each engine does (the user
    guide's: the parameters honoured, ``honoured_only``)."""
    rows = ["| parameter | endpoints | Transformers engine | vLLM engine |", "|---|---|---|---|"]
    for option in OPTIONS + EXTENSIONS:
        if honoured_only and (option.refused or option.transformers == NO_EFFECT):
            continue
        where = " and ".join(option.endpoints)
        extension = "" if option in OPTIONS else " (extension)"
        cells = (option.transformers, option.vllm)
        transformers, vllm = (c.replace("|", "\\|") for c in cells)  # a table cell's own pipes
        rows.append(f"| `{option.name}`{extension} | {where} | {transformers} | {vllm} |")
    return "\n".join(rows) + "\n"
