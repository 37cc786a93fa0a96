"""The image files agree with each other and with the harness that builds them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from devtools import versions
from devtools.kind import images
from devtools.paths import REPO_ROOT

SERVER = REPO_ROOT / "images" / "vllm-server"
MARKER = "# ---- From here on the same in Dockerfile and Dockerfile.cpu"


def tail(name: str) -> str:
    text = (SERVER / name).read_text()
    assert text.count(MARKER) == 1, f"{name} has no single shared-tail marker"
    return text[text.index(MARKER) :]


def test_gpu_and_cpu_server_images_share_user_env_and_entrypoint() -> None:
    assert tail("Dockerfile") == tail("Dockerfile.cpu")
    assert 'ENTRYPOINT ["python", "-m", "vllm_server"]' in tail("Dockerfile")


def test_both_project_images_start_from_the_base_image_the_harness_builds() -> None:
    for dockerfile in (REPO_ROOT / "images" / "operator" / "Dockerfile", SERVER / "Dockerfile.cpu"):
        args = re.findall(r"^ARG BASE_IMAGE=(\S+)$", dockerfile.read_text(), re.MULTILINE)
        assert args == [images.BASE_IMAGE], dockerfile


def test_the_node_sandbox_image_is_the_pause_image_built() -> None:
    config = (images.NODE_FILES / "containerd.toml").read_text()
    assert f'sandbox_image = "registry.k8s.io/pause:{versions.PAUSE}"' in config


def test_the_node_image_inputs_change_with_its_files(tmp_path: Path) -> None:
    files = tmp_path / "node"
    shutil.copytree(images.NODE_FILES, files)
    assert images.node_inputs(files) == images.node_inputs()
    with (files / "default-kubelet").open("a") as handle:
        handle.write("# changed\n")
    assert images.node_inputs(files) != images.node_inputs()
