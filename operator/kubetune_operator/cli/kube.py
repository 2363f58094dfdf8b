"""The CLI's only door to the cluster: kubeconfig loading as kubectl does it, and the few API calls it makes.

Objects come back as plain dicts, exactly as the API server sent them. API and network failures propagate as
the client library raises them; `main` turns them into one-line errors (errors.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from functools import cached_property
from typing import Any

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from kubetune_operator.api import GROUP, KIND, PLURAL, VERSION
from kubetune_operator.cli.errors import CliError
from kubetune_operator.names import LABEL_ATTEMPT, LABEL_JOB, LABEL_RUN

Obj = dict[str, Any]

# (connect, read) seconds for ordinary calls; watches and followed logs have no read timeout.
TIMEOUT = (10, 60)
# The server ends a watch after this long; the CLI then resumes it from the last resourceVersion.
WATCH_SECONDS = 300
MERGE_PATCH = "application/merge-patch+json"


def kubeconfig_path(flag: str | None) -> str:
    """--kubeconfig, else $KUBECONFIG (one or more files joined with ':'), else ~/.kube/config."""
    return flag or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")


class Kube:
    def __init__(self, kubeconfig: str | None, context: str | None) -> None:
        path = kubeconfig_path(kubeconfig)
        try:
            contexts, current = config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
        except ConfigException as e:
            raise CliError(f"cannot load a kubeconfig from {path} ({e}): set KUBECONFIG or pass --kubeconfig") from e
        if context is not None:
            chosen = next((c for c in contexts if c["name"] == context), None)
            if chosen is None:
                names = ", ".join(c["name"] for c in contexts) or "none"
                raise CliError(f'context "{context}" is not in {path} (it has: {names})')
        else:
            chosen = current
        try:
            self.api = config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=path, context=context, persist_config=False
            )
        except ConfigException as e:
            raise CliError(f"cannot use context {chosen['name']!r} of {path}: {e}") from e
        self.server: str = self.api.configuration.host
        self.default_namespace: str = chosen.get("context", {}).get("namespace") or "default"
        self.custom = client.CustomObjectsApi(self.api)

    @cached_property
    def core(self) -> client.CoreV1Api:
        # Importing the core API takes ~1 s (its models); only describe and logs need it.
        return client.CoreV1Api(self.api)

    # ------------------------------------------------------------------------------------------
    # FineTuneJobs

    def get_job(self, namespace: str, name: str) -> Obj:
        return _dict(
            self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, _request_timeout=TIMEOUT)
        )

    def list_jobs(self, namespace: str | None) -> list[Obj]:
        """The jobs of one namespace, or of every namespace when None."""
        if namespace is None:
            found = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, _request_timeout=TIMEOUT)
        else:
            found = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, _request_timeout=TIMEOUT
            )
        items: list[Obj] = _dict(found)["items"]
        return sorted(items, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))

    def create_job(self, namespace: str, body: Obj, *, server_dry_run: bool) -> Obj:
        created = self.custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            body,
            dry_run="All" if server_dry_run else None,
            _request_timeout=TIMEOUT,
        )
        return _dict(created)

    def patch_job(self, namespace: str, name: str, patch: Obj) -> Obj:
        patched = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, patch, _content_type=MERGE_PATCH, _request_timeout=TIMEOUT
        )
        return _dict(patched)

    def watch_job(self, namespace: str, name: str) -> Iterator[Obj]:
        """The job now, then each new version of it, from a watch (no polling). Ends when the job is deleted."""
        job = self.get_job(namespace, name)
        yield job
        version = job["metadata"]["resourceVersion"]
        while True:
            response = self.custom.list_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                field_selector=f"metadata.name={name}",
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _preload_content=False,
                _request_timeout=(TIMEOUT[0], WATCH_SECONDS + 30),
            )
            for event in _events(response):
                obj = event["object"]
                if event["type"] == "ERROR":
                    if obj.get("code") != 410:
                        raise client.ApiException(
                            status=obj.get("code"), reason=obj.get("message"), body=json.dumps(obj)
                        )
                    # Our resourceVersion is too old to resume from: start again from the current object.
                    job = self.get_job(namespace, name)
                    version = job["metadata"]["resourceVersion"]
                    yield job
                    break
                version = obj["metadata"]["resourceVersion"]
                if event["type"] == "DELETED":
                    raise CliError(f'FineTuneJob "{name}" was deleted while watching it')
                if event["type"] in ("ADDED", "MODIFIED"):
                    yield obj

    def job_events(self, job: Obj) -> list[Obj]:
        """Events about this job (this incarnation of the name: matched by uid), oldest first."""
        meta = job["metadata"]
        selector = f"involvedObject.kind={KIND},involvedObject.name={meta['name']},involvedObject.uid={meta['uid']}"
        events = self.core.list_namespaced_event(
            meta["namespace"], field_selector=selector, _request_timeout=TIMEOUT, _preload_content=False
        )
        items: list[Obj] = _json(events)["items"]
        return items

    # ------------------------------------------------------------------------------------------
    # worker pods

    def attempt_pods(self, namespace: str, job: str, run: int, attempt: int) -> list[Obj]:
        selector = f"{LABEL_JOB}={job},{LABEL_RUN}={run},{LABEL_ATTEMPT}={attempt}"
        pods = self.core.list_namespaced_pod(
            namespace, label_selector=selector, _request_timeout=TIMEOUT, _preload_content=False
        )
        items: list[Obj] = _json(pods)["items"]
        return items

    def wait_for_start(self, namespace: str, pod: Mapping[str, Any]) -> None:
        """Return once the pod's containers have started (or it has finished): its log can then be read."""
        name, version = pod["metadata"]["name"], pod["metadata"]["resourceVersion"]
        while True:  # the server ends a watch after a while; resume it from where it ended
            response = self.core.list_namespaced_pod(
                namespace,
                field_selector=f"metadata.name={name}",
                watch=True,
                resource_version=version,
                _preload_content=False,
                _request_timeout=None,
            )
            for event in _events(response):
                if event["type"] == "DELETED":
                    raise CliError(f"worker {name} was deleted before it started")
                if event["type"] == "ERROR":
                    raise CliError(f"lost track of worker {name} while it was starting: run the command again")
                version = event["object"]["metadata"]["resourceVersion"]
                if event["object"].get("status", {}).get("phase") != "Pending":
                    return

    def pod_log(self, namespace: str, pod: str, container: str, *, follow: bool) -> Iterator[bytes]:
        """The container's log through the API server's pod log endpoint, in chunks as they arrive."""
        response: Any = self.core.read_namespaced_pod_log(
            pod,
            namespace,
            container=container,
            follow=follow,
            _preload_content=False,
            _request_timeout=None if follow else TIMEOUT,
        )
        try:
            yield from response.stream(4096, decode_content=True)
        finally:
            response.release_conn()


def _dict(value: object) -> Obj:
    """A custom object as the client returns it (typed `object`; a dict parsed from JSON)."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object from the API server, got {type(value).__name__}")
    return value


def _json(response: Any) -> Obj:
    # Core objects are read raw (as dicts), like custom objects, instead of as the client's model classes.
    doc: Obj = json.loads(response.data)
    return doc


def _events(response: Any) -> Iterator[Obj]:
    """The events of a watch response, one JSON document per line, as they arrive."""
    pending = b""
    try:
        for chunk in response.stream(65536, decode_content=True):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    event: Obj = json.loads(line)
                    yield event
    finally:
        response.release_conn()
