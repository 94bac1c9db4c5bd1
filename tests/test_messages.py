"""The message adapter against the official template, shape by shape (no server needed)."""

from __future__ import annotations

import re

import pytest

from oracle import TEMPLATE, to_hf
from xinf_llama_vision.errors import RequestError
from xinf_llama_vision.request.messages import build_chat_prompt, build_completion_prompt

IMG = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
URL = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
DATE = "02 Mar 2025"


@pytest.fixture(scope="module")
def official():
    """The official template, rendered the way transformers renders chat templates."""
    from transformers import PreTrainedTokenizerFast

    from tiny import tokenizer_dir

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir())
    template = TEMPLATE.read_text()

    def render(messages, **kwargs):
        return tokenizer.apply_chat_template(
            to_hf(messages), chat_template=template, tokenize=False, add_generation_prompt=True, date_string=DATE,
            **kwargs,
        )

    return render


SHAPES = {
    "image then text": [{"role": "user", "content": [IMG, {"type": "text", "text": "Describe it."}]}],
    "text then image": [{"role": "user", "content": [{"type": "text", "text": "Look: "}, URL]}],
    "text only": [{"role": "user", "content": "Hello there"}],
    "text only, system": [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "Hello there"},
    ],
    "system and image": [
        {"role": "system", "content": "You describe images."},
        {"role": "user", "content": [IMG, {"type": "text", "text": "What is it?"}]},
    ],
    "multi-turn, image first": [
        {"role": "user", "content": [IMG, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour?"},
    ],
    "assistant as text parts": [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]},
        {"role": "user", "content": "Bye"},
    ],
    "image_url as a plain string": [
        {"role": "user", "content": [{"type": "image_url", "image_url": "https://example.com/a.png"}, {"type": "text", "text": "?"}]}
    ],
    "HF-native image part": [{"role": "user", "content": [{"type": "image", "url": "https://example.com/a.png"}, {"type": "text", "text": "?"}]}],
}


@pytest.mark.parametrize("shape", SHAPES)
def test_prompt_is_byte_identical_to_official_template(official, shape):
    messages = SHAPES[shape]
    assert build_chat_prompt(messages, date_string=DATE, max_images=2).text == official(messages)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city, in °C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}
TOOL_SHAPES = {
    "tools, first user message": [{"role": "user", "content": "  Weather in Zürich?  "}],
    "tools with a system message": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Zürich?"},
    ],
    "tool call and tool result": [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees"},
    ],
    "tool result as an object": [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "ipython", "content": {"temperature": 22}},
    ],
    "tool result as text parts": [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": [{"type": "text", "text": "22 "}, {"type": "text", "text": "degrees"}]},
        {"role": "assistant", "content": "It is 22 °C."},
        {"role": "user", "content": "Thanks. And tomorrow?"},
    ],
}


@pytest.mark.parametrize("shape", TOOL_SHAPES)
@pytest.mark.parametrize("in_user", [True, False])
def test_tools_render_as_the_official_template(official, shape, in_user):
    messages = TOOL_SHAPES[shape]
    ours = build_chat_prompt(messages, date_string=DATE, tools=[WEATHER], tools_in_user_message=in_user).text
    assert ours == official(messages, tools=[WEATHER], tools_in_user_message=in_user)


def test_tool_turns_without_tools_render_as_the_official_template(official):
    messages = TOOL_SHAPES["tool call and tool result"]
    assert build_chat_prompt(messages, date_string=DATE).text == official(messages)


def test_images_come_back_in_prompt_order():
    messages = [{"role": "user", "content": [URL, {"type": "text", "text": "and"}, IMG]}]
    prompt = build_chat_prompt(messages, date_string=DATE, max_images=2)
    assert prompt.images == ("https://example.com/cat.png", "data:image/png;base64,iVBORw0KGgo=")
    assert prompt.text.count("<|image|>") == 2


def test_hf_image_parts_take_the_separate_images_in_order(official):
    """``{"type": "image"}`` with the images in the request's ``images`` list: the template's own form."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare with"}, URL]},
        {"role": "assistant", "content": "Both are cats."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
    ]
    prompt = build_chat_prompt(messages, date_string=DATE, max_images=3, images=["data:a", "data:b"])
    assert prompt.text == official(messages)
    assert prompt.images == ("data:a", "https://example.com/cat.png", "data:b")


@pytest.mark.parametrize("images, message", [
    ([], "messages[0].content[1]: an image part without a URL takes the next image of the request's \"images\" list, "
         "and none is left"),
    (["data:a", "data:b"], 'images: 1 image(s) left over: each one needs a {"type": "image"} part'),
])
def test_hf_image_parts_and_separate_images_must_pair_up(images, message):
    messages = [{"role": "user", "content": [{"type": "text", "text": "?"}, {"type": "image"}]}]
    with pytest.raises(RequestError, match=re.escape(message)):
        build_chat_prompt(messages, date_string=DATE, max_images=3, images=images)


def test_exact_token_ids_of_an_image_prompt():
    from transformers import PreTrainedTokenizerFast

    from tiny import tokenizer_dir

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir())
    text = build_chat_prompt(SHAPES["image then text"], date_string=DATE).text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # <|begin_of_text|> <|start_header_id|> user <|end_header_id|> \n\n <|image|> ... <|eot_id|> ... assistant header
    assert ids[:6] == [128000, 128006, 882, 128007, 271, 128256]
    assert ids[-5:] == [128009, 128006, 78191, 128007, 271]


REFUSED = {
    "empty messages": ([], "at least one message"),
    "image in system": (
        [{"role": "system", "content": [IMG]}, {"role": "user", "content": "hi"}],
        "messages[0].content[0]: images are not allowed in a system message",
    ),
    "image in assistant": (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [IMG]}, {"role": "user", "content": "x"}],
        "messages[1].content[0]: images are not allowed in an assistant message",
    ),
    "unknown part": ([{"role": "user", "content": [{"type": "video_url"}]}], "unsupported content part type 'video_url'"),
    "image_url without url": ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "has no 'url'"),
    "ends with assistant": (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        "must end with a user (or tool) message",
    ),
    "two images, default limit": ([{"role": "user", "content": [IMG, URL]}], "2 images sent, this model accepts at most 1"),
    "unknown role": ([{"role": "robot", "content": "hi"}], "messages[0].role: 'robot' is not supported"),
    "late system": (
        [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, {"role": "user", "content": "y"}],
        "messages[1]: a system message must be the first message",
    ),
    "content not text": ([{"role": "user", "content": 42}], "expected a string or a list of parts, got int"),
    "two tool calls": (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [CALL, CALL]},
         {"role": "tool", "content": "x"}],
        "messages[1].tool_calls: Llama 3.2 Vision makes one tool call at a time",
    ),
    "tool arguments not JSON": (
        [{"role": "user", "content": "hi"},
         {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
         {"role": "tool", "content": "x"}],
        "messages[1].tool_calls[0].function.arguments: not valid JSON",
    ),
    "only a system message": ([{"role": "system", "content": "x"}], "at least one user message"),
    "<|image|> typed in text": (
        [{"role": "user", "content": [IMG, {"type": "text", "text": "and <|image|>"}]}],
        "messages[0].content[1].text: contains <|image|>, the token that stands for an image, but images are not "
        "sent as text",
    ),
    "<|image|> in a string content": ([{"role": "system", "content": "<|image|>"}, {"role": "user", "content": "hi"}],
                                      "messages[0].content: contains <|image|>"),
    "<|image|> in a tool result": (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
         {"role": "tool", "content": {"x": "<|image|>"}}],
        "request: contains <|image|>",
    ),
}


def test_images_with_tools_are_refused():
    with pytest.raises(RequestError, match="cannot call tools in a conversation with images"):
        build_chat_prompt(SHAPES["image then text"], date_string=DATE, tools=[WEATHER])


def test_tools_need_a_first_user_message():
    with pytest.raises(RequestError, match="with tools, the first message after the system message must be a user"):
        build_chat_prompt(
            [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}], date_string=DATE, tools=[WEATHER]
        )


@pytest.mark.parametrize("case", REFUSED)
def test_refusals_name_the_problem(case):
    messages, message = REFUSED[case]
    with pytest.raises(RequestError, match=re.escape(message)):
        build_chat_prompt(messages, date_string=DATE)


@pytest.mark.parametrize(
    "prompt, images, expected",
    [
        ("Once upon a time", [], "<|begin_of_text|>Once upon a time"),
        ("<|begin_of_text|>Once", [], "<|begin_of_text|>Once"),
        ("<|begin_of_text|><|begin_of_text|>Once", [], "<|begin_of_text|>Once"),
        ("<|image|>Caption:", ["u"], "<|image|><|begin_of_text|>Caption:"),
        ("<|image|><|begin_of_text|>Caption:", ["u"], "<|image|><|begin_of_text|>Caption:"),
        ("Left <|image|> right", ["u"], "<|begin_of_text|>Left <|image|> right"),
    ],
)
def test_base_prompt_has_exactly_one_bos(prompt, images, expected):
    assert build_completion_prompt(prompt, images).text == expected


def test_base_prompt_image_count_must_match():
    with pytest.raises(RequestError, match="0 <\\|image\\|> token\\(s\\) but 1 image"):
        build_completion_prompt("no token here", ["u"])
