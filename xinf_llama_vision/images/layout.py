"""Which image tiles each token sees, and how one request's tiles are laid out for vLLM.

Pure functions over token ids and tile counts (no vLLM, no torch), shared by the processor and
the model.

**Meta's rule** (llama-models' ``create_vision_mask``; transformers' ``get_cross_attention_token_mask``):
image ``k`` is seen from its own ``<|image|>`` token up to the next image's token; in a run of
adjacent ``<|image|>`` tokens each image is seen as far as the run's last one (so the run's first
token sees only its own image); text before the first image sees no image (it gets nothing from a
cross-attention layer); generated tokens see what the prompt's last token sees: the last run.

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


def image_spans(token_ids: Sequence[int], image_token_id: int) -> List[Tuple[int, int]]:
    """``[start, end)`` of the tokens that see each image, in image order.

    >>> image_spans([1, 9, 2, 3, 9, 9, 4], image_token_id=9)  # the run's first token sees only its image
    [(1, 4), (4, 7), (5, 7)]
    >>> image_spans([1, 2], image_token_id=9)
    []
    """
    locations = [i for i, t in enumerate(token_ids) if t == image_token_id]
    ends = locations[1:] + [len(token_ids)]
    for k in range(len(locations) - 2, -1, -1):
        if ends[k] == locations[k] + 1:  # the next token is an image too: seen as far as it is
            ends[k] = ends[k + 1]
    return list(zip(locations, ends))


def decode_images(token_ids: Sequence[int], image_token_id: int) -> List[int]:
    """The images that generated tokens see: those seen by the prompt's last token (none without images).

    >>> decode_images([1, 9, 2, 9, 3], 9)
    [1]
    >>> decode_images([1, 9, 9, 2], 9)
    [0, 1]
    """
    return [k for k, (_, end) in enumerate(image_spans(token_ids, image_token_id)) if end == len(token_ids)]


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
