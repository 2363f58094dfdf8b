"""The FineTuneJob API (kubetune.io/v1alpha1): pydantic models, the single source of truth for the CRD.

Modules: spec (what to train), status (observed state and its pure helpers), resource (names and the
whole-object model), validation (every CEL rule), crd (the generator: `python -m kubetune_operator.api.crd`).
"""

from kubetune_operator.api.resource import (
    API_VERSION,
    CATEGORIES,
    CRD_NAME,
    GROUP,
    KIND,
    PLURAL,
    RERUN_ANNOTATION,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    FineTuneJob,
)
from kubetune_operator.api.spec import FineTuneJobSpec
from kubetune_operator.api.status import (
    MAX_RUN_HISTORY,
    AttemptRecord,
    Condition,
    FineTuneJobStatus,
    Phase,
    RunRecord,
    compute_phase,
    format_eta,
    get_condition,
    is_true,
    progress_percent,
    record_run,
    set_condition,
)

__all__ = [
    "API_VERSION",
    "CATEGORIES",
    "CRD_NAME",
    "GROUP",
    "KIND",
    "MAX_RUN_HISTORY",
    "PLURAL",
    "RERUN_ANNOTATION",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "AttemptRecord",
    "Condition",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "Phase",
    "RunRecord",
    "compute_phase",
    "format_eta",
    "get_condition",
    "is_true",
    "progress_percent",
    "record_run",
    "set_condition",
]
