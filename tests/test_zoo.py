"""The zoo (``zoo/``: the ``.dcz`` of each shipped Fashion-MNIST recipe) and the golden files: files are promises.

Every zoo file is the one its row describes (bytes, SHA-256) and decodes to the weights it was published with; every
golden file (``tests/fixtures/dcz/``: each zoo file ever published) keeps decoding to the same weights whatever the
format becomes. Where the real Fashion-MNIST is on the machine (``data/`` or Debian's ``dataset-fashion-mnist``),
each zoo file's test error is the table's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from helpers import ROOT, load_script
from trainer.export import read_compressed, weights_digest

ZOO = json.loads((ROOT / "zoo" / "zoo.json").read_text())
GOLDEN = ROOT / "tests" / "fixtures" / "dcz"
DIGESTS = json.loads((GOLDEN / "digests.json").read_text())
REAL_DATA = [d for d in (ROOT / "data", Path("/usr/share/datasets/fashion-mnist"))
             if (d / "t10k-images-idx3-ubyte.gz").is_file() or (d / "t10k-images-idx3-ubyte").is_file()]


def test_the_zoo_holds_every_shipped_fashion_mnist_recipe() -> None:
    recipes = {row["recipe"] for row in ZOO}
    assert recipes == {"config.json", "configs/lenet5_fashionmnist_pipeline.json",
                       "configs/lenet300_fashionmnist_beyond.json", "configs/lenet5_fashionmnist_beyond.json"}
    assert all(f"{Path(row['file']).stem}-{row['commit'].removesuffix('+dirty')}.dcz" in DIGESTS for row in ZOO)


@pytest.mark.parametrize("row", ZOO, ids=[Path(r["file"]).stem for r in ZOO])
def test_each_zoo_file_is_its_row_and_decodes_to_its_weights(row: dict) -> None:
    data = (ROOT / row["file"]).read_bytes()
    assert len(data) == row["bytes"] and hashlib.sha256(data).hexdigest() == row["sha256"]
    model, header = read_compressed(ROOT / row["file"])
    assert header["arch"]["type"] == row["model"] and weights_digest(model) == row["weights_sha256"]


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_every_golden_file_keeps_decoding_to_the_same_weights(name: str) -> None:
    assert weights_digest(read_compressed(GOLDEN / name)[0]) == DIGESTS[name]


@pytest.mark.skipif(not REAL_DATA, reason="the real Fashion-MNIST test split is not on this machine (data/ or "
                                          "/usr/share/datasets/fashion-mnist: apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("row", ZOO, ids=[Path(r["file"]).stem for r in ZOO])
def test_each_zoo_file_has_its_tables_test_error(row: dict, capsys: pytest.CaptureFixture[str]) -> None:
    test = load_script("test")
    assert test.main(["-r", str(ROOT / row["file"]), "--json", "--set",
                      f"data_loader.args.data_dir={REAL_DATA[0]}"]) == 0
    assert json.loads(capsys.readouterr().out)["top1_err"] == pytest.approx(row["top1_err"], abs=1e-6)
