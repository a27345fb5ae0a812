"""The command line explains itself: every flag of every subcommand has help text that shows its default
(or is required), flags with a fixed set of values list them, and every configuration field has
documentation, read from the field itself, for ``--help`` and the CLI reference."""

import argparse
import dataclasses

import pytest

from trainer.cli import build_parser
from trainer.config.docs import SECTION_TYPES, field_docs, fields_table


def subcommands():
    top = build_parser()
    action = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return top, action.choices


def expanded_help(parser, action):
    return parser._get_formatter()._expand_help(action)


def test_every_subcommand_has_a_description_and_examples():
    top, commands = subcommands()
    assert "examples:" in top.format_help()
    for name, parser in commands.items():
        assert parser.description and len(parser.description) > 40, name
        assert parser.epilog and "trainer " in parser.epilog, name
        assert f"trainer {name}" in parser.epilog, name


@pytest.mark.parametrize("name", sorted(subcommands()[1]))
def test_every_flag_has_help_and_shows_its_default(name):
    parser = subcommands()[1][name]
    switches = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction)
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        flag = "/".join(action.option_strings) or action.dest
        assert action.help, f"trainer {name} {flag}: no help text"
        text = expanded_help(parser, action)
        if not action.required and not isinstance(action, switches) and action.option_strings:
            in_group = any(action in g._group_actions and g.required for g in parser._mutually_exclusive_groups)
            assert in_group or "default" in text or "required" in text, (
                f"trainer {name} {flag}: help does not show the default: {text!r}"
            )
        if action.choices and action.metavar:  # choices hidden behind a metavar must be in the text
            assert all(str(c) in text for c in action.choices), f"trainer {name} {flag}: choices not shown"


def test_config_flags_show_the_config_defaults_and_choices():
    parser = subcommands()[1]["train"]
    helps = {a.dest: expanded_help(parser, a) for a in parser._actions if a.help != argparse.SUPPRESS}
    assert "choices: fp32, bf16, fp16, fp8; default: fp32" in helps["precision"]
    assert "choices: 0, 1, 2, 3; default: 0" in helps["zero"]
    assert "default: tiny" in helps["model"] and "llama3-8b" in helps["model"]
    assert "default: none" in helps["recompute"] and "selective" in helps["recompute"]
    assert "1f1b" in helps["pipeline_schedule"] and "default: 1f1b" in helps["pipeline_schedule"]
    assert "default: 0.0003" in helps["lr"] and "default: 100" in helps["steps"]


@pytest.mark.parametrize("section", sorted(SECTION_TYPES))
def test_every_config_field_is_documented_where_it_is_declared(section):
    docs = field_docs(SECTION_TYPES[section])
    missing = [f.name for f in dataclasses.fields(SECTION_TYPES[section]) if not docs.get(f.name)]
    assert not missing, f"[{section}] fields without a docstring under them: {missing}"
    assert len(fields_table()) == 1 + sum(len(dataclasses.fields(c)) for c in SECTION_TYPES.values())


def test_a_value_outside_the_choices_is_refused_with_exit_2(capsys):
    from trainer.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--precision", "fp4"])
    assert exit_info.value.code == 2
    assert "argument --precision: invalid choice: 'fp4'" in capsys.readouterr().err
