"""`python -m kubetune_dev cluster up|down|status`: the local control plane from a shell.

The default cluster lives in <repo>/.cache/cluster and its kubeconfig is linked at <repo>/.cache/kubeconfig.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetune_dev.cluster import GpuNodePool, LocalCluster, running_cluster, stop_processes

REPO = Path(__file__).resolve().parents[2]
DEFAULT_STATE = REPO / ".cache" / "cluster"
KUBECONFIG_LINK = REPO / ".cache" / "kubeconfig"


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

    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
