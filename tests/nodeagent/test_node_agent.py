"""The local node agent against the real control plane: pods run as processes, with their config, secrets,
downward API, claims, names and logs; statuses, restarts, deletion and agent restarts as a kubelet does.

The node-health test comes last: it checks the node has stayed Ready since the session started."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kubetune_dev.cluster import LocalCluster, free_port
from kubetune_dev.nodeagent.testing import HACK, LOCAL_PLACEMENT, LocalNode, start_nodes

pytestmark = pytest.mark.e2e


def apply(cluster: LocalCluster, namespace: str, *objects: dict) -> None:
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)


def get(cluster: LocalCluster, namespace: str, *what: str) -> dict:
    return json.loads(cluster.kubectl("get", "-n", namespace, *what, "-o", "json").stdout)


def wait_for_phase(cluster: LocalCluster, namespace: str, pod: str, *phases: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        obj = get(cluster, namespace, "pod", pod)
        if obj.get("status", {}).get("phase") in phases:
            return obj
        if time.monotonic() > deadline:
            raise AssertionError(f"pod {pod} not {phases} after {timeout}s: {json.dumps(obj.get('status'))}")
        time.sleep(0.2)


def wait_ready(cluster: LocalCluster, namespace: str, *pods: str) -> None:
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "--timeout=30s", *(f"pod/{p}" for p in pods))


def statuses(pod: dict, key: str = "containerStatuses") -> dict[str, dict]:
    return {s["name"]: s for s in pod["status"].get(key, [])}


def pod(name: str, script: str, *, placement: dict = LOCAL_PLACEMENT, **spec: object) -> dict:
    container = {"name": "main", "image": "ignored", "command": ["sh", "-c", script]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", **placement, "containers": [container], **spec},
    }


def claim(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }


def processes_with(marker: str) -> dict[int, str]:
    """pid -> command line of the live processes whose command line holds `marker` (a zombie's is empty)."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text and "processes_with" not in text:
            found[int(cmdline.parent.name)] = text
    return found


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} after {timeout}s"
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------------


def test_pod_gets_config_secret_downward_api_and_writes_its_claim(
    cluster: LocalCluster, namespace: str, node_agent: LocalNode
) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cfg"},
        "data": {"greeting": "hello", "settings.json": '{"lr": 0.1}'},
    }
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}}
    config_dir, workdir = f"/etc/kt-{namespace}", f"/kt-{namespace}/work"
    script = f"""set -e
echo "$MSG|$TOKEN|$NS|$IP|$NODE|$NOTE|$APP|$MEM_MIB|$(hostname)|$(pwd)|$0" > /data/out.txt
cat {config_dir}/conf/settings.json >> /data/out.txt
echo inside > /data/sub-view/in-sub.txt
echo private > /tmp/scratch && echo shared > /dev/shm/segment && cat /tmp/scratch /dev/shm/segment > /dev/null
if touch {config_dir}/x 2>/dev/null; then echo "config volume is writable"; exit 9; fi
echo "wrote out.txt"
"""
    writer = pod("writer", script)
    writer["metadata"].update(labels={"app": "kt-writer"}, annotations={"kubetune.io/note": "hi"})
    fields = {
        "POD": "metadata.name",
        "NS": "metadata.namespace",
        "IP": "status.podIP",
        "NODE": "spec.nodeName",
        "NOTE": "metadata.annotations['kubetune.io/note']",
        "APP": "metadata.labels['app']",
    }
    writer["spec"]["containers"][0].update(
        workingDir=workdir,
        args=["$(POD)-arg"],
        envFrom=[{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        env=[
            *({"name": k, "valueFrom": {"fieldRef": {"fieldPath": v}}} for k, v in fields.items()),
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "MSG", "value": "$(CFG_greeting) from $(POD)"},
            {"name": "MEM_MIB", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
        ],
        resources={"limits": {"memory": "64Mi"}},
        volumeMounts=[
            {"name": "cfg", "mountPath": config_dir, "readOnly": True},
            {"name": "data", "mountPath": "/data"},
            {"name": "data", "mountPath": "/data/sub-view", "subPath": "sub"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        # Ignored by the agent (documented), as the operator's pods set them.
        securityContext={"runAsNonRoot": True, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
    )
    writer["spec"]["volumes"] = [
        {
            "name": "cfg",
            "configMap": {"name": "cfg", "items": [{"key": "settings.json", "path": "conf/settings.json"}]},
        },
        {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
    ]
    apply(cluster, namespace, config, secret, claim("data"), writer)

    done = wait_for_phase(cluster, namespace, "writer", "Succeeded", "Failed")
    main = statuses(done)["main"]
    assert done["status"]["phase"] == "Succeeded", node_agent.pod_logs(namespace, "writer")
    assert (main["state"]["terminated"]["exitCode"], main["state"]["terminated"]["reason"]) == (0, "Completed")
    pod_ip = done["status"]["podIP"]
    assert re.fullmatch(r"127\.0\.0\.\d+", pod_ip)
    node = done["spec"]["nodeName"]
    assert node in ("local-node-0", "local-node-1")

    claim_dir = node_agent.claim_dir(namespace, "data")
    first, settings = (claim_dir / "out.txt").read_text().splitlines()
    assert first == f"hello from writer|s3cret|{namespace}|{pod_ip}|{node}|hi|kt-writer|64|writer|{workdir}|writer-arg"
    assert json.loads(settings) == {"lr": 0.1}
    assert (claim_dir / "sub" / "in-sub.txt").read_text() == "inside\n"
    assert node_agent.pod_logs(namespace, "writer") == "wrote out.txt\n"
    # Mount points and the working directory the machine lacks exist only inside the container.
    assert not Path(config_dir).exists() and not Path(workdir).parent.exists()

    # The claim outlives the pod: a second pod sees what the first wrote.
    reader = pod("reader", "cat /data/out.txt")
    reader["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    reader["spec"]["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    apply(cluster, namespace, reader)
    assert wait_for_phase(cluster, namespace, "reader", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
    assert node_agent.pod_logs(namespace, "reader").startswith("hello from writer|s3cret")


def test_failures_report_exit_codes_and_termination_messages(
    cluster: LocalCluster, namespace: str, node_agent: LocalNode
) -> None:
    machine_had_termination_log = Path("/dev/termination-log").exists()
    failing = pod("failing", 'echo "disk on fire" > /dev/termination-log; exit 3')
    failing["spec"]["containers"] += [
        {
            "name": "falls-back",
            "image": "ignored",
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "command": ["sh", "-c", "echo noise; echo 'last words'; exit 4"],
        },
        {"name": "missing", "image": "ignored", "command": ["kt-no-such-binary"]},
    ]
    apply(cluster, namespace, failing)

    done = wait_for_phase(cluster, namespace, "failing", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Failed"
    by_name = {name: s["state"]["terminated"] for name, s in statuses(done).items()}
    assert (by_name["main"]["exitCode"], by_name["main"]["reason"]) == (3, "Error")
    assert by_name["main"]["message"] == "disk on fire\n"
    assert by_name["falls-back"]["exitCode"] == 4
    assert by_name["falls-back"]["message"].endswith("last words\n")
    assert (by_name["missing"]["exitCode"], by_name["missing"]["reason"]) == (128, "StartError")
    assert "executable file not found" in by_name["missing"]["message"]
    conditions = {c["type"]: c for c in done["status"]["conditions"]}
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == ("False", "PodCompleted")
    assert Path("/dev/termination-log").exists() == machine_had_termination_log


def test_init_container_then_restart_on_failure(cluster: LocalCluster, namespace: str, node_agent: LocalNode) -> None:
    flaky = pod(
        "flaky",
        "cat /work/init; if [ -f /work/once ]; then echo second; exit 0; fi; touch /work/once; echo first; exit 1",
        restartPolicy="OnFailure",
        initContainers=[
            {
                "name": "init",
                "image": "ignored",
                "command": ["sh", "-c", "echo init-ran > /work/init"],
                "volumeMounts": [{"name": "work", "mountPath": "/work"}],
            }
        ],
        volumes=[{"name": "work", "emptyDir": {}}],
    )
    flaky["spec"]["containers"][0]["volumeMounts"] = [{"name": "work", "mountPath": "/work"}]
    apply(cluster, namespace, flaky)

    done = wait_for_phase(cluster, namespace, "flaky", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded"
    init = statuses(done, "initContainerStatuses")["init"]
    assert init["state"]["terminated"]["exitCode"] == 0 and init["ready"]
    main = statuses(done)["main"]
    assert main["restartCount"] == 1
    assert main["lastState"]["terminated"]["exitCode"] == 1
    assert main["state"]["terminated"]["exitCode"] == 0
    assert node_agent.pod_logs(namespace, "flaky", "main", previous=True) == "init-ran\nfirst\n"
    assert node_agent.pod_logs(namespace, "flaky", "main") == "init-ran\nsecond\n"


def test_indexed_job_rank_one_resolves_and_reaches_rank_zero(
    cluster: LocalCluster, namespace: str, local_nodes: list[LocalNode]
) -> None:
    """The naming the trainer's launcher relies on: `<job>-0.<service>`, across two nodes."""
    port = free_port()
    script = f"""
import os, socket, time
if os.environ["JOB_COMPLETION_INDEX"] == "0":
    server = socket.create_server(("0.0.0.0", {port}))
    conn, _ = server.accept()
    conn.sendall(b"hello from rank 0")
    conn.close()
else:
    deadline = time.time() + 30
    while True:
        try:
            ip = socket.gethostbyname("rdv-0.ranks")
            with socket.create_connection((ip, {port}), timeout=2) as c:
                print(ip, c.recv(100).decode(), socket.gethostname())
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
"""
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "ranks"},
        "spec": {"clusterIP": "None", "selector": {"job-name": "rdv"}},
    }
    spread = {
        "labelSelector": {"matchLabels": {"job-name": "rdv"}},
        "topologyKey": "kubernetes.io/hostname",
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "rdv"},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "subdomain": "ranks",
                    "restartPolicy": "Never",
                    **LOCAL_PLACEMENT,
                    "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [spread]}},
                    "containers": [{"name": "rank", "image": "ignored", "command": ["python", "-c", script]}],
                }
            },
        },
    }
    apply(cluster, namespace, service, job)
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Complete", "job/rdv", "--timeout=60s")

    pods = {
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p
        for p in get(cluster, namespace, "pods", "-l", "job-name=rdv")["items"]
    }
    assert pods["0"]["spec"]["nodeName"] != pods["1"]["spec"]["nodeName"]
    rank1 = pods["1"]["metadata"]["name"]
    output = cluster.kubectl("logs", "-n", namespace, rank1).stdout
    assert output == f"{pods['0']['status']['podIP']} hello from rank 0 rdv-1\n"


def test_deletion_sends_sigterm_then_sigkill_after_the_grace_period(
    cluster: LocalCluster, namespace: str, node_agent: LocalNode
) -> None:
    # SIGTERM goes to the main process only (it may forward it); the rest of the container ends with it.
    child = "trap 'echo child > /data/child-marker' TERM; while true; do sleep 0.2; done"
    graceful = pod(
        "graceful",
        f'sh -c "{child}" & trap "echo got-term > /data/marker; sleep 0.5; exit 0" TERM; while :; do sleep 0.2; done',
        restartPolicy="Always",
        terminationGracePeriodSeconds=30,
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "marks"}}],
    )
    graceful["spec"]["containers"][0]["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
    marker = f"kt-stubborn-{namespace}"
    # No SIGTERM handler: PID 1 of its container, the main process ignores SIGTERM and runs until the SIGKILL.
    stubborn = pod("stubborn", f"echo {marker}; while true; do sleep 0.2; done", terminationGracePeriodSeconds=2)
    apply(cluster, namespace, claim("marks"), graceful, stubborn)
    wait_ready(cluster, namespace, "graceful", "stubborn")
    assert processes_with(marker)

    started = time.monotonic()
    cluster.kubectl("delete", "-n", namespace, "pod", "graceful", "stubborn", "--wait=false")
    deleted = time.monotonic()
    wait_until(lambda: not processes_with(marker), "the stubborn process still runs")
    # Killed once its grace period is over (the agent's clock starts when it sees the deletion), not long after.
    assert started + 2 <= time.monotonic() < deleted + 2 + 3
    cluster.kubectl("wait", "-n", namespace, "--for=delete", "pod/graceful", "pod/stubborn", "--timeout=30s")
    # Gone well within its 30 s grace period: it ended on the SIGTERM, not at the deadline.
    assert time.monotonic() - started < 30
    assert (node_agent.claim_dir(namespace, "marks") / "marker").read_text() == "got-term\n"
    assert not (node_agent.claim_dir(namespace, "marks") / "child-marker").exists()


def test_a_deleted_pod_leaves_no_process_behind_torchruns_workers_included(
    cluster: LocalCluster, namespace: str, node_agent: LocalNode
) -> None:
    """torchrun starts its workers in sessions of their own: they end with the container all the same."""
    marker = f"kt-worker-{namespace}"
    # Workers that ignore SIGTERM: torchrun would wait 30 s for them, the pod's grace period is 1 s.
    worker = ["sh", "-c", f"trap '' TERM; echo {marker}; while :; do sleep 0.2; done"]
    launcher = pod("launcher", "", terminationGracePeriodSeconds=1)
    torchrun = ["torchrun", "--standalone", "--nproc-per-node", "2", "--no-python"]
    launcher["spec"]["containers"][0]["command"] = torchrun + worker
    apply(cluster, namespace, launcher)

    def workers() -> list[int]:
        return [pid for pid, cmdline in processes_with(marker).items() if cmdline.startswith("sh -c")]

    wait_until(lambda: len(workers()) == 2, "torchrun's two workers not running", timeout=60)
    assert all(os.getsid(pid) == pid for pid in workers())  # each leads a session of its own

    cluster.kubectl("delete", "-n", namespace, "pod", "launcher", "--timeout=30s")
    assert not processes_with(marker)


def test_kubectl_logs_reaches_the_agent_through_the_api_server(
    cluster: LocalCluster, namespace: str, node_agent: LocalNode
) -> None:
    talker = pod("talker", "echo line-1; sleep 1; echo line-2; sleep 0.5; echo line-3 >&2")
    apply(cluster, namespace, talker)
    wait_for_phase(cluster, namespace, "talker", "Running", "Succeeded")
    # -f streams until the container exits, then kubectl returns.
    assert cluster.kubectl("logs", "-n", namespace, "-f", "talker").stdout == "line-1\nline-2\nline-3\n"
    wait_for_phase(cluster, namespace, "talker", "Succeeded")
    assert cluster.kubectl("logs", "-n", namespace, "talker", "--tail=1").stdout == "line-3\n"
    cli = subprocess.run(
        [sys.executable, "-m", "kubetune_dev", "node", "logs", f"{namespace}/talker", "--root", str(node_agent.root)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(HACK)},
        check=True,
    )
    assert cli.stdout == "line-1\nline-2\nline-3\n"


def test_a_restarted_agent_fails_the_pods_it_left_and_gpus_are_advertised(
    cluster: LocalCluster, namespace: str, tmp_path: Path
) -> None:
    name = f"local-restart-{namespace}"
    (node,) = start_nodes(cluster, [name], tmp_path, gpus=2)
    try:
        capacity = get(cluster, "default", "node", name)["status"]["capacity"]
        assert capacity["nvidia.com/gpu"] == "2"
        marker = f"kt-orphan-{namespace}"
        script = f"setsid sh -c 'sleep 600; : {marker}' & echo {marker}; sleep 600"
        apply(cluster, namespace, pod("orphan", script, placement=node.placement))
        wait_ready(cluster, namespace, "orphan")
        # The main process and one in a session of its own.
        wait_until(lambda: len(processes_with(marker)) == 2, "the orphan's processes not running")
        node.kill()
        assert len(processes_with(marker)) == 2, "the pod's processes outlive a crashed agent"

        (node,) = start_nodes(cluster, [name], tmp_path, gpus=2)
        failed = wait_for_phase(cluster, namespace, "orphan", "Failed", timeout=15)
        assert failed["status"]["reason"] == "NodeAgentRestarted"
        terminated = statuses(failed)["main"]["state"]["terminated"]
        assert (terminated["exitCode"], terminated["reason"]) == (137, "ContainerStatusUnknown")
        assert not processes_with(marker)
    finally:
        node.stop()
        # Later tests schedule on any local node: this one must not be a candidate once it is gone.
        cluster.kubectl("delete", "node", name, "--wait=false", check=False)


def test_node_is_registered_and_stays_ready(cluster: LocalCluster, node_agent: LocalNode) -> None:
    node = get(cluster, "default", "node", node_agent.name)
    labels, status = node["metadata"]["labels"], node["status"]
    assert labels["kubernetes.io/hostname"] == node_agent.name
    assert labels["kubetune.io/local-node"] == "true"
    assert status["capacity"]["cpu"] == str(len(os.sched_getaffinity(0)))
    mem_kib = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE).group(1)
    assert status["capacity"]["memory"] == f"{mem_kib}Ki"
    assert "nvidia.com/gpu" not in status["capacity"]
    assert status["addresses"] == [{"type": "InternalIP", "address": "127.0.0.1"}]
    assert status["daemonEndpoints"]["kubeletEndpoint"]["Port"] == node_agent.port
    assert {"key": "kubetune.io/local-node", "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]

    # Ready without a break for longer than the node lifecycle controller's grace period (40-50 s).
    ready = {c["type"]: c for c in status["conditions"]}["Ready"]
    since = dt.datetime.fromisoformat(ready["lastTransitionTime"])
    wait = 46 - (dt.datetime.now(dt.UTC) - since).total_seconds()
    if wait > 0:
        time.sleep(wait)
    ready = {c["type"]: c for c in get(cluster, "default", "node", node_agent.name)["status"]["conditions"]}["Ready"]
    assert ready["status"] == "True"
    assert dt.datetime.fromisoformat(ready["lastTransitionTime"]) == since

    lease = get(cluster, "kube-node-lease", "lease", node_agent.name)
    renewed = dt.datetime.fromisoformat(lease["spec"]["renewTime"])
    assert (dt.datetime.now(dt.UTC) - renewed).total_seconds() < 15
    assert lease["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
