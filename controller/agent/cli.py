"""``a67 agent``: run the reference node agent.

::

    A67_AGENT_TOKEN=… a67 agent --controller HOST:PORT [--provider P] [--region R] ...
    a67 agent --controller HOST:PORT --token-file FILE ...
    printf '%s\n' "$OAUTH" | a67 agent --oauth-token-stdin --controller HOST:PORT --token-file FILE ...

The first start enrolls the node (the token is needed only then); later starts
resume as the same node from the data directory. SIGTERM and SIGINT close the
stream cleanly and exit 0. The controller wires this in with
:func:`add_agent_parser`.

Secrets never travel on the command line (``/proc/<pid>/cmdline`` is readable by every
process on the machine, replicas included): the enrollment token comes from
``A67_AGENT_TOKEN`` or ``--token-file``, the shard PostgreSQL URL from
``A67_AGENT_SHARD_POSTGRES_URL`` (or ``A67_SHARD_POSTGRES_URL``) or
``--shard-postgres-url-file``, the provider OAuth token from standard input
(``--oauth-token-stdin``, one line: the recommended way, it touches neither the
environment nor the command line) or, for compatibility, ``A67_AGENT_OAUTH_TOKEN``.
``--token`` is refused, and so is a ``--shard-postgres-url`` with a password. Secrets in
the environment are taken out of it first thing, for good: from ``os.environ`` and from
the original environment block that ``/proc/<pid>/environ`` would otherwise show for the
life of the process (:func:`~controller.agent.hardening.wipe_environment`). Then the agent
makes itself non-dumpable (:mod:`controller.agent.hardening`). None is ever logged.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from controller.agent.agent_run import run_agent
from controller.agent.chunks import DEFAULT_SCRUB_INTERVAL_SECONDS
from controller.agent.client import (
    DEFAULT_PROVIDER,
    PROVIDERS,
    AgentConfig,
    default_endpoint,
    detect_provider,
    provider_value,
)
from controller.agent.hardening import (
    DEFAULT_REPLICA_UIDS,
    default_replica_root,
    detach_stdin,
    ensure_traversable,
    make_undumpable,
    reachable_python,
    read_secret_file,
    read_secret_stdin,
    secure_data_dir,
    unreachable_ancestor,
    url_has_password,
    wipe_environment,
)
from controller.agent.identity import DEFAULT_DATA_DIR
from controller.agent.metrics import NODE_TYPES
from controller.agent.replicas import DEFAULT_PORT_RANGE

log = logging.getLogger("controller.agent")

# The names of environment variables, not secrets:
TOKEN_ENV = "A67_AGENT_TOKEN"  # noqa: S105
OAUTH_TOKEN_ENV = "A67_AGENT_OAUTH_TOKEN"  # noqa: S105
DATA_DIR_ENV = "A67_AGENT_DATA_DIR"
PROVIDER_ENV = "A67_AGENT_PROVIDER"
ADVERTISE_HOST_ENV = "A67_AGENT_ADVERTISE_HOST"
PORT_RANGE_ENV = "A67_AGENT_REPLICA_PORT_RANGE"
SHARD_URL_ENVS = ("A67_AGENT_SHARD_POSTGRES_URL", "A67_SHARD_POSTGRES_URL")
REPLICA_UIDS_ENV = "A67_AGENT_REPLICA_UIDS"
REPLICA_ROOT_ENV = "A67_AGENT_REPLICA_ROOT"
SECRET_ENVS = (TOKEN_ENV, OAUTH_TOKEN_ENV, *SHARD_URL_ENVS)
"""Taken out of the agent's environment (and its ``/proc/<pid>/environ``) at start."""


class SecretOnCommandLine(ValueError):
    """A secret was given as a flag: refused (the agent exits with code 2)."""

    @property
    def message(self) -> str:
        return str(self)


def _node_types(text: str) -> tuple[str, ...]:
    types = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    unknown = [t for t in types if t not in NODE_TYPES]
    if not types or unknown:
        raise argparse.ArgumentTypeError(
            f"node types must be a comma-separated list of {', '.join(NODE_TYPES)} (got {text!r})"
        )
    return types


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _port_range(text: str) -> tuple[int, int]:
    low_text, sep, high_text = text.strip().partition("-")
    try:
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be LOW-HIGH, like 20000-29999 (got {text!r})") from None
    if not sep or not 1 <= low <= high <= 65535:
        raise argparse.ArgumentTypeError(f"must be LOW-HIGH within 1-65535, like 20000-29999 (got {text!r})")
    return low, high


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def add_agent_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``agent`` subcommand to ``subparsers`` (from ``add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "agent",
        help="run the reference node agent",
        description=(
            "Enroll this machine as an Automator67 node (once), then hold its stream to the "
            "controller: heartbeats with the machine's real metrics up, commands down."
        ),
    )
    parser.add_argument(
        "--controller",
        metavar="HOST:PORT",
        default="",
        help="the controller's user-facing gRPC address, used to enroll (needed on the first start)",
    )
    parser.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused: see run_agent_command
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"file holding the node enrollment token, needed on the first start only (or set {TOKEN_ENV}; "
        "never on the command line)",
    )
    parser.add_argument(
        "--oauth-token-stdin",
        action="store_true",
        help="read the node's provider OAuth token, sent when it enrolls, from one line of standard "
        "input (asked for without echo on a terminal). Recommended: the token then never touches the "
        f"environment or the command line ({OAUTH_TOKEN_ENV} still works, and is wiped at start)",
    )
    parser.add_argument(
        "--provider",
        choices=sorted(PROVIDERS),
        default=None,
        help=(
            f"the provider this node runs on (default: ${PROVIDER_ENV}, else detected from the "
            f"platform's environment, else {DEFAULT_PROVIDER})"
        ),
    )
    parser.add_argument(
        "--endpoint", default=None, help="where this node serves (default http://<hostname>:8080)"
    )
    parser.add_argument("--region", default="local", help="the node's region (default: local)")
    parser.add_argument(
        "--bandwidth-mbps", type=_positive_float, default=100.0, help="declared bandwidth (default 100)"
    )
    parser.add_argument(
        "--max-concurrent",
        type=_positive_int,
        default=100,
        help="declared max concurrent requests (default 100)",
    )
    parser.add_argument(
        "--node-types",
        type=_node_types,
        default=("compute",),
        help=f"comma-separated subset of {','.join(NODE_TYPES)} (default compute)",
    )
    parser.add_argument(
        "--controller-tls-ca",
        type=Path,
        default=None,
        metavar="FILE",
        help="PEM CA certificate to verify the controller's user-facing port over TLS (default: plaintext)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"where the key, certificates and node.json live (default ${DATA_DIR_ENV} or {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--shard-postgres-url",
        default="",
        help="serve database shards from this PostgreSQL database, one schema per shard "
        f"(default: SQLite files in the data dir). A URL with a password is refused here: "
        f"set {SHARD_URL_ENVS[0]} or use --shard-postgres-url-file",
    )
    parser.add_argument(
        "--shard-postgres-url-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="file holding the shard PostgreSQL URL (may carry a password)",
    )
    parser.add_argument(
        "--replica-uids",
        default=os.environ.get(REPLICA_UIDS_ENV, "auto"),
        metavar="LOW-HIGH|auto|off",
        help="user ids replicas run as, one per replica (auto: "
        f"{DEFAULT_REPLICA_UIDS[0]}-{DEFAULT_REPLICA_UIDS[1]} when the agent runs as root, else off; "
        f"needs root; env {REPLICA_UIDS_ENV})",
    )
    parser.add_argument(
        "--replica-root",
        type=Path,
        default=os.environ.get(REPLICA_ROOT_ENV) or None,
        metavar="DIR",
        help="where replicas' directories live (default <data dir>/replicas, or with replica users "
        f"/var/lib/automator67-agent/replicas/<id of the data dir>; env {REPLICA_ROOT_ENV})",
    )
    parser.add_argument(
        "--advertise-host",
        default=os.environ.get(ADVERTISE_HOST_ENV, "127.0.0.1"),
        help="the host name or address in replica endpoints (http://HOST:PORT), as clients reach "
        f"this machine (default 127.0.0.1; env {ADVERTISE_HOST_ENV})",
    )
    parser.add_argument(
        "--replica-port-range",
        type=_port_range,
        default=os.environ.get(PORT_RANGE_ENV, "{}-{}".format(*DEFAULT_PORT_RANGE)),
        metavar="LOW-HIGH",
        help="ports handed to replicas when the controller names none "
        f"(default {DEFAULT_PORT_RANGE[0]}-{DEFAULT_PORT_RANGE[1]}; env {PORT_RANGE_ENV})",
    )
    parser.add_argument(
        "--scrub-interval",
        type=_positive_float,
        default=DEFAULT_SCRUB_INTERVAL_SECONDS,
        help="storage nodes: seconds between checks of every stored chunk's checksum (default 3600)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.set_defaults(func=run_agent_command)
    return parser


def _resolve_provider(flag: str | None) -> tuple[str, str]:
    """The provider name and where it came from."""
    if flag:
        return flag, "--provider"
    if os.environ.get(PROVIDER_ENV):
        return os.environ[PROVIDER_ENV], PROVIDER_ENV
    detected = detect_provider()
    if detected:
        return detected, "the platform's environment"
    return DEFAULT_PROVIDER, "the default"


def config_from_args(
    args: argparse.Namespace,
    *,
    secrets: Mapping[str, str] | None = None,
    oauth_token: str | None = None,
) -> AgentConfig:
    """The agent's configuration from parsed flags and the environment. ``secrets``: the
    values of :data:`SECRET_ENVS` (default: ``os.environ``), as taken before the
    environment was wiped; ``oauth_token``: the one read from standard input, if any."""
    secrets = os.environ if secrets is None else secrets
    provider, _ = _resolve_provider(args.provider)
    data_dir = args.data_dir or Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)
    token = secrets.get(TOKEN_ENV, "")
    if getattr(args, "token_file", None):
        token = read_secret_file(args.token_file)
    return AgentConfig(
        controller=args.controller,
        token=token,
        provider=provider_value(provider),
        endpoint=args.endpoint or default_endpoint(),
        region=args.region,
        data_dir=data_dir.expanduser(),
        bandwidth_mbps=args.bandwidth_mbps,
        max_concurrent_requests=args.max_concurrent,
        node_types=tuple(args.node_types),
        controller_tls_ca=args.controller_tls_ca,
        oauth_token=secrets.get(OAUTH_TOKEN_ENV, "") if oauth_token is None else oauth_token,
    )


def shard_postgres_url_from_args(args: argparse.Namespace, secrets: Mapping[str, str] | None = None) -> str:
    """The shard PostgreSQL URL: from ``--shard-postgres-url-file``, the environment
    (``secrets``, default ``os.environ``), or (without a password only)
    ``--shard-postgres-url``. Raises :class:`SecretOnCommandLine`."""
    secrets = os.environ if secrets is None else secrets
    flag = str(getattr(args, "shard_postgres_url", "") or "")
    if flag and url_has_password(flag):
        raise SecretOnCommandLine(
            "--shard-postgres-url carries a password, which every process on this machine could read "
            f"in the agent's command line: set {SHARD_URL_ENVS[0]} or use --shard-postgres-url-file"
        )
    path = getattr(args, "shard_postgres_url_file", None)
    if path:
        return read_secret_file(path)
    from_env = next((secrets[name] for name in SHARD_URL_ENVS if secrets.get(name)), "")
    return flag or from_env


def replica_uids_from_args(text: str, is_root: bool) -> tuple[int, int] | None:
    """The replica user id range of ``--replica-uids``; None for off. ``ValueError`` if bad."""
    text = text.strip().lower()
    if text == "off":
        return None
    if text == "auto":
        return DEFAULT_REPLICA_UIDS if is_root else None
    if not is_root:
        raise ValueError("--replica-uids needs the agent to run as root (or auto/off)")
    low, high = _port_range_like(text)
    return low, high


def _port_range_like(text: str) -> tuple[int, int]:
    low_text, sep, high_text = text.partition("-")
    try:
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise ValueError(f"--replica-uids must be LOW-HIGH, auto or off (got {text!r})") from None
    if not sep or not 1000 <= low <= high < 2**32 - 1:
        raise ValueError(f"--replica-uids must be LOW-HIGH with 1000 <= LOW <= HIGH (got {text!r})")
    return low, high


def take_secret_environment() -> dict[str, str]:
    """The values of :data:`SECRET_ENVS` that are set, taken out of the environment for good
    (:func:`~controller.agent.hardening.wipe_environment`: ``/proc/<pid>/environ`` included)."""
    secrets = {name: os.environ[name] for name in SECRET_ENVS if os.environ.get(name)}
    wipe_environment(SECRET_ENVS)
    return secrets


def read_oauth_token_stdin() -> str:
    """``--oauth-token-stdin``: one line of standard input (``ValueError`` if there is none);
    standard input is then detached, so nothing the agent starts inherits the pipe."""
    try:
        token = read_secret_stdin(prompt="provider OAuth token: ")
    finally:
        detach_stdin()
    if not token:
        raise ValueError("standard input held no token (one line is expected)")
    return token


def run_agent_command(args: argparse.Namespace) -> int:
    """The ``func`` of ``a67 agent``: configure logging, run the agent, return its exit code."""
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    secrets = take_secret_environment()  # first: the less time in /proc/<pid>/environ, the better
    if args.token:
        log.error(
            "--token is refused: every process on this machine (replicas included) could read it in "
            "the agent's command line; set %s or use --token-file",
            TOKEN_ENV,
        )
        return 2
    oauth_token: str | None = None
    if args.oauth_token_stdin:
        if OAUTH_TOKEN_ENV in secrets:
            log.warning("%s is ignored: --oauth-token-stdin is given", OAUTH_TOKEN_ENV)
        try:
            oauth_token = read_oauth_token_stdin()
        except (OSError, ValueError) as exc:
            log.error("--oauth-token-stdin: %s", exc)
            return 2
    elif OAUTH_TOKEN_ENV in secrets:
        log.info(
            "the provider OAuth token came from %s, now wiped from the environment; "
            "--oauth-token-stdin keeps it out of the environment altogether",
            OAUTH_TOKEN_ENV,
        )
    try:
        config = config_from_args(args, secrets=secrets, oauth_token=oauth_token)
        shard_postgres_url = shard_postgres_url_from_args(args, secrets)
    except SecretOnCommandLine as exc:
        log.error("%s", exc.message)
        return 2
    except OSError as exc:
        log.error("cannot read a secret file: %s", exc)
        return 2
    if make_undumpable():
        log.info("the agent is not dumpable: its /proc entries are closed to its replicas")
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    try:
        replica_uids = replica_uids_from_args(str(args.replica_uids), is_root)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    replica_root = args.replica_root or default_replica_root(config.data_dir, replica_uids is not None)
    replica_python = sys.executable
    if replica_uids is None:
        if is_root:
            log.warning("replicas run as root (--replica-uids off): they can read the agent's key")
        else:
            log.warning(
                "the agent does not run as root: its replicas run as its own user and could read "
                "its key file %s; run it as root (replicas then get users of their own) or as a "
                "dedicated user",
                config.data_dir,
            )
    else:
        secure_data_dir(config.data_dir)
        ensure_traversable(replica_root)
        blocked = unreachable_ancestor(replica_root)
        if blocked is not None:
            log.error(
                "replica users cannot reach %s (%s is closed to others): choose another --replica-root",
                replica_root,
                blocked,
            )
            return 2
        found = reachable_python(sys.executable)
        if found is None:
            log.warning("no Python that replica users can run: python replicas will fail to start")
        elif found != sys.executable:
            log.warning("replica users cannot run %s: python replicas use %s", sys.executable, found)
            replica_python = found
        log.info("replicas run as users %d-%d under %s", *replica_uids, replica_root)
    provider, source = _resolve_provider(args.provider)
    log.info("provider %s (from %s)", provider, source)
    return asyncio.run(
        run_agent(
            config,
            shard_postgres_url=shard_postgres_url,
            advertise_host=args.advertise_host,
            replica_port_range=args.replica_port_range,
            replica_uids=replica_uids,
            replica_root=replica_root,
            replica_python=replica_python,
            scrub_interval_seconds=args.scrub_interval,
        )
    )
