"""Every ``epoxi ... --help`` shows its help texts whole: no bracket is taken for markup."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from epoxi.cli import app

# What Rich or a markup language could swallow: [users], <addr>, {{ name }}.
BRACKETED = re.compile(r"\[[^\]\n]+\]|<[^>\n]+>|\{\{[^}\n]+\}\}")


def commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """The command and every subcommand under it, with the words that invoke each."""
    found = [(path, command)]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        found += commands(sub, (*path, name))
    return found


ALL = commands(typer.main.get_command(app))


def help_texts(command: Any) -> list[str]:
    texts = [command.help or ""]
    texts += [getattr(param, "help", None) or "" for param in command.params]
    return texts


def squeeze(text: str) -> str:
    return " ".join(text.split())


def test_every_command_is_walked() -> None:
    names = {" ".join(path) for path, _ in ALL}
    assert {"", "serve", "users hash", "keys create", "queue ls", "send", "status"} <= names
    assert len(names) >= 20


@pytest.mark.parametrize("path, command", ALL, ids=[" ".join(p) or "epoxi" for p, _ in ALL])
def test_help_keeps_every_bracketed_word(path: tuple[str, ...], command: Any) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="epoxi", env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    shown = squeeze(result.output)
    for text in help_texts(command):
        for word in BRACKETED.findall(text):
            assert squeeze(word) in shown, (word, result.output)


def test_users_hash_help_names_the_users_table() -> None:
    result = CliRunner().invoke(app, ["users", "hash", "--help"], prog_name="epoxi")
    assert "for the [users] table of the configuration" in squeeze(result.output)
