"""Operator settings: defaults, a file in Helm-values style, and KUBETUNE_* environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubetune_operator.settings import OperatorSettings, load_settings
from pydantic import ValidationError


def test_defaults_need_no_file() -> None:
    s = load_settings(environ={})
    assert s == OperatorSettings()
    assert s.namespaces == []
    assert (s.master_port, s.trainer_metrics_port, s.health_port) == (29500, 9400, 8080)
    assert s.pricing.default_usd_per_gpu_hour == 2.0  # budgets guard something before prices are set


def test_a_file_in_camel_case_with_env_overrides_on_top(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(
        """
namespaces: [team-a]
images: {peft: reg/peft:1, full: reg/full:1}
defaultMemory: 64Gi
terminationGracePeriodSeconds: 900
pricing:
  defaultUsdPerGpuHour: 2.0
  byGpuProduct: {NVIDIA-H100-80GB-HBM3: 4.5}
"""
    )
    env = {
        "KUBETUNE_SETTINGS": str(path),
        "KUBETUNE_NAMESPACES": "team-b, ml-*",
        "KUBETUNE_IMAGES__FULL": "reg/full:2",
        "KUBETUNE_DEFAULT_CPU": "8",
        "KUBETUNE_PROGRESS_POLL_INTERVAL_SECONDS": "30",
        "KUBETUNE_PRICING__BY_INSTANCE_TYPE": '{"p5.48xlarge": 3.0}',
    }
    s = load_settings(environ=env)
    assert s.namespaces == ["team-b", "ml-*"]
    assert (s.images.peft, s.images.full) == ("reg/peft:1", "reg/full:2")
    assert (s.default_cpu, s.default_memory) == ("8", "64Gi")
    assert s.termination_grace_period_seconds == 900
    assert s.progress_poll_interval_seconds == 30.0
    assert s.pricing.default_usd_per_gpu_hour == 2.0
    assert s.pricing.by_gpu_product == {"NVIDIA-H100-80GB-HBM3": 4.5}
    assert s.pricing.by_instance_type == {"p5.48xlarge": 3.0}


def test_mistakes_are_refused_with_the_field_named(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("imagePullPolicy: Sometimes\n")
    with pytest.raises(ValidationError, match="imagePullPolicy"):
        load_settings(path, environ={})
    path.write_text("masterPorts: 1\n")
    with pytest.raises(ValidationError, match="masterPorts"):
        load_settings(path, environ={})
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_settings(path, environ={})
