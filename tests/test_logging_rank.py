"""Only the global rank 0 logs at INFO: a second node's local rank 0 is a worker too."""

from __future__ import annotations

import logging

import pytest

from logger import is_worker, setup_logging

KEYS = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


@pytest.mark.parametrize(("env", "worker"), [
    ({}, False), ({"LOCAL_RANK": "1"}, True), ({"RANK": "4", "LOCAL_RANK": "0"}, True),
    ({"SLURM_PROCID": "9", "LOCAL_RANK": "1"}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, False),
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, True),  # Lightning's launcher on a second node
    ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, False),
])
def test_only_the_global_rank_0_logs_at_info(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                             worker: bool) -> None:
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert is_worker() is worker
    setup_logging(None)
    assert logging.getLogger("deep_compression").getEffectiveLevel() == (logging.WARNING if worker else logging.INFO)
