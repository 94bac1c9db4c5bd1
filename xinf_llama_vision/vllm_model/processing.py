"""Mllama's inputs for vLLM V1: a request's images become one encoder input.

V1 runs an encoder-decoder model with one encoder input per request, placed at the start of the
encoder sequence (the scheduler assumes it: a second item would sit at an offset the decoder
never reaches). So all images of a request travel as **one item**, ``ImageGroup``: the image
processor tiles them together (``pixel_values`` of shape ``(images, max_num_tiles, 3, H, W)``),
and the item's encoder length is what vLLM's cross-attention cache must hold: the real tiles
of the prompt's last image group (:mod:`.layout`). The number of images is still limited per
request, by ``--limit-mm-per-prompt`` (counted in images) and checked here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseProcessingInfo, EncDecMultiModalProcessor,
                                        PromptReplacement)
from vllm.multimodal.processing.inputs import ProcessorInputs

from ..images import layout

#: The hf-processor keyword that carries the prompt's last image group to the item (and its hash).
DECODED = "xlv_decode_images"
#: The fields of one item (a request's images), as the model's ``embed_multimodal`` receives them.
FIELDS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "num_tiles", "decode_mask")


class ImageGroup(ImageProcessorItems):
    """All images of one request as a single item (its one encoder input)."""

    def __init__(self, images: Sequence[Any]) -> None:
        super().__init__([list(images)] if images else [])

    @property
    def images(self) -> list:
        return self.data[0] if self.data else []

    def get(self, index: int):
        return [self._unwrap(image) for image in self.data[index]]

    def get_image_size(self, item_idx: int):  # the largest image: dummy-input sizing only
        from vllm.multimodal.parse import ImageSize

        sizes = [(im.width, im.height) for im in self.get(item_idx)]
        w, h = max(sizes, key=lambda s: s[0] * s[1])
        return ImageSize(w, h)


class GroupParser(MultiModalDataParser):
    def _parse_image_data(self, data):
        parsed = super()._parse_image_data(data)
        if parsed is None:
            return None
        if not isinstance(parsed, ImageProcessorItems):
            raise ValueError("Llama 3.2 Vision on vLLM takes images (PIL images, or image URLs through the API), "
                             "not precomputed image embeddings")
        return ImageGroup(parsed.data)


class MllamaProcessingInfo(BaseProcessingInfo):
    def get_data_parser(self):
        return GroupParser(expected_hidden_size=self._get_expected_hidden_size())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def image_processor(self):
        return self.get_hf_processor().image_processor

    def tokens_per_tile(self) -> int:
        return layout.tokens_per_tile(self.get_hf_config().vision_config)

    def max_tiles(self) -> int:
        return self.get_hf_config().vision_config.max_num_tiles

    def image_token_id(self) -> int:
        return self.get_hf_config().image_token_index

    def max_images(self) -> int:
        """``--limit-mm-per-prompt``'s image count; 1 where it is not set (Meta's recommendation, and
        vLLM's default of 999 images would size every request's encoder budget for 999)."""
        limit = self.ctx.get_mm_config().limit_per_prompt.get("image")
        return 1 if limit is None else max(1, int(limit.count))

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.max_images() * self.max_tiles() * self.tokens_per_tile()}

    def parse_mm_data(self, mm_data, *, validate: bool = True) -> MultiModalDataItems:
        items = super().parse_mm_data(mm_data, validate=validate)
        group = items.get("image")
        if validate and isinstance(group, ImageGroup) and len(group.images) > self.max_images():
            from vllm.exceptions import VLLMValidationError

            raise VLLMValidationError(
                f"At most {self.max_images()} image(s) may be provided in one prompt; this one has "
                f"{len(group.images)}. Set `--limit-mm-per-prompt` to increase this limit.", parameter="image")
        return items


class MllamaDummyInputsBuilder(BaseDummyInputsBuilder[MllamaProcessingInfo]):
    # One item holds every image of a request: profiling's item is the largest request.
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "<|image|>" * self.info.max_images() if mm_counts.get("image", 0) else ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        if not mm_counts.get("image", 0):
            return {}
        size = self.info.image_processor().size
        side = max(size["height"], size["width"]) * 2  # a 2x2 canvas: max_num_tiles (4) tiles
        return {"image": self._get_dummy_images(width=side, height=side, num_images=self.info.max_images())}


class MllamaMultiModalProcessor(EncDecMultiModalProcessor[MllamaProcessingInfo]):
    #: The decoder prompt is the chat prompt as given (it starts with <|begin_of_text|>).
    skip_decoder_start_token = True

    def apply(self, inputs: ProcessorInputs, timing_ctx):
        group = inputs.mm_data_items.get("image")
        if isinstance(group, ImageGroup) and group.images:
            image_token = self.info.image_token_id()
            found = sum(1 for t in inputs.prompt if t == image_token)
            if found != len(group.images):
                raise ValueError(
                    f"The prompt has {found} <|image|> token(s) but {len(group.images)} image(s) were given: put "
                    f"one <|image|> where each image belongs (the chat template does this for image content parts).")
            decoded = layout.decode_images(inputs.prompt, image_token)
            inputs = ProcessorInputs(inputs.prompt, inputs.mm_data_items, inputs.mm_uuid_items,
                                     hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, DECODED: tuple(decoded)},
                                     media_io_kwargs=inputs.media_io_kwargs, cache=inputs.cache)
        return super().apply(inputs, timing_ctx)

    def create_encoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        # One placeholder token per request with images, expanded below to the cached length.
        return [self.info.image_token_id()] if mm_items.get_count("image", strict=False) else []

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        (images,) = hf_data["images"]
        out = self.info.image_processor()(images=[images], return_tensors="pt")
        decoded = hf_kwargs.get(DECODED, tuple(range(len(images))))
        mask = torch.zeros(1, len(images), dtype=torch.long)
        mask[0, list(decoded)] = 1
        return BatchFeature(dict(pixel_values=out["pixel_values"], aspect_ratio_ids=out["aspect_ratio_ids"],
                                 aspect_ratio_mask=out["aspect_ratio_mask"],
                                 num_tiles=torch.tensor(out["num_tiles"], dtype=torch.long), decode_mask=mask))

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return {name: MultiModalFieldConfig.batched("image") for name in FIELDS}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        image_token = self.info.image_token_id()
        per_tile = self.info.tokens_per_tile()

        def cached(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            tiles = item["num_tiles"].data.tolist()
            decoded = [i for i, on in enumerate(item["decode_mask"].data.tolist()) if on]
            return [image_token] * layout.cached_length(tiles, decoded, per_tile)

        return [PromptReplacement(modality="image", target=[image_token], replacement=cached)]
