"""Monitoring assets shipped as package data for the Helm chart: the Grafana dashboard and the alerting rules.

Both are plain files (JSON, and a Prometheus rule file whose `groups` is a PrometheusRule's `spec`) so the
chart includes them unchanged (`.Files.Get` does not template them, so Grafana's and Prometheus' own
`{{ ... }}` survive). tests/observability/test_prometheus.py runs every query in them against a real
Prometheus.
"""

from importlib.resources import files

DASHBOARD = files(__name__) / "kubetune-dashboard.json"
ALERTS = files(__name__) / "kubetune-alerts.yaml"
