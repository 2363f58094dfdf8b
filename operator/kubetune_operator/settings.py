"""Operator settings: a YAML/JSON file (the Helm chart mounts one, path in $KUBETUNE_SETTINGS) plus env overrides.

File keys are camelCase, like the Helm values they come from. Any field can be overridden from the environment
as KUBETUNE_<FIELD>, nested fields joined by a double underscore: KUBETUNE_IMAGES__PEFT=...,
KUBETUNE_PRICING__DEFAULT_USD_PER_GPU_HOUR=2.5, KUBETUNE_NAMESPACES=team-a,team-b (lists: comma-separated
or JSON). Values are parsed as JSON when they parse, else taken as strings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from kubetune_operator.cost import Pricing

SETTINGS_ENV = "KUBETUNE_SETTINGS"
ENV_PREFIX = "KUBETUNE_"
DEFAULT_IMAGE = "ghcr.io/kubetune/kubetune-trainer:0.1.0"


class SettingsModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Images(SettingsModel):
    """Worker images by method; a job's spec.resources.image overrides them."""

    peft: str = Field(DEFAULT_IMAGE, description="Image for lora, qlora, dora, prefix, prompt and ia3.")
    full: str = Field(DEFAULT_IMAGE, description="Image for full fine-tuning.")


class OperatorSettings(SettingsModel):
    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces (or globs such as team-*) to watch; empty: all of them."
    )
    images: Images = Field(default_factory=Images)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    default_cpu: str | None = Field(None, description="CPU request of a worker whose job gives none.")
    default_memory: str | None = Field(None, description="Memory request and limit of a worker whose job gives none.")
    default_shm_size: str | None = Field(None, description="/dev/shm size limit of a worker whose job gives none.")
    termination_grace_period_seconds: int = Field(
        600, ge=30, description="Time a worker gets after SIGTERM to write its checkpoint before it is killed."
    )
    master_port: int = Field(29500, ge=1, le=65535, description="torchrun rendezvous port on rank 0.")
    rdzv_timeout_seconds: int = Field(
        900, ge=1, description="How long workers wait for each other (and for rank 0's name to resolve)."
    )
    trainer_metrics_port: int = Field(9400, ge=1, le=65535, description="Rank 0's /metrics and /progress port.")
    health_port: int = Field(8080, ge=0, le=65535, description="Operator /healthz and /readyz; 0 disables.")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Operator /metrics; 0 disables.")
    progress_poll_interval_seconds: float = Field(
        20.0,
        gt=0,
        description=(
            "How often an active job is re-reconciled; its rank 0's progress is polled every 0.75-1.5 times this "
            "(spread per job)."
        ),
    )
    figures_write_interval_seconds: float = Field(
        300.0,
        gt=0,
        description=(
            "How often a job's status is rewritten when only its running figures changed (cost so far, worker "
            "counts); any other change writes them along at once. The operator's metrics compute them when scraped."
        ),
    )
    resync_seconds: float = Field(
        600.0, gt=0, description="How often an idle job (finished, suspended) is re-reconciled to catch drift."
    )
    # 2: while a burst of jobs saturates the API server, more workers only lengthen each request (its latency
    # grows with the requests in flight) and pile pods up before the scheduler; no pod runs sooner (README, the
    # operator benchmark). A fleet of thousands of running jobs on a slow API server may want more.
    reconcile_workers: int = Field(
        2, ge=1, le=256, description="FineTuneJobs reconciled concurrently (each mostly waits on the API server)."
    )
    pricing: Pricing = Field(
        default_factory=Pricing, description="Prices per GPU-hour for cost tracking and budgets (USD)."
    )


def load_settings(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """Settings from `path` (default: $KUBETUNE_SETTINGS, if set) with KUBETUNE_* environment overrides."""
    env = os.environ if environ is None else environ
    path = path or env.get(SETTINGS_ENV)
    data: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
        data = loaded
    return OperatorSettings.model_validate(_with_env_overrides(OperatorSettings, data, env, ENV_PREFIX))


def _with_env_overrides(
    model: type[BaseModel], data: dict[str, Any], env: Mapping[str, str], prefix: str
) -> dict[str, Any]:
    out = dict(data)
    for name, field in model.model_fields.items():
        key = field.alias or name
        var = prefix + name.upper()
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested = out.get(key) or out.get(name) or {}
            merged = _with_env_overrides(annotation, nested, env, var + "__")
            if merged != nested:
                out.pop(name, None)
                out[key] = merged
        elif var in env:
            out.pop(name, None)
            out[key] = _parse_env_value(env[var], annotation)
    return out


def _parse_env_value(raw: str, annotation: Any) -> Any:
    """A string field takes the text as-is; a list takes JSON or comma-separated items; others take JSON."""
    if _accepts_text(annotation):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        if get_origin(annotation) is list:
            return [item.strip() for item in raw.split(",") if item.strip()]
        return raw


def _accepts_text(annotation: Any) -> bool:
    if annotation is str:
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return all(isinstance(arg, str) for arg in get_args(annotation))
    if origin in (Union, UnionType):
        return any(_accepts_text(arg) for arg in get_args(annotation))
    return False
