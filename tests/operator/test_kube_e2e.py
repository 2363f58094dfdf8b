"""The operator's API client against the real API server: errors whose body is no metav1.Status, and API
discovery, which the operator reads before kopf starts when kopf's scanning is off."""

from __future__ import annotations

import asyncio

import pytest
from kubetune_dev.cluster import LocalCluster
from kubetune_operator.__main__ import wait_for_crd
from kubetune_operator.kube import ApiError, Connection
from kubetune_operator.kube_async import AsyncKube

pytestmark = pytest.mark.e2e


def test_an_unknown_api_group_is_a_404_and_a_served_crd_is_found(
    crd_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(crd_cluster.kubeconfig))

    async def check() -> None:
        kube = AsyncKube(Connection.load())
        try:
            # the API server answers "404 page not found" in plain text here
            with pytest.raises(ApiError) as e:
                await kube.request("GET", "/apis/nothing.kubetune.io/v1")
            assert e.value.status == 404
            await asyncio.wait_for(wait_for_crd(kube, poll=0.1), 10)  # FineTuneJobs are served: no wait
        finally:
            await kube.close()

    asyncio.run(check())
