"""The Dockerfile, checked without a container engine: its targets, users, entrypoints, ports and pins agree with
the chart's values, the operator's defaults and the project's packaging; .dockerignore lets in exactly what the
build copies."""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from chart_support import CHART, REPO
from kubetune_dev import images
from kubetune_operator.render import CONTAINER, WORKER_UID
from kubetune_operator.settings import DEFAULT_IMAGE, OperatorSettings

DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        found = [arg for kw, arg in self.instructions if kw == keyword]
        return found[-1] if found else None

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse(path: Path) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name): instructions with line continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            current = Stage(name.strip(), image.strip())
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"only ARG may come before the first FROM, got {keyword}"
            name, _, default = rest.partition("=")
            args[name] = default
        else:
            current.instructions.append((keyword, rest))
    return args, stages


ARGS, STAGES = parse(DOCKERFILE)


def chain(name: str) -> list[Stage]:
    """The stage and the stages it builds on, itself first."""
    out = [STAGES[name]]
    while out[-1].base in STAGES:
        out.append(STAGES[out[-1].base])
    return out


def effective(name: str, keyword: str) -> str | None:
    for stage in chain(name):
        value = stage.last(keyword)
        if value is not None:
            return value
    return None


def exec_form(instruction: str | None) -> list[str]:
    assert instruction is not None and instruction.startswith("["), f"not exec form: {instruction}"
    parsed: list[str] = yaml.safe_load(instruction)
    return parsed


def installs(name: str) -> str:
    """Every RUN of the stage and its bases, joined."""
    return " ".join(run for stage in chain(name) for run in stage.all("RUN"))


def test_there_are_operator_and_trainer_targets_on_one_pinned_python_base() -> None:
    assert {"operator", "trainer"} <= set(STAGES)
    base = ARGS["PYTHON_IMAGE"]
    repository, _, tag = base.partition(":")
    assert repository == "python"
    # An exact patch release and Debian release: never latest, 3, 3.11 or slim alone.
    assert re.fullmatch(r"\d+\.\d+\.\d+-slim-(bookworm|trixie)", tag), tag
    # The Python the pins in constraints.txt were resolved and tested with.
    assert tag.startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")
    for target in ("operator", "trainer"):
        assert chain(target)[-1].base == "${PYTHON_IMAGE}"


def test_entrypoints_are_the_commands_the_chart_and_the_operator_run() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    operator_entrypoint = exec_form(effective("operator", "ENTRYPOINT"))
    assert operator_entrypoint == ["kubetune-operator"] and "kubetune-operator" in scripts
    # The chart's Deployment relies on the entrypoint: it sets no command.
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert "command:" not in deployment

    trainer_entrypoint = exec_form(effective("trainer", "ENTRYPOINT"))
    assert trainer_entrypoint == ["kubetune-launch"] and "kubetune-launch" in scripts
    # The operator gives every worker container this command explicitly (render.py); it must exist in the image.
    render_source = (REPO / "operator" / "kubetune_operator" / "render.py").read_text()
    assert f'"command": ["{trainer_entrypoint[0]}"]' in render_source
    assert CONTAINER == "trainer"


def test_both_images_run_as_the_uid_the_chart_and_the_operator_expect() -> None:
    chart_user = f"{VALUES['podSecurityContext']['runAsUser']}:{VALUES['podSecurityContext']['runAsGroup']}"
    assert effective("operator", "USER") == chart_user
    assert effective("trainer", "USER") == f"{WORKER_UID}:{WORKER_UID}"
    # The user exists in the image (so tools that look up the uid find a name and a home).
    assert "useradd --uid 1000 --gid 1000" in installs("operator")


def test_each_image_installs_its_extra_only_against_the_pins() -> None:
    operator, trainer = installs("operator"), installs("trainer")
    # The dependency stages install one extra's requirements against the pins, without kubetune itself...
    assert '["optional-dependencies"]["operator"]' in operator and '["optional-dependencies"]["trainer"]' in trainer
    assert "trainer" not in operator.replace("kubetune_trainer", "")
    assert '["optional-dependencies"]["operator"]' not in trainer
    for run in (operator, trainer):
        assert "pip install --constraint /tmp/deps/constraints.txt --requirement /tmp/deps/requirements.txt" in run
        # ...and the final stage adds the wheel built from the checkout, with nothing else.
        assert "pip install --no-deps --no-index /tmp/wheels/kubetune-*.whl" in run
    assert "torch" not in operator.replace("'torch' not in sys.modules", "")
    # The checks that fail the build: no torch in the operator image; the trainer stack imports.
    assert "assert 'torch' not in sys.modules" in operator
    assert "import torch, transformers, peft, accelerate, bitsandbytes" in trainer
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not any(dep.startswith("torch") for dep in extras["operator"])
    assert any(dep.startswith("bitsandbytes") for dep in extras["trainer"])


def test_the_large_dependency_layers_do_not_depend_on_the_code() -> None:
    """A code change rebuilds only the small layers: the dependency stages copy nothing but the two files that
    decide the dependencies, and the targets build on them (a layer cache, or `make images`, keeps them)."""
    for target in ("operator", "trainer"):
        deps = STAGES[f"{target}-deps"]
        assert deps.all("COPY") == ["pyproject.toml constraints.txt /tmp/deps/"]
        assert STAGES[target].base == f"{target}-deps"
        assert STAGES[target].all("COPY") == ["--from=wheel /wheels/ /tmp/wheels/"]


def test_packaging_tools_are_pinned() -> None:
    base = STAGES["base"]
    pins = dict(arg.split("=", 1) for arg in base.all("ARG"))
    assert re.fullmatch(r"\d+(\.\d+)+", pins["PIP_VERSION"]) and re.fullmatch(
        r"\d+(\.\d+)+", pins["SETUPTOOLS_VERSION"]
    )
    assert '"pip==${PIP_VERSION}" "setuptools==${SETUPTOOLS_VERSION}"' in " ".join(base.all("RUN"))
    assert "--no-build-isolation" in " ".join(STAGES["wheel"].all("RUN"))


def test_exposed_ports_are_the_default_settings() -> None:
    defaults = OperatorSettings()
    exposed = {
        name: {int(p) for stage in chain(name) for arg in stage.all("EXPOSE") for p in arg.split()}
        for name in ("operator", "trainer")
    }
    assert exposed["operator"] == {defaults.health_port, defaults.metrics_port}
    assert exposed["trainer"] == {defaults.trainer_metrics_port, defaults.master_port}
    assert VALUES["settings"]["healthPort"] == defaults.health_port


def test_image_names_agree_with_the_chart_and_the_operator() -> None:
    """The build commands at the top of the Dockerfile tag what the chart and the operator pull by default."""
    header = DOCKERFILE.read_text().split("\n\n")[0]
    tags = dict(re.findall(r"docker build --target (\w+)\s+-t (\S+) \.", header))
    version = PYPROJECT["project"]["version"]
    assert CHART_META["appVersion"] == version
    assert tags["operator"] == f"{VALUES['image']['repository']}:{version}"
    assert tags["trainer"] == f"{VALUES['trainerImages']['peft']['repository']}:{version}" == DEFAULT_IMAGE
    assert VALUES["trainerImages"]["full"]["repository"] == VALUES["trainerImages"]["peft"]["repository"]


def dockerignore_allows(path: str) -> bool:
    return images.dockerignore_allows(path, images.dockerignore_patterns(REPO))


def test_the_build_context_is_what_the_build_uses_and_nothing_else() -> None:
    sources = []
    for stage in STAGES.values():
        for copy in stage.all("COPY"):
            words = shlex.split(copy)
            if not any(w.startswith("--from") for w in words):
                sources += [w for w in words[:-1] if not w.startswith("--")]
        for run in stage.all("RUN"):
            sources += re.findall(r"--mount=type=bind,source=([^,\s]+),target", run)
    assert sources
    for source in sources:
        assert dockerignore_allows(source.rstrip("/")), f"{source} is copied but .dockerignore leaves it out"
    assert dockerignore_allows("operator/kubetune_operator/__main__.py")
    for kept_out in (".cache/venv/bin/python", ".git/HEAD", "tests/conftest.py", "charts/kubetune/Chart.yaml"):
        assert not dockerignore_allows(kept_out), kept_out
    assert not dockerignore_allows("operator/kubetune_operator/__pycache__/render.cpython-311.pyc")


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_images_write_nothing_outside_tmp(target: str) -> None:
    """The chart and the operator run both with a read-only root filesystem and an emptyDir on /tmp."""
    assert effective(target, "WORKDIR") == "/tmp"
    env = " ".join(arg for stage in chain(target) for arg in stage.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
