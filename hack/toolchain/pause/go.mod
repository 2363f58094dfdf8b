// The pod sandbox's pause process for the real nodes' containerd (registry.k8s.io is not reachable here).
// Not part of kubetune itself; see hack/toolchain.sh and hack/kubetune_dev/images.py.
module kubetune.invalid/toolchain/pause

go 1.24.0
