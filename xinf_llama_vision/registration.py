"""Registration with Xinference: our families and engine classes, ahead of the built-ins.

One idempotent function, :func:`register`, over two data tables: the catalog's families
(:mod:`.catalog`, read from ``model_specs/``) and :data:`ENGINES` below, engine classes by name.
Engine modules are imported only when Xinference asks for its engine table, never at
``import xinf_llama_vision``.

* Engines go in through Xinference's official pre-bootstrap hook
  (``xinference.engine_hooks``) when this process has not built its model registry yet, and
  straight into the live table otherwise; either way they come *first* in their engine's list,
  so they win over the built-in classes that also claim these families.
* Families replace the built-in entries of the same name (``xinference launch --model-name
  llama-3.2-vision-instruct`` resolves to ours), and are put back if Xinference refreshes its
  catalog at run time.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any, Dict, List, Optional, Tuple

from ._version import __version__
from .catalog import our_families, our_family
from .compat import xinference_download, xinference_refresh
from .weights import explain

logger = logging.getLogger("xinf_llama_vision")

#: (Xinference engine name, "module:Class"), in order of precedence.
ENGINES: Tuple[Tuple[str, str], ...] = (
    ("Transformers", "xinf_llama_vision.engines.transformers.engine:MllamaChatModel"),
    ("Transformers", "xinf_llama_vision.engines.transformers.engine:MllamaGenerateModel"),
    ("vLLM", "xinf_llama_vision.engines.vllm:MllamaVLLMChatModel"),
    ("vLLM", "xinf_llama_vision.engines.vllm:MllamaVLLMGenerateModel"),
)

_lock = threading.RLock()
_state: Dict[str, Any] = {"registered": False, "builtins": {}, "ours": {}, "hook": None}


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


def _reinstall_families() -> None:
    with _lock:
        if _state["registered"]:
            _install_families()


def explain_download(family, error: BaseException, name: str, repo_id: Optional[str], hub: Optional[str]) -> Optional[str]:
    return explain(error, name, repo_id, hub) if our_family(family) is not None else None


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
        xinference_download.install(explain_download)  # a failed download of our weights says what to do
        xinference_refresh.install(_reinstall_families)  # a refresh of Xinference's catalog keeps ours
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
        xinference_refresh.uninstall()
        xinference_download.uninstall()
        _state.update(registered=False, builtins={}, ours={})


def status() -> Dict[str, Any]:
    """What is registered in this process (for logs, the status route and ``doctor``)."""
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
