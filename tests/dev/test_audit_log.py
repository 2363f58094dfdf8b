"""Reading the API server's audit log back (hack/kubetune_dev/cluster.py): one request per audit ID, with how long
the server took to answer it; what the operator benchmark counts and times."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kubetune_dev.cluster import audit_requests


def event(audit_id: str, stage: str, verb: str, received: str, done: str, **ref: str) -> str:
    return json.dumps(
        {
            "auditID": audit_id,
            "stage": stage,
            "verb": verb,
            "user": {"username": "kubetune-operator"},
            "objectRef": ref,
            "requestURI": "/api/v1/namespaces/ns/pods?watch=true",
            "responseStatus": {"code": 201 if verb == "create" else 200},
            "requestReceivedTimestamp": received,
            "stageTimestamp": done,
        }
    )


def test_each_request_once_with_the_servers_time(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    lines = [
        event(
            "a",
            "ResponseComplete",
            "create",
            "2026-12-06T22:00:00.100000Z",
            "2026-12-06T22:00:00.312500Z",
            resource="jobs",
        ),
        # A watch is logged when its response starts and again when it ends: counted once, untimed.
        event(
            "b",
            "ResponseStarted",
            "watch",
            "2026-12-06T22:00:01.000000Z",
            "2026-12-06T22:00:01.002000Z",
            resource="pods",
        ),
        event(
            "c",
            "ResponseComplete",
            "patch",
            "2026-12-06T22:00:02.000000Z",
            "2026-12-06T22:00:02.040000Z",
            resource="finetunejobs",
            subresource="status",
        ),
        event(
            "b",
            "ResponseComplete",
            "watch",
            "2026-12-06T22:00:01.000000Z",
            "2026-12-06T22:05:01.000000Z",
            resource="pods",
        ),
    ]
    log.write_text("\n".join(lines) + "\n")

    requests = audit_requests(log)

    assert [(r.verb, r.resource, r.code) for r in requests] == [
        ("create", "jobs", 201),
        ("watch", "pods", 200),
        ("patch", "finetunejobs/status", 200),
    ]
    assert math.isclose(requests[0].seconds, 0.2125, abs_tol=1e-6)
    assert math.isnan(requests[1].seconds)
    assert math.isclose(requests[2].seconds, 0.040, abs_tol=1e-6)
    assert math.isclose(requests[2].received - requests[0].received, 1.9, abs_tol=1e-6)
