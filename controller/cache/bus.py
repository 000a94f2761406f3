"""Invalidation messages between controllers: in-process, or Redis pub/sub.

A controller that keeps hot state in its own memory (sessions, user records:
:mod:`controller.auth.session_cache`) must hear when another controller changes it.
An :class:`InvalidationBus` carries short text messages to every listener of every
controller sharing the bus, the sender's own included:

* :class:`LocalBus` — in-process: every listener of one bus (one cache object) hears
  every message at once. A controller with the ``memory://`` cache has no peers it
  could tell, so other controllers sharing its store notice changes only when their
  cached entries expire.
* :class:`RedisBus` — ``PUBLISH``/``SUBSCRIBE`` on one channel of the configured
  Redis. Pub/sub is fire-and-forget: a controller that is not subscribed (starting,
  or its connection broke) misses messages. So the bus is :attr:`~RedisBus.live` only
  while subscribed; listeners are *reset* (told to forget everything) whenever the
  subscription is (re)established or lost, and they must not trust cached state while
  the bus is not live. A message published while a peer's connection is broken but
  not yet noticed is lost; cached entries therefore also expire on their own.

Listeners are plain callables run on the event loop; they must be quick and must not
raise (an exception is logged and ignored).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

Listener = Callable[[str], None]
Reset = Callable[[], None]
Sleep = Callable[[float], Awaitable[None]]

CHANNEL = "a67:invalidate"
"""The pub/sub channel (after the cache's key prefix)."""

RECONNECT_SECONDS = 1.0
"""Pause between attempts to (re)subscribe after the connection failed."""

HEALTH_CHECK_SECONDS = 1.0
"""How long the subscriber's connection may be silent before it is pinged (redis-py)."""

SOCKET_TIMEOUT_SECONDS = 3.0
"""A ping unanswered this long means the subscription is lost (the bus stops being live)."""


class InvalidationBus(Protocol):
    """Delivers each published message to every subscribed listener (of every process)."""

    @property
    def live(self) -> bool:
        """Whether this process is receiving messages now (cached state may be trusted)."""
        ...

    def subscribe(self, listener: Listener, reset: Reset) -> None:
        """Call ``listener(message)`` for each message, ``reset()`` when messages may have been missed."""
        ...

    async def start(self) -> None:
        """Begin receiving (idempotent)."""
        ...

    async def publish(self, message: str) -> None:
        """Send ``message`` to every listener; never raises (a failure is logged)."""
        ...

    async def close(self) -> None:
        """Stop receiving."""
        ...


def _deliver(listeners: list[tuple[Listener, Reset]], message: str) -> None:
    for listener, _ in listeners:
        try:
            listener(message)
        except Exception:
            log.exception("an invalidation listener failed on %r", message)


def _reset(listeners: list[tuple[Listener, Reset]]) -> None:
    for _, reset in listeners:
        try:
            reset()
        except Exception:
            log.exception("an invalidation listener failed to reset")


class LocalBus:
    """The in-process bus: always live, delivery is immediate and synchronous."""

    def __init__(self) -> None:
        self._listeners: list[tuple[Listener, Reset]] = []

    @property
    def live(self) -> bool:
        return True

    def subscribe(self, listener: Listener, reset: Reset) -> None:
        self._listeners.append((listener, reset))

    async def start(self) -> None:
        return None

    async def publish(self, message: str) -> None:
        _deliver(self._listeners, message)

    async def close(self) -> None:
        self._listeners.clear()


class RedisBus:
    """Redis pub/sub on one channel; live only while subscribed (see the module docstring)."""

    def __init__(
        self,
        url: str,
        channel: str = CHANNEL,
        *,
        reconnect_seconds: float = RECONNECT_SECONDS,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._url = url
        self._channel = channel
        self._reconnect_seconds = reconnect_seconds
        self._sleep = sleep
        self._listeners: list[tuple[Listener, Reset]] = []
        self._live = False
        self._task: asyncio.Task[None] | None = None
        self._publisher: Redis | None = None
        self._subscribed = asyncio.Event()

    @property
    def live(self) -> bool:
        return self._live

    @property
    def channel(self) -> str:
        return self._channel

    def subscribe(self, listener: Listener, reset: Reset) -> None:
        self._listeners.append((listener, reset))

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="a67-invalidation-bus")

    async def wait_live(self) -> None:
        """Until the subscription is established (for tests and start-up)."""
        await self.start()
        await self._subscribed.wait()

    def _client(self) -> Redis:
        return Redis.from_url(
            self._url,
            socket_timeout=SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
            health_check_interval=HEALTH_CHECK_SECONDS,
        )

    async def _run(self) -> None:
        warned = False
        while True:
            client = self._client()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                # Anything published before now was missed: start from nothing.
                _reset(self._listeners)
                self._live = True
                self._subscribed.set()
                if warned:
                    log.info("invalidation bus: subscribed again to %s", self._channel)
                    warned = False
                while True:
                    message = await pubsub.get_message(timeout=HEALTH_CHECK_SECONDS)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message.get("data")
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    _deliver(self._listeners, text)
            except (RedisError, OSError) as exc:
                if self._live or not warned:
                    log.warning(
                        "invalidation bus: lost the subscription (%s); cached sessions and users "
                        "are not trusted until it is back",
                        exc.__class__.__name__,
                    )
                    warned = True
            finally:
                was_live = self._live
                self._live = False
                self._subscribed.clear()
                if was_live:
                    _reset(self._listeners)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await client.aclose()
            await self._sleep(self._reconnect_seconds)

    async def publish(self, message: str) -> None:
        try:
            if self._publisher is None:
                self._publisher = self._client()
            await self._publisher.publish(self._channel, message)
        except (RedisError, OSError) as exc:
            log.warning(
                "invalidation bus: could not publish (%s); other controllers notice when their "
                "cached entries expire",
                exc.__class__.__name__,
            )
        # Our own listeners hear it now, whatever Redis did.
        _deliver(self._listeners, message)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher.aclose()
            self._publisher = None
        self._live = False


def invalidation_bus(cache: object) -> InvalidationBus:
    """The bus shared by everything using ``cache``: Redis pub/sub for a Redis cache, else in-process."""
    provider = getattr(cache, "invalidation_bus", None)
    if callable(provider):
        bus: InvalidationBus = provider()
        return bus
    return LocalBus()


__all__ = ["CHANNEL", "InvalidationBus", "LocalBus", "RedisBus", "invalidation_bus"]
