"""The docs site renders what its pages say. Every page is rendered with the site's Markdown extensions and
checked by the same code the mkdocs build runs (``docs/hooks.py``): a list item that comes out as text, or a
nested item that comes out flat (Python-Markdown nests at four spaces only), fails. The CLI reference page,
generated from the parsers at build time, covers every subcommand, flag and configuration field."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import pytest

markdown = pytest.importorskip("markdown")
yaml = pytest.importorskip("yaml")

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted((DOCS / "pages").rglob("*.md"))


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


def render(text: str) -> str:
    config = yaml.safe_load((DOCS / "mkdocs.yml").read_text())
    names = [next(iter(e)) if isinstance(e, dict) else e for e in config.get("markdown_extensions", [])]
    return markdown.markdown(text, extensions=names)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS / "pages")) for p in PAGES])
def test_lists_render_as_lists(page):
    text = page.read_text()
    assert hooks.list_problems(text, render(text)) == [], page.name


def test_the_check_catches_two_space_nesting_and_items_swallowed_by_a_paragraph():
    flat = "- parent\n  - child\n"
    assert hooks.list_problems(flat, render(flat)) == ["1 nested list items in the source, 0 rendered nested"]
    swallowed = "- a\n\n    more of a\n- b\n"
    assert "list item rendered as text" in hooks.list_problems(swallowed, render(swallowed))[0]
    good = "- parent\n    - child\n\n    more of the parent\n\n- next\n"
    assert hooks.list_problems(good, render(good)) == []


def test_the_cli_reference_covers_every_subcommand_flag_and_field():
    pytest.importorskip("trainer")
    from trainer.cli import build_parser
    from trainer.config.docs import SECTION_TYPES

    page = hooks.cli_reference()
    assert hooks.list_problems(page, render(page)) == []
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, parser in commands.items():
        assert f"## trainer {name}" in page
        for action in parser._actions:
            for flag in action.option_strings:
                if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction):
                    assert f"`{flag}" in page, flag
    for section, cls in SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            assert f"| `{section}.{f.name}` |" in page
    assert "choices: fp32, bf16, fp16, fp8; default: fp32" in page
