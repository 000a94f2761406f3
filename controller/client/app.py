"""The root of the user CLI: ``a67 login``, ``a67 nodes``, ``a67 deploy``, ``a67 db`` ….

:func:`main` runs it; ``controller/cli.py`` hands it every command listed in
:data:`CLIENT_COMMANDS` (the server commands stay with argparse there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.shell_completion import get_completion_class

from controller.client.config import CA_CERT_ENV, CONTROLLER_ENV, ClientConfig, config_dir, resolve_controller
from controller.client.names import COMPLETE_VAR
from controller.client.render import Output
from controller.client.session import Connection

F = TypeVar("F", bound=Callable[..., Any])

PROG = "a67"


class State:
    """What every command shares: where output goes and the connection to the controller."""

    def __init__(self) -> None:
        self.output = Output()
        self.controller_flag: str | None = None
        self.ca_cert_flag: str | None = None
        self._connection: Connection | None = None

    @property
    def config_dir(self) -> Path:
        return config_dir()

    @property
    def address(self) -> str:
        return resolve_controller(self.controller_flag, self.config_dir)

    def connection(self) -> Connection:
        if self._connection is None:
            import os

            ca = (
                self.ca_cert_flag or os.environ.get(CA_CERT_ENV) or ClientConfig.load(self.config_dir).ca_cert
            )
            self._connection = Connection(self.address, self.config_dir, ca_cert=ca)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


def state() -> State:
    return click.get_current_context().ensure_object(State)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(State).output.as_json = True


def _set_controller(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(State).controller_flag = value


def _set_ca_cert(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.ensure_object(State).ca_cert_flag = value


def common_options(func: F) -> F:
    """``--json``, ``--controller`` and ``--ca-cert``, accepted by every command and group."""
    func = click.option(
        "--ca-cert",
        metavar="PEM",
        expose_value=False,
        callback=_set_ca_cert,
        help=f"CA certificate of a TLS controller (or {CA_CERT_ENV}, or ca_cert in config.toml).",
    )(func)
    func = click.option(
        "--controller",
        metavar="ADDRESS",
        expose_value=False,
        callback=_set_controller,
        help=f"The controller's gRPC address, host:port or https://host:port (or {CONTROLLER_ENV}, "
        "or controller in config.toml; default 127.0.0.1:50051).",
    )(func)
    func = click.option(
        "--json",
        "as_json",
        is_flag=True,
        is_eager=True,
        expose_value=False,
        callback=_set_json,
        help="Print JSON for scripts (the REST API's field names); errors as JSON on stderr.",
    )(func)
    return func


def command(group: click.Group, name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
    """A subcommand of ``group`` with the common options; it returns its exit code."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def run(*args: Any, **params: Any) -> int:
            code = func(*args, **params)
            return 0 if code is None else int(code)

        return group.command(name, **kwargs)(common_options(run))  # type: ignore[return-value]

    return decorate


class RootGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        # In the order a first-time user needs them.
        order = ["register", "login", "logout", "whoami", "nodes", "deploy", "apps", "db", "metrics"]
        rest = sorted(set(self.commands) - set(order))
        return [n for n in order if n in self.commands] + rest


@click.group(
    cls=RootGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Options go after the command name. Exit codes and every command with examples: docs/cli.md.",
)
@common_options
def cli() -> None:
    """Automator67: sign in, add nodes, deploy apps, query databases.

    \b
    Quick start:
      a67 register --email ada@example.com
      a67 nodes enroll            # prints the command to run on a node
      a67 deploy examples/hello   # follows the rollout until it runs
      a67 apps show hello
    """


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
    Example:
      eval "$(a67 completion bash)"        # in ~/.bashrc
      a67 completion fish > ~/.config/fish/completions/a67.fish
    """
    cls = get_completion_class(shell)
    assert cls is not None
    click.echo(cls(cli, {}, PROG, COMPLETE_VAR).source())
