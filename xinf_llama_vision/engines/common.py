"""What every engine shares beyond :mod:`..validation`: publishing the launch policy."""

from __future__ import annotations

from xinference.model.llm.llm_family import LLMFamilyV2

from ..validation import POLICY_KEY, Policy


class LaunchedFamily(LLMFamilyV2):
    """One launched model's family: its Xinference description also carries the plugin's policy,
    which the API process reads to check requests before they reach the model."""

    def to_description(self):
        description = super().to_description()
        description[POLICY_KEY] = getattr(self, POLICY_KEY, None)
        return description


def launched(family: LLMFamilyV2, policy: Policy) -> LaunchedFamily:
    return LaunchedFamily.parse_obj({**family.dict(), POLICY_KEY: policy.to_dict()})
