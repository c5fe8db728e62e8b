#!/usr/bin/env bash
# Builds a Kubernetes control plane for the cluster tests from Go modules:
# etcd (go.etcd.io/etcd/server/v3), kube-apiserver and
# kube-controller-manager (k8s.io/kubernetes, with its k8s.io staging
# modules pinned to the matching v0.x release through replace directives,
# since a dependency's own replace lines pointing into its tree are ignored).
# Usage: build.sh OUT_DIR. Nothing is written into the repository.
set -euo pipefail
out=${1:?usage: build.sh OUT_DIR}
K8S_VERSION=${K8S_VERSION:-v1.34.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.5}
staging=v0.${K8S_VERSION#v1.}
mkdir -p "$out/bin" "$out/src/etcd" "$out/src/k8s"
export GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

cd "$out/src/etcd"
[ -f go.mod ] || go mod init tandem.local/etcd >/dev/null 2>&1
go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
go build -trimpath -ldflags=-s -o "$out/bin/etcd" go.etcd.io/etcd/server/v3

cd "$out/src/k8s"
[ -f go.mod ] || go mod init tandem.local/k8s >/dev/null 2>&1
gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
[ -n "$gomod" ] || { echo "build.sh: cannot download k8s.io/kubernetes@$K8S_VERSION" >&2; exit 1; }
for mod in $(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod"); do
    go mod edit -replace "$mod=$mod@$staging"
done
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
GO
go mod edit -require "k8s.io/kubernetes@$K8S_VERSION"
go mod tidy
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
v=k8s.io/component-base/version
go build -trimpath -o "$out/bin/" \
    -ldflags="-s -X $v.gitVersion=$K8S_VERSION -X $v.gitMajor=1 -X $v.gitMinor=$minor -X $v.gitTreeState=clean" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
"$out/bin/etcd" --version | head -1
"$out/bin/kube-apiserver" --version
