"""The job's folders on its writable claims are made by an init container as the workers' user, not by the kubelet.

A real kubelet makes a missing subPath folder itself, as root with mode 0755; on a volume that ignores fsGroup
(hostPath, many NFS and other ReadWriteMany volumes) the workers (uid 1000) then died with `PermissionError:
[Errno 13] Permission denied: '/kubetune/output/runs'`. The init container runs with the workers' restricted
security context; when the claim's root is not writable by them it fails with a message that says what the
volume needs, and the operator reports that message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from ftj_builders import ftj, owner, spec
from kubetune_operator.observed import summarize_pod
from kubetune_operator.render import CLAIM_DIRS_CONTAINER, CLAIMS_DIR, render_pod_template
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.storage import JOB_DIR, OUTPUT_DIR

SETTINGS = OperatorSettings()


def pod(**overrides: object) -> dict:
    job = ftj(spec(output={"claimName": "ft-models"}, **overrides))
    return render_pod_template(owner(job), job.spec, 1, 1, SETTINGS)["spec"]


def test_the_init_container_makes_exactly_the_writable_subpath_folders_as_the_worker() -> None:
    p = pod()
    [worker], [init] = p["containers"], p["initContainers"]
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in p["volumes"] if "persistentVolumeClaim" in v}
    writable = {
        (volumes[m["name"]], m["subPath"]) for m in worker["volumeMounts"] if m["name"] in volumes and not m["readOnly"]
    }
    assert {m["mountPath"] for m in worker["volumeMounts"] if m["name"] in volumes} >= {JOB_DIR, OUTPUT_DIR}
    assert writable == {("ft-checkpoints", "ml/sft"), ("ft-models", "ml/sft")}
    script = init["command"][2]
    for claim, sub_path in writable:
        volume = next(name for name, c in volumes.items() if c == claim)
        assert f"mkdir -p -- {CLAIMS_DIR}/{volume}/{sub_path} " in script
    # Only the writable claims are mounted, whole; the read-only sources (the dataset claim) are not.
    assert {volumes[m["name"]] for m in init["volumeMounts"]} == {"ft-checkpoints", "ft-models"}
    assert all("subPath" not in m and not m.get("readOnly") for m in init["volumeMounts"])
    # The same image and the same restricted security context as the worker; no GPU held for a mkdir.
    assert init["name"] == CLAIM_DIRS_CONTAINER
    assert (init["image"], init["imagePullPolicy"]) == (worker["image"], worker["imagePullPolicy"])
    assert init["securityContext"] == worker["securityContext"]
    assert init["securityContext"]["runAsNonRoot"] and init["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "nvidia.com/gpu" not in str(init["resources"]) and "nvidia.com/gpu" in str(worker["resources"])


def run_as_worker(script: str, claims: Path) -> subprocess.CompletedProcess[str]:
    """The init container's script, run by uid/gid 1000 against `claims` instead of the mount point (the tests run
    as root, as the real node tier needs)."""
    local = script.replace(CLAIMS_DIR, str(claims))
    command = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "sh", "-c", local]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


@pytest.fixture
def claims() -> Iterator[Path]:
    """Where the claims' roots go: a directory uid 1000 may pass through (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="kubetune-claims-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_on_a_claim_the_workers_may_write_the_folders_become_theirs(claims: Path) -> None:
    tmp_path = claims
    p = pod()
    for volume in ("claim-0", "claim-1", "claim-2"):
        (tmp_path / volume).mkdir()
        os.chown(tmp_path / volume, 1000, 1000)  # e.g. an NFS export prepared for the workers
    result = run_as_worker(p["initContainers"][0]["command"][2], tmp_path)
    assert result.returncode == 0, result.stderr
    made = [tmp_path / v / "ml" / "sft" for v in ("claim-0", "claim-1", "claim-2") if (tmp_path / v / "ml").exists()]
    assert len(made) == 2
    assert all(d.stat().st_uid == 1000 for d in made)


def test_on_a_claim_they_may_not_write_the_message_names_the_claim_and_what_it_needs(claims: Path) -> None:
    tmp_path = claims
    p = pod()
    for volume in ("claim-0", "claim-1", "claim-2"):
        (tmp_path / volume).mkdir(mode=0o755)  # root's, as a hostPath directory made by an admin
    result = run_as_worker(p["initContainers"][0]["command"][2], tmp_path)
    assert result.returncode == 1
    assert "claim ft-checkpoints: the workers (uid 1000) cannot create ml/sft on it: mkdir:" in result.stderr
    assert f"cannot create directory '{claims}/claim-0/ml': Permission denied" in result.stderr.replace(
        "‘", "'"
    ).replace("’", "'")
    assert "Permission denied" in result.stderr and "needs its root writable by uid or gid 1000" in result.stderr


def test_a_failed_init_container_is_the_pods_termination() -> None:
    message = "claim ft-models: the workers (uid 1000) cannot create ml/sft on it: mkdir: Permission denied."
    body = {
        "metadata": {"name": "sft-r1-a1-0-x", "labels": {}},
        "status": {
            "phase": "Failed",
            "initContainerStatuses": [
                {
                    "name": CLAIM_DIRS_CONTAINER,
                    "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}},
                }
            ],
            "containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": "PodInitializing"}}}],
        },
    }
    termination = summarize_pod(body).termination
    assert termination is not None and termination.exit_code == 1 and termination.message == message
