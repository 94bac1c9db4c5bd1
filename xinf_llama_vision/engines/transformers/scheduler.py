"""Continuous batching for the Transformers engine: one thread runs the model; requests join the
running batch at the next step and leave it when they finish, stop or are abandoned.

The thread is the only code that touches the model. Requests talk to it through queues: a new
:class:`Sequence` goes into the inbox; each token comes back to the request's event loop with
``call_soon_threadsafe``. Nothing here blocks the model actor's threads: a waiting request is an
``await`` on an ``asyncio.Queue``, never a thread parked on ``queue.Queue.get()`` (which is how
seven concurrent streams used to hang a 2-core machine: every ``asyncio.to_thread`` worker
waited for a token that only another worker could produce).

Each step: admit waiting requests while the batch has room, in rows and in memory (prefilled together
where their images have one shape, see :mod:`.batch`; the memory rule is :mod:`.admission`'s), drop
rows whose clients are gone, put the newest rows back in the queue if the batch would outgrow its
budget, then one decode step for every row, each row choosing its token with its own logits
processors (those ``generate`` would use for that request).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, FrozenSet, List, Optional, Set, Tuple

import torch

from ...compat.transformers_generation import sampler
from ...errors import RequestFailed, RequestLeft
from ...generation import IMPOSSIBLE
from . import faults
from .admission import JOIN_HEADROOM, PREFILL_TOKENS, Budget, is_out_of_memory
from .batch import DecodeBatch, image_keys_mask, prefill, prefill_from, prefill_key, resumed
from .reuse import ReuseCache, prefix_tokens

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
        alternatives = [(int(i), max(float(v), IMPOSSIBLE)) for v, i in zip(values, ids)]
    return max(float(logprobs[token]), IMPOSSIBLE), alternatives


@dataclass(eq=False)
class Sequence:
    """One request: its processed inputs, how it samples and stops, and its way back to the caller."""

    inputs: Any  # the processor's BatchFeature, off the device until its prefill; kept while it runs (to resume)
    max_new_tokens: int
    stop_ids: Set[int]
    processors: Any
    do_sample: bool
    loop: asyncio.AbstractEventLoop
    #: This sequence's own random numbers (a request's ``seed``); ``None``: torch's global generator.
    generator: Optional[torch.Generator] = None
    #: How many alternatives each token's logprob lists; ``None``: no logprobs.
    top_logprobs: Optional[int] = None
    #: The request's ``response_format`` as a logits processor (masks what the format forbids); ``None``: free.
    constraint: Any = None
    #: Stages where the tests asked this request to fail (:mod:`.faults`; empty outside the tests).
    faults: FrozenSet[str] = frozenset()
    patches: int = 0  # cross-attention keys per tile (the vision model's patches and class token)
    #: Its images' keys in the image cache (:func:`.reuse.image_keys`), in prompt order.
    image_hashes: Tuple[str, ...] = ()
    #: Whose request it is, for the caches (:func:`.reuse.image_keys`; a hash of its credential).
    scope: str = ""
    #: ``(n, layers)``: its prompt's first ``n`` tokens' keys and values, found in the prefix cache.
    prefix: Any = None
    answered: bool = False  # ended by its own last token (a stop token or max_tokens), not by a failure
    out: "asyncio.Queue[Any]" = field(default_factory=asyncio.Queue)
    ids: List[int] = field(default_factory=list)  # prompt, then generated
    generated: int = 0
    finished: bool = False
    cancelled: Optional[str] = None  # why the row must leave early
    #: Times it was put back in the queue to keep the batch within its memory budget.
    requeued: int = 0

    @classmethod
    def create(cls, model, inputs, generate_kwargs: Dict[str, Any], loop: asyncio.AbstractEventLoop,
               seed: Optional[int] = None, top_logprobs: Optional[int] = None, constraint: Any = None,
               injected: FrozenSet[str] = frozenset(), image_hashes: Tuple[str, ...] = (),
               scope: str = "") -> "Sequence":
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
                   loop=loop, generator=generator, top_logprobs=top_logprobs, constraint=constraint,
                   faults=injected, ids=prompt_ids[0].tolist(), patches=model.model.vision_model.num_patches,
                   image_hashes=tuple(image_hashes), scope=scope)

    @property
    def image_width(self) -> int:
        """Cross-attention keys its row holds: images × tiles × patches (0 without images)."""
        mask = self.inputs.get("cross_attention_mask") if self.inputs is not None else None
        return 0 if mask is None else int(mask.shape[2] * mask.shape[3]) * self.patches

    @property
    def remaining(self) -> int:
        """Tokens it may still generate."""
        return self.max_new_tokens - self.generated

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
        return why the sequence ended (``None`` while it goes on).

        Logprobs are those of the model's distribution over what the request's format allows: after the
        constraint's mask, before penalties, temperature, top-k and top-p (docs/api.md, "Logprobs"). The
        mask only sets forbidden tokens to -inf, so applying it first chooses as ``generate`` does with
        it last among the processors."""
        ids = torch.tensor([self.ids], device=logits.device)
        scores = logits[None]
        if self.constraint is not None:
            scores = self.constraint(ids, scores)
        logprobs = torch.log_softmax(scores[0], dim=-1) if self.top_logprobs is not None else None
        if len(self.processors):  # they may work in place: the logprobs above are a new tensor
            scores = self.processors(ids, scores)
        if self.do_sample:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, num_samples=1, generator=self.generator)[0, 0])
        else:
            token = int(scores[0].argmax())
        self.ids.append(token)
        self.generated += 1
        finish = "stop" if token in self.stop_ids else "length" if self.generated >= self.max_new_tokens else None
        self.finished = self.answered = finish is not None
        if self.finished:
            self.inputs = None
        self._send((token, finish, None if logprobs is None else _logprob(logprobs, token, self.top_logprobs)))
        return finish

    def fail(self, error: BaseException) -> None:
        self.finished, self.inputs = True, None
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
    """The model's one worker thread and its running batch (at most ``max_num_seqs`` rows, within
    ``budget``'s bytes; ``None``: no memory limit)."""

    def __init__(self, model, max_num_seqs: int, budget: Optional[Budget] = None, reuse: Optional[ReuseCache] = None):
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.budget = budget
        self.reuse = reuse
        self._inbox: "queue.Queue[Optional[Sequence]]" = queue.Queue()
        self._waiting: List[Sequence] = []
        self._running: List[Sequence] = []
        self._batch = DecodeBatch(model)
        self._requeued = 0  # rows put back in the queue since the last report
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
            self._cycle(block=not self._running and not self._waiting)
        for seq in self._waiting + self._running:
            seq.fail(RuntimeError("the model stopped before this request finished"))

    def _cycle(self, block: bool = False) -> None:
        """New requests in, waiting ones admitted, one decode step."""
        try:
            self._collect(block)
            self._admit()
            if self._running:
                self._step()
        except Exception as error:  # a decode step: its rows shared it, so they end; the queue goes on
            logger.exception("a decode step failed; the %d requests in it end", len(self._running))
            rows = [seq for seq in self._running if not seq.finished]
            for seq in rows:
                seq.fail(RequestFailed("in a decode step", error) if len(rows) == 1 else
                         RequestFailed(f"in a decode step it shared with {len(rows) - 1} other running requests, "
                                       "which ended too", error, alone=False))
            self._running, self._batch = [], DecodeBatch(self.model)

    def _collect(self, block: bool) -> None:
        """Move new requests to the waiting list; with ``block``, wait for one (after a second
        without any, the memory the last ones freed goes back to the system first)."""
        try:
            try:
                item = self._inbox.get(block=block, timeout=IDLE_SECONDS if block else None)
            except queue.Empty:
                if not block:
                    raise
                self._report()
                release_memory(self.model)
                item = self._inbox.get()
            while True:
                if item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _report(self) -> None:
        """The cache's measured peak since the last report, against the budget (in the model's log)."""
        if self._batch.peak:
            budget = f"of a budget of {self.budget.limit} bytes" if self.budget else "(no memory budget)"
            logger.info("batch cache: peak %d bytes %s; %d rows put back in the queue to stay within it",
                        self._batch.peak, budget, self._requeued)
            if self.reuse is not None:
                logger.info("%s (at most %d bytes)", self.reuse.stats.line(), self.reuse.limit)
        self._batch.peak, self._requeued = 0, 0

    def _fits(self, rows: List[Sequence], headroom: int) -> bool:
        """Whether the batch with ``rows`` (running and joining) keeps the budget's rule ``headroom``
        tokens ahead (each row padded to the longest, see :mod:`.admission`)."""
        if self.budget is None:
            return True
        width = max([self._batch.width] + [len(seq.ids) for seq in rows if seq not in self._running])
        image_width = max([self._batch.image_width] + [seq.image_width for seq in rows if seq not in self._running])
        return self.budget.holds(len(rows), width + headroom, image_width)

    def _admit(self) -> None:
        """Waiting requests, first come first served, while the batch has room for them in rows and in
        memory, prefilled in groups of one image shape (at most :data:`PREFILL_TOKENS` a group).
        A failure ends the request it is about: a group whose prefill fails is prefilled again one
        request at a time, and a row that cannot join the batch leaves the batch as it was."""
        admitted: List[Sequence] = []
        while self._waiting and len(self._running) + len(admitted) < self.max_num_seqs:
            seq = self._waiting[0]
            if seq.cancelled is not None:
                self._waiting.pop(0)
                logger.info("a request left the queue before it started: %s", seq.cancelled)
                seq.leave()
                continue
            rows = self._running + admitted + [seq]
            if len(rows) > 1 and not self._fits(rows, min(JOIN_HEADROOM, seq.remaining)):
                break  # it waits for rows to leave (a row alone always fits: the context is the budget's)
            admitted.append(self._waiting.pop(0))
        groups: Dict[Any, List[List[Sequence]]] = {}
        for seq in admitted:
            try:
                if self._found_prefix(seq):  # prefilled alone, after its cached prefix
                    groups[("prefix", id(seq))] = [[seq]]
                    continue
                same = groups.setdefault(prefill_key(seq.inputs), [[]])
                if (len(same[-1]) + 1) * max([len(seq.ids)] + [len(s.ids) for s in same[-1]]) > PREFILL_TOKENS:
                    same.append([])
                same[-1].append(seq)
            except Exception as error:  # taken from the queue: it ends here, in words, or it would wait forever
                logger.exception("a request's inputs could not be grouped")
                seq.fail(RequestFailed("preparing its prefill", error))
        for group in (g for same in groups.values() for g in same if g):
            for seq, (logits, layers, length) in self._prefill(group):
                self._join(seq, logits, layers, length)

    def _prefill(self, group: List[Sequence]) -> List[Tuple[Sequence, Any]]:
        """``[(seq, (logits, cache layers, length))]`` of the group's requests whose prefill succeeded
        (a request put back in the queue is prefilled with its tokens so far)."""
        try:
            for seq in group:
                faults.check("prefill", seq.faults)
            if group[0].prefix is not None:
                (start, layers), group[0].prefix = group[0].prefix, None
                return [(group[0], prefill_from(self.model, group[0].inputs, start, layers, self.reuse,
                                                group[0].image_hashes))]
            inputs = [resumed(seq.inputs, seq.ids) for seq in group]
            keys = [seq.image_hashes for seq in group] if self.reuse is not None and all(
                len(seq.image_hashes) for seq in group) else None
            return list(zip(group, prefill(self.model, inputs, self.reuse, keys)))
        except Exception as error:
            if len(group) > 1:
                logger.warning("a prefill of %d requests failed (%s); each alone now", len(group), error)
                return [pair for seq in group for pair in self._prefill([seq])]
            logger.exception("a prefill failed")
            group[0].fail(RequestFailed("in its prefill", error))
            return []

    def _tokens(self, seq: Sequence, n: int):
        """The first ``n`` of ``seq``'s tokens as the prefix cache knows them."""
        return prefix_tokens(seq.ids[:n], self.model.config.image_token_index, seq.image_hashes, seq.scope)

    def _reusable(self, seq: Sequence) -> bool:
        """Whether the caches can know ``seq``'s tokens: they are on, and each of its images has a key."""
        return self.reuse is not None and len(seq.image_hashes) == seq.ids.count(self.model.config.image_token_index)

    def _found_prefix(self, seq: Sequence) -> bool:
        """Whether a new request's prompt starts with a cached prefix (kept in ``seq.prefix``)."""
        if seq.generated or not self._reusable(seq):
            return False
        n, layers = self.reuse.longest_prefix(self._tokens(seq, len(seq.ids)))
        seq.prefix = (n, layers) if layers is not None else None
        return seq.prefix is not None

    def _keep_prefixes(self, rows: List[int]) -> None:
        """The answered rows' tokens and keys and values, for the next turn of their conversations."""
        for r in rows:
            seq = self._running[r]
            if seq.answered and self._reusable(seq):
                self.reuse.put_prefix(self._tokens(seq, self._batch.lengths[r]), self._batch.row(r))

    def _join(self, seq: Sequence, logits: torch.Tensor, layers, length: int) -> None:
        """Its next token, then its row into the batch (:meth:`DecodeBatch.add` changes nothing if it fails)."""
        try:
            if self._choose(seq, logits) is None:
                faults.check("join", seq.faults)
                self._batch.add(layers, length, image_keys_mask(self.model, seq.inputs.get("cross_attention_mask")))
                self._running.append(seq)
        except Exception as error:
            logger.exception("a request could not join the batch")
            seq.fail(RequestFailed("joining the running batch", error))

    @staticmethod
    def _choose(seq: Sequence, logits: torch.Tensor) -> Optional[str]:
        """``seq.choose``; a failure there (one request's own processors) ends that request only."""
        try:
            return seq.choose(logits)
        except Exception as error:
            logger.exception("choosing a token failed")
            seq.fail(error)
            return "error"

    def _requeue(self, count: int) -> None:
        """The ``count`` newest running rows go back to the front of the queue, oldest first, to be
        prefilled again with their tokens so far when there is room (their answers go on unchanged).
        The last rows leave the batch as views of the first: nothing is copied."""
        back = [i for i, seq in enumerate(self._running) if not seq.finished][-count:]
        self._batch.remove(back)
        seqs = [self._running[i] for i in back]
        self._running = [seq for i, seq in enumerate(self._running) if i not in set(back)]
        for seq in seqs:
            seq.requeued += 1
        self._requeued += len(seqs)
        self._waiting[:0] = seqs

    def _keep_within_budget(self) -> None:
        """Before a step: while the batch one token longer would break the budget's rule, its newest
        row goes back to the queue."""
        while len(self._running) > 1 and not self._fits(self._running, 1):
            self._requeue(1)

    def _step(self) -> None:
        for seq in self._running:
            if seq.cancelled and not seq.finished:
                logger.info("a request left the batch after %d of %d tokens: %s", seq.generated, seq.max_new_tokens,
                            seq.cancelled)
                seq.leave()
        self._drop_ended()
        self._keep_within_budget()
        if not any(not seq.finished for seq in self._running):
            return
        for seq in self._running:
            if not seq.finished and seq.generated >= 2:
                faults.check("decode", seq.faults)
        try:
            with faults.out_of_memory(self.model, self._running):
                logits = self._batch.step([seq.ids[-1] for seq in self._running])
        except Exception as error:
            if not (is_out_of_memory(error) and self._shed(error)):
                raise
            return
        for seq, row in zip(self._running, logits):
            if not seq.finished:  # a row that could not leave yet is stepped, and ignored
                self._choose(seq, row)
        self._drop_ended()

    def _shed(self, error: BaseException) -> bool:
        """A decode step ran out of memory: the batch goes back to where it was before the step, and
        its newest half goes back to the queue (the budget shrinks to what is left, so it is not
        refilled at once). ``False`` when that is not possible (one row: it fails, in words)."""
        active = [seq for seq in self._running if not seq.finished]
        if len(active) < 2:
            return False
        failed = (len(self._running), self._batch.width + 1, self._batch.image_width)
        self._batch.rollback()
        self._requeue(len(active) // 2)
        release_memory(self.model)
        if self.budget is not None:  # under the rule, what is left may use half of what failed
            self.budget.limit = min(self.budget.limit, self.budget.need(*failed))
        logger.warning("a decode step of %d rows ran out of memory (%s); the newest %d went back to the queue "
                       "and the memory budget is now %s bytes (--kv_cache_memory sets it)", len(active),
                       type(error).__name__, len(active) // 2, self.budget.limit if self.budget else "unlimited")
        return True

    def _drop_ended(self) -> None:
        """Rows whose requests ended leave the batch; if rebuilding the cache fails, they stay (ignored)
        and leave at the next step, and the other rows go on."""
        ended = [i for i, seq in enumerate(self._running) if seq.finished]
        if not ended:
            return
        try:
            self._keep_prefixes(ended)
        except Exception:  # a cache is never worth a request: the rows leave all the same
            logger.exception("the prefixes of %d finished rows could not be kept", len(ended))
        try:
            for i in ended:
                seq = self._running[i]
                if "leave" in seq.faults:  # once: the next step's rebuild succeeds
                    seq.faults = seq.faults - {"leave"}
                    faults.check("leave", {"leave"})
            self._batch.remove(ended)
        except Exception:
            logger.exception("%d rows could not leave the batch; they stay, ignored, until the next step", len(ended))
            return
        drop = set(ended)
        self._running = [seq for i, seq in enumerate(self._running) if i not in drop]
