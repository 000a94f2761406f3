"""argon2id password hashing: parameters, verification, rehash, and the event loop stays free."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from controller.auth.passwords import PasswordHasher

SECRET = "c2FsdGVkLWNsaWVudC1oYXNoLW9mLXRoZS1wYXNzd29yZA"


@pytest.fixture
def cheap() -> PasswordHasher:
    return PasswordHasher(time_cost=1, memory_cost=64)


async def test_default_parameters_are_owasp_argon2id() -> None:
    hasher = PasswordHasher()
    assert hasher.parameters == (2, 19456, 1)
    stored = await hasher.hash(SECRET)
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert SECRET not in stored
    assert await hasher.verify(stored, SECRET)
    assert not await hasher.verify(stored, SECRET + "x")
    assert not hasher.needs_rehash(stored)


async def test_verify_true_and_false(cheap: PasswordHasher) -> None:
    stored = await cheap.hash(SECRET)
    assert stored.startswith("$argon2id$v=19$m=64,t=1,p=1$")
    assert await cheap.verify(stored, SECRET)
    assert not await cheap.verify(stored, SECRET.upper())
    assert not await cheap.verify(stored, SECRET[:-1])


async def test_same_secret_hashes_differently(cheap: PasswordHasher) -> None:
    assert await cheap.hash(SECRET) != await cheap.hash(SECRET)


async def test_length_cap_never_truncates(cheap: PasswordHasher) -> None:
    limit = cheap.max_secret_length
    at_limit = "a" * limit
    stored = await cheap.hash(at_limit)
    assert await cheap.verify(stored, at_limit)
    assert not await cheap.verify(stored, at_limit + "b")  # not truncated to a match
    with pytest.raises(ValueError, match=f"longer than {limit} characters"):
        await cheap.hash(at_limit + "b")
    with pytest.raises(ValueError, match="empty"):
        await cheap.hash("")
    assert not await cheap.verify(stored, "")


async def test_invalid_stored_hash_is_a_mismatch(
    cheap: PasswordHasher, caplog: pytest.LogCaptureFixture
) -> None:
    assert not await cheap.verify("not-a-hash", SECRET)
    assert not await cheap.verify("$2b$12$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz01234", SECRET)
    assert SECRET not in caplog.text
    assert cheap.needs_rehash("not-a-hash")


async def test_needs_rehash_after_parameter_change(cheap: PasswordHasher) -> None:
    weak = await cheap.hash(SECRET)
    strong = PasswordHasher(time_cost=2, memory_cost=128)
    assert strong.needs_rehash(weak)
    assert await strong.verify(weak, SECRET)  # old hashes keep working
    assert not strong.needs_rehash(await strong.hash(SECRET))


async def test_dummy_verify_costs_about_one_verification() -> None:
    hasher = PasswordHasher()
    stored = await hasher.hash(SECRET)
    await hasher.verify(stored, "warm-up")

    def best_of(runs: list[float]) -> float:
        return min(runs)

    real: list[float] = []
    dummy: list[float] = []
    for _ in range(3):
        start = time.perf_counter()
        await hasher.verify(stored, "wrong")
        real.append(time.perf_counter() - start)
        start = time.perf_counter()
        await hasher.dummy_verify()
        dummy.append(time.perf_counter() - start)
    # Same work (same parameters): within a generous factor on a shared machine.
    assert best_of(dummy) > best_of(real) / 3
    assert best_of(dummy) < best_of(real) * 3


async def test_dummy_verify_with_custom_parameters(cheap: PasswordHasher) -> None:
    await cheap.dummy_verify()
    await cheap.dummy_verify(SECRET)
    await cheap.dummy_verify("x" * 5000)  # over the cap: still no error


async def test_hashing_runs_off_the_event_loop_thread() -> None:
    """argon2 runs in worker threads (and releases the GIL), so the loop keeps serving.

    Checked by where the work runs, not by timing the loop: that would depend on the
    machine's load.
    """
    hasher = PasswordHasher()
    loop_thread = threading.get_ident()
    threads: list[int] = []
    inner = hasher._hasher

    class Recording:
        def __getattr__(self, name: str) -> object:
            attribute = getattr(inner, name)
            if name not in ("hash", "verify"):
                return attribute

            def recorded(*args: object, **kwargs: object) -> object:
                threads.append(threading.get_ident())
                return attribute(*args, **kwargs)

            return recorded

    hasher._hasher = Recording()  # type: ignore[assignment]
    stored = await asyncio.gather(*(hasher.hash(f"{SECRET}{i}") for i in range(4)))
    assert all(await asyncio.gather(*(hasher.verify(s, f"{SECRET}{i}") for i, s in enumerate(stored))))
    await hasher.dummy_verify("not-the-password")
    assert len(threads) >= 9
    assert loop_thread not in threads


def test_repr_shows_parameters_only() -> None:
    assert repr(PasswordHasher()) == "PasswordHasher(argon2id, m=19456, t=2, p=1)"
