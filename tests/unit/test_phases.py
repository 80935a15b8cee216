"""alignctl.train.phases: each second and each memory peak belongs to exactly one phase."""

from __future__ import annotations

import time

import pytest

from alignctl.train.phases import NO_CLOCK, PhaseClock, _peak_rss_mb


def test_a_nested_phase_is_subtracted_from_the_one_around_it():
    clock = PhaseClock()
    with clock.phase("outer"):
        time.sleep(0.05)
        with clock.phase("inner"):
            time.sleep(0.2)
    with clock.phase("outer"):  # met again: its seconds add up
        time.sleep(0.05)
    assert 0.2 <= clock.records["inner"]["seconds"] < 0.3
    assert 0.1 <= clock.records["outer"]["seconds"] < 0.2


@pytest.mark.skipif(_peak_rss_mb() is None, reason="the kernel reports no peak resident memory here")
def test_a_memory_peak_is_charged_to_the_phase_it_happened_in():
    clock = PhaseClock()
    with clock.phase("outer"):
        with clock.phase("inner"):
            block = bytearray(300 * 2**20)
            block[::4096] = b"\1" * len(block[::4096])  # touched: resident
            del block
        time.sleep(0.01)
    inner, outer = clock.records["inner"]["peak_rss_mb"], clock.records["outer"]["peak_rss_mb"]
    assert inner - outer > 250, (inner, outer)  # the peak after the block was freed is the outer phase's own


def test_contexts_outside_a_lifecycle_measure_nothing():
    with NO_CLOCK.phase("anything"):
        pass
    assert NO_CLOCK.records == {}
