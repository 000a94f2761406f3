"""Refreshes provider tokens before they expire (issue 16).

Each token is due at ``share`` of its lifetime, plus or minus ``jitter`` of it at random
(:func:`~controller.credentials.states.refresh_time`), a time computed once when the
token is stored, so every controller (and a restarted one) agrees on it, and tokens
issued together spread out. On top of that one controller starts at most
``rate_per_second`` refreshes per second and runs at most ``concurrency`` at once.

A pass: ask the store which tokens are due and not leased, then for each take the lease
(:meth:`CredentialStates.acquire`, one conditional UPDATE: across controllers exactly one
wins), decrypt the refresh token, call the provider's adapter, and store the outcome
conditionally on the lease:

* success → the new token (and the new refresh token if the provider rotated it) stored
  encrypted, version + 1, next refresh scheduled, the node told (``on_changed``);
* ``invalid_grant`` → state ``revoked`` (or ``expired`` if its expiry has passed), no
  more refreshes, an alert for the user;
* anything temporary → retried with exponential backoff and jitter
  (:func:`~controller.credentials.states.retry_time`), before the expiry while there is
  time; once the expiry has passed the state shows ``expired`` (one alert) and retries go
  on at the longest backoff: the refresh token may outlive the access token.

A controller that dies mid-refresh holds the lease until ``lease_until``; then another
controller (or itself, restarted) takes it. The clock, the sleep and the random source
are injected, so the schedule is tested without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from controller.credentials.providers import (
    PermanentRefreshError,
    ProviderAdapter,
    TemporaryRefreshError,
)
from controller.credentials.states import (
    ACTIVE,
    EXPIRED,
    OAUTH_TOKEN_PURPOSE,
    REFRESH_TOKEN_PURPOSE,
    REVOKED,
    CredentialStates,
    Leased,
    as_datetime,
    refresh_time,
    retry_time,
)
from controller.vault import Vault, VaultError
from controller.vault.audit import audit_context

log = logging.getLogger("a67.credentials")

CREDENTIALS_REVOKED = "credentials_revoked"
CREDENTIALS_EXPIRED = "credentials_expired"

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Changed = Callable[[str, int], Awaitable[None]]
Alert = Callable[[str, str, str], Awaitable[None]]
"""``alert(user_id, kind, message)``."""


class RateLimiter:
    """Starts at most ``rate`` events per second, evenly spaced (on the injected clock)."""

    def __init__(self, rate: float, clock: Clock, sleep: Sleep) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        self._interval = 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._next = float("-inf")
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self._lock:
            now = self._clock()
            if now < self._next:
                await self._sleep(self._next - now)
                now = self._clock()
            self._next = max(now, self._next) + self._interval


class Refresher:
    """The refresh loop of one controller (see the module documentation)."""

    def __init__(
        self,
        *,
        states: CredentialStates,
        vault: Vault,
        adapters: dict[str, ProviderAdapter],
        share: float = 0.75,
        jitter: float = 0.1,
        rate_per_second: float = 20.0,
        concurrency: int = 8,
        lease_seconds: float = 60.0,
        poll_seconds: float = 30.0,
        backoff_seconds: float = 5.0,
        batch: int = 500,
        on_changed: Changed | None = None,
        alert: Alert | None = None,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        owner: str | None = None,
    ) -> None:
        self.states = states
        self._vault = vault
        self.adapters = adapters
        self.share = share
        self.jitter = jitter
        self._concurrency = concurrency
        self._lease_seconds = lease_seconds
        self._poll_seconds = poll_seconds
        self._backoff_seconds = backoff_seconds
        self._batch = batch
        self.on_changed = on_changed
        self.alert = alert
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.SystemRandom()
        self.owner = owner or f"controller-{uuid.uuid4().hex[:16]}"
        self._limiter = RateLimiter(rate_per_second, clock, sleep)
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.observer: Callable[[str, float], None] | None = None
        """Called with (node id, clock time) as each refresh starts (tests, benchmarks)."""

    # -- schedule -------------------------------------------------------------------------

    def schedule(
        self, obtained_at: float, expires_at: float | None, provider: str, refreshable: bool
    ) -> float | None:
        """When a token just stored should be refreshed (None: never, it cannot be)."""
        if expires_at is None or not refreshable or provider not in self.adapters:
            return None
        return refresh_time(obtained_at, expires_at, self.share, self.jitter, self._rng)

    # -- running --------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="a67-credential-refresher")

    async def stop(self, grace_seconds: float = 15.0) -> None:
        """Start no more refreshes; let those in flight finish (at most ``grace_seconds``:
        cut short, a refresh keeps its lease until it runs out, as after a crash)."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=grace_seconds)
            if not done:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for adapter in self.adapters.values():
            await adapter.close()

    def wake(self) -> None:
        """Look for due tokens now (a token was stored with an early refresh time)."""
        self._wake.set()

    async def adopt(self) -> int:
        """Schedule the refreshable tokens that have no refresh time (stored while their
        provider was not configured); how many."""
        adopted = 0
        for node_id, version, obtained, expires in await self.states.unscheduled(sorted(self.adapters)):
            when = refresh_time(obtained, expires, self.share, self.jitter, self._rng)
            if await self.states.schedule(node_id, version, when):
                adopted += 1
        if adopted:
            log.info(
                "scheduled the refresh of %d provider tokens stored before their provider was configured",
                adopted,
            )
        return adopted

    async def _run(self) -> None:
        try:
            await self.adopt()
        except Exception:
            log.warning("could not schedule unscheduled provider tokens", exc_info=True)
        while not self._stopping:
            started = 0
            try:
                started = await self.run_once()
            except Exception:
                log.warning("provider-token refresh pass failed; trying again later", exc_info=True)
            if started >= self._batch or self._stopping:
                continue
            await self._idle(await self._wait_seconds(started))

    async def _wait_seconds(self, started: int) -> float:
        try:
            next_due = await self.states.next_due()
        except Exception:
            return self._poll_seconds
        if next_due is None:
            return self._poll_seconds
        wait = next_due - self._clock()
        if started == 0:  # due but leased elsewhere: do not spin
            wait = max(wait, 1.0)
        return min(max(wait, 0.0), self._poll_seconds)

    async def _idle(self, seconds: float) -> None:
        self._wake.clear()
        if self._stopping:
            return
        sleeper = asyncio.ensure_future(self._sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    async def run_once(self) -> int:
        """One pass over the tokens due now; how many refreshes were attempted."""
        due = await self.states.due(self._clock(), self._batch)
        tasks: list[asyncio.Task[Any]] = []
        for node_id in due:
            if self._stopping:
                break
            await self._limiter.wait()
            await self._slots.acquire()
            tasks.append(asyncio.create_task(self._guarded(node_id)))
        if tasks:
            await asyncio.gather(*tasks)
        return len(due)

    async def _guarded(self, node_id: str) -> None:
        try:
            await self.refresh_one(node_id)
        except Exception:
            # The lease runs out by itself; the token is tried again after it.
            log.warning("refreshing the provider token of node %s failed", node_id, exc_info=True)
        finally:
            self._slots.release()

    async def refresh_one(self, node_id: str) -> str:
        """Refresh one token if it is due and its lease is free; the outcome, for tests:
        ``skipped``, ``refreshed``, ``lost`` (lease or version moved on), ``revoked``,
        ``expired``, ``retry`` or ``not_refreshable``."""
        now = self._clock()
        leased = await self.states.acquire(node_id, self.owner, now, self._lease_seconds)
        if leased is None:
            return "skipped"
        if self.observer is not None:
            self.observer(node_id, now)
        adapter = self.adapters.get(leased.provider)
        sealed_refresh = leased.credentials.get("refresh_token")
        if adapter is None or not isinstance(sealed_refresh, str) or not sealed_refresh:
            await self.states.fail(
                leased,
                self.owner,
                now=now,
                state=leased.state,
                refresh_at=None,
                failures=leased.failures,
                error="not_refreshable",
            )
            return "not_refreshable"
        try:
            with audit_context(actor="controller", reason="provider token refresh"):
                refresh_token = self._vault.decrypt_str(
                    sealed_refresh, owner=node_id, purpose=REFRESH_TOKEN_PURPOSE
                )
        except VaultError:
            log.error("node %s: its stored refresh token cannot be decrypted", node_id)
            return await self._permanent(leased, "undecryptable")
        try:
            tokens = await adapter.refresh(refresh_token, now=now)
        except PermanentRefreshError as exc:
            return await self._permanent(leased, exc.code)
        except TemporaryRefreshError as exc:
            return await self._temporary(leased, exc.code)
        finally:
            del refresh_token
        done = self._clock()
        credentials = dict(leased.credentials)
        credentials["oauth_token"] = self._vault.encrypt_str(
            tokens.access_token, owner=node_id, purpose=OAUTH_TOKEN_PURPOSE
        )
        if tokens.refresh_token:
            credentials["refresh_token"] = self._vault.encrypt_str(
                tokens.refresh_token, owner=node_id, purpose=REFRESH_TOKEN_PURPOSE
            )
        expiry = as_datetime(tokens.expires_at)
        if expiry is not None:
            credentials["oauth_expires_at"] = expiry.isoformat()
        else:
            credentials.pop("oauth_expires_at", None)
        version = await self.states.complete(
            leased,
            self.owner,
            credentials=credentials,
            now=done,
            expires_at=tokens.expires_at,
            refresh_at=self.schedule(done, tokens.expires_at, leased.provider, True),
        )
        if version is None:
            log.warning("node %s: a refreshed provider token was not stored (its lease moved on)", node_id)
            return "lost"
        log.info(
            "node %s: provider token refreshed (version %d%s)",
            node_id,
            version,
            ", refresh token rotated" if tokens.rotated else "",
        )
        if self.on_changed is not None:
            await self.on_changed(node_id, version)
        return "refreshed"

    async def _permanent(self, leased: Leased, code: str) -> str:
        now = self._clock()
        expired = leased.expires_at is not None and leased.expires_at <= now
        state = EXPIRED if expired else REVOKED
        stored = await self.states.fail(
            leased,
            self.owner,
            now=now,
            state=state,
            refresh_at=None,
            failures=leased.failures + 1,
            error=code,
        )
        if stored:
            log.warning(
                "node %s: the provider refused its refresh token (%s): %s", leased.node_id, code, state
            )
            await self._alert(
                leased.user_id,
                CREDENTIALS_EXPIRED if expired else CREDENTIALS_REVOKED,
                f"The {leased.provider} token of node {leased.node_id} is {state}: the provider refused "
                f"to refresh it ({code}). Replace it with UpdateNodeCredentials.",
            )
        return state

    async def _temporary(self, leased: Leased, code: str) -> str:
        now = self._clock()
        failures = leased.failures + 1
        state = leased.state
        newly_expired = state == ACTIVE and leased.expires_at is not None and leased.expires_at <= now
        if newly_expired:
            state = EXPIRED
        retry = retry_time(now, failures, self._backoff_seconds, leased.expires_at, self._rng)
        stored = await self.states.fail(
            leased, self.owner, now=now, state=state, refresh_at=retry, failures=failures, error=code
        )
        log.info(
            "node %s: provider token refresh failed (%s, %d in a row); retrying in %.0f s",
            leased.node_id,
            code,
            failures,
            retry - now,
        )
        if stored and newly_expired:
            await self._alert(
                leased.user_id,
                CREDENTIALS_EXPIRED,
                f"The {leased.provider} token of node {leased.node_id} expired: refreshing it keeps "
                f"failing ({code}); the controller keeps trying.",
            )
        return "retry"

    async def _alert(self, user_id: str, kind: str, message: str) -> None:
        if self.alert is None:
            return
        try:
            await self.alert(user_id, kind, message)
        except Exception:
            log.warning("could not raise a %s alert for user %s", kind, user_id, exc_info=True)


__all__ = ["CREDENTIALS_EXPIRED", "CREDENTIALS_REVOKED", "RateLimiter", "Refresher"]
