"""measure_ms statistics on a function of known, varying duration."""

import time

import pytest

from sparsecc.runtime.timing import measure_ms


def test_min_and_median_of_known_sleeps():
    delays = iter([0.0, 0.0, 0.0] + [0.002, 0.010, 0.010, 0.010, 0.010] * 2)  # 3 warm-up calls, then 10 timed
    fn = lambda: time.sleep(next(delays))  # noqa: E731
    assert 1.9 <= measure_ms(fn, repeat=10, statistic="min") < 5.0
    delays = iter([0.0, 0.0, 0.0] + [0.002, 0.010, 0.010, 0.010, 0.010] * 2)
    fn = lambda: time.sleep(next(delays))  # noqa: E731
    assert measure_ms(fn, repeat=10) >= 9.9


def test_bad_statistic():
    with pytest.raises(ValueError, match="statistic"):
        measure_ms(lambda: None, statistic="mean")
