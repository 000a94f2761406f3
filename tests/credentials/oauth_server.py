"""A small OAuth 2.0 authorization server for tests, run as its own process.

``python -m tests.credentials.oauth_server --state FILE [--port N]`` prints ``PORT <n>``
and serves until killed:

* ``POST /token`` — the refresh-token grant (RFC 6749 §6), client authentication by
  HTTP Basic (``client_secret_basic``): a known, unrevoked refresh token gets a new access
  token (``expires_in`` from the config) and, when ``rotate`` is on, a new refresh token
  (the old one becomes invalid, as providers with rotation do); otherwise
  ``400 {"error": "invalid_grant"}``.
* ``POST /revoke`` — RFC 7009: the token is revoked, ``200`` whatever it was.
* ``/_admin/*`` — the test's controls: ``seed`` (issue refresh tokens),
  ``config`` (``rotate``, ``expires_in``, ``mode``: ``ok``, ``unavailable`` (503) or
  ``stall`` (hold token requests, then drop them unanswered and unprocessed)),
  ``release`` (end the stalls), ``stats``.

State (tokens, counters) lives in ``--state`` (JSON), so a restarted server (the
"provider down for a while" test) knows the tokens it issued.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

CLIENT_ID = "a67-test-client"
CLIENT_SECRET = "a67-test-client-secret"


class State:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.release = threading.Event()
        if path.exists():
            self.data: dict[str, Any] = json.loads(path.read_text())
        else:
            self.data = {
                "refresh_tokens": {},  # token -> {"valid": bool}
                "access_tokens": {},  # token -> {"revoked": bool}
                "config": {"rotate": False, "expires_in": 3600, "mode": "ok", "access_prefix": "at-"},
                "token_requests": 0,
                "grants": 0,
                "stalled": 0,
                "revocations": [],
                "grant_times": [],
            }

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


STATE: State


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in separate writes

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _send(self, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(raw)

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode() if length else ""
        if self.headers.get("Content-Type", "").startswith("application/json"):
            return {k: v for k, v in (json.loads(raw) if raw else {}).items()}
        return {k: v[0] for k, v in parse_qs(raw).items()}

    def _client_ok(self) -> bool:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user == CLIENT_ID and password == CLIENT_SECRET

    def do_GET(self) -> None:
        if self.path == "/_admin/stats":
            with STATE.lock:
                self._send(200, STATE.data)
            return
        self._send(404, {"error": "not_found"})

    def do_POST(self) -> None:
        form = self._form()
        if self.path == "/token":
            self._token(form)
        elif self.path == "/revoke":
            if not self._client_ok():
                self._send(401, {"error": "invalid_client"})
                return
            with STATE.lock:
                token = form.get("token", "")
                STATE.data["revocations"].append(form.get("token_type_hint", ""))
                if token in STATE.data["refresh_tokens"]:
                    STATE.data["refresh_tokens"][token]["valid"] = False
                if token in STATE.data["access_tokens"]:
                    STATE.data["access_tokens"][token]["revoked"] = True
                STATE.save()
            self._send(200, {})
        elif self.path == "/_admin/seed":
            with STATE.lock:
                for token in form["tokens"]:
                    STATE.data["refresh_tokens"][token] = {"valid": True}
                STATE.save()
            self._send(200, {})
        elif self.path == "/_admin/config":
            with STATE.lock:
                STATE.data["config"].update(form)
                STATE.save()
            if form.get("mode") != "stall":
                STATE.release.set()
            else:
                STATE.release.clear()
            self._send(200, STATE.data["config"])
        elif self.path == "/_admin/release":
            STATE.release.set()
            self._send(200, {})
        else:
            self._send(404, {"error": "not_found"})

    def _token(self, form: dict[str, str]) -> None:
        with STATE.lock:
            STATE.data["token_requests"] += 1
            config = dict(STATE.data["config"])
            if config["mode"] == "stall":
                STATE.data["stalled"] += 1
            STATE.save()
        if config["mode"] == "stall":
            STATE.release.wait()
            self.close_connection = True  # dropped: never answered, never processed
            return
        if config["mode"] == "unavailable":
            self._send(503, {"error": "temporarily_unavailable"})
            return
        if not self._client_ok():
            self._send(401, {"error": "invalid_client"})
            return
        if form.get("grant_type") != "refresh_token":
            self._send(400, {"error": "unsupported_grant_type"})
            return
        token = form.get("refresh_token", "")
        with STATE.lock:
            entry = STATE.data["refresh_tokens"].get(token)
            if entry is None or not entry["valid"]:
                self._send(400, {"error": "invalid_grant", "error_description": "unknown or revoked"})
                return
            access = config["access_prefix"] + secrets.token_urlsafe(16)
            STATE.data["access_tokens"][access] = {"revoked": False}
            body: dict[str, Any] = {
                "access_token": access,
                "token_type": "Bearer",
                "expires_in": int(config["expires_in"]),
            }
            if config["rotate"]:
                new = "rt-" + secrets.token_urlsafe(16)
                entry["valid"] = False
                STATE.data["refresh_tokens"][new] = {"valid": True}
                body["refresh_token"] = new
            STATE.data["grants"] += 1
            STATE.data["grant_times"].append(time.time())
            STATE.save()
        self._send(200, body)


def main() -> int:
    global STATE
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    STATE = State(Path(args.state))
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
