"""A local stand-in for the Hugging Face Hub: just the endpoints `HfApi.create_repo` and `HfApi.upload_folder` call.

Tests point `export.hub_endpoint` at it, so nothing ever contacts the real Hub. Every file is answered
`uploadMode: "regular"` at preupload, so huggingface_hub sends each file's bytes base64-encoded inside the commit
(no LFS batch or xet storage endpoint is needed, whether or not `hf_xet` is installed).

    with HubStandin() as hub:
        HfApi(endpoint=hub.url, token="dummy").upload_folder(...)
        hub.repos["me/tiny"]  # {path: bytes}

Endpoints (huggingface_hub 1.x / 2.x, hf_api.py and _commit_api.py):
    POST /api/repos/create                            {"name", "organization", "type", ...} -> {"url"}; 409 if taken
    POST /api/validate-yaml                           README.md front matter check (create_commit without hf_xet)
    POST /api/{type}s/{namespace}/{name}/preupload/{revision}   {"files": [{path, sample, size}]} -> upload modes
    POST /api/{type}s/{namespace}/{name}/commit/{revision}      ndjson: a header line, then one line per file
Anything else is answered 404 and listed in `unhandled`, so a test can assert the client needed nothing more.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPO_PATH = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit)/([^/?]+)")


class HubStandin:
    """Serves on 127.0.0.1 at a free port from a daemon thread; a context manager that shuts it down."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}  # repo_id -> {path in repo: content}
        self.created: list[dict] = []  # the JSON of every create request ({"name", "organization", "visibility"...})
        self.commits: list[dict] = []  # {"repo_id", "revision", "summary", "paths", "oid"}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.unhandled: list[tuple[str, str]] = []
        self.authorization: set[str] = set()  # Authorization headers seen
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer has a Content-Length

            def log_message(self, *args):  # quiet: pytest shows failures, not access logs
                pass

            def do_POST(self):
                standin._handle(self, self._body())

            def do_GET(self):
                standin._handle(self, b"")

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        chunk = self.rfile.read(size)
                        self.rfile.readline()  # the CRLF after each chunk
                        if size == 0:
                            return b"".join(chunks)
                        chunks.append(chunk)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> HubStandin:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # -- request handling ------------------------------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        method, path = handler.command, handler.path
        with self._lock:
            self.requests.append((method, path))
            if "Authorization" in handler.headers:
                self.authorization.add(handler.headers["Authorization"])
        match = REPO_PATH.match(path)
        if method == "POST" and path.split("?")[0] == "/api/repos/create":
            status, answer = self._create_repo(json.loads(body))
        elif method == "POST" and path.split("?")[0] == "/api/validate-yaml":
            status, answer = 200, {"errors": [], "warnings": []}
        elif method == "POST" and match and match[3] == "preupload":
            files = json.loads(body)["files"]
            status, answer = 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                              "oid": None} for f in files]}
        elif method == "POST" and match and match[3] == "commit":
            status, answer = self._commit(match[2], match[4], body)
        else:
            status, answer = 404, {"error": f"stand-in Hub does not implement {method} {path}"}
            with self._lock:
                self.unhandled.append((method, path))
        payload = json.dumps(answer).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _create_repo(self, request: dict) -> tuple[int, dict]:
        repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
        url = f"{self.url}/{repo_id}"
        with self._lock:
            self.created.append(request)
            if repo_id in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}
            self.repos[repo_id] = {}
        return 200, {"url": url, "name": repo_id}

    def _commit(self, repo_id: str, revision: str, body: bytes) -> tuple[int, dict]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header, operations = lines[0], lines[1:]
        if header["key"] != "header":
            return 400, {"error": f"the first ndjson line must be the header, got {header['key']}"}
        for op in operations:
            if op["key"] != "file" or op["value"].get("encoding") != "base64":  # lfsFile: never offered at preupload
                return 400, {"error": f"stand-in Hub accepts only base64 regular files, got {op['key']}"}
        with self._lock:
            if repo_id not in self.repos:
                return 404, {"error": f"Repository {repo_id} not found"}
            for op in operations:
                self.repos[repo_id][op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            oid = hashlib.sha1(body).hexdigest()
            self.commits.append({"repo_id": repo_id, "revision": revision, "summary": header["value"]["summary"],
                                 "paths": [op["value"]["path"] for op in operations], "oid": oid})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
