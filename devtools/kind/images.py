"""Build the project's images and the kind node image locally, each cached by its inputs.

No registry is reachable here, so every image starts from a Debian rootfs made by
`mmdebstrap` (podman) or from `debian:bookworm-slim` (Docker), and the images kubeadm asks
for are made from the binaries `devtools/toolchain.py` builds. An image whose inputs
have not changed is not rebuilt; `podman build` caches layers, so a code change rebuilds only
the top layer of the operator and server images.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from devtools import toolchain, versions
from devtools.kind.engine import Engine, EngineError, log, state_dir
from devtools.paths import REPO_ROOT

HERE = Path(__file__).resolve().parent
NODE_FILES = HERE / "node"
BASE_PACKAGES_FILE = REPO_ROOT / "images" / "base" / "packages.txt"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

BASE_IMAGE = "localhost/vllm-operator/base:bookworm"
OPERATOR_IMAGE = "localhost/vllm-operator/operator:dev"
SERVER_CPU_IMAGE = "localhost/vllm-operator/vllm-server-cpu:dev"
NODE_ROOTFS_IMAGE = "localhost/vllm-operator/kind-rootfs:bookworm"
# The name needs a domain, or kind rewrites it to docker.io and tries to pull.
NODE_IMAGE = f"localhost/kind-node:{versions.KUBERNETES}"
# The label on every image built here that records what it was built from.
INPUTS_LABEL = "io.vllm-operator.inputs"

# The node: systemd, containerd 1.6 + runc, the CNI plugins, and what kubelet and kube-proxy
# call (iptables with the nft backend, conntrack, ip, mount, ethtool, socat).
NODE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "containerd", "runc", "containernetworking-plugins",
    "iptables", "nftables", "conntrack", "iproute2", "ethtool", "socat", "kmod", "mount",
    "util-linux", "procps", "ca-certificates",
)  # fmt: skip


def fingerprint(parts: Iterable[str | bytes]) -> str:
    """A short hash of an image's inputs."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def tree_parts(root: Path) -> list[bytes]:
    """Every file under root, as path and content, in a stable order."""
    return [
        str(path.relative_to(root)).encode() + b"\0" + path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    ]


def read_packages(path: Path) -> list[str]:
    """A package list file: one name a line, `#` comments."""
    return [
        line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]


def ensure_rootfs(engine: Engine, tag: str, packages: list[str]) -> bool:
    """A Debian bookworm minbase image with these packages; False when it was cached."""
    want = fingerprint(["rootfs", *packages])
    if engine.image_label(tag, INPUTS_LABEL) == want:
        return False
    started = time.monotonic()
    if not engine.is_podman:
        if tag != BASE_IMAGE:
            raise EngineError(f"{tag} is made by mmdebstrap, which only the podman path uses")
        engine.stream(
            ["build", "--label", f"{INPUTS_LABEL}={want}", "-t", tag, str(BASE_PACKAGES_FILE.parent)]
        )
        return True
    log(f"mmdebstrap bookworm ({len(packages)} packages) for {tag} ...")
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=state_dir()) as scratch:
        tarball = Path(scratch) / "rootfs.tar"
        proc = subprocess.run(
            ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(packages), "bookworm", str(tarball)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise EngineError(f"mmdebstrap for {tag} failed:\n{proc.stderr[-3000:]}")
        engine.run(
            "import",
            "--change",
            'CMD ["/bin/bash"]',
            "--change",
            f"LABEL {INPUTS_LABEL}={want}",
            str(tarball),
            tag,
        )
    log(f"{tag}: {time.monotonic() - started:.0f}s")
    return True


def build(
    engine: Engine, tag: str, containerfile: Path, context: Path, build_args: dict[str, str] | None = None
) -> float:
    """`podman build` / `docker build` with layer caching; the seconds it took."""
    started = time.monotonic()
    args = ["build", "-f", str(containerfile), "-t", tag]
    if engine.is_podman:
        args.append("--layers")
        # RUN steps trust what the host trusts: a network that inspects TLS (as here) has a
        # CA of its own, and pip in the build would refuse PyPI without it. Not committed.
        if HOST_CA_BUNDLE.exists():
            args += ["-v", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"]
    for key, value in (build_args or {}).items():
        args += ["--build-arg", f"{key}={value}"]
    log(f"{engine.name} build {tag} ...")
    engine.stream([*args, str(context)])
    seconds = time.monotonic() - started
    log(f"{tag}: {seconds:.0f}s, {engine.image_size(tag) / 1e9:.2f} GB")
    return seconds


def ensure_project_images(engine: Engine) -> dict[str, float]:
    """The base, operator and CPU server images; build seconds by image."""
    ensure_rootfs(engine, BASE_IMAGE, read_packages(BASE_PACKAGES_FILE))
    base = {"BASE_IMAGE": BASE_IMAGE}
    server_dir = REPO_ROOT / "images" / "vllm-server"
    return {
        OPERATOR_IMAGE: build(
            engine, OPERATOR_IMAGE, REPO_ROOT / "images" / "operator" / "Dockerfile", REPO_ROOT, base
        ),
        SERVER_CPU_IMAGE: build(engine, SERVER_CPU_IMAGE, server_dir / "Dockerfile.cpu", server_dir, base),
    }


# ---- the kind node image ------------------------------------------------------------------


def kubeadm_images() -> list[str]:
    """The images kubeadm of our version asks for (`kubeadm config images list`)."""
    kubeadm = toolchain.binary("kubeadm")
    proc = subprocess.run(
        [str(kubeadm), "config", "images", "list", f"--kubernetes-version={versions.KUBERNETES}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.split()


def component_recipe(image: str) -> tuple[str, str]:
    """(binary, FROM) for one image kubeadm asks for; FROM scratch for static binaries."""
    name = image.rsplit("/", 1)[1].split(":")[0]
    if name == "kube-proxy":
        # kube-proxy calls iptables (nft backend) and conntrack: the node's rootfs has both.
        return "kube-proxy", NODE_ROOTFS_IMAGE
    if name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "pause", "coredns"):
        return name, "scratch"
    raise EngineError(f"kubeadm asks for {image}, which this harness does not know how to build")


def build_component(engine: Engine, image: str, scratch: Path) -> None:
    """One control-plane image from its binary (static, so FROM scratch where possible)."""
    binary, base = component_recipe(image)
    context = scratch / binary
    context.mkdir()
    shutil.copy2(toolchain.binary(binary), context / binary)
    # kubeadm's manifests name the command (kube-apiserver, etcd); CoreDNS and pause use the
    # image's entrypoint.
    entry = f"/{binary}" if binary in ("coredns", "pause") else f"/usr/local/bin/{binary}"
    (context / "Containerfile").write_text(
        f"FROM {base}\nCOPY {binary} {entry}\n"
        "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        f'ENTRYPOINT ["{entry}"]\n'
    )
    engine.run("build", "-t", image, "-f", str(context / "Containerfile"), str(context))


def node_inputs(files: Path = NODE_FILES) -> str:
    """What the node image is made of: versions, packages and the files in node/."""
    pinned = [versions.KUBERNETES, versions.ETCD, versions.COREDNS, versions.PAUSE]
    return fingerprint(
        ["node", *pinned, *NODE_PACKAGES, *tree_parts(files), (HERE / "images.py").read_bytes()]
    )


PRELOAD_SCRIPT = """\
set -e
mkdir -p /run/containerd
containerd --config /etc/containerd/config.toml >/tmp/containerd.log 2>&1 &
pid=$!
for _ in $(seq 150); do ctr version >/dev/null 2>&1 && break; sleep 0.2; done
# --no-unpack: overlayfs snapshots cannot be made on this container's own overlay root;
# the CRI unpacks each image on first use, inside the node's /var volume.
ctr -n k8s.io images import --no-unpack --all-platforms /preload.tar
ctr -n k8s.io images ls -q
kill "$pid" 2>/dev/null || true
wait "$pid" || true
"""


def ensure_node_image(engine: Engine) -> bool:
    """The kind node image for KUBERNETES with its images preloaded; False when cached."""
    if not engine.is_podman:
        raise EngineError("the node image is assembled with podman; with Docker use kind's own images")
    want = node_inputs()
    if engine.image_label(NODE_IMAGE, INPUTS_LABEL) == want:
        return False
    started = time.monotonic()
    toolchain.ensure_all(
        (*toolchain.KIND_COMPONENTS, toolchain.KUBERNETES, toolchain.ETCD, toolchain.KUBECTL)
    )
    ensure_rootfs(engine, NODE_ROOTFS_IMAGE, list(NODE_PACKAGES))
    with tempfile.TemporaryDirectory(prefix="node-", dir=state_dir()) as tmp:
        scratch = Path(tmp)
        images = kubeadm_images()
        sandbox = f"registry.k8s.io/pause:{versions.PAUSE}"
        if sandbox not in images or sandbox not in (NODE_FILES / "containerd.toml").read_text():
            raise EngineError(
                f"kubeadm asks for {images}; containerd.toml and versions.PAUSE must "
                f"name its pause image, not {sandbox}"
            )
        log(f"building {len(images)} component images: {' '.join(images)}")
        for image in images:
            build_component(engine, image, scratch)
        context = scratch / "node"
        shutil.copytree(NODE_FILES, context)
        for name in ("kubelet", "kubeadm", "kubectl"):
            shutil.copy2(toolchain.binary(name), context / name)
        building = NODE_IMAGE + "-build"
        engine.run(
            "build",
            "-t",
            building,
            "--build-arg",
            f"ROOTFS={NODE_ROOTFS_IMAGE}",
            "--build-arg",
            f"KUBERNETES_VERSION={versions.KUBERNETES}",
            "-f",
            str(context / "Containerfile"),
            str(context),
        )
        archive = scratch / "preload.tar"
        engine.run("save", "--multi-image-archive", "-o", str(archive), *images)
        container = engine.run(
            "create",
            "--privileged",
            "--entrypoint",
            "/bin/sh",
            "-v",
            f"{archive}:/preload.tar:ro",
            building,
            "-c",
            PRELOAD_SCRIPT,
        ).stdout.strip()
        try:
            loaded = engine.run("start", "--attach", container).stdout
            missing = [image for image in images if image not in loaded]
            if missing:
                raise EngineError(f"preloading the node image lost {missing}:\n{loaded}")
            engine.run(
                "commit",
                "--change",
                'ENTRYPOINT ["/usr/local/bin/entrypoint"]',
                "--change",
                'CMD ["/sbin/init"]',
                "--change",
                f"LABEL {INPUTS_LABEL}={want}",
                container,
                NODE_IMAGE,
            )
        finally:
            engine.run("rm", "-f", container, check=False)
            engine.run("rmi", building, check=False)
    log(f"{NODE_IMAGE}: {time.monotonic() - started:.0f}s, {engine.image_size(NODE_IMAGE) / 1e9:.2f} GB")
    return True
