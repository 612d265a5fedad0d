"""kvx_runtime.collector: start-up thresholds, then the interpreter's own, with start-up frozen."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from conftest import inside_kvx_runtime
from kvx_runtime import collector


@pytest.fixture
def restored() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    yield before
    collector.start_up_done()
    gc.unfreeze()
    gc.set_threshold(*before)


def test_start_up_then_done_restores_the_thresholds_and_freezes_what_start_up_built(restored) -> None:
    collector.start_up_done()  # not in start-up (a kedro command running our hooks): nothing happens
    assert gc.get_threshold() == restored and gc.get_freeze_count() == 0
    collector.start_up()
    collector.start_up()  # idempotent: the thresholds found first are the ones restored
    assert collector.in_start_up() and gc.get_threshold() == collector.START_UP_THRESHOLDS
    built = [[index] for index in range(1000)]  # what imports would build
    collector.start_up_done()
    assert not collector.in_start_up() and gc.get_threshold() == restored
    assert gc.get_freeze_count() >= len(built)
    assert all(obj is not built for obj in gc.get_objects())  # frozen: out of every generation
    collector.start_up_done()
    assert gc.get_threshold() == restored


def test_a_kvx_runtime_process_starts_with_the_start_up_thresholds(tmp_path) -> None:
    stdout = inside_kvx_runtime("    import gc\n    print('thresholds', gc.get_threshold())\n", tmp_path)
    assert f"thresholds {collector.START_UP_THRESHOLDS}" in stdout
