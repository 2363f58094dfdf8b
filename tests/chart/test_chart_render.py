"""The chart without a cluster: lint, the closed values schema, what `helm template` renders, and that the
chart agrees with the code it deploys (CRD, operator settings, dashboard, alerts, worker labels)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import chart_files
import pytest
import yaml
from chart_support import (
    CHART,
    FULL_VALUES,
    Manifest,
    helm,
    of_kind,
    one,
    render,
    render_text,
    settings_of,
    values_args,
)
from e2e_support import spec as kwok_job_spec  # the small kwok job of the e2e tests
from kubetune_operator.api import CRD_NAME, FineTuneJob
from kubetune_operator.api.crd import custom_resource_definition
from kubetune_operator.monitoring import ALERTS, DASHBOARD
from kubetune_operator.names import COMPLETION_INDEX_LABEL, LABEL_JOB
from kubetune_operator.render import Owner, render_job
from kubetune_operator.settings import OperatorSettings, load_settings

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
NAMESPACED = {"watchNamespaces": ["team-a", "team-b"]}
RECOMMENDED_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
)


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    return render(tmp=tmp_path_factory.mktemp("defaults"))


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    return render([FULL_VALUES], tmp=tmp_path_factory.mktemp("full"))


def leaves(tree: Any, prefix: str = "") -> set[str]:
    """Dotted paths of the values a user sets: scalars, lists, and empty or free-form maps count as one."""
    if isinstance(tree, dict) and tree and not prefix.endswith(FREE_FORM):
        return set().union(*(leaves(v, f"{prefix}.{k}" if prefix else k) for k, v in tree.items()))
    return {prefix}


# Maps whose keys are the user's (labels, prices, Kubernetes types passed through): one value each.
FREE_FORM = (
    "annotations",
    "labels",
    "podAnnotations",
    "podLabels",
    "nodeSelector",
    "affinity",
    "resources",
    "podSecurityContext",
    "securityContext",
    "byGpuProduct",
    "byInstanceType",
)


# ----------------------------------------------------------------------------------------------
# lint and the values schema
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[], [FULL_VALUES], [NAMESPACED]], ids=["defaults", "every option", "namespaced"])
def test_helm_lint_strict_passes(values: list[Any], tmp_path: Path) -> None:
    out = helm("lint", "--strict", str(CHART), *values_args(values, tmp_path))
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"crds": {"instal": True}}, "at '/crds': additional properties 'instal' not allowed"),
        ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
        ({"settings": {"pricing": {"byGpu": {}}}}, "at '/settings/pricing': additional properties 'byGpu' not allowed"),
        ({"metrics": {"serviceMonitor": {"enable": True}}}, "additional properties 'enable' not allowed"),
        ({"settings": {"namespaces": ["a"]}}, "additional properties 'namespaces' not allowed"),
        ({"watchNamespaces": ["team-*"]}, "'team-*' does not match pattern"),
        ({"settings": {"healthPort": 0}}, "at '/settings/healthPort'"),
        ({"logLevel": "trace"}, "at '/logLevel'"),
    ],
)
def test_the_schema_rejects_unknown_keys_and_bad_values(values: dict[str, Any], message: str, tmp_path: Path) -> None:
    for command in (["lint", "--strict"], ["template", "kt"]):
        out = helm(*command, str(CHART), *values_args([values], tmp_path), check=False)
        assert out.returncode != 0
        assert "values don't meet the specifications of the schema" in out.stdout + out.stderr
        assert message in out.stdout + out.stderr


def test_every_object_in_the_schema_is_closed() -> None:
    """additionalProperties: false on every object the chart defines; free-form maps say what their values are."""
    open_objects = []

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
            open_objects.append(path)
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")
        for name, child in node.get("definitions", {}).items():
            walk(child, f"#{name}")

    walk(SCHEMA, "")
    assert open_objects == []


def test_the_schema_and_values_yaml_name_the_same_keys() -> None:
    def schema_leaves(node: dict[str, Any], prefix: str = "") -> set[str]:
        if "$ref" in node:
            node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
        props = node.get("properties")
        if props and not prefix.endswith(FREE_FORM):
            return set().union(*(schema_leaves(v, f"{prefix}.{k}" if prefix else k) for k, v in props.items()))
        return {prefix}

    assert schema_leaves(SCHEMA) == leaves(VALUES)


def test_every_value_is_documented_by_name_in_values_yaml() -> None:
    """Each value has a comment starting with its dotted name (or a parent's, for free-form maps)."""
    text = (CHART / "values.yaml").read_text()
    documented = set(re.findall(r"^\s*# ([A-Za-z0-9_.]+) --", text, re.MULTILINE))
    undocumented = [path for path in leaves(VALUES) if path not in documented]
    assert undocumented == []


def test_the_full_values_file_sets_every_value() -> None:
    full_values = yaml.safe_load(FULL_VALUES.read_text())
    assert leaves(full_values) == leaves(VALUES)


# ----------------------------------------------------------------------------------------------
# agreement with the code the chart deploys
# ----------------------------------------------------------------------------------------------


def test_the_charts_copies_are_what_the_sources_generate() -> None:
    """files/ holds the CRD generated from the API models and the monitoring files, unchanged."""
    stale = chart_files.stale()
    assert not stale, "".join(stale.values()) + "\nrun `python hack/chart_files.py` (make crds)"
    assert chart_files.main(["--check"]) == 0


def test_the_crd_is_the_generated_one_with_the_release_labels_and_keep_policy(defaults: list[Manifest]) -> None:
    crd = copy.deepcopy(one(defaults, "CustomResourceDefinition"))
    metadata = crd.pop("metadata")
    expected = custom_resource_definition()
    assert metadata["name"] == expected.pop("metadata")["name"] == CRD_NAME
    assert crd == expected  # the whole schema survives the chart's round trip
    assert metadata["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert set(RECOMMENDED_LABELS) <= set(metadata["labels"])


def test_crds_install_and_keep_can_be_turned_off(tmp_path: Path) -> None:
    assert of_kind(render([{"crds": {"install": False}}], tmp=tmp_path), "CustomResourceDefinition") == []
    crd = one(render([{"crds": {"keep": False}}], tmp=tmp_path), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]


def test_the_settings_file_is_valid_for_the_operator_and_matches_its_defaults(
    defaults: list[Manifest], tmp_path: Path
) -> None:
    settings = settings_of(defaults)
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    loaded = load_settings(path, environ={})  # extra="forbid": a key the operator does not know fails here
    # The chart's defaults are the operator's: installing the chart changes nothing the operator would choose.
    assert loaded == OperatorSettings()


def test_every_setting_is_a_value_with_the_operators_bounds() -> None:
    """values `settings` mirrors OperatorSettings (less what the chart derives): same keys, types and bounds."""
    model = OperatorSettings.model_json_schema(by_alias=True)
    chart = SCHEMA["properties"]["settings"]["properties"]
    derived = {"namespaces", "images"}
    assert set(chart) == set(model["properties"]) - derived

    def resolved(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            return model["$defs"][node["$ref"].rsplit("/", 1)[1]]  # type: ignore[no-any-return]
        return node

    def comparable(node: dict[str, Any]) -> dict[str, Any]:
        node = resolved(node)
        if "anyOf" in node:  # str | None
            types = sorted(option["type"] for option in node["anyOf"])
            return {"type": types}
        out = {k: node[k] for k in ("minimum", "maximum", "exclusiveMinimum", "enum") if k in node}
        out["type"] = node.get("type", "string")
        if out["type"] == "object" and "properties" in node:
            out["properties"] = {k: comparable(v) for k, v in node["properties"].items()}
        if isinstance(node.get("additionalProperties"), dict):
            out["values"] = comparable(node["additionalProperties"])
        return out

    def chart_comparable(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
        types = node.get("type", "string")
        if types == ["number", "string"]:
            types = "number"  # numeric strings too, for `helm --set` (test_decimals_given_with_set...)
        if isinstance(types, list):
            return {"type": sorted(types)}
        out = {k: node[k] for k in ("minimum", "maximum", "exclusiveMinimum", "enum") if k in node}
        out["type"] = types
        if out["type"] == "object" and "properties" in node:
            out["properties"] = {k: chart_comparable(v) for k, v in node["properties"].items()}
        if isinstance(node.get("additionalProperties"), dict):
            out["values"] = chart_comparable(node["additionalProperties"])
        return out

    differences = {}
    for key in chart:
        want, have = comparable(model["properties"][key]), chart_comparable(chart[key])
        if key == "healthPort":
            want["minimum"] = 1  # the chart's probes need the health endpoint
        if want != have:
            differences[key] = (want, have)
    assert differences == {}


def test_decimals_given_with_set_reach_the_operator_as_numbers(tmp_path: Path) -> None:
    """`helm --set x=2.5` passes a string (only whole numbers become numbers): the schema takes numeric strings and
    the operator reads them as numbers."""
    args = ["--set", "settings.pricing.defaultUsdPerGpuHour=2.5", "--set", "settings.pricing.byGpuProduct.H100=4.25"]
    args += ["--set", "settings.progressPollIntervalSeconds=7.5"]
    out = helm("template", "kt", str(CHART), *args)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings_of(docs)))
    settings = load_settings(path, environ={})
    assert settings.pricing.default_usd_per_gpu_hour == 2.5
    assert settings.pricing.by_gpu_product == {"H100": 4.25}
    assert settings.progress_poll_interval_seconds == 7.5
    bad = helm("template", "kt", str(CHART), "--set", "settings.pricing.defaultUsdPerGpuHour=cheap", check=False)
    assert bad.returncode != 0 and "'cheap' does not match pattern" in bad.stderr


def test_namespaces_and_images_in_the_settings(full: list[Manifest]) -> None:
    settings = settings_of(full)
    values = yaml.safe_load(FULL_VALUES.read_text())
    assert settings["namespaces"] == values["watchNamespaces"]
    images = values["trainerImages"]
    assert settings["images"] == {m: f"{images[m]['repository']}:{images[m]['tag']}" for m in ("peft", "full")}
    assert {k: v for k, v in settings.items() if k not in ("namespaces", "images")} == values["settings"]


def test_the_default_trainer_image_is_the_operators_default(defaults: list[Manifest]) -> None:
    images = settings_of(defaults)["images"]
    assert images == OperatorSettings().images.model_dump()
    assert images["peft"].endswith(f":{CHART_META['appVersion']}")


def test_the_dashboard_configmap_carries_the_dashboard_unchanged(
    defaults: list[Manifest], full: list[Manifest]
) -> None:
    cm = one(defaults, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "kubetune-system"
    text = cm["data"]["kubetune-dashboard.json"]
    assert text == DASHBOARD.read_text().rstrip("\n")
    assert json.loads(text)["uid"] == "kubetune-jobs"

    cm = one(full, "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "kubetune"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Fine-tuning"}


def test_the_prometheus_rule_is_the_rule_file(full: list[Manifest]) -> None:
    rule = one(full, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(ALERTS.read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_monitoring_objects_are_off_by_default(defaults: list[Manifest]) -> None:
    kinds = {d["kind"] for d in defaults}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "NetworkPolicy"}


def worker_job() -> Manifest:
    """The Indexed Job the operator renders for the small kwok job of the e2e tests."""
    ftj = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "bot"},
            "spec": kwok_job_spec(),
        }
    )
    return render_job(Owner("bot", "team-a", "uid-1"), ftj.spec, 1, 1, OperatorSettings())


def worker_pod_labels(index: int) -> dict[str, str]:
    """A worker pod's labels as the cluster shows them: the operator's pod template plus the Job controller's."""
    job = worker_job()
    labels: dict[str, str] = dict(job["spec"]["template"]["metadata"]["labels"])
    return {**labels, COMPLETION_INDEX_LABEL: str(index), "batch.kubernetes.io/job-name": job["metadata"]["name"]}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In/NotIn/Exists/DoesNotExist)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        value, op = labels.get(e["key"]), e["operator"]
        if (
            (op == "Exists" and value is None)
            or (op == "DoesNotExist" and value is not None)
            or (op == "In" and value not in e["values"])
            or (op == "NotIn" and value in e["values"])
        ):
            return False
    return True


def test_the_pod_monitor_scrapes_rank_0_of_every_job_and_names_it(full: list[Manifest]) -> None:
    monitor = one(full, "PodMonitor")
    spec = monitor["spec"]
    assert selects(spec["selector"], worker_pod_labels(0))
    assert not selects(spec["selector"], worker_pod_labels(1))
    assert spec["namespaceSelector"] == {"matchNames": ["ml-team-a", "ml-team-b"]}
    [endpoint] = spec["podMetricsEndpoints"]
    relabel_source = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", LABEL_JOB)
    assert {"sourceLabels": [relabel_source], "targetLabel": "name"} in endpoint["relabelings"]
    # The port is the worker container's, by name.
    worker_ports = {p["name"] for p in worker_job()["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in worker_ports


def test_the_pod_monitor_covers_every_namespace_in_cluster_mode(tmp_path: Path) -> None:
    docs = render([{"metrics": {"podMonitor": {"enabled": True}}}], tmp=tmp_path)
    assert one(docs, "PodMonitor")["spec"]["namespaceSelector"] == {"any": True}


def test_the_service_monitor_scrapes_the_operators_metrics_service_with_honor_labels(full: list[Manifest]) -> None:
    monitor, service, deployment = one(full, "ServiceMonitor"), one(full, "Service"), one(full, "Deployment")
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is True
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert selects({"matchLabels": service["spec"]["selector"]}, deployment["spec"]["template"]["metadata"]["labels"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http-metrics"] == settings_of(full)["metricsPort"]


def test_no_metrics_port_no_service_nor_service_monitor(tmp_path: Path) -> None:
    docs = render([{"settings": {"metricsPort": 0}, "metrics": {"serviceMonitor": {"enabled": True}}}], tmp=tmp_path)
    assert of_kind(docs, "Service") == [] and of_kind(docs, "ServiceMonitor") == []


# ----------------------------------------------------------------------------------------------
# the operator's Deployment
# ----------------------------------------------------------------------------------------------


def test_the_deployment_is_one_replica_recreated_probed_and_restricted(defaults: list[Manifest]) -> None:
    deployment = one(defaults, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == f"ghcr.io/kubetune/kubetune-operator:{CHART_META['appVersion']}"
    assert "command" not in container and "args" not in container  # the image's entrypoint, settings from the file
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http-health"] == OperatorSettings().health_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}

    env = {e["name"]: e["value"] for e in container["env"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env["KUBETUNE_SETTINGS"] == f"{mounts['settings']}/settings.yaml"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["settings"]["configMap"]["name"] == one(defaults, "ConfigMap", "-settings")["metadata"]["name"]
    assert pod["serviceAccountName"] == one(defaults, "ServiceAccount")["metadata"]["name"]


def test_the_operators_selector_never_matches_its_workers(defaults: list[Manifest]) -> None:
    selector = one(defaults, "Deployment")["spec"]["selector"]
    assert not selects(selector, worker_pod_labels(0))


def test_a_settings_change_rolls_the_operator(tmp_path: Path) -> None:
    def checksum(values: list[Any]) -> str:
        template = one(render(values, tmp=tmp_path), "Deployment")["spec"]["template"]
        return str(template["metadata"]["annotations"]["checksum/settings"])

    assert checksum([]) != checksum([{"settings": {"pricing": {"defaultUsdPerGpuHour": 3.0}}}])
    assert checksum([]) == checksum([{"logLevel": "info"}])


def test_log_level_becomes_a_flag(tmp_path: Path) -> None:
    container = one(render([{"logLevel": "debug"}], tmp=tmp_path), "Deployment")["spec"]["template"]["spec"]
    assert container["containers"][0]["args"] == ["--debug"]


def test_every_object_has_the_recommended_labels(full: list[Manifest], defaults: list[Manifest]) -> None:
    for doc in full + defaults:
        missing = [label for label in RECOMMENDED_LABELS if label not in doc["metadata"].get("labels", {})]
        assert missing == [], f"{doc['kind']} {doc['metadata']['name']} lacks {missing}"


# ----------------------------------------------------------------------------------------------
# RBAC
# ----------------------------------------------------------------------------------------------


def rules_of(docs: list[Manifest], kind: str, name: str) -> list[dict[str, Any]]:
    return [r for d in of_kind(docs, kind) if d["metadata"]["name"] == name for r in d["rules"]]


def test_cluster_mode_binds_the_workload_rules_cluster_wide(defaults: list[Manifest]) -> None:
    fullname = one(defaults, "Deployment")["metadata"]["name"]
    assert rules_of(defaults, "ClusterRole", fullname)
    binding = one(defaults, "ClusterRoleBinding", fullname)
    assert binding["roleRef"]["name"] == fullname
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": fullname, "namespace": "kubetune-system"}]
    assert of_kind(defaults, "Role") == [] and of_kind(defaults, "RoleBinding") == []


def test_namespaced_mode_binds_them_only_in_the_watched_namespaces(tmp_path: Path) -> None:
    docs = render([NAMESPACED], tmp=tmp_path)
    fullname = one(docs, "Deployment")["metadata"]["name"]
    assert {r["metadata"]["namespace"] for r in of_kind(docs, "Role")} == {"team-a", "team-b"}
    assert {r["metadata"]["namespace"] for r in of_kind(docs, "RoleBinding")} == {"team-a", "team-b"}
    assert rules_of(docs, "ClusterRole", fullname) == []
    # node prices only: with exact namespace names the operator turns kopf's scanning off, so kopf neither lists
    # namespaces nor watches CRDs
    cluster_reads = rules_of(docs, "ClusterRole", f"{fullname}-cluster-reads")
    assert cluster_reads == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]}]
    assert settings_of(docs)["namespaces"] == ["team-a", "team-b"]


def test_the_rules_grant_no_secrets_no_wildcards_no_claim_deletion(
    full: list[Manifest], defaults: list[Manifest]
) -> None:
    for docs in (full, defaults):
        operator_roles = [
            d
            for d in of_kind(docs, "ClusterRole") + of_kind(docs, "Role")
            if "finetunejob-" not in d["metadata"]["name"]
        ]
        for role in operator_roles:
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
                assert "secrets" not in rule["resources"]
                if "persistentvolumeclaims" in rule["resources"]:
                    assert "delete" not in rule["verbs"]
                if role["metadata"]["name"].endswith("-cluster-reads"):
                    assert set(rule["verbs"]) <= {"get", "list", "watch"}


def test_every_operator_rule_says_why_in_a_comment() -> None:
    """In the templates, each rule of the operator's roles comes right after a comment (template lines aside)."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    rbac = (CHART / "templates" / "rbac.yaml").read_text()
    sources = {
        "namespacedRules": helpers.split('define "kubetune.namespacedRules"')[1].split("{{- end }}")[0],
        "cluster-reads": rbac.split("kind: ClusterRoleBinding")[0],
    }
    for name, text in sources.items():
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("{{")]
        rules = [i for i, line in enumerate(lines) if line.startswith("- apiGroups:")]
        assert len(rules) >= 2, name
        for i in rules:
            assert lines[i - 1].startswith("#"), f"{name}: the rule {lines[i + 1]} has no comment"


def test_user_roles_aggregate_into_the_built_in_roles(defaults: list[Manifest], tmp_path: Path) -> None:
    editor = one(defaults, "ClusterRole", "-finetunejob-editor")
    viewer = one(defaults, "ClusterRole", "-finetunejob-viewer")
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in viewer["rules"])
    docs = render([{"rbac": {"userRoles": False, "create": False}}], tmp=tmp_path)
    assert of_kind(docs, "ClusterRole") == [] and of_kind(docs, "ClusterRoleBinding") == []


# ----------------------------------------------------------------------------------------------
# NetworkPolicy
# ----------------------------------------------------------------------------------------------


def test_network_policies_let_workers_talk_and_the_operator_reach_rank_0(full: list[Manifest]) -> None:
    policies = of_kind(full, "NetworkPolicy")
    operator_policy = next(p for p in policies if not p["metadata"]["name"].endswith("-workers"))
    workers = [p for p in policies if p["metadata"]["name"].endswith("-workers")]
    assert {p["metadata"]["namespace"] for p in workers} == {"ml-team-a", "ml-team-b"}
    port = settings_of(full)["trainerMetricsPort"]
    rank0 = worker_pod_labels(0)

    # The operator may reach the trainers' metrics port.
    to_workers = [r for r in operator_policy["spec"]["egress"] if "to" in r]
    assert any(
        any(selects(peer["podSelector"], rank0) for peer in r["to"])
        and r["ports"] == [{"port": port, "protocol": "TCP"}]
        for r in to_workers
    )
    for policy in workers:
        spec = policy["spec"]
        assert selects(spec["podSelector"], rank0) and selects(spec["podSelector"], worker_pod_labels(1))
        # Workers reach each other on every port (torchrun rendezvous, NCCL, gloo): a rule without ports.
        intra = [r for r in spec["ingress"] if "ports" not in r]
        assert len(intra) == 1 and selects(intra[0]["from"][0]["podSelector"], worker_pod_labels(1))
        assert [r for r in spec["egress"] if "ports" not in r and selects(r["to"][0]["podSelector"], rank0)]
        # The operator may reach the metrics port.
        operator_labels = one(full, "Deployment")["spec"]["template"]["metadata"]["labels"]
        from_operator = [
            r
            for r in spec["ingress"]
            if any(selects(peer.get("podSelector", {}), operator_labels) for peer in r["from"])
        ]
        assert from_operator and all(r["ports"] == [{"port": port, "protocol": "TCP"}] for r in from_operator)


def test_worker_egress_is_left_open_unless_rules_are_given(tmp_path: Path) -> None:
    docs = render([NAMESPACED, {"networkPolicy": {"enabled": True}}], tmp=tmp_path)
    workers = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-workers")]
    assert {p["metadata"]["namespace"] for p in workers} == {"team-a", "team-b"}  # the watched namespaces
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in workers)
    # Cluster mode: no namespace to put the workers' policy in unless named.
    docs = render([{"networkPolicy": {"enabled": True}}], tmp=tmp_path)
    assert [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-workers")] == []


def test_rendering_is_deterministic(tmp_path: Path) -> None:
    """Argo CD renders with `helm template` on every sync: anything random (generated names, certificates) would
    keep the application OutOfSync."""
    assert render_text([FULL_VALUES], tmp_path) == render_text([FULL_VALUES], tmp_path)
    assert render_text([], tmp_path) == render_text([], tmp_path)
