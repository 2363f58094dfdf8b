"""A small asyncio client for the few API calls the agent makes, on aiohttp, authenticated from a kubeconfig
(client certificate or bearer token, as the official client's loader reads it). Objects are plain dicts."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
from kubernetes import client, config

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Kube:
    def __init__(self, kubeconfig: Path) -> None:
        cfg = client.Configuration()
        config.load_kube_config(str(kubeconfig), client_configuration=cfg)
        self.server = cfg.host.rstrip("/")
        if not cfg.ssl_ca_cert:
            raise ValueError(f"{kubeconfig}: the local node agent needs the cluster's certificate-authority")
        self.ca_file = Path(cfg.ssl_ca_cert)
        self._ssl = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
        if cfg.cert_file:
            self._ssl.load_cert_chain(cfg.cert_file, cfg.key_file)
        self._headers = {"Accept": "application/json"}
        token = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
        if token:
            self._headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
        self._session: aiohttp.ClientSession | None = None

    @property
    def server_host_port(self) -> tuple[str, int]:
        url = urlparse(self.server)
        return url.hostname or "127.0.0.1", url.port or 443

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl), headers=self._headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        timeout = aiohttp.ClientTimeout(total=30)
        async with self.session.request(
            method, self.server + path, data=data, params=params, headers=headers, timeout=timeout
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise ApiError(resp.status, text)
            return json.loads(text) if text else {}

    async def get(self, path: str, **params: str) -> dict:
        return await self.request("GET", path, params=params or None)

    async def get_or_none(self, path: str) -> dict | None:
        try:
            return await self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def watch(self, path: str, **params: str) -> AsyncIterator[dict]:
        """Watch events ({type, object}) until the server closes the stream. Lines can be long (a pod with
        managed fields), so the body is split on newlines by hand rather than with readline's size limit."""
        query = {**params, "watch": "1", "allowWatchBookmarks": "true"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.session.get(self.server + path, params=query, timeout=timeout) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, await resp.text())
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)


async def retrying(call: Any, *, attempts: int = 5, delay: float = 0.5) -> Any:
    """Await call() again after a connection error (not after an API error, which is an answer)."""
    for attempt in range(attempts):
        try:
            return await call()
        except (aiohttp.ClientError, TimeoutError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(delay * (attempt + 1))
    raise AssertionError("unreachable")
