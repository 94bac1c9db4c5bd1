"""OpenAI's presence and frequency penalties as a transformers logits processor.

OpenAI's definition: ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``,
``count[j]`` being how often token ``j`` was generated so far (the prompt does not count).
transformers has no such processor (its ``repetition_penalty`` is multiplicative and counts the
prompt); this one works in ``generate`` and in the scheduler alike, since both hand processors
the prompt followed by the generated ids.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class OpenAIPenalties(LogitsProcessor):
    """Subtract OpenAI's presence and frequency penalties from the scores.

    >>> p = OpenAIPenalties(prompt_length=2, presence=0.5, frequency=1.0)
    >>> p(torch.tensor([[3, 3, 1, 1, 2]]), torch.zeros(1, 4)).tolist()
    [[0.0, -2.5, -1.5, 0.0]]
    """

    def __init__(self, prompt_length: int, presence: float, frequency: float):
        self.prompt_length = prompt_length
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence
