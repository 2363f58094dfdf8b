"""hf:// dataset and model sources, downloaded by the real huggingface_hub client from a stand-in Hub on localhost.

The stand-in serves the three endpoints `snapshot_download` uses, as the Hub answers them: the repository's info at
a revision (`/api/datasets/<repo>/revision/<rev>`, `/api/models/<repo>/revision/<rev>`: its commit and files), the
file tree at a commit (`/api/.../tree/<commit>`), and the files (`/datasets/<repo>/resolve/<commit>/<path>`,
`/<repo>/resolve/<commit>/<path>`, HEAD and GET, with the X-Repo-Commit and ETag headers). It is private: every
request needs the token. What it does not cover: Xet-stored files, redirects to a CDN, pagination of large trees.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
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
MODEL_ID = "acme/tiny-llama"
MODEL_COMMIT = "3" * 40
MODEL_FILES: dict[str, bytes] = {}  # the tiny Llama's files, filled by the model_hub fixture


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
        repos = {
            ("datasets", REPO_ID): (REFS, COMMITS),
            ("models", MODEL_ID): ({"main": MODEL_COMMIT, MODEL_COMMIT: MODEL_COMMIT}, {MODEL_COMMIT: MODEL_FILES}),
        }
        for (kind, repo), (refs, commits) in repos.items():
            if m := re.fullmatch(f"/api/{kind}/{repo}/revision/(.+)", path):
                commit = refs.get(m.group(1))
                if commit is None:
                    return self.error(404, "RevisionNotFound", "Invalid rev id")
                info = {
                    "id": repo,
                    "sha": commit,
                    "private": True,
                    "siblings": [{"rfilename": f} for f in commits[commit]],
                }
                return self.reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            if m := re.fullmatch(f"/api/{kind}/{repo}/tree/([0-9a-f]{{40}})", path):
                files = commits[m.group(1)]
                tree = [{"type": "file", "path": f, "size": len(b), "oid": blob_id(b)} for f, b in files.items()]
                return self.reply(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
            prefix = "/datasets" if kind == "datasets" else ""
            m = re.fullmatch(f"{prefix}/{repo}/resolve/([0-9a-f]{{40}})/(.+)", path)
            if m and m.group(2) in commits.get(m.group(1), {}):
                body = commits[m.group(1)][m.group(2)]
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


@pytest.mark.slow
def test_a_hub_model_is_downloaded_once_for_a_two_node_job_and_pinned(
    tmp_path: Path, hub: str, llama_dir: Path, train_jsonl: Path
) -> None:
    MODEL_FILES.update({p.name: p.read_bytes() for p in llama_dir.iterdir() if p.is_file()})
    Hub.requests.clear()
    cfg = assets.trainer_config(
        tmp_path,
        Path("unused"),
        train_jsonl,
        model={"source": f"hf://{MODEL_ID}", "revision": "main"},
        training={"maxSteps": 2, "logEverySteps": 1, "batchSizePerDevice": 1},
        sources={"cacheDir": str(tmp_path / "cache")},
    )
    path = assets.write_config(tmp_path, cfg)
    exe = shutil.which("kubetune-launch", path=str(Path(sys.executable).parent))
    assert exe
    port = str(assets.free_port())
    nodes = [
        subprocess.Popen(
            [exe],
            env=assets.worker_env(
                KUBETUNE_CONFIG=str(path),
                KUBETUNE_NNODES="2",
                JOB_COMPLETION_INDEX=str(node),
                KUBETUNE_MASTER_ADDR="127.0.0.1",
                KUBETUNE_MASTER_PORT=port,
                KUBETUNE_TERMINATION_LOG=str(tmp_path / f"termination-log-{node}"),
                HF_HUB_OFFLINE="0",
                HF_ENDPOINT=hub,
                HF_TOKEN=TOKEN,
                HF_HOME=str(tmp_path / f"hf-home-{node}"),
            ),
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-4000:]
    # Rank 0 resolved main to a commit once and downloaded each file once, for both nodes.
    model_requests = [r for r in Hub.requests if MODEL_ID in r]
    assert model_requests.count(f"GET /api/models/{MODEL_ID}/revision/main") == 1
    downloads = sorted(r for r in model_requests if r.startswith(f"GET /{MODEL_ID}/resolve/"))
    assert downloads == sorted(f"GET /{MODEL_ID}/resolve/{MODEL_COMMIT}/{f}" for f in MODEL_FILES)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    record = manifest["sources"]["model"]
    assert (record["source"], record["revision"], record["commit"]) == (f"hf://{MODEL_ID}", "main", MODEL_COMMIT)
    assert manifest["baseModel"]["source"] == f"hf://{MODEL_ID}" and manifest["worldSize"] == 2
    assert Path(record["path"]).parent == tmp_path / "cache"
