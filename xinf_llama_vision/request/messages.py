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
import json
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..errors import RequestError

BOS = "<|begin_of_text|>"
IMAGE = "<|image|>"
EOT = "<|eot_id|>"
KNOWLEDGE_CUTOFF = "December 2023"

#: Meta recommends one image per prompt; more can be allowed at launch (``max_images``).
DEFAULT_MAX_IMAGES = 1


@dataclass(frozen=True)
class Prompt:
    """The prompt text (special tokens included), the image sources in prompt order, and where in
    the request each one was (``messages[0].content[1]``, ``images[0]``: what a refusal names)."""

    text: str
    images: Tuple[str, ...] = ()
    where: Tuple[str, ...] = ()


def header(role: str) -> str:
    """The header that opens a turn.

    >>> header("user")
    '<|start_header_id|>user<|end_header_id|>\\n\\n'
    """
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def today() -> str:
    """Today's date as the official template writes it (``strftime("%d %b %Y")``)."""
    return datetime.date.today().strftime("%d %b %Y")


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_image_count(count: int, max_images: Optional[int], where: str, note: str = "") -> None:
    """Refuse more images than the launch allows (``max_images``, default :data:`DEFAULT_MAX_IMAGES`).

    >>> check_image_count(2, None, "images")
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: images: 2 images sent, this model accepts at most 1 per request (launch option max_images)
    """
    limit = DEFAULT_MAX_IMAGES if max_images is None else max_images
    if count > limit:
        raise RequestError(f"{where}: {count} images sent, this model accepts at most {limit} per request "
                           f"(launch option max_images){note}")


def valid_unicode(value: Any, where: str) -> None:
    """Refuse text that is not valid Unicode: a lone UTF-16 surrogate (JSON ``"\\udfff"``) parses,
    but no tokenizer can encode it. Walks lists and objects, keys included.

    >>> valid_unicode({"text": "fine \U0001F600"}, "messages[0]")
    >>> valid_unicode(["ok", {"text": "bad \\udfff"}], "messages")
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: messages[1].text: contains a lone surrogate (U+DFFF), which is not valid Unicode; send valid UTF-8 text (a character outside the BMP is one \\U escape or a surrogate pair, never half of one)
    """
    stack = [(value, where)]
    while stack:  # a loop, not recursion: any depth json.loads accepts is walked
        value, where = stack.pop()
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                raise RequestError(
                    f"{where}: contains a lone surrogate (U+{ord(found.group()):04X}), which is not valid Unicode; send "
                    "valid UTF-8 text (a character outside the BMP is one \\U escape or a surrogate pair, never half of one)"
                )
        elif isinstance(value, dict):
            stack.extend((item, f"{where}.{key}") for key, item in reversed(value.items()))
            stack.extend((key, f"{where} (a key)") for key in reversed(value))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, f"{where}[{k}]") for k, item in reversed(list(enumerate(value))))


def _where(i: int, j: Optional[int] = None) -> str:
    return f"messages[{i}]" + (f".content[{j}]" if j is not None else "")


def image_source(part: Dict[str, Any], where: str) -> Optional[str]:
    """The URL (``data:`` URI or http(s)) of an image part, in any form users send; ``None`` for the
    Hugging Face form without one (``{"type": "image"}``), whose image travels in the request's
    ``images`` list.

    >>> image_source({"type": "image_url", "image_url": {"url": "https://x/y.png"}}, "m")
    'https://x/y.png'
    >>> image_source({"type": "image_url", "image_url": "https://x/y.png"}, "m")
    'https://x/y.png'
    >>> image_source({"type": "image"}, "m") is None
    True
    >>> image_source({"type": "image_url", "image_url": {}}, "messages[0].content[1]")
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: messages[0].content[1]: image_url part has no 'url'; send {"type": "image_url", "image_url": {"url": "data:image/png;base64,..." or "https://..."}}
    """
    if part.get("type") == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
    else:  # HF-native {"type": "image", "url"/"image": ...}, or bare
        if "url" not in part and "image" not in part:
            return None
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
    xinf_llama_vision.errors.RequestError: messages[0].content[0]: unsupported content part type 'input_audio'; Llama 3.2 Vision takes 'text' and 'image_url' parts
    """
    if isinstance(content, str):
        if IMAGE in content:
            raise RequestError(_typed_image_token(f"{where}.content"))
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
            if IMAGE in text:
                raise RequestError(_typed_image_token(f"{at}.text"))
            parts.append({"type": "text", "text": text})
        elif kind in ("image_url", "image"):
            parts.append({"type": "image", "url": image_source(part, at)})
        else:
            raise RequestError(
                f"{at}: unsupported content part type {kind!r}; Llama 3.2 Vision takes 'text' and 'image_url' parts"
            )
    return parts


def _typed_image_token(where: str) -> str:
    return (
        f"{where}: contains {IMAGE}, the token that stands for an image, but images are not sent as text; "
        'send each image as an {"type": "image_url", "image_url": {"url": ...}} part where it goes'
    )


def text_only(parts: List[Dict[str, Any]], where: str, role: str) -> str:
    """The text of a turn that cannot hold images (system turns)."""
    for j, part in enumerate(parts):
        if part["type"] == "image":
            raise RequestError(
                f"{where}.content[{j}]: images are not allowed in {'an' if role[0] in 'aeiou' else 'a'} {role} message; "
                "put them in a user message"
            )
    return "".join(p["text"] for p in parts)


TOOLS_PREAMBLE = (
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)


def tools_text(tools: Sequence[Dict[str, Any]]) -> str:
    """Tool definitions as the template writes them: each one as JSON indented by 4, then a blank line.

    >>> print(tools_text([{"name": "f"}]), end="|")
    {
        "name": "f"
    }
    <BLANKLINE>
    |
    """
    return "".join(json.dumps(t, ensure_ascii=False, indent=4) + "\n\n" for t in tools)


def check_tools(tools: Any) -> Optional[List[Dict[str, Any]]]:
    """``None`` for no tools (an empty list counts as none), else the list of tool objects."""
    if tools is not None and not isinstance(tools, (str, bytes, dict, list)) and hasattr(tools, "__iter__"):
        tools = list(tools)  # Xinference hands the model an iterator over the request's tools
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RequestError('tools: expected a list of tool objects ({"type": "function", "function": {...}})')
    return tools


def tool_call_text(message: Dict[str, Any], where: str) -> str:
    """An assistant turn that called a tool, as the model wrote it.

    >>> tool_call_text({"tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}, "m")
    '{"name": "f", "parameters": {"x": 1}}'
    """
    calls = message["tool_calls"]
    if not isinstance(calls, list) or len(calls) != 1:
        raise RequestError(f"{where}.tool_calls: Llama 3.2 Vision makes one tool call at a time; send exactly one")
    function = calls[0].get("function") if isinstance(calls[0], dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise RequestError(f"{where}.tool_calls[0].function.name: missing; send the name of the function called")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI sends the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise RequestError(f"{where}.tool_calls[0].function.arguments: not valid JSON") from None
    return '{"name": "' + name + '", "parameters": ' + json.dumps(arguments, ensure_ascii=False) + "}"


def tool_result_text(content: Any, where: str) -> str:
    """A tool result as the template writes it: JSON (a string result becomes a JSON string).

    >>> tool_result_text("22 degrees", "m")
    '"22 degrees"'
    >>> tool_result_text({"temperature": 22}, "m")
    '{"temperature": 22}'
    """
    if isinstance(content, list):
        content = text_only(content_parts(content, where), where, "tool")
    elif not isinstance(content, (str, dict)):
        raise RequestError(f"{where}.content: a tool result must be a string, an object or a list of text parts")
    return json.dumps(content, ensure_ascii=False)


ROLES = ("system", "user", "assistant", "tool", "ipython")


def build_chat_prompt(
    messages: Sequence[Dict[str, Any]],
    *,
    date_string: Optional[str] = None,
    add_generation_prompt: bool = True,
    max_images: Optional[int] = None,
    tools: Any = None,
    tools_in_user_message: bool = True,
    images: Sequence[str] = (),
    image_note: str = "",
) -> Prompt:
    """Render a chat request exactly as the official Llama 3.2 Vision instruct template does.

    ``images`` are the request's separate image list: the Hugging Face form ``{"type": "image"}``
    (no URL in the part) takes them one by one, in prompt order.

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

    Where the template would render something meaningless, the request is refused instead:

    >>> build_chat_prompt([{"role": "user", "content": [{"type": "image_url", "image_url": "https://x/y.png"}]}],
    ...                   tools=[{"type": "function", "function": {"name": "f"}}])
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: tools: Llama 3.2 Vision cannot call tools in a conversation with images (Meta: tool calling works with text-only inputs); send the tools without images, or the images without tools
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("messages: send at least one message")
    valid_unicode(messages, "messages")
    valid_unicode(tools, "tools")
    valid_unicode(date_string, "chat_template_kwargs.date_string")
    tools = check_tools(tools)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"{_where(i)}: expected an object with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise RequestError(
                f"{_where(i)}.role: {m.get('role')!r} is not supported; use 'system', 'user', 'assistant' or 'tool'"
            )
        if m.get("role") == "system" and i > 0:
            raise RequestError(f"{_where(i)}: a system message must be the first message")
        if m.get("content") is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise RequestError(f"{_where(i)}.content: missing; send a string or a list of parts")

    system_message, user_supplied_system = "", messages[0]["role"] == "system"
    if user_supplied_system:
        system_message = text_only(content_parts(messages[0]["content"], _where(0)), _where(0), "system").strip()
    turns: List[Tuple[str, str]] = []  # (header role, body)
    separate, images, locations = list(images), [], []
    for i in range(int(user_supplied_system), len(messages)):
        m, where = messages[i], _where(i)
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            if m.get("content") is not None:  # not rendered, but an image in it must not pass unseen
                text_only(content_parts(m["content"], where), where, role)
            turns.append(("assistant", tool_call_text(m, where)))
        elif role in ("tool", "ipython"):
            turns.append(("ipython", tool_result_text(m["content"], where)))
        elif role == "assistant":
            turns.append((role, text_only(content_parts(m["content"], where), where, role)))
        else:
            parts = content_parts(m["content"], where)
            for j, p in enumerate(parts):
                if p["type"] == "image":
                    images.append(p["url"] if p["url"] is not None else _separate_image(separate, f"{where}.content[{j}]"))
                    locations.append(f"{where}.content[{j}]")
            turns.append((role, "".join(IMAGE if p["type"] == "image" else p["text"] for p in parts)))
    if separate:
        raise RequestError(
            f"images: {len(separate)} image(s) left over: each one needs a {{\"type\": \"image\"}} part in a user "
            "message where it goes (or send it as an image_url part instead)"
        )
    if not turns:
        raise RequestError("messages: send at least one user message after the system message")
    if add_generation_prompt and turns[-1][0] not in ("user", "ipython"):
        raise RequestError("messages: the conversation must end with a user (or tool) message to get an answer")

    check_image_count(len(images), max_images, "messages", image_note or "; Meta recommends one image per prompt")
    if tools and images:
        raise RequestError(
            "tools: Llama 3.2 Vision cannot call tools in a conversation with images (Meta: tool calling works "
            "with text-only inputs); send the tools without images, or the images without tools"
        )

    out = [BOS]
    if user_supplied_system or not images:
        out.append(header("system"))
        if tools:
            out.append("Environment: ipython\n")
        out.append(f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}\nToday Date: {date_string or today()}\n\n")
        if tools and not tools_in_user_message:
            out.append(
                "You have access to the following functions. To call a function, please respond with JSON for a "
                "function call." + TOOLS_PREAMBLE + tools_text(tools)
            )
        out.append(system_message + EOT)
    if tools and tools_in_user_message:
        role, first = turns.pop(0)
        if role != "user":
            raise RequestError("messages: with tools, the first message after the system message must be a user message")
        out.append(
            header("user")
            + "Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\n" + TOOLS_PREAMBLE + tools_text(tools)
            + first.strip() + EOT
        )
    for role, body in turns:
        out.append(header(role) + body + EOT)
    if add_generation_prompt:
        out.append(header("assistant"))
    text = "".join(out)
    if text.count(IMAGE) != len(images):  # typed into a tool result, a tool definition, the date, ...
        raise RequestError(_typed_image_token("request"))
    return Prompt(text, tuple(images), tuple(locations))


def _separate_image(separate: List[str], where: str) -> str:
    """The next image of the request's ``images`` list, for a ``{"type": "image"}`` part at ``where``."""
    if not separate:
        raise RequestError(
            f'{where}: an image part without a URL takes the next image of the request\'s "images" list, and none is '
            'left; send the image in the request\'s "images" list, or as {"type": "image_url", "image_url": {"url": '
            '"data:image/png;base64,..." or "https://..."}}'
        )
    return separate.pop(0)


def build_completion_prompt(prompt: Any, images: Sequence[str] = (), max_images: Optional[int] = None,
                            image_note: str = "") -> Prompt:
    """A base-model prompt with exactly one ``<|begin_of_text|>``, placed as Meta's processor does.

    >>> build_completion_prompt("<|image|>If I had to write a haiku", ["https://x/y.png"]).text
    '<|image|><|begin_of_text|>If I had to write a haiku'
    >>> build_completion_prompt("<|begin_of_text|>Once upon").text
    '<|begin_of_text|>Once upon'
    >>> build_completion_prompt("Two images: <|image|>", ["a", "b"], max_images=2)
    Traceback (most recent call last):
    ...
    xinf_llama_vision.errors.RequestError: prompt: 1 <|image|> token(s) but 2 image(s) sent; put one <|image|> in the prompt where each image goes
    """
    if not isinstance(prompt, str):
        raise RequestError("prompt: send one string")
    valid_unicode(prompt, "prompt")
    check_image_count(len(images), max_images, "images", image_note)
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
    return Prompt(text[:cut] + BOS + text[cut:], tuple(images), tuple(f"images[{k}]" for k in range(len(images))))
