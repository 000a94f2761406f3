"""The repository's example app (``examples/hello/``) deployed from the dashboard, as a user
following its README would, in a real headless Chromium against a real ``a67 up`` and a real
agent (issue 18): the folder packed into a ``.tar.gz`` as ``a67 deploy`` packs it, the New
deployment form filled with what its ``a67.toml`` says, the replica seen running, the app
answering on the URL the page shows, then scaled to 2 replicas with the page's scale control.

One replica at first, 2 by the scale: ``a67.toml`` asks for 2, but a create needs as many
distinct feasible nodes as replicas (docs/deployments.md, "Placement") and this fleet has one
agent; a scale-up may use a node that already hosts a replica as a last resort
(controller/deployments/plan.py), so both replicas run on it. Every wait is for a condition.
"""

from __future__ import annotations

import json
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from controller.client.appdir import pack
from tests.browser.conftest import Processes, Screenshot, Stack
from tests.browser.test_dashboard import (
    by_css,
    csp_violations,
    fill,
    heading,
    sign_in_in_browser,
    submit,
    text_of,
    wait,
    wait_heading,
)
from tests.browser.test_workloads import ROLLOUT_WAIT, Fleet, replica_statuses, start_fleet

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"


@pytest.fixture(scope="module")
def fleet(stack: Stack, background: Processes) -> Fleet:
    return start_fleet(stack, background, "example", port_base=48000)


def example_archive(tmp_path: Path) -> Path:
    """``examples/hello`` packed as ``a67 deploy`` packs it (``.a67ignore`` honoured)."""
    packed = pack(EXAMPLE)
    try:
        path = tmp_path / "hello.tar.gz"
        path.write_bytes(packed.file.read())
    finally:
        packed.close()
    return path


def get_json(url: str) -> Any:
    """The JSON ``url`` answers with, or None while it does not answer (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (a local URL)
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def page_urls(driver: Any) -> list[str]:
    """The URLs the deployment's page shows (its host form, then its path form)."""
    return [str(u) for u in driver.execute_script(
        "return [...document.querySelectorAll('main dl.fields a[rel=noreferrer]')].map(a => a.href)"
    )]  # fmt: skip


def running_endpoints(fleet: Fleet, deployment_id: str) -> list[str]:
    d = fleet.get(f"/api/v1/deployments/{deployment_id}")["deployment"]
    return [a["endpoint"] for a in d["node_assignments"] if a["status"] == "running" and a["endpoint"]]


def select(driver: Any, css: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(*by_css(css))).select_by_value(value)


def test_the_example_app_deploys_from_the_dashboard_runs_answers_and_scales_to_two(
    browser: Any, stack: Stack, fleet: Fleet, tmp_path: Path, screenshot: Screenshot
) -> None:
    manifest = tomllib.loads((EXAMPLE / "a67.toml").read_text())
    assert manifest["type"] == "backend"
    health = manifest["health_check"]

    sign_in_in_browser(browser, stack, fleet.email)
    browser.find_element(*by_css("#nav a[href='#/deployments']")).click()
    wait_heading(browser, "Deployments")
    browser.find_element(*by_css("main a[href='#/deployments/new']")).click()
    wait_heading(browser, "New deployment")

    form = "main form"
    browser.find_element(*by_css(f"{form} input[name=archive]")).send_keys(str(example_archive(tmp_path)))
    select(browser, f"{form} select[name=app_type]", "APP_TYPE_BACKEND")
    select(browser, f"{form} select[name=runtime]", manifest["runtime"])
    fill(
        browser,
        form,
        name=manifest["name"],
        replicas="1",
        entrypoint=manifest["entrypoint"],
        memory=manifest["resources"]["memory"],
        cpu=manifest["resources"]["cpu"],
        env="\n".join(f"{k}={v}" for k, v in manifest["env"].items()),
        health_path=health["path"],
        health_interval=str(health["interval_seconds"]),
        health_timeout=str(health["timeout_seconds"]),
        health_retries=str(health["retries"]),
    )
    submit(browser, form)
    wait(browser, lambda d: heading(d) == f"Deployment {manifest['name']}", "the new deployment's page")
    deployment_id = str(browser.execute_script("return location.hash")).split("/")[-1]

    # Running, as the page shows it; the app answers on the URL the page shows (through the
    # ingress) and on its replica's endpoint.
    wait(
        browser,
        lambda d: replica_statuses(d) == ["running"] and "1 running of 1" in text_of(d, "main dl"),
        "the replica running",
        timeout=ROLLOUT_WAIT,
    )
    assert f"{manifest['runtime']} {manifest['entrypoint']}" in text_of(browser, "main dl")
    urls = wait(browser, lambda d: len(page_urls(d)) == 2 and page_urls(d), "the app's URLs")
    path_url = next(u for u in urls if deployment_id in u)  # the path form, on 127.0.0.1
    greeting = wait(
        browser,
        lambda d: (g := get_json(path_url)) and g.get("message") == "hello from Automator67" and g,
        f"the app to answer on {path_url}",
        timeout=ROLLOUT_WAIT,
    )
    assert greeting["replica"] == "0"
    (endpoint,) = running_endpoints(fleet, deployment_id)
    assert get_json(endpoint)["message"] == "hello from Automator67"
    wait(browser, lambda d: "Live" in text_of(d, "#rollout-state"), "the watch stream to be live")
    screenshot("example-app-running", phone=True)

    # Scale to 2 with the page's control: two running replicas, each answering as itself.
    scale = "main .actions form"
    assert browser.find_element(*by_css(f"{scale} [name=replicas]")).get_attribute("value") == "1"
    fill(browser, scale, replicas="2")
    submit(browser, scale)
    wait(browser, lambda d: "Scaling to 2 replicas." in text_of(d, "main .notice"), "the scale's notice")
    wait(
        browser,
        lambda d: replica_statuses(d) == ["running", "running"] and "2 running of 2" in text_of(d, "main dl"),
        "two replicas running",
        timeout=ROLLOUT_WAIT,
    )
    assert "running" in text_of(browser, "main dl")
    endpoints = running_endpoints(fleet, deployment_id)
    assert len(endpoints) == 2
    assert sorted(get_json(e)["replica"] for e in endpoints) == ["0", "1"]
    assert get_json(path_url)["message"] == "hello from Automator67"
    browser.execute_script("document.getElementById('replicas-title').scrollIntoView()")
    screenshot("example-app-scaled", phone=True)
    assert csp_violations(browser) == []
