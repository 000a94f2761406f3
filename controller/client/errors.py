"""Failures of the CLI: one plain sentence, a stable reason and an exit code.

Exit codes (docs/cli.md lists them too):

====  ==================================================================================
0     success
1     the operation failed (a rollout failed, a query had failed shards, an internal error)
2     usage: a bad flag or argument, an unreadable or invalid ``a67.toml``
3     authentication: not signed in, session expired or ended, wrong email or password
4     not found, or not yours (``NOT_FOUND``, ``PERMISSION_DENIED``)
5     rejected as invalid (``INVALID_ARGUMENT``, ``FAILED_PRECONDITION``, ``OUT_OF_RANGE``)
6     conflict (``ALREADY_EXISTS``, ``ABORTED``)
7     throttled or over a limit (``RESOURCE_EXHAUSTED``)
8     the controller cannot be reached or timed out (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``)
130   interrupted (Ctrl-C)
====  ==================================================================================
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

OK = 0
FAILED = 1
USAGE = 2
AUTH = 3
NOT_FOUND = 4
INVALID = 5
CONFLICT = 6
THROTTLED = 7
UNREACHABLE = 8
UNAVAILABLE = 9
"""The controller answered but cannot do it now: no capacity, a node or shard down."""
INTERRUPTED = 130

EXIT_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.UNAUTHENTICATED: AUTH,
    grpc.StatusCode.NOT_FOUND: NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED: NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: INVALID,
    grpc.StatusCode.FAILED_PRECONDITION: INVALID,
    grpc.StatusCode.OUT_OF_RANGE: INVALID,
    grpc.StatusCode.ALREADY_EXISTS: CONFLICT,
    grpc.StatusCode.ABORTED: CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: THROTTLED,
    grpc.StatusCode.UNAVAILABLE: UNREACHABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: UNREACHABLE,
}

SIGN_IN_AGAIN = "sign in again with: a67 login"


class CliError(Exception):
    """What went wrong, for a person (``message``) and a script (``reason``, ``exit_code``)."""

    def __init__(
        self,
        message: str,
        *,
        exit_code: int = FAILED,
        reason: str = "",
        hint: str = "",
        details: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.reason = reason
        self.hint = hint
        self.details = details or []

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "reason": self.reason, "exit_code": self.exit_code}
        if self.hint:
            body["hint"] = self.hint
        if self.details:
            body["details"] = self.details
        return {"error": body}


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if not text or text[-1] in ".!?" else text + "."


def error_info(err: grpc.RpcError) -> tuple[str, list[str], float | None]:
    """(reason, field problems, retry delay in seconds) from the status details of ``err``."""
    reason, problems, retry = "", [], None
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            problems += [f"{v.field}: {v.description}" for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_retry = error_details_pb2.RetryInfo()
            detail.Unpack(info_retry)
            retry = info_retry.retry_delay.seconds + info_retry.retry_delay.nanos / 1e9
    return reason, problems, retry


def from_rpc_error(err: grpc.RpcError, *, address: str = "") -> CliError:
    """The CLI error for a failed call: the controller's message, its reason and an exit code."""
    code: grpc.StatusCode = err.code()
    details: str = err.details() or ""
    reason, problems, retry = error_info(err)
    exit_code = EXIT_CODES.get(code, FAILED)
    hint = ""
    if code is grpc.StatusCode.UNAVAILABLE and reason:
        exit_code = UNAVAILABLE  # the controller said why (INSUFFICIENT_CAPACITY, a shard down)
    if code is grpc.StatusCode.UNAVAILABLE and not reason:
        # No ErrorInfo: grpc itself could not reach the controller.
        where = f" at {address}" if address else ""
        message = f"Cannot reach the controller{where}: {details or 'connection failed'}"
        reason = "CONTROLLER_UNREACHABLE"
        hint = "check --controller (or A67_CONTROLLER) and that the controller is running"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED and not reason:
        message = "The controller did not answer in time"
        reason = "DEADLINE_EXCEEDED"
    else:
        message = details or code.name.replace("_", " ").capitalize()
    if not reason:
        reason = code.name
    if retry is not None:
        hint = f"try again in {retry:.0f} s"
    if code is grpc.StatusCode.UNAUTHENTICATED and reason not in ("INVALID_CREDENTIALS", "LOGIN_THROTTLED"):
        hint = SIGN_IN_AGAIN
    return CliError(_sentence(message), exit_code=exit_code, reason=reason, hint=hint, details=problems)
