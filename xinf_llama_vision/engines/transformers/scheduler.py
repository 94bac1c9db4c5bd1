"""Continuous batching for the Transformers engine: one thread runs the model; requests join the
running batch at the next step and leave it when they finish, stop or are abandoned.

The thread is the only code that touches the model. Requests talk to it through queues: a new
:class:`Sequence` goes into the inbox; each token comes back to the request's event loop with
``call_soon_threadsafe``. Nothing here blocks the model actor's threads: a waiting request is an
``await`` on an ``asyncio.Queue``, never a thread parked on ``queue.Queue.get()`` (which is how
seven concurrent streams used to hang a 2-core machine: every ``asyncio.to_thread`` worker
waited for a token that only another worker could produce).

Each step: admit waiting requests while the batch has room (prefilled together where their images
have one shape, see :mod:`.batch`), drop rows whose clients are gone, then one decode step for
every row, each row choosing its token with its own logits processors (those ``generate`` would
use for that request).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Set, Tuple

import torch

from ...compat.transformers_generation import sampler
from ...errors import RequestLeft
from .batch import DecodeBatch, image_keys_mask, prefill, prefill_key

#: Under Xinference's logger, so these lines reach the server's log with its own (model process: INFO).
logger = logging.getLogger("xinference.model.llm.xinf_llama_vision")

#: How long the scheduler waits without work before it gives freed memory back to the system.
IDLE_SECONDS = 1.0

#: A token's log-probability and, when asked for, the most likely alternatives ``[(token id, logprob)]``.
Logprob = Tuple[float, List[Tuple[int, float]]]
#: What :meth:`Sequence.events` yields: a generated token id, on the last one why it ended, and
#: its logprob when the request asked for them.
Event = Tuple[int, Optional[str], Optional[Logprob]]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` (another C library, another system)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_memory(model) -> None:
    """Give what the finished requests freed back to the system: glibc and CUDA's caching allocator
    would otherwise keep it for the next load, and the process would stay at its peak."""
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _logprob(logprobs: torch.Tensor, token: int, top: int) -> Logprob:
    """``token``'s logprob and the ``top`` most likely tokens' (ties: the lower id first)."""
    alternatives: List[Tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logprobs, top)
        alternatives = [(int(i), float(v)) for v, i in zip(values, ids)]
    return float(logprobs[token]), alternatives


@dataclass(eq=False)
class Sequence:
    """One request: its processed inputs, how it samples and stops, and its way back to the caller."""

    inputs: Any  # the processor's BatchFeature, on the model's device
    max_new_tokens: int
    stop_ids: Set[int]
    processors: Any
    do_sample: bool
    loop: asyncio.AbstractEventLoop
    #: This sequence's own random numbers (a request's ``seed``); ``None``: torch's global generator.
    generator: Optional[torch.Generator] = None
    #: How many alternatives each token's logprob lists; ``None``: no logprobs.
    top_logprobs: Optional[int] = None
    out: "asyncio.Queue[Any]" = field(default_factory=asyncio.Queue)
    ids: List[int] = field(default_factory=list)  # prompt, then generated
    generated: int = 0
    finished: bool = False
    cancelled: Optional[str] = None  # why the row must leave early

    @classmethod
    def create(cls, model, inputs, generate_kwargs: Dict[str, Any], loop: asyncio.AbstractEventLoop,
               seed: Optional[int] = None, top_logprobs: Optional[int] = None) -> "Sequence":
        """One request for ``model``: its processed ``inputs`` and the ``generate`` options it would run with
        (``max_new_tokens`` and ``eos_token_id`` set); with ``seed``, it samples as ``generate`` does after
        ``torch.manual_seed(seed)``, whatever else runs in the batch."""
        prompt_ids = inputs["input_ids"]
        processors, do_sample = sampler(model, generate_kwargs, prompt_ids)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=model.device).manual_seed(seed % 2**64)
        return cls(inputs=inputs, max_new_tokens=generate_kwargs["max_new_tokens"],
                   stop_ids=set(generate_kwargs["eos_token_id"]), processors=processors, do_sample=do_sample,
                   loop=loop, generator=generator, top_logprobs=top_logprobs, ids=prompt_ids[0].tolist())

    @property
    def active(self) -> bool:
        """Waiting or running, not yet told to leave."""
        return not self.finished and self.cancelled is None

    def cancel(self, why: str = "the client went away") -> None:
        """The caller is gone (hung up, aborted) or has all it wants: leave the batch at the next step."""
        if self.active:
            self.cancelled = why

    def leave(self) -> None:
        """Out of the batch early (:meth:`cancel`): a caller still reading learns why."""
        self.fail(RequestLeft(f"this request left the batch: {self.cancelled}"))

    def _send(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    def choose(self, logits: torch.Tensor) -> Optional[str]:
        """Pick the next token from this row's float32 ``logits`` (as ``generate`` does), send it, and
        return why the sequence ended (``None`` while it goes on)."""
        logprobs = torch.log_softmax(logits, dim=-1) if self.top_logprobs is not None else None
        scores = logits[None]  # processors may work in place (the grammar's mask does): logprobs come first
        if len(self.processors):
            scores = self.processors(torch.tensor([self.ids], device=logits.device), scores)
        if self.do_sample:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, num_samples=1, generator=self.generator)[0, 0])
        else:
            token = int(scores[0].argmax())
        self.ids.append(token)
        self.generated += 1
        finish = "stop" if token in self.stop_ids else "length" if self.generated >= self.max_new_tokens else None
        self.finished = finish is not None
        self._send((token, finish, None if logprobs is None else _logprob(logprobs, token, self.top_logprobs)))
        return finish

    def fail(self, error: BaseException) -> None:
        self.finished = True
        self._send(error)

    async def events(self) -> AsyncIterator[List[Event]]:
        """The tokens as they come, in lists of all that arrived since the last one (a reader that
        falls behind under load gets fewer, larger pieces); leaving early (``break``, ``aclose``,
        cancellation) cancels the row."""
        try:
            while True:
                items, ready = [await self.out.get()], []
                while not self.out.empty():
                    items.append(self.out.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        if ready:
                            yield ready
                        raise item
                    ready.append(item)
                    if item[1] is not None:
                        yield ready
                        return
                yield ready
        finally:
            self.cancel()


class Scheduler:
    """The model's one worker thread and its running batch (at most ``max_num_seqs`` rows)."""

    def __init__(self, model, max_num_seqs: int):
        self.model = model
        self.max_num_seqs = max_num_seqs
        self._inbox: "queue.Queue[Optional[Sequence]]" = queue.Queue()
        self._waiting: List[Sequence] = []
        self._running: List[Sequence] = []
        self._batch = DecodeBatch(model)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mllama-scheduler", daemon=True)
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        if self._closed:
            raise RuntimeError("this model is stopping")
        self._inbox.put(seq)

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout=60)

    # -- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            try:
                self._collect(block=not self._running and not self._waiting)
                self._admit()
                if self._running:
                    self._step()
            except Exception as error:  # never leave a caller waiting: fail what was running
                logger.exception("batch step failed")
                for seq in self._running:
                    seq.fail(error)
                self._running, self._batch = [], DecodeBatch(self.model)
        for seq in self._waiting + self._running:
            seq.fail(RuntimeError("the model stopped before this request finished"))

    def _collect(self, block: bool) -> None:
        """Move new requests to the waiting list; with ``block``, wait for one (after a second
        without any, the memory the last ones freed goes back to the system first)."""
        try:
            try:
                item = self._inbox.get(block=block, timeout=IDLE_SECONDS if block else None)
            except queue.Empty:
                if not block:
                    raise
                release_memory(self.model)
                item = self._inbox.get()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> None:
        """Waiting requests, as many as the batch has room for, prefilled in groups of one image shape."""
        admitted: List[Sequence] = []
        while self._waiting and len(self._running) + len(admitted) < self.max_num_seqs:
            seq = self._waiting.pop(0)
            if seq.cancelled is None:
                admitted.append(seq)
            else:
                logger.info("a request left the queue before it started: %s", seq.cancelled)
                seq.leave()
        groups: Dict[Any, List[Sequence]] = {}
        for seq in admitted:
            groups.setdefault(prefill_key(seq.inputs), []).append(seq)
        for group in groups.values():
            try:
                rows = prefill(self.model, [seq.inputs for seq in group])
            except Exception as error:
                logger.exception("prefill failed")
                for seq in group:
                    seq.fail(error)
                continue
            for seq, (logits, layers, length) in zip(group, rows):
                if self._choose(seq, logits) is None:
                    self._batch.add(layers, length, image_keys_mask(self.model, seq.inputs.get("cross_attention_mask")))
                    self._running.append(seq)
                seq.inputs = None  # pixel values are in the cache now

    @staticmethod
    def _choose(seq: Sequence, logits: torch.Tensor) -> Optional[str]:
        """``seq.choose``; a failure there (one request's own processors) ends that request only."""
        try:
            return seq.choose(logits)
        except Exception as error:
            logger.exception("choosing a token failed")
            seq.fail(error)
            return "error"

    def _step(self) -> None:
        gone = [i for i, seq in enumerate(self._running) if seq.cancelled]
        for i in gone:
            seq = self._running[i]
            logger.info("a request left the batch after %d of %d tokens: %s", seq.generated, seq.max_new_tokens,
                        seq.cancelled)
            seq.leave()
        if gone:
            self._leave(gone)
            if not self._running:
                return
        logits = self._batch.step([seq.ids[-1] for seq in self._running])
        done = [i for i, (seq, row) in enumerate(zip(self._running, logits)) if self._choose(seq, row) is not None]
        if done:
            self._leave(done)

    def _leave(self, indexes: List[int]) -> None:
        self._batch.remove(indexes)
        drop = set(indexes)
        self._running = [seq for i, seq in enumerate(self._running) if i not in drop]
