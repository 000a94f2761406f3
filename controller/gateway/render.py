"""Render the Envoy configuration template, and have Envoy validate the result.

>>> from controller.gateway.config import GatewaySettings, controller_receive_limit
>>> yaml_text = render(GatewaySettings(listen_address="127.0.0.1:9090"))
>>> "port_value: 9090" in yaml_text
True
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from string import Template

from google.protobuf import descriptor_pb2

from controller.gateway.config import GatewaySettings, controller_receive_limit
from controller.gateway.process import envoy_binary

API_PACKAGE = "automator67.v1"

# The transcoder's print option for each GatewaySettings.stream_format.
_STREAM_FORMAT_OPTIONS = {
    "ndjson": "stream_newline_delimited: true",
    "sse": "stream_sse_style_delimited: true",
}


DASHBOARD_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}
"""The Content-Type of each kind of dashboard file; a file of any other kind is refused."""

DASHBOARD_MAX_FILE_BYTES = 1024 * 1024
"""Largest dashboard file: Envoy holds each in memory and the route table's
``max_direct_response_body_size_bytes`` must admit it (Envoy's own default is 4 KiB)."""

DASHBOARD_CONFIG_PATH = "/config.json"
"""What the dashboard reads at start: the settings it needs from the gateway (the enroll
command's controller address). Rendered inline, never a file of the dashboard folder."""

DASHBOARD_SECURITY_HEADERS = {
    # Scripts and styles only from the gateway itself: no inline script, no eval, no CDN.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cache-control": "no-cache",
}
"""Headers of every dashboard response (the API's responses are left as they were)."""

_DASHBOARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class GatewayConfigError(Exception):
    """The settings, the descriptor set or the rendered configuration is unusable."""


def api_services(descriptor_path: Path, package: str = API_PACKAGE) -> tuple[str, ...]:
    """Fully qualified names of the services of ``package`` in a descriptor set, sorted."""
    try:
        data = descriptor_path.read_bytes()
    except OSError as exc:
        raise GatewayConfigError(
            f"cannot read the descriptor set {descriptor_path} ({exc.strerror}); "
            "run scripts/gen_protos.py or set A67_GATEWAY_DESCRIPTOR_PATH"
        ) from None
    try:
        descriptors = descriptor_pb2.FileDescriptorSet.FromString(data)
    except Exception as exc:  # protobuf raises DecodeError, but guard any parse failure
        raise GatewayConfigError(f"{descriptor_path} is not a FileDescriptorSet: {exc}") from None
    services = sorted(
        f"{file.package}.{service.name}"
        for file in descriptors.file
        if file.package == package
        for service in file.service
    )
    if not services:
        raise GatewayConfigError(f"{descriptor_path} holds no {package} services")
    return tuple(services)


def _quote(value: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(value)


def _flow_list(values: Iterable[object]) -> str:
    return json.dumps(list(values), separators=(", ", ": "))


def _duration(seconds: float) -> str:
    """Protobuf JSON duration with millisecond precision: ``1.5`` → ``"1.500s"``."""
    millis = round(seconds * 1000)
    return _quote(f"{millis // 1000}.{millis % 1000:03d}s")


def _origin_matchers(origins: Iterable[str]) -> str:
    return _flow_list({"safe_regex": {"regex": ".*"}} if o == "*" else {"exact": o} for o in origins)


def _admin(settings: GatewaySettings) -> str:
    if settings.admin is None:
        return "# The admin interface is disabled (set admin_address to a loopback HOST:PORT to enable it)."
    host, port = settings.admin
    return f"admin:\n  address:\n    socket_address: {{address: {_quote(host)}, port_value: {port}}}"


def _access_log(settings: GatewaySettings) -> str:
    """The connection manager's ``access_log`` (a file, Envoy's default format), or a comment."""
    if not settings.access_log_path:
        return "          # No access log: set access_log_path (A67_GATEWAY_ACCESS_LOG_PATH) for one."
    path = _quote(str(Path(settings.access_log_path).absolute()))
    return "\n".join(
        (
            "          # One line per request in Envoy's default format: no headers, no bodies.",
            "          access_log:",
            "          - name: envoy.access_loggers.file",
            "            typed_config:",
            '              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog',
            f"              path: {path}",
        )
    )


def _downstream_tls(settings: GatewaySettings) -> str:
    """The listener's ``transport_socket`` (HTTPS only), or a comment when TLS is off."""
    if not settings.tls:
        return "      # Plaintext: set tls_cert and tls_key (A67_TLS_CERT, A67_TLS_KEY) to serve HTTPS only."
    cert = _quote(str(Path(settings.tls_cert).resolve()))
    key = _quote(str(Path(settings.tls_key).resolve()))
    return "\n".join(
        (
            "      # HTTPS only; ALPN offers h2 and HTTP/1.1.",
            "      transport_socket:",
            "        name: envoy.transport_sockets.tls",
            "        typed_config:",
            '          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext',
            "          common_tls_context:",
            '            alpn_protocols: ["h2", "http/1.1"]',
            "            tls_params: {tls_minimum_protocol_version: TLSv1_2}",
            "            tls_certificates:",
            f"            - certificate_chain: {{filename: {cert}}}",
            f"              private_key: {{filename: {key}}}",
        )
    )


def _upstream_tls(settings: GatewaySettings) -> str:
    """The controller cluster's ``transport_socket`` (TLS, verified), or a comment when off."""
    if not settings.upstream_tls_ca:
        return "    # Plaintext HTTP/2 to the controller: set upstream_tls_ca for TLS."
    name = settings.upstream_server_name
    try:
        ipaddress.ip_address(name)
        san_type, sni = "IP_ADDRESS", ""
    except ValueError:
        san_type, sni = "DNS", f"        sni: {_quote(name)}"
    lines = [
        "    # TLS to the controller: its certificate must chain to upstream_tls_ca and name",
        f"    # {name} among its subject alternative names.",
        "    transport_socket:",
        "      name: envoy.transport_sockets.tls",
        "      typed_config:",
        '        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext',
        *([sni] if sni else []),
        "        common_tls_context:",
        '          alpn_protocols: ["h2"]',
        "          tls_params: {tls_minimum_protocol_version: TLSv1_2}",
        "          validation_context:",
        f"            trusted_ca: {{filename: {_quote(str(Path(settings.upstream_tls_ca).resolve()))}}}",
        "            match_typed_subject_alt_names:",
        f"            - {{san_type: {san_type}, matcher: {{exact: {_quote(name)}}}}}",
    ]
    return "\n".join(lines)


def dashboard_files(folder: Path) -> list[tuple[str, Path, str]]:
    """``(URL path, file, Content-Type)`` of each file the dashboard serves, sorted by path.

    ``index.html`` is also served at ``/``. Hidden files are skipped; a file of an unknown
    kind, with an odd name or over :data:`DASHBOARD_MAX_FILE_BYTES` is refused.
    """
    found: list[tuple[str, Path, str]] = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in relative.split("/")):
            continue
        if "/" + relative == DASHBOARD_CONFIG_PATH or not _DASHBOARD_NAME.match(relative):
            raise GatewayConfigError(f"dashboard file {path}: the name {relative!r} cannot be served")
        content_type = DASHBOARD_CONTENT_TYPES.get(path.suffix.lower())
        if content_type is None:
            raise GatewayConfigError(
                f"dashboard file {path}: unknown kind {path.suffix!r} "
                f"(known: {', '.join(sorted(DASHBOARD_CONTENT_TYPES))})"
            )
        if path.stat().st_size > DASHBOARD_MAX_FILE_BYTES:
            raise GatewayConfigError(f"dashboard file {path} is over {DASHBOARD_MAX_FILE_BYTES} bytes")
        found.append(("/" + relative, path.resolve(), content_type))
        if relative == "index.html":
            found.append(("/", path.resolve(), content_type))
    if not any(url == "/" for url, _, _ in found):
        raise GatewayConfigError(f"the dashboard folder {folder} has no index.html")
    return sorted(found)


def dashboard_config(settings: GatewaySettings) -> dict[str, str]:
    """What the dashboard reads from :data:`DASHBOARD_CONFIG_PATH`.

    >>> dashboard_config(GatewaySettings(upstream_address="10.0.0.5:50051"))
    {'agent_controller': '10.0.0.5:50051', 'agent_controller_tls_ca': ''}
    """
    return {
        "agent_controller": settings.agent_controller_address or settings.upstream_address,
        "agent_controller_tls_ca": settings.upstream_tls_ca,
    }


def _dashboard_route(path: str, body: str, content_type: str) -> str:
    headers = {**DASHBOARD_SECURITY_HEADERS, "content-type": content_type}
    to_add = ", ".join(
        f"{{header: {{key: {_quote(k)}, value: {_quote(v)}}}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}}"
        for k, v in headers.items()
    )
    return "\n".join(
        (
            "              - match:",
            f"                  path: {_quote(path)}",
            '                  headers: [{name: ":method", string_match: {safe_regex: {regex: "GET|HEAD"}}}]',
            f"                direct_response: {{status: 200, body: {body}}}",
            f"                response_headers_to_add: [{to_add}]",
            "                typed_per_filter_config:",
            "                  envoy.filters.http.grpc_json_transcoder:",
            '                    "@type": type.googleapis.com/envoy.config.route.v3.FilterConfig',
            "                    disabled: true",
        )
    )


def _dashboard_routes(settings: GatewaySettings) -> str:
    """The routes that serve the dashboard's files (Envoy answers them itself), or a comment."""
    if not settings.dashboard:
        return "              # The dashboard is off (dashboard: false)."
    lines = ["              # The web dashboard: each file answered by Envoy (read when it starts)."]
    for url, path, content_type in dashboard_files(settings.dashboard_dir):
        lines.append(_dashboard_route(url, f"{{filename: {_quote(str(path))}}}", content_type))
    config = json.dumps(dashboard_config(settings), separators=(",", ":"))
    lines.append(
        _dashboard_route(DASHBOARD_CONFIG_PATH, f"{{inline_string: {_quote(config)}}}", "application/json")
    )
    return "\n".join(lines)


def render(settings: GatewaySettings) -> str:
    """The Envoy configuration for ``settings``, as YAML text."""
    settings.validate()
    try:
        template = Template(settings.template_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise GatewayConfigError(
            f"cannot read the gateway template {settings.template_path}: {exc.strerror}"
        ) from None
    listen_host, listen_port = settings.listen
    upstream_host, upstream_port = settings.upstream
    values = {
        "admin": _admin(settings),
        "listen_host": _quote(listen_host),
        "listen_port": str(listen_port),
        "upstream_host": _quote(upstream_host),
        "upstream_port": str(upstream_port),
        "descriptor_path": _quote(str(settings.descriptor_path.resolve())),
        "services": _flow_list(api_services(settings.descriptor_path)),
        "cors_origins": _origin_matchers(settings.cors_allowed_origins),
        "max_request_body_size": str(settings.max_request_body_size),
        "max_upload_body_size": str(settings.max_upload_body_size),
        "transcoder_buffer_size": str(controller_receive_limit(settings.max_request_body_size)),
        "max_connections": str(settings.max_connections),
        "stream_format_option": _STREAM_FORMAT_OPTIONS[settings.stream_format],
        "request_timeout": _duration(settings.request_timeout_seconds),
        "stream_idle_timeout": _duration(settings.stream_idle_timeout_seconds),
        "access_log": _access_log(settings),
        "downstream_tls": _downstream_tls(settings),
        "upstream_tls": _upstream_tls(settings),
        "dashboard_routes": _dashboard_routes(settings),
        "max_direct_response_body_size": str(DASHBOARD_MAX_FILE_BYTES),
    }
    try:
        return template.substitute(values)
    except (KeyError, ValueError) as exc:
        raise GatewayConfigError(f"{settings.template_path}: bad placeholder {exc}") from None


def write_config(settings: GatewaySettings, path: Path) -> Path:
    """Render ``settings`` into ``path`` (written atomically) and return it."""
    text = render(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    if settings.access_log_path:  # Envoy opens the file but does not make its directory
        Path(settings.access_log_path).absolute().parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".envoy-", suffix=".yaml", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    Path(tmp).replace(path)
    return path


def validate(path: Path, envoy: Path | None = None, timeout: float = 60.0) -> None:
    """Have Envoy check the configuration at ``path`` (``--mode validate``); raise on failure."""
    binary = envoy or envoy_binary()
    result = subprocess.run(
        [str(binary), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "error"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip())[-4000:]
        raise GatewayConfigError(f"envoy rejected {path}:\n{output}")
