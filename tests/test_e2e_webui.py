"""Xinference's web UI in a real browser: Debian's Chromium, headless, driven by Playwright (its
``executable_path``: Playwright's own browser download cannot work here), against a real
``xinference-local`` with the plugin.

* The Launch Model page lists both families with their abilities; each family's launch dialog
  offers the engines (with the reason where one cannot serve it here), formats, sizes and
  quantizations of the specs.
* ``llama-3.2-vision-instruct`` launched **from the dialog** (engine, format, size, quantization,
  uid, model path filled in the form) ends up on the Running Models page, READY.
* The UI's chat for that model, with a picture attached: its answer equals the same request
  replayed over the REST API and raw transformers' greedy answer. The checkpoint is taught (as the
  demo's) to name the pictures when asked the way the UI asks (text, then image), so the answer
  shown is "A red circle.".

Screenshots are written to ``$XLV_ARTIFACTS`` (default: ``test-artifacts/`` in the repository);
``docs/images/`` keeps two of them for the README.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import base_env, serving
from oracle import Reference
from tiny import DEMO_QUESTION

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("XLV_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts")) / "webui"
QUESTION = DEMO_QUESTION
UID = "ui-vision"
MAX = 8


def ui_messages(image_url: str):
    """The message the UI's chat sends: the typed text, then the attached picture."""
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                         {"type": "image_url", "image_url": {"url": image_url}}]}]


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A tiny checkpoint taught to name a red circle and a blue square, asked as the UI asks."""
    from tiny import DEMO, build_taught

    return build_taught(str(tmp_path_factory.mktemp("ui-taught")), messages=ui_messages, pictures=DEMO[:2])


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """Auth off (this checks the UI, not auth); virtualenv mode off, so a launch from the dialog
    uses this environment (the virtualenv path is tested by the CLI tests)."""
    home = tmp_path_factory.mktemp("xinference-ui")
    with serving(home, {**base_env(home), "XINFERENCE_ENABLE_VIRTUAL_ENV": "0"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def page(ui_server):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (scripts/setup.sh installs it: apt-get install chromium)"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def open_launch_dialog(page, endpoint: str, family: str):
    page.goto(f"{endpoint}/ui/launch-model", wait_until="networkidle")
    page.get_by_placeholder("Search for model name and description").fill("llama-3.2-vision")
    card = page.locator("div", has=page.get_by_text(family, exact=True)).filter(
        has=page.get_by_role("button", name="Launch")).last
    tags = card.inner_text().split("\n")  # (the page behind the dialog is hidden from the accessibility tree)
    card.get_by_role("button", name="Launch").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(family, exact=True).wait_for()
    return tags, dialog


def field(dialog, label: str):
    """A select of the launch dialog, by its label."""
    return dialog.locator("label").filter(has_text=re.compile(f"^{label}")).locator("xpath=following-sibling::div[1]")


def choose(page, dialog, label: str, option: str):
    """Open a select, return the options it lists, pick ``option``."""
    field(dialog, label).click()
    item = page.locator("span.truncate").filter(has_text=re.compile(f"^{option}$")).last  # (no regex characters)
    item.wait_for(state="visible")
    listed = item.locator("xpath=ancestor::*[count(.//span[contains(@class,'truncate')]) > 1][1]").locator(
        "span.truncate").all_inner_texts()
    item.click()
    return [text for text in listed if text]


@pytest.mark.parametrize("family, abilities", [
    ("llama-3.2-vision-instruct", ["chat", "vision", "tools"]),
    ("llama-3.2-vision", ["generate", "vision"]),
])
def test_launch_page_lists_the_family_and_its_dialog_offers_the_specs(page, ui_server, family, abilities):
    tags, dialog = open_launch_dialog(page, ui_server.endpoint, family)
    assert all(a in tags for a in abilities), tags
    engines = choose(page, dialog, "Model Engine", "Transformers")
    assert engines[0] == "Transformers"
    vllm = next(e for e in engines if e.startswith("vLLM"))
    assert "vLLM is not installed; Llama 3.2 Vision (Mllama) on vLLM needs vLLM >= 0.6.3 and <= 0.10.2" in vllm
    assert choose(page, dialog, "Model Format", "pytorch") == ["pytorch", "bnb"]  # fp8 is vLLM's
    assert choose(page, dialog, "Model Size", "11") == ["11", "90"]
    assert choose(page, dialog, "Quantization", "4-bit") == ["none", "8-bit", "4-bit"]
    shot(page, f"launch-dialog-{family}")
    dialog.get_by_role("button", name="Cancel").click()


def test_launch_from_the_dialog_and_chat_with_an_image(page, ui_server, taught):
    from tiny import DEMO, picture

    _, dialog = open_launch_dialog(page, ui_server.endpoint, "llama-3.2-vision-instruct")
    choose(page, dialog, "Model Engine", "Transformers")
    choose(page, dialog, "Model Format", "pytorch")
    choose(page, dialog, "Model Size", "11")
    choose(page, dialog, "Quantization", "none")
    dialog.get_by_placeholder("Model name by default").fill(UID)
    dialog.get_by_placeholder("For PyTorch, provide the model directory. For GGML/GGUF, provide the model file path.").fill(taught)
    shot(page, "launch-dialog-filled")
    dialog.get_by_role("button", name="Deploy").click()

    # Running Models: the model, READY, with what was picked in the dialog
    page.get_by_text("Running Models", exact=True).first.click()
    page.get_by_text(f"{UID}-rep0").wait_for(timeout=300_000)
    page.get_by_text("READY", exact=True).wait_for(timeout=300_000)
    details = page.inner_text("main")
    for expected in ("llama-3.2-vision-instruct", "Transformers", "pytorch", "Quantization\nnone"):
        assert expected in details, details
    shot(page, "running-models")

    # The UI's chat: greedy, a few tokens, a red circle attached
    page.locator("button:has(svg[class*=message-circle])").first.click()
    page.get_by_placeholder("Enter a message").wait_for()
    page.locator("button:has(svg[class*=wrench])").first.click()
    inputs = page.get_by_role("dialog").locator("input")
    inputs.nth(0).fill(str(MAX))  # Max tokens
    inputs.nth(1).fill("0")  # Temperature
    page.get_by_role("dialog").get_by_role("button", name="Save").click()
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    shape, colour, rgb = DEMO[0]
    buffer = io.BytesIO()
    picture(shape, rgb).save(buffer, format="PNG")
    page.locator("input[type=file]").set_input_files({"name": "red-circle.png", "mimeType": "image/png",
                                                      "buffer": buffer.getvalue()})
    page.get_by_placeholder("Enter a message").fill(QUESTION)
    page.locator("button:has(svg[class*=send])").first.click()
    answer = page.get_by_text(re.compile(r"^A \w+ \w+\.$"))
    answer.wait_for(timeout=120_000)
    shot(page, "chat-with-an-image")

    body = sent[-1]
    assert body["temperature"] == 0 and body["max_tokens"] == MAX and body["messages"][0]["content"][0]["text"] == QUESTION
    image_url = body["messages"][0]["content"][1]["image_url"]["url"]
    assert base64.b64decode(image_url.split(",", 1)[1]) == buffer.getvalue()  # the file as attached
    # the same request over the REST API, whole
    whole = {key: value for key, value in body.items() if key != "stream_options"}
    replay = ui_server.openai().chat.completions.create(**{**whole, "stream": False}).choices[0].message.content
    raw = Reference(taught)
    expected = raw.generate(raw.render(ui_messages(image_url)), [picture(shape, rgb)], MAX)[0]
    assert answer.inner_text() == replay == expected == f"A {colour} {shape}."
