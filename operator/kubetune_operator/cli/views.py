"""Pure text views of FineTuneJobs: the `list` and `cost` tables, `describe`, and `watch`'s progress line.

Input is each object exactly as the API server returns it (a dict), read leniently, so a status field added by
a newer operator never breaks an older CLI. `now` is a parameter, so every view is deterministic in tests.
"""

from __future__ import annotations

import itertools
import json
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import yaml
from kubetune_trainer.samples import SAMPLE_LOG_PREFIX
from pydantic import ValidationError

from kubetune_operator.api import RERUN_ANNOTATION, FineTuneJobSpec, format_eta
from kubetune_operator.api.spec import DEFAULT_CHECKPOINT_MINUTES
from kubetune_operator.api.status import SetupProgress, setup_text
from kubetune_operator.names import claim_name
from kubetune_operator.storage import output_claim, output_uri, outputs_on_checkpoint_claim

Obj = Mapping[str, Any]
NONE = "-"
COLUMN_GAP = "   "  # as kubectl's tables
TERMINAL_PHASES = ("Succeeded", "Failed")


def dig(obj: Obj | None, *path: str) -> Any:
    """obj[path[0]][path[1]]..., or None where any step is missing."""
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns, as `kubectl get` prints them."""
    body = [list(r) for r in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *body, strict=True)]
    return "\n".join(
        COLUMN_GAP.join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [list(headers), *body]
    )


def shown(obj: Obj) -> dict[str, Any]:
    """The object (or List) without metadata.managedFields: noise to a human, which kubectl hides too."""
    out = dict(obj)
    if isinstance(out.get("metadata"), Mapping):
        out["metadata"] = {k: v for k, v in out["metadata"].items() if k != "managedFields"}
    if isinstance(out.get("items"), list):
        out["items"] = [shown(item) for item in out["items"]]
    return out


def dump(doc: Obj, fmt: str) -> str:
    """-o json or -o yaml."""
    if fmt == "json":
        return json.dumps(shown(doc), indent=2)
    return yaml.safe_dump(shown(doc), sort_keys=False).rstrip("\n")


# ----------------------------------------------------------------------------------------------
# values


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def age(value: str | None, now: datetime) -> str:
    """How long ago an RFC 3339 time was, e.g. 5m30s."""
    then = parse_time(value)
    return format_eta((now - then).total_seconds()) if then else NONE


def ago(value: str | None, now: datetime) -> str:
    then = age(value, now)
    return then if then == NONE else f"{then} ago"


def duration(start: str | None, end: str | None) -> str:
    begun, ended = parse_time(start), parse_time(end)
    return format_eta((ended - begun).total_seconds()) if begun and ended else NONE


def number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and math.isfinite(value) else NONE


def usd(value: Any) -> str:
    return f"${value:,.2f}" if isinstance(value, int | float) else NONE


def rate(tokens_per_second: Any) -> str:
    """48210.5 -> 48.2k tok/s."""
    if not isinstance(tokens_per_second, int | float):
        return NONE
    for threshold, suffix in ((1e6, "M"), (1e3, "k")):
        if tokens_per_second >= threshold:
            return f"{tokens_per_second / threshold:.1f}{suffix} tok/s"
    return f"{tokens_per_second:.0f} tok/s"


def steps(progress: Obj | None) -> str:
    """1200/4000 (30%), or just the step while the total is unknown."""
    step, total, percent = dig(progress, "step"), dig(progress, "totalSteps"), dig(progress, "percent")
    if step is None:
        return NONE
    if total is None:
        return str(step)
    return f"{step}/{total} ({percent if percent is not None else step * 100 // max(total, 1)}%)"


def gpus(spec: Obj | None) -> str:
    """2x8 (nodes x GPUs per node); CPU for a job without GPUs."""
    nodes, per_node = dig(spec, "resources", "numNodes") or 1, dig(spec, "resources", "gpusPerNode")
    if per_node == 0:
        return f"{nodes}xCPU"
    return f"{nodes}x{per_node if per_node is not None else 1}"


def phase(job: Obj) -> str:
    return dig(job, "status", "phase") or NONE


def eta(job: Obj) -> str:
    """The ETA only while it means something: the job is training."""
    if phase(job) != "Running":
        return NONE
    return dig(job, "status", "progress", "eta") or NONE


# ----------------------------------------------------------------------------------------------
# list and cost


def list_table(jobs: Sequence[Obj], *, now: datetime, all_namespaces: bool, wide: bool) -> str:
    headers = ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA", "COST", "AGE"]
    if wide:
        headers += ["EVAL LOSS", "RUN", "ATTEMPT", "METHOD", "GPUS", "PROJECTED", "MODEL"]
    rows = []
    for job in jobs:
        meta, status, spec = job["metadata"], job.get("status") or {}, job.get("spec") or {}
        row = [
            meta["name"],
            phase(job),
            steps(status.get("progress")),
            number(dig(status, "progress", "loss")),
            eta(job),
            usd(dig(status, "cost", "usd")),
            age(meta.get("creationTimestamp"), now),
        ]
        if wide:
            row += [
                number(dig(status, "progress", "evalLoss")),
                str(status.get("run") or NONE),
                str(status.get("attempt") or NONE),
                dig(spec, "method", "type") or NONE,
                gpus(spec),
                usd(dig(status, "cost", "projectedUSD")),
                dig(spec, "model", "source") or NONE,
            ]
        rows.append([meta["namespace"], *row] if all_namespaces else row)
    return table(["NAMESPACE", *headers] if all_namespaces else headers, rows)


def cost_table(jobs: Sequence[Obj], *, all_namespaces: bool) -> str:
    """Spend of each job's current run and of all its runs, then totals per namespace (and overall, for several
    namespaces)."""
    headers = ["NAME", "PHASE", "GPUS", "GPU-HOURS", "COST", "PROJECTED", "BUDGET", "RUNS", "ALL RUNS"]
    rows = []
    totals: dict[str, list[float]] = {}
    for job in jobs:
        meta, status, spec = job["metadata"], job.get("status") or {}, job.get("spec") or {}
        cost = status.get("cost") or {}
        spent = all_runs_usd(status)
        row = [
            meta["name"],
            phase(job),
            gpus(spec),
            number(cost.get("gpuHours"), 1),
            usd(cost.get("usd")),
            usd(cost.get("projectedUSD")),
            usd(dig(spec, "budget", "maxCostUSD")),
            str(len(status.get("runs") or [])),
            usd(spent),
        ]
        rows.append([meta["namespace"], *row] if all_namespaces else row)
        total = totals.setdefault(meta["namespace"], [0, 0.0, 0.0, 0.0, 0.0])
        total[0] += 1
        for i, key in enumerate(("gpuHours", "usd", "projectedUSD"), start=1):
            total[i] += cost.get(key) or 0.0
        total[4] += spent or 0.0
    by_namespace = [
        [namespace, str(int(n)), number(hours, 1), usd(spent), usd(projected), usd(everything)]
        for namespace, (n, hours, spent, projected, everything) in sorted(totals.items())
    ]
    if len(by_namespace) > 1:
        sums = [sum(column) for column in zip(*totals.values(), strict=True)]
        by_namespace.append(["TOTAL", str(int(sums[0])), number(sums[1], 1), usd(sums[2]), usd(sums[3]), usd(sums[4])])
    jobs_table = table(["NAMESPACE", *headers] if all_namespaces else headers, rows)
    totals_table = table(["NAMESPACE", "JOBS", "GPU-HOURS", "COST", "PROJECTED", "ALL RUNS"], by_namespace)
    return f"{jobs_table}\n\n{totals_table}"


def all_runs_usd(status: Obj) -> float | None:
    """What the runs in status.runs cost together: the current run as status.cost says, the others by their
    record. None when none has a figure."""
    figures = [
        dig(status, "cost", "usd") if r.get("run") == status.get("run") else r.get("costUSD")
        for r in status.get("runs") or []
    ]
    known = [f for f in figures if isinstance(f, int | float)]
    return sum(known) if known else None


# ----------------------------------------------------------------------------------------------
# describe


def _fields(pairs: Iterable[tuple[str, str | None]]) -> list[str]:
    kept = [(label, value) for label, value in pairs if value]
    width = max((len(label) for label, _ in kept), default=0) + 2
    return [f"{label + ':':<{width}}{value}" for label, value in kept]


def _section(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> list[str]:
    if not rows:
        return [f"{title}:", f"  {empty}"]
    return [f"{title}:", *("  " + line for line in table(headers, rows).splitlines())]


def _join(*parts: str | None) -> str:
    return ", ".join(p for p in parts if p)


def _model(spec: Obj) -> str:
    source, revision = dig(spec, "model", "source") or NONE, dig(spec, "model", "revision")
    return f"{source} @ {revision}" if revision else source


def _dataset(spec: Obj) -> str:
    d = spec.get("dataset") or {}
    evaluation = (
        f"eval {d['evalSource']}"
        if d.get("evalSource")
        else f"eval split {d['evalSplit']}"
        if d.get("evalSplit")
        else None
    )
    return _join(
        d.get("source") or NONE,
        d.get("format"),
        evaluation,
        f"max {d['maxSeqLength']} tokens" if d.get("maxSeqLength") else None,
        "packed" if d.get("packing") else None,
    )


def _method(spec: Obj) -> str:
    method = spec.get("method") or {}
    kind = method.get("type") or "lora"
    settings = method.get("lora" if kind in ("lora", "qlora", "dora") else kind) or {}
    if kind in ("lora", "qlora", "dora"):
        targets = ",".join(settings.get("targetModules") or [])
        detail = _join(
            f"r={settings['r']}" if "r" in settings else None,
            f"alpha={settings['alpha']}" if "alpha" in settings else None,
            f"targets {targets}" if targets else None,
        )
    elif kind in ("prefix", "prompt"):
        detail = f"{settings['numVirtualTokens']} virtual tokens" if "numVirtualTokens" in settings else ""
    elif kind == "full":
        detail = f"sharding {settings['sharding']}" if "sharding" in settings else ""
    else:
        detail = ""
    return f"{kind} ({detail})" if detail else kind


def _training(spec: Obj) -> str:
    t = spec.get("training") or {}
    length = f"{t['maxSteps']} steps" if t.get("maxSteps") else f"{t['epochs']:g} epochs" if t.get("epochs") else None
    batch = None
    if t.get("batchSizePerDevice"):
        accumulation = t.get("gradientAccumulationSteps") or 1
        batch = f"batch {t['batchSizePerDevice']}/device" + (
            f" x {accumulation} accumulated" if accumulation > 1 else ""
        )
    return _join(length, f"lr {t['learningRate']:g}" if t.get("learningRate") else None, batch, t.get("precision"))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _resources(spec: Obj) -> str:
    r = spec.get("resources") or {}
    nodes, per_node = r.get("numNodes") or 1, r.get("gpusPerNode", 1)
    queue = f", Kueue queue {r['queueName']}" if r.get("queueName") else ""
    if per_node == 0:
        return f"{_plural(nodes, 'node')}, CPU only{queue}"
    product = f" ({r['gpuProduct']})" if r.get("gpuProduct") else ""
    return f"{_plural(nodes, 'node')} x {_plural(per_node, 'GPU')}{product} = {_plural(nodes * per_node, 'GPU')}{queue}"


def _checkpoints(meta: Obj, spec: Obj) -> str:
    c = spec.get("checkpoint") or {}
    if c.get("claimName"):
        claim = f"claim {c['claimName']}"
    else:
        outputs = not dig(spec, "output", "claimName")
        whose = "kept when the job is deleted: it holds the outputs" if outputs else "deleted with the job"
        claim = f"claim {claim_name(meta['name'])} from volumeClaimTemplate ({whose})"
    every = (
        " or ".join(
            s
            for s in (
                f"{c['everySteps']} steps" if c.get("everySteps") else "",
                f"{c['everyMinutes']} min" if c.get("everyMinutes") else "",
            )
            if s
        )
        or f"{DEFAULT_CHECKPOINT_MINUTES} min (default)"
    )
    return _join(claim, f"every {every}", f"keep {c['keepLast']}" if c.get("keepLast") else None)


def _policy(spec: Obj) -> str:
    p = spec.get("runPolicy") or {}
    return _join(
        f"max {p['maxRestarts']} restarts" if "maxRestarts" in p else None,
        f"stall timeout {format_eta(p['stallTimeoutSeconds'])}" if p.get("stallTimeoutSeconds") else None,
        f"deadline {format_eta(p['activeDeadlineSeconds'])}" if p.get("activeDeadlineSeconds") else None,
        "SUSPENDED" if p.get("suspend") else None,
    )


def _budget(spec: Obj) -> str | None:
    b = spec.get("budget") or {}
    return _join(
        f"{usd(b['maxCostUSD'])} max" if b.get("maxCostUSD") else None,
        f"{b['maxGpuHours']:g} GPU-hours max" if b.get("maxGpuHours") else None,
    )


def _cost(status: Obj, spec: Obj) -> str | None:
    cost = status.get("cost") or {}
    if not cost:
        return None
    limit = dig(spec, "budget", "maxCostUSD")
    used = f"{cost.get('usd', 0) / limit:.0%} of the {usd(limit)} budget" if limit and "usd" in cost else None
    return _join(
        f"{number(cost['gpuHours'], 1)} GPU-hours" if "gpuHours" in cost else None,
        f"{usd(cost['usd'])} so far" if "usd" in cost else None,
        f"{usd(cost['projectedUSD'])} projected" if "projectedUSD" in cost else None,
        used,
    )


def _progress(status: Obj, now: datetime) -> str | None:
    p = status.get("progress") or {}
    if not p:
        return None
    return _join(
        _setup(p),
        f"step {steps(p)}",
        f"epoch {p['epoch']:.2f}" if p.get("epoch") is not None else None,
        f"loss {number(p['loss'])}" if p.get("loss") is not None else None,
        f"eval loss {number(p['evalLoss'])}" if p.get("evalLoss") is not None else None,
        rate(p["tokensPerSecond"]) if p.get("tokensPerSecond") is not None else None,
        f"MFU {p['mfu']:.0%}" if p.get("mfu") is not None else None,
        f"ETA {p['eta']}" if p.get("eta") and status.get("phase") == "Running" else None,
        f"updated {ago(p['updatedAt'], now)}" if p.get("updatedAt") else None,
    )


def data_report(status: Obj) -> str | None:
    """The data report's summary in one line (data-report.json in the output names every row)."""
    d = dig(status, "progress", "dataReport")
    if not d:
        return None
    rows = d.get("rows") or 0

    def share(n: Any) -> str:
        return f"{n} ({n / rows:.1%})" if rows and n else str(n or 0)

    return _join(
        f"{rows:,} rows",
        f"{d.get('tokens', 0):,} tokens",
        f"length p50 {d.get('lengthP50')} / p99 {d.get('lengthP99')} / max {d.get('lengthMax')}",
        f"{share(d.get('truncatedRows'))} truncated",
        f"{share(d.get('skippedRows'))} skipped",
        f"{share(d.get('exactDuplicateRows'))} exact and {share(d.get('nearDuplicateRows'))} near duplicates",
        f"{d.get('leakedRows', 0)} of {d.get('evaluationRows', 0)} evaluation rows leaked",
    )


def _workers(status: Obj) -> str | None:
    w = status.get("workers")
    if not w:
        return None
    return ", ".join(f"{w.get(k, 0)} {k}" for k in ("active", "ready", "succeeded", "failed"))


def _setup(progress: Obj) -> str | None:
    try:
        setup = SetupProgress.model_validate(progress["setup"]) if progress.get("setup") else None
    except ValidationError:
        return None
    return f"setting up: {setup_text(setup)}" if setup else None


def _checkpoint(status: Obj, now: datetime) -> str | None:
    c = status.get("checkpoint") or {}
    ignored = len(c.get("ignored") or [])
    others = f"{ignored} not this training's, left untouched (condition CheckpointsIgnored)" if ignored else None
    if not c.get("latest"):
        return others
    saved = f", saved {ago(c['savedAt'], now)}" if c.get("savedAt") else ""
    return _join(f"{c['latest']} (step {c.get('step', NONE)}{saved})", others)


def _output(meta: Obj, spec: Obj, status: Obj) -> str | None:
    """Where the latest output is, or where the current run's will be, and that it outlives the job."""
    try:
        parsed: FineTuneJobSpec | None = FineTuneJobSpec.model_validate(spec)
    except ValidationError:
        parsed = None
    home = None
    if parsed is not None:
        claim = output_claim(meta["name"], parsed)
        created = outputs_on_checkpoint_claim(meta["name"], parsed) and parsed.checkpoint.volume_claim_template
        home = (
            f"kept when the job is deleted: claim {claim} was created for it without an owner; delete the claim once "
            "the output is safe"
            if created
            else f"kept when the job is deleted: claim {claim} is not the job's"
        )
    o, run = status.get("output") or {}, status.get("run")
    current = next((r for r in status.get("runs") or [] if r.get("run") == run), None)
    if current is not None and current.get("result") is None and parsed is not None and meta.get("uid") and run:
        upcoming = output_uri(meta["namespace"], meta["name"], meta["uid"], parsed, run)
        latest = f"; the latest finished output is {o['path']}" if o.get("path") else ""
        return f"{upcoming} when run {run} finishes ({home}){latest}"
    if not o.get("path"):
        return None
    verdict = None
    if o.get("promoted") is not None:
        verdict = "promoted" if o["promoted"] else "not promoted: it failed the evaluation gate"
    notes = _join(verdict, home)
    return f"{o['path']} ({notes})" if notes else str(o["path"])


EVALUATION_HEADERS = ("SET", "LOSS", "BASE LOSS", "CHANGE", "GATE")


def change(value: Any) -> str:
    """A relative change against the base model, e.g. +12.3% (worse) or -40.0% (better)."""
    return f"{100 * value:+.1f}%" if isinstance(value, int | float) and math.isfinite(value) else NONE


def evaluation_rows(spec: Obj, status: Obj) -> list[list[str]]:
    """The evaluation split and each evaluation set at the latest evaluation, against the base model, with the
    gate that applies to each."""
    p = status.get("progress") or {}
    evaluation = spec.get("evaluation") or {}
    rows = []
    if p.get("evalLoss") is not None or p.get("baseEvalLoss") is not None:
        loss, base = p.get("evalLoss"), p.get("baseEvalLoss")
        relative = (loss - base) / base if loss is not None and base else None
        limit = evaluation.get("maxEvalLoss")
        gate = f"loss <= {limit:g}" if limit is not None else NONE
        rows.append(["(eval split)", number(loss), number(base), change(relative), gate])
    reported = {r.get("name"): r for r in p.get("evalSets") or []}
    for s in evaluation.get("sets") or []:
        r = reported.get(s.get("name"), {})
        limit = s.get("maxIncrease")
        gate = f"change <= {100 * limit:+g}%" if limit is not None else NONE
        rows.append(
            [s.get("name", NONE), number(r.get("loss")), number(r.get("baseLoss")), change(r.get("change")), gate]
        )
    return rows


def _event_time(event: Obj) -> str:
    return str(
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or dig(event, "metadata", "creationTimestamp")
        or ""
    )


def describe(job: Obj, events: Sequence[Obj], *, now: datetime, max_events: int = 15) -> str:
    meta, spec, status = job["metadata"], job.get("spec") or {}, job.get("status") or {}
    run, attempt = status.get("run"), status.get("attempt")
    where = f" (run {run}, attempt {attempt})" if run else ""
    lines = _fields(
        [
            ("Name", meta["name"]),
            ("Namespace", meta["namespace"]),
            ("Created", f"{meta.get('creationTimestamp')} ({ago(meta.get('creationTimestamp'), now)})"),
            ("Phase", f"{phase(job)}{where}" if status.get("phase") else "- (no status yet: is the operator running?)"),
            ("Model", _model(spec)),
            ("Dataset", _dataset(spec)),
            ("Method", _method(spec)),
            ("Training", _training(spec)),
            ("Resources", _resources(spec)),
            ("Checkpoints", _checkpoints(meta, spec)),
            ("Run policy", _policy(spec)),
            ("Budget", _budget(spec)),
            ("Data", data_report(status)),
            ("Progress", _progress(status, now)),
            ("Workers", _workers(status)),
            ("Checkpoint", _checkpoint(status, now)),
            ("Cost", _cost(status, spec)),
            ("Output", _output(meta, spec, status)),
        ]
    )
    conditions = [
        [
            c.get("type", ""),
            c.get("status", ""),
            c.get("reason", ""),
            age(c.get("lastTransitionTime"), now),
            c.get("message") or "",
        ]
        for c in status.get("conditions") or []
    ]
    lines += _section(
        "Conditions",
        ["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"],
        conditions,
        "none yet (has the operator seen this job?)",
    )
    evaluated = evaluation_rows(spec, status)
    if evaluated:
        lines += _section("Evaluation (latest, against the base model)", EVALUATION_HEADERS, evaluated, "")
    runs = [
        [
            str(r.get("run")),
            str(r.get("generation", NONE)),
            r.get("result") or ("Running" if r.get("run") == run and phase(job) not in TERMINAL_PHASES else NONE),
            r.get("reason") or NONE,
            str(r.get("attempts") or NONE),
            ago(r.get("startTime"), now),
            duration(r.get("startTime"), r.get("completionTime")),
            number(r.get("finalLoss")),
            number(r.get("finalEvalLoss")),
            r.get("output") or NONE,
        ]
        for r in status.get("runs") or []
    ]
    lines += _section(
        "Runs",
        ["RUN", "GEN", "RESULT", "REASON", "ATTEMPTS", "STARTED", "DURATION", "LOSS", "EVAL LOSS", "OUTPUT"],
        runs,
        "none yet",
    )
    attempts = [
        [
            str(a.get("attempt")),
            ago(a.get("startTime"), now),
            duration(a.get("startTime"), a.get("completionTime")),
            a.get("reason") or ("Running" if a.get("attempt") == attempt else NONE),
            str(a["exitCode"]) if a.get("exitCode") is not None else NONE,
            a.get("message") or "",
        ]
        for a in status.get("attempts") or []
    ]
    lines += _section(
        f"Attempts of run {run}" if run else "Attempts",
        ["ATTEMPT", "STARTED", "DURATION", "REASON", "EXIT", "MESSAGE"],
        attempts,
        "none yet",
    )
    recent = sorted(events, key=_event_time)[-max_events:]
    rows = [
        [
            e.get("type") or NONE,
            e.get("reason") or NONE,
            age(_event_time(e), now),
            dig(e, "source", "component") or e.get("reportingComponent") or NONE,
            " ".join((e.get("message") or "").split()),
        ]
        for e in recent
    ]
    lines += _section("Events", ["TYPE", "REASON", "AGE", "FROM", "MESSAGE"], rows, "none")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# watch


def outcome(job: Obj) -> str | None:
    """Succeeded or Failed once the operator has finished what was last asked for; None while anything is pending.

    Right after a spec change or `rerun`, the status still shows the previous run's result until the operator
    starts the new run: a result counts only when the operator has seen this generation and the current run
    carries the current rerun token."""
    status = job.get("status") or {}
    meta = job.get("metadata") or {}
    if status.get("phase") not in TERMINAL_PHASES:
        return None
    if (status.get("observedGeneration") or 0) < (meta.get("generation") or 1):
        return None
    token = (meta.get("annotations") or {}).get(RERUN_ANNOTATION)
    current = next((r for r in status.get("runs") or [] if r.get("run") == status.get("run")), None)
    if current is not None and current.get("rerunToken") != token:
        return None
    result: str = status["phase"]
    return result


MIN_BAR, MAX_BAR = 10, 30


def bar(fraction: float, width: int) -> str:
    done = max(0, min(width, int(fraction * width)))
    return "[" + "#" * done + "." * (width - done) + "]"


def progress_line(job: Obj, *, width: int | None = None) -> str:
    """One line for `watch`. With a terminal `width`, a progress bar sized to fit it; without one (output is not
    a terminal), plain text that changes only when the job's state does, so each change prints once."""
    status = job.get("status") or {}
    p = status.get("progress") or {}
    head = phase(job) if status.get("phase") else "Pending (waiting for the operator)"
    if status.get("phase") in TERMINAL_PHASES and outcome(job) is None:
        head += " (a new run was asked for: waiting for the operator)"
    if (status.get("attempt") or 1) > 1:
        head += f" attempt {status['attempt']}"
    if status.get("phase") == "Pending" and status.get("workers"):
        w = status["workers"]
        head += f" ({w.get('ready', 0)}/{dig(job, 'spec', 'resources', 'numNodes') or 1} workers ready)"
    # In the order they are dropped when a terminal is too narrow for them and a bar.
    optional = {
        "eval": f"eval {number(p['evalLoss'])}" if p.get("evalLoss") is not None else "",
        "rate": rate(p["tokensPerSecond"]) if p.get("tokensPerSecond") is not None and phase(job) == "Running" else "",
        "cost": usd(dig(status, "cost", "usd")) if dig(status, "cost", "usd") is not None else "",
        "loss": f"loss {number(p['loss'])}" if p.get("loss") is not None else "",
        "eta": f"ETA {eta(job)}" if eta(job) != NONE else "",
    }
    order = ("loss", "eval", "rate", "eta", "cost")
    step, total = p.get("step"), p.get("totalSteps")

    def rest(dropped: int = 0) -> str:
        kept = set(list(optional)[dropped:])
        return "  ".join(optional[k] for k in order if k in kept and optional[k])

    if step is None:
        line = f"{head}  {rest()}".rstrip()
    elif width is None or not total:
        line = f"{head}  step {steps(p)}  {rest()}".rstrip()
    else:
        count = f"{step}/{total} {p.get('percent', step * 100 // total)}%"
        for dropped in range(len(optional) + 1):
            room = width - 1 - len(f"{head} [] {count}  {rest(dropped)}")
            if room >= MIN_BAR:
                break
        drawn = f" {bar(step / total, min(MAX_BAR, room))}" if room >= MIN_BAR else ""
        line = f"{head}{drawn} {count}  {rest(dropped)}".rstrip()
    return line if width is None else line[: max(width - 1, 0)]


def result_line(job: Obj) -> str:
    """The last line of `watch`: how the run ended, with its numbers and where the output is."""
    status = job.get("status") or {}
    final = phase(job)
    condition: Obj = next((c for c in status.get("conditions") or [] if c.get("type") == final), {})
    p, cost = status.get("progress") or {}, status.get("cost") or {}
    run = status.get("run")
    attempts = status.get("attempt")
    summary = _join(
        f"loss {number(p['loss'])}" if p.get("loss") is not None else None,
        f"eval loss {number(p['evalLoss'])}" if p.get("evalLoss") is not None else None,
        f"{number(cost['gpuHours'], 1)} GPU-hours" if cost.get("gpuHours") is not None else None,
        usd(cost["usd"]) if cost.get("usd") is not None else None,
    )
    took = duration(status.get("startTime"), status.get("completionTime"))
    what = f"run {run}" if run else "the run"
    if final == "Succeeded":
        output = dig(status, "output", "path")
        return f"Succeeded: {what} finished in {took}: {summary}" + (f"; output {output}" if output else "")
    reason, message = condition.get("reason"), condition.get("message")
    why = f"{reason}: {message}" if reason and message else reason or message
    tries = f" after {attempts} attempt{'s' if attempts != 1 else ''}" if attempts else ""
    return f"Failed: {what}{tries} ({why or 'no reason given'})" + (f"; {summary}" if summary else "")


# ----------------------------------------------------------------------------------------------
# samples: base and fine-tuned answers side by side


def samples_from_log(text: str) -> list[dict[str, Any]]:
    """The samples rank 0 logged at the end of its run (kubetune_trainer.samples.SAMPLE_LOG_PREFIX lines)."""
    found = []
    for line in text.splitlines():
        _, marker, doc = line.partition(SAMPLE_LOG_PREFIX)
        if not marker:
            continue
        try:
            sample = json.loads(doc)
        except ValueError:
            continue
        if isinstance(sample, dict):
            found.append(sample)
    return found


def samples_from_jsonl(text: str) -> list[dict[str, Any]]:
    """The samples of an output directory's samples.jsonl."""
    return [s for s in (json.loads(line) for line in text.splitlines() if line.strip()) if isinstance(s, dict)]


def _wrapped(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width) or [""]


def _labelled(label: str, text: str, width: int) -> list[str]:
    """`label` then the text, wrapped, its further lines indented under the first."""
    lines = _wrapped(text, width - 13)
    return [f"  {label:<11}{lines[0]}", *(" " * 13 + line for line in lines[1:])]


def samples_text(samples: Sequence[Obj], width: int = 120) -> str:
    """Each prompt, its reference answer if any, then the base and the fine-tuned answer in two columns."""
    column = max(20, (width - 5) // 2)
    lines: list[str] = []
    for i, s in enumerate(samples, 1):
        lines.append(f"[{i}] {s.get('row') or ''}".rstrip())
        lines += _labelled("prompt:", str(s.get("prompt") or ""), width)
        if s.get("reference"):
            lines += _labelled("reference:", str(s["reference"]), width)
        cut = s.get("truncated") or {}
        base = str(s.get("base") or "") + (" [...]" if cut.get("base") else "")
        tuned = str(s.get("tuned") or "") + (" [...]" if cut.get("tuned") else "")
        left, right = _wrapped(base, column), _wrapped(tuned, column)
        lines.append(f"  {'BASE':<{column}} | TUNED")
        for a, b in itertools.zip_longest(left, right, fillvalue=""):
            lines.append(f"  {a:<{column}} | {b}".rstrip())
        lines.append("")
    return "\n".join(lines).rstrip("\n")
