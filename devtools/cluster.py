"""A real local control plane: etcd, kube-apiserver, controller-manager, scheduler and kwok.

CLI: `python -m devtools.cluster up|down|status|restart-apiserver`. Everything lives
under `.local/` in the repo (data, logs, certs, pid files); the kubeconfig is
`.local/kubeconfig`. Only loopback addresses are used and every port is picked at start.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from devtools import pki, toolchain, versions
from devtools.paths import REPO_ROOT
from devtools.processes import ComponentFailed, Supervisor, free_ports, log_tail

# Another root lets a second session run its own cluster beside the default one.
DEFAULT_ROOT = Path(os.environ.get("VLLM_OPERATOR_CLUSTER_ROOT", REPO_ROOT / ".local"))
# Stop order: dependants first, etcd last.
COMPONENTS = ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
# Pod IPs in this range are loopback addresses here, so a test can serve at a pod's IP.
# It leaves out 127.0.0.0/16, where real local services listen.
LOOPBACK_POD_CIDR = "127.1.0.0/16"
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass
class ClusterSpec:
    """What to run: address ranges and fake nodes."""

    # kwok hands out pod IPs from this range; a test may pass a 127.x range so that
    # "pod IPs" are reachable loopback addresses on this machine.
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.96.0.0/16"
    gpu_nodes: int = 2
    gpus_per_node: int = 8
    cpu_nodes: int = 1


@dataclass
class Ports:
    """Loopback ports, chosen free at start and kept for restarts."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int

    @classmethod
    def allocate(cls) -> Ports:
        """A set of distinct free ports."""
        return cls(*free_ports(len(fields(cls))))


def node_manifest(name: str, gpus: int, cpu: str, memory: str) -> dict[str, Any]:
    """A fake Node that kwok manages, with its capacity already in status."""
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "1Ti"}
    labels = {
        "type": "kwok",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node-role.kubernetes.io/agent": "",
    }
    if gpus:
        capacity[GPU_RESOURCE] = str(gpus)
        labels["nvidia.com/gpu.present"] = "true"
    # No taint on purpose: the operator's pods carry no kwok toleration.
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def node_manifests(spec: ClusterSpec) -> list[dict[str, Any]]:
    """All fake nodes of a spec: GPU nodes first, then CPU-only nodes."""
    gpu = [node_manifest(f"kwok-gpu-{i}", spec.gpus_per_node, "32", "256Gi") for i in range(spec.gpu_nodes)]
    cpu = [node_manifest(f"kwok-cpu-{i}", 0, "16", "64Gi") for i in range(spec.cpu_nodes)]
    return gpu + cpu


def condition(obj: dict[str, Any], condition_type: str) -> dict[str, Any]:
    """A Kubernetes object's status condition of that type, {} when it has none."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == condition_type), {})


def table_row(table: str, index: int = 0) -> dict[str, str]:
    """Row `index` of `kubectl get` table output by column name, cut at the header's column
    starts: an empty cell (e.g. DESIRED of a model without autoscaling) stays in its column,
    where splitting on whitespace would shift every later one."""
    header, *rows = table.splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    row = rows[index]
    bounds = [*starts[1:], None]
    return {name: row[start:end].strip() for name, start, end in zip(names, starts, bounds, strict=True)}


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    alive: Callable[[], None] = lambda: None,
    interval: float = 0.2,
) -> None:
    """Poll check() until true; alive() raises if a process we wait on has died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        if check():
            return
        time.sleep(interval)
    alive()
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class KubeClient:
    """kubectl and helm against one cluster's kubeconfig, with helm's state kept under `root`."""

    def __init__(self, root: Path, kubeconfig: Path) -> None:
        self.root = root
        self.kubeconfig = kubeconfig

    def env(self) -> dict[str, str]:
        """Environment for clients: our kubeconfig, and helm's state kept under .local."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        for kind in ("CACHE", "CONFIG", "DATA"):
            env[f"HELM_{kind}_HOME"] = str(self.root / "helm" / kind.lower())
        return env

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; text output captured."""
        return self.run_tool(kubectl_binary(), args, input, check, timeout)

    def get_json(self, *args: str, namespace: str | None = None, check: bool = True) -> Any:
        """`kubectl get ARGS -o json`, parsed; None when kubectl failed and check is False."""
        scope = ["-n", namespace] if namespace else []
        proc = self.kubectl("get", *args, *scope, "-o", "json", check=check)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def apply(self, manifest: dict[str, Any], *flags: str, namespace: str | None = None) -> str:
        """`kubectl apply -f -` of one manifest (as JSON on stdin); kubectl's output."""
        scope = ["-n", namespace] if namespace else []
        return self.kubectl("apply", *scope, *flags, "-f", "-", input=json.dumps(manifest), check=True).stdout

    def helm(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster; text output captured."""
        return self.run_tool(str(toolchain.binary("helm")), args, input, check, timeout)

    def run_tool(
        self, binary: str, args: Sequence[str], input: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run a client binary with our environment; raise with its output if check fails."""
        proc = subprocess.run(
            [binary, *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise ToolError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def has_default_service_account(self, namespace: str) -> bool:
        """True once the controller-manager has made the namespace's default ServiceAccount."""
        return self.kubectl("get", "serviceaccount", "default", "-n", namespace).returncode == 0

    def create_namespace(self, name: str, timeout: float = 30) -> None:
        """Create a namespace and wait for its default ServiceAccount (pods are refused before)."""
        self.kubectl("create", "namespace", name, check=True)
        wait_until(
            lambda: self.has_default_service_account(name), f"ServiceAccount default in {name}", timeout
        )


class ToolError(subprocess.CalledProcessError):
    """A client binary failed; its message ends with what the binary printed on stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{str(self.stderr or '').strip()[-2000:]}"


class LocalCluster(KubeClient):
    """One local control plane rooted at a directory (default `.local/`)."""

    def __init__(self, root: Path | None = None, spec: ClusterSpec | None = None) -> None:
        root = root or DEFAULT_ROOT
        super().__init__(root, root / "kubeconfig")
        self.run_dir = self.root / "cluster"
        self.spec = spec or ClusterSpec()
        self.ports = Ports.allocate()
        self.pki = pki.Pki(self.run_dir / "pki")
        self.supervisor = Supervisor(self.run_dir, str(toolchain.cache_root()))
        self.started_seconds: float | None = None

    # ---- state shared between CLI invocations -------------------------------------------

    @property
    def state_file(self) -> Path:
        """Ports and spec of the running cluster, for `status`, `down` and restarts."""
        return self.run_dir / "state.json"

    def save_state(self) -> None:
        """Record ports and spec."""
        state = {"ports": asdict(self.ports), "spec": asdict(self.spec)}
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    @classmethod
    def load(cls, root: Path | None = None) -> LocalCluster:
        """A handle on a cluster started earlier (possibly by another process)."""
        cluster = cls(root)
        if cluster.state_file.exists():
            state = json.loads(cluster.state_file.read_text())
            cluster.ports = Ports(**state["ports"])
            cluster.spec = ClusterSpec(**state["spec"])
        return cluster

    @property
    def server(self) -> str:
        """The API server URL."""
        return f"https://127.0.0.1:{self.ports.apiserver}"

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Start everything from scratch and wait until nodes are Ready."""
        started = time.monotonic()
        try:
            self.start_once(timeout)
        except ComponentFailed as error:
            # A port picked as free can be taken before our process binds it: retry once.
            if "address already in use" not in str(error):
                raise
            self.ports = Ports.allocate()
            self.start_once(timeout)
        self.started_seconds = time.monotonic() - started

    def start_once(self, timeout: float) -> None:
        """One attempt at starting everything on the current ports."""
        self.stop()  # stale processes and data from an earlier run
        binaries = self.binaries()
        self.run_dir.mkdir(parents=True)
        self.pki = pki.make_all(self.run_dir / "pki", self.spec.service_cidr)
        self.save_state()
        self.write_kubeconfig()
        try:
            self.start_etcd(binaries["etcd"], timeout)
            self.start_apiserver(binaries["kube-apiserver"], timeout)
            self.start_controllers(binaries, timeout)
            self.create_nodes()
            self.wait_ready(timeout)
        except BaseException:
            # Leave no half-started control plane behind; logs stay for the post-mortem.
            self.supervisor.stop_all(COMPONENTS)
            raise

    def stop(self, remove_data: bool = True) -> None:
        """Stop every process (ours or stale ones from pid files) and remove the data."""
        self.supervisor.stop_all(COMPONENTS)
        if remove_data:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.kubeconfig.unlink(missing_ok=True)

    def restart_apiserver(self, timeout: float = 60.0, downtime: float = 0.0) -> None:
        """Stop kube-apiserver and start it again on the same port and data."""
        # SIGTERM first; it lingers on open watches, so it is SIGKILLed after 5 s.
        self.supervisor.stop("kube-apiserver")
        time.sleep(downtime)
        self.start_apiserver(self.binaries()["kube-apiserver"], timeout)

    def binaries(self) -> dict[str, Path]:
        """Paths of the control-plane binaries, building any that are missing."""
        names = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
        return {name: toolchain.binary(name) for name in names}

    # ---- components -----------------------------------------------------------------------

    def start_etcd(self, binary: Path, timeout: float) -> None:
        """Single-member etcd on loopback; fsync off because the data is throwaway."""
        client = f"http://127.0.0.1:{self.ports.etcd_client}"
        peer = f"http://127.0.0.1:{self.ports.etcd_peer}"
        self.supervisor.start(
            "etcd",
            [
                str(binary),
                "--name=local",
                f"--data-dir={self.run_dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=local={peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        wait_until(
            lambda: self.http_ok(f"{client}/health"),
            "etcd /health",
            timeout,
            lambda: self.supervisor.check_alive("etcd"),
        )

    def apiserver_args(self, binary: Path) -> list[str]:
        """kube-apiserver's command line."""
        p = self.pki
        return [
            str(binary),
            f"--etcd-servers=http://127.0.0.1:{self.ports.etcd_client}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports.apiserver}",
            f"--cert-dir={self.run_dir / 'certs'}",
            f"--tls-cert-file={p.serving_cert}",
            f"--tls-private-key-file={p.serving_key}",
            f"--client-ca-file={p.ca_cert}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={self.spec.service_cidr}",
            # The reconciler refuses loopback addresses; nothing in-cluster calls the API.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
            "--profiling=false",
        ]

    def start_apiserver(self, binary: Path, timeout: float) -> None:
        """Start kube-apiserver and wait for /readyz."""
        self.supervisor.start("kube-apiserver", self.apiserver_args(binary))
        wait_until(
            lambda: self.http_ok(f"{self.server}/readyz", client_cert=True),
            "kube-apiserver /readyz",
            timeout,
            lambda: self.supervisor.check_alive("kube-apiserver"),
        )

    def start_controllers(self, binaries: dict[str, Path], timeout: float) -> None:
        """Start controller-manager, scheduler and kwok, and wait for their health."""
        kubeconfig = str(self.kubeconfig)
        common = [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
            f"--cert-dir={self.run_dir / 'certs'}",
            # No front-proxy CA here; looking it up only fills the logs with errors.
            "--authentication-skip-lookup=true",
        ]
        self.supervisor.start(
            "kube-controller-manager",
            [
                str(binaries["kube-controller-manager"]),
                *common,
                f"--secure-port={self.ports.controller_manager}",
                # Signs service-account tokens and publishes kube-root-ca.crt in every namespace.
                f"--service-account-private-key-file={self.pki.sa_key}",
                f"--root-ca-file={self.pki.ca_cert}",
                f"--cluster-signing-cert-file={self.pki.ca_cert}",
                f"--cluster-signing-key-file={self.pki.ca_key}",
                f"--service-cluster-ip-range={self.spec.service_cidr}",
                "--controllers=*",
            ],
        )
        self.supervisor.start(
            "kube-scheduler",
            [
                str(binaries["kube-scheduler"]),
                *common,
                f"--secure-port={self.ports.scheduler}",
            ],
        )
        self.start_kwok(binaries["kwok"])
        for name, port in (
            ("kube-controller-manager", self.ports.controller_manager),
            ("kube-scheduler", self.ports.scheduler),
        ):
            self.wait_healthz(name, port, timeout)

    def wait_healthz(self, name: str, port: int, timeout: float) -> None:
        """Wait for a component's /healthz on its loopback port."""
        wait_until(
            lambda: self.http_ok(f"https://127.0.0.1:{port}/healthz"),
            f"{name} /healthz",
            timeout,
            self.check_all_alive,
        )

    def start_kwok(self, binary: Path) -> None:
        """kwok managing only the nodes annotated as fake, handing out pod IPs."""
        configs = [f"--config={path}" for path in toolchain.kwok_stage_files()]
        self.supervisor.start(
            "kwok",
            [
                str(binary),
                f"--kubeconfig={self.kubeconfig}",
                *configs,
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                f"--cidr={self.spec.pod_cidr}",
                "--node-ip=127.0.0.1",
                # Heartbeats through Leases, as kubelets do: the node controller keeps them Ready.
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{self.ports.kwok}",
                # INFO logs every node-lease renewal (a line per node every 10 s).
                "--v=WARN",
            ],
        )

    def create_nodes(self) -> None:
        """Create the fake nodes (status included, which kwok then keeps alive)."""
        items = {"apiVersion": "v1", "kind": "List", "items": node_manifests(self.spec)}
        self.kubectl("create", "-f", "-", input=json.dumps(items), check=True)

    def wait_ready(self, timeout: float) -> None:
        """Nodes Ready and the default ServiceAccount present, so pods can be created."""
        wait_until(self.nodes_ready, "fake nodes to be Ready", timeout, self.check_all_alive, 0.5)
        wait_until(
            lambda: self.has_default_service_account("default"),
            "the default ServiceAccount",
            timeout,
            self.check_all_alive,
            0.5,
        )

    def check_all_alive(self) -> None:
        """Raise with a log tail if any component we started has exited."""
        for name in COMPONENTS:
            self.supervisor.check_alive(name)

    def nodes_ready(self) -> bool:
        """True when every fake node reports Ready=True."""
        got = self.get_json("nodes", check=False)
        if got is None:
            return False
        nodes = got["items"]
        expected = self.spec.gpu_nodes + self.spec.cpu_nodes
        ready = [n for n in nodes if condition(n, "Ready").get("status") == "True"]
        return len(nodes) >= expected and len(ready) == len(nodes)

    # ---- clients --------------------------------------------------------------------------

    def write_kubeconfig(self) -> None:
        """An admin kubeconfig with the certificates embedded (self-contained)."""

        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {"server": self.server, "certificate-authority-data": b64(self.pki.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(self.pki.admin_cert),
                        "client-key-data": b64(self.pki.admin_key),
                    },
                }
            ],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
            "current-context": "local",
        }
        self.kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)

    def http_ok(self, url: str, client_cert: bool = False) -> bool:
        """True on HTTP 200; the cluster CA is trusted, and the admin cert sent if asked."""
        context: ssl.SSLContext | None = None
        if url.startswith("https"):
            context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
            if client_cert:
                context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
            else:
                # controller-manager and scheduler serve self-signed certs of their own.
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    # ---- reporting ------------------------------------------------------------------------

    def status(self) -> dict[str, str]:
        """State of each component: its pid when running, else 'stopped'."""
        report = {}
        for name in reversed(COMPONENTS):
            pid = self.supervisor.pid(name)
            report[name] = f"running (pid {pid})" if pid else "stopped"
        if self.state_file.exists():
            ready = self.http_ok(f"{self.server}/readyz", client_cert=True)
            report["readyz"] = f"{self.server} {'ok' if ready else 'NOT ready'}"
        return report


def kubectl_binary() -> str:
    """kubectl matching the server if built, else the one on PATH."""
    if toolchain.KUBECTL.is_cached():
        return str(toolchain.KUBECTL.directory / "kubectl")
    found = shutil.which("kubectl")
    if found is None:
        raise FileNotFoundError("no kubectl: run `make tools`")
    return found


def explain_failure(cluster: LocalCluster, error: BaseException) -> str:
    """An error message with the failing component's log tail (if the error lacks one)."""
    if isinstance(error, ComponentFailed):
        return str(error)
    tails = [
        f"--- {name} ---\n{log_tail(cluster.supervisor.log_path(name), 15)}"
        for name in reversed(COMPONENTS)
        if cluster.supervisor.log_path(name).exists()
    ]
    return f"{error}\n" + "\n".join(tails)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="local Kubernetes control plane")
    parser.add_argument("command", choices=["up", "down", "status", "restart-apiserver"])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="state directory")
    parser.add_argument("--pod-cidr", default=ClusterSpec.pod_cidr)
    parser.add_argument("--gpu-nodes", type=int, default=ClusterSpec.gpu_nodes)
    parser.add_argument("--gpus-per-node", type=int, default=ClusterSpec.gpus_per_node)
    parser.add_argument("--cpu-nodes", type=int, default=ClusterSpec.cpu_nodes)
    args = parser.parse_args(argv)
    if args.command == "up":
        spec = ClusterSpec(
            pod_cidr=args.pod_cidr,
            gpu_nodes=args.gpu_nodes,
            gpus_per_node=args.gpus_per_node,
            cpu_nodes=args.cpu_nodes,
        )
        cluster = LocalCluster(args.root, spec)
        try:
            cluster.start()
        except (ComponentFailed, TimeoutError, subprocess.CalledProcessError) as error:
            print(f"cluster up FAILED: {explain_failure(cluster, error)}", file=sys.stderr)
            return 1
        print(
            f"cluster up in {cluster.started_seconds:.1f}s: Kubernetes {versions.KUBERNETES} "
            f"at {cluster.server}\nexport KUBECONFIG={cluster.kubeconfig}"
        )
        return 0
    cluster = LocalCluster.load(args.root)
    if args.command == "down":
        cluster.stop()
        print("cluster down: processes stopped, data removed")
    elif args.command == "restart-apiserver":
        cluster.restart_apiserver()
        print("kube-apiserver restarted")
    else:
        for name, state in cluster.status().items():
            print(f"{name:24} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
