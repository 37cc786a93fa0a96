"""Build the local control plane's binaries from source into a per-version cache.

Run `python -m devtools.toolchain` (or `make tools`). Each component lands in
`~/.cache/vllm-operator/bin/<component>-<version>/`; a component whose directory already
holds all its binaries is skipped, so a second run is a no-op.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from devtools import versions

HARNESS_DIR = Path(__file__).resolve().parent
HEARTBEAT_SECONDS = 60.0
# A fixed build date keeps the link step reproducible, so warm rebuilds stay cheap.
BUILD_DATE = "2026-01-01T00:00:00Z"
# The kwok stages (node and pod lifecycles) the standalone kwok binary needs as config;
# copied from the pinned kwok module so they always match the binary.
KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)


class ToolchainError(RuntimeError):
    """A component could not be built."""


def cache_root() -> Path:
    """Where built binaries live; outside the repo so `git clean` keeps them."""
    override = os.environ.get("VLLM_OPERATOR_CACHE")
    base = Path(override) if override else Path.home() / ".cache" / "vllm-operator"
    return base / "bin"


@dataclass(frozen=True)
class Component:
    """One cached, versioned group of binaries and how to build them."""

    name: str
    version: str
    binaries: tuple[str, ...]
    build: Callable[[Path], None]
    extra_files: tuple[str, ...] = ()

    @property
    def directory(self) -> Path:
        """The cache directory of this component and version."""
        return cache_root() / f"{self.name}-{self.version}"

    def is_cached(self) -> bool:
        """True when every binary and extra file is already in the cache."""
        wanted = (*self.binaries, *self.extra_files)
        return all((self.directory / name).exists() for name in wanted)


def go_env(**extra: str) -> dict[str, str]:
    """The environment for `go`: static binaries, no toolchain download."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(versions.GO).parent}{os.pathsep}{env.get('PATH', '')}"
    env["CGO_ENABLED"] = "0"
    # The pinned Go must build everything; a silent toolchain download would hide drift.
    env["GOTOOLCHAIN"] = "local"
    env.update(extra)
    return env


def run_go(args: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    """Run one go command, raising with its output when it fails."""
    cmd = [versions.GO, *args]
    started = time.monotonic()
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or go_env(), stdout=output, stderr=subprocess.STDOUT)
        # A cold Kubernetes build is silent for 15 minutes; say it is still alive.
        while True:
            try:
                proc.wait(timeout=HEARTBEAT_SECONDS)
                break
            except subprocess.TimeoutExpired:
                log(f"  ... still running `go {args[0]}` ({time.monotonic() - started:.0f}s)")
        output.seek(0)
        text = output.read().decode(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-40:])
        raise ToolchainError(f"{' '.join(cmd)} failed in {cwd}:\n{tail}")


def version_ldflags(package: str, version: str) -> list[str]:
    """-X flags that stamp a Kubernetes-style version package."""
    major, minor = version.lstrip("v").split(".")[:2]
    values = {
        "gitVersion": version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": BUILD_DATE,
    }
    return [f"-X {package}.{key}={value}" for key, value in values.items()]


def check_wrapper(module_dir: Path, *needles: str) -> None:
    """Fail early when a wrapper go.mod does not pin the versions in versions.py."""
    text = (module_dir / "go.mod").read_text()
    missing = [needle for needle in needles if needle not in text]
    if missing:
        raise ToolchainError(
            f"{module_dir}/go.mod does not mention {missing}; update it to match versions.py"
        )


def go_build_kubernetes(out: str, commands: list[str]) -> None:
    """`go build` Kubernetes commands from the k8s wrapper module into `out` (a directory with a
    trailing slash, or one binary's path), stamped with the Kubernetes version."""
    flags = ["-s", "-w"]
    # Without these the server reports v0.0.0 and helm refuses kubeVersion-gated charts.
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += version_ldflags(package, versions.KUBERNETES)
    packages = [f"k8s.io/kubernetes/cmd/{name}" for name in commands]
    run_go(["build", "-trimpath", "-ldflags", " ".join(flags), "-o", out, *packages], HARNESS_DIR / "k8s")


def build_kubernetes(out: Path) -> None:
    """Build the three control-plane commands in one `go build` (they share most code)."""
    check_wrapper(
        HARNESS_DIR / "k8s",
        f"k8s.io/kubernetes {versions.KUBERNETES}",
        f"k8s.io/api {versions.KUBERNETES_STAGING}",
    )
    go_build_kubernetes(f"{out}/", list(KUBERNETES.binaries))


def build_kubernetes_node(out: Path) -> None:
    """Build kubelet, kubeadm and kube-proxy for the kind node image (same wrapper, shared cache)."""
    go_build_kubernetes(f"{out}/", list(KUBERNETES_NODE.binaries))


def build_kubectl(out: Path) -> None:
    """Build kubectl from the same wrapper so the client matches the server version."""
    go_build_kubernetes(f"{out}/kubectl", ["kubectl"])


def build_etcd(out: Path) -> None:
    """Build the etcd server through its wrapper module."""
    module = HARNESS_DIR / "etcd"
    check_wrapper(module, f"go.etcd.io/etcd/server/v3 {versions.ETCD}")
    run_go(
        ["build", "-trimpath", "-ldflags", "-s -w", "-o", f"{out}/etcd", "go.etcd.io/etcd/server/v3"],
        module,
    )


def go_install(out: Path, package: str, ldflags: Sequence[str]) -> None:
    """`go install package` with GOBIN pointing into the cache."""
    args = ["install", "-trimpath", "-ldflags", " ".join(["-s", "-w", *ldflags]), package]
    # Run outside the repo so no go.mod around us interferes with `pkg@version`.
    run_go(args, cwd=out, env=go_env(GOBIN=str(out)))


def module_dir(module: str, version: str) -> Path:
    """The directory of a downloaded module in the Go module cache."""
    proc = subprocess.run(
        [versions.GO, "mod", "download", "-json", f"{module}@{version}"],
        env=go_env(),
        capture_output=True,
        text=True,
        check=False,
        cwd=HARNESS_DIR,
    )
    if proc.returncode != 0:
        raise ToolchainError(f"go mod download {module}@{version}: {proc.stderr.strip()}")
    for line in proc.stdout.splitlines():
        key, _, value = line.strip().partition(": ")
        if key == '"Dir"':
            return Path(value.strip('",'))
    raise ToolchainError(f"go mod download {module}@{version} printed no Dir")


def build_kwok(out: Path) -> None:
    """Install kwok and keep its stage files beside the binary."""
    consts = "sigs.k8s.io/kwok/pkg/consts"
    go_install(
        out,
        f"sigs.k8s.io/kwok/cmd/kwok@{versions.KWOK}",
        [f"-X {consts}.Version={versions.KWOK}", f"-X {consts}.KubeVersion={versions.KUBERNETES}"],
    )
    source = module_dir("sigs.k8s.io/kwok", versions.KWOK)
    stages = out / "stages"
    stages.mkdir(exist_ok=True)
    for relative in KWOK_STAGES:
        shutil.copyfile(source / relative, stages / Path(relative).name)


def build_helm(out: Path) -> None:
    """Install helm with its version, and default capabilities matching our cluster."""
    major, minor = versions.kubernetes_major(), versions.kubernetes_minor()
    flags = [
        f"-X helm.sh/helm/v3/internal/version.version={versions.HELM}",
        "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
    ]
    for package in ("helm.sh/helm/v3/pkg/lint/rules", "helm.sh/helm/v3/pkg/chartutil"):
        flags += [f"-X {package}.k8sVersionMajor={major}", f"-X {package}.k8sVersionMinor={minor}"]
    go_install(out, f"helm.sh/helm/v3/cmd/helm@{versions.HELM}", flags)


def build_coredns(out: Path) -> None:
    """Install CoreDNS (the cluster DNS of the kind node image)."""
    go_install(out, f"github.com/coredns/coredns@{versions.COREDNS}", [])


def build_kind(out: Path) -> None:
    """Install kind (its podman provider runs the node image here)."""
    go_install(out, f"sigs.k8s.io/kind@{versions.KIND}", [])


def build_pause(out: Path) -> None:
    """Build the pod sandbox's pause program from devtools/kind/pause (no dependencies)."""
    run_go(
        ["build", "-trimpath", "-ldflags", "-s -w", "-o", f"{out}/pause", "."], HARNESS_DIR / "kind" / "pause"
    )


KUBERNETES = Component(
    "kubernetes",
    versions.KUBERNETES,
    ("kube-apiserver", "kube-controller-manager", "kube-scheduler"),
    build_kubernetes,
)
KUBECTL = Component("kubectl", versions.KUBERNETES, ("kubectl",), build_kubectl)
ETCD = Component("etcd", versions.ETCD, ("etcd",), build_etcd)
KWOK = Component(
    "kwok",
    versions.KWOK,
    ("kwok",),
    build_kwok,
    tuple(f"stages/{Path(p).name}" for p in KWOK_STAGES),
)
HELM = Component("helm", versions.HELM, ("helm",), build_helm)
KUBERNETES_NODE = Component(
    "kubernetes-node", versions.KUBERNETES, ("kubelet", "kubeadm", "kube-proxy"), build_kubernetes_node
)
COREDNS = Component("coredns", versions.COREDNS, ("coredns",), build_coredns)
KIND = Component("kind", versions.KIND, ("kind",), build_kind)
PAUSE = Component("pause", versions.PAUSE, ("pause",), build_pause)
# The kwok tier's components; `make tools` builds these.
COMPONENTS = (KUBERNETES, ETCD, KWOK, HELM, KUBECTL)
# What the kind tier adds: the node binaries and the images kubeadm asks for.
KIND_COMPONENTS = (KUBERNETES_NODE, COREDNS, KIND, PAUSE)
ALL_COMPONENTS = (*COMPONENTS, *KIND_COMPONENTS)


def log(message: str) -> None:
    """One progress line on stderr, flushed so `make` shows it at once."""
    print(f"[tools] {message}", file=sys.stderr, flush=True)


@contextmanager
def build_lock() -> Iterator[None]:
    """Serialise builds across processes (parallel test runs share the cache)."""
    cache_root().mkdir(parents=True, exist_ok=True)
    with (cache_root() / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure(component: Component) -> float | None:
    """Build the component unless cached; return the seconds spent, or None if cached."""
    if component.is_cached():
        return None
    with build_lock():
        # Another process may have finished the same build while we waited.
        if component.is_cached():
            return None
        return build(component)


def build(component: Component) -> float:
    """Build one component into its cache directory; return the seconds spent."""
    if not Path(versions.GO).exists():
        raise ToolchainError(f"Go not found at {versions.GO} (see devtools/versions.py)")
    names = ", ".join(component.binaries)
    log(f"building {component.name} {component.version} ({names}) ...")
    started = time.monotonic()
    # Build into a scratch directory and rename, so an interrupted build never looks cached.
    partial = component.directory.with_name(component.directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    component.build(partial)
    shutil.rmtree(component.directory, ignore_errors=True)
    partial.rename(component.directory)
    seconds = time.monotonic() - started
    (component.directory / "build-seconds").write_text(f"{seconds:.1f}\n")
    log(f"built {component.name} {component.version} in {seconds:.0f}s -> {component.directory}")
    return seconds


def ensure_all(components: Sequence[Component] = COMPONENTS) -> dict[str, float | None]:
    """Build every missing component; return build seconds by name (None when cached)."""
    return {component.name: ensure(component) for component in components}


def binary(name: str) -> Path:
    """The cached path of a binary by name, building its component if needed."""
    for component in ALL_COMPONENTS:
        if name in component.binaries:
            ensure(component)
            return component.directory / name
    raise KeyError(name)


def kwok_stage_files() -> list[Path]:
    """The kwok stage configs saved beside the kwok binary."""
    ensure(KWOK)
    return [KWOK.directory / name for name in KWOK.extra_files]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: build what is missing, or print the paths with --print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--print", action="store_true", help="print cache paths and exit")
    parser.add_argument("names", nargs="*", help="components to build (default: all)")
    parser.add_argument("--kind", action="store_true", help="also the kind tier's components")
    args = parser.parse_args(argv)
    pool = ALL_COMPONENTS if args.kind or args.names else COMPONENTS
    chosen = [c for c in pool if not args.names or c.name in args.names]
    if args.print:
        for component in chosen:
            state = "cached" if component.is_cached() else "missing"
            print(f"{component.name:12} {component.version:9} {state:8} {component.directory}")
        return 0
    started = time.monotonic()
    try:
        spent = ensure_all(chosen)
    except ToolchainError as error:
        log(f"FAILED: {error}")
        return 1
    if all(seconds is None for seconds in spent.values()):
        log(f"everything cached under {cache_root()} ({time.monotonic() - started:.1f}s)")
    else:
        log(f"done in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
