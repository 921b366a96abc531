"""Shared fixtures: a tiny MNIST-format dataset written as real idx files, and a config file for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import tiny_config, write_mnist_folder


@pytest.fixture(autouse=True)
def no_system_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never fall back on a dataset installed on the machine (/usr/share/datasets/...): "not found"
    must mean not found, and a run must read the tiny data it was given. Lookup tests set their own."""
    import data

    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", {})


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat folder holding the four gzipped idx files (Debian's layout)."""
    return write_mnist_folder(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture()
def config_file(tmp_path: Path, idx_dir: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config(idx_dir, tmp_path / "runs")))
    return path
