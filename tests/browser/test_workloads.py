"""The dashboard's workload pages in a real headless Chromium, against a real ``a67 up`` and a
real agent that offers compute, storage and database (issue 18).

A deployment is created from an archive chosen in a file input and a manifest form (its field
violations under their fields), reaches running replicas, is updated to a new archive and
rolled back (the app answers with each version), with the rollout seen live from the watch
stream; its logs arrive live (follow). A database is created, takes a schema and answers a
query. The metrics page shows the fleet and a chart fed by the watch stream. Files are
uploaded, listed by prefix, downloaded and deleted. Every wait is for a condition.
"""

from __future__ import annotations

import os
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from controller.client.kdf import derive_password_hash
from tests.browser.conftest import Processes, Screenshot, Stack, shell_env
from tests.browser.test_dashboard import (
    PASSWORD,
    by_css,
    csp_violations,
    fill,
    heading,
    new_email,
    sign_in_in_browser,
    submit,
    text_of,
    wait,
    wait_heading,
)
from tests.integration.test_deployments import source_tar_gz

NODE_TYPES = "compute,storage,database"
ROLLOUT_WAIT = 120.0
"""Deadline of a rollout on a loaded machine (a replica starts, then passes its health check)."""

APP = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = {version!r}
print("hello from " + VERSION, flush=True)
print("greeting is " + os.environ["GREETING"], flush=True)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/say/"):
            print("said " + self.path[len("/say/"):], flush=True)
        body = VERSION.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


@dataclass(frozen=True)
class Fleet:
    """A user with one ready agent."""

    email: str
    stack: Stack

    def token(self) -> str:
        """A fresh access token (they live 20 s here)."""
        reply = self.stack.rest.post(
            "/api/v1/auth/login",
            {"email": self.email, "password_hash": derive_password_hash(self.email, PASSWORD)},
        )
        assert reply.status == 200, reply.body
        return str(reply.json["access_token"])

    def get(self, path: str) -> Any:
        reply = self.stack.rest.get(path, token=self.token())
        assert reply.status == 200, reply.body
        return reply.json


@pytest.fixture(scope="module")
def fleet(stack: Stack, background: Processes) -> Fleet:
    return start_fleet(stack, background, "workloads")


def start_fleet(stack: Stack, background: Processes, prefix: str, port_base: int = 47000) -> Fleet:
    """A new user with one agent (compute, storage and database), once its node is ready; its
    replicas listen on 20 ports from ``port_base`` (shifted by the process id)."""
    email = new_email(prefix)
    made = stack.rest.post(
        "/api/v1/auth/register", {"email": email, "password_hash": derive_password_hash(email, PASSWORD)}
    )
    assert made.status == 201, made.body
    fleet = Fleet(email, stack)
    enrolled = stack.rest.post("/api/v1/nodes/enrollment-tokens", {"max_uses": 1}, token=fleet.token())
    assert enrolled.status == 201, enrolled.body
    base = port_base + (os.getpid() % 50) * 20
    command = (
        f"A67_AGENT_TOKEN={enrolled.json['token']} a67 agent --controller {stack.grpc_address}"
        f" --data-dir {stack.workdir / 'agent'} --region eu-test --node-types {NODE_TYPES}"
        f" --replica-port-range {base}-{base + 19}"
    )
    background.shell(command, "agent", shell_env(stack))

    def ready(_: Any) -> bool:
        nodes = fleet.get("/api/v1/nodes")["nodes"]
        return any(n["status"] in ("NODE_STATUS_READY", "NODE_STATUS_BUSY") for n in nodes)

    wait(None, ready, "the agent's node to be ready", timeout=ROLLOUT_WAIT)
    return fleet


def app_archive(tmp_path: Path, version: str) -> Path:
    path = tmp_path / f"app-{version}.tar.gz"
    path.write_bytes(source_tar_gz({"app.py": APP.format(version=version)}))
    return path


def app_answer(fleet: Fleet, deployment_id: str) -> str | None:
    """What the running replica answers (None while none is running)."""
    d = fleet.get(f"/api/v1/deployments/{deployment_id}")["deployment"]
    running = [a for a in d["node_assignments"] if a["status"] == "running" and a["endpoint"]]
    if not running:
        return None
    try:
        with urllib.request.urlopen(running[0]["endpoint"], timeout=5) as response:  # noqa: S310 (a local URL)
            return str(response.read().decode())
    except OSError:
        return None


def replica_statuses(driver: Any) -> list[str]:
    return [str(s) for s in driver.execute_script(
        "return [...document.querySelectorAll('section[aria-labelledby=replicas-title] td[data-label=Status]')]"
        ".map(td => td.innerText)"
    )]  # fmt: skip


def invalid_message(driver: Any, name: str) -> str:
    """The field violation shown under the control ``name`` ('' if none)."""
    return str(
        driver.execute_script(
            """
            const c = document.querySelector(`main [name=${arguments[0]}]`);
            if (!c || c.getAttribute("aria-invalid") !== "true") return "";
            const m = document.getElementById(c.getAttribute("aria-describedby"));
            return m ? m.innerText : "";
            """,
            name,
        )
    )


# -- deployments ----------------------------------------------------------------------------


def test_a_deployment_from_an_archive_runs_updates_rolls_back_and_shows_its_logs(
    browser: Any, stack: Stack, fleet: Fleet, tmp_path: Path, screenshot: Screenshot
) -> None:
    sign_in_in_browser(browser, stack, fleet.email)
    browser.find_element(*by_css("#nav a[href='#/deployments']")).click()
    wait_heading(browser, "Deployments")
    browser.find_element(*by_css("main a[href='#/deployments/new']")).click()
    wait_heading(browser, "New deployment")

    # The server's field violations land under their fields: no archive, a bad name and size.
    fill(browser, "main form", name="Not_A_Label", entrypoint="app.py", memory="lots")
    submit(browser)
    wait(browser, lambda d: invalid_message(d, "archive"), "the archive's violation")
    assert invalid_message(browser, "name")
    assert "size" in invalid_message(browser, "memory")
    assert invalid_message(browser, "entrypoint") == ""
    assert browser.switch_to.active_element.get_attribute("aria-invalid") == "true"
    screenshot("deployment-new-violations", phone=True)

    browser.find_element(*by_css("main input[name=archive]")).send_keys(str(app_archive(tmp_path, "v1")))
    fill(browser, "main form", name="hello", memory="64MB", cpu="0.1", env="GREETING=hi from the form")
    fill(
        browser,
        "main form",
        health_path="/health",
        health_interval="2",
        health_timeout="1",
        health_retries="3",
    )
    submit(browser)
    wait(browser, lambda d: heading(d) == "Deployment hello", "the new deployment's page")
    deployment_id = str(browser.execute_script("return location.hash")).split("/")[-1]

    # Running replicas in the page, and the rollout's events from the watch stream.
    wait(
        browser,
        lambda d: replica_statuses(d) == ["running"] and "1 running of 1" in text_of(d, "main dl"),
        "the replica running",
        timeout=ROLLOUT_WAIT,
    )
    wait(browser, lambda d: "Live" in text_of(d, "#rollout-state"), "the watch stream to be live")
    assert app_answer(fleet, deployment_id) == "v1"
    screenshot("deployment-running", phone=True)

    # Update to a new archive alone (update mask source_sha256): version 2 rolls out live.
    events_before = int(
        browser.execute_script("return document.querySelectorAll('#rollout-events li').length")
    )
    browser.find_element(*by_css("section[aria-labelledby=update-title] input[name=archive]")).send_keys(
        str(app_archive(tmp_path, "v2"))
    )
    submit(browser, "section[aria-labelledby=update-title] form")
    wait(browser, lambda d: "source_sha256" in text_of(d, "main .notice"), "the update's notice")
    wait(browser, lambda d: text_of(d, "#deployment-version") == "2", "version 2")
    wait(
        browser,
        lambda d: app_answer(fleet, deployment_id) == "v2",
        "the app to answer v2",
        timeout=ROLLOUT_WAIT,
    )
    wait(
        browser,
        lambda d: (
            "replica 0" in text_of(d, "#rollout-events")
            and int(d.execute_script("return document.querySelectorAll('#rollout-events li').length"))
            > events_before
        ),
        "the rollout's replica events",
    )
    wait(browser, lambda d: replica_statuses(d) == ["running"], "one running replica", timeout=ROLLOUT_WAIT)
    browser.execute_script("document.getElementById('rollout-title').scrollIntoView()")
    screenshot("deployment-rollout")

    # One manifest field (the env, mask manifest.env) with a violation first: a bad name.
    update = "section[aria-labelledby=update-title] form"
    fill(browser, update, env="lower=case")
    submit(browser, update)
    wait(browser, lambda d: invalid_message(d, "env"), "the env's violation")
    assert "upper-case" in invalid_message(browser, "env")

    # Roll back: the previous good version (v1) answers again.
    fill(browser, update, env="")
    browser.find_element(*by_css("main .actions button.secondary")).click()  # Roll back
    wait(browser, lambda d: "Rolling back" in text_of(d, "main .notice"), "the rollback's notice")
    wait(
        browser,
        lambda d: app_answer(fleet, deployment_id) == "v1",
        "the app to answer v1",
        timeout=ROLLOUT_WAIT,
    )

    # Logs: the last lines, then (follow) a line the app prints now.
    browser.find_element(*by_css(f"main a[href='#/deployments/{deployment_id}/logs']")).click()
    wait_heading(browser, "Logs of hello")
    wait(
        browser,
        lambda d: "hello from v1" in text_of(d, "#log-lines"),
        "the app's first lines",
        timeout=ROLLOUT_WAIT,
    )
    lines = text_of(browser, "#log-lines")
    assert "greeting is ***" in lines  # env values are masked in logs
    assert "hi from the form" not in lines
    wait(browser, lambda d: "Following" in text_of(d, "#logs-state"), "the followed stream")
    marker = uuid.uuid4().hex[:8]
    endpoint = next(
        a["endpoint"]
        for a in fleet.get(f"/api/v1/deployments/{deployment_id}")["deployment"]["node_assignments"]
        if a["status"] == "running"
    )
    with urllib.request.urlopen(f"{endpoint}/say/{marker}", timeout=10) as response:  # noqa: S310
        assert response.status == 200
    wait(browser, lambda d: f"said {marker}" in text_of(d, "#log-lines"), "the new line, followed")
    screenshot("deployment-logs", phone=True)

    # The list, with the deployment in it.
    browser.find_element(*by_css("#nav a[href='#/deployments']")).click()
    wait_heading(browser, "Deployments")
    wait(browser, lambda d: "hello" in text_of(d, "main table"), "the deployment in the list")
    screenshot("deployments-list", phone=True)
    assert csp_violations(browser) == []


# -- databases ------------------------------------------------------------------------------


def test_a_database_created_in_the_browser_takes_a_schema_and_answers_a_query(
    browser: Any, stack: Stack, fleet: Fleet, screenshot: Screenshot
) -> None:
    sign_in_in_browser(browser, stack, fleet.email)
    browser.find_element(*by_css("#nav a[href='#/databases']")).click()
    wait_heading(browser, "Databases")
    browser.find_element(*by_css("main .page-head button")).click()
    form = "#create-database form"
    wait(browser, lambda d: d.find_element(*by_css(form)), "the create form")
    # the agent offers "database", so it is chosen; the key is missing: its violation
    assert browser.find_element(*by_css("#db-nodes option")).is_selected()
    fill(browser, form, name="shop")
    submit(browser, form)
    wait(browser, lambda d: invalid_message(d, "sharding_key"), "the key's violation")
    fill(browser, form, sharding_key="customer_id")
    submit(browser, form)
    wait_heading(browser, "Database shop")
    wait(browser, lambda d: "No tables yet" in text_of(d, "#schema"), "the empty schema")

    fill(
        browser,
        "main form:has([name=ddl])",
        ddl="CREATE TABLE orders (id INTEGER, customer_id INTEGER, total REAL, PRIMARY KEY (customer_id, id))",
    )
    submit(browser, "main form:has([name=ddl])")
    wait(browser, lambda d: "orders" in text_of(d, "#schema h3"), "the orders table in the schema")
    columns = browser.execute_script(
        "return [...document.querySelectorAll('#schema td[data-label=Column]')].map(td => td.innerText)"
    )
    assert columns == ["id", "customer_id", "total"]

    query = "main form:has([name=query])"
    fill(browser, query, query="INSERT INTO orders VALUES (1, 7, 9.5), (2, 8, 3.0), (3, 7, 0.5)")
    submit(browser, query)
    wait(browser, lambda d: "Result" in text_of(d, "#results-title"), "the insert's result")
    fill(
        browser,
        query,
        query="SELECT customer_id, SUM(total) AS spent FROM orders GROUP BY customer_id ORDER BY customer_id",
    )
    submit(browser, query)

    def rows(d: Any) -> list[list[str]]:
        return [[str(c) for c in row] for row in d.execute_script(
            "return [...document.querySelectorAll('main table:has(caption) tbody tr')]"
            ".filter(tr => tr.closest('table').querySelector('caption').innerText === 'Rows')"
            ".map(tr => [...tr.cells].map(td => td.innerText))"
        )]  # fmt: skip

    wait(browser, lambda d: rows(d) == [["7", "10"], ["8", "3"]], "the query's rows")
    assert "ok" in text_of(browser, "section[aria-labelledby=results-title] td[data-label=Status]")
    screenshot("database-schema-query", phone=True)


# -- metrics --------------------------------------------------------------------------------


def test_the_metrics_page_shows_the_fleet_and_a_live_chart(
    browser: Any, stack: Stack, fleet: Fleet, screenshot: Screenshot
) -> None:
    sign_in_in_browser(browser, stack, fleet.email)
    browser.find_element(*by_css("#nav a[href='#/metrics']")).click()
    wait_heading(browser, "Metrics")
    wait(browser, lambda d: text_of(d, "#metric-nodes") == "1 healthy of 1", "the fleet's numbers")
    wait(browser, lambda d: "Live" in text_of(d, "#metrics-state"), "the watch stream to be live")

    def samples(d: Any) -> int:
        return int(
            d.execute_script(
                "return Number(document.querySelector('main section.card').dataset.samples || 0)"
            )
        )

    wait(browser, lambda d: samples(d) >= 3, "three samples pushed by the stream")
    paths = browser.execute_script(
        "return [...document.querySelectorAll('main svg.chart path')].map(p => p.getAttribute('d'))"
    )
    assert len(paths) == 2
    assert all(p.count("L") >= 2 for p in paths)
    assert "samples" in text_of(browser, "main figcaption")
    screenshot("metrics", phone=True)


# -- files ----------------------------------------------------------------------------------


def test_files_are_uploaded_listed_downloaded_and_deleted(
    browser: Any, stack: Stack, fleet: Fleet, tmp_path: Path, screenshot: Screenshot
) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    sign_in_in_browser(browser, stack, fleet.email)
    browser.find_element(*by_css("#nav a[href='#/files']")).click()
    wait_heading(browser, "Files")
    wait(browser, lambda d: "No files yet." in text_of(d, "#files"), "the empty list")

    content = b"hello from the browser test\n" * 100 + os.urandom(64)
    local = tmp_path / "hello.bin"
    local.write_bytes(content)
    upload_form = "main form:has([name=file])"

    # A path the server refuses: its violation under the path field.
    browser.find_element(*by_css(f"{upload_form} input[name=file]")).send_keys(str(local))
    fill(browser, upload_form, path="../up", replicas="1")
    submit(browser, upload_form)
    wait(browser, lambda d: invalid_message(d, "path"), "the path's violation")

    fill(browser, upload_form, path="docs/hello.bin")
    submit(browser, upload_form)
    wait(browser, lambda d: "Uploaded docs/hello.bin" in text_of(d, "main .notice"), "the upload's notice")
    wait(browser, lambda d: "docs/hello.bin" in text_of(d, "#files"), "the file in the list")
    assert text_of(browser, "#files td[data-label=Copies]") == "1"
    assert "complete" in text_of(browser, "#files td[data-label=Replication]")
    screenshot("files", phone=True)

    # A second file, then the list a page of one at a time.
    second = tmp_path / "second.txt"
    second.write_text("the second file\n")
    browser.find_element(*by_css(f"{upload_form} input[name=file]")).send_keys(str(second))
    fill(browser, upload_form, path="docs/second.txt", replicas="1")
    submit(browser, upload_form)
    wait(browser, lambda d: "Uploaded docs/second.txt" in text_of(d, "main .notice"), "the second upload")

    def paths(d: Any) -> list[str]:
        return [str(p) for p in d.execute_script(
            "return [...document.querySelectorAll('#files .file-path')].map(e => e.innerText)"
        )]  # fmt: skip

    filter_form = "main form[role=search]"
    fill(browser, filter_form, prefix="nothing/")
    submit(browser, filter_form)
    wait(browser, lambda d: "No files under nothing/." in text_of(d, "#files"), "an empty prefix")
    fill(browser, filter_form, prefix="docs/", page_size="1")
    submit(browser, filter_form)
    wait(browser, lambda d: len(paths(d)) == 1 and "Page 1" in text_of(d, "#files-pager"), "page 1")
    first_page = paths(browser)
    browser.find_element(*by_css("#files-pager button")).click()  # Next page
    wait(browser, lambda d: "Page 2" in text_of(d, "#files-pager") and len(paths(d)) == 1, "page 2")
    assert sorted(first_page + paths(browser)) == ["docs/hello.bin", "docs/second.txt"]
    browser.find_element(*by_css("#files-pager button")).click()  # Previous page
    wait(browser, lambda d: paths(d) == first_page and "Page 1" in text_of(d, "#files-pager"), "page 1 again")
    fill(browser, filter_form, page_size="20")
    submit(browser, filter_form)
    wait(browser, lambda d: paths(d) == ["docs/hello.bin", "docs/second.txt"], "both files on one page")

    browser.find_element(*by_css("#files button[aria-label='Download docs/hello.bin']")).click()
    saved = downloads / "hello.bin"
    wait(browser, lambda d: saved.exists() and saved.read_bytes() == content, "the downloaded bytes")

    browser.find_element(*by_css("#files button[aria-label='Delete docs/hello.bin']")).click()
    browser.switch_to.alert.accept()  # after confirming
    wait(browser, lambda d: "Deleted docs/hello.bin" in text_of(d, "main .notice"), "the delete's notice")
    wait(browser, lambda d: paths(d) == ["docs/second.txt"], "the file gone")
    assert [f["path"] for f in fleet.get("/api/v1/files")["files"]] == ["docs/second.txt"]
    assert csp_violations(browser) == []
