#!/usr/bin/env bash
# Builds the local control-plane toolchain from Go modules into a cache outside the repository:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (Kubernetes), etcd, kwok, helm,
#   and for the real nodes kubelet (the same Kubernetes module) and CoreDNS.
# Each tool lands in $KUBETUNE_CACHE/toolchain/<tool>-<version>/ so a version bump rebuilds only that tool.
# With everything cached it returns in well under a second; cold it takes many minutes on 2 cores.
# Prints the bin directory holding symlinks to all tools on its last line.
#
#   hack/toolchain.sh             the control plane
#   hack/toolchain.sh kubeflow    also Kubeflow Trainer's controller and JobSet's, which the operator benchmark
#                                 runs beside kubetune (bench/operator_scale.py); their CRDs and runtimes come
#                                 from the same module versions (`go mod download -json`)
set -euo pipefail

K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.21.4
KUBEFLOW_TRAINER_VERSION=v2.3.0
JOBSET_VERSION=v0.12.0  # also in toolchain/jobset/go.mod
COREDNS_VERSION=v1.14.7

here=$(cd "$(dirname "$0")" && pwd)
cache=${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/toolchain
bin=$cache/bin
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local

log() { printf '[toolchain] %s\n' "$*" >&2; }

missing() { # missing <dir> <binaries...>: true when one of them is not built
  local dir=$1 b; shift
  for b in "$@"; do [ -x "$dir/$b" ] || return 0; done
  return 1
}

# build <dir-name> <command that installs into $out> <binaries...>
# One builder per tool and machine: a second caller waits for the first (a lock), then finds it built.
build() {
  local name=$1 cmd=$2; shift 2
  local out=$cache/$name lock
  if missing "$out" "$@"; then
    exec {lock}>"$cache/$name.lock"
    flock "$lock"
  fi
  if missing "$out" "$@"; then
    log "building $name (binaries: $*); this can take many minutes on a cold cache"
    local start=$SECONDS
    rm -rf "$out.tmp" && mkdir -p "$out.tmp"
    out=$out.tmp eval "$cmd"
    rm -rf "$cache/$name" && mv "$cache/$name.tmp" "$cache/$name"
    log "built $name in $((SECONDS - start))s"
  fi
  [ -z "${lock:-}" ] || exec {lock}>&-
  for b in "$@"; do ln -sfn "$cache/$name/$b" "$bin/$b"; done
}

k8s_minor=$(echo "$K8S_VERSION" | cut -d. -f2)
k8s_ldflags="-s -w \
 -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 \
 -X k8s.io/component-base/version.gitMinor=$k8s_minor -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z \
 -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 \
 -X k8s.io/client-go/pkg/version.gitMinor=$k8s_minor"
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$k8s_minor \
 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$k8s_minor"

build "kubernetes-$K8S_VERSION" \
  'cd "$here/toolchain/k8s" && GOBIN=$out go install -trimpath -ldflags "$k8s_ldflags" tool' \
  kube-apiserver kube-controller-manager kube-scheduler kubectl
# The kubelet for the real nodes: its own directory, so adding it rebuilt none of the binaries above.
build "kubelet-$K8S_VERSION" \
  'cd "$here/toolchain/k8s" && GOBIN=$out go install -trimpath -ldflags "$k8s_ldflags" k8s.io/kubernetes/cmd/kubelet' \
  kubelet
build "etcd-$ETCD_VERSION" \
  'cd "$here/toolchain/etcd" && go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3' \
  etcd
build "kwok-$KWOK_VERSION" \
  'GOBIN=$out go install -trimpath -ldflags "-s -w" sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION' \
  kwok
build "helm-$HELM_VERSION" \
  'GOBIN=$out go install -trimpath -ldflags "$helm_ldflags" helm.sh/helm/v3/cmd/helm@$HELM_VERSION' \
  helm
# Cluster DNS for the real nodes' pods (headless Services of the training workers).
build "coredns-$COREDNS_VERSION" \
  'GOBIN=$out go install -trimpath -ldflags "-s -w" github.com/coredns/coredns@$COREDNS_VERSION' \
  coredns
# The pod sandbox's pause process (kubetune_dev.images makes it an image).
build "pause-$(sha256sum "$here/toolchain/pause/main.go" | cut -c1-12)" \
  'cd "$here/toolchain/pause" && go build -trimpath -ldflags "-s -w" -o "$out/pause" .' \
  pause

if [ "${1:-}" = kubeflow ]; then
  build "kubeflow-trainer-$KUBEFLOW_TRAINER_VERSION" \
    'GOBIN=$out go install -trimpath -ldflags "-s -w" github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager@$KUBEFLOW_TRAINER_VERSION' \
    trainer-controller-manager
  build "jobset-$JOBSET_VERSION" \
    'cd "$here/toolchain/jobset" && GOBIN=$out go install -trimpath -ldflags "-s -w -X sigs.k8s.io/jobset/pkg/version.GitVersion=$JOBSET_VERSION" tool' \
    jobset
fi

echo "$bin"
