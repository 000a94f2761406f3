"""Enrollment: ``RegisterNode`` once, with the enrollment token and a CSR; the certificate
that comes back is the node's identity from then on (:mod:`controller.agent.identity`).

Errors that may pass (:data:`RETRYABLE_ENROLLMENT_CODES`) are retried with backoff; any
other ends the agent with a message saying what to do (:class:`EnrollmentRefused`).
Tokens the controller echoes in an error are removed from the message.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from automator67.v1 import common_pb2, node_pb2, node_pb2_grpc
from google.rpc import error_details_pb2, status_pb2

from controller.agent.agent_config import (
    DEFAULT_HEARTBEAT_INTERVAL_MS,
    _AgentState,
    _describe,
    _sleep_unless_stopped,
    _StopRequested,
    _unless_stopped,
    resolve_stream_endpoint,
)
from controller.agent.identity import Enrollment

log = logging.getLogger("controller.agent")

RETRYABLE_ENROLLMENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
"""Enrollment errors that may pass (the controller or its store is down or overloaded);
every other code ends the agent with a message."""

_NODE_ID_METADATA_KEYS = ("node_id", "nodeId", "existing_node_id")
_MIN_REDACTED_LENGTH = 6  # shorter "tokens" would mangle every message; real ones are far longer


class EnrollmentRefused(Exception):
    """The controller refused to enroll this node for a reason retrying cannot fix."""


def _status_details(exc: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo | None, list[str]]:
    """The ErrorInfo and BadRequest field violations ("field: description") of an error."""
    info: error_details_pb2.ErrorInfo | None = None
    violations: list[str] = []
    for key, value in exc.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(f"{v.field}: {v.description}" for v in bad.field_violations)
    return info, violations


class _Enrollment(_AgentState):
    """Enrolling with the controller."""

    def _enrollment_channel(self) -> grpc.aio.Channel:
        cfg = self.config
        if cfg.controller_tls_ca is None:
            return grpc.aio.insecure_channel(cfg.controller)
        try:
            ca = cfg.controller_tls_ca.expanduser().read_bytes()
        except OSError as exc:
            raise EnrollmentRefused(
                f"cannot read --controller-tls-ca {cfg.controller_tls_ca}: {exc}"
            ) from exc
        return grpc.aio.secure_channel(cfg.controller, grpc.ssl_channel_credentials(root_certificates=ca))

    def _redact(self, text: str) -> str:
        """``text`` (an error from the controller) with any echo of the tokens removed."""
        for secret in (self.config.token, self.config.oauth_token):
            if len(secret) >= _MIN_REDACTED_LENGTH:
                text = text.replace(secret, "<redacted>")
        return text

    async def _enroll(self, stop: asyncio.Event) -> Enrollment:
        cfg = self.config
        if not cfg.controller:
            raise EnrollmentRefused(
                f"this installation ({self.identity.data_dir}) is not enrolled yet: "
                "start the agent with --controller HOST:PORT and A67_AGENT_TOKEN (or --token-file FILE)"
            )
        if not cfg.token:
            raise EnrollmentRefused(
                f"this installation ({self.identity.data_dir}) is not enrolled yet and no enrollment "
                "token was given: set A67_AGENT_TOKEN (or pass --token-file FILE)"
            )
        request = node_pb2.RegisterNodeRequest(
            enrollment_token=cfg.token,
            provider=cfg.provider,
            endpoint=cfg.endpoint,
            region=cfg.region,
            capabilities=self._capabilities_now(),
            csr_pem=self.identity.build_csr(),
            fingerprint=self.identity.fingerprint(),
        )
        if cfg.oauth_token:
            request.oauth_token = cfg.oauth_token
        backoff = self._backoff()
        log.info(
            "enrolling with controller %s as a %s node in region %s (fingerprint %s)",
            cfg.controller,
            common_pb2.Provider.Name(cfg.provider).removeprefix("PROVIDER_").lower(),
            cfg.region,
            request.fingerprint[:16],
        )
        async with self._enrollment_channel() as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            while True:
                try:
                    response: node_pb2.RegisterNodeResponse = await _unless_stopped(
                        stub.RegisterNode(request, timeout=cfg.enroll_timeout_s), stop
                    )
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE_ENROLLMENT_CODES:
                        raise EnrollmentRefused(self._refusal_message(exc)) from None
                    delay = backoff.next_delay()
                    log.warning(
                        "enrollment with %s failed (%s); retrying in %.2fs (attempt %d)",
                        cfg.controller,
                        self._redact(_describe(exc)),
                        delay,
                        backoff.attempt,
                    )
                    if await _sleep_unless_stopped(stop, delay):
                        raise _StopRequested from None
        if not response.node_id or not response.controller_endpoint:
            raise EnrollmentRefused(
                "the controller's RegisterNode answer lacks node_id or controller_endpoint"
            )
        enrollment = Enrollment(
            node_id=response.node_id,
            controller_endpoint=resolve_stream_endpoint(response.controller_endpoint, cfg.controller),
            heartbeat_interval_ms=response.heartbeat_interval_ms or DEFAULT_HEARTBEAT_INTERVAL_MS,
            certificate_pem=response.certificate_pem.encode(),
            ca_certificate_pem=response.ca_certificate_pem.encode(),
        )
        self.identity.save(enrollment)
        log.info(
            "enrolled as node %s; stream endpoint %s; heartbeat every %d ms",
            enrollment.node_id,
            enrollment.controller_endpoint,
            enrollment.heartbeat_interval_ms,
        )
        return enrollment

    def _refusal_message(self, exc: grpc.aio.AioRpcError) -> str:
        code = exc.code()
        details = self._redact(exc.details() or "")
        info, violations = _status_details(exc)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return (
                f"the controller refused the enrollment token ({details or 'UNAUTHENTICATED'}): it is "
                "invalid, expired or used up; create a new one and start the agent with it"
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            fields = f" [{'; '.join(violations)}]" if violations else ""
            return f"the controller rejected the registration as invalid: {details}{fields}"
        if code == grpc.StatusCode.ALREADY_EXISTS:
            node_id = None
            if info is not None:
                node_id = next(
                    (info.metadata[k] for k in _NODE_ID_METADATA_KEYS if info.metadata.get(k)), None
                )
            node_id = node_id or self.identity.recorded_node_id() or "<unknown>"
            return (
                f"this installation (key fingerprint {self.identity.fingerprint()[:16]}) is already "
                f"registered as node {node_id}, but its certificate is missing from "
                f"{self.identity.data_dir}; restore node.crt, ca.crt and node.json there, or "
                f"deregister node {node_id} and enroll again"
            )
        return f"enrollment failed: {code.name} {details}".rstrip()
