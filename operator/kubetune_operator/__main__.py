"""`kubetune-operator` (or `python -m kubetune_operator`): run the FineTuneJob operator.

    kubetune-operator -A                              # every namespace (the default when none is given)
    kubetune-operator -n team-a -n 'ml-*'             # some namespaces (globs allowed)
    kubetune-operator --settings /etc/kubetune/settings.yaml -v

Connects with $KUBECONFIG (or ~/.kube/config), else the pod's service account. Settings come from
--settings or $KUBETUNE_SETTINGS, with KUBETUNE_* environment overrides (see settings.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

import kopf

from kubetune_operator.api import GROUP, KIND, PLURAL, VERSION
from kubetune_operator.controller import Controller
from kubetune_operator.health import start_health_server
from kubetune_operator.kube import ApiError, Connection
from kubetune_operator.kube_async import AsyncKube, connections_for
from kubetune_operator.metrics import serve
from kubetune_operator.settings import OperatorSettings, load_settings

log = logging.getLogger("kubetune_operator")

CRD_POLL_SECONDS = 5.0


async def wait_for_crd(kube: AsyncKube, poll: float = CRD_POLL_SECONDS) -> None:
    """Until API discovery shows FineTuneJobs. With its scanning off, kopf serves only the resources discovery
    showed when it started: an operator started before its CRD would run, ready, and never see a FineTuneJob.
    Waiting here keeps it not ready (and saying why) instead."""
    warned = False
    while True:
        try:
            found = await kube.request("GET", f"/apis/{GROUP}/{VERSION}")
            if any(r.get("name") == PLURAL for r in found.get("resources") or []):
                return
        except ApiError as e:
            if e.status != 404:
                raise
        if not warned:
            log.warning("no %s API (%s/%s) yet: waiting for its CRD to be installed", KIND, GROUP, VERSION)
            warned = True
        await asyncio.sleep(poll)


async def run_operator(settings: OperatorSettings, namespaces: list[str]) -> None:
    kube = AsyncKube(Connection.load(), connections_for(settings.reconcile_workers))
    controller = Controller(kube, settings)
    kopf_settings = kopf.OperatorSettings()
    controller.configure(kopf_settings, namespaces)
    controller.start_workers()
    health = await start_health_server(controller, settings.health_port) if settings.health_port else None
    metrics = (
        await serve(controller.metrics.registry, "0.0.0.0", settings.metrics_port) if settings.metrics_port else None
    )
    log.info("watching %s", ", ".join(namespaces) if namespaces else "all namespaces")
    try:
        if kopf_settings.scanning.disabled:
            await wait_for_crd(kube)
        # Returns on SIGTERM/SIGINT (kopf installs the handlers).
        await kopf.operator(
            registry=controller.registry(),
            settings=kopf_settings,
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True,
        )
    finally:
        await controller.stop_workers()
        if health:
            await health.cleanup()
        if metrics:
            await metrics.cleanup()
        log.info("reconcile summary %s", json.dumps(controller.stats.summary(kube.requests)))
        await kube.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune-operator", description="Run the FineTuneJob operator.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "-n", "--namespace", action="append", default=[], help="namespace (or glob) to watch; repeatable"
    )
    where.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--settings", help="settings file (YAML or JSON); default $KUBETUNE_SETTINGS")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log more")
    verbosity.add_argument("--debug", action="store_true", help="log everything, kopf included")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    args = parser.parse_args(argv)

    settings = load_settings(args.settings)
    namespaces = [] if args.all_namespaces else (args.namespace or settings.namespaces)
    kopf.configure(debug=args.debug, verbose=args.verbose, quiet=args.quiet)
    if not args.debug:
        # kopf logs every watch event it hands to a handler; the operator logs its decisions itself.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    asyncio.run(run_operator(settings, namespaces))
    return 0


if __name__ == "__main__":
    sys.exit(main())
