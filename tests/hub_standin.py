"""A local stand-in for the Hugging Face Hub HTTP API, enough for `create_repo`, `create_branch` and a
single-commit `upload_folder` (the path huggingface_hub takes without hf_xet): it answers

    POST /api/repos/create                          -> {"url": ...}
    POST /api/validate-yaml                         -> no errors (the card's front matter is recorded)
    POST /api/models/{owner}/{name}/preupload/{rev} -> every file "regular" (content goes in the commit)
    POST /api/models/{owner}/{name}/branch/{rev}    -> {}
    POST /api/models/{owner}/{name}/commit/{rev}    -> {"commitUrl", "commitOid"}; files decoded and kept

and records every request (method, path, query, Authorization header, JSON or NDJSON body). `fail` maps a
route name ("create", "commit", ...) to an HTTP status to answer instead.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

COMMIT_OID = "c0ffee" + "0" * 34
ROUTES = {
    "create": re.compile(r"^/api/repos/create$"),
    "validate": re.compile(r"^/api/validate-yaml$"),
    "preupload": re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$"),
    "branch": re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)$"),
    "commit": re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$"),
}


class StandInHub:
    def __init__(self):
        self.requests: list[dict] = []
        self.files: dict[str, bytes] = {}  # path -> content of the last commit
        self.fail: dict[str, int] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                self._handle()

            def do_POST(self):
                self._handle()

            def _handle(self):
                url = urlparse(self.path)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                route, match = next(((n, m) for n, r in ROUTES.items() if (m := r.match(url.path))), (None, None))
                body = self._parse(raw)
                hub.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                     "route": route, "auth": self.headers.get("Authorization"), "body": body})
                if route is None:
                    return self._send(404, {"error": f"stand-in Hub has no route {self.command} {url.path}"})
                if route in hub.fail:
                    return self._send(hub.fail[route], {"error": f"stand-in failure of {route}"})
                base = f"http://{self.headers['Host']}"
                if route == "create":
                    return self._send(200, {"url": f"{base}/{body.get('organization')}/{body['name']}"})
                if route == "validate":
                    return self._send(200, {"errors": [], "warnings": []})
                if route == "preupload":
                    files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in body["files"]]
                    return self._send(200, {"files": files})
                if route == "branch":
                    return self._send(200, {})
                for item in body:
                    if item["key"] == "file":
                        hub.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                self._send(200, {"commitUrl": f"{base}/{match['repo']}/commit/{COMMIT_OID}", "commitOid": COMMIT_OID})

            def _parse(self, raw: bytes):
                if not raw:
                    return None
                if "ndjson" in (self.headers.get("Content-Type") or ""):
                    return [json.loads(line) for line in raw.splitlines() if line.strip()]
                try:
                    return json.loads(raw)
                except ValueError:
                    return raw

            def _send(self, status: int, data: dict):
                payload = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def routes(self) -> list[str]:
        return [r["route"] for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
