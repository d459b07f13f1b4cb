"""Every command exists, has help with an example, and errors are one line with exit 1."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from sync_tools.cli import COMMANDS, cli


def _walk(cmd: click.Command, path: tuple[str, ...]):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(click.Context(cmd)):
            yield from _walk(cmd.get_command(click.Context(cmd), name), path + (name,))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_with_an_example(name: str) -> None:
    runner = CliRunner()
    top = cli.get_command(click.Context(cli), name)
    assert top is not None, f"{name} is listed in COMMANDS but does not import"
    for path, cmd in _walk(top, (name,)):
        result = runner.invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, result.output
        assert cmd.help and cmd.help.strip(), f"sync-tools {' '.join(path)} has no help text"
        if not isinstance(cmd, click.Group):
            assert "example" in result.output.lower(), f"sync-tools {' '.join(path)} --help shows no example"


def test_commands_listed_in_top_help_without_importing_them() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name, (_, short) in COMMANDS.items():
        assert name in result.output and short in result.output


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2


def test_config_error_is_one_line_exit_1(tmp_path) -> None:
    bad = tmp_path / "sync-tools.yaml"
    bad.write_text("subsystems:\n  nats:\n    upstream: x\n    strategy: tagz\n")
    result = CliRunner().invoke(cli, ["check", "--config", str(bad)])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert f"{bad}:4: subsystems.nats.strategy: unknown value 'tagz'" in lines[0]
    assert "Traceback" not in result.output
