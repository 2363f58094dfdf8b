"""Building blocks shared by the spec and status models: the base model and a few Kubernetes value types.

Each type carries the exact OpenAPI schema the CRD needs (`WithJsonSchema`), so the generator turns the
models into a structural schema without special cases.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, PlainSerializer, WithJsonSchema
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, snake_case in Python, unknown keys rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with second precision, the wire format of metav1.Time."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# A point in time as Kubernetes writes it ("2026-01-02T03:04:05Z"); naive datetimes are refused.
Time = Annotated[AwareDatetime, PlainSerializer(format_time, when_used="json")]

# A resource.Quantity: "64Gi", "500m", or a plain integer such as `cpu: 8`. The CEL rule attached to each
# quantity field (see validation.py) checks the syntax with a message that says what is allowed.
Quantity = Annotated[
    int | str,
    WithJsonSchema({"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}),
]

# An embedded core Kubernetes object (e.g. a NodeAffinity) kept as-is; the Pod API validates it when the
# operator creates the worker pods. Only used where retyping the core type would add nothing.
EmbeddedObject = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]

# "Fill in this group's defaults when the user omits it": on a field whose type is a model, the API server
# then stores the group with every default visible, instead of leaving it to the operator to guess.
DEFAULTED_GROUP: dict[str, Any] = {"default": {}}
