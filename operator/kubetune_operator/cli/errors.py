"""Every failure the CLI reports, as one line that says what went wrong and what to do.

The explain_* functions are pure: they turn what the API server or the network said into that line, so each
case is unit-tested with the exact bodies a real kube-apiserver returns.
"""

from __future__ import annotations

import json
import re
import ssl
from typing import Any

from kubetune_operator.api import CRD_NAME, PLURAL, VERSION


class CliError(Exception):
    """A failure to report as `error: <message>` with exit status 1, never as a traceback."""


INSTALL_HINT = "install the kubetune CRDs first (helm install kubetune charts/kubetune, or kubectl apply -f crds/)"
FORBIDDEN_RE = re.compile(r'cannot (?P<verb>\S+) resource "(?P<resource>[^"]+)"(?: in API group "(?P<group>[^"]*)")?')


def _status(body: str | None) -> dict[str, Any] | None:
    """The metav1.Status in an error body, or None when the body is something else (e.g. `404 page not found`)."""
    try:
        doc = json.loads(body or "")
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and doc.get("kind") == "Status" else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def explain_api_error(status: int | None, reason: str | None, body: str | None, *, namespace: str | None) -> str:
    """The one-line explanation of an API error; `namespace` is the one the command worked in (None: all)."""
    doc = _status(body) or {}
    message = _one_line(str(doc.get("message") or reason or ""))
    details = doc.get("details") or {}
    where = f'namespace "{namespace}"' if namespace else "any namespace"
    if status == 404 and not doc:
        # The server answers a path it does not serve with a plain-text 404, not a Status: the CRD is missing.
        return f"the FineTuneJob API ({CRD_NAME}/{VERSION}) is not installed in this cluster: {INSTALL_HINT}"
    if status == 404 and details.get("kind") == PLURAL:
        return (
            f'FineTuneJob "{details.get("name")}" not found in {where}: '
            f"`kubectl finetune list -A` shows the jobs you can see"
        )
    if status == 403:
        found = FORBIDDEN_RE.search(message)
        if found:
            group = found["group"]
            resource = f"{found['resource']}.{group}" if group else found["resource"]
            scope = f" -n {namespace}" if namespace else " -A"
            check = f"kubectl auth can-i {found['verb']} {resource}{scope}"
            return f"no permission: {message}. Ask a cluster admin for a Role that allows it (check with: {check})"
        return f"no permission: {message}. Ask a cluster admin for access"
    if status == 401:
        return (
            "the API server rejected your credentials (401 Unauthorized): log in again, or choose other credentials "
            "with --context or --kubeconfig"
        )
    if status == 409 and doc.get("reason") == "AlreadyExists":
        return (
            f'FineTuneJob "{details.get("name")}" already exists in {where}: edit it, or start a new run of it with '
            f"`kubectl finetune rerun {details.get('name')}`"
        )
    if status in (400, 422):
        return message or f"the API server rejected the request ({status})"
    return f"the API server answered {status}: {message or 'no details'}"


def explain_connection_error(server: str, cause: BaseException | None) -> str:
    """No answer at all from the API server (connection refused, unknown host, timeout, TLS failure)."""
    text = str(cause or "").lower()
    if isinstance(cause, ssl.SSLError) or "certificate" in text:
        return (
            f"cannot talk to the API server at {server}: {_one_line(str(cause))}. Check the cluster's CA and "
            "--context / --kubeconfig"
        )
    if isinstance(cause, ConnectionRefusedError) or "refused" in text:
        why = "connection refused"
    elif "name or service not known" in text or "resolution" in text or "nodename nor servname" in text:
        why = "unknown host"
    elif "timed out" in text or "timeout" in text:
        why = "timed out"
    else:
        why = _one_line(str(cause)) if cause else "no answer"
    return (
        f"cannot reach the Kubernetes API server at {server} ({why}): is the cluster running? Check KUBECONFIG, "
        "--kubeconfig and --context"
    )
