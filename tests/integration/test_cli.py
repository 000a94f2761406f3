"""The ``a67`` user CLI end to end: real ``a67`` processes against a real controller and
real agent processes (no mocked client).

1. Accounts: register, whoami, wrong password, automatic refresh, a revoked session, logout.
2. The fleet: ``nodes enroll`` prints a command that enrolls a real agent; deploy the
   examples/ app from its directory and follow it to running; open it; scale; ``apps show
   --json``; a broken app fails with exit 1; databases: create, schema, query as a table,
   JSON and CSV; bad SQL and an unknown app give their exit codes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from automator67.v1 import auth_pb2, auth_pb2_grpc

from controller.server import Controller
from tests.integration.test_deployments_real import _free_port, processes
from tests.support import bearer, controller_settings, running_controller

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hello"
PASSWORD = "correct horse battery staple"
HEARTBEAT = 0.3


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class A67:
    """Runs ``a67`` (``python -m controller.cli``) as a real process with its own config dir."""

    def __init__(self, address: str, config: Path) -> None:
        self.address = address
        self.config = config

    async def __call__(self, *args: str, stdin: str | None = None, cwd: Path | None = None) -> Result:
        env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
        env.update(A67_CONTROLLER=self.address, A67_CONFIG_DIR=str(self.config), COLUMNS="200")
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "controller.cli", *args],
            input=stdin or "",
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd or ROOT,
            timeout=300,
        )
        return Result(done.returncode, done.stdout, done.stderr)


async def until(check: Callable[[], Awaitable[bool]], what: str, within: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.2)


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    settings = controller_settings(
        tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT, access_token_ttl_seconds=5
    )
    async with running_controller(settings) as running:
        yield running


@pytest.fixture
def a67(controller: Controller, tmp_path: Path) -> A67:
    return A67(controller.address, tmp_path / "config")


# --------------------------------------------------------------------------- accounts


async def test_accounts_sessions_and_their_errors(a67: A67, controller: Controller) -> None:
    made = await a67("register", "--email", "Ada@Example.com", "--password-stdin", stdin=PASSWORD + "\n")
    assert made.code == 0, made.err
    assert "ada@example.com" in made.out
    creds = a67.config / "credentials.json"
    assert stat.S_IMODE(a67.config.stat().st_mode) == 0o700
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert PASSWORD not in creds.read_text()

    me = await a67("whoami", "--json")
    assert me.code == 0, me.err
    assert me.json()["user"]["email"] == "ada@example.com"
    assert me.json()["controller"] == controller.address

    # The access token lives 5 s here, inside the CLI's 30 s margin: every command refreshes
    # (rotating the single-use refresh token) and still works.
    before = json.loads(creds.read_text())[controller.address]["refresh_token"]
    assert (await a67("whoami")).code == 0
    after = json.loads(creds.read_text())[controller.address]
    assert after["refresh_token"] != before

    wrong = await a67("login", "--email", "ada@example.com", "--password-stdin", stdin="not the password\n")
    assert wrong.code == 3
    assert "Wrong email or password" in wrong.err
    assert "INVALID_CREDENTIALS" in wrong.err
    assert "Traceback" not in wrong.err
    wrong_json = await a67(
        "login", "--email", "ada@example.com", "--password-stdin", "--json", stdin="nope-nope\n"
    )
    assert wrong_json.code == 3
    assert json.loads(wrong_json.err)["error"]["reason"] == "INVALID_CREDENTIALS"

    again = await a67("login", "--email", "ADA@example.com", "--password-stdin", stdin=PASSWORD + "\n")
    assert again.code == 0, again.err

    # The session is ended elsewhere: the CLI says so and how to sign in again.
    import grpc

    access = json.loads(creds.read_text())[controller.address]["access_token"]
    async with grpc.aio.insecure_channel(controller.address) as channel:
        await auth_pb2_grpc.AuthServiceStub(channel).Logout(auth_pb2.LogoutRequest(), metadata=bearer(access))
    ended = await a67("whoami")
    assert ended.code == 3
    assert "expired or was ended" in ended.err
    assert "a67 login" in ended.err
    assert controller.address not in json.loads(creds.read_text())

    assert (
        await a67("login", "--email", "ada@example.com", "--password-stdin", stdin=PASSWORD + "\n")
    ).code == 0
    out = await a67("logout")
    assert out.code == 0
    assert "Signed out" in out.out
    gone = await a67("whoami", "--json")
    assert gone.code == 3
    assert json.loads(gone.err)["error"]["reason"] == "NOT_SIGNED_IN"

    short = await a67("register", "--email", "bob@example.com", "--password-stdin", stdin="short\n")
    assert short.code == 5
    assert "at least 8 characters" in short.err
    taken = await a67("register", "--email", "ada@example.com", "--password-stdin", stdin=PASSWORD + "\n")
    assert taken.code == 6, taken.err


async def test_an_unreachable_controller_is_exit_8(tmp_path: Path) -> None:
    cli = A67(f"127.0.0.1:{_free_port()}", tmp_path / "config")
    result = await cli("login", "--email", "ada@example.com", "--password-stdin", stdin=PASSWORD + "\n")
    assert result.code == 8
    assert "Cannot reach the controller" in result.err
    assert "Traceback" not in result.err


# --------------------------------------------------------------------------- the fleet


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a local test URL)
        return str(response.read().decode())


def agent_args(line: str, port_range: str) -> tuple[dict[str, str], list[str]]:
    """The printed ``A67_AGENT_TOKEN=… a67 agent …`` line as (env, argv) to run here."""
    words = shlex.split(line)
    assignment, program, *rest = words
    name, _, token = assignment.partition("=")
    assert name == "A67_AGENT_TOKEN"
    assert token.startswith("a67e_")
    assert program == "a67"
    assert rest[0] == "agent"
    assert token not in rest  # the secret is not on the agent's command line
    argv = [sys.executable, "-m", "controller.cli", *rest, "--replica-port-range", port_range]
    return {"A67_AGENT_TOKEN": token}, argv


async def test_fleet_deploy_and_databases(a67: A67, controller: Controller, tmp_path: Path) -> None:
    assert (
        await a67("register", "--email", "ada@example.com", "--password-stdin", stdin=PASSWORD + "\n")
    ).code == 0
    with processes(tmp_path) as procs:
        for i, region in enumerate(("east", "west")):
            enroll = await a67(
                "nodes", "enroll", "--region", region, "--node-types", "compute,database",
                "--data-dir", str(tmp_path / f"agent-{region}"),
            )  # fmt: skip
            assert enroll.code == 0, enroll.err
            assert "shown only now" in enroll.err
            line = enroll.out.strip()
            assert len(line.splitlines()) == 1  # one line to copy, never wrapped
            assert len(line) > 80
            assert line.startswith("A67_AGENT_TOKEN=a67e_")
            assert f"--controller {controller.address}" in line
            env, argv = agent_args(line, f"{21000 + 500 * i}-{21499 + 500 * i}")
            procs.start(argv, f"agent-{region}.log", env)

        async def two_ready() -> bool:
            listed = await a67("nodes", "--json")
            return (
                listed.code == 0
                and len(listed.json()["nodes"]) == 2
                # a real agent on a loaded machine reports BUSY (CPU over 90 %): connected and schedulable
                and all(
                    n["status"] in ("NODE_STATUS_READY", "NODE_STATUS_BUSY") for n in listed.json()["nodes"]
                )
            )

        await until(two_ready, "both agents to enroll and be ready")
        first = (await a67("nodes", "--json")).json()["nodes"][0]["id"]
        drained = await a67("nodes", "drain", first[:8], "--json")
        assert drained.code == 0, drained.err
        assert drained.json()["node"]["status"] == "NODE_STATUS_DRAINING"
        undrained = await a67("nodes", "undrain", first[:8])
        assert undrained.code == 0, undrained.err
        assert "takes new replicas again" in undrained.out
        await until(two_ready, "the undrained node to be ready again")
        quiet = await a67("alerts")
        assert quiet.code == 0, quiet.err
        assert "No alert applies now" in quiet.out
        assert (await a67("alerts", "--all", "--json")).json() == {"alerts": []}
        lifted = await a67("alerts", "unfreeze")
        assert lifted.code == 0, lifted.err
        assert "was not frozen" in lifted.out
        table = await a67("nodes")
        assert table.code == 0
        assert "east" in table.out
        assert "west" in table.out
        assert "ready" in table.out or "busy" in table.out  # busy: real agents on a loaded machine

        # Deploy the example from a copy of its directory (with a file .a67ignore keeps out).
        app_dir = tmp_path / "hello"
        shutil.copytree(EXAMPLE, app_dir)
        (app_dir / "debug.log").write_text("not uploaded\n")
        deployed = await a67("deploy", str(app_dir), "--env", "GREETING=hi", "--explain")
        assert deployed.code == 0, deployed.err
        assert "hello is running: 2 of 2 replicas" in deployed.out
        assert "replica 0 on node" in deployed.err  # followed live
        assert "placement" in deployed.out  # --explain

        url = await a67("apps", "url", "hello")
        assert url.code == 0, url.err
        reply = json.loads(await asyncio.to_thread(_get, url.out.strip()))
        assert reply["message"] == "hi from Automator67"

        shown = await a67("apps", "show", "hello", "--json")
        assert shown.code == 0
        deployment = shown.json()["deployment"]
        assert deployment["status"] == "DEPLOYMENT_STATUS_RUNNING"
        assert deployment["desired_replicas"] == 2
        assert len(deployment["endpoints"]) == 2
        assert deployment["manifest"]["app_type"] == "APP_TYPE_BACKEND"

        too_many = await a67("apps", "scale", "hello", "20")
        assert too_many.code == 9, (too_many.code, too_many.err)  # answered: no capacity now
        assert "INSUFFICIENT_CAPACITY" in too_many.err
        scaled = await a67("apps", "scale", "hello", "1")
        assert scaled.code == 0, scaled.err
        after = (await a67("apps", "show", "hello", "--json")).json()["deployment"]
        assert after["desired_replicas"] == 1
        assert after["current_replicas"] == 1

        listed = await a67("apps")
        assert listed.code == 0
        assert "hello" in listed.out
        assert "running" in listed.out

        unknown = await a67("apps", "show", "nope")
        assert unknown.code == 4
        assert "APP_NOT_FOUND" in unknown.err

        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "app.py").write_text("import sys\nprint('cannot start')\nsys.exit(3)\n")
        failed = await a67(
            "deploy", str(broken), "--type", "backend", "--runtime", "python", "--entrypoint", "app.py",
            "--replicas", "1", "--memory", "64MB", "--cpu", "0.1",
        )  # fmt: skip
        assert failed.code == 1, failed.err
        assert "The rollout of broken failed" in failed.err
        assert "DEPLOYMENT_FAILED" in failed.err

        # Databases: create, schema from a file, insert, query as a table, JSON and CSV.
        created = await a67("db", "create", "shop", "--key", "customer_id", "--shards", "2")
        assert created.code == 0, created.err
        schema = tmp_path / "schema.sql"
        schema.write_text(
            "CREATE TABLE orders (id INTEGER NOT NULL, customer_id INTEGER NOT NULL, status TEXT, "
            "PRIMARY KEY (customer_id, id))"
        )
        applied = await a67("db", "schema", "shop", "-f", str(schema))
        assert applied.code == 0, applied.err
        assert "orders" in applied.out
        assert "customer_id" in applied.out
        shown = await a67("db", "schema", "shop", stdin="")  # a script's empty stdin: show, not fail
        assert shown.code == 0, shown.err
        assert "orders" in shown.out
        inserted = await a67(
            "db",
            "query",
            "shop",
            stdin="INSERT INTO orders VALUES (1, 10, 'paid'), (2, 11, 'open'), (3, 12, 'paid')",
        )
        assert inserted.code == 0, inserted.err
        sql = "SELECT status, COUNT(*) AS n FROM orders GROUP BY status ORDER BY status"
        table = await a67("db", "query", "shop", sql)
        assert table.code == 0, table.err
        lines = [line for line in table.out.splitlines() if "paid" in line or "open" in line]
        assert len(lines) == 2
        assert "2" in lines[1]
        assert "1" in lines[0]
        assert "status" in table.out
        assert "2 rows from 2 shards" in table.err
        as_json = await a67("db", "query", "shop", sql, "--json")
        assert as_json.code == 0
        assert as_json.json()["data"] == [["open", 1], ["paid", 2]]
        assert [c["name"] for c in as_json.json()["columns"]] == ["status", "n"]
        as_csv = await a67("db", "query", "shop", sql, "--csv")
        assert as_csv.out == "status,n\nopen,1\npaid,2\n"

        bad = await a67("db", "query", "shop", "SELEC nonsense FROM")
        assert bad.code == 5, bad.err
        assert "Traceback" not in bad.err
        assert "(" in bad.err
        no_db = await a67("db", "query", "nowhere", "SELECT 1")
        assert no_db.code == 4
        assert "DATABASE_NOT_FOUND" in no_db.err

        metrics = await a67("metrics", "--json")
        assert metrics.code == 0
        assert metrics.json()["metrics"]["total_nodes"] == 2
        watched = await a67("metrics", "--watch", "--json", "--count", "2", "--interval", "0.2")
        assert watched.code == 0, watched.err
        assert len(watched.out.splitlines()) == 2

        removed = await a67("apps", "remove", "hello", "--yes")
        assert removed.code == 0, removed.err
        assert "hello" not in (await a67("apps")).out
