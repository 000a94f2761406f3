"""Run an ingress Envoy: render ``gateway/ingress.yaml.tmpl`` and start Envoy on it.

The bootstrap names only the controller's xDS address and this ingress's own listen
address (in the node metadata); everything else arrives over ADS. ``IngressProcess``
is ready when its listener answers HTTP — which it can only do once the controller
has sent it the listener and the routes.

>>> text = render(IngressSettings(listen_address="127.0.0.1:9091", xds_address="127.0.0.1:50053"))
>>> "listen_address: \\"127.0.0.1:9091\\"" in text and "port_value: 50053" in text
True
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from string import Template
from typing import Any

from controller.config import is_loopback, split_host_port, values_from_env
from controller.gateway.process import ManagedProcess, connect_host, envoy_binary

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = REPO_ROOT / "gateway" / "ingress.yaml.tmpl"
READY_PATH = "/.a67/ingress-ready"
"""Any HTTP answer to this path (the routes' JSON 404) means the listener came over xDS."""


class IngressConfigError(Exception):
    """The ingress settings or template are unusable."""


@dataclass(frozen=True)
class IngressSettings:
    """An ingress Envoy's settings: ``A67_INGRESS_<FIELD>`` variables or flags."""

    listen_address: str = "127.0.0.1:8081"
    """Where this ingress serves app traffic (HTTP)."""
    xds_address: str = "127.0.0.1:50053"
    """The controller's xDS port (the controller's ``A67_XDS_LISTEN_ADDRESS``)."""
    node_id: str = ""
    """This Envoy's xDS node id; empty means ``a67-ingress-<hostname>-<listen port>``."""
    admin_address: str = ""
    """Envoy's admin interface (loopback only; empty: off). Tests read /config_dump there."""
    concurrency: int = 0
    """Envoy worker threads (0: one per CPU)."""
    log_level: str = "warning"
    max_connections: int = 50_000
    template_path: Path = field(default=DEFAULT_TEMPLATE)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> IngressSettings:
        values = values_from_env(cls, "A67_INGRESS_", environ)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def with_overrides(self, **overrides: Any) -> IngressSettings:
        return replace(self, **overrides)

    @property
    def listen(self) -> tuple[str, int]:
        return split_host_port(self.listen_address)

    @property
    def effective_node_id(self) -> str:
        return self.node_id or f"a67-ingress-{socket.gethostname()}-{self.listen[1]}"

    def validate(self) -> None:
        for name, value in (("listen_address", self.listen_address), ("xds_address", self.xds_address)):
            try:
                split_host_port(value)
            except ValueError as exc:
                raise IngressConfigError(f"A67_INGRESS_{name.upper()}: {exc}") from None
        if self.admin_address:
            host, _ = split_host_port(self.admin_address)
            if not is_loopback(host):
                raise IngressConfigError(
                    f"A67_INGRESS_ADMIN_ADDRESS must be a loopback address, not {self.admin_address!r}"
                )
        if self.concurrency < 0 or self.max_connections <= 0:
            raise IngressConfigError("concurrency must be >= 0 and max_connections positive")


def _quote(value: str) -> str:
    return json.dumps(value)


def render(settings: IngressSettings) -> str:
    settings.validate()
    try:
        template = Template(settings.template_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise IngressConfigError(
            f"cannot read the ingress template {settings.template_path}: {exc.strerror}"
        ) from None
    xds_host, xds_port = split_host_port(settings.xds_address)
    if settings.admin_address:
        host, port = split_host_port(settings.admin_address)
        admin = f"admin:\n  address:\n    socket_address: {{address: {_quote(host)}, port_value: {port}}}"
    else:
        admin = "# The admin interface is off (--admin HOST:PORT on loopback turns it on)."
    return template.substitute(
        node_id=_quote(settings.effective_node_id),
        listen_address=_quote(settings.listen_address),
        admin=admin,
        max_connections=str(settings.max_connections),
        xds_host=_quote(connect_host(xds_host)),
        xds_port=str(xds_port),
    )


def write_config(settings: IngressSettings, path: Path) -> Path:
    text = render(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ingress-", suffix=".yaml", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    Path(tmp).replace(path)
    return path


class IngressProcess(ManagedProcess):
    """Envoy running an ingress bootstrap."""

    name = "ingress"

    def __init__(
        self,
        config_path: Path,
        settings: IngressSettings,
        *,
        binary: Path | None = None,
        log_path: Path | None = None,
        own_session: bool = True,
    ) -> None:
        argv = [
            str(binary or envoy_binary()),
            "-c",
            str(config_path),
            "--disable-hot-restart",
            "--log-level",
            settings.log_level,
        ]
        if settings.concurrency:
            argv += ["--concurrency", str(settings.concurrency)]
        super().__init__(argv, log_path=log_path, own_session=own_session)
        self.settings = settings

    def probe(self) -> bool:
        host, port = self.settings.listen
        connection = http.client.HTTPConnection(connect_host(host), port, timeout=1.0)
        try:
            connection.request("GET", READY_PATH)
            return connection.getresponse().status > 0
        except OSError:
            return False
        finally:
            connection.close()
