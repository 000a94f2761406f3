"""``a67 files`` end to end: a real controller, a real storage agent, the CLI in a subprocess.

Upload a file (several upload messages) and standard input, list (table and JSON), show,
download byte for byte (by path and by id), remove; a missing file exits 4.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

import grpc

from tests.integration.test_app_logs_real import _cli
from tests.integration.test_deployments_real import Client, processes
from tests.support import controller_settings, running_controller


async def test_cli_files_upload_list_show_download_remove(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=0.3)
    config = tmp_path / "config"
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            address = controller.address

            async def a67(*args: str, stdin: str = "") -> tuple[int, str, str]:
                done = await asyncio.to_thread(_cli, address, config, *args, stdin=stdin)
                return done.returncode, done.stdout, done.stderr

            code, _, err = await a67(
                "register",
                "--email",
                "ada@example.com",
                "--password-stdin",
                stdin="correct horse battery staple\n",
            )
            assert code == 0, err
            token = json.loads((config / "credentials.json").read_text())[address]["access_token"]
            client = Client(channel, token)
            args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(tmp_path / "store1")]
            args += ["--region", "eu-west", "--controller", address, "--node-types", "storage"]
            procs.start(args, "agent-store1.log", {"A67_AGENT_TOKEN": await client.enrollment(uses=1)})
            await client.wait_ready(1, within=60)

            data = os.urandom(2 * 1024 * 1024 + 4321)  # three upload messages
            local = tmp_path / "data.bin"
            local.write_bytes(data)
            code, out, err = await a67(
                "files", "upload", str(local), "--path", "x/data.bin", "--replicas", "1", "--json"
            )
            assert code == 0, err
            uploaded = json.loads(out)
            assert uploaded["path"] == "x/data.bin"
            assert uploaded["checksum"] == hashlib.sha256(data).hexdigest()
            assert uploaded["replication_status"] == "REPLICATION_STATUS_COMPLETE"
            code, out, err = await a67(
                "files", "upload", "-", "--path", "x/notes.txt", "--replicas", "1", stdin="hi\n"
            )
            assert code == 0, err
            assert "Uploaded x/notes.txt: 3 bytes, 1 copy." in out

            code, out, err = await a67("files", "--prefix", "x/")
            assert code == 0, err
            assert "x/data.bin" in out
            assert "x/notes.txt" in out
            code, out, err = await a67("files", "--json")
            assert code == 0, err
            assert sorted(f["path"] for f in json.loads(out)["files"]) == ["x/data.bin", "x/notes.txt"]
            code, out, err = await a67("files", "show", "x/data.bin")
            assert code == 0, err
            assert hashlib.sha256(data).hexdigest() in out
            assert "AES-256-GCM" in out

            target = tmp_path / "back.bin"
            code, _, err = await a67("files", "download", "x/data.bin", "-o", str(target))
            assert code == 0, err
            assert target.read_bytes() == data
            code, out, err = await a67("files", "download", "x/notes.txt")  # to standard output
            assert code == 0, err
            assert out == "hi\n"
            by_id = tmp_path / "by-id.bin"
            code, _, err = await a67("files", "download", uploaded["id"], "-o", str(by_id))
            assert code == 0, err
            assert by_id.read_bytes() == data

            code, out, err = await a67("files", "remove", "x/data.bin", "--yes")
            assert code == 0, err
            assert "Removed x/data.bin." in out
            code, _, err = await a67("files", "download", "x/data.bin", "-o", str(tmp_path / "gone.bin"))
            assert code == 4, err
            assert "You have no file 'x/data.bin'. (FILE_NOT_FOUND)" in err
            assert not (tmp_path / "gone.bin").exists()
            code, _, err = await a67("files", "show", "no-such-id")
            assert code == 4, err
