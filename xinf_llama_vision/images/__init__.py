"""Images: sources → checked bytes → decoded RGB pictures, under the operator's limits.

One module a job: :mod:`.limits` (the settings and their knobs), :mod:`.naming` (how a source is
named in messages), :mod:`.sources` (``data:`` URIs, local files), :mod:`.addresses` (which hosts
may be fetched from), :mod:`.fetch` (the network, urllib3), :mod:`.decode` (Pillow) and
:mod:`.load`, the loader every engine calls; :mod:`.layout` (pure): which tiles each token sees, by
Meta's rule, and how our vLLM model lays out a request's tiles.
"""

from .limits import ImageLimits
from .load import decode_image, load_image, load_images, read_images

__all__ = ["ImageLimits", "decode_image", "load_image", "load_images", "read_images"]
