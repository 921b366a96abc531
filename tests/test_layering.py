"""The layers of DESIGN.md, checked on the import statements of every module (function-level ones too).

scripts (train, test, sensitivity, dcz) -> config (parse_config, builders) -> integration (trainer/, data, idx)
-> algorithms (compression/) and models/; logger and utils are helpers any layer may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT

SCRIPTS = {"train", "test", "sensitivity", "dcz"}
CONFIG = {"parse_config", "builders"}
OURS = SCRIPTS | CONFIG | {"trainer", "data", "idx", "compression", "models", "logger", "utils"}


def modules() -> dict[str, Path]:
    """Every module of the project (not tests, benchmarks or notebooks) by dotted name."""
    files = [*ROOT.glob("*.py"), *(p for d in ("trainer", "compression", "models", "logger") for p in (ROOT / d).rglob("*.py"))]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def imports(path: Path) -> set[str]:
    """Top-level names of everything ``path`` imports (``lightning``, ``trainer``, ``compression``...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


ALL = modules()


def test_the_walk_sees_the_modules_and_their_imports() -> None:
    # The checks below would pass vacuously on an empty walk: make sure it finds what we know is there.
    assert {"train", "builders", "trainer.lit_model", "compression.kmeans", "models.lenet", "data"} <= ALL.keys()
    assert {"lightning", "compression", "trainer"} <= imports(ALL["trainer.callbacks.pruning"])
    assert "trainer" in imports(ALL["parse_config"])


@pytest.mark.parametrize("name", sorted(ALL))
def test_nothing_imports_a_script(name: str) -> None:
    assert not (imports(ALL[name]) & SCRIPTS - {name}), f"{name} imports a script"


@pytest.mark.parametrize("name", sorted(n for n in ALL if n.split(".")[0] in ("compression", "models")))
def test_algorithms_and_models_import_no_lightning_and_nothing_of_ours_above(name: str) -> None:
    own = name.split(".")[0]
    found = imports(ALL[name])
    assert not found & {"lightning", "pytorch_lightning", "torchmetrics", "pydantic"}, f"{name}: {found}"
    assert not (found & OURS) - {own}, f"{name} imports {(found & OURS) - {own}}"


@pytest.mark.parametrize("name", sorted(n for n in ALL if n.split(".")[0] in ("trainer", "data", "idx")))
def test_the_integration_layer_imports_no_config_and_models_data_no_trainer(name: str) -> None:
    found = imports(ALL[name])
    assert not found & CONFIG, f"{name} imports the config layer: {found & CONFIG}"
    if name in ("data", "idx"):
        assert "trainer" not in found


@pytest.mark.parametrize("name", ["utils", "logger"])
def test_helpers_import_nothing_of_ours(name: str) -> None:
    assert not imports(ALL[name]) & (OURS - {name})


def test_private_checkpoint_keys_are_spelled_in_one_place() -> None:
    # "compression.codebooks." and the "model." prefix belong to CompressionState / LitClassifier.
    def literals(path: Path) -> list[str]:
        return [n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
                and isinstance(n.value, str)]

    for name, path in ALL.items():
        strings = literals(path)
        if name != "trainer.compression_state":
            assert not [s for s in strings if "codebooks." in s and not s.startswith(("\n", " "))], name
        if name != "trainer.lit_model":
            assert "model." not in strings, name
    assert any(".codebooks." in s for s in literals(ALL["trainer.compression_state"]))
