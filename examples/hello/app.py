"""The example app: a tiny HTTP server (standard library only).

GET /health answers 200 once it is up; every other path answers the greeting,
the replica it came from and the version. It listens on $PORT, as every backend must.
"""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GREETING = os.environ.get("GREETING", "hello")
VERSION = "1"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/health":
            body = b"ok"
            kind = "text/plain"
        else:
            reply = {
                "message": f"{GREETING} from Automator67",
                "replica": os.environ.get("A67_REPLICA_INDEX", "?"),
                "version": VERSION,
            }
            body = json.dumps(reply).encode()
            kind = "application/json"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()  # noqa: S104
