"""Which image tiles each token sees, and how one request's tiles are laid out for vLLM.

Pure functions over token ids and tile counts (no vLLM, no torch), shared by the processor and
the model.

**Mllama's rule** (transformers' ``get_cross_attention_token_mask``): the text from an
``<|image|>`` token up to the next one sees that image; consecutive ``<|image|>`` tokens form
one group whose images are all seen until the next group; text before the first image sees no
image (its cross-attention row is "masked out"); generated tokens see what the prompt's last
token sees, i.e. the last group.

**The encoder sequence of a request** is every image's tiles, laid out so that vLLM's
cross-attention KV cache (which attends without a mask) holds exactly what generated tokens
see: first the real tiles of the last group, then the other images' real tiles, then every
padding tile (each image is padded to ``max_num_tiles``). Only the first part is cached; the
prompt's own rows are computed with a per-token mask over all of it, as transformers does.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple


def tokens_per_tile(vision_config) -> int:
    """Encoder positions per tile: the tile's patches and its class token.

    >>> from types import SimpleNamespace
    >>> tokens_per_tile(SimpleNamespace(image_size=560, patch_size=14))
    1601
    """
    return (vision_config.image_size // vision_config.patch_size) ** 2 + 1


def image_groups(token_ids: Sequence[int], image_token_id: int) -> List[Tuple[List[int], int, int]]:
    """``(images, start, end)`` per group of consecutive ``<|image|>`` tokens: the group's image
    indices and the token span ``[start, end)`` that sees them.

    >>> image_groups([1, 9, 2, 3, 9, 9, 4], image_token_id=9)
    [([0], 1, 4), ([1, 2], 4, 7)]
    >>> image_groups([1, 2], image_token_id=9)
    []
    """
    locations = [i for i, t in enumerate(token_ids) if t == image_token_id]
    groups: List[Tuple[List[int], int, int]] = []
    for n, loc in enumerate(locations):
        if groups and locations[n - 1] == loc - 1:
            groups[-1][0].append(n)
        else:
            groups.append(([n], loc, len(token_ids)))
    return [(images, start, groups[k + 1][1] if k + 1 < len(groups) else end)
            for k, (images, start, end) in enumerate(groups)]


def decode_images(token_ids: Sequence[int], image_token_id: int) -> List[int]:
    """The images that generated tokens see: the last group's (none without images).

    >>> decode_images([1, 9, 2, 9, 3], 9)
    [1]
    >>> decode_images([1, 9, 9, 2], 9)
    [0, 1]
    """
    groups = image_groups(token_ids, image_token_id)
    return groups[-1][0] if groups else []


def order(num_tiles: Sequence[int], decoded: Sequence[int], max_tiles: int) -> List[Tuple[int, int]]:
    """``(image, tile)`` of each tile of the encoder sequence, in order: the last group's real tiles
    first (vLLM caches those), then the other images' real tiles, then the padding tiles.

    >>> order([2, 1], decoded=[1], max_tiles=2)
    [(1, 0), (0, 0), (0, 1), (1, 1)]
    """
    real = [(i, t) for i in list(decoded) + [i for i in range(len(num_tiles)) if i not in decoded]
            for t in range(num_tiles[i])]
    padding = [(i, t) for i in range(len(num_tiles)) for t in range(num_tiles[i], max_tiles)]
    return real + padding


def rows(num_tiles: Sequence[int], decoded: Sequence[int], per_tile: int) -> List[List[int]]:
    """Row indices of each image's real tiles in the encoder sequence laid out by :func:`order`
    (``per_tile`` rows a tile; no row lists the padding tiles, which only text before the first
    image sees).

    >>> rows([2, 1], decoded=[1], per_tile=3)
    [[3, 4, 5, 6, 7, 8], [0, 1, 2]]
    """
    out: List[List[int]] = [[] for _ in num_tiles]
    for k, (image, _) in enumerate(order(num_tiles, decoded, max_tiles=0)):
        out[image].extend(range(k * per_tile, (k + 1) * per_tile))
    return out


def cached_length(num_tiles: Sequence[int], decoded: Sequence[int], per_tile: int) -> int:
    """Encoder positions vLLM caches for the request: the last group's real tiles.

    >>> cached_length([2, 1], [1], per_tile=3)
    3
    """
    return sum(num_tiles[i] for i in decoded) * per_tile
