"""A real ``a67 up`` and a real headless Chromium for the dashboard's browser tests.

* ``stack`` runs ``a67 up`` on free ports (controller, REST gateway with the dashboard,
  ingress), with its data and ``$HOME`` in a temporary folder, 1 s heartbeats (a module may
  override the ``heartbeat_seconds`` fixture) and 20 s access tokens (so a signed-in page
  refreshes its token during the tests);
* ``browser`` drives Debian's Chromium through Selenium and Debian's ChromeDriver, with the
  flags this machine needs (docs/dashboard.md, "Tests"). Without ``/usr/bin/chromium`` the
  tests skip, saying so, except under CI (``CI`` set), where they fail: ``.ci/run``
  installs Chromium.

Screenshots go to ``tests/browser/screenshots/`` (ignored by git): ``<name>.png`` at a
desktop's width and, with ``phone=True``, ``<name>-phone.png`` at a phone's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.e2e.conftest import Rest, free_port
from tests.e2e.test_up import Up, clean_env, up_args

CHROMIUM = os.environ.get("A67_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("A67_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
VENV_BIN = Path(sys.executable).parent

ACCESS_TOKEN_TTL = 20
"""Seconds an access token lives here: the page refreshes it 4 s before (a fifth of 20 s)."""

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
"""Headless, as root, on a machine whose outside network is closed (no background calls)."""

DESKTOP = (1280, 900)
PHONE = (390, 844)


def _browser_missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install {package}; .ci/run installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="session")
def browser_available() -> None:
    missing = _browser_missing()
    if missing is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"browser tests need Chromium under CI: {missing}")
    pytest.skip(f"no browser for the dashboard tests: {missing}")


@dataclass(frozen=True)
class Stack:
    """One running ``a67 up``."""

    base_url: str
    grpc_address: str
    rest: Rest
    home: Path
    workdir: Path


@pytest.fixture(scope="module")
def heartbeat_seconds() -> float:
    """The stack's heartbeat interval (a module overrides this fixture to change it)."""
    return 1.0


@pytest.fixture(scope="module")
def stack(
    browser_available: None, tmp_path_factory: pytest.TempPathFactory, heartbeat_seconds: float
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack")
    home = workdir / "home"
    home.mkdir()
    http_port, grpc_port, node_port = free_port(), free_port(), free_port()
    env = clean_env(
        HOME=str(home),
        A67_HEARTBEAT_INTERVAL_SECONDS=f"{heartbeat_seconds:g}",
        A67_ACCESS_TOKEN_TTL_SECONDS=str(ACCESS_TOKEN_TTL),
    )
    up = Up(workdir, *up_args(workdir, http_port, grpc_port, node_port), env=env)
    try:
        up.wait_banner()
        yield Stack(
            f"http://127.0.0.1:{http_port}",
            f"127.0.0.1:{grpc_port}",
            Rest("127.0.0.1", http_port),
            home,
            workdir,
        )
    finally:
        up.stop()


@pytest.fixture(scope="module")
def browser(browser_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument(f"--window-size={DESKTOP[0]},{DESKTOP[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(log)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Screenshot(Protocol):
    def __call__(self, name: str, *, phone: bool = False) -> Path: ...


@pytest.fixture
def screenshot(browser: Any) -> Screenshot:
    """Save the page as ``screenshots/<name>.png`` (at the window's current size) and, with
    ``phone``, as ``screenshots/<name>-phone.png`` at a phone's width (then back to desktop)."""

    def take(name: str, *, phone: bool = False) -> Path:
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        browser.save_screenshot(str(path))
        if phone:
            browser.set_window_size(*PHONE)
            browser.save_screenshot(str(SCREENSHOTS / f"{name}-phone.png"))
            browser.set_window_size(*DESKTOP)
        return path

    return take


class Processes:
    """Background processes a test starts (agents), stopped with their whole group."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[subprocess.Popen[bytes]] = []

    def shell(self, line: str, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", line],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.started.append(process)
        return process

    def stop(self) -> None:
        for process in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def background(stack: Stack) -> Iterator[Processes]:
    processes = Processes(stack.workdir)
    try:
        yield processes
    finally:
        processes.stop()


def shell_env(stack: Stack, **extra: str) -> dict[str, str]:
    """The environment of a person's shell on this machine: the venv's ``a67`` on ``PATH``."""
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return clean_env(HOME=str(stack.home), PATH=path, **extra)
