"""A local stand-in for the Hugging Face Hub's HTTP API, for tests. It is NOT the Hub.

There is no Hub to reach from the tests, so this small server answers the few endpoints that
huggingface_hub's `create_repo`, `model_info` and `upload_folder` call (as read in huggingface_hub's
source): repository creation and information (its visibility), `preupload` and `commit`. It accepts one
token, answers every file as a regular (inline, base64) upload, so the LFS/Xet transfer of large files is
not exercised, and records what it received so that tests can check what was uploaded and what was not.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USER = "standin-user"
REPO_PATH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit)/(?P<revision>[^/?]+)")
INFO_PATH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/?]+)(\?.*)?$")


@dataclass
class Commit:
    repo_id: str
    message: str
    files: dict[str, bytes]


@dataclass
class HubStandIn:
    token: str
    fail_commits: bool = False  # answer commits with 403 Forbidden
    # The first commit is answered only once this is true (or after 30 s), as over a slow network.
    hold_first_commit_until: Callable[[], bool] | None = None
    created: list[str] = field(default_factory=list)
    private: dict[str, bool] = field(default_factory=dict)  # repositories that exist, and whether private
    commits: list[Commit] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    url: str = ""

    def __enter__(self) -> "HubStandIn":
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self.reply(401, {"error": "Invalid username or password."})
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = f"{request.get('organization') or USER}/{request['name']}"
                    if repo_id in hub.private:  # as the Hub answers; create_repo(exist_ok=True) takes it
                        return self.reply(409, {"error": "You already created this model repo",
                                                "url": f"{hub.url}/{repo_id}"})
                    hub.created.append(repo_id)
                    hub.private[repo_id] = request.get("visibility") == "private"
                    return self.reply(200, {"url": f"{hub.url}/{repo_id}"})
                if self.path == "/api/validate-yaml":
                    return self.reply(200, {})
                match = REPO_PATH.match(self.path)
                if match and match["action"] == "preupload":
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                       "shouldIgnore": False} for f in files]})
                if match and match["action"] == "commit":
                    if hub.fail_commits:
                        return self.reply(403, {"error": "You don't have the rights to write to this repository"})
                    return self.commit(match["repo"], body)
                hub.unexpected.append(f"POST {self.path}")
                self.reply(404, {"error": "not in the stand-in"})

            def do_GET(self) -> None:
                info = INFO_PATH.match(self.path)
                if info and info["repo"] in hub.private:
                    if self.headers.get("Authorization") != f"Bearer {hub.token}":
                        return self.reply(401, {"error": "Invalid username or password."})
                    return self.reply(200, {"id": info["repo"], "private": hub.private[info["repo"]]})
                # huggingface_hub fetches a registry of AI agents for its User-Agent header; it does
                # without one, so the stand-in has none (and nothing gets cached).
                if self.path != "/api/agent-harnesses":
                    hub.unexpected.append(f"GET {self.path}")
                self.reply(404, {"error": "not in the stand-in"})

            def commit(self, repo_id: str, body: bytes) -> None:
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                         for line in lines if line["key"] == "file"}
                hub.unexpected += [f"commit entry {line['key']}" for line in lines
                                   if line["key"] not in ("header", "file")]
                deadline = time.monotonic() + 30
                while not hub.commits and hub.hold_first_commit_until and not hub.hold_first_commit_until() \
                        and time.monotonic() < deadline:
                    time.sleep(0.05)
                hub.commits.append(Commit(repo_id, header["summary"], files))
                oid = hashlib.sha1(body).hexdigest()
                self.reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                 "pullRequestUrl": None})

        return Handler
