"""kubetune's Kubernetes API client: one place for credentials, API paths and errors, raw JSON in and out.

- `Connection` finds the cluster and the credentials as kubectl does: --kubeconfig, else $KUBECONFIG (files
  joined with ':'), else ~/.kube/config, else the pod's service account. The official client's loader reads the
  kubeconfig (contexts, certificates, tokens, exec and auth-provider plugins and their refresh); the transports
  below only take the server, TLS material and the current bearer token from it.
- `resource_path` builds the paths of the kinds kubetune reads and writes.
- `ApiError` is every answer outside 2xx (with the API server's metav1.Status when it sent one); `Unreachable`
  is no answer at all (refused, unknown host, timeout, TLS).
- `Kube` is the synchronous client (urllib3), for the CLI; `kube_async.AsyncKube` the asyncio one (aiohttp), for
  the operator. Both count their requests by verb and resource. The CLI never imports the asyncio one.

No model classes: the operator works with plain manifests from the renderers, the CLI with plain dicts.
"""

from __future__ import annotations

import json
import os
import ssl
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import urllib3
from kubernetes import config as kubeconfig_loader
from kubernetes.client import Configuration
from kubernetes.config.config_exception import ConfigException

from kubetune_operator.api import GROUP, KIND, PLURAL, VERSION

Obj = dict[str, Any]

# kind -> (API path prefix, plural)
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Event": ("/api/v1", "events"),
    "Pod": ("/api/v1", "pods"),
    "Job": ("/apis/batch/v1", "jobs"),
    KIND: (f"/apis/{GROUP}/{VERSION}", PLURAL),
}
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = "kubetune"
# Seconds to connect, and to wait for an answer; a watch or a followed log waits as long as it lasts.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class ApiError(Exception):
    """The API server answered outside 2xx. `body` is what it sent (a metav1.Status as JSON, or plain text)."""

    def __init__(self, status: int, reason: str, message: str, body: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body


class Unreachable(Exception):
    """No answer from the API server at `server`; `cause` says why (refused, unknown host, timeout, TLS)."""

    def __init__(self, server: str, cause: BaseException) -> None:
        super().__init__(f"cannot reach {server}: {cause}")
        self.server = server
        self.cause = cause


class ConfigError(Exception):
    """No usable kubeconfig or service account; the message says which and why."""


def resource_path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    """The path of a kind's collection (namespace None: across namespaces), of one object, or of its subresource."""
    prefix, plural = RESOURCES[kind]
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace is not None else f"{prefix}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def resource_of(path: str) -> str:
    """'configmaps' for .../namespaces/x/configmaps/y; 'finetunejobs/status' for a status subresource; the path
    itself for discovery (/apis/...)."""
    if "/namespaces/" not in path:
        return path.lstrip("/")
    parts = path.split("/namespaces/", 1)[1].split("/")[1:]
    return "/".join(parts[:1] + parts[2:3])


def api_error(status: int, reason: str, raw: bytes) -> ApiError:
    """The error for an answer outside 2xx: the metav1.Status's reason and message when the body is one."""
    text = raw.decode(errors="replace")
    try:
        doc = json.loads(text) if text else {}
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    return ApiError(status, str(doc.get("reason") or reason), str(doc.get("message") or text[:500]), text)


def decode(status: int, reason: str, raw: bytes) -> Obj:
    if not 200 <= status < 300:
        raise api_error(status, reason, raw)
    data: Obj = json.loads(raw) if raw else {}
    return data


@dataclass(frozen=True)
class Connection:
    """Where the API server is and how to authenticate to it (see the module docstring for the search order)."""

    server: str
    # The context's namespace (the pod's own for a service account): where commands work without -n.
    namespace: str
    configuration: Configuration

    @classmethod
    def load(cls, kubeconfig: str | None = None, context: str | None = None) -> Connection:
        path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        if kubeconfig or context or any(Path(p).exists() for p in path.split(os.pathsep) if p):
            return cls._from_kubeconfig(path, context)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = Configuration()
            try:
                kubeconfig_loader.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            except ConfigException as e:
                raise ConfigError(f"cannot use the pod's service account: {e}") from e
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.exists() else ""
            return cls(configuration.host, namespace or "default", configuration)
        raise ConfigError(f"cannot load a kubeconfig from {path} (no such file): set KUBECONFIG or pass --kubeconfig")

    @classmethod
    def _from_kubeconfig(cls, path: str, context: str | None) -> Connection:
        try:
            contexts, current = kubeconfig_loader.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
        except (ConfigException, OSError) as e:
            raise ConfigError(f"cannot load a kubeconfig from {path} ({e}): set KUBECONFIG or pass --kubeconfig") from e
        chosen = current
        if context is not None:
            chosen = next((c for c in contexts if c["name"] == context), None)
            if chosen is None:
                names = ", ".join(c["name"] for c in contexts) or "none"
                raise ConfigError(f'context "{context}" is not in {path} (it has: {names})')
        configuration = Configuration()
        try:
            kubeconfig_loader.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path, context=context, client_configuration=configuration, persist_config=False
            )
        except ConfigException as e:
            raise ConfigError(f"cannot use context {chosen['name']!r} of {path}: {e}") from e
        namespace = (chosen.get("context") or {}).get("namespace") or "default"
        return cls(configuration.host, namespace, configuration)

    def ssl_context(self) -> ssl.SSLContext:
        c = self.configuration
        context = ssl.create_default_context(cafile=c.ssl_ca_cert)
        if not c.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if c.cert_file:
            context.load_cert_chain(c.cert_file, c.key_file)
        return context

    def token(self) -> str | None:
        """The bearer token, refreshed by the loader when it has expired (exec plugins, service account files)."""
        c = self.configuration
        header: str | None = c.get_api_key_with_prefix("BearerToken") or c.get_api_key_with_prefix("authorization")
        if not header:
            return None
        return header.split(" ", 1)[1] if header.lower().startswith("bearer ") else header

    def headers(self, content_type: str = JSON) -> dict[str, str]:
        # Any type: a pod's log is text.
        headers = {"Accept": f"{JSON}, */*", "Content-Type": content_type, "User-Agent": USER_AGENT}
        token = self.token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def url(self, path: str, query: Mapping[str, str] | None = None) -> str:
        return self.server.rstrip("/") + path + (f"?{urlencode(query)}" if query else "")

    @property
    def proxy(self) -> str | None:
        proxy: str | None = self.configuration.proxy
        return proxy


class Kube:
    """The synchronous client."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.requests: Counter[str] = Counter()
        context = connection.ssl_context()
        self._pool: urllib3.PoolManager = (
            urllib3.ProxyManager(connection.proxy, ssl_context=context, retries=False)
            if connection.proxy
            else urllib3.PoolManager(ssl_context=context, retries=False)
        )

    @property
    def server(self) -> str:
        return self.connection.server

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = JSON,
    ) -> Obj:
        response = self._send(method, path, body, query, content_type, stream=False)
        return decode(response.status, response.reason or "", response.data)

    def get(self, kind: str, namespace: str, name: str) -> Obj:
        return self.request("GET", resource_path(kind, namespace, name))

    def list(self, kind: str, namespace: str | None, **query: str) -> list[Obj]:
        items: list[Obj] = self.request("GET", resource_path(kind, namespace), query=query)["items"]
        return items

    def create(self, manifest: Obj, **query: str) -> Obj:
        return self.request(
            "POST", resource_path(manifest["kind"], manifest["metadata"]["namespace"]), manifest, query=query
        )

    def merge_patch(self, kind: str, namespace: str, name: str, patch: Obj, subresource: str | None = None) -> Obj:
        return self.request("PATCH", resource_path(kind, namespace, name, subresource), patch, content_type=MERGE_PATCH)

    def stream(self, path: str, query: Mapping[str, str] | None = None) -> Iterator[bytes]:
        """The body of a GET as it arrives (a followed log, a watch); no read timeout."""
        response = self._send("GET", path, None, query, JSON, stream=True)
        try:
            if not 200 <= response.status < 300:
                raise api_error(response.status, response.reason or "", response.read())
            yield from response.stream(65536, decode_content=True)
        finally:
            response.release_conn()

    def watch(self, path: str, query: Mapping[str, str]) -> Iterator[Obj]:
        """The events of a watch of `path` (a collection), one JSON document per line, as they arrive."""
        pending = b""
        for chunk in self.stream(path, {**query, "watch": "true"}):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    event: Obj = json.loads(line)
                    yield event

    def _send(
        self, method: str, path: str, body: Any, query: Mapping[str, str] | None, content_type: str, *, stream: bool
    ) -> urllib3.BaseHTTPResponse:
        self.requests[f"{method} {resource_of(path)}"] += 1
        timeout = urllib3.Timeout(connect=CONNECT_TIMEOUT, read=None if stream else READ_TIMEOUT)
        try:
            return self._pool.request(
                method,
                self.connection.url(path, query),
                body=json.dumps(body).encode() if body is not None else None,
                headers=self.connection.headers(content_type),
                timeout=timeout,
                preload_content=not stream,
                redirect=False,
            )
        except urllib3.exceptions.HTTPError as e:
            raise Unreachable(self.server, _cause(e)) from e


def _cause(e: BaseException) -> BaseException:
    """What urllib3 wraps: the refused connection, the TLS failure, the timeout."""
    reason = getattr(e, "reason", None)
    return reason if isinstance(reason, BaseException) else e
