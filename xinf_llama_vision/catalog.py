"""What is ours: the families, which of them an engine class serves, and the environment their processes need.

Read by the engines, the installer (:mod:`.registration`) and the API side alike; it imports nothing
of Xinference's and nothing above the schema, so every one of them can point down at it.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

#: Environment a model process of an engine needs (lower-case engine name → variables). The API
#: process adds them to launches of our families (Xinference sets a launch's ``envs`` in the model
#: process before it imports anything): vLLM picks its V0 or V1 engine classes at import time,
#: and Mllama runs on V0 only.
ENGINE_ENVS: Dict[str, Dict[str, str]] = {"vllm": {"VLLM_USE_V1": "0"}}


@functools.lru_cache(maxsize=1)
def our_families() -> Dict[str, Any]:
    """name → our validated family (``BaseFamily`` or ``InstructFamily``), read once."""
    from .schema import load_families

    return {f.model_name: f for f in load_families()}


def our_family(llm_family) -> Optional[Any]:
    """Our family behind Xinference's ``llm_family``: by its name, or for a custom model registered on
    top of one of ours, by its ``model_family``; ``None`` for any other model."""
    families = our_families()
    for name in (getattr(llm_family, "model_name", None), getattr(llm_family, "model_family", None)):
        if name in families:
            return families[name]
    return None


def serves(llm_family, kind: str) -> Tuple[bool, str]:
    """Whether our ``kind`` ("base"/"instruct") engine class serves ``llm_family``."""
    ours = our_family(llm_family)
    if ours is None:
        return False, f"xinf-llama-vision serves {', '.join(sorted(our_families()))}, not {llm_family.model_name}"
    if ours.kind != kind:
        return False, f"{ours.model_name} is a {ours.kind} family; this engine class serves {kind} families"
    return True, ""
