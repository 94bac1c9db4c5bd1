"""Registration with Xinference: our families and engine classes, ahead of the built-ins.

One idempotent function, :func:`register`, over two data tables: the families read from
``model_specs/`` and :data:`ENGINES` below. Engine modules are imported only when Xinference
asks for its engine table, never at ``import xinf_llama_vision``.

* Engines go in through Xinference's official pre-bootstrap hook
  (``xinference.engine_hooks``) when this process has not built its model registry yet, and
  straight into the live table otherwise; either way they come *first* in their engine's list,
  so they win over the built-in classes that also claim these families.
* Families replace the built-in entries of the same name (``xinference launch --model-name
  llama-3.2-vision-instruct`` resolves to ours), and are put back if Xinference refreshes its
  catalog at run time.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from typing import Any, Dict, List, Optional, Tuple

logger = logging.getLogger("xinf_llama_vision")

#: (Xinference engine name, "module:Class"), in order of precedence.
ENGINES: Tuple[Tuple[str, str], ...] = (
    ("Transformers", "xinf_llama_vision.engines.transformers.engine:MllamaChatModel"),
    ("Transformers", "xinf_llama_vision.engines.transformers.engine:MllamaGenerateModel"),
    ("vLLM", "xinf_llama_vision.engines.vllm:MllamaVLLMChatModel"),
    ("vLLM", "xinf_llama_vision.engines.vllm:MllamaVLLMGenerateModel"),
)

#: Environment a model process of an engine needs (lower-case engine name → variables). The API
#: process adds them to launches of our families (Xinference sets a launch's ``envs`` in the model
#: process before it imports anything): vLLM picks its V0 or V1 engine classes at import time,
#: and Mllama runs on V0 only.
ENGINE_ENVS: Dict[str, Dict[str, str]] = {"vllm": {"VLLM_USE_V1": "0"}}

_lock = threading.RLock()
_state: Dict[str, Any] = {"registered": False, "builtins": {}, "ours": {}, "refresh": None, "hook": None}


def _load(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def engine_classes() -> List[Tuple[str, type]]:
    return [(engine, _load(path)) for engine, path in ENGINES]


def add_engines(table) -> None:
    """Put our classes first in their engines' lists (an ``engine_hooks`` callback)."""
    for engine, cls in reversed(engine_classes()):
        classes = table.setdefault(engine, [])
        if cls in classes:
            classes.remove(cls)
        classes.insert(0, cls)


def _remove_engines(table) -> None:
    for engine, cls in engine_classes():
        if cls in table.get(engine, []):
            table[engine].remove(cls)


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


def to_xinference(family) -> Any:
    """Our family → Xinference's ``LLMFamilyV2``, specs flattened per hub as its loader does."""
    from xinference.model.llm.llm_family import LLMFamilyV2
    from xinference.model.utils import flatten_quantizations

    data = family.to_xinference_dict()
    data["model_specs"] = [flat for spec in data["model_specs"] for flat in flatten_quantizations(spec)]
    return LLMFamilyV2.parse_obj(data)


def _install_families() -> None:
    import xinference.model.llm as llm
    from xinference.model.llm.core import LLM_VERSION_INFOS, generate_llm_version_info

    for name, family in our_families().items():
        ours = to_xinference(family)
        builtins = llm.BUILTIN_LLM_FAMILIES
        index = next((i for i, f in enumerate(builtins) if f.model_name == name), None)
        if index is None:
            builtins.append(ours)
            _state["builtins"].setdefault(name, None)
        else:
            if builtins[index] is not _state["ours"].get(name):
                _state["builtins"][name] = builtins[index]
            builtins[index] = ours
        _state["ours"][name] = ours
        llm._register_model_family_metadata(ours)
        llm.LLM_ENGINES.pop(name, None)
        llm.generate_engine_config_by_model_family(ours)
        LLM_VERSION_INFOS.update(generate_llm_version_info(ours))


def register() -> None:
    """Register our families and engines in this Xinference process. Idempotent."""
    from xinference.engine_hooks import MODEL_TYPE_LLM, register_engine_registration_hook

    with _lock:
        if _state["registered"]:
            return
        try:
            register_engine_registration_hook(MODEL_TYPE_LLM, add_engines)
            _state["hook"] = "engine_hooks"
        except RuntimeError:  # this process already built its model registry
            _state["hook"] = "live"
        import xinference.model.llm as llm  # builds the registry (running the hook) if not yet built

        if _state["hook"] == "live":
            add_engines(llm.SUPPORTED_ENGINES)
        _install_families()
        from .weights import install as explain_download_failures

        explain_download_failures(lambda family: our_family(family) is not None)  # a failed download of our weights says what to do
        refresh = llm.register_builtin_model
        if not getattr(refresh, "_xlv", False):

            def register_builtin_model():
                refresh()
                with _lock:
                    if _state["registered"]:
                        _install_families()

            register_builtin_model._xlv = True
            _state["refresh"] = refresh
            llm.register_builtin_model = register_builtin_model
        _state["registered"] = True


def unregister() -> None:
    """Undo :func:`register` in this process: the built-in families and engines come back."""
    with _lock:
        if not _state["registered"]:
            return
        import xinference.model.llm as llm
        from xinference.model.llm.core import LLM_VERSION_INFOS, generate_llm_version_info

        _remove_engines(llm.SUPPORTED_ENGINES)
        for name, original in _state["builtins"].items():
            builtins = llm.BUILTIN_LLM_FAMILIES
            index = next((i for i, f in enumerate(builtins) if f.model_name == name), None)
            if index is not None:
                if original is None:
                    del builtins[index]
                else:
                    builtins[index] = original
            llm.LLM_ENGINES.pop(name, None)
            if original is not None:
                llm.generate_engine_config_by_model_family(original)
                LLM_VERSION_INFOS.update(generate_llm_version_info(original))
        if _state["refresh"] is not None:
            llm.register_builtin_model = _state["refresh"]
        from .weights import uninstall

        uninstall()
        _state.update(registered=False, builtins={}, ours={}, refresh=None)


def status() -> Dict[str, Any]:
    """What is registered in this process (for logs, the status route and ``doctor``)."""
    from . import __version__

    info: Dict[str, Any] = {"version": __version__, "registered": _state["registered"], "via": _state["hook"]}
    if _state["registered"]:
        import xinference.model.llm as llm

        info["families"] = {
            name: sorted(
                {p["llm_class"].__module__ + ":" + p["llm_class"].__name__ for ps in engines.values() for p in ps}
            )
            for name, engines in llm.LLM_ENGINES.items()
            if name in our_families()
        }
    return info
