"""What a newcomer types: `python -m starkret`, both spellings of embed, and help that
shows every default and ends with an example."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from starkret.cli import commands as cli

COMMANDS = ("doctor", "bench", "embed", "build-index", "clip-back", "search", "align", "serve")


def _starkret(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "starkret", *args], capture_output=True, text=True, timeout=120
    )


def test_python_dash_m_starkret_prints_the_help_of_every_command():
    run = _starkret("--help")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: starkret")
    for command in (*COMMANDS, "eval"):
        assert f"\n    {command}" in run.stdout, command


def test_embed_shards_is_a_spelling_of_starkret_embed_and_the_help_says_so():
    run = _starkret("embed-shards", "--help")
    assert run.returncode == 0, run.stderr  # was: invalid choice: 'embed-shards'
    assert "--source SOURCE" in run.stdout
    listing = _starkret("--help").stdout
    assert "embed (embed-shards)" in listing
    # the standalone `embed-shards` command says it is the same
    assert "`starkret embed`" in cli.embed_shards_parser().format_help()


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command's parser once (an alias shares its command's), and embed-shards'."""
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found: dict[int, tuple[str, argparse.ArgumentParser]] = {}
    for name, sub in commands.choices.items():
        found.setdefault(id(sub), (name, sub))
    return [*found.values(), ("embed-shards", cli.embed_shards_parser())]


def test_every_command_is_walked():
    assert {name for name, _ in _parsers()} >= {*COMMANDS, "eval", "embed-shards"}


@pytest.mark.parametrize(("name", "parser"), _parsers(), ids=lambda p: getattr(p, "prog", p))
def test_every_option_has_help_showing_its_default(name, parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{name} {label}: no help"
        if action.default in (None, False, argparse.SUPPRESS):
            continue
        shown = formatter._expand_help(action)
        assert f"default: {action.default}" in shown, f"{name} {label}: {shown!r}"


@pytest.mark.parametrize(("name", "parser"), _parsers(), ids=lambda p: getattr(p, "prog", p))
def test_every_command_help_ends_with_an_example(name, parser):
    lines = parser.format_help().rstrip().splitlines()
    assert lines[-2] == "example:", lines[-3:]
    example = lines[-1].strip()
    assert example == cli.EXAMPLES[name]
    command = "embed-shards" if name == "embed-shards" else f"starkret {name}"
    assert example.startswith(command) or f"&& {command} " in example, example
