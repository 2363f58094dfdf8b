"""hf:// dataset sources, downloaded by the real huggingface_hub client from a stand-in Hub on localhost.

The stand-in serves the three endpoints `snapshot_download` uses, as the Hub answers them: the dataset's info at a
revision (`/api/datasets/<repo>/revision/<rev>`: its commit and files), the file tree at a commit
(`/api/datasets/<repo>/tree/<commit>`), and the files (`/datasets/<repo>/resolve/<commit>/<path>`, HEAD and GET,
with the X-Repo-Commit and ETag headers). It is private: every request needs the token. What it does not
cover: Xet-stored files, redirects to a CDN, pagination of large trees.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlparse

import pytest
import trainer_assets as assets
from kubetune_trainer.errors import EXIT_CONFIG

pytestmark = pytest.mark.trainer

REPO_ID = "acme/support"
TOKEN = "hf_test_token_0123456789"
V1 = "1" * 40
MAIN = "2" * 40


def rows(n: int, seed: int) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in assets.rows(n, "prompt_completion", seed=seed)).encode()


# Two commits of one dataset repository; tag v1 is the older. data/test.jsonl must never be downloaded.
COMMITS = {
    V1: {"data/train.jsonl": rows(120, seed=1), "data/test.jsonl": rows(10, seed=2), "README.md": b"# support\n"},
    MAIN: {"data/train.jsonl": rows(140, seed=3), "data/test.jsonl": rows(10, seed=4), "README.md": b"# support\n"},
}
REFS = {"v1": V1, "main": MAIN, V1: V1, MAIN: MAIN}


class Hub(BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: Any) -> None:
        self.requests.append(f"{self.command} {unquote(urlparse(self.path).path)}")

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.reply(status, body, {"X-Error-Code": code, "X-Error-Message": message})

    def do_GET(self) -> None:
        path = unquote(urlparse(self.path).path)
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.error(401, "RepoNotFound", "Repository not found")
        if m := re.fullmatch(f"/api/datasets/{REPO_ID}/revision/(.+)", path):
            commit = REFS.get(m.group(1))
            if commit is None:
                return self.error(404, "RevisionNotFound", "Invalid rev id")
            info = {
                "id": REPO_ID,
                "sha": commit,
                "private": True,
                "siblings": [{"rfilename": f} for f in COMMITS[commit]],
            }
            return self.reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        if m := re.fullmatch(f"/api/datasets/{REPO_ID}/tree/([0-9a-f]{{40}})", path):
            files = COMMITS[m.group(1)]
            tree = [{"type": "file", "path": f, "size": len(b), "oid": blob_id(b)} for f, b in files.items()]
            return self.reply(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        if (m := re.fullmatch(f"/datasets/{REPO_ID}/resolve/([0-9a-f]{{40}})/(.+)", path)) and m.group(
            2
        ) in COMMITS.get(m.group(1), {}):
            body = COMMITS[m.group(1)][m.group(2)]
            return self.reply(200, body, {"X-Repo-Commit": m.group(1), "ETag": f'"{blob_id(body)}"'})
        return self.error(404, "EntryNotFound", "Entry not found")

    do_HEAD = do_GET


def blob_id(body: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


@pytest.fixture(scope="module")
def hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def train(tmp: Path, hub: str, llama_dir: Path, token: str = TOKEN, **dataset: Any) -> subprocess.CompletedProcess[str]:
    cfg = assets.trainer_config(
        tmp,
        llama_dir,
        Path("unused"),
        dataset={"path": f"hf://{REPO_ID}/data/train.jsonl", "revision": "v1", **dataset},
        training={"maxSteps": 3, "logEverySteps": 3},
        sources={"cacheDir": str(tmp.parent / "cache")},
    )
    env = assets.worker_env(
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT=hub,
        HF_TOKEN=token,
        HF_HOME=str(tmp / "hf-home"),
        KUBETUNE_TERMINATION_LOG=str(tmp / "termination-log"),
    )
    path = assets.write_config(tmp, cfg)
    return subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_trains_on_a_file_of_a_dataset_repository_at_a_revision(tmp_path: Path, hub: str, llama_dir: Path) -> None:
    Hub.requests.clear()
    done = train(tmp_path / "first", hub, llama_dir)
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = json.loads((tmp_path / "first" / "out" / "manifest.json").read_text())
    record = manifest["sources"]["dataset"]
    assert record["source"] == f"hf://{REPO_ID}/data/train.jsonl"
    assert (record["revision"], record["commit"]) == ("v1", V1)
    [data] = manifest["dataset"]["files"]
    assert data["path"] == record["path"] and data["rows"] == 120
    assert data["sha256"] == hashlib.sha256(COMMITS[V1]["data/train.jsonl"]).hexdigest()
    # Only the named file came down: not the test split, not the README.
    downloads = [r for r in Hub.requests if r.startswith("GET /datasets/")]
    assert downloads == [f"GET /datasets/{REPO_ID}/resolve/{V1}/data/train.jsonl"]
    assert TOKEN not in done.stderr

    # The next run resolves the revision again (a moved tag would be noticed) but downloads nothing.
    Hub.requests.clear()
    again = train(tmp_path / "second", hub, llama_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    assert [r for r in Hub.requests if REPO_ID in r] == [f"GET /api/datasets/{REPO_ID}/revision/v1"]


@pytest.mark.parametrize(
    ("case", "token", "dataset", "reason"),
    [
        (
            "wrong-token",
            "hf_wrong",
            {},
            "no such dataset repository, or it is private and HF_TOKEN is missing or wrong",
        ),
        ("no-revision", TOKEN, {"revision": "v9"}, "no such revision"),
        (
            "no-file",
            TOKEN,
            {"path": f"hf://{REPO_ID}/data/nope.jsonl"},
            f"no file or directory data/nope.jsonl in {REPO_ID}",
        ),
    ],
)
def test_hub_sources_that_cannot_work_exit_78(
    tmp_path: Path, hub: str, llama_dir: Path, case: str, token: str, dataset: dict[str, Any], reason: str
) -> None:
    done = train(tmp_path / "run", hub, llama_dir, token=token, **dataset)
    assert done.returncode == EXIT_CONFIG, done.stderr[-3000:]
    message = (tmp_path / "run" / "termination-log").read_text()
    assert message.startswith(f"dataset source hf://{REPO_ID}/") and reason in message
