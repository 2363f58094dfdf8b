"""Sharded memory benchmark: models whose training state is at least twice one rank's peak memory train under
FSDP2 on 4 CPU ranks (gloo), full fine-tuning and LoRA, and resume exactly.

    python bench/sharded_memory.py                          # what `make bench-sharded` runs (24 min on 2 cores)
    python bench/sharded_memory.py --full 512 4 --lora 512 8  # small shapes (hidden size, layers): a quick look

For each method, a random-weight Llama built from a config (tests/trainer/trainer_assets.wide_llama_dir: nothing is
downloaded; by default hidden size 1024, 40 layers for full fine-tuning, 144 for LoRA) is trained for 2 optimizer
steps of 4 sequences of at most 64 tokens, in fp32, with gradient checkpointing (the activations of 144 layers would
otherwise weigh as much as a rank's share of the weights), through kubetune-launch:
- with 4 ranks under FSDP2 (`sharding: fsdp`), one sequence per rank, a checkpoint after each step;
- with 1 process, the 4 sequences accumulated (nothing sharded): the unsharded figure.

The memory figure judged is each process's whole peak RSS (ru_maxrss: the Python runtime and torch, the weights,
gradients, optimizer state, activations, loading and the checkpoint saves) once the training steps are done, as
the run manifest records it (`memory[rank].peakRssBytesTrained`). Also printed, not judged: the part of it the
model added (that minus the peak before the model was built), and the peak after the export (rank 0 of a sharded
full fine-tune gathers the whole weights to write them).

The unsharded training state is 4 bytes a parameter for the weights (fp32), plus 12 for each trainable one (its
gradient and two AdamW moments): 16 bytes a parameter for full fine-tuning, about 4 for LoRA (the frozen base).

Criteria, per method (PASS/FAIL each; exit code 1 when any fails):
- every rank's peak RSS is below 60% of the 1-process peak;
- the unsharded training state is at least 2x the largest rank's peak RSS;
- the 4 ranks' losses are the 1-process run's (relative 1e-4: only the order of sums differs);
- resume: the step-2 checkpoint of the 4-rank run removed, a rerun resumes from step 1, and its step-2 loss and
  final weights (adapter for LoRA) equal the uninterrupted run's bit for bit.

Models and runs go to a temporary directory under $KUBETUNE_CACHE/bench (~/.cache/kubetune/bench), removed at the
end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "trainer"))

import trainer_assets as assets  # noqa: E402

STEPS = 2
SEQUENCES = 4  # per optimizer step
MAX_SHARE = 0.60  # of the 1-process peak, for every rank
MIN_STATE_RATIO = 2.0  # unsharded training state / the largest rank's peak
LOSS_RTOL = 1e-4  # 4 ranks against 1 process, as tests/trainer/test_distributed.py


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def state_bytes(parameters: int, trainable: int) -> int:
    """Unsharded training state: fp32 weights, and a gradient and two AdamW moments for each trainable weight."""
    return 4 * parameters + 12 * trainable


@dataclass
class Figures:
    """One method's memory figures, from the run manifests."""

    method: str
    parameters: int
    trainable: int
    ranks: list[dict[str, int]]  # manifest "memory" of the sharded run, one entry per rank
    single: dict[str, int]  # the same of the 1-process run

    @property
    def state(self) -> int:
        return state_bytes(self.parameters, self.trainable)

    @property
    def largest(self) -> int:
        return max(m["peakRssBytesTrained"] for m in self.ranks)


@dataclass
class Verdict:
    criterion: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.criterion}: {self.detail}"


def memory_verdicts(f: Figures) -> list[Verdict]:
    single = f.single["peakRssBytesTrained"]
    share = f.largest / single
    ratio = f.state / f.largest
    return [
        Verdict(
            f"{f.method}: every rank's peak RSS < {MAX_SHARE:.0%} of the 1-process peak",
            share < MAX_SHARE,
            f"largest rank {gib(f.largest)} = {share:.2f} x {gib(single)}",
        ),
        Verdict(
            f"{f.method}: unsharded training state >= {MIN_STATE_RATIO:g}x the largest rank's peak RSS",
            ratio >= MIN_STATE_RATIO,
            f"{gib(f.state)} = {ratio:.2f} x {gib(f.largest)}",
        ),
    ]


def loss_verdict(method: str, sharded: dict[int, float], single: dict[int, float]) -> Verdict:
    close = sharded.keys() == single.keys() and all(
        abs(sharded[s] - single[s]) <= LOSS_RTOL * abs(single[s]) for s in single
    )
    return Verdict(
        f"{method}: the 4 ranks' losses are the 1-process run's (rel {LOSS_RTOL:g})",
        close,
        f"{_losses(sharded)} against {_losses(single)}",
    )


def resume_verdict(
    method: str, resumed_from: int | None, loss: float | None, expected: float, differing: list[str]
) -> Verdict:
    ok = resumed_from == STEPS - 1 and loss == expected and not differing
    detail = f"resumed from step {resumed_from}; step-{STEPS} loss {loss!r} against {expected!r}; " + (
        f"{len(differing)} differing tensor(s): {', '.join(differing[:3])}" if differing else "weights bitwise equal"
    )
    return Verdict(f"{method}: resume from step {STEPS - 1} ends as the uninterrupted run", ok, detail)


def _losses(by_step: dict[int, float]) -> str:
    return "[" + ", ".join(f"{by_step[s]:.6f}" for s in sorted(by_step)) + "]"


def table(f: Figures) -> str:
    """The memory figures of one method, a line per process."""
    per_param = f.state / f.parameters
    lines = [
        f"{f.method}: {f.parameters:,} parameters ({f.trainable:,} trainable); unsharded training state "
        f"{gib(f.state)} ({per_param:.1f} bytes a parameter)",
        f"  {'process':<22}{'params held':>13}{'at load':>11}{'peak RSS*':>12}{'/1 process':>12}{'state/peak':>12}"
        f"{'model part':>12}{'after export':>14}",
    ]
    single = f.single["peakRssBytesTrained"]
    rows = [("1 process (unsharded)", f.single)] + [(f"4 ranks: rank {r}", m) for r, m in enumerate(f.ranks)]
    for name, m in rows:
        peak = m["peakRssBytesTrained"]
        lines.append(
            f"  {name:<22}{gib(m['parameterBytes']):>13}{gib(m['peakRssBytesAtLoad']):>11}{gib(peak):>12}"
            f"{peak / single:>12.2f}{f.state / peak:>12.2f}{gib(peak - m['peakRssBytesBeforeModel']):>12}"
            f"{gib(m['peakRssBytesExported']):>14}"
        )
    lines.append(
        "  * judged: the whole process's peak RSS (ru_maxrss) once the training steps are done. Not judged: 'at load'"
        " the peak once the model was built, 'model part' the judged peak minus the peak before the model was built,"
        " 'after export' the whole peak at the end."
    )
    return "\n".join(lines)


def differing_tensors(a: Path, b: Path) -> list[str]:
    """Names of the tensors in the *.safetensors files of two output directories that are not bitwise equal (or
    are in one only); read one tensor at a time."""
    import torch
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in sorted(d.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                found.update(dict.fromkeys(f.keys(), path))
        return found

    left, right = where(a), where(b)
    differing = sorted(left.keys() ^ right.keys())
    for name in sorted(left.keys() & right.keys()):
        with safe_open(left[name], framework="pt") as fa, safe_open(right[name], framework="pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                differing.append(name)
    return sorted(differing)


def say(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", flush=True)


def method_section(method: str) -> dict[str, Any]:
    if method == "full":
        return {"type": "full", "full": {"sharding": "fsdp"}}
    return {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "sharding": "fsdp"}}


def build_model(where: Path, hidden: int, layers: int) -> Path:
    """assets.wide_llama_dir in a process of its own: the memory of building a model this size stays with it."""
    code = (
        "import sys; from pathlib import Path; import trainer_assets as a; "
        "a.wide_llama_dir(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))"
    )
    path = os.pathsep.join([str(Path(assets.__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    subprocess.run([sys.executable, "-c", code, str(where), str(hidden), str(layers)], env=env, check=True)
    return where


def launch(where: Path, model: Path, data: Path, method: str, ranks: int, timeout: float) -> dict[str, Any]:
    """Train through kubetune-launch with `ranks` local processes; the run manifest."""
    cfg = assets.trainer_config(
        where,
        model,
        data,
        method=method_section(method),
        dataset={"maxSeqLength": 64, "evalSplit": 0.0},
        training={
            "maxSteps": STEPS,
            "logEverySteps": 1,
            "learningRate": 1e-4,
            "batchSizePerDevice": 1,
            "gradientAccumulationSteps": SEQUENCES // ranks,
            "gradientCheckpointing": True,
        },
        checkpoint={"everySteps": 1, "keepLast": STEPS},
    )
    start = time.monotonic()
    done = assets.run_launcher(where, assets.write_config(where, cfg), nproc=ranks, timeout=timeout)
    (where / "launcher.log").write_text(done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{method} with {ranks} process(es) exited {done.returncode}:\n{done.stderr[-4000:]}")
    manifest: dict[str, Any] = json.loads((where / "out" / "manifest.json").read_text())
    say(f"{method}, {ranks} process(es): done in {time.monotonic() - start:.0f} s")
    return manifest


def bench_method(method: str, shape: tuple[int, int], work: Path, data: Path, timeout: float) -> list[Verdict]:
    hidden, layers = shape
    say(f"{method}: building a random Llama, hidden {hidden}, {layers} layers")
    model = build_model(work / "model", hidden, layers)

    one = work / "one"
    single = launch(one, model, data, method, 1, timeout)
    single_losses = assets.losses_by_step(one / "out")
    shutil.rmtree(one)  # its checkpoint and outputs: the size of the model and more

    four = work / "four"
    sharded = launch(four, model, data, method, SEQUENCES, timeout)
    losses = assets.losses_by_step(four / "out")
    counts = sharded["parameters"]
    figures = Figures(method, counts["total"], counts["trainable"], sharded["memory"], single["memory"][0])
    print(table(figures), flush=True)

    uninterrupted = work / "uninterrupted"
    (four / "out").rename(uninterrupted)
    shutil.rmtree(assets.checkpoint_at(four / "ckpt", STEPS))
    resumed = launch(four, model, data, method, SEQUENCES, timeout)
    verdicts = [
        *memory_verdicts(figures),
        loss_verdict(method, losses, single_losses),
        resume_verdict(
            method,
            resumed["resumedFromStep"],
            assets.losses_by_step(four / "out").get(STEPS),
            losses[STEPS],
            differing_tensors(four / "out", uninterrupted),
        ),
    ]
    for v in verdicts:
        print(v.line(), flush=True)
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", nargs=2, type=int, default=[1024, 40], metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--lora", nargs=2, type=int, default=[1024, 144], metavar=("HIDDEN", "LAYERS"))
    parser.add_argument("--methods", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per training run")
    parser.add_argument("--keep", action="store_true", help="keep the models and runs")
    args = parser.parse_args(argv)

    import torch

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    root = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune")) / "bench"
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sharded-memory-", dir=root))
    say(
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, gloo; load average {os.getloadavg()[0]:.1f}; "
        f"working in {work}"
    )
    verdicts: list[Verdict] = []
    try:
        data = assets.write_jsonl(work / "train.jsonl", assets.rows(160, "prompt_completion"))
        for method in args.methods:
            verdicts += bench_method(method, tuple(getattr(args, method)), work / method, data, args.timeout)
            if not args.keep:
                shutil.rmtree(work / method)
    except (RuntimeError, subprocess.SubprocessError) as e:
        verdicts.append(Verdict("every run finished", False, str(e)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    say(f"load average {os.getloadavg()[0]:.1f}")
    print("\n" + "\n".join(v.line() for v in verdicts))
    failed = [v for v in verdicts if not v.ok]
    print(f"{'FAIL' if failed else 'PASS'}: {len(verdicts) - len(failed)}/{len(verdicts)} criteria met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
