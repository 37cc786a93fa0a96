"""`python -m devtools.kind images|clean|check-clean`: the kind tier's images and cleanup."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from devtools import toolchain
from devtools.kind import cluster, engine, images


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["images", "clean", "check-clean"])
    args = parser.parse_args(argv)
    chosen = engine.detect()
    if args.command == "clean":
        removed = cluster.clean(chosen)
        print("removed: " + (", ".join(removed) if removed else "nothing"))
        return 0
    if args.command == "check-clean":
        left = cluster.leftovers(chosen)
        print(
            "\n".join(left)
            if left
            else "clean: no kind cluster, node, network, shim, kubelet or vLLM "
            "process, NETAVARK/KUBE chains or changed sysctl of ours"
        )
        return 1 if left else 0
    started = time.monotonic()
    toolchain.ensure_all(toolchain.ALL_COMPONENTS)
    if chosen.is_podman:
        images.ensure_node_image(chosen)
    images.ensure_project_images(chosen)
    names = [images.BASE_IMAGE, images.OPERATOR_IMAGE, images.SERVER_CPU_IMAGE]
    if chosen.is_podman:
        names.append(images.NODE_IMAGE)
    for name in names:
        print(f"{name:55} {chosen.image_size(name) / 1e9:6.2f} GB")
    print(f"images ready in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
