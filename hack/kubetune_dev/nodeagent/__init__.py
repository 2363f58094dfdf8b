"""A local node agent: a process-based stand-in for the kubelet, for kubetune's tests and demo.

TEST AND DEMO TOOLING, NOT A KUBELET FOR PRODUCTION. It lets the real operator run the real trainer
through a real control plane on a machine with no container runtime: it registers a Node, and runs the
containers of every pod bound to that Node as ordinary processes of this machine, as root.

What it does
- Registers a Node with this machine's CPUs, memory and disk (and `--gpus N` fake `nvidia.com/gpu`, none
  by default), labels kubernetes.io/hostname and kubetune.io/local-node=true (plus --label), taints given
  with --taint (tests reserve their nodes with kubetune.io/local-node=true:NoSchedule), an InternalIP and
  a kubelet port; keeps it Ready with a node-status heartbeat and a Lease in kube-node-lease renewed every 10 s.
- Runs init containers in order, then the containers: command + args with $(VAR) expansion; env with
  value, fieldRef, resourceFieldRef, secretKeyRef, configMapKeyRef and envFrom; workingDir (default /).
  Processes get the agent's PATH (its own Python environment's bin directory first) and HOME plus the
  pod's env, and KUBERNETES_SERVICE_HOST/PORT pointing at the API server. The agent refuses to start from a
  Python environment or checkout under /tmp or /dev/shm: pods mount emptyDirs there, which would hide it.
- Volumes, bind-mounted at the pod's own paths inside a private mount namespace per container:
  persistentVolumeClaim -> <root>/volumes/<namespace>/<claim> (kept across pods and agent restarts, shared
  by every agent with the same root, like a ReadWriteMany volume); emptyDir -> a per-pod directory
  (medium Memory: under /dev/shm); configMap, secret, downwardAPI and projected (incl. service-account
  tokens) materialised once at pod start; hostPath; generic ephemeral volumes as claims; subPath,
  subPathExpr and readOnly honoured. The machine's filesystem is not written for a mount point (or
  working directory) it lacks: the parent is covered, in the container's namespace only, by a tmpfs of
  bind mounts of what it held (for `/`, the container changes root into one), and the entry made there.
- Each container runs in a PID namespace of its own, with its own /proc: its main process is PID 1 there, so
  it ignores a signal it has no handler for (SIGKILL aside), as in a container, and when it ends, however it
  ends, the kernel ends every other process of the container, those in sessions of their own (torchrun's
  workers) or daemonised included: none outlives its container.
- Each pod gets a loopback address 127.0.0.x (its podIP) and its own hostname (a UTS namespace). A hosts
  file shared by all agents with the same root, bind-mounted read-only over /etc/hosts, resolves
  `<hostname>.<subdomain>`, `<hostname>.<subdomain>.<ns>.svc.cluster.local` (and the forms between) and
  the bare hostname of every running pod: rank N finds rank 0 at `<job>-0.<service>`.
- Reports phase, conditions, container states, exit codes (128+signal when killed), reasons (Completed,
  Error, OOMKilled when the kernel's OOM-kill count rose while a SIGKILLed container ran, StartError),
  restart counts and termination messages (terminationMessagePath, FallbackToLogsOnError); honours
  restartPolicy with a short backoff (1 s doubling to 30 s).
- Deletion: SIGTERM to each container's main process (the launcher forwards it to torchrun), SIGKILL to it
  after the grace period (the rest of the container ends with it), final status, then the pod is removed
  (delete with grace 0). On start, the main processes an earlier run left are killed (and with them their
  containers) and the pods it had started are marked Failed (reason NodeAgentRestarted). On SIGTERM the
  agent stops its pods (grace at most 10 s), marks them Failed (reason Terminated) and posts the Node
  NotReady.
- Logs: stdout+stderr per container run in <root>/pods/<ns>_<pod>_<uid>/logs/<container>/<n>.log, shown
  by `python -m kubetune_dev node logs NS/POD`, and served over HTTPS as the kubelet's
  /containerLogs/{ns}/{pod}/{container} (follow, tailLines, previous, limitBytes; not timestamps or
  sinceSeconds) so `kubectl logs` works;
  it answers only clients with a certificate from the cluster CA (the API server's kubelet client cert).

What it does NOT do
- Images: `image` is ignored, so a container needs `command`; nothing is pulled or unpacked.
- Isolation and limits: no cgroups, no resource limits, no network namespace, no seccomp,
  capabilities or user switching (securityContext is ignored; everything runs as root). A container sees
  the machine's filesystem (plus its volumes) and writes outside its volumes land on the machine. Pods
  share the machine's network: two pods listening on the same port collide.
- Probes (a running container counts as ready), lifecycle hooks, native sidecars, ephemeral containers,
  exec/attach/port-forward, hostAliases, activeDeadlineSeconds, live updates of configMap/secret volumes,
  token rotation, DNS for Services (only the pod names above resolve), image pull secrets.
"""

from kubetune_dev.nodeagent.agent import LOCAL_NODE_LABEL, LOCAL_NODE_TAINT, NodeAgent, parse_taint, run_agent

__all__ = ["LOCAL_NODE_LABEL", "LOCAL_NODE_TAINT", "NodeAgent", "parse_taint", "run_agent"]
