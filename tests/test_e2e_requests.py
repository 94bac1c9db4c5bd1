"""Every message shape over HTTP: the official prompt (parity with raw transformers) or a clear 400.

Real ``xinference-local``, real launch, raw HTTP (exact status codes). Expected answers come from
:mod:`oracle` (official template + raw ``generate``), refusal texts from the issue's rules.
"""

from __future__ import annotations

import json

import pytest

from oracle import data_uri, png

RED, GREEN = png((200, 30, 30)), png((20, 160, 40), size=(40, 40))
MAX = 10


@pytest.fixture(scope="module")
def two_image_uid(launched):
    return launched("llama-3.2-vision-instruct", "--disable-virtual-env", "--max_images", "2")


def image(img, form="object"):
    if form == "object":
        return {"type": "image_url", "image_url": {"url": data_uri(img)}}
    if form == "string":
        return {"type": "image_url", "image_url": data_uri(img)}
    return {"type": "image", "url": data_uri(img)}  # the HF-native part


def text(t):
    return {"type": "text", "text": t}


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}

#: name → (messages, images in prompt order, extra request fields)
SHAPES = {
    "image then text": ([{"role": "user", "content": [image(RED), text("What is this?")]}], [RED], {}),
    "text then image": ([{"role": "user", "content": [text("Describe: "), image(GREEN)]}], [GREEN], {}),
    "text only": ([{"role": "user", "content": "Name three rivers."}], [], {}),
    "text only with system": (
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name three rivers."}],
        [],
        {},
    ),
    "system with image": (
        [{"role": "system", "content": "You describe images."}, {"role": "user", "content": [image(RED), text("?")]}],
        [RED],
        {},
    ),
    "multi-turn, assistant as parts": (
        [
            {"role": "user", "content": [image(GREEN), text("What colour?")]},
            {"role": "assistant", "content": [text("Green"), text(".")]},
            {"role": "user", "content": "Are you sure?"},
        ],
        [GREEN],
        {},
    ),
    "image_url as a plain string": ([{"role": "user", "content": [image(RED, "string"), text("?")]}], [RED], {}),
    "HF-native image part": ([{"role": "user", "content": [image(GREEN, "hf"), text("?")]}], [GREEN], {}),
    "HF-native image part, image sent separately": (
        [{"role": "user", "content": [text("Describe"), {"type": "image"}]}], [RED], {"images": [data_uri(RED)]},
    ),
    "tools": ([{"role": "user", "content": "Weather in Oslo?"}], [], {"tools": [WEATHER]}),
    "tool result": (
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "-3 degrees"},
        ],
        [],
        {"tools": [WEATHER]},
    ),
}


def chat(server, uid, messages, **extra):
    return server.post("/v1/chat/completions", {"model": uid, "messages": messages, "max_tokens": MAX,
                                                "temperature": 0, **extra})


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_matches_raw_transformers(server, chat_uid, reference, shape):
    messages, images, extra = SHAPES[shape]
    template_args = {k: v for k, v in extra.items() if k == "tools"}
    expected, prompt_tokens, _ = reference.generate(reference.render(messages, **template_args), images, MAX)
    status, body = chat(server, chat_uid, messages, **extra)
    assert status == 200, body
    message = body["choices"][0]["message"]
    assert message["content"] == expected  # a random model's answer is no tool call: it comes back as text
    assert body["usage"]["prompt_tokens"] == prompt_tokens


def test_tools_in_system_message_option(server, chat_uid, reference):
    messages, _, extra = SHAPES["tools"]
    options = {"tools_in_user_message": False}
    expected, _, _ = reference.generate(reference.render(messages, **extra, **options), [], MAX)
    status, body = chat(server, chat_uid, messages, chat_template_kwargs=options, **extra)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected


def test_two_images_with_max_images_2(server, two_image_uid, reference):
    messages = [{"role": "user", "content": [image(RED), text("and"), image(GREEN), text("?")]}]
    expected, prompt_tokens, _ = reference.generate(reference.render(messages), [RED, GREEN], MAX)
    status, body = chat(server, two_image_uid, messages)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["prompt_tokens"] == prompt_tokens


REFUSALS = {
    "images with tools": (
        {"messages": SHAPES["image then text"][0], "tools": [WEATHER]},
        "cannot call tools in a conversation with images",
    ),
    "image in a system message": (
        {"messages": [{"role": "system", "content": [image(RED)]}, {"role": "user", "content": "hi"}]},
        "messages[0].content[0]: images are not allowed in a system message",
    ),
    "image in an assistant message": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [image(RED)]},
                      {"role": "user", "content": "x"}]},
        "messages[1].content[0]: images are not allowed in an assistant message",
    ),
    "unknown content part": (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        "messages[0].content[0]: unsupported content part type 'input_audio'",
    ),
    "image_url without a url": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]}]},
        "messages[0].content[0]: image_url part has no 'url'",
    ),
    "empty messages": ({"messages": []}, "messages: send at least one message"),
    "ends with an assistant turn": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        "must end with a user (or tool) message",
    ),
    "two images, default limit 1": (
        {"messages": [{"role": "user", "content": [image(RED), image(GREEN), text("?")]}]},
        "2 images sent, this model accepts at most 1 per request (launch option max_images)",
    ),
    "an image part without a URL and no images list": (
        {"messages": [{"role": "user", "content": [text("?"), {"type": "image"}]}]},
        "messages[0].content[1]: an image part without a URL takes the next image of the request's \"images\" list, "
        "and none is left",
    ),
    "an images list with no part to take it": (
        {"messages": [{"role": "user", "content": "hi"}], "images": [data_uri(RED)]},
        'images: 1 image(s) left over: each one needs a {"type": "image"} part in a user message where it goes',
    ),
    "two tool calls at once": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [CALL, CALL]},
                      {"role": "tool", "content": "x"}], "tools": [WEATHER]},
        "messages[1].tool_calls: Llama 3.2 Vision makes one tool call at a time",
    ),
    "<|image|> typed into the text": (
        {"messages": [{"role": "user", "content": "What is <|image|>?"}]},
        "messages[0].content: contains <|image|>, the token that stands for an image, but images are not sent "
        "as text",
    ),
    "a lone surrogate in the text": (
        {"messages": [{"role": "user", "content": [text("What is \udfff?")]}]},
        "messages[0].content[0].text: contains a lone surrogate (U+DFFF), which is not valid Unicode",
    ),
    "a lone surrogate in a stop string": (
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["\ud800"]},
        "stop[0]: contains a lone surrogate (U+D800)",
    ),
    "top_p out of range": (
        {"messages": [{"role": "user", "content": "hi"}], "top_p": 3},
        "top_p: must be between 0 and 1",
    ),
}


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_400_with_the_reason(server, chat_uid, case, stream):
    body, reason = REFUSALS[case]
    status, answer = server.post("/v1/chat/completions", {"model": chat_uid, "max_tokens": 4, "stream": stream, **body})
    assert status == 400, answer
    assert reason in answer["error"]["message"]
    assert answer["detail"] == answer["error"]["message"]


def test_streaming_with_tools_is_refused(server, chat_uid):
    status, answer = chat(server, chat_uid, SHAPES["tools"][0], tools=[WEATHER], stream=True)
    assert status == 400
    assert "tool calls cannot be streamed" in answer["error"]["message"]


def test_server_keeps_serving_the_same_answer_after_refusals(server, chat_uid):
    messages = SHAPES["image then text"][0]
    before = chat(server, chat_uid, messages)
    for body, _ in REFUSALS.values():
        assert server.post("/v1/chat/completions", {"model": chat_uid, **body})[0] == 400
    after = chat(server, chat_uid, messages)
    assert before[0] == after[0] == 200
    assert after[1]["choices"][0]["message"] == before[1]["choices"][0]["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_json_nested_too_deeply_is_a_400(server, chat_uid, base_uid, path):
    import httpx

    uid = chat_uid if path == "/v1/chat/completions" else base_uid
    raw = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "prompt": "Hi", "max_tokens": 2, ' \
          '"metadata": %s}' % (uid, "[" * 50_000 + "]" * 50_000)
    response = httpx.post(server.endpoint + path, content=raw.encode(), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert "nested too deeply" in response.json()["error"]["message"]


#: Bodies for one of our models that no handler can read (Xinference would answer with a 500): our 400.
UNREADABLE = {
    "invalid UTF-8": (b'{"model": "%s", "prompt": "\xff"}', "request body: not valid JSON ('utf-8' codec can't decode"),
    "a 5000-digit number": (b'{"model": "%s", "max_tokens": 1' + b"0" * 5000 + b"}", "request body: not valid JSON"),
    "cut short": (b'{"model": "%s", "prompt": "Hi', "request body: not valid JSON (Unterminated string"),
}

#: Bodies whose model cannot be read: not the plugin's to answer, so exactly what Xinference answers.
NOT_OURS = {
    "not JSON": b"hello",
    "empty": b"",
    "an array": b'[{"model": "%s"}]',
    "null": b"null",
    "model not a string": b'{"model": ["%s"], "prompt": "Hi"}',
    "a lone surrogate in the model": b'{"model": "%s\\udfff", "prompt": "Hi"}',
    "another model": b'{"model": "not-ours", "prompt": "Hi", "images": ["http://10.1.2.3/a.png"]}',
}


def post_raw(server, path, raw):
    import httpx

    return httpx.post(server.endpoint + path, content=raw, timeout=60, headers={"content-type": "application/json"})


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("case", UNREADABLE)
def test_unreadable_bodies_for_our_models_are_400(server, chat_uid, base_uid, path, case):
    raw, reason = UNREADABLE[case]
    uid = chat_uid if path == "/v1/chat/completions" else base_uid
    response = post_raw(server, path, raw.replace(b"%s", uid.encode()))
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("case", NOT_OURS)
def test_bodies_not_for_our_models_get_what_xinference_answers(server, bare_server, chat_uid, path, case):
    raw = NOT_OURS[case].replace(b"%s", chat_uid.encode())
    with_plugin, without = post_raw(server, path, raw), post_raw(bare_server, path, raw)
    assert with_plugin.status_code == without.status_code, (with_plugin.text[:300], without.text[:300])
    assert "xinf" not in with_plugin.text


BASE_REFUSALS = {
    "more <|image|> than images": ({"prompt": "<|image|><|image|>Caption:", "images": [data_uri(RED)]},
                                   "prompt: 2 <|image|> token(s) but 1 image(s) sent"),
    "an image without <|image|>": ({"prompt": "Caption:", "images": [data_uri(RED)]},
                                   "prompt: 0 <|image|> token(s) but 1 image(s) sent"),
    "a lone surrogate in the prompt": ({"prompt": "Caption \udfff"},
                                       "prompt: contains a lone surrogate (U+DFFF), which is not valid Unicode"),
    "images not a list": ({"prompt": "<|image|>Caption:", "images": data_uri(RED)},
                          "images: expected a list of image URLs"),
    "<|image|> without an image": ({"prompt": "<|image|>Caption:"},
                                   "prompt: 1 <|image|> token(s) but 0 image(s) sent; put one <|image|> in the prompt "
                                   "where each image goes"),
    "two images, default limit 1": ({"prompt": "<|image|><|image|>Caption:", "images": [data_uri(RED), data_uri(GREEN)]},
                                    "images: 2 images sent, this model accepts at most 1 per request (launch option max_images)"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
@pytest.mark.parametrize("case", BASE_REFUSALS)
def test_base_refusals_are_400(server, base_uid, case, stream):
    body, reason = BASE_REFUSALS[case]
    status, answer = server.post("/v1/completions", {"model": base_uid, "max_tokens": 4, "stream": stream, **body})
    assert status == 400, answer
    assert reason in answer["error"]["message"]


@pytest.mark.parametrize("prompt", ["Once upon a time", "<|begin_of_text|>Once upon a time"])
def test_base_prompt_gets_exactly_one_bos(server, base_uid, reference, prompt):
    expected, prompt_tokens, _ = reference.generate("<|begin_of_text|>Once upon a time", [], MAX)
    status, body = server.post("/v1/completions", {"model": base_uid, "prompt": prompt, "max_tokens": MAX,
                                                    "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["text"] == expected
    assert body["usage"]["prompt_tokens"] == prompt_tokens


TOOL_DATE = {"date_string": "26 Jul 2024"}
TOOL_ANSWER = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'


@pytest.fixture(scope="module")
def tool_caller(server, tiny_checkpoint, reference, tmp_path_factory):
    """The tiny checkpoint taught (raw transformers) to answer the "tools" shape with a tool call, launched."""
    from oracle import Reference, teach

    messages, _, extra = SHAPES["tools"]
    prompt = reference.render(messages, **TOOL_DATE, **extra)
    path = teach(tiny_checkpoint, str(tmp_path_factory.mktemp("tool-caller")), prompt, TOOL_ANSWER + "<|eot_id|>")
    text, prompt_tokens, n = Reference(path).generate(prompt, [], 40)
    assert text == TOOL_ANSWER  # raw transformers says it, then <|eot_id|> ends it
    return server.launch("llama-3.2-vision-instruct", "tool-caller", path, "--disable-virtual-env"), prompt_tokens, n


def test_a_tool_call_answer_comes_back_as_openai_tool_calls(server, tool_caller):
    tool_caller, prompt_tokens, n = tool_caller
    messages, _, extra = SHAPES["tools"]
    response = server.openai().chat.completions.create(
        model=tool_caller, messages=messages, max_tokens=40, temperature=0, extra_body={"chat_template_kwargs": TOOL_DATE},
        **extra,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == json.loads(TOOL_ANSWER)["parameters"]
    # the family's stop token <|eot_id|> ended the answer, as in raw transformers (counted there too)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, n)
    # The same model without tools answers in text: the tool call came from the tools prompt.
    status, body = chat(server, tool_caller, messages, chat_template_kwargs=TOOL_DATE)
    assert status == 200 and body["choices"][0]["finish_reason"] != "tool_calls", body


def test_tool_call_answers_become_openai_tool_calls(tiny_checkpoint):
    """The engine hands a tool-call answer to Xinference's llama3 tool parser (real classes, no server)."""
    from xinf_llama_vision.catalog import our_families
    from xinf_llama_vision.registration import register, to_xinference

    register()
    from xinf_llama_vision.engines.transformers import MllamaChatModel

    model = MllamaChatModel("uid", to_xinference(our_families()["llama-3.2-vision-instruct"]), tiny_checkpoint, {})
    model.prepare_parse_tool_calls()
    answer = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    completion = {"id": "x", "object": "text_completion", "created": 0, "model": "uid",
                  "choices": [{"index": 0, "text": answer, "logprobs": None, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    result = model._post_process_completion(model.model_family, "uid", completion, [WEATHER])
    call = result["choices"][0]["message"]["tool_calls"][0]
    assert result["choices"][0]["finish_reason"] == "tool_calls"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
