"""``response_format`` by constrained decoding, through xgrammar.

xgrammar compiles a JSON schema (or its built-in JSON grammar) against the tokenizer's vocabulary
and masks, at each step, the tokens that would leave the grammar. It is what vLLM uses for
guided decoding (0.9.2, 0.10.2 and V1), so both engines answer a schema the same way; the
comparison with lm-format-enforcer and outlines is in ``docs/api.md``.

Schemas are compiled without optional whitespace (``any_whitespace=False``): a model may then
not pad its JSON with newlines until ``max_tokens`` runs out, which small and random models do.
``json_object`` is the schema :data:`JSON_OBJECT` (any object), as vLLM compiles it.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Dict, List, Optional

from ..errors import RequestError

#: ``{"type": "json_object"}``'s schema: any JSON object (vLLM's reading of OpenAI's JSON mode).
JSON_OBJECT = {"type": "object"}

INSTALL = "pip install xgrammar (response_format needs it)"


def _xgrammar():
    try:
        import xgrammar
    except ImportError:
        return None
    return xgrammar


def check_schema(response_format: Optional[Dict[str, Any]]) -> None:
    """Refuse a JSON schema xgrammar cannot compile, naming why (in the API process, before the
    request reaches the model; where xgrammar is not installed, the model's own check decides)."""
    xgr = _xgrammar()
    if xgr is None or not response_format or response_format["type"] != "json_schema":
        return
    try:
        xgr.Grammar.from_json_schema(json.dumps(response_format["schema"]), any_whitespace=False)
    except Exception as e:  # xgrammar reports unsupported or invalid schemas as RuntimeError/ValueError
        raise _refusal(e) from None


def _why(error: Exception) -> str:
    """xgrammar's message without its C++ source location.

    >>> _why(RuntimeError('[19:16:20] /project/cpp/json_schema_converter.cc:5082: Unsupported type "foo"'))
    'Unsupported type "foo"'
    """
    return re.sub(r"^\[[^\]]*\]\s+\S+:\d+:\s*", "", str(error).strip())


def _refusal(error: Exception) -> RequestError:
    return RequestError(f"response_format.json_schema.schema: cannot be used for constrained decoding: {_why(error)}")


class Grammars:
    """Compiles ``response_format`` for one model's tokenizer (compiled schemas are cached)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: List[int]):
        xgr = _xgrammar()
        if xgr is None:
            raise RuntimeError(INSTALL)
        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_ids)
        self._compiler = xgr.GrammarCompiler(info)
        self._compile = functools.lru_cache(maxsize=64)(self._compile_text)

    def _compile_text(self, schema: str):
        return self._compiler.compile_json_schema(schema, any_whitespace=False)

    def processor(self, response_format: Dict[str, Any]):
        """A fresh logits processor for one sequence (it keeps that sequence's grammar state)."""
        from xgrammar.contrib.hf import LogitsProcessor

        schema = response_format.get("schema") or JSON_OBJECT  # json_object: any object, as vLLM reads it
        try:
            compiled = self._compile(json.dumps(schema, sort_keys=True))
        except Exception as e:
            raise _refusal(e) from None
        return LogitsProcessor(compiled)
