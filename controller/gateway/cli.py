"""``a67 gateway`` and ``a67 up``.

::

    a67 gateway    render the Envoy configuration and run Envoy in the foreground
    a67 up         run the controller and the gateway together on embedded defaults

``controller/cli.py`` adds both with :func:`add_gateway_parser` and
:func:`add_up_parser`; each sets ``func`` to a function of the parsed
namespace that returns the exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

from controller.gateway.config import (
    STREAM_FORMATS,
    GatewaySettings,
    controller_receive_limit,
    split_host_port,
)
from controller.gateway.process import (
    ControllerProcess,
    EnvoyProcess,
    ManagedProcess,
    ProcessError,
    connect_host,
    stop_signals,
    supervise,
)
from controller.gateway.render import GatewayConfigError, render, validate, write_config
from controller.ingress.bootstrap import IngressConfigError

CONTROLLER_READY_TIMEOUT = 60.0
"""Seconds the controller may take to start (store migration, key generation)."""

GATEWAY_READY_TIMEOUT = 30.0


def _add_gateway_flags(parser: argparse.ArgumentParser, *, listen_flag: str, upstream: bool) -> None:
    parser.add_argument(
        listen_flag,
        dest="http_listen",
        metavar="HOST:PORT",
        help="where Envoy serves REST (A67_GATEWAY_LISTEN_ADDRESS; default 127.0.0.1:8080)",
    )
    if upstream:
        parser.add_argument(
            "--upstream",
            metavar="HOST:PORT",
            help="the controller's gRPC address (A67_GATEWAY_UPSTREAM_ADDRESS; default 127.0.0.1:50051)",
        )
    parser.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="dashboard origin browsers may call from, e.g. https://dash.example.com; repeatable "
        "(A67_GATEWAY_CORS_ALLOWED_ORIGINS, comma-separated; default http://localhost:3000)",
    )
    parser.add_argument(
        "--descriptor", type=Path, help="descriptor set (A67_GATEWAY_DESCRIPTOR_PATH; default generated/)"
    )
    parser.add_argument(
        "--max-request-body-size",
        type=int,
        metavar="BYTES",
        help="larger request bodies get 413, chunked or not (A67_GATEWAY_MAX_REQUEST_BODY_SIZE; "
        "default 16 MiB = 16777216)",
    )
    parser.add_argument(
        "--stream-format", choices=STREAM_FORMATS, help="how watch streams reach browsers (default ndjson)"
    )
    parser.add_argument(
        "--admin", metavar="HOST:PORT", help="enable Envoy's admin interface on a loopback address"
    )
    parser.add_argument("--concurrency", type=int, help="Envoy worker threads (default: one per CPU)")
    parser.add_argument("--envoy-log-level", help="Envoy's log level (default warning)")
    parser.add_argument(
        "--tls-cert",
        metavar="PEM",
        help="certificate (chain) to serve HTTPS only with (A67_TLS_CERT; needs --tls-key)"
        + ("" if upstream else "; the controller's gRPC port serves TLS with it too"),
    )
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert (A67_TLS_KEY)")
    if upstream:
        parser.add_argument(
            "--upstream-tls-ca",
            metavar="PEM",
            help="CA bundle that verifies the controller's certificate; set, Envoy calls the "
            "controller over TLS (A67_GATEWAY_UPSTREAM_TLS_CA)",
        )
        parser.add_argument(
            "--upstream-tls-server-name",
            metavar="NAME",
            help="name the controller's certificate must carry (A67_GATEWAY_UPSTREAM_TLS_SERVER_NAME; "
            "default: the upstream host)",
        )


def _gateway_settings(args: argparse.Namespace, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = dict(
        listen_address=args.http_listen,
        upstream_address=getattr(args, "upstream", None),
        cors_allowed_origins=tuple(args.cors_origin) if args.cors_origin else None,
        descriptor_path=args.descriptor,
        max_request_body_size=args.max_request_body_size,
        stream_format=args.stream_format,
        admin_address=args.admin,
        concurrency=args.concurrency,
        log_level=args.envoy_log_level,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        upstream_tls_ca=getattr(args, "upstream_tls_ca", None),
        upstream_tls_server_name=getattr(args, "upstream_tls_server_name", None),
    )
    values.update(overrides)
    return GatewaySettings.from_env(**values)


def _fail(message: str) -> int:
    print(f"a67: {message}", file=sys.stderr)
    return 1


def _run(processes: list[ManagedProcess], ready_timeouts: list[float], banner: str) -> int:
    """Start ``processes`` in order, each once the previous one is ready; supervise until a signal."""
    with stop_signals() as stop:
        try:
            for process, timeout in zip(processes, ready_timeouts, strict=True):
                process.start()
                process.wait_ready(timeout, cancel=stop)
        except ProcessError as exc:
            for process in reversed(processes):
                process.stop()
            return 0 if stop.is_set() else _fail(str(exc))
        print(banner, flush=True)
        return supervise(processes, stop)


# -- a67 gateway ----------------------------------------------------------


def add_gateway_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``a67 gateway`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gateway",
        help="run the REST gateway (Envoy) in front of a running controller",
        description="Render gateway/envoy.yaml.tmpl with these settings and run Envoy in the foreground. "
        "SIGINT/SIGTERM stop it.",
    )
    _add_gateway_flags(parser, listen_flag="--listen", upstream=True)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--print-config", action="store_true", help="print the rendered configuration and exit")
    what.add_argument("--check", action="store_true", help="have Envoy validate the configuration and exit")
    parser.add_argument(
        "--config-out",
        type=Path,
        metavar="FILE",
        help="keep the rendered configuration here (default: a temp file)",
    )
    parser.set_defaults(func=run_gateway)
    return parser


def run_gateway(args: argparse.Namespace) -> int:
    try:
        settings = _gateway_settings(args)
        if args.print_config:
            sys.stdout.write(render(settings))
            return 0
        with tempfile.TemporaryDirectory(prefix="a67-gateway-") as tmp:
            config = write_config(settings, args.config_out or Path(tmp) / "envoy.yaml")
            if args.check:
                validate(config)
                print(f"a67: {config} is a valid Envoy configuration")
                return 0
            host, port = settings.listen
            scheme = "https" if settings.tls else "http"
            upstream = (
                f"{'TLS' if settings.upstream_tls_ca else 'plaintext'} gRPC {settings.upstream_address}"
            )
            banner = f"a67 gateway: REST on {scheme}://{connect_host(host)}:{port} -> {upstream}"
            return _run([EnvoyProcess(config, settings)], [GATEWAY_READY_TIMEOUT], banner)
    except (ValueError, GatewayConfigError, ProcessError) as exc:
        return _fail(str(exc))


# -- a67 up ---------------------------------------------------------------


def add_up_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``a67 up`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "up",
        help="run the controller and the REST gateway together (embedded defaults)",
        description="Start the controller (a67 serve) and the gateway (Envoy), wait until both serve, "
        "print their addresses and run until SIGINT/SIGTERM, which stops both.",
    )
    parser.add_argument(
        "--grpc-listen",
        metavar="HOST:PORT",
        help="the controller's gRPC address (A67_LISTEN_ADDRESS; default 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--node-listen",
        metavar="HOST:PORT",
        help="the controller's mutual-TLS node port (A67_NODE_LISTEN_ADDRESS; default 127.0.0.1:50052)",
    )
    parser.add_argument("--data-dir", type=Path, help="controller data directory (A67_DATA_DIR)")
    parser.add_argument("--store-url", help="SQLAlchemy URL of the store (A67_STORE_URL; default SQLite)")
    parser.add_argument("--cache-url", help="memory:// or redis://host:port/db (A67_CACHE_URL)")
    parser.add_argument("--log-level", help="the controller's logging level (A67_LOG_LEVEL)")
    parser.add_argument(
        "--environment",
        choices=("development", "production"),
        help="(A67_ENVIRONMENT) production refuses non-loopback addresses without TLS",
    )
    _add_gateway_flags(parser, listen_flag="--http-listen", upstream=False)
    parser.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA bundle that verifies --tls-cert, for the gateway's calls to the controller "
        "(A67_TLS_CA; default: the certificate itself, right for a self-signed one)",
    )
    from controller.ingress.cli import add_ingress_flags

    add_ingress_flags(parser, listen_flag="--ingress-listen")
    parser.add_argument(
        "--xds-listen",
        metavar="HOST:PORT",
        help="the controller's xDS port for ingresses (A67_XDS_LISTEN_ADDRESS; default 127.0.0.1:50053; "
        "empty: no ingress)",
    )
    parser.set_defaults(func=run_up)
    return parser


def run_up(args: argparse.Namespace) -> int:
    from controller.config import Settings

    try:
        controller_settings = Settings.from_env(
            listen_address=args.grpc_listen,
            node_listen_address=args.node_listen,
            data_dir=args.data_dir,
            store_url=args.store_url,
            cache_url=args.cache_url,
            log_level=args.log_level,
            environment=args.environment,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_ca=args.tls_ca,
            xds_listen_address=args.xds_listen,
        )
        upstream_ca, server_name = "", ""
        if controller_settings.tls:
            upstream_ca = controller_settings.tls_ca or controller_settings.tls_cert
            server_name = certificate_name(
                Path(controller_settings.tls_cert),
                connect_host(split_host_port(controller_settings.listen_address)[0]),
            )
        settings = _gateway_settings(
            args,
            upstream_address=controller_settings.listen_address,
            environment=controller_settings.environment,
            tls_cert=controller_settings.tls_cert,
            tls_key=controller_settings.tls_key,
            upstream_tls_ca=upstream_ca,
            upstream_tls_server_name=server_name,
        )
        # Every body the gateway lets through must fit the controller's receive limit.
        receive_limit = max(
            controller_settings.max_receive_message_bytes,
            controller_receive_limit(settings.max_request_body_size),
        )
        extra: list[str] = ["--max-receive-message-size", str(receive_limit)]
        for flag, value in (
            ("--store-url", args.store_url),
            ("--cache-url", args.cache_url),
            ("--log-level", args.log_level),
            ("--environment", args.environment),
            ("--tls-cert", controller_settings.tls_cert),
            ("--tls-key", controller_settings.tls_key),
        ):
            if value:
                extra += [flag, value]
        from controller.ingress.bootstrap import IngressProcess
        from controller.ingress.cli import INGRESS_READY_TIMEOUT, ingress_settings

        ingress = None
        if controller_settings.xds_listen_address:
            ingress = ingress_settings(args, xds_address=controller_settings.xds_listen_address)
            ingress_host, ingress_port = ingress.listen
            ingress_url = f"http://{connect_host(ingress_host)}:{ingress_port}"
            extra += ["--xds-listen", controller_settings.xds_listen_address, "--ingress-url", ingress_url]
        controller = ControllerProcess(
            controller_settings.listen_address,
            controller_settings.data_dir,
            node_listen_address=controller_settings.node_listen_address,
            extra_args=extra,
            tls_ca=Path(upstream_ca).read_bytes() if upstream_ca else None,
            tls_server_name=server_name,
        )
        with tempfile.TemporaryDirectory(prefix="a67-gateway-") as tmp:
            envoy = EnvoyProcess(write_config(settings, Path(tmp) / "envoy.yaml"), settings)
            processes: list[ManagedProcess] = [controller, envoy]
            timeouts = [CONTROLLER_READY_TIMEOUT, GATEWAY_READY_TIMEOUT]
            apps_line = "  apps  off   (no xDS port)"
            if ingress is not None:
                from controller.ingress import bootstrap

                processes.append(
                    IngressProcess(bootstrap.write_config(ingress, Path(tmp) / "ingress.yaml"), ingress)
                )
                timeouts.append(INGRESS_READY_TIMEOUT)
                apps_line = (
                    f"  apps  {ingress_url}   (ingress: Host <app>.<handle>.{controller_settings.apps_domain}, "
                    f"or /apps/<deployment id>/)"
                )
            http_host, http_port = settings.listen
            scheme = "https" if settings.tls else "http"
            grpcurl = f"grpcurl -cacert {upstream_ca}" if upstream_ca else "grpcurl -plaintext"
            banner = "\n".join(
                (
                    "Automator67 is up.",
                    f"  REST  {scheme}://{connect_host(http_host)}:{http_port}   (dashboard, curl)",
                    f"  gRPC  {controller_settings.listen_address}   ({grpcurl}, the a67 command line)",
                    f"  nodes {controller_settings.node_listen_address or 'off'}   (agents, mutual TLS)",
                    apps_line,
                    f"  data  {controller_settings.data_dir}",
                    "Press Ctrl-C to stop.",
                )
            )
            return _run(processes, timeouts, banner)
    except (ValueError, GatewayConfigError, ProcessError, IngressConfigError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot read {exc.filename}: {exc.strerror}")


def certificate_name(cert_path: Path, host: str) -> str:
    """The name to expect in the certificate at ``cert_path`` when connecting to ``host``:
    ``host`` if the certificate names it (DNS or IP), else its first DNS name."""
    import ipaddress

    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"A67_TLS_CERT: {cert_path} is not a PEM certificate ({exc})") from None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError(f"A67_TLS_CERT: {cert_path} has no subject alternative names") from None
    dns_names = sans.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    if host in dns_names or host in ips:
        return host
    if dns_names:
        return dns_names[0]
    raise ValueError(
        f"A67_TLS_CERT: {cert_path} names neither {host} nor any DNS name, so the gateway cannot verify it"
    )


__all__ = ["add_gateway_parser", "add_up_parser", "run_gateway", "run_up"]
