"""Entry point of the user CLI: every command group registered on :data:`~controller.client.app.cli`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from controller.client import (
    cmd_alerts,
    cmd_apps,
    cmd_auth,
    cmd_db,
    cmd_logs,
    cmd_metrics,
    cmd_nodes,
    cmd_vault,
)
from controller.client.app import PROG, State, cli
from controller.client.errors import INTERRUPTED, CliError
from controller.client.names import COMPLETE_VAR

for _module in (cmd_auth, cmd_nodes, cmd_apps, cmd_logs, cmd_db, cmd_metrics, cmd_alerts, cmd_vault):
    _module.register(cli)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv``; the exit code (docs/cli.md, "Exit codes")."""
    args = list(sys.argv[1:] if argv is None else argv)
    shared = State()
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
        shared.close()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
