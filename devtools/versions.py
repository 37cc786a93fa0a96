"""Every version of the local control plane's toolchain, pinned in one place."""

from __future__ import annotations

# Kubernetes control plane (kube-apiserver, kube-controller-manager, kube-scheduler),
# built from k8s.io/kubernetes through the wrapper module in devtools/k8s/.
KUBERNETES = "v1.37.2"
# The published staging modules (k8s.io/api, k8s.io/client-go, ...) that match KUBERNETES.
KUBERNETES_STAGING = "v0.37.2"
# etcd server, built from go.etcd.io/etcd/server/v3 through devtools/etcd/.
ETCD = "v3.7.3"
# kwok keeps fake nodes alive and runs bound pods (plain `go install`).
KWOK = "v0.8.0"
# helm, for the chart tests (plain `go install`).
HELM = "v3.22.0"
# The kind tier (tests/kind): kind with its podman provider, CoreDNS and the pod sandbox's
# pause program, baked with kubelet/kubeadm/kube-proxy (built like the control plane) into
# the node image. kubeadm KUBERNETES asks for these image tags.
KIND = "v0.33.0"
COREDNS = "v1.14.6"
PAUSE = "3.10.2"
ETCD_IMAGE_TAG = "3.7.0-0"

# The Go toolchain the builds use; the wrapper modules declare `go 1.26.0`.
GO = "/usr/local/go/bin/go"


def kubernetes_minor() -> str:
    """The minor number of KUBERNETES, e.g. "37" for v1.37.2."""
    return KUBERNETES.lstrip("v").split(".")[1]


def kubernetes_major() -> str:
    """The major number of KUBERNETES, e.g. "1" for v1.37.2."""
    return KUBERNETES.lstrip("v").split(".")[0]
