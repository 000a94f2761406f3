"""The ``a67`` command line.

::

    a67 serve      run the controller (gRPC) on embedded defaults or the given settings
    a67 migrate    bring the store's schema up to date
    a67 agent      run the reference node agent (enrolls once, then streams heartbeats)
    a67 gateway    run Envoy: REST/JSON for the dashboard, transcoded to the controller's gRPC
    a67 up         the controller, the gateway and an ingress together, on embedded defaults
    a67 ingress    run an ingress Envoy for app traffic, configured by the controller over xDS

The commands for people (register, login, nodes, deploy, apps, db, metrics, …) are the
user CLI of :mod:`controller.client` (docs/cli.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from controller.config import Settings
from controller.errors import ControllerError

log = logging.getLogger("a67")


def _configure_logging(level: str) -> None:
    from controller.logging_setup import configure_logging

    configure_logging(level)


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", dest="listen_address", help="host:port of the gRPC port (A67_LISTEN_ADDRESS)"
    )
    parser.add_argument(
        "--node-listen",
        dest="node_listen_address",
        help="host:port of the node port, mutual TLS (A67_NODE_LISTEN_ADDRESS)",
    )
    parser.add_argument(
        "--heartbeat-interval",
        dest="heartbeat_interval_seconds",
        type=float,
        help="seconds between node heartbeats (A67_HEARTBEAT_INTERVAL_SECONDS)",
    )
    parser.add_argument("--data-dir", type=Path, help="data directory (A67_DATA_DIR)")
    parser.add_argument("--store-url", help="SQLAlchemy URL of the store (A67_STORE_URL)")
    parser.add_argument("--cache-url", help="memory:// or redis://host:port/db (A67_CACHE_URL)")
    parser.add_argument("--environment", choices=("development", "production"), help="(A67_ENVIRONMENT)")
    parser.add_argument("--log-level", help="logging level (A67_LOG_LEVEL)")
    parser.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="certificate of the gRPC port, which then serves TLS only (A67_TLS_CERT; needs --tls-key)",
    )
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert (A67_TLS_KEY)")
    parser.add_argument(
        "--max-receive-message-size",
        dest="max_receive_message_bytes",
        type=int,
        metavar="BYTES",
        help="largest gRPC request message (A67_MAX_RECEIVE_MESSAGE_BYTES; default 17 MiB: "
        "the gateway's 16 MiB body limit plus transcoding overhead)",
    )


def _add_ingress_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--xds-listen",
        dest="xds_listen_address",
        metavar="HOST:PORT",
        help="where ingress Envoys get their configuration (xDS) and send access logs "
        "(A67_XDS_LISTEN_ADDRESS; default 127.0.0.1:50053)",
    )
    parser.add_argument(
        "--apps-domain", help="apps answer on <name>.<user handle>.<domain> (A67_APPS_DOMAIN; apps.localhost)"
    )
    parser.add_argument(
        "--ingress-url",
        help="the ingress as users reach it, for app URLs (A67_INGRESS_URL; http://127.0.0.1:8081)",
    )


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        listen_address=args.listen_address,
        node_listen_address=args.node_listen_address,
        heartbeat_interval_seconds=args.heartbeat_interval_seconds,
        data_dir=args.data_dir,
        store_url=args.store_url,
        cache_url=args.cache_url,
        environment=args.environment,
        log_level=args.log_level,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        max_receive_message_bytes=args.max_receive_message_bytes,
        xds_listen_address=getattr(args, "xds_listen_address", None),
        apps_domain=getattr(args, "apps_domain", None),
        ingress_url=getattr(args, "ingress_url", None),
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from controller.server import serve

    settings = _settings(args)
    _configure_logging(settings.log_level)
    return asyncio.run(serve(settings))


def _cmd_migrate(args: argparse.Namespace) -> int:
    from controller.store.db import ensure_data_dir
    from controller.store.migrate import current_revision, upgrade

    settings = _settings(args)
    _configure_logging(settings.log_level)
    ensure_data_dir(settings.data_dir)
    url = settings.effective_store_url
    before = current_revision(url)
    upgrade(url)
    after = current_revision(url)
    print(f"store schema: {before or 'empty'} -> {after}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="a67", description="Automator67 controller")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the controller")
    _add_settings_flags(serve)
    _add_ingress_settings_flags(serve)
    serve.set_defaults(func=_cmd_serve)
    migrate = sub.add_parser("migrate", help="upgrade the store schema to the newest revision")
    _add_settings_flags(migrate)
    migrate.set_defaults(func=_cmd_migrate)
    from controller.agent.cli import add_agent_parser
    from controller.gateway.cli import add_gateway_parser, add_up_parser
    from controller.ingress.cli import add_ingress_parser

    add_agent_parser(sub)
    add_gateway_parser(sub)
    add_up_parser(sub)
    add_ingress_parser(sub)
    from controller.client.names import add_client_parsers

    add_client_parsers(sub)  # listed in --help; main() hands them to the user CLI
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from controller.client.names import run_client, wants_client

    if wants_client(argv := list(sys.argv[1:] if argv is None else argv)):
        return run_client(argv)  # register, login, nodes, deploy, apps, db, … (controller/client/)
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ControllerError as exc:
        print(f"a67: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"a67: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
