"""Provider adapters: one per provider of spec §3.2, sharing one OAuth 2.0 implementation.

:class:`OAuth2Adapter` does the protocol with Authlib's ``AsyncOAuth2Client`` (over
httpx): the refresh-token grant (RFC 6749 §6), revocation (RFC 7009), and refresh-token
rotation (a response carrying a new ``refresh_token`` replaces the old one; one without
keeps it). The provider subclasses only name themselves and their defaults; their
endpoints and client credentials are configuration (``A67_PROVIDER_OAUTH``, see
:func:`load_adapters`), so nothing here is tied to an address.

Failures are sorted in two: :class:`PermanentRefreshError` when the provider refuses
the grant (``invalid_grant``: the refresh token is revoked, expired or already used),
:class:`TemporaryRefreshError` for everything worth retrying (network, timeouts, 5xx,
an unreadable answer, other OAuth errors such as a misconfigured client). Neither
carries a token or the provider's free-text description, only an error code.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

PROVIDERS = ("render", "railway", "flyio", "vercel", "netlify")
"""The providers of spec §3.2 (``nodes.provider`` values)."""

_ERROR_CODE = re.compile(r"[a-z0-9_.-]{1,64}")


class RefreshError(Exception):
    """A refresh failed; ``code`` names why (never a token)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class PermanentRefreshError(RefreshError):
    """The provider refused the refresh token (``invalid_grant``): retrying cannot help."""


class TemporaryRefreshError(RefreshError):
    """The refresh may succeed later (network, timeout, 5xx, unexpected answer)."""


@dataclass(frozen=True)
class TokenSet:
    """A provider's answer to a refresh. ``expires_at``: epoch seconds, None if not said."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_at: float | None
    rotated: bool
    """Whether the provider sent a new refresh token (rotation)."""


@dataclass(frozen=True)
class ProviderEndpoints:
    """Where a provider's OAuth 2.0 endpoints are and how the controller authenticates."""

    token_url: str
    revocation_url: str = ""
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    auth_method: str = "client_secret_basic"
    """``client_secret_basic``, ``client_secret_post`` or ``none`` (RFC 6749 §2.3)."""


@functools.cache
def _client_modules() -> tuple[Any, type[Exception], ModuleType]:
    """Authlib's async client, its OAuth error and httpx, imported when a provider is
    configured (they add to the controller's start-up otherwise)."""
    import authlib.deprecate  # noqa: F401 - installs Authlib's "always" filter before ours below

    with warnings.catch_warnings():
        # Authlib 1.9 prefers the httpx2 package and warns when it falls back to httpx
        # (the fix is to install httpx2: docs/credentials.md, "Providers").
        warnings.simplefilter("ignore", DeprecationWarning)
        from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
    # The HTTP package the client is built on (httpx2 where installed, else httpx): its
    # exceptions are the ones to catch, and the two packages share no exception classes.
    http = importlib.import_module(_http_base(AsyncOAuth2Client).__module__.partition(".")[0])
    return AsyncOAuth2Client, OAuthError, http


def _http_base(client_class: type) -> type:
    """The ``AsyncClient`` class of httpx or httpx2 that Authlib's client extends."""
    for base in client_class.__mro__:
        if base.__name__ == "AsyncClient" and base.__module__.partition(".")[0] in ("httpx", "httpx2"):
            return base
    raise RuntimeError(f"{client_class!r} is not built on httpx or httpx2")


def _code(error: object) -> str:
    text = str(error or "").strip().lower()
    return text if _ERROR_CODE.fullmatch(text) else "oauth_error"


class ProviderAdapter:
    """What the controller needs of a provider's token service."""

    name: ClassVar[str] = ""

    @property
    def can_revoke(self) -> bool:
        return False

    async def refresh(self, refresh_token: str, *, now: float) -> TokenSet:
        """Exchange ``refresh_token`` for a new token set (``now``: epoch seconds)."""
        raise NotImplementedError

    async def revoke(self, token: str, token_type_hint: str) -> bool:
        """Revoke ``token`` at the provider; True if it confirmed (RFC 7009: 200)."""
        return False

    async def close(self) -> None:
        """Release connections."""


class OAuth2Adapter(ProviderAdapter):
    """The shared OAuth 2.0 client (Authlib ``AsyncOAuth2Client`` over httpx)."""

    def __init__(self, endpoints: ProviderEndpoints, *, timeout_seconds: float = 10.0) -> None:
        self.endpoints = endpoints
        client_class, self._oauth_error, self._httpx = _client_modules()
        # One client (one connection pool) per provider. Concurrent refreshes are safe:
        # Authlib keeps the last answer in ``client.token``, but sets and returns it with
        # no await in between, and we copy what we need at once.
        self._client = client_class(
            client_id=endpoints.client_id or None,
            client_secret=endpoints.client_secret or None,
            token_endpoint_auth_method=endpoints.auth_method,
            revocation_endpoint_auth_method=endpoints.auth_method,
            timeout=timeout_seconds,
            follow_redirects=False,
        )

    @property
    def can_revoke(self) -> bool:
        return bool(self.endpoints.revocation_url)

    async def refresh(self, refresh_token: str, *, now: float) -> TokenSet:
        httpx = self._httpx
        try:
            answer: dict[str, Any] = dict(
                await self._client.refresh_token(self.endpoints.token_url, refresh_token=refresh_token)
            )
        except self._oauth_error as exc:
            code = _code(getattr(exc, "error", None))
            if code == "invalid_grant":
                raise PermanentRefreshError(code) from None
            raise TemporaryRefreshError(code) from None
        except httpx.HTTPStatusError as exc:
            raise TemporaryRefreshError(f"http_{exc.response.status_code}") from None
        except httpx.TimeoutException:
            raise TemporaryRefreshError("timeout") from None
        except httpx.TransportError as exc:
            raise TemporaryRefreshError(_code(type(exc).__name__)) from None
        except ValueError:
            raise TemporaryRefreshError("bad_response") from None
        access = answer.get("access_token")
        if not isinstance(access, str) or not access:
            raise TemporaryRefreshError("bad_response")
        new_refresh = answer.get("refresh_token")
        rotated = isinstance(new_refresh, str) and bool(new_refresh) and new_refresh != refresh_token
        expires_at: float | None = None
        expires_in = answer.get("expires_in")
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
            expires_at = now + float(expires_in)
        return TokenSet(
            access_token=access,
            refresh_token=str(new_refresh) if rotated else refresh_token,
            expires_at=expires_at,
            rotated=rotated,
        )

    async def revoke(self, token: str, token_type_hint: str) -> bool:
        if not self.endpoints.revocation_url:
            return False
        try:
            response = await self._client.revoke_token(
                self.endpoints.revocation_url, token=token, token_type_hint=token_type_hint
            )
        except (self._httpx.HTTPError, self._oauth_error, ValueError):
            return False
        return bool(response.status_code == 200)

    async def close(self) -> None:
        await self._client.aclose()


class RenderAdapter(OAuth2Adapter):
    name = "render"


class RailwayAdapter(OAuth2Adapter):
    name = "railway"


class FlyioAdapter(OAuth2Adapter):
    name = "flyio"


class VercelAdapter(OAuth2Adapter):
    name = "vercel"


class NetlifyAdapter(OAuth2Adapter):
    name = "netlify"


ADAPTERS: dict[str, type[OAuth2Adapter]] = {
    cls.name: cls for cls in (RenderAdapter, RailwayAdapter, FlyioAdapter, VercelAdapter, NetlifyAdapter)
}


def parse_provider_config(text: str) -> dict[str, ProviderEndpoints]:
    """``A67_PROVIDER_OAUTH`` (JSON) → endpoints per provider; ``ValueError`` naming the problem."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"A67_PROVIDER_OAUTH is not valid JSON: {exc.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError("A67_PROVIDER_OAUTH must be a JSON object keyed by provider")
    found: dict[str, ProviderEndpoints] = {}
    for name, entry in raw.items():
        if name not in ADAPTERS:
            raise ValueError(f"A67_PROVIDER_OAUTH: unknown provider {name!r} (known: {', '.join(PROVIDERS)})")
        if not isinstance(entry, dict):
            raise ValueError(f"A67_PROVIDER_OAUTH.{name} must be an object")
        unknown = set(entry) - {
            "token_url",
            "revocation_url",
            "client_id",
            "client_secret",
            "client_secret_file",
            "auth_method",
        }
        if unknown:
            raise ValueError(f"A67_PROVIDER_OAUTH.{name}: unknown keys {sorted(unknown)}")
        token_url = entry.get("token_url")
        if not isinstance(token_url, str) or not token_url.startswith(("https://", "http://")):
            raise ValueError(f"A67_PROVIDER_OAUTH.{name}.token_url must be an http(s) URL")
        revocation_url = entry.get("revocation_url", "")
        if not isinstance(revocation_url, str) or (
            revocation_url and not revocation_url.startswith(("https://", "http://"))
        ):
            raise ValueError(f"A67_PROVIDER_OAUTH.{name}.revocation_url must be an http(s) URL")
        secret = entry.get("client_secret", "")
        if entry.get("client_secret_file"):
            try:
                secret = Path(str(entry["client_secret_file"])).read_text().strip()
            except OSError as exc:
                raise ValueError(
                    f"A67_PROVIDER_OAUTH.{name}.client_secret_file: cannot read it ({exc.strerror})"
                ) from None
        method = entry.get("auth_method", "client_secret_basic")
        if method not in ("client_secret_basic", "client_secret_post", "none"):
            raise ValueError(f"A67_PROVIDER_OAUTH.{name}.auth_method is not supported: {method!r}")
        found[name] = ProviderEndpoints(
            token_url=token_url,
            revocation_url=revocation_url,
            client_id=str(entry.get("client_id", "")),
            client_secret=str(secret),
            auth_method=str(method),
        )
    return found


def load_adapters(text: str, *, timeout_seconds: float = 10.0) -> dict[str, ProviderAdapter]:
    """One adapter per configured provider (see :func:`parse_provider_config`)."""
    return {
        name: ADAPTERS[name](endpoints, timeout_seconds=timeout_seconds)
        for name, endpoints in parse_provider_config(text).items()
    }


__all__ = [
    "ADAPTERS",
    "PROVIDERS",
    "OAuth2Adapter",
    "PermanentRefreshError",
    "ProviderAdapter",
    "ProviderEndpoints",
    "RefreshError",
    "TemporaryRefreshError",
    "TokenSet",
    "load_adapters",
    "parse_provider_config",
]
