"""An S3-compatible server on localhost for tests: moto in server mode (its own environment, hack/moto.sh) with
IAM authentication on, so wrong keys are refused as AWS refuses them. Its request log tells what was downloaded."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import obstore
from obstore.store import S3Store

REPO = Path(__file__).resolve().parents[2]
BUCKET = "kt-data"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Run with the server's boto3 while authentication is still off (INITIAL_NO_AUTH_ACTION_COUNT=4 allows these
# four requests): a user allowed everything, its access key, and the bucket. Prints the key as JSON.
SETUP = """
import json, sys
import boto3
url, bucket = sys.argv[1:]
kw = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="trainer")
allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=json.dumps(allow_all))
key = iam.create_access_key(UserName="trainer")["AccessKey"]
boto3.client("s3", **kw).create_bucket(Bucket=bucket)
print(json.dumps({"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}))
"""


@dataclass
class S3Server:
    url: str
    key_id: str
    secret: str
    log: Path

    def credentials(self, secret: str | None = None) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": secret or self.secret}

    def store(self) -> Any:
        return S3Store(
            BUCKET,
            endpoint=self.url,
            region="us-east-1",
            access_key_id=self.key_id,
            secret_access_key=self.secret,
            client_options={"allow_http": True},
        )

    def put_dir(self, prefix: str, directory: Path) -> None:
        for f in sorted(p for p in directory.rglob("*") if p.is_file()):
            obstore.put(self.store(), f"{prefix}/{f.relative_to(directory).as_posix()}", f.read_bytes())

    def etags(self, prefix: str) -> dict[str, str]:
        return {m["path"]: m["e_tag"].strip('"') for batch in obstore.list(self.store(), prefix=prefix) for m in batch}

    def downloads(self) -> dict[str, int]:
        """Object downloads so far, by key (listings and HEADs are not downloads)."""
        counts: dict[str, int] = {}
        marker = f'"GET /{BUCKET}/'
        for line in self._requests(marker):
            key = line.split(marker, 1)[1].split(" ", 1)[0]
            counts[key] = counts.get(key, 0) + 1
        return counts

    def download_statuses(self, key: str) -> list[int]:
        """The HTTP status of every download of `key` so far (206: a range was asked for and sent)."""
        request = f'"GET /{BUCKET}/{key} '
        return [int(line.split(request, 1)[1].split('" ', 1)[1].split()[0]) for line in self._requests(request)]

    def _requests(self, marker: str) -> list[str]:
        """The log lines with `marker`, without the colours the server gives some of them (206s, for one)."""
        lines = (ANSI.sub("", line) for line in self.log.read_text().splitlines())
        return [line for line in lines if marker in line]

    def downloads_since(self, before: dict[str, int]) -> dict[str, int]:
        return {k: n - before.get(k, 0) for k, n in self.downloads().items() if n != before.get(k, 0)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    # A bare TCP connect: an HTTP request would use up one of the unauthenticated setup requests.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "moto_server exited"
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError("moto_server did not listen")


@contextmanager
def s3_server(tmp: Path, host: str = "127.0.0.1") -> Iterator[S3Server]:
    """A running server with the bucket BUCKET and a user's key, listening on `host` (an address pods reach, for
    workers on real nodes); stopped on exit."""
    built = subprocess.run([REPO / "hack" / "moto.sh"], capture_output=True, text=True, check=True)
    env_dir = Path(built.stdout.split()[-1])
    port = free_port()
    log = tmp / "moto.log"
    server_env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [env_dir / "bin" / "moto_server", "-H", host, "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=server_env,
        )
    try:
        _wait_for_port(host, port, proc)
        url = f"http://{host}:{port}"
        setup = subprocess.run([env_dir / "bin" / "python", "-c", SETUP, url, BUCKET], capture_output=True, text=True)
        assert setup.returncode == 0, setup.stderr
        key = json.loads(setup.stdout)
        yield S3Server(url, key["id"], key["secret"], log)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
