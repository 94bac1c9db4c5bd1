"""The generated parts of docs/ match the specs and the adapter (run `python -m xinf_llama_vision.docs`)."""

from xinf_llama_vision.docs import BLOCKS, stale


def test_generated_docs_are_up_to_date():
    assert stale() == [], "run: python -m xinf_llama_vision.docs"


def test_every_generated_block_is_present():
    from xinf_llama_vision.docs import DOCS, _pattern

    for name, blocks in BLOCKS.items():
        text = (DOCS / name).read_text(encoding="utf-8")
        for block in blocks:
            assert _pattern(block).search(text), f"docs/{name} lost its '{block}' block"
