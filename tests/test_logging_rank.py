"""Only the global rank 0 logs at INFO: a second node's local rank 0 is a worker too."""

from __future__ import annotations

import logging

import pytest

from logger import global_rank, setup_logging


@pytest.mark.parametrize(("env", "rank"), [({}, 0), ({"LOCAL_RANK": "1"}, 1), ({"RANK": "4", "LOCAL_RANK": "0"}, 4),
                                           ({"SLURM_PROCID": "9", "LOCAL_RANK": "1"}, 9), ({"RANK": "0"}, 0)])
def test_global_rank_reads_what_the_launchers_set(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                  rank: int) -> None:
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert global_rank() == rank
    setup_logging(None)
    assert logging.getLogger("deep_compression").getEffectiveLevel() == (logging.INFO if rank == 0 else logging.WARNING)
