"""The README's and docs' shell examples, run against a live system so they cannot drift.

Every ```sh / ```bash block of README.md and docs/*.md runs (tests/e2e/docs_examples.py says
how), unless marked ``<!-- not run: <reason> -->`` right before it. Each page gets its own
``a67 up`` on free ports, its own $HOME and user, and real agents where its blocks start them.
A page passes when its blocks exit 0 together, and when the outcomes its comments state
(``# 401``, ``# {"message": "hello from Automator67", …}``, …) show up in the output.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import free_port
from tests.e2e.docs_examples import (
    REPO,
    Block,
    PageRun,
    Ports,
    blocks,
    doc_pages,
    page_environment,
    page_script,
    prepare_workdir,
    run_script,
    stray_markers,
    system,
)

PAGE_TIMEOUT = 420.0
"""Seconds one page may take (generous: the machine is shared and may be loaded)."""

EXPECTED: dict[str, list[str]] = {
    # What the pages' comments say a command prints; each must appear in the page's stdout.
    "README.md": [
        '"message": "hello from Automator67"',  # curl "$(a67 apps url hello)"
        "HTTP/1.1 201 Created",  # REST register
        "HTTP/1.1 401 Unauthorized",  # /auth/me without a token
        '"status": "SERVING"',  # grpc.health.v1.Health/Check
        "NODE_STATUS_",  # ListNodes after the agent enrolled
    ],
    "docs/gateway.md": ["HTTP/1.1 201 Created", "HTTP/1.1 401 Unauthorized", "automator67.v1.AuthService"],
    "docs/ingress.md": [
        '"message": "hello from Automator67"',
        "\n404\n",
        '{"message":"No app is served at this address","status":404}',
    ],
    "docs/deployments.md": ['"deployment_id":"', '{"endpoint":"http://', "DEPLOYMENT_STATUS_RUNNING"],
    "docs/databases.md": ['"data":[[7,9.5],[8,3]]', '"rows_returned": "1"'],
    "docs/cli.md": [
        '{"message": "hi from Automator67"',
        "Removed hello2.",
        "Uploaded reports/q1.csv: 15 bytes, 1 copy.",
        "\nhello\nRemoved notes/hello.txt.\n",
    ],
    "docs/storage.md": [
        "HTTP/1.1 206 Partial Content",
        "content-range: bytes 0-6/22",
        '"replication_status":"REPLICATION_STATUS_COMPLETE"',
        "\nreports/people.csv\n",
        "\nhello\n",  # DownloadFile through grpcurl
        "\nnotes/hello.txt\n",
        "{}\n404\n",  # deleted, then missing
    ],
    "docs/nodes.md": [
        '"max_uses":2',
        "\nNODE_STATUS_DRAINING\n",
        "\nNODE_STATUS_REMOVED\n",
        "\nus-east\n",  # GetNode through grpcurl
        '"field":"region"',  # RegisterNode's field violations through grpcurl
    ],
    "docs/security.md": [
        "201\n401\n401\n",
        "5 401",  # eight wrong passwords at once: five checked …
        " 429",  # … the rest refused unchecked
        "\n413\n",
        '"reason":"NODE_NOT_FOUND"',  # another user's node, exactly like a missing one
        "refused: 2",
    ],
    "docs/auth.md": [
        "MVdRfo5RZD6gd6mtmqwWcw+UP2jTprKIl73eTV7ZbpY=",
        "REFRESH_TOKEN_REUSED",
        "SESSION_REVOKED",
        "\nada@example.com\n",
    ],
}


def _pages() -> list[Path]:
    return [page for page in doc_pages() if any(b.not_run is None for b in blocks(page))]


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_every_not_run_marker_gives_a_reason_and_marks_a_block() -> None:
    problems = []
    for page in doc_pages():
        for block in blocks(page):
            if block.not_run is not None and len(block.not_run) < 10:
                problems.append(f"{block.where}: say why it is not run")
        problems += [f"{_name(page)}:{line}: marker before no sh/bash block" for line in stray_markers(page)]
    assert not problems, "\n".join(problems)


def test_the_pages_with_expectations_have_runnable_blocks() -> None:
    runnable = {_name(page) for page in _pages()}
    assert set(EXPECTED) <= runnable, set(EXPECTED) - runnable


@pytest.mark.parametrize("page", _pages(), ids=_name)
def test_docs_examples_run(page: Path, tmp_path: Path) -> None:
    runnable: list[Block] = [b for b in blocks(page) if b.not_run is None]
    ports = Ports(grpc=free_port(), node=free_port(), http=free_port(), ingress=free_port(), xds=free_port())
    home = prepare_workdir(tmp_path)
    env = page_environment(home, ports)
    with system(tmp_path, ports, env) as up_log:
        result = run_script(page_script(runnable, ports, tmp_path), tmp_path, env, PAGE_TIMEOUT)
        if result.returncode != 0:
            pytest.fail(
                _failure(page, result, [up_log, *tmp_path.glob("*.log"), *(tmp_path / "tmp").glob("*.log")])
            )
    missing = [text for text in EXPECTED.get(_name(page), []) if text not in result.stdout]
    assert not missing, f"{_name(page)}: not in the output: {missing}\n--- stdout\n{result.stdout[-4000:]}"


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _failure(page: Path, result: PageRun, logs: list[Path]) -> str:
    """The page's stderr (which names each block as it starts), its stdout, and the system's logs."""
    parts = [f"{_name(page)}: the examples exited with {result.returncode}"]
    parts += ["--- stderr (last 80 lines)", _tail(result.stderr, 80), "--- stdout (last 40 lines)"]
    parts.append(_tail(result.stdout, 40))
    for log in logs:
        if log.is_file():
            parts += [f"--- {log.name} (last 30 lines)", _tail(log.read_text(errors="replace"), 30)]
    return "\n".join(parts)
