"""What every engine shares beyond :mod:`..request`: publishing the launch policy, the context
length with the one check of a request that needs the tokenized prompt, and refusals that reach
the client as a 400."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from typing import Any, AsyncIterator, Awaitable, Dict, Optional

from xinference.model.llm.llm_family import LLMFamilyV2

try:  # Xinference >= 4.1 answers this with a 400
    from xinference.model.llm.context_length import ContextLengthExceeded
except ImportError:  # pragma: no cover - Xinference 4.0
    ContextLengthExceeded = ValueError

from ..errors import RequestError, RequestFailed
from ..memory import Architecture, check_fit, estimate, tile_tokens
from ..parsing import switch
from ..request import Policy, launch_int
from ..request.wire import ACCEPTED_KEY, FAILURE_KEY, POLICY_KEY, REFUSAL_KEY


async def answer_or_refusal(answer: Awaitable[Any], stream: bool, announce: bool = False) -> Any:
    """``answer``; a :class:`RequestError` becomes ``{REFUSAL_KEY: message}`` (the first and only
    chunk of a stream), which the API guard answers with a 400 (Xinference would hide the message
    behind a 500); a :class:`RequestFailed`, ``{FAILURE_KEY: message}``, the guard's 500 with it.
    ``announce``: a stream comes through :func:`announced` (for an engine whose first chunk is its
    first token)."""
    try:
        result = await answer
    except (RequestError, RequestFailed) as e:
        refusal: Dict[str, str] = {REFUSAL_KEY if isinstance(e, RequestError) else FAILURE_KEY: str(e)}
        if not stream:
            return refusal

        async def one_chunk():
            yield refusal

        return one_chunk()
    return announced(result) if announce and inspect.isasyncgen(result) else result


#: How long a stream's first chunk may take before :func:`announced` says the stream is accepted.
ANNOUNCE_AFTER = 0.25


async def announced(chunks: AsyncIterator[Any], after: float = ANNOUNCE_AFTER) -> AsyncIterator[Any]:
    """``chunks``, led by ``{ACCEPTED_KEY: True}`` when the first chunk takes longer than ``after``
    seconds (a request queued in vLLM, whose first chunk is its first token). The API guard holds a
    stream's headers until its first event, to turn a refusal into a 400. Every check of ours is
    done before this stream exists, so on the marker the guard sends the headers and a comment
    (``api/refusal.py``), and the client and its proxies see the stream alive at once. A first chunk
    (or vLLM's own refusal) within ``after`` comes first as before.

    >>> async def slow():
    ...     await asyncio.sleep(0.05)
    ...     yield {"choices": []}
    >>> async def read(chunks):
    ...     return [chunk async for chunk in chunks]
    >>> asyncio.run(read(announced(slow(), after=0.01)))
    [{'xinf_llama_vision_accepted': True}, {'choices': []}]
    >>> asyncio.run(read(announced(slow(), after=5)))
    [{'choices': []}]
    """
    first = asyncio.ensure_future(chunks.__anext__())
    try:
        if not (await asyncio.wait({first}, timeout=after))[0]:
            yield {ACCEPTED_KEY: True}
        try:
            chunk = await first
        except StopAsyncIteration:
            return
        yield chunk
        async for chunk in chunks:
            yield chunk
    finally:  # a client that hangs up while the first chunk is awaited: that wait ends, then the stream
        if not first.done():
            first.cancel()
            await asyncio.wait({first})
        if not first.cancelled():
            first.exception()  # retrieved, so that asyncio does not log it as never retrieved
        await chunks.aclose()


class LaunchedFamily(LLMFamilyV2):
    """One launched model's family: its Xinference description also carries the plugin's policy,
    which the API process reads to check requests before they reach the model."""

    def to_description(self):
        description = super().to_description()
        description[POLICY_KEY] = getattr(self, POLICY_KEY, None)
        return description


def launched(family: LLMFamilyV2, policy: Policy) -> LaunchedFamily:
    return LaunchedFamily.parse_obj({**family.dict(), POLICY_KEY: policy.to_dict()})


def checkpoint_config(model_path: str) -> Dict[str, Any]:
    """The checkpoint's ``config.json`` (empty where it has none)."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def checkpoint_max_positions(model_path: str) -> Optional[int]:
    """``text_config.max_position_embeddings`` of the checkpoint, if it says."""
    value = (checkpoint_config(model_path).get("text_config") or {}).get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def image_positions(model_path: str) -> int:
    """Encoder positions of one image at most: ``max_num_tiles`` tiles of patches and a class token each
    (4 × 1,601 on the real checkpoints)."""
    vision = checkpoint_config(model_path).get("vision_config") or {}
    tiles, size, patch = vision.get("max_num_tiles", 4), vision.get("image_size", 560), vision.get("patch_size", 14)
    return tiles * tile_tokens(size, patch)


def tile_count(height: int, width: int, max_tiles: int, tile_size: int) -> int:
    """How many tiles Mllama's image processor cuts a ``height`` × ``width`` image into (transformers' own
    choice of canvas).

    >>> tile_count(48, 64, 4, 560), tile_count(560, 1120, 4, 560), tile_count(1000, 1000, 4, 560)
    (1, 2, 4)
    """
    try:  # transformers >= 5: the module without torchvision; 4.x: the only one
        from transformers.models.mllama.image_processing_pil_mllama import get_optimal_tiled_canvas
    except ImportError:
        from transformers.models.mllama.image_processing_mllama import get_optimal_tiled_canvas

    canvas_height, canvas_width = get_optimal_tiled_canvas(height, width, max_tiles, tile_size)
    return int(canvas_height // tile_size) * int(canvas_width // tile_size)


def context_length(option: str, launch_value: Any, model_path: str, family: LLMFamilyV2) -> int:
    """The context a launched model serves: the launch option, else the checkpoint's, else the family's."""
    if launch_value is not None:
        return launch_int(option, launch_value)
    return checkpoint_max_positions(model_path) or int(family.context_length)


class ContextTooLong(RequestError, ContextLengthExceeded):
    """Prompt plus ``max_tokens`` do not fit the context: a :class:`RequestError` like any other
    (:func:`answer_or_refusal`), and Xinference's own ``ContextLengthExceeded``, a 400 wherever it
    escapes."""


def output_room(prompt_tokens: int, max_tokens: Optional[int], context: int) -> int:
    """How many tokens a request may generate: ``max_tokens``, or all the room the prompt leaves.

    >>> output_room(10, None, 100), output_room(10, 90, 100)
    (90, 90)
    >>> output_room(10, 91, 100)
    Traceback (most recent call last):
    ...
    xinf_llama_vision.engines.common.ContextTooLong: the prompt is 10 tokens and max_tokens is 91: together more than this model's context length of 100 tokens; lower max_tokens to at most 90 or shorten the prompt
    """
    room = context - prompt_tokens
    if room < 1:
        raise ContextTooLong(
            f"the prompt is {prompt_tokens} tokens, which leaves no room in this model's context length of "
            f"{context} tokens; shorten the prompt"
        )
    if max_tokens is not None and max_tokens > room:
        raise ContextTooLong(
            f"the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}: together more than this "
            f"model's context length of {context} tokens; lower max_tokens to at most {room} or shorten the prompt"
        )
    return max_tokens or room


#: The launch option that skips :func:`check_memory` (for experts who know better than the estimate).
SKIP_MEMORY_CHECK = "skip_memory_check"


def memory_check_wanted(config: Dict[str, Any]) -> bool:
    """False when the launch says ``--skip_memory_check true``; the option is taken out of ``config``.

    >>> config = {"skip_memory_check": "true", "max_num_seqs": 4}
    >>> memory_check_wanted(config), config
    (False, {'max_num_seqs': 4})
    """
    return not switch(config.pop(SKIP_MEMORY_CHECK, False), f"launch option {SKIP_MEMORY_CHECK}")


def check_memory(model_path: str, quantization: str, quantizations, context_length: int,
                 gpus: Optional[int] = None, dtype_bytes: int = 2, context_option: str = "--max_model_len",
                 images: int = 1) -> None:
    """On CUDA, fail the launch at once (:class:`..memory.DoesNotFit`, with launches that would fit)
    when the weights and one ``context_length`` sequence do not fit the free memory of the launch's
    GPUs (Xinference makes them the model process's visible devices; ``gpus``: the first N of them)."""
    import torch

    if not torch.cuda.is_available():
        return
    count = torch.cuda.device_count() if gpus is None else min(gpus, torch.cuda.device_count())
    free = [torch.cuda.mem_get_info(i)[0] for i in range(count)]
    arch = Architecture.from_checkpoint(model_path)
    need = estimate(arch, quantization, context_length, max_num_seqs=1, images_per_seq=images, dtype_bytes=dtype_bytes)
    check_fit(arch, need, free, quantizations, option=f"--{SKIP_MEMORY_CHECK} true", context_option=context_option)


def checkpoint_sampling(model_path: str) -> Dict[str, Any]:
    """The sampling defaults of the checkpoint's ``generation_config.json`` for fields a request leaves
    unset, on both engines (what the file does not set is not sampled with: no top-k, no top-p)."""
    try:
        with open(os.path.join(model_path, "generation_config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    if not config.get("do_sample", False):
        return {"temperature": 0.0}
    return {k: config[k] for k in ("temperature", "top_p", "top_k") if config.get(k) is not None}
