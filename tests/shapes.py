"""Prompt shapes that only Mllama's per-token cross-attention mask tells apart, for the V1 stage's
parity tests (through Xinference and through ``vllm.LLM``)."""

from __future__ import annotations

from oracle import data_uri, png
from parity import BLUE, RED

THREE_TILES = png((40, 160, 40), size=(90, 30))  # a 3:1 picture: a 3x1 canvas of 28-pixel tiles


def image(picture):
    return {"type": "image_url", "image_url": {"url": data_uri(picture)}}


def text(words):
    return {"type": "text", "text": words}


SHAPES = {
    "three-tile image": ([{"role": "user", "content": [image(THREE_TILES), text("Describe this picture.")]}],
                         [THREE_TILES]),
    "image in a later turn": ([{"role": "user", "content": "Hello, can you see pictures?"},
                               {"role": "assistant", "content": "Yes, send one."},
                               {"role": "user", "content": [image(BLUE), text("What is this?")]}], [BLUE]),
    "two images, text between": ([{"role": "user", "content": [image(RED), text("This is the first."),
                                                               image(BLUE), text("How do they differ?")]}],
                                 [RED, BLUE]),
    "two adjacent images": ([{"role": "user", "content": [image(BLUE), image(RED), text("Compare them.")]}],
                            [BLUE, RED]),
}
