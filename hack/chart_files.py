"""Copy the generated and shared files the Helm chart ships into charts/kubetune/files/.

Helm packages only what is inside the chart directory, so the chart carries copies of:
  - the FineTuneJob CRD, generated from the API models (the same text as crds/, from the same function),
  - the Grafana dashboard and the alerting rules from operator/kubetune_operator/monitoring/.
Also the Argo CD ConfigMap snippet in docs/gitops/, which embeds the health check's Lua.

    python hack/chart_files.py           # write the copies (part of `make crds`)
    python hack/chart_files.py --check   # exit 1, with a diff, when a copy is stale (tests/chart runs this)

The templates read them with .Files.Get, which does not template them: Grafana's and Prometheus' own
{{ ... }} survive unchanged.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from kubetune_operator.api import CRD_NAME
from kubetune_operator.api.crd import render_yaml
from kubetune_operator.monitoring import ALERTS, DASHBOARD

REPO = Path(__file__).resolve().parents[1]
CHART_FILES = REPO / "charts" / "kubetune" / "files"
GITOPS = REPO / "docs" / "gitops"
HEALTH_KEY = "resource.customizations.health.kubetune.io_FineTuneJob"
ARGOCD_CM_HEADER = f"""\
# Argo CD: the FineTuneJob health check, merged into the argocd-cm ConfigMap (namespace argocd):
#
#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file argocd-cm.yaml
#
# With the Argo CD Helm chart, put the same key under `configs.cm` in its values. Generated from
# finetunejob-health.lua in this folder by hack/chart_files.py (make crds); do not edit.
data:
  {HEALTH_KEY}: |
"""


def argocd_cm() -> str:
    lua = (GITOPS / "finetunejob-health.lua").read_text()
    return ARGOCD_CM_HEADER + "".join(f"    {line}" if line.strip() else line for line in lua.splitlines(keepends=True))


def expected() -> dict[Path, str]:
    """Each chart file and the text it must hold."""
    return {
        CHART_FILES / "crds" / f"{CRD_NAME}.yaml": render_yaml(),
        CHART_FILES / "dashboards" / "kubetune-dashboard.json": DASHBOARD.read_text(),
        CHART_FILES / "rules" / "kubetune-alerts.yaml": ALERTS.read_text(),
        GITOPS / "argocd-cm.yaml": argocd_cm(),
    }


def stale() -> dict[Path, str]:
    """The unified diff of each chart file that differs from what it must hold (a missing file is all added)."""
    out = {}
    for path, text in expected().items():
        current = path.read_text() if path.exists() else ""
        if current != text:
            rel = path.relative_to(REPO)
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"{rel} (in the chart)",
                tofile=f"{rel} (expected)",
            )
            out[path] = "".join(diff)
    return out


def write() -> list[Path]:
    written = []
    for path, text in expected().items():
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python hack/chart_files.py", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when stale")
    args = parser.parse_args(argv)
    if not args.check:
        for path in write():
            print(f"wrote {path.relative_to(REPO)}")
        return 0
    diffs = stale()
    for diff in diffs.values():
        sys.stdout.write(diff)
    if diffs:
        print("\nthe chart's copies are stale: run `python hack/chart_files.py` (make crds).", file=sys.stderr)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
