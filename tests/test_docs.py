"""The committed config reference is the one the schema generates."""

from pathlib import Path

from kohya_backend.config.format import reference_markdown


def test_config_reference_doc_is_current() -> None:
    doc = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"
    assert doc.read_text(encoding="utf-8") == reference_markdown(), (
        "regenerate: python -m kohya_backend config reference > docs/config-reference.md"
    )
