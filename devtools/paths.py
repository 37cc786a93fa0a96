"""Paths and names of the project that several test folders share."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The generated CRD (`make crds`), as the operator's users apply it.
CRD_FILE = REPO_ROOT / "crds" / "serving.vllm-operator.io_vllmmodels.yaml"
CRD_NAME = "vllmmodels.serving.vllm-operator.io"
