"""The subcommands: each fetches or changes what it needs through Cluster and prints a view. No formatting here."""

from __future__ import annotations

import argparse
import shutil
import sys
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path

from kubetune_trainer.samples import SAMPLES_FILE

from kubetune_operator.api import RERUN_ANNOTATION
from kubetune_operator.cli import manifest, plot, views, workers
from kubetune_operator.cli.cluster import Cluster
from kubetune_operator.cli.errors import CliError

RESOURCE = "finetunejob.kubetune.io"  # how kubectl names the kind in its one-line results


class Session:
    """The parsed flags, and the cluster connection, made only when a command needs it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    @cached_property
    def cluster(self) -> Cluster:
        return Cluster(getattr(self.args, "kubeconfig", None), getattr(self.args, "context", None))

    @property
    def explicit_namespace(self) -> str | None:
        namespace: str | None = getattr(self.args, "namespace", None)
        return namespace

    @property
    def namespace(self) -> str:
        return self.explicit_namespace or self.cluster.default_namespace

    @property
    def all_namespaces(self) -> bool:
        return bool(getattr(self.args, "all_namespaces", False))

    @property
    def scope(self) -> str | None:
        """The namespace to look in; None for all of them."""
        return None if self.all_namespaces else self.namespace


def now() -> datetime:
    return datetime.now(UTC)


def print_line(text: str) -> None:
    print(text, flush=True)


def none_found(s: Session) -> None:
    # As kubectl: on stderr, so that scripts reading stdout see an empty result.
    where = "any namespace" if s.scope is None else f"namespace {s.scope}"
    print(f"No FineTuneJobs found in {where}.", file=sys.stderr)


# ----------------------------------------------------------------------------------------------


def list_jobs(s: Session) -> int:
    jobs = s.cluster.list_jobs(s.scope)
    output = s.args.output
    if output in ("json", "yaml"):
        print_line(views.dump({"apiVersion": "v1", "kind": "List", "items": jobs}, output))
    elif not jobs:
        none_found(s)
    else:
        print_line(views.list_table(jobs, now=now(), all_namespaces=s.all_namespaces, wide=output == "wide"))
    return 0


def describe(s: Session) -> int:
    job = s.cluster.get_job(s.namespace, s.args.name)
    print_line(views.describe(job, s.cluster.job_events(job), now=now()))
    return 0


def watch(s: Session) -> int:
    """Redraws one line on a terminal; otherwise prints a line per change. Exits 0 on Succeeded, 1 on Failed."""
    tty = sys.stdout.isatty()
    last = None
    try:
        for job in s.cluster.watch_job(s.namespace, s.args.name):
            line = views.progress_line(job, width=shutil.get_terminal_size().columns if tty else None)
            if tty:
                sys.stdout.write(f"\r\x1b[2K{line}")
                sys.stdout.flush()
            elif line != last:
                print_line(line)
            last = line
            result = views.outcome(job)
            if result is not None:
                break
        else:
            raise AssertionError("the watch ends only with a result or an error")
    finally:
        if tty and last is not None:
            print_line("")  # leave the bar on its own line, above the result or an error
    print_line(views.result_line(job))
    return 0 if result == "Succeeded" else 1


def logs(s: Session) -> int:
    name, namespace = s.args.name, s.namespace
    status = s.cluster.get_job(namespace, name).get("status") or {}
    run, attempt = status.get("run"), s.args.attempt or status.get("attempt")
    if not run or not attempt:
        raise CliError(
            f'FineTuneJob "{name}" has not started any workers yet: `kubectl finetune watch {name}` follows it'
        )
    where = f"run {run} attempt {attempt} of {name}"
    pod = workers.pick_worker(s.cluster.attempt_pods(namespace, name, run, attempt), s.args.rank, where=where)
    if pod.get("status", {}).get("phase") == "Pending":
        if not s.args.follow:
            raise CliError(f"worker {pod['metadata']['name']} has not started yet: add --follow to wait for its log")
        s.cluster.wait_for_start(namespace, pod)
    out = sys.stdout.buffer
    for chunk in s.cluster.pod_log(
        namespace, pod["metadata"]["name"], workers.log_container(pod), follow=s.args.follow
    ):
        out.write(chunk)
        out.flush()
    return 0


def set_suspended(s: Session, suspend: bool) -> int:
    name = s.args.name
    job = s.cluster.get_job(s.namespace, name)
    if bool(views.dig(job, "spec", "runPolicy", "suspend")) == suspend:
        print_line(f"{RESOURCE}/{name} is already {'suspended' if suspend else 'running (not suspended)'}")
        return 0
    s.cluster.patch_job(s.namespace, name, {"spec": {"runPolicy": {"suspend": suspend}}})
    print_line(f"{RESOURCE}/{name} {'suspended' if suspend else 'resumed'}")
    return 0


def suspend(s: Session) -> int:
    return set_suspended(s, True)


def resume(s: Session) -> int:
    return set_suspended(s, False)


def rerun(s: Session) -> int:
    token = s.args.token or now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    s.cluster.patch_job(s.namespace, s.args.name, {"metadata": {"annotations": {RERUN_ANNOTATION: token}}})
    print_line(f"{RESOURCE}/{s.args.name} rerun requested ({RERUN_ANNOTATION}={token})")
    return 0


def create(s: Session) -> int:
    args = s.args
    body = manifest.build(args.name, s.explicit_namespace, vars(args))
    mode = args.dry_run
    obj = body if mode == "client" else s.cluster.create_job(s.namespace, body, server_dry_run=mode == "server")
    if args.output:
        print_line(views.dump(obj, args.output))
    else:
        note = {"client": " (dry run)", "server": " (server dry run)"}.get(mode or "", "")
        print_line(f"{RESOURCE}/{args.name} created{note}")
    return 0


def plot_loss(s: Session) -> int:
    args = s.args
    if args.from_dir:
        records = plot.read_metrics(Path(args.from_dir))
        title = args.name or args.from_dir
    elif args.name:
        job = s.cluster.get_job(s.namespace, args.name)
        records = views.dig(job, "status", "progress", "history") or []
        if not records:
            raise CliError(
                f'FineTuneJob "{args.name}" has no loss history in its status yet: plot a run\'s output with '
                "--from-dir DIR (the directory holding its metrics.jsonl)"
            )
        title = f"{s.namespace}/{args.name} run {views.dig(job, 'status', 'run')}"
    else:
        raise CliError("give a FineTuneJob NAME, or --from-dir DIR")
    train, evaluation = plot.curves(records)
    out = Path(args.output or f"{args.name or 'loss'}.png")
    plot.render(train, evaluation, title, out)
    print_line(f"wrote {out}: {len(train)} train loss and {len(evaluation)} eval loss points")
    return 0


def samples(s: Session) -> int:
    args = s.args
    width = args.width or shutil.get_terminal_size().columns
    if args.from_dir:
        path = Path(args.from_dir) / SAMPLES_FILE
        try:
            found = views.samples_from_jsonl(path.read_text())
        except FileNotFoundError:
            raise CliError(f"{path}: no such file (the run writes it when its spec has evaluation.samples)") from None
    elif args.name:
        name, namespace = args.name, s.namespace
        job = s.cluster.get_job(namespace, name)
        status = job.get("status") or {}
        run, attempt = status.get("run"), status.get("attempt")
        if not run or not attempt:
            raise CliError(f'FineTuneJob "{name}" has not started any workers yet')
        if not views.dig(job, "spec", "evaluation", "samples"):
            raise CliError(f'FineTuneJob "{name}" has no spec.evaluation.samples: give it prompts to answer')
        where = f"run {run} attempt {attempt} of {name}"
        pod = workers.pick_worker(s.cluster.attempt_pods(namespace, name, run, attempt), 0, where=where)
        log = b"".join(s.cluster.pod_log(namespace, pod["metadata"]["name"], workers.log_container(pod), follow=False))
        found = views.samples_from_log(log.decode(errors="replace"))
        if not found:
            output = views.dig(status, "output", "path") or "the run's output"
            raise CliError(
                f"no samples in the log of {where} yet: they come at the end of the run. Once the workers are gone, "
                f"read {SAMPLES_FILE} in {output} with --from-dir DIR"
            )
    else:
        raise CliError("give a FineTuneJob NAME, or --from-dir DIR")
    print_line(views.samples_text(found, width))
    return 0


def cost(s: Session) -> int:
    jobs = s.cluster.list_jobs(s.scope)
    if jobs:
        print_line(views.cost_table(jobs, all_namespaces=s.all_namespaces))
    else:
        none_found(s)
    return 0
