"""Unit tests of the CRD generator: the committed YAML is current, and the schema is structural and documented."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune_operator.api import CRD_NAME
from kubetune_operator.api.crd import custom_resource_definition, main, node_at, openapi_schema, render_yaml
from kubetune_operator.api.validation import RULES, Rule

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / f"{CRD_NAME}.yaml"


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (`[]` for list items, `{}` for map values)."""
    yield path, node
    for name, prop in node.get("properties", {}).items():
        yield from walk(prop, f"{path}.{name}" if path else name)
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return openapi_schema()


def test_committed_crd_is_what_the_models_generate() -> None:
    assert CRD_FILE.read_text() == render_yaml(), "crds/ is stale: run `python -m kubetune_operator.api.crd`"


def test_check_mode_reports_a_stale_file_with_a_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "crd.yaml"
    assert main(["--check", "--output", str(out)]) == 1  # missing counts as stale
    assert main(["--output", str(out)]) == 0
    assert out.read_text() == render_yaml()
    assert main(["--check", "--output", str(out)]) == 0
    out.write_text(out.read_text().replace("shortNames:\n    - ftj", "shortNames:\n    - ft"))
    capsys.readouterr()
    assert main(["--check", "--output", str(out)]) == 1
    diff = capsys.readouterr().out
    assert "-    - ft\n" in diff and "+    - ftj\n" in diff


def test_crd_names_version_and_subresources() -> None:
    crd = custom_resource_definition()
    assert yaml.safe_load(CRD_FILE.read_text()) == crd
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"], names["categories"]) == (
        "FineTuneJob",
        "finetunejobs",
        ["ftj"],
        ["kubetune"],
    )
    (version,) = crd["spec"]["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert [n for n, c in columns.items() if not c.get("priority")] == [
        "Phase",
        "Progress%",
        "Loss",
        "ETA",
        "Cost",
        "Age",
    ]
    assert [n for n, c in columns.items() if c.get("priority") == 1] == ["Run", "Attempt", "Method", "Model", "Reason"]


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in walk(schema):
        assert not {"$ref", "$defs", "title", "allOf", "oneOf", "not", "uniqueItems"} & node.keys(), path
        assert node.get("additionalProperties") is not False, path
        assert node.get("nullable") is not True, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "anyOf" not in node, path
            assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            assert node.get(bound, True) is True, path  # OpenAPI v3.0 booleans, not JSON-Schema numbers


def test_every_field_is_described(schema: dict[str, Any]) -> None:
    undocumented = [
        f"{path}.{name}" if path else name
        for path, node in walk(schema)
        for name, prop in node.get("properties", {}).items()
        if not prop.get("description") and (path, name) != ("", "metadata")
    ]
    assert undocumented == []
    assert "\n" not in str([node.get("description") for _, node in walk(schema)])


def test_preserve_unknown_fields_only_for_embedded_core_types(schema: dict[str, Any]) -> None:
    preserved = [path for path, node in walk(schema) if node.get("x-kubernetes-preserve-unknown-fields")]
    assert preserved == [
        "spec.resources.affinity.nodeAffinity",
        "spec.resources.affinity.podAffinity",
        "spec.resources.affinity.podAntiAffinity",
    ]


def test_defaults_fill_groups_but_not_method_settings_or_status(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]["properties"]
    for group in ("method", "training", "resources", "output", "runPolicy"):
        assert spec[group]["default"] == {}, group
    for group in ("model", "dataset", "checkpoint", "budget", "evaluation"):
        assert "default" not in spec[group], group
    # A settings group appears only when the user gives it (CEL forbids the groups of other methods).
    for group in ("lora", "qlora", "prefix", "prompt", "ia3", "full"):
        assert "default" not in spec["method"]["properties"][group], group
    assert spec["method"]["properties"]["lora"]["properties"]["targetModules"]["default"] == ["all-linear"]
    assert spec["runPolicy"]["properties"]["maxRestarts"]["default"] == 3
    assert [path for path, node in walk(schema["properties"]["status"]) if "default" in node] == []


def test_list_types(schema: dict[str, Any]) -> None:
    status = schema["properties"]["status"]["properties"]
    for field, key in (("conditions", "type"), ("runs", "run"), ("attempts", "attempt")):
        assert status[field]["x-kubernetes-list-type"] == "map"
        assert status[field]["x-kubernetes-list-map-keys"] == [key]
        assert key in status[field]["items"]["required"]
    assert status["runs"]["maxItems"] == 20


def test_every_rule_is_attached_where_its_path_points(schema: dict[str, Any]) -> None:
    attached = {
        path: node["x-kubernetes-validations"] for path, node in walk(schema) if "x-kubernetes-validations" in node
    }
    assert attached == {path: [r.to_schema() for r in rules] for path, rules in RULES.items()}
    messages = [r.message for rules in RULES.values() for r in rules]
    assert len(messages) == len(set(messages)), "each rule has its own message"


def test_rule_paths_that_do_not_exist_are_refused() -> None:
    with pytest.raises(KeyError):
        openapi_schema({"spec.method.lora.rank": (Rule("true", "never"),)})
    with pytest.raises(KeyError):
        node_at(openapi_schema(), "spec.resources.tolerations{}")
