"""The Transformers engine: ``MllamaForConditionalGeneration`` + ``AutoProcessor``.

The classes fill in the hooks of Xinference's ``PytorchModel`` (``load``, ``_load_model``,
``match_json``, ``chat``/``generate``, ``abort_request``, ``stop``); device selection (CUDA, MPS, CPU;
``device_map="auto"`` across GPUs) and quantization stay Xinference's own. Requests are served by
:mod:`.scheduler` (continuous batching, ``--max_num_seqs``, Xinference's default 16): ``chat`` and
``generate`` are coroutines that return a dict or an async generator, so Xinference runs them
without its per-model lock and no request ever parks one of its threads. The dtype is Xinference's choice too
(float32 on CPU, float16 on MPS), except on CUDA, where Meta's bf16 replaces Xinference's float16;
``--torch_dtype`` overrides it everywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from packaging.version import Version
from xinference.model.llm.transformers.core import PytorchChatModel, PytorchModel

from ...catalog import serves
from ...compat.transformers_mllama import meta_mllama
from ...errors import RequestError, RequestFailed
from ...generation import Detokenizer, Sampling, StopText, TokenBytes
from ...images import ImageLimits, decode_image, load_images, read_images
from ...memory import Architecture, image_tokens
from ...parsing import byte_size
from ...quantization import FORMATS, ON_LOAD, bnb_options, method_of, refusal
from ...request import CheckedRequest, chat_request, completion_request, launch_int, launch_policy
from ...request.grammar import Grammars
from ...request.messages import Prompt
from ...request.wire import request_scope
from ...schema import TRANSFORMERS_VERSIONS
from ..common import (answer_or_refusal, check_memory, checkpoint_sampling, context_length, launched, memory_check_wanted,
                      output_room)
from . import faults
from .admission import Budget, default_limit
from .reuse import KnownPictures, ReuseCache, picture, processed
from .penalties import OpenAIPenalties
from .responses import Choice, Chunks, Entry, chat_completion, completion
from .scheduler import Logprob, Scheduler, Sequence, logger


def default_dtype(launch_value: Optional[str], device: str) -> Optional[str]:
    """The ``torch_dtype`` a launch loads with: the launch option, else bf16 on CUDA (the dtype Meta
    released the weights in; Xinference's CUDA default is float16), else Xinference's default (``None``).

    >>> default_dtype(None, "cuda"), default_dtype("float16", "cuda"), default_dtype(None, "cpu")
    ('bfloat16', 'float16', None)
    """
    if launch_value is not None:
        return launch_value
    return "bfloat16" if device == "cuda" else None


#: The sequence length the launch-time memory check plans for when the launch sets neither
#: ``--context_length`` nor ``--kv_cache_memory`` (after loading, the context is what the budget holds).
MEMORY_CHECK_CONTEXT = 8192
#: The launch option that sets the batch cache's memory budget (:mod:`.admission`).
KV_CACHE_MEMORY = "kv_cache_memory"
#: The launch option that sets the image cache's memory (:mod:`.reuse`; ``0``: no image cache).
IMAGE_CACHE_MEMORY = "image_cache_memory"
#: The image cache's share of the memory left after the weights, when the launch does not set it.
IMAGE_CACHE_SHARE = 8
#: The shortest context a launch may be left with (shorter: the launch fails, saying why).
MIN_CONTEXT = 256


class _Mllama:
    """What both families share: loading, inputs, and handing requests to the scheduler."""

    kind = ""
    #: No actor lock: the scheduler serves concurrent requests (``PytorchModel`` says so too).
    allow_batch = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Launch options are checked here, so a bad one fails the launch with its message.
        config = self._pytorch_model_config
        context = context_length("context_length", config.get("context_length"), self.model_path, self.model_family)
        self._context_given = config.get("context_length") is not None
        self._cache_memory = None
        if config.get(KV_CACHE_MEMORY) is not None:
            self._cache_memory = byte_size(config.pop(KV_CACHE_MEMORY), f"launch option {KV_CACHE_MEMORY}")
        self._image_cache_memory = None
        if config.get(IMAGE_CACHE_MEMORY) is not None:
            value = config.pop(IMAGE_CACHE_MEMORY)
            self._image_cache_memory = 0 if str(value).strip() in ("0", "off") else \
                byte_size(value, f"launch option {IMAGE_CACHE_MEMORY}")
        self._images: Optional[ReuseCache] = None
        self._known: Optional[KnownPictures] = None  # pictures by the bytes sent (made at load: it has a lock)
        self._policy = launch_policy(self.kind, config, context)
        self._max_num_seqs = launch_int("max_num_seqs", config.get("max_num_seqs"))
        self._check_memory = memory_check_wanted(config)
        self._limits = ImageLimits.from_config(config)  # the operator's image settings: here only, never published
        self.model_family = launched(self.model_family, self._policy)
        self._scheduler: Optional[Scheduler] = None
        self._grammars: Optional[Grammars] = None
        self._token_bytes: Optional[TokenBytes] = None
        self._default_top_k = checkpoint_sampling(self.model_path).get("top_k", 0)
        self._requests: Dict[str, List[Sequence]] = {}  # request id → its rows, for abort_request

    @classmethod
    def check_lib(cls):
        try:
            import transformers
        except ImportError:
            return False, f"transformers{TRANSFORMERS_VERSIONS} is not installed"
        if Version(transformers.__version__) not in TRANSFORMERS_VERSIONS:
            return False, (f"Llama 3.2 Vision on the Transformers engine needs transformers{TRANSFORMERS_VERSIONS}, "
                           f"not {transformers.__version__}: pip install 'transformers{TRANSFORMERS_VERSIONS}'")
        return True

    @classmethod
    def match_json(cls, llm_family, llm_spec, quantization):
        ok, reason = serves(llm_family, cls.kind)
        if not ok:
            return False, reason
        reason = refusal("transformers", llm_spec.model_format, quantization or "none")
        return (False, reason) if reason else True

    def _should_use_batching(self) -> bool:
        return False  # Xinference's BatchScheduler: see .batch for why Mllama has its own

    def stop(self):
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = self._batch_scheduler = None
        super().stop()

    def load(self):
        from xinference.model.utils import select_device

        config = self._pytorch_model_config
        device = select_device(config.get("device", "auto"))
        dtype = default_dtype(config.get("torch_dtype"), device)
        if dtype is not None:
            config["torch_dtype"] = dtype
        dtype_bytes = 4 if str(dtype).endswith("float32") else 2
        if self._check_memory and device == "cuda":
            # The weights, the activations and one row alone: what admission needs to serve anything
            # (the same arithmetic, memory.py). Without a launch setting, a row of 8,192 tokens.
            fmt = self.model_spec.model_format
            check_memory(self.model_path, method_of(fmt, self.quantization),
                         [method_of(fmt, q) for q in FORMATS[fmt]],
                         self._planned_context(dtype_bytes), images=self._policy.max_images,
                         dtype_bytes=dtype_bytes, context_option="--context_length")
        super().load()
        self._budget = self._cache_budget()
        if self._image_cache_memory:
            self._images = ReuseCache(self._image_cache_memory)
            self._known = KnownPictures()
        # Set, ``_batch_scheduler`` tells Xinference that this model batches: it then hands each
        # request's id to chat/generate (``generate_config["request_id"]``) and calls
        # abort_request with it when a client hangs up (or ``POST …/requests/{id}/abort``).
        self._scheduler = self._batch_scheduler = Scheduler(self._model, self._max_num_seqs, self._budget, self._images)

    def _planned_context(self, dtype_bytes: int) -> int:
        """The row the launch check plans for: the context, or what ``--kv_cache_memory`` holds."""
        if self._cache_memory is not None:
            arch = Architecture.from_checkpoint(self.model_path)
            budget = Budget.of(arch, dtype_bytes, self._cache_memory)
            return min(self._policy.context_length, budget.context(image_tokens(arch, self._policy.max_images)))
        return self._policy.context_length if self._context_given else \
            min(self._policy.context_length, MEMORY_CHECK_CONTEXT)

    def _cache_budget(self) -> Budget:
        """The batch cache's budget, and the context it holds: a row alone must fit it with the most
        images a prompt may have. A ``--context_length`` it cannot hold fails the launch, saying what
        would; the checkpoint's context (no option) shrinks to what it holds, in the log."""
        arch = Architecture.from_config(self._model.config.to_dict())
        limit = self._cache_memory
        if limit is None:
            limit = default_limit(self._model, arch, self._policy.max_images, self._max_num_seqs)
            if self._image_cache_memory is None:  # the image cache's share of what is left
                self._image_cache_memory = max(limit, 0) // IMAGE_CACHE_SHARE
                limit -= self._image_cache_memory
        elif self._image_cache_memory is None:
            self._image_cache_memory = limit // IMAGE_CACHE_SHARE
        budget = Budget.of(arch, self._model.dtype.itemsize, max(limit, 0))
        images = image_tokens(arch, self._policy.max_images)
        holds = budget.context(images)
        where = f"--{KV_CACHE_MEMORY} {limit}" if self._cache_memory is not None else "the memory left after the weights"
        if holds < self._policy.context_length:
            if self._context_given or holds < MIN_CONTEXT:
                raise ValueError(
                    f"one request of {self._policy.context_length} tokens with {self._policy.max_images} image(s) "
                    f"needs {budget.need(1, self._policy.context_length, images)} bytes of cache, and the cache "
                    f"budget ({where}) is {budget.limit} bytes: launch with --context_length {holds} or less"
                    f"{'' if holds >= MIN_CONTEXT else ' (too short to serve)'}, fewer --max_images, or a larger "
                    f"--{KV_CACHE_MEMORY}")
            logger.warning("the cache budget (%s, %d bytes) holds one request of %d tokens with %d image(s): the "
                           "context is %d tokens, not the checkpoint's %d (--context_length, --%s)", where,
                           budget.limit, holds, self._policy.max_images, holds, self._policy.context_length,
                           KV_CACHE_MEMORY)
            self._policy = dataclasses.replace(self._policy, context_length=holds)
        logger.info("batch cache budget: %d bytes (%s); context %d tokens; image cache: %d bytes", budget.limit,
                    where, self._policy.context_length, self._image_cache_memory or 0)
        return budget

    async def abort_request(self, request_id: str) -> str:
        """Xinference's abort: the request's rows leave the batch at the next step."""
        from xinference.model.scheduler.core import AbortRequestMessage

        seqs = [seq for seq in self._requests.pop(str(request_id), []) if seq.active]
        for seq in seqs:
            seq.cancel("the request was aborted")
        return (AbortRequestMessage.DONE if seqs else AbortRequestMessage.NOT_FOUND).name

    def apply_quantization_config(self, kwargs=None):
        """``--quantization 8-bit`` / ``4-bit`` of pytorch weights: bitsandbytes on load, with the
        plugin's recipe (:mod:`...quantization`); ``--quantization_config`` changes single settings.
        Pre-quantized (bnb) checkpoints bring their own configuration."""
        kwargs = kwargs if kwargs is not None else {}
        if self.model_spec.model_format == "bnb" or self.quantization in ON_LOAD:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError(f"quantization {self.quantization} needs bitsandbytes in the worker's environment: "
                                 "pip install 'bitsandbytes>=0.46' (or 'xinf-llama-vision[quantization]')")
        if self.model_spec.model_format != "pytorch" or self.quantization not in ON_LOAD:
            return super().apply_quantization_config(kwargs)
        from transformers import BitsAndBytesConfig

        overrides = self._pytorch_model_config.get("quantization_config") or {}
        options = bnb_options(self.quantization, kwargs.get("torch_dtype"), overrides)
        kwargs["quantization_config"] = BitsAndBytesConfig(**options)
        return kwargs

    def _load_model(self, **kwargs):
        import transformers
        from transformers import AutoProcessor, MllamaForConditionalGeneration

        kwargs.pop("trust_remote_code", None)  # Mllama is built into transformers
        if "torch_dtype" in kwargs and Version(transformers.__version__) >= Version("4.56"):
            kwargs["dtype"] = kwargs.pop("torch_dtype")  # the name since 4.56 (torch_dtype deprecated)
        self._processor = AutoProcessor.from_pretrained(self.model_path, revision=kwargs.get("revision"))
        model = MllamaForConditionalGeneration.from_pretrained(self.model_path, low_cpu_mem_usage=True, **kwargs)
        meta_mllama(model)  # Meta's architecture where this transformers computes otherwise (docs/fidelity.md)
        tokenizer = self._processor.tokenizer
        self._stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in self.model_family.stop or []]
        return model.eval(), tokenizer

    # -- one request ------------------------------------------------------------------
    def _inputs(self, prompt: Prompt, scope: str = ""):
        """Load the images and run the processor (in a worker thread: image decoding is slow); with
        the image cache on, each image's key in it too (``scope``: whose request it is), and a picture
        sent before is taken as the processor made it then (:class:`.reuse.KnownPictures`)."""
        injected = faults.requested(prompt.text)
        if self._known is not None:
            return self._known_inputs(prompt, scope, injected)
        try:
            faults.check("images", injected)
            images = load_images(prompt.images, self._limits, prompt.where)
        except RequestError:
            raise  # the client's to fix: a 400 that says how
        except Exception as error:
            logger.exception("loading a request's images failed")
            raise RequestFailed("while loading its images", error) from error
        try:
            faults.check("processor", injected)
            # Off the device until its prefill: a queued request holds no device memory.
            return self._processor(images=images or None, text=prompt.text, add_special_tokens=False,
                                   return_tensors="pt"), []
        except Exception as error:
            logger.exception("the image processor failed on a request")
            raise RequestFailed("in the image processor", error) from error

    def _known_inputs(self, prompt: Prompt, scope: str, injected):
        """:meth:`_inputs` with the image cache on: an image is decoded and processed only when its
        bytes are not known."""
        stage, log = "while loading its images", "loading a request's images failed"
        try:
            faults.check("images", injected)
            sources, where = prompt.images, prompt.where
            datas = read_images(sources, self._limits, where)
            found = [self._known.find(scope, data) for data in datas]
            images = {k: decode_image(datas[k], sources[k], self._limits, where[k] if k < len(where) else "")
                      for k, (_, known) in enumerate(found) if known is None}
            stage, log = "in the image processor", "the image processor failed on a request"
            faults.check("processor", injected)
            pictures = [known or self._known.keep(digest, picture(self._processor, images[k], scope))
                        for k, (digest, known) in enumerate(found)]
            inputs = processed(self._processor, prompt.text, pictures)  # off the device until its prefill
            return inputs, [p.key for p in pictures]
        except RequestError:
            raise  # the client's to fix: a 400 that says how
        except Exception as error:
            logger.exception(log)
            raise RequestFailed(stage, error) from error

    def _generate_kwargs(self, sampling: Sampling, prompt_tokens: int) -> Dict[str, Any]:
        """What ``model.generate`` would be called with for this request (one choice, no grammar)."""
        kwargs: Dict[str, Any] = {
            "max_new_tokens": output_room(prompt_tokens, sampling.max_tokens, self._policy.context_length),
            "eos_token_id": list(dict.fromkeys(self._stop_ids + list(sampling.stop_token_ids))),
            "pad_token_id": self._tokenizer.pad_token_id,
        }
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        elif sampling.temperature is not None:
            kwargs.update(do_sample=True, temperature=sampling.temperature)
        if not sampling.greedy:
            if sampling.top_p is not None:
                kwargs["top_p"] = sampling.top_p
            # Unset: the checkpoint's top_k, else none (transformers 4.x would add its own 50).
            kwargs["top_k"] = sampling.top_k if sampling.top_k is not None else self._default_top_k
        if sampling.repetition_penalty is not None:
            kwargs["repetition_penalty"] = sampling.repetition_penalty
        if sampling.presence_penalty or sampling.frequency_penalty:
            kwargs["logits_processor"] = [
                OpenAIPenalties(prompt_tokens, sampling.presence_penalty, sampling.frequency_penalty)
            ]
        return kwargs

    def _grammar(self, response_format: Dict[str, Any]):
        """A logits processor for one choice's ``response_format`` (compiled in a worker thread)."""
        if self._grammars is None:
            self._grammars = Grammars(self._tokenizer, self._model.config.text_config.vocab_size, self._stop_ids)
        return self._grammars.processor(response_format)

    async def _submit(self, request: CheckedRequest, config: Dict[str, Any]) -> Tuple[Sampling, int, List[Sequence]]:
        """Load the images, and hand the request's choices to the scheduler (one sequence each)."""
        sampling = request.sampling
        scope = request_scope(config)
        inputs, hashes = await asyncio.to_thread(self._inputs, request.prompt, scope)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        kwargs = self._generate_kwargs(sampling, prompt_tokens)
        loop = asyncio.get_running_loop()
        seqs = []
        for i in range(sampling.n):
            grammar = None
            if sampling.response_format:
                grammar = await asyncio.to_thread(self._grammar, sampling.response_format)
            seed = None if sampling.seed is None else sampling.seed + i
            seqs.append(Sequence.create(self._model, inputs, kwargs, loop, seed=seed, top_logprobs=sampling.logprobs,
                                        constraint=grammar, injected=faults.requested(request.prompt.text),
                                        image_hashes=hashes, scope=scope))
        # Rows that ended are forgotten here, so an id no abort came for does not stay.
        self._requests = {key: rows for key, rows in self._requests.items() if any(seq.active for seq in rows)}
        if config.get("request_id") is not None:
            self._requests.setdefault(str(config["request_id"]), []).extend(seqs)
        for seq in seqs:
            self._scheduler.submit(seq)
        return sampling, prompt_tokens, seqs

    def _entry(self, token: int, logprob: Logprob) -> Entry:
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self._tokenizer)

        def piece(i: int):
            return self._tokenizer.decode([i]), self._token_bytes(i)

        return piece(token), logprob[0], [(piece(alt), value) for alt, value in logprob[1]]

    async def _text(self, seq: Sequence, sampling: Sampling):
        """One choice's text as it comes: ``(new_text, tokens_so_far, finish_reason, logprob entries)``."""
        detok = Detokenizer(
            lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )
        stop = StopText(list(sampling.stop))
        tokens, n = seq.events(), 0
        try:
            async for events in tokens:
                text, finish = "", None
                entries = None if seq.top_logprobs is None else []
                for token, finish, logprob in events:
                    n += 1
                    if entries is not None:
                        entries.append(self._entry(token, logprob))
                    if token in seq.stop_ids:  # generated (and counted), never shown
                        piece = detok.flush()
                    else:
                        piece = detok.add(token) + (detok.flush() if finish else "")
                    text += stop.feed(piece)
                    if stop.stopped:
                        seq.cancel("a stop string matched")
                        yield text, n, "stop", entries
                        return
                if finish:
                    text += stop.flush()
                yield text, n, finish, entries
        finally:
            await tokens.aclose()  # leaves the batch if the answer ended early (stop string, hang-up)

    async def _complete(self, request: CheckedRequest, config: Dict[str, Any], chat: bool):
        """The answer: a (chat) completion dict, or an async iterator of its chunks when streaming."""
        sampling, prompt_tokens, seqs = await self._submit(request, config)
        events = interleave([self._text(seq, sampling) for seq in seqs])
        if sampling.stream:
            return self._stream(Chunks(self.model_uid, chat, prompt_tokens), sampling, events)
        choices = [Choice(entries=None if sampling.logprobs is None else []) for _ in seqs]
        async for index, (piece, n, finish, entries) in events:
            choice = choices[index]
            choice.text, choice.tokens, choice.finish = choice.text + piece, n, finish or choice.finish
            if entries:
                choice.entries.extend(entries)
        build = chat_completion if chat else completion
        return build(self.model_uid, choices, prompt_tokens)

    async def _stream(self, chunks: Chunks, sampling: Sampling, events) -> AsyncIterator:
        counts: Dict[int, int] = {}
        try:
            # Accepted (checked, queued): each choice's first chunk now, with no text (a chat's carries
            # the role, as OpenAI's first chunk does), so a queued stream starts at once (docs/reliability.md).
            for index in range(sampling.n):
                yield chunks.piece(index, "", None, None, 0)
            async for index, (piece, n, finish, entries) in events:
                counts[index] = n
                total = sum(counts.values())
                if piece or entries:
                    yield chunks.piece(index, piece, None, entries, total)
                if finish:
                    # The finishing chunk carries "" (OpenAI completion chunks always have a text).
                    yield chunks.piece(index, "", finish, None, total)
            if sampling.include_usage:
                yield chunks.usage(sum(counts.values()))
        except RequestFailed as error:  # after the first chunk: OpenAI's error event, then the end
            yield {"error": {"message": str(error), "type": "server_error", "param": None, "code": 500}}
        finally:
            await events.aclose()

    async def generate(self, prompt: str, generate_config: Optional[Dict] = None, **kwargs):
        """Raw completion (both families); images ride in the request's ``images`` list."""
        config = dict(generate_config or {})
        return await answer_or_refusal(self._generate(prompt, config), bool(config.get("stream")))

    async def _generate(self, prompt: str, config: Dict[str, Any]):
        return await self._complete(completion_request(prompt, config, self._policy), config, chat=False)


async def interleave(streams: List[AsyncIterator]) -> AsyncIterator[Tuple[int, Any]]:
    """``(index, item)`` from several async iterators as their items come; leaving early (or one
    failing) closes them all."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: "asyncio.Queue[Tuple[int, Any, Optional[BaseException], bool]]" = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None, False))
        except Exception as error:
            await queue.put((index, None, error, True))
        else:
            await queue.put((index, None, None, True))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            index, item, error, done = await queue.get()
            if error is not None:
                raise error
            if done:
                left -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


class MllamaChatModel(_Mllama, PytorchChatModel):
    """``llama-3.2-vision-instruct``: chat with images through the official template."""

    kind = "instruct"

    async def chat(self, messages: List[Dict], generate_config: Optional[Dict] = None, **kwargs):
        config = dict(generate_config or {})
        return await answer_or_refusal(self._chat(messages, config), bool(config.get("stream")))

    async def _chat(self, messages: List[Dict], config: Dict[str, Any]):
        request = chat_request(messages, config, self._policy)
        if request.tools:  # never streamed, one choice (both refused up front): parse the answer for a tool call
            result = await self._complete(request, config, chat=False)
            return self._post_process_completion(self.model_family, self.model_uid, result, request.tools)
        return await self._complete(request, config, chat=True)


class MllamaGenerateModel(_Mllama, PytorchModel):
    """``llama-3.2-vision``: raw completion, ``<|image|>`` in the prompt where each image goes."""

    kind = "base"
