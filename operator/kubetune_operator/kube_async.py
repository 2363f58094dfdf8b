"""The asyncio transport of kubetune's API client (kube.py has the credentials, paths and errors): the operator's."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import aiohttp

from kubetune_operator.kube import (
    CONNECT_TIMEOUT,
    JSON,
    MERGE_PATCH,
    READ_TIMEOUT,
    ApiError,
    Connection,
    Obj,
    Unreachable,
    decode,
    resource_of,
    resource_path,
)

# Requests one reconcile may have in flight at once: its children are created together (a claim, the config,
# the Service and the Job).
REQUESTS_PER_RECONCILE = 4


def connections_for(reconcile_workers: int) -> int:
    """Connections to the API server: enough that no reconcile waits for one (a wait here is reconcile latency
    the API server never caused), plus one for the event poster. Each TLS connection holds a 256 KiB read buffer
    (asyncio's), so the cap follows the workers rather than a large constant."""
    return reconcile_workers * REQUESTS_PER_RECONCILE + 1


class AsyncKube:
    def __init__(self, connection: Connection, max_connections: int = connections_for(1)) -> None:
        self.connection = connection
        self.max_connections = max_connections
        self.requests: Counter[str] = Counter()
        self._ssl = connection.ssl_context()
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, str] | None = None,
        content_type: str = JSON,
    ) -> Obj:
        self.requests[f"{method} {resource_of(path)}"] += 1
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=READ_TIMEOUT + CONNECT_TIMEOUT, connect=CONNECT_TIMEOUT)
            connector = aiohttp.TCPConnector(limit=self.max_connections, ssl=self._ssl)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        try:
            async with self._session.request(
                method,
                self.connection.url(path, query),
                data=json.dumps(body).encode() if body is not None else None,
                headers=self.connection.headers(content_type),
                proxy=self.connection.proxy,
                allow_redirects=False,
            ) as response:
                raw = await response.read()
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            raise Unreachable(self.connection.server, e) from e
        return decode(response.status, response.reason or "", raw)

    async def create(self, manifest: Obj) -> Obj:
        return await self.request("POST", resource_path(manifest["kind"], manifest["metadata"]["namespace"]), manifest)

    async def get(self, kind: str, namespace: str, name: str) -> Obj:
        return await self.request("GET", resource_path(kind, namespace, name))

    async def merge_patch(
        self, kind: str, namespace: str, name: str, patch: Obj, subresource: str | None = None
    ) -> Obj:
        path = resource_path(kind, namespace, name, subresource)
        return await self.request("PATCH", path, patch, content_type=MERGE_PATCH)

    async def delete(self, kind: str, namespace: str, name: str, propagation: str = "Background") -> None:
        """Delete if present; deleting what is already gone is success."""
        options = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            await self.request("DELETE", resource_path(kind, namespace, name), options)
        except ApiError as e:
            if e.status != 404:
                raise
