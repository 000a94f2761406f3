"""``a67 agent``: run the reference node agent.

::

    a67 agent --controller HOST:PORT --token TOKEN [--provider P] [--region R] ...

The first start enrolls the node (the token is needed only then); later starts
resume as the same node from the data directory. SIGTERM and SIGINT close the
stream cleanly and exit 0. The controller wires this in with
:func:`add_agent_parser`.

Secrets: the enrollment token may come from ``A67_AGENT_TOKEN`` instead of the flag
(flags are visible in ``ps``); the provider OAuth token comes only from
``A67_AGENT_OAUTH_TOKEN``. Neither is ever logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from controller.agent.client import (
    DEFAULT_PROVIDER,
    PROVIDERS,
    Agent,
    AgentConfig,
    default_endpoint,
    detect_provider,
    provider_value,
)
from controller.agent.handlers import CommandHandlers
from controller.agent.identity import DEFAULT_DATA_DIR
from controller.agent.metrics import NODE_TYPES
from controller.agent.replicas import DEFAULT_PORT_RANGE, ReplicaSupervisor, register_replica_handlers
from controller.agent.shards import ShardStore, register_shard_handlers

log = logging.getLogger("controller.agent")

# The names of environment variables, not secrets:
TOKEN_ENV = "A67_AGENT_TOKEN"  # noqa: S105
OAUTH_TOKEN_ENV = "A67_AGENT_OAUTH_TOKEN"  # noqa: S105
DATA_DIR_ENV = "A67_AGENT_DATA_DIR"
PROVIDER_ENV = "A67_AGENT_PROVIDER"
ADVERTISE_HOST_ENV = "A67_AGENT_ADVERTISE_HOST"
PORT_RANGE_ENV = "A67_AGENT_REPLICA_PORT_RANGE"


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
    parser.add_argument(
        "--token",
        default=None,
        help=f"node enrollment token, needed on the first start only (or set {TOKEN_ENV})",
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
        default=os.environ.get("A67_AGENT_SHARD_POSTGRES_URL", ""),
        help="serve database shards from this PostgreSQL database, one schema per shard "
        "(default: SQLite files in the data dir; env A67_AGENT_SHARD_POSTGRES_URL)",
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


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The agent's configuration from parsed flags and the environment."""
    provider, _ = _resolve_provider(args.provider)
    data_dir = args.data_dir or Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)
    return AgentConfig(
        controller=args.controller,
        token=args.token or os.environ.get(TOKEN_ENV, ""),
        provider=provider_value(provider),
        endpoint=args.endpoint or default_endpoint(),
        region=args.region,
        data_dir=data_dir.expanduser(),
        bandwidth_mbps=args.bandwidth_mbps,
        max_concurrent_requests=args.max_concurrent,
        node_types=tuple(args.node_types),
        controller_tls_ca=args.controller_tls_ca,
        oauth_token=os.environ.get(OAUTH_TOKEN_ENV, ""),
    )


async def run_agent(
    config: AgentConfig,
    *,
    shard_postgres_url: str = "",
    advertise_host: str = "127.0.0.1",
    replica_port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
) -> int:
    """Run an :class:`Agent` until SIGTERM or SIGINT; its exit code.

    Replicas (``deploy_replica``/``stop_replica``) are run by a :class:`ReplicaSupervisor`
    whose states ride every hello and heartbeat; on the way out every replica is stopped.
    """
    handlers = CommandHandlers()
    shards = ShardStore(config.data_dir, shard_postgres_url)
    register_shard_handlers(handlers, shards)
    supervisor = ReplicaSupervisor(
        config.data_dir, advertise_host=advertise_host, port_range=replica_port_range
    )
    await asyncio.to_thread(supervisor.reap_orphans)
    register_replica_handlers(handlers, supervisor)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        return await Agent(config, handlers=handlers, replicas=supervisor.states).run(stop)
    finally:
        await supervisor.close()
        await shards.close()
        for sig in installed:
            loop.remove_signal_handler(sig)


def run_agent_command(args: argparse.Namespace) -> int:
    """The ``func`` of ``a67 agent``: configure logging, run the agent, return its exit code."""
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = config_from_args(args)
    provider, source = _resolve_provider(args.provider)
    log.info("provider %s (from %s)", provider, source)
    return asyncio.run(
        run_agent(
            config,
            shard_postgres_url=args.shard_postgres_url,
            advertise_host=args.advertise_host,
            replica_port_range=args.replica_port_range,
        )
    )
