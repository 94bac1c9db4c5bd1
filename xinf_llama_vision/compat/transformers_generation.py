"""transformers' ``generate`` internals the continuous-batching scheduler builds each request's sampling
from: ``_prepare_generation_config`` and ``_get_logits_processor`` of ``GenerationMixin``.

For: transformers >= 4.45 (4.x) and 5.x, measured on 4.53.2 and 5.17.0 (the keyword arguments below
are the ones both accept). The scheduler steps many requests at once, so it cannot call
``generate``; it asks these two for exactly the logits processors ``generate`` would use, so a
request sampled in a batch gets the same processors, in the same order, as one served alone.
Private to transformers: ``tests/test_compat.py`` fails when their signatures change.
"""

from __future__ import annotations

from typing import Any, Dict

import torch


def sampler(model, generate_kwargs: Dict[str, Any], prompt_ids: torch.Tensor):
    """``(logits processors, do_sample)`` exactly as ``model.generate(**generate_kwargs)`` would
    build them for this prompt (the checkpoint's ``generation_config`` filling what is unset; the
    request's own processors, ``logits_processor``, where ``generate`` puts them)."""
    from transformers import LogitsProcessorList

    options = {k: v for k, v in generate_kwargs.items() if k != "logits_processor"}
    config, _ = model._prepare_generation_config(None, **options)
    processors = model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=prompt_ids.shape[-1],
        encoder_input_ids=prompt_ids,
        prefix_allowed_tokens_fn=None,
        logits_processor=LogitsProcessorList(generate_kwargs.get("logits_processor") or []),
        device=str(prompt_ids.device),
        model_kwargs={},
    )
    return processors, bool(config.do_sample)
