"""Fixtures for the chart tests: the Prometheus Operator's CRDs on the local control plane, and the operator e2e
helpers (the operator as a subprocess, namespaces with claims, job specs) shared with tests/operator."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from chart_support import prometheus_operator_crds
from kubetune_dev.cluster import LocalCluster

# e2e_support (tests/operator) runs the operator the same way for every e2e suite; reuse it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))


@pytest.fixture(scope="session")
def monitoring_crds(cluster: LocalCluster) -> LocalCluster:
    """The cluster serving ServiceMonitor, PodMonitor and PrometheusRule with their real upstream schemas, so the
    API server validates the chart's monitoring objects as it would in a cluster with the Prometheus Operator."""
    crds = prometheus_operator_crds()
    args = ["apply", "--server-side", "--force-conflicts", "--field-manager=kubetune-chart-tests"]
    for crd in crds:
        args += ["-f", str(crd)]
    cluster.kubectl(*args)
    for name in ("servicemonitors", "podmonitors", "prometheusrules"):
        cluster.wait_established(f"{name}.monitoring.coreos.com")
    return cluster
