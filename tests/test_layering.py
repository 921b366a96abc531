"""The layers of docs/architecture.md, checked on the import statements of every module (function-level ones too).

scripts (train, test, sensitivity, dcz) -> config (parse_config, builders, teacher) -> integration (trainer/, data,
idx) -> algorithms (compression/) and models/; logger, utils and strict_args are helpers of the
three upper layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from helpers import ROOT

SCRIPTS = {"train", "test", "sensitivity", "dcz", "config_reference"}
CONFIG = {"parse_config", "builders", "teacher"}
HELPERS = {"logger", "utils", "strict_args"}
OURS = SCRIPTS | CONFIG | HELPERS | {"trainer", "data", "idx", "compression", "models"}


def modules() -> dict[str, Path]:
    """Every module of the project (not tests, benchmarks or notebooks) by dotted name."""
    files = [*ROOT.glob("*.py"), *(p for d in ("trainer", "compression", "models", "logger") for p in (ROOT / d).rglob("*.py"))]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def imports(path: Path, depth: int = 1) -> set[str]:
    """The dotted names ``path`` imports, cut to their first ``depth`` parts (1: ``lightning``, ``trainer``...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {".".join(alias.name.split(".")[:depth]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(".".join(node.module.split(".")[:depth]))
            names |= {f"{node.module}.{alias.name}" for alias in node.names} if depth > 1 else set()
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


@pytest.mark.parametrize("name", sorted(HELPERS))
def test_helpers_import_nothing_of_ours(name: str) -> None:
    assert not imports(ALL[name]) & (OURS - {name})


def test_no_module_of_trainer_imports_another_in_a_circle() -> None:
    # The edges between trainer/'s modules (TYPE_CHECKING imports included), then a search for a cycle.
    own = {n for n in ALL if n.startswith("trainer.")}
    edges = {n: {m for m in own if m != n and any(i == m or i.startswith(m + ".") for i in imports(ALL[n], 9))}
             for n in own}
    edges = {n: {m for m in targets if not n.startswith(m + ".")} for n, targets in edges.items()}  # a package's own
    assert edges["trainer.callbacks.pruning"] >= {"trainer.lit_model", "trainer.callbacks.best"}  # not vacuous

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(edges[node]):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            found = cycle_from(nxt, path + [nxt])
            if found:
                return found
        return None

    for start in sorted(own):
        assert cycle_from(start, [start]) is None, f"import circle: {' -> '.join(cycle_from(start, [start]) or [])}"


def test_the_config_layer_does_not_import_itself_in_a_circle() -> None:
    assert "builders" not in imports(ALL["teacher"]) and "builders" not in imports(ALL["parse_config"])


def benchmark_scripts() -> dict[str, Path]:
    """Every script of benchmarks/ (a file with a ``__main__`` block) by module name."""
    return {p.stem: p for p in (ROOT / "benchmarks").glob("*.py") if "__main__" in p.read_text()}


@pytest.mark.parametrize("path", sorted([*(ALL[s] for s in SCRIPTS), *benchmark_scripts().values()]),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_script_imports_another_script(path: Path) -> None:
    scripts = SCRIPTS | set(benchmark_scripts())
    assert len(benchmark_scripts()) >= 5  # reproduce, ablation, bench_*: the walk finds them
    assert not imports(path) & (scripts - {path.stem}), f"{path.name} imports {imports(path) & (scripts - {path.stem})}"


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
