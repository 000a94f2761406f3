"""Fixtures that run a real controller (grpc.aio server on a free port)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from automator67.v1 import auth_pb2_grpc

from controller.server import Controller
from controller.store import Store
from tests.support import controller_settings, migrated_store, running_controller


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    """A fresh store (an SQLite file, and a new PostgreSQL database), migrated and open."""
    async with migrated_store(store_url) as opened:
        yield opened


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    async with running_controller(controller_settings(tmp_path)) as running:
        yield running


@pytest.fixture
async def channel(controller: Controller) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(controller.address) as chan:
        yield chan


@pytest.fixture
def auth_stub(channel: grpc.aio.Channel) -> auth_pb2_grpc.AuthServiceStub:
    return auth_pb2_grpc.AuthServiceStub(channel)
