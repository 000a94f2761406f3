"""Entry point of the user CLI: every command group registered on :data:`~controller.client.app.cli`."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import click

from controller.client import (
    cmd_alerts,
    cmd_apps,
    cmd_auth,
    cmd_db,
    cmd_files,
    cmd_logs,
    cmd_metrics,
    cmd_nodes,
    cmd_vault,
)
from controller.client.app import PROG, State, cli
from controller.client.errors import INTERRUPTED, CliError
from controller.client.names import COMPLETE_VAR
from controller.client.session import CTRL_C

for _module in (
    cmd_auth,
    cmd_nodes,
    cmd_apps,
    cmd_logs,
    cmd_db,
    cmd_files,
    cmd_metrics,
    cmd_alerts,
    cmd_vault,
):
    _module.register(cli)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C as Python's default handler does it (KeyboardInterrupt), remembered so that
    the channel is not closed afterwards (:meth:`Connection.close`)."""
    CTRL_C.set()
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv``; the exit code (docs/cli.md, "Exit codes")."""
    args = list(sys.argv[1:] if argv is None else argv)
    shared = State()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        result = cli.main(args, prog_name=PROG, standalone_mode=False, obj=shared, complete_var=COMPLETE_VAR)
    except CliError as error:
        shared.output.error(error)
        return error.exit_code
    except click.exceptions.Abort:
        shared.output.note("a67: interrupted")
        return INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        shared.output.note("a67: interrupted")
        return INTERRUPTED
    finally:
        try:
            shared.close()
        except KeyboardInterrupt:  # Ctrl-C while closing: the work is done, the process ends
            CTRL_C.set()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
