"""``a67 ingress``: run one ingress Envoy driven by a running controller over xDS.

Several may run against one controller (each on its own listen address); ``a67 up``
starts one beside the REST gateway.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from controller.gateway.process import ProcessError, connect_host
from controller.ingress.bootstrap import (
    IngressConfigError,
    IngressProcess,
    IngressSettings,
    render,
    write_config,
)

INGRESS_READY_TIMEOUT = 30.0
"""Seconds an ingress may take to get its listener from the controller."""


def add_ingress_flags(parser: argparse.ArgumentParser, *, listen_flag: str) -> None:
    parser.add_argument(
        listen_flag,
        dest="ingress_listen",
        metavar="HOST:PORT",
        help="where the ingress serves app traffic (A67_INGRESS_LISTEN_ADDRESS; default 127.0.0.1:8081)",
    )


def ingress_settings(args: argparse.Namespace, **overrides: Any) -> IngressSettings:
    values: dict[str, Any] = {
        "listen_address": getattr(args, "ingress_listen", None),
        "xds_address": getattr(args, "xds", None),
        "admin_address": getattr(args, "ingress_admin", None),
        "node_id": getattr(args, "node_id", None),
        "concurrency": getattr(args, "ingress_concurrency", None),
        "log_level": getattr(args, "ingress_log_level", None),
    }
    values.update(overrides)
    return IngressSettings.from_env(**values)


def add_ingress_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "ingress",
        help="run an ingress Envoy for app traffic, configured by the controller over xDS",
        description="Run Envoy with a bootstrap that names only the controller's xDS address; "
        "listeners, routes, clusters and endpoints come from the controller. SIGINT/SIGTERM stop it.",
    )
    add_ingress_flags(parser, listen_flag="--listen")
    parser.add_argument(
        "--xds",
        metavar="HOST:PORT",
        help="the controller's xDS address (A67_INGRESS_XDS_ADDRESS; default 127.0.0.1:50053)",
    )
    parser.add_argument(
        "--admin", dest="ingress_admin", metavar="HOST:PORT", help="Envoy's admin interface (loopback only)"
    )
    parser.add_argument("--node-id", help="this Envoy's xDS node id (default a67-ingress-<host>-<port>)")
    parser.add_argument("--concurrency", dest="ingress_concurrency", type=int, help="Envoy worker threads")
    parser.add_argument(
        "--envoy-log-level", dest="ingress_log_level", help="Envoy's log level (default warning)"
    )
    parser.add_argument("--print-config", action="store_true", help="print the bootstrap and exit")
    parser.set_defaults(func=run_ingress)
    return parser


def run_ingress(args: argparse.Namespace) -> int:
    from controller.gateway.cli import _fail, _run

    try:
        settings = ingress_settings(args)
        if args.print_config:
            sys.stdout.write(render(settings))
            return 0
        with tempfile.TemporaryDirectory(prefix="a67-ingress-") as tmp:
            config = write_config(settings, Path(tmp) / "ingress.yaml")
            host, port = settings.listen
            banner = (
                f"a67 ingress: apps on http://{connect_host(host)}:{port} "
                f"(node {settings.effective_node_id}) <- xDS {settings.xds_address}"
            )
            return _run([IngressProcess(config, settings)], [INGRESS_READY_TIMEOUT], banner)
    except (ValueError, IngressConfigError, ProcessError) as exc:
        return _fail(str(exc))
