"""`python -m kubetune_dev cluster up|down|status`: the local control plane from a shell.
`python -m kubetune_dev node run|logs`: the local node agent (test and demo tooling) that runs pods as processes.

The default cluster lives in <repo>/.cache/cluster and its kubeconfig is linked at <repo>/.cache/kubeconfig;
the node agents' default root (PVC directories, logs, the shared hosts file) is <repo>/.cache/nodeagent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from kubetune_dev.cluster import GpuNodePool, LocalCluster, running_cluster, stop_processes

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STATE = REPO / ".cache" / "cluster"
KUBECONFIG_LINK = REPO / ".cache" / "kubeconfig"
DEFAULT_NODE_ROOT = REPO / ".cache" / "nodeagent"


def cluster_up(args: argparse.Namespace) -> int:
    state = Path(args.state_dir)
    existing = running_cluster(state)
    if existing and not args.recreate:
        print(f"cluster already running at {existing.server}")
    else:
        print(f"starting a local control plane in {state} (building the toolchain first if needed)...", flush=True)
        pool = GpuNodePool(count=args.gpu_nodes, gpus_per_node=args.gpus_per_node, gpu_product=args.gpu_product)
        existing = LocalCluster(state_dir=state, gpu_nodes=pool).start()
        print(f"cluster up at {existing.server}")
    if state == DEFAULT_STATE:
        KUBECONFIG_LINK.unlink(missing_ok=True)
        KUBECONFIG_LINK.symlink_to(existing.kubeconfig)
        kubeconfig = KUBECONFIG_LINK
    else:
        kubeconfig = existing.kubeconfig
    print(f"\n  export KUBECONFIG={kubeconfig}\n  kubectl get nodes\n\nlogs: {state / 'logs'}")
    return 0


def cluster_down(args: argparse.Namespace) -> int:
    from kubetune_dev.realnodes import stop_for_cluster

    if stop_for_cluster(Path(args.state_dir)):
        print("stopped the real nodes")
    stopped = stop_processes(Path(args.state_dir))
    print(f"stopped: {', '.join(stopped)}" if stopped else "no cluster was running")
    return 0


def cluster_status(args: argparse.Namespace) -> int:
    cluster = running_cluster(Path(args.state_dir))
    if cluster is None:
        print("not running")
        return 1
    print(f"running at {cluster.server}; kubeconfig {cluster.kubeconfig}")
    return 0


def node_run(args: argparse.Namespace) -> int:
    from kubetune_dev.nodeagent import NodeAgent, parse_taint, run_agent

    agent = NodeAgent(
        args.name,
        Path(args.kubeconfig),
        Path(args.root),
        gpus=args.gpus,
        labels=dict(item.split("=", 1) for item in args.label),
        taints=[parse_taint(t) for t in args.taint],
        port=args.port,
    )
    run_agent(agent, exit_with_parent=args.exit_with_parent)
    return 0


def node_logs(args: argparse.Namespace) -> int:
    from kubetune_dev.nodeagent import logs

    namespace, _, pod = args.pod.rpartition("/")
    directory = logs.find_pod_dir(Path(args.root), namespace or "default", pod)
    if directory is None:
        print(f"no pod {namespace or 'default'}/{pod} has run under {args.root}", file=sys.stderr)
        return 1
    containers = logs.containers_with_logs(directory)
    container = args.container or (containers[0] if len(containers) == 1 else None)
    if container is None:
        print(f"choose a container with -c: {', '.join(containers) or 'none has started'}", file=sys.stderr)
        return 1
    path = logs.find_log(directory, container, args.previous)
    if path is None:
        print(f"container {container} has no {'previous ' if args.previous else ''}log", file=sys.stderr)
        return 1

    async def show() -> None:
        async for chunk in logs.read_log(path, follow=args.follow, tail_lines=args.tail):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()

    asyncio.run(show())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_dev")
    sub = parser.add_subparsers(dest="what", required=True)
    cluster = sub.add_parser("cluster", help="the local control plane")
    actions = cluster.add_subparsers(dest="action", required=True)
    for name, fn in (("up", cluster_up), ("down", cluster_down), ("status", cluster_status)):
        p = actions.add_parser(name)
        p.add_argument("--state-dir", default=str(DEFAULT_STATE))
        p.set_defaults(fn=fn)
        if name == "up":
            p.add_argument("--gpu-nodes", type=int, default=2)
            p.add_argument("--gpus-per-node", type=int, default=8)
            p.add_argument("--gpu-product", default="NVIDIA-H100-80GB-HBM3")
            p.add_argument("--recreate", action="store_true", help="start afresh even if one is running")

    node = sub.add_parser("node", help="the local node agent: runs pods bound to its node as local processes")
    node_actions = node.add_subparsers(dest="action", required=True)
    run = node_actions.add_parser("run", help="register a node and run its pods until interrupted")
    run.add_argument("--name", required=True, help="the Node's name")
    run.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG", str(KUBECONFIG_LINK)))
    run.add_argument("--root", default=str(DEFAULT_NODE_ROOT), help="volumes, logs and hosts file (shared)")
    run.add_argument("--gpus", type=int, default=0, help="advertise this many fake nvidia.com/gpu")
    run.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="an extra node label")
    run.add_argument("--taint", action="append", default=[], metavar="KEY[=VALUE]:EFFECT", help="a node taint")
    run.add_argument("--port", type=int, default=0, help="the kubelet (logs) port; default: a free one")
    run.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process dies")
    run.set_defaults(fn=node_run)
    logs = node_actions.add_parser("logs", help="print a container's log from the node agents' root")
    logs.add_argument("pod", metavar="NAMESPACE/POD")
    logs.add_argument("-c", "--container")
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-p", "--previous", action="store_true", help="the run before the last restart")
    logs.add_argument("--tail", type=int, help="only the last N lines")
    logs.add_argument("--root", default=str(DEFAULT_NODE_ROOT))
    logs.set_defaults(fn=node_logs)
    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
