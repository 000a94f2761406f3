"""The web dashboard in a real headless Chromium against a real ``a67 up`` (issue 18).

Accounts made in the browser sign in with the CLI and the other way round (the same
documented password derivation); a real agent started with the command the page shows
appears in the nodes table live; field violations are shown next to their fields; tokens are
kept in memory, refreshed before they expire, and signing out ends the session.
Every wait is for a condition in the page (WebDriverWait), never a fixed sleep.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyotp
import pytest

from controller.client.kdf import derive_password_hash
from tests.browser.conftest import DESKTOP, PHONE, Processes, Screenshot, Stack, shell_env

PASSWORD = "correct horse battery staple"
READY = ("ready", "busy")  # a real agent on a loaded machine may report BUSY (CPU over 90 %)
WAIT = 60.0
"""Deadline of one wait for the page (a failure, not a measurement)."""

# docs/auth.md's test vectors: (email, password, password_hash)
VECTORS = [
    ("ada@example.com", "correct horse battery staple", "MVdRfo5RZD6gd6mtmqwWcw+UP2jTprKIl73eTV7ZbpY="),
    ("  Ada@Example.COM ", "correct horse battery staple", "MVdRfo5RZD6gd6mtmqwWcw+UP2jTprKIl73eTV7ZbpY="),
    ("straße@bücher.example", "pässwörd-ünïcode", "TMUtjbdqD82xnbnbw7fwgo1o7MIDetoKFeWSR6xAWzg="),
    ("grace@example.org", "pa\u0308sswort", "FOCL5cfb3tuGwWH9BLg42QPz+cdcyYb5VnA5qEl8KBM="),
]


# -- helpers ----------------------------------------------------------------------------


def by_css(css: str) -> tuple[str, str]:
    from selenium.webdriver.common.by import By

    return (By.CSS_SELECTOR, css)


def wait(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = WAIT) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # A live page re-renders: an element found a moment ago may be gone; look again.
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(
        condition, message=f"waiting for {what}"
    )


def heading(driver: Any) -> str:
    # read in one script: the page may replace the heading between a find and a read
    return str(
        driver.execute_script("const h = document.querySelector('main h1'); return h ? h.innerText : ''")
    )


def wait_heading(driver: Any, text: str) -> None:
    wait(driver, lambda d: heading(d) == text, f"the page {text!r} (now {heading(driver)!r})")


def open_fresh(driver: Any, stack: Stack, route: str) -> None:
    """Load the dashboard anew (tokens live in memory only, so a reload starts signed out)."""
    driver.get("about:blank")
    driver.get(f"{stack.base_url}/#{route}")
    wait(driver, lambda d: d.execute_script("return location.hash") == f"#{route}" and heading(d), route)


def fill(driver: Any, form: str, **values: str) -> None:
    for name, value in values.items():
        box = driver.find_element(*by_css(f"{form} [name={name}]"))
        box.clear()
        box.send_keys(value)


def submit(driver: Any, form: str = "main form") -> None:
    driver.find_element(*by_css(f"{form} button[type=submit]")).click()


def register_in_browser(driver: Any, stack: Stack, email: str, password: str = PASSWORD) -> None:
    open_fresh(driver, stack, "/register")
    fill(driver, "main form", email=email, password=password)
    submit(driver)
    wait_heading(driver, "Nodes")


def sign_in_in_browser(driver: Any, stack: Stack, email: str, password: str = PASSWORD) -> None:
    open_fresh(driver, stack, "/signin")
    fill(driver, "main form", email=email, password=password)
    submit(driver)
    wait_heading(driver, "Nodes")


def a67(stack: Stack, config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The CLI as a real process, with its own config folder, against the stack's controller."""
    env = shell_env(stack, A67_CONTROLLER=stack.grpc_address, A67_CONFIG_DIR=str(config), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def new_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


def node_statuses(driver: Any) -> list[str]:
    return [str(cell.text) for cell in driver.find_elements(*by_css("main tbody td[data-label=Status]"))]


def text_of(driver: Any, css: str) -> str:
    """The text of the first match, read in one script (a live page re-renders)."""
    return str(
        driver.execute_script(
            "const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css
        )
    )


def csp_violations(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


# -- the files and their headers ----------------------------------------------------------


def test_the_dashboard_is_served_at_the_root_with_security_headers(stack: Stack) -> None:
    page = stack.rest.get("/")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["x-content-type-options"] == "nosniff"
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert b'<script type="module" src="/app.js">' in page.body
    assert stack.rest.get("/index.html").body == page.body
    script = stack.rest.get("/app.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert stack.rest.get("/style.css").headers["content-type"] == "text/css; charset=utf-8"
    config = stack.rest.get("/config.json").json
    assert config["agent_controller"] == stack.grpc_address
    # the API is unchanged beside it
    missing = stack.rest.get("/api/v1/no-such-thing")
    assert missing.status == 404
    assert missing.json["code"] == 5
    assert stack.rest.get("/no-such-file.js").status == 404
    assert stack.rest.post("/").status == 404  # files answer GET and HEAD only


def test_the_password_derivation_in_the_browser_matches_the_documented_vectors(
    browser: Any, stack: Stack
) -> None:
    open_fresh(browser, stack, "/signin")
    got = browser.execute_async_script(
        """
        const [vectors, done] = arguments;
        import("/kdf.js").then(async ({ passwordHash, normalizeEmail }) => {
          const out = [];
          for (const [email, password] of vectors) out.push([normalizeEmail(email), await passwordHash(email, password)]);
          done(out);
        }, (e) => done(String(e)));
        """,
        [[e, p] for e, p, _ in VECTORS],
    )
    assert [h for _, h in got] == [h for _, _, h in VECTORS]
    assert got[2][0] == "strasse@xn--bcher-kva.example"


# -- accounts: browser ↔ CLI ----------------------------------------------------------------


def test_an_account_registered_in_the_browser_signs_in_with_the_cli(
    browser: Any, stack: Stack, tmp_path: Path, screenshot: Screenshot
) -> None:
    email = new_email("browser")
    open_fresh(browser, stack, "/register")
    screenshot("register", phone=True)
    fill(browser, "main form", email=email, password=PASSWORD)
    submit(browser)
    wait_heading(browser, "Nodes")
    assert email in browser.find_element(*by_css("#account")).text
    login = a67(stack, tmp_path / "cli", "login", "--email", email, "--password-stdin", stdin=PASSWORD + "\n")
    assert login.returncode == 0, login.stderr
    who = a67(stack, tmp_path / "cli", "whoami", "--json")
    assert json.loads(who.stdout)["user"]["email"] == email


def test_an_account_registered_with_the_cli_signs_in_in_the_browser(
    browser: Any, stack: Stack, tmp_path: Path, screenshot: Screenshot
) -> None:
    local = f"straße-{uuid.uuid4().hex[:8]}"
    made = a67(
        stack, tmp_path / "cli", "register", "--email", f"{local}@bücher.example", "--password-stdin",
        stdin="pässwort-ünïcode\n",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    # Another spelling of the same address, and the password typed with a decomposed ä.
    open_fresh(browser, stack, "/signin")
    screenshot("signin", phone=True)
    fill(browser, "main form", email=f"  {local.upper()}@Bücher.EXAMPLE ", password="pa\u0308sswort-ünïcode")
    submit(browser)
    wait_heading(browser, "Nodes")


def test_a_wrong_password_says_what_happened_and_what_to_do(browser: Any, stack: Stack) -> None:
    open_fresh(browser, stack, "/signin")
    fill(browser, "main form", email=new_email(), password="not the password")
    submit(browser)
    box = wait(browser, lambda d: d.find_element(*by_css("main .error-box:not([hidden])")), "the error")
    assert "Check the email and password" in box.text
    assert heading(browser) == "Sign in"


def test_a_field_violation_is_shown_next_to_its_field(
    browser: Any, stack: Stack, screenshot: Screenshot
) -> None:
    open_fresh(browser, stack, "/register")
    fill(browser, "main form", email="ada@@example", password=PASSWORD)
    submit(browser)
    message = wait(
        browser, lambda d: d.find_element(*by_css("input[name=email] + .field-error")), "the violation"
    )
    email = browser.find_element(*by_css("input[name=email]"))
    assert email.get_attribute("aria-invalid") == "true"
    assert email.get_attribute("aria-describedby") == message.get_attribute("id")
    assert message.text
    box = browser.find_element(*by_css("main .error-box"))
    assert "Correct the fields marked below" in box.text
    assert browser.switch_to.active_element == email  # focus goes to the first bad field
    screenshot("register-field-violation")


def test_an_account_with_mfa_is_asked_for_a_code(browser: Any, stack: Stack, screenshot: Screenshot) -> None:
    email = new_email("mfa")
    made = stack.rest.post(
        "/api/v1/auth/register", {"email": email, "password_hash": derive_password_hash(email, PASSWORD)}
    )
    assert made.status == 201, made.body
    token = made.json["access_token"]
    secret = stack.rest.post("/api/v1/auth/mfa:enroll", {}, token=token).json["secret"]
    totp = pyotp.TOTP(secret)
    confirmed = stack.rest.post("/api/v1/auth/mfa:confirm", {"code": totp.now()}, token=token)
    assert confirmed.status == 200, confirmed.body
    recovery = confirmed.json["recovery_codes"][0]  # the current TOTP code was just spent confirming

    open_fresh(browser, stack, "/signin")
    fill(browser, "main form", email=email, password=PASSWORD)
    submit(browser)
    wait_heading(browser, "Second step")
    screenshot("signin-mfa")
    fill(browser, "main form", code="000000")
    submit(browser)
    wait(
        browser, lambda d: d.find_element(*by_css("main .error-box:not([hidden])")), "the wrong code's error"
    )
    assert "authenticator" in browser.find_element(*by_css("main .error-box")).text
    fill(browser, "main form", code="", recovery_code=recovery)
    submit(browser)
    wait_heading(browser, "Nodes")


# -- the session --------------------------------------------------------------------------


def test_tokens_stay_in_memory_and_are_refreshed_before_they_expire(browser: Any, stack: Stack) -> None:
    register_in_browser(browser, stack, new_email("refresh"))
    stored = browser.execute_script(
        "return [localStorage.length, sessionStorage.length, document.cookie, indexedDB ? 1 : 0]"
    )
    assert stored[:3] == [0, 0, ""]

    def refreshed(d: Any) -> bool:
        names = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        return any(name.endswith("/api/v1/auth/refresh") for name in names)

    wait(browser, refreshed, "the page to refresh its access token")
    browser.find_element(*by_css("#nav a[href='#/alerts']")).click()  # a new call with the new token
    wait_heading(browser, "Alerts")
    wait(browser, lambda d: "No alerts." in d.find_element(*by_css("main")).text, "the alerts list")


def test_signing_out_ends_the_session(browser: Any, stack: Stack, screenshot: Screenshot) -> None:
    register_in_browser(browser, stack, new_email("signout"))
    browser.find_element(*by_css("#account button")).click()
    wait_heading(browser, "Sign in")
    assert "You are signed out." in browser.find_element(*by_css("main")).text
    assert browser.find_element(*by_css("#account")).text == ""
    browser.execute_script("location.hash = '#/nodes'")
    wait_heading(browser, "Sign in")  # no session: back to the sign-in page
    screenshot("signed-out")


# -- nodes ----------------------------------------------------------------------------------


def test_an_enrolled_agent_appears_live_and_can_be_drained_and_removed(
    browser: Any,
    stack: Stack,
    background: Processes,
    tmp_path: Path,
    screenshot: Screenshot,
) -> None:
    email = new_email("nodes")
    register_in_browser(browser, stack, email)
    wait(browser, lambda d: "No nodes yet" in d.find_element(*by_css("main")).text, "the empty table")
    wait(browser, lambda d: "Live" in text_of(d, "#nodes-state"), "the nodes watch to be live")
    screenshot("nodes-empty")

    browser.find_element(*by_css("main .page-head button")).click()
    fill(browser, "#enroll form", region="eu-test")
    submit(browser, "#enroll form")
    command = str(wait(browser, lambda d: d.find_element(*by_css("#agent-command")), "the command").text)
    token = browser.find_element(*by_css("#enroll-token")).text
    assert token.startswith("a67e_")
    screenshot("nodes-enroll")

    # The same line as `a67 nodes enroll` prints, but for the token.
    cli = tmp_path / "cli"
    assert (
        a67(stack, cli, "login", "--email", email, "--password-stdin", stdin=PASSWORD + "\n").returncode == 0
    )
    printed = a67(stack, cli, "nodes", "enroll", "--region", "eu-test", "--json")
    assert printed.returncode == 0, printed.stderr
    cli_line = json.loads(printed.stdout)["command"]
    assert re.sub(r"a67e_\S+", "TOKEN", command) == re.sub(r"a67e_\S+", "TOKEN", cli_line)

    # Run it as shown, in a shell whose a67 is this checkout's; the page shows the node live,
    # pushed by the nodes watch (no reload: a mark left in the page survives).
    browser.execute_script("window.stillThisPage = true")
    background.shell(command, "agent", shell_env(stack))
    wait(browser, lambda d: node_statuses(d) and node_statuses(d)[0] in READY, "the agent's node to be ready")
    assert browser.execute_script("return window.stillThisPage === true")
    assert "eu-test" in browser.find_element(*by_css("main tbody td[data-label=Region]")).text
    toggle = browser.find_element(*by_css("main .page-head button"))
    toggle.click()  # fold the enroll panel away
    assert toggle.get_attribute("aria-expanded") == "false"
    screenshot("nodes-live")
    browser.set_window_size(*PHONE)
    screenshot("nodes-phone")
    browser.set_window_size(*DESKTOP)

    browser.find_element(*by_css("main tbody td[data-label=Node] a")).click()
    wait(browser, lambda d: heading(d).startswith("Node "), "the node's page")
    wait(browser, lambda d: d.find_elements(*by_css("main .actions button")), "the node's actions")
    # the chart: the stored samples (one a minute), then one per message the watch pushes
    wait(browser, lambda d: d.find_elements(*by_css("main svg.chart")), "the node's chart")
    wait(browser, lambda d: "Live" in text_of(d, "#node-state"), "the node's watch to be live")
    screenshot("node-detail", phone=True)
    browser.find_element(*by_css("main .actions button:not(.danger)")).click()  # Drain
    wait(browser, lambda d: "draining" in d.find_element(*by_css("main dl")).text, "the node to drain")
    wait(
        browser,
        lambda d: d.find_element(*by_css("main .actions button:not(.danger)")).text == "Undrain",
        "Undrain",
    )
    browser.find_element(*by_css("main .actions button:not(.danger)")).click()
    wait(
        browser,
        lambda d: any(s in d.find_element(*by_css("main dl")).text for s in READY),
        "the node back in service",
    )

    browser.find_element(*by_css("main .actions button.danger")).click()  # Remove, after confirming
    browser.switch_to.alert.accept()
    wait_heading(browser, "Nodes")
    wait(browser, lambda d: all(s == "removed" for s in node_statuses(d)), "the node to be removed")
    assert csp_violations(browser) == []


def test_an_enroll_form_error_is_shown_next_to_its_field(browser: Any, stack: Stack) -> None:
    register_in_browser(browser, stack, new_email("enroll"))
    browser.find_element(*by_css("main .page-head button")).click()
    fill(browser, "#enroll form", max_uses="500")
    submit(browser, "#enroll form")
    wait(browser, lambda d: d.find_element(*by_css("input[name=max_uses] + .field-error")), "the violation")


@pytest.mark.parametrize("route", ["/deployments", "/databases", "/alerts"])
def test_the_other_pages_list_an_empty_account(
    browser: Any, stack: Stack, route: str, screenshot: Screenshot
) -> None:
    register_in_browser(browser, stack, new_email("pages"))
    browser.find_element(*by_css(f"#nav a[href='#{route}']")).click()
    wait(browser, lambda d: d.find_elements(*by_css("main .empty")), f"the empty {route} list")
    assert browser.find_element(*by_css(f"#nav a[href='#{route}']")).get_attribute("aria-current") == "page"
    screenshot(route.strip("/"), phone=True)
