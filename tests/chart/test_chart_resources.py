"""The operator container's resources: documented defaults when the values give none, the user's own value whole
when they give one, and none at all for `resources: {}` (Helm merges a user's map into a default map, so with the
defaults in values.yaml `{}` could not remove the CPU request that kept a 2-CPU node from fitting the demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from chart_support import one, render


def operator_resources(values: dict[str, Any], tmp: Path) -> dict[str, Any]:
    deployment = one(render([values], tmp=tmp), "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container.get("resources") or {})


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}),
        ({"resources": {}}, {}),
        ({"resources": None}, {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}),
        # A value of one's own is taken whole: no default CPU request merged into it.
        ({"resources": {"requests": {"memory": "1Gi"}}}, {"requests": {"memory": "1Gi"}}),
        ({"resources": {"limits": {"cpu": "2", "memory": "2Gi"}}}, {"limits": {"cpu": "2", "memory": "2Gi"}}),
    ],
    ids=["defaults", "cleared", "null", "own requests", "own limits"],
)
def test_operator_resources_can_be_replaced_or_cleared(
    values: dict[str, Any], expected: dict[str, Any], tmp_path: Path
) -> None:
    assert operator_resources(values, tmp_path) == expected
