"""Container logs: where they live, how they are read (tail, follow, previous), and the HTTPS endpoint the
API server calls for `kubectl logs` (the kubelet's /containerLogs/{namespace}/{pod}/{container}).

Layout, like the kubelet's /var/log/pods: <root>/pods/<namespace>_<pod>_<uid>/logs/<container>/<restart>.log
holds stdout and stderr together; <restart>.done appears when that run of the container has exited, which
is what ends a follow.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

FOLLOW_POLL_SECONDS = 0.2


def pod_dir(root: Path, namespace: str, name: str, uid: str) -> Path:
    return root / "pods" / f"{namespace}_{name}_{uid}"


def find_pod_dir(root: Path, namespace: str, name: str) -> Path | None:
    """The newest directory of a pod by that name (an older one is a deleted pod of the same name)."""
    found = sorted((root / "pods").glob(f"{namespace}_{name}_*"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def containers_with_logs(directory: Path) -> list[str]:
    return sorted(p.name for p in (directory / "logs").iterdir()) if (directory / "logs").exists() else []


def find_log(directory: Path, container: str, previous: bool = False) -> Path | None:
    runs = sorted((directory / "logs" / container).glob("*.log"), key=lambda p: int(p.stem))
    wanted = -2 if previous else -1
    return runs[wanted] if len(runs) >= -wanted else None


def tail(data: bytes, lines: int | None) -> bytes:
    if lines is None:
        return data
    if lines <= 0:
        return b""
    return b"".join(data.splitlines(keepends=True)[-lines:])


async def read_log(
    path: Path, *, follow: bool = False, tail_lines: int | None = None, limit_bytes: int | None = None
) -> AsyncIterator[bytes]:
    """The log's content, then (follow) what is appended until this run of the container has exited."""
    sent = 0
    with open(path, "rb") as f:
        chunk = tail(f.read(), tail_lines)
        while True:
            if limit_bytes is not None:
                chunk = chunk[: max(0, limit_bytes - sent)]
            if chunk:
                sent += len(chunk)
                yield chunk
            if not follow or (limit_bytes is not None and sent >= limit_bytes):
                return
            done = _run_finished(path)
            chunk = f.read()
            if not chunk:
                if done:
                    return
                await asyncio.sleep(FOLLOW_POLL_SECONDS)


def _run_finished(path: Path) -> bool:
    # Checked before the last read, so nothing written before the exit is missed.
    return path.with_suffix(".done").exists() or (path.parent / f"{int(path.stem) + 1}.log").exists()


# --------------------------------------------------------------------------------------------------
# The kubelet-style HTTPS endpoint


def log_app(root: Path) -> web.Application:
    async def container_logs(request: web.Request) -> web.StreamResponse:
        ns, pod, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        q = request.query
        directory = find_pod_dir(root, ns, pod)
        if directory is None:
            raise web.HTTPNotFound(text=f'pod "{pod}" has not run on this node')
        previous = q.get("previous") == "true"
        path = find_log(directory, container, previous)
        if path is None:  # the kubelet's wording, which kubectl shows
            if previous:
                raise web.HTTPBadRequest(text=f'previous terminated container "{container}" in pod "{pod}" not found')
            raise web.HTTPBadRequest(text=f'container "{container}" in pod "{pod}" is waiting to start')
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        async for chunk in read_log(
            path,
            follow=q.get("follow") == "true",
            tail_lines=int(q["tailLines"]) if "tailLines" in q else None,
            limit_bytes=int(q["limitBytes"]) if "limitBytes" in q else None,
        ):
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", container_logs)
    app.router.add_get("/healthz", lambda _: web.Response(text="ok"))
    return app


def server_ssl(cert: Path, key: Path, client_ca: Path) -> ssl.SSLContext:
    """Serve with the agent's own certificate; answer only clients with a certificate from the cluster's CA
    (the API server presents one when started with --kubelet-client-certificate)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_ca))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
