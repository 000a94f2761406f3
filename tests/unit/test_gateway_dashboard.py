"""The dashboard's files in the gateway configuration: one direct response per file, with
its Content-Type and the security headers, and nothing else of the API changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.gateway.config import DEFAULT_DASHBOARD, GatewaySettings
from controller.gateway.render import (
    DASHBOARD_CONFIG_PATH,
    DASHBOARD_MAX_FILE_BYTES,
    GatewayConfigError,
    dashboard_config,
    dashboard_files,
    render,
    validate,
    write_config,
)


def test_every_file_of_the_dashboard_is_served_and_index_html_also_at_the_root() -> None:
    served = {url: content_type for url, _, content_type in dashboard_files(DEFAULT_DASHBOARD)}
    assert served["/"] == served["/index.html"] == "text/html; charset=utf-8"
    assert served["/app.js"] == "text/javascript; charset=utf-8"
    assert served["/style.css"] == "text/css; charset=utf-8"
    on_disk = {"/" + p.name for p in DEFAULT_DASHBOARD.iterdir() if not p.name.startswith(".")}
    assert set(served) == on_disk | {"/"}


def test_the_rendered_routes_carry_the_files_types_and_security_headers() -> None:
    text = render(GatewaySettings())
    assert f"max_direct_response_body_size_bytes: {DASHBOARD_MAX_FILE_BYTES}" in text
    assert f'filename: "{DEFAULT_DASHBOARD / "app.js"}"' in text
    assert '"content-security-policy"' in text
    assert '"x-content-type-options", value: "nosniff"' in text
    assert text.index('path: "/app.js"') < text.index("/api/v1/sources")  # before the API's routes


def test_the_dashboard_can_be_turned_off() -> None:
    text = render(GatewaySettings(dashboard=False))
    assert "filename:" not in text
    assert DASHBOARD_CONFIG_PATH not in text


def test_the_enroll_command_address_defaults_to_the_upstream() -> None:
    assert dashboard_config(GatewaySettings())["agent_controller"] == "127.0.0.1:50051"
    settings = GatewaySettings(agent_controller_address="ctl.example.com:50051")
    assert dashboard_config(settings)["agent_controller"] == "ctl.example.com:50051"


@pytest.mark.parametrize(
    ("name", "content", "complaint"),
    [
        ("app.exe", b"x", "unknown kind"),
        ("config.json", b"{}", "cannot be served"),
        ("bad name.js", b"", "cannot be served"),
        ("big.js", b"x" * (DASHBOARD_MAX_FILE_BYTES + 1), "over"),
    ],
    ids=["unknown-kind", "reserved-name", "odd-name", "too-big"],
)
def test_a_file_that_cannot_be_served_is_refused(
    tmp_path: Path, name: str, content: bytes, complaint: str
) -> None:
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(GatewayConfigError, match=complaint):
        dashboard_files(tmp_path)


def test_a_folder_without_index_html_is_refused(tmp_path: Path) -> None:
    (tmp_path / "app.js").write_text("")
    with pytest.raises(GatewayConfigError, match=r"no index\.html"):
        dashboard_files(tmp_path)


def test_a_missing_dashboard_folder_is_named() -> None:
    with pytest.raises(ValueError, match="A67_GATEWAY_DASHBOARD_DIR"):
        GatewaySettings(dashboard_dir=Path("/no/such/folder")).validate()


def test_envoy_accepts_a_dashboard_file_bigger_than_its_default_cap(tmp_path: Path) -> None:
    folder = tmp_path / "dash"
    folder.mkdir()
    (folder / "index.html").write_text("<!doctype html>" + "x" * 64 * 1024)
    config = write_config(GatewaySettings(dashboard_dir=folder), tmp_path / "envoy.yaml")
    validate(config)
