"""OpenAI-style messages → the exact Llama 3.2 Vision prompt, and the images in prompt order.

This is the official instruct chat template (``docs/prompt-format.md``) written as small pure
functions, so that every shape is checked and refused clearly instead of rendering a silently
wrong prompt. The tests compare it byte for byte with the official Jinja template.

>>> p = build_chat_prompt([{"role": "user", "content": [
...     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
...     {"type": "text", "text": "What is this?"}]}])
>>> p.text
'<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|image|>What is this?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n'
>>> p.images
('data:image/png;base64,AAAA',)
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

BOS = "<|begin_of_text|>"
IMAGE = "<|image|>"
EOT = "<|eot_id|>"
KNOWLEDGE_CUTOFF = "December 2023"

#: Meta recommends one image per prompt; more can be allowed at launch (``max_images``).
DEFAULT_MAX_IMAGES = 1


class RequestError(ValueError):
    """A request this model cannot serve as sent. The message says what to change.

    The API layer answers it with HTTP 400; it never reaches the model as a 500.
    """


@dataclass(frozen=True)
class Prompt:
    """The prompt text (special tokens included) and the image sources in prompt order."""

    text: str
    images: Tuple[str, ...] = ()


def header(role: str) -> str:
    """The header that opens a turn.

    >>> header("user")
    '<|start_header_id|>user<|end_header_id|>\\n\\n'
    """
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def today() -> str:
    """Today's date as the official template writes it (``strftime("%d %b %Y")``)."""
    return datetime.date.today().strftime("%d %b %Y")


def system_block(system_message: str, date_string: str) -> str:
    """The system turn the template adds: knowledge cutoff, today's date, then the user's text.

    >>> system_block("", "26 Jul 2024")
    '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n<|eot_id|>'
    """
    return (
        header("system")
        + f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {date_string}\n\n"
        + system_message
        + EOT
    )


def _where(i: int, j: Optional[int] = None) -> str:
    return f"messages[{i}]" + (f".content[{j}]" if j is not None else "")


def image_source(part: Dict[str, Any], where: str) -> str:
    """The URL (``data:`` URI or http(s)) of an image part, in any form users send.

    >>> image_source({"type": "image_url", "image_url": {"url": "https://x/y.png"}}, "m")
    'https://x/y.png'
    >>> image_source({"type": "image_url", "image_url": "https://x/y.png"}, "m")
    'https://x/y.png'
    >>> image_source({"type": "image_url", "image_url": {}}, "messages[0].content[1]")
    Traceback (most recent call last):
    ...
    xinf_llama_vision.messages.RequestError: messages[0].content[1]: image_url part has no 'url'; send {"type": "image_url", "image_url": {"url": "data:image/png;base64,..." or "https://..."}}
    """
    if part.get("type") == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
    else:  # HF-native {"type": "image", "url"/"image": ...}
        url = part.get("url", part.get("image"))
    if not isinstance(url, str) or not url.strip():
        raise RequestError(
            f"{where}: {part.get('type')} part has no 'url'; send "
            '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..." or "https://..."}}'
        )
    return url.strip()


def content_parts(content: Any, where: str) -> List[Dict[str, Any]]:
    """Normalize message content to a list of ``{"type": "text"|"image", ...}`` parts.

    >>> content_parts("hi", "m")
    [{'type': 'text', 'text': 'hi'}]
    >>> content_parts([{"type": "input_audio"}], "messages[0]")
    Traceback (most recent call last):
    ...
    xinf_llama_vision.messages.RequestError: messages[0].content[0]: unsupported content part type 'input_audio'; Llama 3.2 Vision takes 'text' and 'image_url' parts
    """
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError(f"{where}.content: expected a string or a list of parts, got {type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise RequestError(f"{at}: expected an object with a 'type', got {type(part).__name__}")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestError(f"{at}: text part needs a string 'text'")
            parts.append({"type": "text", "text": text})
        elif kind in ("image_url", "image"):
            parts.append({"type": "image", "url": image_source(part, at)})
        else:
            raise RequestError(
                f"{at}: unsupported content part type {kind!r}; Llama 3.2 Vision takes 'text' and 'image_url' parts"
            )
    return parts


def text_only(parts: List[Dict[str, Any]], where: str, role: str) -> str:
    """The text of a turn that cannot hold images (system turns)."""
    for j, part in enumerate(parts):
        if part["type"] == "image":
            raise RequestError(
                f"{where}.content[{j}]: images are not allowed in {'an' if role[0] in 'aeiou' else 'a'} {role} message; "
                "put them in a user message"
            )
    return "".join(p["text"] for p in parts)


def build_chat_prompt(
    messages: Sequence[Dict[str, Any]],
    *,
    date_string: Optional[str] = None,
    add_generation_prompt: bool = True,
    max_images: Optional[int] = None,
) -> Prompt:
    """Render a chat request exactly as the official Llama 3.2 Vision instruct template does.

    A conversation without images (or with a system message) gets the template's system block:

    >>> print(build_chat_prompt([{"role": "user", "content": "Hi"}], date_string="26 Jul 2024").text)
    <|begin_of_text|><|start_header_id|>system<|end_header_id|>
    <BLANKLINE>
    Cutting Knowledge Date: December 2023
    Today Date: 26 Jul 2024
    <BLANKLINE>
    <|eot_id|><|start_header_id|>user<|end_header_id|>
    <BLANKLINE>
    Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>
    <BLANKLINE>
    <BLANKLINE>
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("messages: send at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"{_where(i)}: expected an object with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(
                f"{_where(i)}.role: {m.get('role')!r} is not supported; use 'system', 'user' or 'assistant'"
            )
        if m.get("role") == "system" and i > 0:
            raise RequestError(f"{_where(i)}: a system message must be the first message")
        if m.get("content") is None:
            raise RequestError(f"{_where(i)}.content: missing; send a string or a list of parts")

    turns = [(i, m["role"], content_parts(m["content"], _where(i))) for i, m in enumerate(messages)]
    system_message, user_supplied_system = "", False
    if turns[0][1] == "system":
        i, role, parts = turns.pop(0)
        system_message, user_supplied_system = text_only(parts, _where(i), role).strip(), True
    for i, role, parts in turns:
        if role == "assistant":
            text_only(parts, _where(i), role)
    if not turns or (add_generation_prompt and turns[-1][1] != "user"):
        raise RequestError("messages: the conversation must end with a user message to get an answer")

    images = tuple(p["url"] for _, _, parts in turns for p in parts if p["type"] == "image")
    limit = DEFAULT_MAX_IMAGES if max_images is None else max_images
    if len(images) > limit:
        raise RequestError(
            f"messages: {len(images)} images sent, this model accepts at most {limit} per request "
            f"(launch option max_images); Meta recommends one image per prompt"
        )

    out = [BOS]
    if user_supplied_system or not images:
        out.append(system_block(system_message, date_string or today()))
    for _, role, parts in turns:
        out.append(header(role))
        out.extend(IMAGE if p["type"] == "image" else p["text"] for p in parts)
        out.append(EOT)
    if add_generation_prompt:
        out.append(header("assistant"))
    return Prompt("".join(out), images)


def build_completion_prompt(prompt: Any, images: Sequence[str] = ()) -> Prompt:
    """A base-model prompt with exactly one ``<|begin_of_text|>``, placed as Meta's processor does.

    >>> build_completion_prompt("<|image|>If I had to write a haiku", ["https://x/y.png"]).text
    '<|image|><|begin_of_text|>If I had to write a haiku'
    >>> build_completion_prompt("<|begin_of_text|>Once upon").text
    '<|begin_of_text|>Once upon'
    >>> build_completion_prompt("Two images: <|image|>", ["a", "b"])
    Traceback (most recent call last):
    ...
    xinf_llama_vision.messages.RequestError: prompt: 1 <|image|> token(s) but 2 image(s) sent; put one <|image|> in the prompt where each image goes
    """
    if not isinstance(prompt, str):
        raise RequestError("prompt: send one string")
    n_tokens = prompt.count(IMAGE)
    if n_tokens != len(images):
        raise RequestError(
            f"prompt: {n_tokens} {IMAGE} token(s) but {len(images)} image(s) sent; "
            f"put one {IMAGE} in the prompt where each image goes"
        )
    text = prompt.replace(BOS, "")
    lead = 0
    while text.startswith(IMAGE, lead * len(IMAGE)):
        lead += 1
    cut = lead * len(IMAGE)
    return Prompt(text[:cut] + BOS + text[cut:], tuple(images))
