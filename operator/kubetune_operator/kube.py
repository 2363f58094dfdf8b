"""A small async Kubernetes API client: raw JSON in and out, for the few kinds the operator writes.

Built on the official client's asyncio ApiClient (kubeconfig, in-cluster config, exec plugins, token
refresh), without its model classes: the operator works with plain manifests from the renderers. Every
request is counted by verb and resource, so the cost per FineTuneJob can be measured.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from kubernetes.aio import client as aio_client
from kubernetes.aio import config as aio_config

from kubetune_operator.api import GROUP, KIND, PLURAL, VERSION

# kind -> (API path prefix, plural)
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Event": ("/api/v1", "events"),
    "Job": ("/apis/batch/v1", "jobs"),
    KIND: (f"/apis/{GROUP}/{VERSION}", PLURAL),
}
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = 30.0


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def resource_path(kind: str, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def _resource_of(path: str) -> str:
    """'configmaps' for .../namespaces/x/configmaps/y; 'finetunejobs/status' for a status subresource."""
    parts = path.split("/namespaces/", 1)[-1].split("/")[1:]
    return "/".join(parts[:1] + parts[2:3])


def _status_body(raw: bytes) -> dict[str, Any]:
    """An error's metav1.Status, or {} for a body that is none (e.g. "404 page not found" for an unknown API group)."""
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class Kube:
    def __init__(self, api_client: aio_client.ApiClient) -> None:
        self._client = api_client
        self.requests: Counter[str] = Counter()

    @classmethod
    async def connect(cls) -> Kube:
        """Use $KUBECONFIG or ~/.kube/config when there is one, else the pod's service account."""
        configuration = aio_client.Configuration()
        kubeconfig = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        if Path(kubeconfig.split(os.pathsep)[0]).exists():
            # Named explicitly: the client reads $KUBECONFIG once, when it is imported.
            await aio_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=configuration
            )
        else:
            aio_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        api_client = aio_client.ApiClient(configuration)
        api_client.user_agent = "kubetune-operator"
        return cls(api_client)

    async def close(self) -> None:
        await self._client.close()  # type: ignore[no-untyped-call]

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        self.requests[f"{method} {_resource_of(path)}"] += 1
        method, url, headers, body, _ = await self._client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = await self._client.call_api(
            method, url, header_params=headers, body=body, _request_timeout=REQUEST_TIMEOUT
        )
        raw = await response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status < 300:
            status = _status_body(raw)
            reason = str(status.get("reason") or response.reason)
            raise ApiError(response.status, reason, str(status.get("message") or raw[:500]))
        data: dict[str, Any] = json.loads(raw) if raw else {}
        return data

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        return await self.request("POST", resource_path(manifest["kind"], meta["namespace"]), manifest)

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return await self.request("GET", resource_path(kind, namespace, name))

    async def merge_patch(
        self, kind: str, namespace: str, name: str, patch: dict[str, Any], subresource: str | None = None
    ) -> dict[str, Any]:
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
