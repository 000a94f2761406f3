"""Runs the shell examples of README.md and docs/*.md against a live system.

What runs: every fenced block whose language is ``sh`` or ``bash``, unless the line before it
(blank lines aside) is ``<!-- not run: <reason> -->``. The default is that a block runs, so a
new example is tested unless someone writes down why it cannot be.

How a page runs (``run_page``):

* its own system: ``a67 up`` on free ports (controller gRPC and node port, REST gateway,
  ingress, xDS), its data in the page's own ``$HOME`` (``~/.local/share/automator67``, the
  documented default), so pages never share users, nodes or apps;
* all its blocks, in order, in one ``bash`` process with ``set -euo pipefail`` (variables carry
  over from block to block), in a working directory of its own that links ``examples/`` and
  ``.venv/`` of the checkout, with ``.venv/bin`` first on ``PATH``;
* the documented default addresses rewritten to the page's ports (``ADDRESSES``), and ``/tmp/``
  to the page's own directory;
* what the docs say comes from the person at the keyboard, provided explicitly (``PRELUDE``):
  ``$PASSWORD``, typed when ``a67 register`` / ``a67 login`` asks for it;
* streams that run until Ctrl-C are cut after ``STREAM_SECONDS`` and count as success (see
  ``PRELUDE``: ``curl -N``, ``a67 logs -f``, ``a67 metrics --watch`` without ``--count``);
* whatever a block leaves running in the background (agents) is stopped with the page.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"

PASSWORD = "correct horse battery staple"
"""The password the person types; docs/auth.md's first test vector, so the docs may show its
``password_hash`` for ada@example.com (``MVdRfo5RZD6gd6mtmqwWcw+UP2jTprKIl73eTV7ZbpY=``)."""

STREAM_SECONDS = 5
"""How long a stream that runs until Ctrl-C is followed before it is cut (and counts as fine)."""

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[A-Za-z0-9_+-]*)[ \t]*$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(?P<reason>.*?)\s*-->\s*$")
RUN_LANGUAGES = ("sh", "bash")

PRELUDE = rf"""
# --- provided by tests/e2e/docs_examples.py, not part of the docs ---------------------------
# Streams that run until Ctrl-C (the only constructs treated so):
#   curl with -N / --no-buffer      cut after {STREAM_SECONDS} s: curl's exit 28 (timeout) counts as success
#   a67 logs … -f / --follow        cut after {STREAM_SECONDS} s with SIGINT: timeout's 124 counts as success
#   a67 metrics --watch (no --count)
# And the person at the keyboard: a67 register / login without --password-stdin read the
# password from standard input when it is not a terminal; they get $PASSWORD there.
curl() {{
  local arg
  for arg in "$@"; do
    if [[ $arg == --no-buffer || $arg =~ ^-[a-zA-Z]*N[a-zA-Z]*$ ]]; then
      command curl --max-time {STREAM_SECONDS} "$@" || {{ local rc=$?; [[ $rc -eq 28 ]] || return $rc; }}
      return 0
    fi
  done
  command curl "$@"
}}
a67() {{
  local stream=0 arg
  case "$1" in
    register|login)
      if [[ " $* " != *" --password-stdin "* ]]; then command a67 "$@" <<<"$PASSWORD"; return; fi ;;
    logs)
      for arg in "$@"; do [[ $arg == -f || $arg == --follow ]] && stream=1; done ;;
    metrics)
      [[ " $* " == *" --watch "* && " $* " != *" --count "* ]] && stream=1 ;;
  esac
  if (( stream )); then
    # --foreground: a67 stays in the page's process group (timeout would make a group of its
    # own, which the page's clean-up then missed); -k: SIGKILL if SIGINT did not end it
    timeout --foreground -k 5 --signal=INT {STREAM_SECONDS} a67 "$@" || {{ local rc=$?; [[ $rc -eq 124 ]] || return $rc; }}
    return 0
  fi
  command a67 "$@"
}}
# ---------------------------------------------------------------------------------------------
"""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason, when the block is marked not run

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def doc_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` in ``RUN_LANGUAGES``, with its not-run reason if any."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent = fence["indent"]
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if fence["lang"] in RUN_LANGUAGES:
            body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
            before = i - 1
            while before >= 0 and not lines[before].strip():
                before -= 1
            marker = NOT_RUN.match(lines[before]) if before >= 0 else None
            reason = marker["reason"] if marker else None
            found.append(Block(path, i + 1, fence["lang"], "\n".join(body) + "\n", reason))
        i = end + 1
    return found


def stray_markers(path: Path) -> list[int]:
    """Lines of not-run markers that do not stand right before a sh/bash block."""
    marked = {b.line for b in blocks(path) if b.not_run is not None}
    lines = path.read_text().splitlines()
    stray = []
    for number, line in enumerate(lines, 1):
        if NOT_RUN.match(line):
            after = number  # the 0-based index of the next line
            while after < len(lines) and not lines[after].strip():
                after += 1
            if after + 1 not in marked:
                stray.append(number)
    return stray


# -- the live system ------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    grpc: int
    node: int
    http: int
    ingress: int
    xds: int


def addresses(ports: Ports) -> list[tuple[str, str]]:
    """The documented default addresses, and what they become for this page."""
    return [
        ("127.0.0.1:50051", f"127.0.0.1:{ports.grpc}"),
        ("localhost:50051", f"localhost:{ports.grpc}"),
        ("127.0.0.1:50052", f"127.0.0.1:{ports.node}"),
        ("127.0.0.1:8080", f"127.0.0.1:{ports.http}"),
        ("127.0.0.1:8081", f"127.0.0.1:{ports.ingress}"),
        ("127.0.0.1:50053", f"127.0.0.1:{ports.xds}"),
    ]


def rewrite(text: str, ports: Ports, workdir: Path) -> str:
    for documented, actual in addresses(ports):
        text = text.replace(documented, actual)
    return text.replace("/tmp/", f"{workdir}/tmp/")


def page_environment(home: Path, ports: Ports) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_") and k != "XDG_CONFIG_HOME"}
    env.update(
        HOME=str(home),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        A67_CONTROLLER=f"127.0.0.1:{ports.grpc}",  # the CLI's documented default, moved
        A67_HEARTBEAT_INTERVAL_SECONDS="3",  # nodes get ready in seconds, not half a minute
        PASSWORD=PASSWORD,
    )
    return env


def _session_members(session: int) -> list[int]:
    """Every process of the session ``session`` (field 6 of /proc/PID/stat), whatever
    process group it made for itself (``timeout``, a shell's job control)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session:
            members.append(int(entry.name))
    return members


def _stop_group(process: subprocess.Popen[bytes], grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
    for pid in _session_members(process.pid):  # and of the session (groups of their own)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


@contextlib.contextmanager
def system(workdir: Path, ports: Ports, env: dict[str, str], ready_within: float = 180.0) -> Iterator[Path]:
    """``a67 up`` on ``ports``, its data in ``$HOME``; yields once it printed that it is up."""
    log_path = workdir / "a67-up.log"
    data_dir = Path(env["HOME"]) / ".local" / "share" / "automator67"
    args = [str(VENV_BIN / "a67"), "up", "--data-dir", str(data_dir)]
    args += ["--grpc-listen", f"127.0.0.1:{ports.grpc}", "--node-listen", f"127.0.0.1:{ports.node}"]
    args += ["--http-listen", f"127.0.0.1:{ports.http}", "--ingress-listen", f"127.0.0.1:{ports.ingress}"]
    args += ["--xds-listen", f"127.0.0.1:{ports.xds}"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + ready_within
        while b"Automator67 is up." not in log_path.read_bytes():
            if process.poll() is not None:
                raise AssertionError(f"a67 up exited with {process.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"a67 up not up within {ready_within} s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield log_path
    finally:
        _stop_group(process, grace=30)


@dataclass(frozen=True)
class PageRun:
    returncode: int
    stdout: str
    stderr: str
    script: str


def run_script(script: str, workdir: Path, env: dict[str, str], timeout: float) -> PageRun:
    """``bash -euo pipefail`` on ``script``; background jobs it leaves die with it."""
    out, err = workdir / "stdout.txt", workdir / "stderr.txt"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        process = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # its own process group: the agents it starts go with it
        )
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        returncode = -1
        with open(err, "a") as note:
            note.write(f"\n[docs test] the page did not finish within {timeout} s\n")
    finally:
        _stop_group(process, grace=20)
    return PageRun(returncode, out.read_text(errors="replace"), err.read_text(errors="replace"), script)


def page_script(runnable: list[Block], ports: Ports, workdir: Path) -> str:
    parts = [PRELUDE]
    for block in runnable:
        parts.append(f'echo "[docs test] $(date +%T) {block.where}" >&2\n')
        parts.append(rewrite(block.text, ports, workdir))
    return "\n".join(parts)


def prepare_workdir(workdir: Path) -> Path:
    """The page's working directory (links to examples/ and .venv/) and its own $HOME."""
    (workdir / "tmp").mkdir(parents=True, exist_ok=True)
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    for name in ("examples", ".venv"):
        link = workdir / name
        if not link.exists():
            link.symlink_to(REPO / name)
    return home
