"""The kubetune operator: FineTuneJob -> torchrun workers on GPU nodes, runs, attempts, status.

One direction, spec -> render -> apply -> observe -> status:

    controller.py   kopf watches feed caches and a work queue (workqueue.py); workers reconcile each job
    observed.py     what the caches keep of the children and nodes, assembled into `Observed`
    progress.py     rank 0's /progress polled in the background -> status.progress, status.checkpoint
    cost.py         GPU time of the pods x the price of their nodes -> status.cost
    reconcile.py    the pure decision: reconcile(ftj, observed, settings, now) -> Plan
    failures.py     why workers failed (OOM, error, preemption, eviction, node loss, exit code 78)
    policies.py     verdicts on healthy runs: deadline, budget, stall; the evaluation gate of a finished run
    metrics.py      the operator's /metrics: reconciles, and per-job series built from the cache at scrape time
    render.py       the pure renderers: ConfigMap, headless Service, Indexed Job, claim
    storage.py      where a run's data lives on the claims and in the pods; names.py the children's names
    apply.py        carrying out a Plan: guarded status write, create-or-adopt, events
    kube.py         the async API client; health.py /healthz and /readyz; settings.py the settings
    __main__.py     `kubetune-operator`
"""
