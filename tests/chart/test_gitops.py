"""GitOps health: the Argo CD Lua check and the Flux CEL expressions in docs/gitops/, run against FineTuneJobs the
operator produced on the local control plane.

testdata/health/*.json are those objects (managedFields dropped), written by the cluster-mode chart e2e test with
KUBETUNE_CAPTURE_HEALTH_FIXTURES=tests/chart/testdata/health; that test also runs the Lua against the live objects.
Variants the operator only shows for an instant (no status yet, suspending, deleting) are derived from them here.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml
from chart_files import HEALTH_KEY
from chart_support import GITOPS, HEALTH_LUA, TESTDATA, argocd_health, flux_health
from kubetune_operator.api import API_VERSION, KIND

FIXTURES = TESTDATA / "health"


def fixture(name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return obj


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == type_)


def not_yet_seen() -> dict[str, Any]:
    """As created: the operator has not written a status yet."""
    obj = fixture("succeeded")
    del obj["status"]
    return obj


def suspending() -> dict[str, Any]:
    """Suspended while the workers still checkpoint and stop (Reconciling stays True until they are gone)."""
    obj = fixture("suspended")
    reconciling = condition(obj, "Reconciling")
    reconciling.update(status="True", reason="Suspending", message="waiting for 2 workers to checkpoint and stop")
    return obj


def deleting() -> dict[str, Any]:
    obj = fixture("running")
    obj["metadata"]["deletionTimestamp"] = "2026-11-27T13:30:00Z"
    return obj


def test_the_fixtures_are_what_their_names_say() -> None:
    phases = {
        "pending": "Pending",
        "running": "Running",
        "succeeded": "Succeeded",
        "failed": "Failed",
        "suspended": "Suspended",
        "generation-not-observed": "Succeeded",
    }
    for name, phase in phases.items():
        obj = fixture(name)
        assert (obj["apiVersion"], obj["kind"], obj["status"]["phase"]) == (API_VERSION, KIND, phase)
        behind = obj["status"]["observedGeneration"] < obj["metadata"]["generation"]
        assert behind == (name == "generation-not-observed")


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(fixture("pending"), "Progressing", id="pending"),
        pytest.param(fixture("running"), "Progressing", id="running"),
        pytest.param(fixture("succeeded"), "Healthy", id="succeeded"),
        pytest.param(fixture("failed"), "Degraded", id="failed"),
        pytest.param(fixture("suspended"), "Suspended", id="suspended"),
        pytest.param(fixture("generation-not-observed"), "Progressing", id="generation-not-observed"),
        pytest.param(not_yet_seen(), "Progressing", id="not-yet-seen"),
        pytest.param(suspending(), "Progressing", id="suspending"),
        pytest.param(deleting(), "Progressing", id="deleting"),
    ],
)
def test_argocd_health(obj: dict[str, Any], expected: str) -> None:
    status, message = argocd_health(obj)
    assert status == expected
    assert message


def test_argocd_messages_say_what_is_going_on() -> None:
    assert argocd_health(fixture("failed"))[1] == condition(fixture("failed"), "Failed")["message"]
    assert argocd_health(fixture("pending"))[1].startswith("0 of 2 workers running; worker 0 waits: Unschedulable")
    assert argocd_health(fixture("generation-not-observed"))[1] == "The operator has not yet acted on generation 2"
    assert argocd_health(not_yet_seen())[1] == "Waiting for the kubetune operator"
    assert argocd_health(suspending())[1] == "waiting for 2 workers to checkpoint and stop"
    assert argocd_health(deleting())[1] == "Pending deletion"


def test_the_health_check_needs_no_lua_library_argo_cd_withholds() -> None:
    """Argo CD's VM (gopher-lua, Lua 5.1) opens no string, io or debug library unless useOpenLibs is set; the
    harness withholds them too, so a call would fail the tests above. Also no Lua 5.2+ syntax."""
    code = "\n".join(line.split("--", 1)[0] for line in HEALTH_LUA.read_text().splitlines())
    assert not re.search(r"\b(string|io|debug|require|utf8|goto)\b", code)
    assert not re.search(r"//|<const>|<close>|::\w+::", code)
    assert not re.search(r"[^~=<>]=?[&|]|~[^=]|<<|>>", code.replace("~=", "  "))


def test_the_argocd_configmap_snippet_carries_the_script() -> None:
    snippet = yaml.safe_load((GITOPS / "argocd-cm.yaml").read_text())
    assert snippet["data"] == {HEALTH_KEY: HEALTH_LUA.read_text()}
    assert HEALTH_KEY == "resource.customizations.health.kubetune.io_FineTuneJob"


def kustomization_exprs() -> dict[str, str]:
    kustomization = yaml.safe_load((GITOPS / "flux-kustomization.yaml").read_text())
    [exprs] = kustomization["spec"]["healthCheckExprs"]
    assert (exprs.pop("apiVersion"), exprs.pop("kind")) == (API_VERSION, KIND)
    return dict(exprs)


def test_flux_health_check_expressions() -> None:
    names = ["pending", "running", "succeeded", "failed", "suspended", "generation-not-observed"]
    objects = [fixture(name) for name in names] + [suspending()]
    statuses = flux_health(kustomization_exprs(), objects)
    assert dict(zip([*names, "suspending"], statuses, strict=True)) == {
        "pending": "InProgress",
        "running": "Current",
        "succeeded": "Current",
        "failed": "Failed",
        "suspended": "Current",
        "generation-not-observed": "InProgress",
        "suspending": "Current",
    }


def test_flux_cannot_evaluate_them_before_the_first_status_and_polls_again() -> None:
    """Documented in docs/gitops: no status yet means no field to read (Flux reports Unknown and retries)."""
    with pytest.raises(AssertionError, match="no such attribute"):
        flux_health(kustomization_exprs(), [not_yet_seen()])


def test_kstatus_what_flux_uses_by_default() -> None:
    """Without healthCheckExprs Flux computes kstatus (sigs.k8s.io/cli-utils): docs/gitops/README.md's table."""
    names = ["pending", "running", "succeeded", "failed", "suspended", "generation-not-observed"]
    statuses = flux_health({}, [fixture(n) for n in names] + [not_yet_seen()])
    assert dict(zip([*names, "not-yet-seen"], statuses, strict=True)) == {
        "pending": "InProgress",
        "running": "InProgress",
        "succeeded": "Current",
        "failed": "Failed",
        "suspended": "InProgress",
        "generation-not-observed": "InProgress",
        # kstatus takes an object without any status as reconciled: the window before the operator's first
        # reconcile, which the README warns about.
        "not-yet-seen": "Current",
    }


def test_the_flux_helmrelease_replaces_crds() -> None:
    docs = list(yaml.safe_load_all((GITOPS / "flux-helmrelease.yaml").read_text()))
    release = next(d for d in docs if d["kind"] == "HelmRelease")
    assert release["spec"]["install"]["crds"] == release["spec"]["upgrade"]["crds"] == "CreateReplace"
    assert release["spec"]["chart"]["spec"]["chart"] == "kubetune"
