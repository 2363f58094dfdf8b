"""Argument parsing and the error boundary: every failure leaves as one `error:` line, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kubetune_operator.cli import commands, manifest
from kubetune_operator.cli.errors import CliError, explain_api_error, explain_connection_error
from kubetune_operator.kube import ApiError, ConfigError, Unreachable

Command = Callable[[commands.Session], int]


def _connection_flags(all_namespaces: bool) -> argparse.ArgumentParser:
    # SUPPRESS: a flag given before the subcommand is not reset by the subcommand's own default.
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("cluster")
    g.add_argument("-n", "--namespace", default=argparse.SUPPRESS, help="namespace (default: the context's)")
    if all_namespaces:
        g.add_argument("-A", "--all-namespaces", action="store_true", default=argparse.SUPPRESS, help="every namespace")
    g.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="kubeconfig file (default: $KUBECONFIG)")
    g.add_argument("--context", default=argparse.SUPPRESS, help="kubeconfig context (default: the current one)")
    return p


def parser() -> argparse.ArgumentParser:
    flags, flags_all = _connection_flags(False), _connection_flags(True)
    top = argparse.ArgumentParser(
        prog="kubectl finetune",
        description="Create, follow and inspect kubetune FineTuneJobs (LLM fine-tuning on Kubernetes).",
        parents=[flags_all],
    )
    sub = top.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, run: Command, help: str, *, many: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[flags_all if many else flags])
        p.set_defaults(run=run)
        return p

    def named(name: str, run: Command, help: str) -> argparse.ArgumentParser:
        p = command(name, run, help)
        p.add_argument("name", metavar="NAME", help="the FineTuneJob")
        return p

    p = command("list", commands.list_jobs, "list FineTuneJobs with progress, cost and ETA", many=True)
    p.add_argument("-o", "--output", choices=("json", "yaml", "wide"), help="output format")
    named("describe", commands.describe, "spec, conditions, runs, attempts, checkpoint, cost, output and events")
    named("watch", commands.watch, "follow a job's progress until it ends (exit 0: Succeeded, 1: Failed)")
    p = named("logs", commands.logs, "print the log of a worker of the current attempt")
    p.add_argument("--rank", type=int, default=0, help="worker rank (default 0)")
    p.add_argument("--attempt", type=int, help="attempt of the current run (default: the current attempt)")
    p.add_argument("-f", "--follow", action="store_true", help="stream the log as it grows")
    named("suspend", commands.suspend, "stop the workers (they checkpoint first) until resumed")
    named("resume", commands.resume, "start a suspended job again from its latest checkpoint")
    p = named("rerun", commands.rerun, "train the same spec again as a new run")
    p.add_argument("--token", help="value for the rerun annotation (default: the current time)")
    p = named("create", commands.create, "create a FineTuneJob from flags")
    manifest.add_flags(p)
    p.add_argument(
        "--dry-run",
        nargs="?",
        const="client",
        choices=("client", "server"),
        help="only validate: here (client, the default) or on the API server (server); nothing is created",
    )
    p.add_argument("-o", "--output", choices=("json", "yaml"), help="print the manifest (e.g. for git)")
    p = command("plot", commands.plot_loss, "loss and eval loss curves as a PNG")
    p.add_argument("name", metavar="NAME", nargs="?", help="the FineTuneJob (its status has the loss history)")
    p.add_argument("--from-dir", metavar="DIR", help="a run's output directory (with metrics.jsonl) instead")
    p.add_argument("-o", "--output", metavar="FILE", help="PNG to write (default: NAME.png)")
    command("cost", commands.cost, "GPU-hours and cost per job, with totals per namespace", many=True)
    p = command("samples", commands.samples, "the base and the fine-tuned model's answers to the sample prompts")
    p.add_argument("name", metavar="NAME", nargs="?", help="the FineTuneJob (read from rank 0's log of its run)")
    p.add_argument("--from-dir", metavar="DIR", help="a run's output directory (with samples.jsonl) instead")
    p.add_argument("--width", type=int, help="line width (default: the terminal's)")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    session = commands.Session(args)
    try:
        code: int = args.run(session)
        return code
    except (CliError, ConfigError) as e:
        return fail(str(e))
    except ApiError as e:
        namespace = None if session.all_namespaces else session.namespace
        return fail(explain_api_error(e.status, e.reason, e.body, namespace=namespace))
    except Unreachable as e:
        return fail(explain_connection_error(e.server, e.cause))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `kubectl finetune logs x | head`: the reader left; that is not an error.
        sys.stderr.close()
        return 0


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1
