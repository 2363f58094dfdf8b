"""The FineTuneJob resource: its names in the API and the whole-object model."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kubetune_operator.api.common import ApiModel
from kubetune_operator.api.spec import FineTuneJobSpec
from kubetune_operator.api.status import FineTuneJobStatus

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
CATEGORIES = ("kubetune",)
CRD_NAME = f"{PLURAL}.{GROUP}"

# Changing this annotation's value (any token, e.g. a timestamp) starts a new run without a spec change.
RERUN_ANNOTATION = f"{GROUP}/rerun"


class FineTuneJob(ApiModel):
    """FineTuneJob fine-tunes a large language model (LoRA, QLoRA, DoRA, prefix/prompt tuning, IA3 or full
    fine-tuning) on one or more GPU nodes, checkpointing to persistent volumes and resuming after failures.
    Each spec generation (or kubetune.io/rerun token) is trained once, as a run."""

    api_version: str = Field(API_VERSION, description="kubetune.io/v1alpha1")
    kind: str = Field(KIND, description="FineTuneJob")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="The fine-tuning to run.")
    status: FineTuneJobStatus | None = Field(None, description="The observed state, written by the operator.")
