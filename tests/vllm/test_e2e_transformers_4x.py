"""The Transformers engine on transformers 4.x: parity tests as on 5.x.

The package declares ``transformers>=4.45``; the main run has 5.x, and this stage's environment
(set up for vLLM) has 4.53, so the Transformers engine's own code paths for 4.x (``torch_dtype``
rather than ``dtype``, ``rope_theta`` configs) run here, against raw transformers 4.53.
"""

from __future__ import annotations

# A subset of the shared parity tests (the full set runs on 5.x in the main run): loading, chat with
# and without images, streaming, and the base model's image completion. ``chat_uid`` and ``base_uid``
# are conftest's: both families launched on the Transformers engine.
from parity import (  # noqa: F401 - collected here
    test_base_completion_with_image,
    test_chat_matches_raw_transformers,
    test_streaming_equals_non_streaming,
)


def test_this_environment_has_transformers_4():
    import transformers

    assert transformers.__version__.startswith("4."), transformers.__version__

