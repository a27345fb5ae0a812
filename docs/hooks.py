"""mkdocs hooks: the CLI reference page is generated from ``trainer``'s parsers at build time (so it cannot
drift from the code), and a page whose list items render as text, or whose nested items render flat, fails
the build (Python-Markdown nests lists only at four spaces; GitHub accepts two)."""

from __future__ import annotations

import argparse
import re
from html.parser import HTMLParser
from typing import ClassVar

MARKER = re.compile(r"^( *)([-*+]|\d+\.) \S")
MARKER_IN_TEXT = re.compile(r"\n[ \t]*([-*+]|\d+\.)[ \t]+\S")
CLI_PAGE = "cli.md"


class Blocks(HTMLParser):
    """The text of each block element outside ``<pre>`` (inline code kept as a placeholder, so lines stay
    whole), and how many ``<li>`` sit inside another ``<li>``."""

    BLOCK: ClassVar[set[str]] = {
        "p",
        "li",
        "ul",
        "ol",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "table",
        "tr",
        "td",
        "th",
        "pre",
    }

    def __init__(self) -> None:
        super().__init__()
        self.pre = self.li_depth = self.nested_items = 0
        self.texts: list[str] = []
        self._current: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.BLOCK:
            self._flush()
        if tag == "pre":
            self.pre += 1
        elif tag == "code" and not self.pre:
            self._current.append("CODE")
        elif tag == "li":
            self.nested_items += self.li_depth > 0
            self.li_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.BLOCK:
            self._flush()
        if tag == "pre":
            self.pre -= 1
        elif tag == "li":
            self.li_depth -= 1

    def handle_data(self, data: str) -> None:
        if not self.pre:
            self._current.append(data)

    def _flush(self) -> None:
        if self._current:
            self.texts.append("".join(self._current))
            self._current = []


def nested_markers(markdown: str) -> int:
    """Indented list markers outside fenced code: the items the author meant to nest."""
    count, fence = 0, False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and (m := MARKER.match(line)) and m.group(1):
            count += 1
    return count


def list_problems(markdown: str, html: str) -> list[str]:
    """What is wrong with the lists of a page rendered from ``markdown`` to ``html`` (empty: nothing)."""
    blocks = Blocks()
    blocks.feed(html)
    blocks.close()
    problems = [f"list item rendered as text: {t.strip()[:80]!r}" for t in blocks.texts if MARKER_IN_TEXT.search(t)]
    expected = nested_markers(markdown)
    if blocks.nested_items != expected:
        problems.append(f"{expected} nested list items in the source, {blocks.nested_items} rendered nested")
    return problems


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    rows = ["| option | meaning |", "|---|---|"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        flags = ", ".join(action.option_strings) or action.dest
        if action.nargs != 0:
            metavar = formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
            flags += f" {metavar}"
        meaning = formatter._expand_help(action)
        if action.required:
            meaning += " (required)"
        rows.append(f"| `{_cell(flags)}` | {_cell(meaning)} |")
    return rows


def cli_reference() -> str:
    """The CLI reference page: each subcommand's description, options and examples, then every configuration
    field that ``--set`` and ``--config`` accept."""
    from trainer.cli import build_parser
    from trainer.config.docs import fields_table

    top = build_parser()
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    lines = [
        "# CLI reference",
        "",
        "Generated from the `trainer` command's parsers when the site is built; `trainer COMMAND --help` prints "
        "the same. Every option's meaning and default come from the code (configuration fields: the docstring "
        "under each field of the dataclasses in `trainer.config`, `pstate.ParallelConfig`, `trainer.model`).",
        "",
        "```text",
        top.format_usage().strip(),
        "```",
        "",
    ]
    for name, parser in commands.choices.items():
        lines += [f"## trainer {name}", "", parser.description or "", "", "```text", parser.format_usage().strip()]
        lines += ["```", "", *_options_table(parser), ""]
        if parser.epilog:
            lines += ["```text", parser.epilog.strip(), "```", ""]
    lines += [
        "## Configuration fields",
        "",
        "Every field below can be set in a `--config` TOML file (`[section]` then `field = value`) or with "
        "`--set section.field=value` (TOML value syntax); the flags of `trainer train` set the common ones. "
        "`model.*` fields override the chosen preset's values.",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, kind, default, doc in fields_table():
        lines.append(f"| `{name}` | `{_cell(kind)}` | `{_cell(default)}` | {_cell(doc)} |")
    return "\n".join(lines) + "\n"


def on_files(files, config):
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File

    try:
        content = cli_reference()
    except ImportError as error:
        raise PluginError(
            f"the CLI reference is generated from trainer's parsers; install the packages ({error})"
        ) from None
    files.append(File.generated(config, CLI_PAGE, content=content))
    return files


def on_page_content(html, page, config, files):
    from mkdocs.exceptions import PluginError

    problems = list_problems(page.markdown, html)
    if problems:
        raise PluginError(f"{page.file.src_uri}: {'; '.join(problems)} (indent nested lists by 4 spaces)")
    return html
