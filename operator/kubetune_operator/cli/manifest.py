"""`kubectl finetune create`: a FineTuneJob manifest from flags, for the common case.

One table (FLAGS) says which flag sets which spec field; it drives the argument parser, the manifest and the
error messages, so a flag and its field cannot drift apart. The manifest holds only what was given (the API
server fills in the defaults), which keeps it short enough to review in git.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from kubetune_trainer.config import DatasetFormat, MethodType, Precision
from pydantic import ValidationError

from kubetune_operator.api import API_VERSION, KIND, FineTuneJob
from kubetune_operator.cli.errors import CliError

# A job needs a checkpoint schedule; this one applies when neither --every-steps nor --every-minutes is given.
DEFAULT_EVERY_STEPS = 200


def number(text: str) -> int | float:
    """A float flag's value, written as an integer when it is one (`epochs: 2`, not `epochs: 2.0`, in git)."""
    value = float(text)
    return int(value) if value.is_integer() else value


@dataclass(frozen=True)
class Flag:
    option: str
    path: str  # under spec, dotted camelCase
    help: str
    type: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    required: bool = False
    switch: bool = False  # a flag without a value that sets the field to true


FLAGS = (
    Flag("--model", "model.source", "base model: hf://ORG/NAME, pvc://CLAIM/PATH or s3://BUCKET/PATH", required=True),
    Flag("--revision", "model.revision", "hf:// only: branch, tag or commit to train from"),
    Flag("--hf-token-secret", "model.tokenSecretRef.name", "Secret (key `token`) with a Hugging Face token"),
    Flag("--dataset", "dataset.source", "training rows: a .jsonl/.json/.parquet file or directory", required=True),
    Flag("--format", "dataset.format", "row format", choices=get_args(DatasetFormat)),
    Flag("--eval-split", "dataset.evalSplit", "fraction of the rows held out for evaluation", number),
    Flag("--eval-dataset", "dataset.evalSource", "evaluation rows (instead of --eval-split)"),
    Flag("--max-seq-length", "dataset.maxSeqLength", "longest sequence in tokens", int),
    Flag("--method", "method.type", "fine-tuning method", choices=get_args(MethodType)),
    Flag("--lora-r", "method.lora.r", "LoRA rank (lora, qlora, dora)", int),
    Flag("--lora-alpha", "method.lora.alpha", "LoRA alpha (lora, qlora, dora)", int),
    Flag("--epochs", "training.epochs", "passes over the data", number),
    Flag("--max-steps", "training.maxSteps", "optimizer steps (wins over --epochs)", int),
    Flag("--lr", "training.learningRate", "peak learning rate", number),
    Flag("--batch-size", "training.batchSizePerDevice", "sequences per GPU per micro-batch", int),
    Flag("--grad-accum", "training.gradientAccumulationSteps", "micro-batches per optimizer step", int),
    Flag("--precision", "training.precision", "compute precision", choices=get_args(Precision)),
    Flag("--nodes", "resources.numNodes", "worker pods (nodes) training together", int),
    Flag("--gpus", "resources.gpusPerNode", "GPUs per node (0: CPU only)", int),
    Flag("--gpu-product", "resources.gpuProduct", "only nodes labelled nvidia.com/gpu.product=THIS"),
    Flag("--queue", "resources.queueName", "Kueue LocalQueue to submit to"),
    Flag("--checkpoint-claim", "checkpoint.claimName", "existing PVC for checkpoints", required=True),
    Flag("--every-steps", "checkpoint.everySteps", f"checkpoint every N steps (default {DEFAULT_EVERY_STEPS})", int),
    Flag("--every-minutes", "checkpoint.everyMinutes", "checkpoint every N minutes", int),
    Flag("--keep-last", "checkpoint.keepLast", "checkpoints kept per run", int),
    Flag("--output-claim", "output.claimName", "PVC for the trained output (default: the checkpoint claim)"),
    Flag("--merge-adapter", "output.mergeAdapter", "also write the base model with the adapter merged", switch=True),
    Flag("--max-restarts", "runPolicy.maxRestarts", "attempts after failures before the run fails", int),
    Flag("--max-cost", "budget.maxCostUSD", "stop the run (checkpointed) past this many US dollars", number),
    Flag("--suspend", "runPolicy.suspend", "create it suspended; start it with `kubectl finetune resume`", switch=True),
)


def _dest(flag: Flag) -> str:
    return flag.option.removeprefix("--").replace("-", "_")


def add_flags(parser: argparse.ArgumentParser) -> None:
    for flag in FLAGS:
        if flag.switch:
            parser.add_argument(flag.option, dest=_dest(flag), action="store_true", default=None, help=flag.help)
        else:
            parser.add_argument(
                flag.option,
                dest=_dest(flag),
                type=flag.type,
                choices=flag.choices,
                required=flag.required,
                metavar=None if flag.choices else _dest(flag).upper(),
                help=flag.help,
            )


def build(name: str, namespace: str | None, values: dict[str, Any]) -> dict[str, Any]:
    """The manifest for `name` from the flag values (by argparse dest; None means not given), validated by the
    API models. Rules the API server checks with CEL (e.g. --gpu-product needs GPUs) are left to the server."""
    spec: dict[str, Any] = {}
    for flag in FLAGS:
        value = values.get(_dest(flag))
        if value is None:
            continue
        *parents, leaf = flag.path.split(".")
        node = spec
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    checkpoint = spec["checkpoint"]
    if "everySteps" not in checkpoint and "everyMinutes" not in checkpoint:
        checkpoint["everySteps"] = DEFAULT_EVERY_STEPS
    metadata = {"name": name, **({"namespace": namespace} if namespace else {})}
    manifest = {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}
    try:
        FineTuneJob.model_validate(manifest)
    except ValidationError as e:
        raise CliError(f"invalid FineTuneJob: {'; '.join(_explain(err) for err in e.errors())}") from e
    return manifest


def _explain(error: Any) -> str:
    """One validation error, named by the flag that set the field when there is one."""
    path = ".".join(str(part) for part in error["loc"][1:]) if error["loc"][:1] == ("spec",) else ""
    flag = next((f.option for f in FLAGS if f.path == path), None)
    return f"{flag or 'spec.' + path}: {error['msg']}"
