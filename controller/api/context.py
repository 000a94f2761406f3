"""Per-RPC request context: who is calling.

The authentication interceptor sets the principal for the duration of one RPC
(each RPC runs in its own asyncio task, so a ``ContextVar`` is per call);
servicers read it with :func:`current_principal`.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from controller.errors import Unauthenticated


@dataclass(frozen=True)
class Principal:
    """A signed-in user, as proven by a verified access token."""

    user_id: str
    session_id: str
    token_id: str


_principal: ContextVar[Principal | None] = ContextVar("a67_principal", default=None)


def current_principal() -> Principal:
    """The caller of the current RPC; ``Unauthenticated`` if there is none."""
    principal = _principal.get()
    if principal is None:
        raise Unauthenticated("This call needs a signed-in user", reason="MISSING_TOKEN")
    return principal


def bearer_token(metadata: object) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry of gRPC metadata, if any."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None
