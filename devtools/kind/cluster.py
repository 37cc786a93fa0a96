"""A kind cluster whose pods really run: created from the project's node image, given the
project's images, a fake GPU count and a volume holding the tiny model; and torn down so
that nothing is left on the machine (`clean`, `leftovers`).

kind runs here with its podman provider (no Docker daemon); pytest-kind drives it in the
tests (tests/kind), `make demo` through `devtools.demo`.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from devtools import toolchain
from devtools.cluster import GPU_RESOURCE, KubeClient, condition, wait_until
from devtools.kind import images
from devtools.kind.engine import Engine, EngineError, log, state_dir

# Clusters this project creates are named with this prefix; `clean` deletes only those.
CLUSTER_PREFIX = "vllm-operator-"
TEST_CLUSTER = CLUSTER_PREFIX + "test"
DEMO_CLUSTER = CLUSTER_PREFIX + "demo"
KIND_NETWORK = "kind"
# Fake GPUs on the node, so that the operator's pods (which ask for nvidia.com/gpu) schedule:
# 2 replicas plus a surge pod during a rollout fit.
NODE_GPUS = 8
# Where the tiny model lives on the node, and the volume that serves it as pvc://model-store.
MODEL_DIR = "/var/local-models"
MODEL_CLAIM = "model-store"
# Host settings netavark and kubelet change machine-wide; saved before the first cluster and
# put back by `clean`.
HOST_SYSCTLS = (
    "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding", "net.ipv6.conf.default.forwarding",
    "vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops",
    "fs.protected_regular", "fs.protected_fifos", "fs.protected_hardlinks", "fs.protected_symlinks",
)  # fmt: skip


def sysctl_path(key: str) -> Path:
    return Path("/proc/sys") / key.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    return {key: sysctl_path(key).read_text().strip() for key in HOST_SYSCTLS if sysctl_path(key).exists()}


def saved_sysctls_file() -> Path:
    return state_dir() / "host-sysctls.json"


# kind always mounts /lib/modules into the node and podman refuses a missing path; a machine
# without kernel modules (as here) gets an empty folder, removed again by `clean`.
MODULES_DIR = Path("/lib/modules")


def created_modules_marker() -> Path:
    return state_dir() / "created-lib-modules"


def save_host_sysctls() -> None:
    """Record the host's values once, before anything of ours has changed them, and make sure
    /lib/modules exists."""
    if not saved_sysctls_file().exists():
        saved_sysctls_file().write_text(json.dumps(read_sysctls(), indent=1) + "\n")
    if not MODULES_DIR.exists():
        MODULES_DIR.mkdir(parents=True)
        created_modules_marker().touch()


def restore_host_sysctls() -> list[str]:
    """Put back the saved values; the keys that had changed."""
    if not saved_sysctls_file().exists():
        return []
    saved: dict[str, str] = json.loads(saved_sysctls_file().read_text())
    changed = []
    for key, value in saved.items():
        path = sysctl_path(key)
        if path.exists() and path.read_text().strip() != value:
            path.write_text(value + "\n")
            changed.append(key)
    saved_sysctls_file().unlink()
    return changed


def remove_netavark_chains() -> list[str]:
    """Delete the chains netavark (podman's network stack) adds on first use and never removes,
    with the rules that jump to them; call only when no podman network is in use."""
    removed = []
    for tool in ("iptables", "ip6tables"):
        for table in ("nat", "filter"):
            listing = subprocess.run([tool, "-t", table, "-S"], capture_output=True, text=True, check=False)
            lines = [line for line in listing.stdout.splitlines() if "NETAVARK" in line]
            # Rules first (jumps from the base chains, then each chain's own), then the chains.
            for line in [line for line in lines if line.startswith("-A ")]:
                subprocess.run(
                    [tool, "-t", table, "-D", *shlex.split(line)[1:]], capture_output=True, check=False
                )
            for line in [line for line in lines if line.startswith("-N ")]:
                chain = line.split()[1]
                subprocess.run([tool, "-t", table, "-X", chain], capture_output=True, check=False)
                removed.append(f"{tool} {table} {chain}")
    return removed


def kind_binary() -> Path:
    return toolchain.binary("kind")


def kind(
    engine: Engine, *args: str, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """Run kind with the engine's environment (provider, containers.conf)."""
    proc = subprocess.run(
        [str(kind_binary()), *args],
        env=engine.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise EngineError(f"kind {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def our_clusters(engine: Engine) -> list[str]:
    """kind clusters on this machine that this project made."""
    proc = kind(engine, "get", "clusters", check=False)
    return [name for name in proc.stdout.split() if name.startswith(CLUSTER_PREFIX)]


def clean(engine: Engine) -> list[str]:
    """Delete every cluster of ours, the kind network when no cluster is left, and put back
    the host settings; what was removed (for the log)."""
    removed = []
    for name in our_clusters(engine):
        kind(engine, "delete", "cluster", "--name", name)
        removed.append(f"cluster {name}")
    other = kind(engine, "get", "clusters", check=False).stdout.split()
    if not other and engine.is_podman:
        if engine.run("network", "exists", KIND_NETWORK, check=False).returncode == 0:
            engine.run("network", "rm", "-f", KIND_NETWORK)
            removed.append(f"network {KIND_NETWORK}")
        removed += [f"sysctl {key}" for key in restore_host_sysctls()]
        running = engine.run("ps", "-q", check=False).stdout.split()
        if not running:
            removed += remove_netavark_chains()
        if created_modules_marker().exists():
            if MODULES_DIR.exists() and not any(MODULES_DIR.iterdir()):
                MODULES_DIR.rmdir()
                removed.append(f"empty {MODULES_DIR}")
            created_modules_marker().unlink()
    return removed


def leftovers(engine: Engine) -> list[str]:
    """What a cluster of ours could have left on the machine; empty when clean."""
    found = []
    for name in our_clusters(engine):
        found.append(f"kind cluster {name}")
    containers = engine.run(
        "ps", "-a", "--filter", "label=io.x-k8s.kind.cluster", "--format", "{{.Names}}", check=False
    ).stdout.split()
    found += [f"node container {name}" for name in containers if name.startswith(CLUSTER_PREFIX)]
    if engine.is_podman and engine.run("network", "exists", KIND_NETWORK, check=False).returncode == 0:
        found.append(f"podman network {KIND_NETWORK}")
    for pattern in ("containerd-shim", "kubelet", "vllm_server", "kube-apiserver --advertise"):
        pids = subprocess.run(
            ["pgrep", "-f", pattern], capture_output=True, text=True, check=False
        ).stdout.split()
        found += [f"process {pid} ({pattern})" for pid in pids]
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=False)
    if "NETAVARK" in ruleset.stdout or "KUBE-" in ruleset.stdout:
        found.append("nftables chains NETAVARK-*/KUBE-*")
    if created_modules_marker().exists():
        found.append(f"{MODULES_DIR} made for kind")
    if saved_sysctls_file().exists():
        saved = json.loads(saved_sysctls_file().read_text())
        now = read_sysctls()
        found += [
            f"sysctl {key}={now.get(key)} (was {value})"
            for key, value in saved.items()
            if now.get(key) != value
        ]
    return found


class KindCluster(KubeClient):
    """A running kind cluster of ours: kubectl/helm clients plus the node-level steps."""

    def __init__(self, engine: Engine, name: str, kubeconfig: Path, root: Path) -> None:
        super().__init__(root, kubeconfig)
        self.engine = engine
        self.name = name

    @property
    def node(self) -> str:
        """The node container (single-node clusters)."""
        return f"{self.name}-control-plane"

    def node_exec(
        self, *args: str, stdin: int | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.engine.run(
            "exec", *(["-i"] if stdin is not None else []), self.node, *args, check=check, stdin=stdin
        )

    # ---- bring-up -------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 300) -> None:
        """The node Ready and every kube-system pod Ready (kind creates without --wait)."""

        def ready() -> bool:
            nodes = self.get_json("nodes", check=False) or {"items": []}
            if not nodes["items"] or any(
                condition(n, "Ready").get("status") != "True" for n in nodes["items"]
            ):
                return False
            pods = self.get_json("pods", namespace="kube-system", check=False) or {"items": []}
            return bool(pods["items"]) and all(
                condition(p, "Ready").get("status") == "True" for p in pods["items"]
            )

        wait_until(ready, f"kind cluster {self.name} node and kube-system pods Ready", timeout, interval=2)

    def add_fake_gpus(self, count: int = NODE_GPUS) -> None:
        """Give the node `count` nvidia.com/gpu in its status, so that GPU pods are admitted."""
        patch = [
            {"op": "add", "path": f"/status/capacity/{GPU_RESOURCE.replace('/', '~1')}", "value": str(count)}
        ]
        self.kubectl(
            "patch",
            "node",
            self.node,
            "--subresource=status",
            "--type=json",
            "-p",
            json.dumps(patch),
            check=True,
        )
        wait_until(lambda: self.allocatable_gpus() == count, "GPUs in node allocatable", 60, interval=1)

    def allocatable_gpus(self) -> int:
        node = self.get_json("node", self.node, check=False) or {}
        return int((node.get("status") or {}).get("allocatable", {}).get(GPU_RESOURCE, "0"))

    def load_image(self, image: str) -> bool:
        """Stream a local image into the node's containerd unless that same image is there
        (what `kind load` does, without its archive file: the server image is about 7 GB);
        True when it was loaded."""
        image_id = self.engine.image_id(image)
        # containerd lists the manifest digest of an import, not the engine's image ID: the
        # node keeps a note of the ID it last loaded under each name.
        marker = f"/var/lib/vllm-operator-images/{image.replace('/', '_').replace(':', '_')}"
        if image_id and self.node_exec("cat", marker, check=False).stdout.strip() == image_id:
            return False
        started = time.monotonic()
        save = subprocess.Popen(
            [self.engine.name, "save", image], stdout=subprocess.PIPE, env=self.engine.env()
        )
        try:
            self.node_exec(
                "ctr",
                "-n",
                "k8s.io",
                "images",
                "import",
                "--all-platforms",
                "--digests",
                "--snapshotter=overlayfs",
                "-",
                stdin=save.stdout.fileno() if save.stdout else None,
            )
        finally:
            if save.stdout:
                save.stdout.close()
            save.wait()
        if save.returncode != 0:
            raise EngineError(f"{self.engine.name} save {image} failed ({save.returncode})")
        self.node_exec("sh", "-c", f"mkdir -p {marker.rsplit('/', 1)[0]} && echo {image_id} > {marker}")
        log(f"loaded {image} into {self.node} in {time.monotonic() - started:.0f}s")
        return True

    def install_models(self, files: dict[str, Path], namespace: str) -> None:
        """Copy model folders onto the node and serve them as pvc://model-store/<name>."""
        self.node_exec("mkdir", "-p", MODEL_DIR)
        for name, source in files.items():
            self.node_exec("rm", "-rf", f"{MODEL_DIR}/{name}")
            self.engine.run("cp", str(source), f"{self.node}:{MODEL_DIR}/{name}")
            self.node_exec("chmod", "-R", "a+rX", f"{MODEL_DIR}/{name}")
        pv_name = f"{MODEL_CLAIM}-{namespace}"
        self.apply(model_volume(pv_name, namespace))
        self.apply(model_claim(pv_name), namespace=namespace)


def model_volume(name: str, namespace: str) -> dict[str, Any]:
    """A hostPath PersistentVolume holding the node's model folder, reserved for one claim."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"vllm-operator.io/models": "tiny"}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "standard",
            "hostPath": {"path": MODEL_DIR, "type": "Directory"},
            "claimRef": {"namespace": namespace, "name": MODEL_CLAIM},
        },
    }


def model_claim(volume: str) -> dict[str, Any]:
    """The claim the models' `pvc://model-store/...` sources name."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": MODEL_CLAIM},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "standard",
            "volumeName": volume,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }


def create(engine: Engine, name: str, kubeconfig: Path, root: Path) -> KindCluster:
    """`kind create cluster` from the project's node image (the demo; tests use pytest-kind)."""
    save_host_sysctls()
    kubeconfig.parent.mkdir(parents=True, exist_ok=True)
    kind(
        engine,
        "create",
        "cluster",
        "--name",
        name,
        "--image",
        images.NODE_IMAGE,
        "--kubeconfig",
        str(kubeconfig),
    )
    return KindCluster(engine, name, kubeconfig, root)
