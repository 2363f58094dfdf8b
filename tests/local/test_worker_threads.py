"""Worker processes use as many CPU threads as their pod requests cores (the demo's speed depends on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune_operator.api import FineTuneJob
from kubetune_operator.render import Owner, render_job
from kubetune_operator.settings import OperatorSettings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "demo-lora.yaml"


def worker_env(resources: dict[str, Any]) -> dict[str, Any]:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["resources"].update(resources)
    doc["metadata"].update(namespace="ml", uid="uid", generation=1)
    job = FineTuneJob.model_validate(doc)
    manifest = render_job(Owner(job.metadata["name"], "ml", "uid"), job.spec, 1, 1, OperatorSettings())
    return {e["name"]: e.get("value") for e in manifest["spec"]["template"]["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize(
    ("resources", "threads"),
    [
        ({}, "1"),  # the demo: cpu "1", one CPU process per node
        ({"cpu": "2500m"}, "2"),
        ({"cpu": 16, "gpusPerNode": 8}, "2"),  # 8 processes share the pod's 16 cores
        ({"cpu": "500m", "gpusPerNode": 2}, "1"),
    ],
)
def test_openmp_threads_follow_the_cpu_request(resources: dict[str, Any], threads: str) -> None:
    assert worker_env(resources)["OMP_NUM_THREADS"] == threads


def test_without_a_cpu_request_the_thread_count_is_left_alone() -> None:
    assert "OMP_NUM_THREADS" not in worker_env({"cpu": None})
