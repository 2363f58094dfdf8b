"""The kopf settings the controller asks for, and what the operator does before kopf starts."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import kopf
import pytest
from kubetune_operator.__main__ import wait_for_crd
from kubetune_operator.controller import Controller
from kubetune_operator.kube import ApiError
from kubetune_operator.kube_async import AsyncKube
from kubetune_operator.settings import OperatorSettings


@pytest.mark.parametrize(
    ("namespaces", "scanning"),
    [
        ([], True),  # every namespace: kopf watches CRDs to notice ours installed or changed while it runs
        (["team-a", "team-b"], False),  # exact names: no namespace listing, no CRD watch, so no such RBAC needed
        (["ml-*"], True),  # a glob is resolved by listing namespaces
        (["team-?"], True),
        (["team-a", "!team-b"], True),
        (["team-a,team-b"], True),  # kopf's comma-separated pattern
    ],
)
def test_kopf_scans_the_cluster_only_when_its_namespaces_need_resolving(namespaces: list[str], scanning: bool) -> None:
    settings = kopf.OperatorSettings()
    Controller(cast(AsyncKube, None), OperatorSettings()).configure(settings, namespaces)
    assert settings.scanning.disabled is not scanning


class DiscoveryAnswers:
    """AsyncKube.request answering discovery requests with the given answers, in order."""

    def __init__(self, *answers: dict[str, Any] | ApiError) -> None:
        self.answers = list(answers)
        self.paths: list[str] = []

    async def request(self, method: str, path: str) -> dict[str, Any]:
        self.paths.append(f"{method} {path}")
        answer = self.answers.pop(0)
        if isinstance(answer, ApiError):
            raise answer
        return answer


def test_without_scanning_the_operator_waits_for_its_crd(caplog: pytest.LogCaptureFixture) -> None:
    kube = DiscoveryAnswers(
        ApiError(404, "NotFound", "the server could not find the requested resource"),  # no kubetune.io group yet
        {"resources": []},  # the group is there, the CRD not established yet
        {"resources": [{"name": "finetunejobs"}, {"name": "finetunejobs/status"}]},
    )
    asyncio.run(wait_for_crd(cast(AsyncKube, kube), poll=0))
    assert kube.paths == ["GET /apis/kubetune.io/v1alpha1"] * 3
    assert [r.message for r in caplog.records] == [
        "no FineTuneJob API (kubetune.io/v1alpha1) yet: waiting for its CRD to be installed"
    ]


def test_an_api_error_other_than_not_found_is_not_waited_out() -> None:
    kube = DiscoveryAnswers(ApiError(403, "Forbidden", "discovery is forbidden"))
    with pytest.raises(ApiError, match="403 Forbidden"):
        asyncio.run(wait_for_crd(cast(AsyncKube, kube), poll=0))


def test_the_watch_event_of_the_operators_own_write_wakes_nothing_unless_a_reconcile_waits_for_it() -> None:
    controller = Controller(cast(AsyncKube, None), OperatorSettings())
    key = ("ml", "sft")
    controller._echoes[key] = "42"
    assert not controller.is_echo(key, "41")  # someone else's change (the write's echo is still to come)
    assert controller.is_echo(key, "42")
    assert not controller.is_echo(key, "42")  # once only
    controller._echoes[key] = "43"
    controller._waiting.add(key)  # a reconcile was held back until the cache shows the write
    assert not controller.is_echo(key, "43")


def test_kopf_builds_no_copy_of_each_object_as_no_handler_detects_changes() -> None:
    """NoEssence skips kopf's per-event deep copy, which only change-detecting handlers and daemons read."""
    settings = kopf.OperatorSettings()
    controller = Controller(cast(AsyncKube, None), OperatorSettings())
    controller.configure(settings, ["ml"])
    registry = controller.registry()
    assert registry._changing.get_all_handlers() == [] and registry._spawning.get_all_handlers() == []
    assert registry._watching.get_all_handlers() and registry._indexing.get_all_handlers()
    assert settings.persistence.diffbase_storage.build(body=kopf.Body({"spec": {"a": 1}})) == {}


def test_every_worker_gets_connections_for_the_largest_plan_it_applies_at_once() -> None:
    """A reconcile creates its children together; a worker that waited for a free connection would count the
    client's queue as reconcile latency (the scale benchmark saw creates wait a second behind 16 connections)."""
    from ftj_builders import ftj, spec, step
    from kubetune_operator.kube_async import REQUESTS_PER_RECONCILE, connections_for

    template = {"spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}}
    plan, _ = step(ftj(spec(checkpoint={"claimName": None, "volumeClaimTemplate": template})))
    assert len(plan.create) == REQUESTS_PER_RECONCILE  # claim, config, Service, Job: the most one plan creates
    workers = OperatorSettings().reconcile_workers
    assert connections_for(workers) >= workers * len(plan.create) + 1  # and the event poster's one
