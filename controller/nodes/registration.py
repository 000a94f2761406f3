"""Node registration (``NodeService.RegisterNode``, spec §4.1): transport-free logic.

The agent sends an enrollment token, what it is (provider, endpoint, region,
capabilities), a stable installation ``fingerprint``, a CSR for the key it made
itself and, optionally, its provider OAuth token. :meth:`NodeRegistrar.register`:

1. validates every field, including parsing the CSR and checking its signature,
   and reports *all* bad fields at once (``InvalidArgument`` with field violations);
2. checks the token without using it (``Unauthenticated``, reason
   ``ENROLLMENT_TOKEN_INVALID``, if it is invalid, expired or used up);
3. refuses a second registration of the same installation by the same user:
   ``AlreadyExists`` (reason ``NODE_ALREADY_REGISTERED``) with the existing node id
   in the ``ErrorInfo`` metadata (``node_id``), without using the token;
4. generates the node id, signs the CSR for it and encrypts the OAuth token with the
   vault bound to the node (owner = node id, purpose :data:`OAUTH_TOKEN_PURPOSE`);
5. in **one transaction** uses the token (atomic conditional ``UPDATE``) and inserts
   the node (status ``initializing``, certificate serial recorded): if the insert
   loses a race on the fingerprint, the token use is rolled back with it;
6. returns the node id, the node-facing controller address, the certificate, the CA
   certificate and the heartbeat interval.

Nothing is written before step 5, and step 5 is all or nothing, so a failure at any
point leaves no trace (a certificate signed in step 4 for a registration that then
fails is never returned, and its serial is not recorded, so it would not be accepted).
The OAuth token is never stored in plaintext, never returned and never logged. A
store outage surfaces as the store's ``Unavailable`` (``STORE_UNAVAILABLE``), which
the agent retries.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from automator67.v1 import common_pb2, node_pb2
from cryptography import x509
from sqlalchemy.exc import IntegrityError

from controller.credentials.states import REFRESH_TOKEN_PURPOSE, initial_state
from controller.errors import FieldViolation, InvalidArgument, require_fields
from controller.nodes.ca import CertificateAuthority, parse_node_csr
from controller.nodes.enrollment import EnrollmentTokens, invalid_token
from controller.nodes.repository import STATUS_INITIALIZING, NodeRepository
from controller.nodes.validation import NODE_TYPES, capability_violations
from controller.store.db import Store
from controller.store.models import Node, NodeCredentialState, new_id
from controller.vault import Vault

log = logging.getLogger(__name__)

OAUTH_TOKEN_PURPOSE = "node-oauth-token"  # noqa: S105 - a label, not a secret
"""Vault purpose of a node's OAuth token (its owner is the node id)."""

MAX_ENDPOINT_CHARS = 500
MAX_REGION_CHARS = 100
MAX_OAUTH_TOKEN_BYTES = 8 * 1024
DEFAULT_MAX_CONCURRENT_REQUESTS = 100
DEFAULT_NODE_TYPES = ("compute",)

_REGION_PATTERN = re.compile(r"[a-z0-9-]{1,100}")
_FINGERPRINT_PATTERN = re.compile(r"[A-Za-z0-9:_-]{16,128}")
_PROVIDER_PREFIX = "PROVIDER_"

Clock = Callable[[], float]


def provider_name(value: int) -> str:
    """The store's name of a ``Provider`` enum value: ``PROVIDER_FLYIO`` → ``flyio``.

    ``ValueError`` for ``PROVIDER_UNSPECIFIED`` and unknown values.
    """
    if value == common_pb2.PROVIDER_UNSPECIFIED:
        raise ValueError("the provider is unspecified")
    return (
        common_pb2.Provider.Name(common_pb2.Provider.ValueType(value)).removeprefix(_PROVIDER_PREFIX).lower()
    )


def provider_value(name: str) -> int:
    """The ``Provider`` enum value of a stored provider name (``PROVIDER_UNSPECIFIED`` if unknown)."""
    try:
        return int(common_pb2.Provider.Value(_PROVIDER_PREFIX + name.upper()))
    except ValueError:
        return int(common_pb2.PROVIDER_UNSPECIFIED)


def decrypt_oauth_token(vault: Vault, node: Node) -> str | None:
    """The plaintext OAuth token of ``node``, or None if it registered without one.

    For the code that delivers credentials to the node; never log the result.
    """
    ciphertext = (node.credentials or {}).get("oauth_token")
    if not ciphertext:
        return None
    return vault.decrypt_str(str(ciphertext), owner=node.id, purpose=OAUTH_TOKEN_PURPOSE)


def _endpoint_problem(value: str) -> str | None:
    if not value:
        return "is required"
    if len(value) > MAX_ENDPOINT_CHARS:
        return f"must be at most {MAX_ENDPOINT_CHARS} characters"
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return "must not contain spaces or control characters"
    try:
        parts = urlsplit(value)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "must name a host"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials"
    if port == 0:
        return "is not a valid URL"
    return None


@dataclass(frozen=True)
class _Checked:
    """A validated request, in the forms the store wants."""

    token: str
    provider: str
    endpoint: str
    region: str
    capabilities: dict[str, Any]
    csr: x509.CertificateSigningRequest
    fingerprint: str
    oauth_token: str
    oauth_expires_at: datetime | None
    oauth_refresh_token: str = ""


class NodeRegistrar:
    """Registers nodes: validation, token use, the node row and its certificate."""

    def __init__(
        self,
        store: Store,
        enrollment: EnrollmentTokens,
        nodes: NodeRepository,
        ca: CertificateAuthority,
        vault: Vault,
        controller_endpoint: str,
        heartbeat_interval_ms: int,
        *,
        clock: Clock = time.time,
        credential_schedule: Callable[[float, float | None, str, bool], float | None] | None = None,
    ) -> None:
        if heartbeat_interval_ms <= 0:
            raise ValueError("heartbeat_interval_ms must be positive")
        self._store = store
        self._enrollment = enrollment
        self._nodes = nodes
        self._ca = ca
        self._vault = vault
        self.controller_endpoint = controller_endpoint
        self._heartbeat_interval_ms = heartbeat_interval_ms
        self._clock = clock
        self._credential_schedule = credential_schedule
        """When a provider token stored now is due for refresh (controller/credentials/)."""

    async def register(self, request: node_pb2.RegisterNodeRequest) -> node_pb2.RegisterNodeResponse:
        """Register a node; see the module documentation for the steps and errors."""
        checked = self._validate(request)
        user_id = await self._enrollment.peek(checked.token)
        duplicate = await self._nodes.already_registered(user_id, checked.fingerprint)
        if duplicate is not None:
            raise duplicate

        node_id = new_id()
        signed = self._ca.sign_node_csr(checked.csr, node_id)
        credentials: dict[str, Any] = {}
        if checked.oauth_token:
            credentials["oauth_token"] = self._vault.encrypt_str(
                checked.oauth_token, owner=node_id, purpose=OAUTH_TOKEN_PURPOSE
            )
            credentials["oauth_provider"] = checked.provider
            if checked.oauth_expires_at is not None:
                credentials["oauth_expires_at"] = checked.oauth_expires_at.isoformat()
            if checked.oauth_refresh_token:
                credentials["refresh_token"] = self._vault.encrypt_str(
                    checked.oauth_refresh_token, owner=node_id, purpose=REFRESH_TOKEN_PURPOSE
                )

        try:
            async with self._store.session() as session:
                owner = await self._enrollment.consume(checked.token, session=session)
                if owner != user_id:  # pragma: no cover - one token hash has one owner
                    raise invalid_token()
                await self._nodes.create(
                    node_id=node_id,
                    user_id=user_id,
                    provider=checked.provider,
                    endpoint=checked.endpoint,
                    region=checked.region,
                    capabilities=checked.capabilities,
                    fingerprint=checked.fingerprint,
                    credentials=credentials,
                    cert_serial=signed.serial_hex,
                    status=STATUS_INITIALIZING,
                    created_at=datetime.fromtimestamp(self._clock(), UTC),
                    session=session,
                )
                if checked.oauth_token:  # its life cycle (controller/credentials/)
                    session.add(self._credential_state(node_id, user_id, checked))
        except IntegrityError:
            # Lost a race with a concurrent registration of the same installation;
            # the transaction (and with it the token use) was rolled back.
            duplicate = await self._nodes.already_registered(user_id, checked.fingerprint)
            if duplicate is None:
                raise
            raise duplicate from None

        log.info(
            "registered node %s for user %s (provider %s, region %s, certificate serial %s)",
            node_id,
            user_id,
            checked.provider,
            checked.region,
            signed.serial_hex,
        )
        return node_pb2.RegisterNodeResponse(
            node_id=node_id,
            controller_endpoint=self.controller_endpoint,
            certificate_pem=signed.cert_pem,
            ca_certificate_pem=self._ca.ca_cert_pem,
            heartbeat_interval_ms=self._heartbeat_interval_ms,
        )

    def _credential_state(self, node_id: str, user_id: str, checked: _Checked) -> NodeCredentialState:
        now = self._clock()
        expires = checked.oauth_expires_at.timestamp() if checked.oauth_expires_at else None
        refresh_at = None
        if self._credential_schedule is not None:
            refresh_at = self._credential_schedule(
                now, expires, checked.provider, bool(checked.oauth_refresh_token)
            )
        return initial_state(
            node_id, user_id, checked.provider, now=now, expires_at=expires, refresh_at=refresh_at
        )

    # -- validation -----------------------------------------------------------------------------

    def _validate(self, request: node_pb2.RegisterNodeRequest) -> _Checked:
        violations: list[FieldViolation] = []

        def bad(field: str, description: str) -> None:
            violations.append(FieldViolation(field, description))

        if not request.enrollment_token:
            bad("enrollment_token", "is required")

        provider = ""
        if request.provider == common_pb2.PROVIDER_UNSPECIFIED:
            bad("provider", "is required")
        elif request.provider not in common_pb2.Provider.values():
            bad("provider", "is not a known provider")
        else:
            provider = provider_name(request.provider)

        problem = _endpoint_problem(request.endpoint)
        if problem is not None:
            bad("endpoint", problem)

        if _REGION_PATTERN.fullmatch(request.region) is None:
            bad("region", f"must be 1 to {MAX_REGION_CHARS} characters of a-z, 0-9 and '-'")

        capabilities = self._capabilities(request, bad)

        csr: x509.CertificateSigningRequest | None = None
        try:
            csr = parse_node_csr(request.csr_pem)
        except InvalidArgument as exc:
            violations.extend(exc.field_violations)

        if not request.fingerprint:
            bad("fingerprint", "is required")
        elif _FINGERPRINT_PATTERN.fullmatch(request.fingerprint) is None:
            bad("fingerprint", "must be 16 to 128 characters of A-Z, a-z, 0-9, ':', '_' and '-'")

        if len(request.oauth_token.encode("utf-8")) > MAX_OAUTH_TOKEN_BYTES:
            bad("oauth_token", f"must be at most {MAX_OAUTH_TOKEN_BYTES} bytes")

        if len(request.oauth_refresh_token.encode("utf-8")) > MAX_OAUTH_TOKEN_BYTES:
            bad("oauth_refresh_token", f"must be at most {MAX_OAUTH_TOKEN_BYTES} bytes")
        elif request.oauth_refresh_token and not request.oauth_token:
            bad("oauth_refresh_token", "is only meaningful with oauth_token")

        oauth_expires_at: datetime | None = None
        if request.HasField("oauth_expires_at"):
            try:
                oauth_expires_at = request.oauth_expires_at.ToDatetime(tzinfo=UTC)
            except (ValueError, OverflowError, OSError):
                bad("oauth_expires_at", "is not a valid time")
            else:
                if not request.oauth_token:
                    bad("oauth_expires_at", "is only meaningful with oauth_token")
                elif oauth_expires_at <= datetime.fromtimestamp(self._clock(), UTC):
                    bad("oauth_expires_at", "must be in the future")

        require_fields(violations, "The node registration is invalid")
        # No violations, so both were parsed.
        assert csr is not None
        assert capabilities is not None
        return _Checked(
            token=request.enrollment_token,
            provider=provider,
            endpoint=request.endpoint,
            region=request.region,
            capabilities=capabilities,
            csr=csr,
            fingerprint=request.fingerprint,
            oauth_token=request.oauth_token,
            oauth_expires_at=oauth_expires_at,
            oauth_refresh_token=request.oauth_refresh_token,
        )

    @staticmethod
    def _capabilities(
        request: node_pb2.RegisterNodeRequest, bad: Callable[[str, str], None]
    ) -> dict[str, Any] | None:
        if not request.HasField("capabilities"):
            bad("capabilities", "is required")
            return None
        caps = request.capabilities
        problems = capability_violations(caps, registration=True)
        for violation in problems:
            bad(violation.field, violation.description)
        if problems:
            return None
        node_types = list(dict.fromkeys(caps.node_types)) or list(DEFAULT_NODE_TYPES)
        return {
            "cpu_cores": caps.cpu_cores,
            "memory_gb": caps.memory_gb,
            "disk_gb": caps.disk_gb,
            "network_bandwidth_mbps": caps.network_bandwidth_mbps,
            "max_concurrent_requests": caps.max_concurrent_requests or DEFAULT_MAX_CONCURRENT_REQUESTS,
            "node_types": node_types,
        }


__all__ = [
    "DEFAULT_MAX_CONCURRENT_REQUESTS",
    "NODE_TYPES",
    "OAUTH_TOKEN_PURPOSE",
    "NodeRegistrar",
    "decrypt_oauth_token",
    "provider_name",
    "provider_value",
]
