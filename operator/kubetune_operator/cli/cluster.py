"""What the CLI asks of the cluster, through kubetune's API client (kube.py: credentials, paths, errors).

Objects come back as plain dicts, exactly as the API server sent them. Failures propagate as kube.ApiError,
kube.Unreachable and kube.ConfigError; `main` turns them into one-line errors (errors.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from kubetune_operator.api import KIND
from kubetune_operator.cli.errors import CliError
from kubetune_operator.kube import ApiError, Connection, Kube, Obj, resource_path
from kubetune_operator.names import LABEL_ATTEMPT, LABEL_JOB, LABEL_RUN

# The server ends a watch after this long; the CLI then resumes it from the last resourceVersion.
WATCH_SECONDS = 300


class Cluster:
    def __init__(self, kubeconfig: str | None, context: str | None) -> None:
        self.kube = Kube(Connection.load(kubeconfig, context))
        self.server = self.kube.server
        self.default_namespace = self.kube.connection.namespace

    # ------------------------------------------------------------------------------------------
    # FineTuneJobs

    def get_job(self, namespace: str, name: str) -> Obj:
        return self.kube.get(KIND, namespace, name)

    def list_jobs(self, namespace: str | None) -> list[Obj]:
        """The jobs of one namespace, or of every namespace when None."""
        items = self.kube.list(KIND, namespace)
        return sorted(items, key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]))

    def create_job(self, namespace: str, body: Obj, *, server_dry_run: bool) -> Obj:
        query = {"dryRun": "All"} if server_dry_run else None
        return self.kube.request("POST", resource_path(KIND, namespace), body, query=query)

    def patch_job(self, namespace: str, name: str, patch: Obj) -> Obj:
        return self.kube.merge_patch(KIND, namespace, name, patch)

    def watch_job(self, namespace: str, name: str) -> Iterator[Obj]:
        """The job now, then each new version of it, from a watch (no polling). Ends when the job is deleted."""
        job = self.get_job(namespace, name)
        yield job
        version = job["metadata"]["resourceVersion"]
        while True:
            query = {
                "fieldSelector": f"metadata.name={name}",
                "resourceVersion": version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(WATCH_SECONDS),
            }
            for event in self.kube.watch(resource_path(KIND, namespace), query):
                obj = event["object"]
                if event["type"] == "ERROR":
                    if obj.get("code") != 410:
                        raise ApiError(int(obj.get("code") or 500), str(obj.get("reason")), str(obj.get("message")))
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
        return self.kube.list("Event", meta["namespace"], fieldSelector=selector)

    # ------------------------------------------------------------------------------------------
    # worker pods

    def attempt_pods(self, namespace: str, job: str, run: int, attempt: int) -> list[Obj]:
        selector = f"{LABEL_JOB}={job},{LABEL_RUN}={run},{LABEL_ATTEMPT}={attempt}"
        return self.kube.list("Pod", namespace, labelSelector=selector)

    def wait_for_start(self, namespace: str, pod: Mapping[str, Any]) -> None:
        """Return once the pod's containers have started (or it has finished): its log can then be read."""
        name, version = pod["metadata"]["name"], pod["metadata"]["resourceVersion"]
        while True:  # the server ends a watch after a while; resume it from where it ended
            query = {"fieldSelector": f"metadata.name={name}", "resourceVersion": version}
            for event in self.kube.watch(resource_path("Pod", namespace), query):
                if event["type"] == "DELETED":
                    raise CliError(f"worker {name} was deleted before it started")
                if event["type"] == "ERROR":
                    raise CliError(f"lost track of worker {name} while it was starting: run the command again")
                version = event["object"]["metadata"]["resourceVersion"]
                if event["object"].get("status", {}).get("phase") != "Pending":
                    return

    def pod_log(self, namespace: str, pod: str, container: str, *, follow: bool) -> Iterator[bytes]:
        """The container's log through the API server's pod log endpoint, in chunks as they arrive."""
        query = {"container": container, **({"follow": "true"} if follow else {})}
        return self.kube.stream(resource_path("Pod", namespace, pod, "log"), query)
