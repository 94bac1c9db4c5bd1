"""Launch failures because the weights cannot be downloaded, told in words that say what to do.

Meta's Llama 3.2 Vision repositories are gated: a launch without ``--model_path`` downloads from
the hub, and without an accepted license and a token that download fails. Xinference 4.1 retries
it and then reports only ``Failed to download model '…' after multiple retries``, dropping the
reason (gated, wrong id, no network).

Xinference has no hook between "the engine class was chosen" and "the engine instance is
created", and the download happens right there (``create_llm_model_instance`` →
``LLMCacheManager.cache()``), in the worker process. So registration wraps
``LLMCacheManager.cache`` (:mod:`.compat.xinference_download`) in every Xinference process the
extension is loaded in (the worker included), for our families only: a failure is re-raised as
:class:`~.errors.WeightsUnavailable` whose message names the cause and the fix, chained to the
original exception. Other models' downloads are untouched. :func:`explain` is the pure mapping
from an exception to that message.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

#: Where users go to accept Meta's license (the hub page of the repository).
HF_PAGE = "https://huggingface.co/{repo}"


def _chain(error: BaseException, depth: int = 16) -> Iterator[BaseException]:
    """``error`` and its causes/contexts, each once (bounded)."""
    seen = set()
    while error is not None and id(error) not in seen and len(seen) < depth:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _status(error: BaseException) -> Optional[int]:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _classify(error: BaseException) -> Tuple[str, BaseException]:
    """``(kind, the exception that says so)``; kind is gated | not_found | revision | unreachable | other."""
    try:
        from huggingface_hub import errors as hf
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        hf = None
    chain = list(_chain(error))
    if hf is not None:
        for e in chain:
            if isinstance(e, hf.GatedRepoError):
                return "gated", e
        for e in chain:
            if isinstance(e, hf.RevisionNotFoundError):
                return "revision", e
            if isinstance(e, hf.RepositoryNotFoundError):
                return "not_found", e
            if isinstance(e, hf.HfHubHTTPError) and _status(e) in (401, 403):
                return "gated", e
            if isinstance(e, hf.HfHubHTTPError) and _status(e) == 404:
                return "not_found", e
    unreachable = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout",
                   "NetworkError", "NameResolutionError", "ProxyError")
    for e in reversed(chain):  # the innermost says most (e.g. "Connection refused")
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in unreachable:
            return "unreachable", e
    return "other", chain[-1] if chain else error


def _cause_text(error: BaseException) -> str:
    """One line naming the exception: its class and the first line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:3])
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def explain(error: BaseException, model_name: str, repo_id: Optional[str], hub: Optional[str] = "huggingface") -> str:
    """What went wrong downloading ``model_name`` from ``repo_id`` on ``hub``, and what to do.

    >>> from huggingface_hub.errors import LocalEntryNotFoundError
    >>> print(explain(LocalEntryNotFoundError("no network"), "llama-3.2-vision", "meta-llama/Llama-3.2-11B-Vision"))
    ... # doctest: +ELLIPSIS
    cannot download the weights of llama-3.2-vision from huggingface (meta-llama/Llama-3.2-11B-Vision): the hub is unreachable ...
    """
    repo = repo_id or "?"
    hub = hub or "huggingface"
    page = HF_PAGE.format(repo=repo) if hub == "huggingface" else f"the {hub} page of {repo}"
    kind, cause = _classify(error)
    where = f"cannot download the weights of {model_name} from {hub} ({repo})"
    local = "or download the weights where you can and launch with --model_path DIR (a local directory with the checkpoint)"
    token = "set HF_TOKEN (a read token of that account) in the environment of every Xinference worker"
    endpoint = os.environ.get("HF_ENDPOINT") if hub == "huggingface" else None
    if kind == "gated":
        return (
            f"{where}: the repository is gated and this server has no access. Accept Meta's Llama 3.2 "
            f"Community License on {page} (logged in to the account you will use), then {token} and launch "
            f"again; {local}. ({_cause_text(cause)})"
        )
    if kind == "not_found":
        return (
            f"{where}: the repository was not found, or it is gated/private and the request had no valid token. "
            f"Check the model id and size; if it is Meta's gated repository, accept the license on {page} and "
            f"{token}; {local}. ({_cause_text(cause)})"
        )
    if kind == "revision":
        return f"{where}: the requested revision does not exist; launch without a revision, {local}. ({_cause_text(cause)})"
    if kind == "unreachable":
        offline = " HF_HUB_OFFLINE is set, so nothing is downloaded." if os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0") else ""
        via = f" (HF_ENDPOINT={endpoint})" if endpoint else ""
        return (
            f"{where}: the hub is unreachable{via} and the weights are not in the local cache.{offline} Check the "
            f"network, proxy and HF_ENDPOINT of the worker; the repository is gated, so also accept the license on "
            f"{page} and {token}; {local}. ({_cause_text(cause)})"
        )
    return (
        f"{where}: {_cause_text(cause)}. If the repository is gated for you, accept the license on {page} and "
        f"{token}; {local}."
    )
