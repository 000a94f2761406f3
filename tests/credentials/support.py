"""Test helpers for provider tokens: the OAuth server process, an injected clock."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.credentials.oauth_server import CLIENT_ID, CLIENT_SECRET

ROOT = Path(__file__).resolve().parents[2]


class OAuthServer:
    """The test authorization server as a real process (``tests/credentials/oauth_server.py``)."""

    def __init__(self, state_file: Path) -> None:
        self.state_file = state_file
        self.port = 0
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.credentials.oauth_server",
                "--state",
                str(self.state_file),
                "--port",
                str(self.port),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("PORT "), line
        self.port = int(line.split()[1])

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            if self.process.stdout is not None:
                self.process.stdout.close()
            self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def provider_config(self, provider: str = "render", *, revocation: bool = True) -> str:
        entry: dict[str, str] = {
            "token_url": f"{self.url}/token",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }
        if revocation:
            entry["revocation_url"] = f"{self.url}/revoke"
        return json.dumps({provider: entry})

    async def admin(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as client:
            if body is None:
                response = await client.get(f"{self.url}/_admin/{path}")
            else:
                response = await client.post(f"{self.url}/_admin/{path}", json=body)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def seed(self, *tokens: str) -> None:
        await self.admin("seed", {"tokens": list(tokens)})

    async def configure(self, **config: Any) -> None:
        await self.admin("config", config)

    async def stats(self) -> dict[str, Any]:
        return await self.admin("stats")


class FakeClock:
    """Epoch seconds that move only when someone sleeps (or the test says so)."""

    def __init__(self, start: float) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(seconds, 0.0)
        await asyncio.sleep(0)
