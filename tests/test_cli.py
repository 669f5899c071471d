"""The command line explains itself: every option of every sub-command has help and a default."""

from __future__ import annotations

import argparse

import pytest

from embseg.cli import HelpFormatter, build_parser, main


def _sub_commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _rendered_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help line ``COMMAND --help`` prints for the action, defaults filled in, unwrapped."""
    return parser._get_formatter()._expand_help(action)


def test_there_are_sub_commands_to_check():
    assert {"vocab", "build", "synth", "train", "eval", "predict", "bench"} <= set(_sub_commands())


@pytest.mark.parametrize("name", sorted(_sub_commands()))
def test_every_option_has_help_and_shows_its_default(name):
    parser = _sub_commands()[name]
    assert parser.formatter_class is HelpFormatter, \
        f"embseg {name}: create it with embseg.cli._command so that --help shows defaults"
    assert parser.description, f"embseg {name}: no description"
    missing = [a.dest for a in _options(parser) if not (a.help or "").strip()]
    assert not missing, f"embseg {name}: options without help: {missing}"
    for action in _options(parser):
        shown = _rendered_help(parser, action)
        if not action.option_strings:  # positional: always given
            continue
        if action.required:
            assert shown.endswith("(required)"), (name, action.dest, shown)
        elif action.default is None:
            # no value to show: the help must say what happens without the option
            assert "(default: " in shown, f"embseg {name} {action.option_strings[0]}: say " \
                f"what happens without it, '(default: ...)' in its help: {shown!r}"
        elif action.default is False and action.nargs == 0:
            assert shown.endswith("(default: off)"), (name, action.dest, shown)
        else:
            assert f"(default: {action.default})" in shown, (name, action.dest, shown)
    parser.format_help()  # renders without error


def test_help_prints_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "--steps STEPS SGD steps of the run" in text and "(default: 1000)" in text
    assert "(default: no validation)" in text and "(default: off)" in text


def test_errors_stay_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(["eval", "--checkpoint", str(tmp_path / "x.pt"), "--shards", str(missing)])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert error.startswith(f"embseg: error: {missing / 'classes.parquet'}: ")
