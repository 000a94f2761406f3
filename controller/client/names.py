"""The user CLI's top-level commands, for ``controller/cli.py`` (kept light: no imports).

``a67 <one of these> …`` goes to :func:`controller.client.app.main` (Click); every other
command stays with argparse. ``a67 --help`` lists these too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

COMPLETE_VAR = "_A67_COMPLETE"
"""Set by the shell completion scripts (``a67 completion bash``)."""

CLIENT_COMMANDS: dict[str, str] = {
    "register": "create an account and sign in (the password is hashed before it leaves)",
    "login": "sign in to a controller",
    "logout": "end the session and forget its tokens",
    "whoami": "show who is signed in, and where",
    "auth": "multi-factor sign-in (auth mfa …) and the audit log of your secrets (auth audit)",
    "nodes": "list, show, drain, undrain, remove and enroll nodes",
    "deploy": "deploy an app directory (a67.toml) and follow the rollout",
    "apps": "list, show, scale, update, roll back and remove apps",
    "logs": "an app's output: the last lines, -f to follow",
    "db": "create databases, apply schema, run SQL",
    "files": "list, upload, download, show and remove your stored files",
    "metrics": "the fleet's metrics (--watch: live)",
    "alerts": "alerts (recovery freezes, failed rollouts); unfreeze recovery",
    "vault": "master keys (operators): status, rotate, retire",
    "completion": "print a shell completion script",
}


def wants_client(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (without the program name) is a user CLI command."""
    return bool(argv and argv[0] in CLIENT_COMMANDS) or COMPLETE_VAR in os.environ


def add_client_parsers(subparsers: Any) -> None:
    """List the user commands in ``a67 --help`` (they are parsed by Click, not here)."""
    for name, summary in CLIENT_COMMANDS.items():
        subparsers.add_parser(name, help=summary, add_help=False)


def run_client(argv: Sequence[str]) -> int:
    from controller.client.main import main

    return main(argv)
