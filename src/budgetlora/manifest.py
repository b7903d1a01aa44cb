"""The run manifest: what a run was made with, so its numbers can be traced and reproduced months later."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig, dump_config
from .hardware import device, resolve_precision

PACKAGES = ("budgetlora", "torch", "transformers", "peft", "datasets", "accelerate", "safetensors", "scikit-learn")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_commit() -> str | None:
    """The commit of the budgetlora checkout, with "+dirty" when it has uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def build_manifest(config: RunConfig, data_rows: dict[str, int]) -> dict[str, Any]:
    """Versions, hardware, config hash, and each data file's hash and row counts."""
    on = device()
    data_file = Path(config.data.train).expanduser()
    return {
        "packages": {name: _version(name) for name in PACKAGES},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name() if on.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "precision": resolve_precision(config.train.precision),
        "torch_threads": torch.get_num_threads(),
        "config_sha256": hashlib.sha256(dump_config(config).encode()).hexdigest(),
        "data": {
            "train": config.data.train,
            "sha256": file_sha256(data_file) if data_file.is_file() else None,  # None: a Hub dataset
            "rows": data_rows,
        },
        "git_commit": _git_commit(),
    }


def training_data_changed(saved: dict[str, Any], config: RunConfig) -> bool:
    """Whether data.train holds other bytes now than when the manifest `saved` was written (False where it recorded no
    hash, a Hub dataset or an older run, or the file is gone: loading it names the problem)."""
    data = saved.get("data")
    recorded = data.get("sha256") if isinstance(data, dict) else None
    path = Path(config.data.train).expanduser()
    return isinstance(recorded, str) and path.is_file() and file_sha256(path) != recorded
