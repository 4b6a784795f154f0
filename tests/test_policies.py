"""When to save and what to keep."""

import math

import keep_scenario
import pytest

from candle_ckpt.core.errors import ParameterValueError
from candle_ckpt.core.save.policies import (
    BestMetric,
    epochs_to_keep,
    exponential_survivors,
    infer_metric_mode,
    save_reason,
)


@pytest.mark.parametrize(
    "name,mode",
    [
        ("loss", "min"),
        ("val_loss", "min"),
        ("val_mean_squared_error", "min"),
        ("mae", "min"),
        ("accuracy", "max"),
        ("val_acc", "max"),
        ("val_auc", "max"),
        ("precision", "max"),
        ("recall", "max"),
        ("f1_score", "max"),
    ],
)
def test_auto_mode_from_the_name(name, mode):
    assert infer_metric_mode(name) == mode


def test_unknown_metric_asks_for_the_mode():
    with pytest.raises(ParameterValueError, match="'wobble'.*ckpt_best_metric_mode"):
        infer_metric_mode("wobble")
    assert infer_metric_mode("wobble", "max") == "max"


def test_best_metric_min_and_max():
    low = BestMetric("loss", "min")
    assert low.update(2.0, 1) and not low.update(2.0, 2) and low.update(1.0, 3)
    assert (low.value, low.epoch) == (1.0, 3)
    high = BestMetric("acc", "max")
    assert high.update(0.1, 1) and not high.update(0.05, 2) and high.update(0.9, 3)
    assert not high.update(math.nan, 4)


@pytest.mark.parametrize(
    "epoch,kwargs,reason",
    [
        (1, dict(interval=0, improved=True), None),
        (2, dict(skip_epochs=3, improved=True), None),
        (3, dict(skip_epochs=3, improved=True), "best"),
        (5, dict(interval=3), None),
        (6, dict(interval=3), "interval"),
        (10, dict(interval=3), "final"),
        (7, dict(), "interval"),
    ],
)
def test_save_reason(epoch, kwargs, reason):
    args = dict(final_epoch=10, interval=1, skip_epochs=0, improved=False)
    args.update(kwargs)
    assert save_reason(epoch, **args) == reason


def test_linear_keeps_the_newest():
    assert epochs_to_keep([1, 2, 3, 4, 5], 5, "linear", 2) == {4, 5}
    assert epochs_to_keep([1, 2, 3], 3, "all", 1) == {1, 2, 3}


@pytest.mark.parametrize("step", [1, 3, 10])
def test_exponential_on_a_long_run(step):
    """Pruned after every save, 1..1000: O(log n) survive, spread over the whole run."""
    kept = []
    for now in range(step, 1001, step):
        kept = sorted(epochs_to_keep(kept + [now], now, "exponential", 1000))
        assert now in kept
        assert len(kept) <= 2 * math.log2(now) + 2
    assert len(kept) >= math.log2(1000 / step)
    # the oldest survivor is from the first half of the run: history is not lost
    assert kept[0] <= 500
    # at most two survivors per doubling of age
    levels = [(kept[-1] - e).bit_length() for e in kept]
    assert all(levels.count(level) <= 2 for level in levels)


def test_exponential_respects_the_limit():
    kept = []
    for now in range(1, 300):
        kept = sorted(epochs_to_keep(kept + [now], now, "exponential", 3))
        assert len(kept) <= 3 and now in kept
    # ages 15..9 | 8 | 7..5 | 4 | 3 | 2 | 1 | 0 in windows aligned to 8, 8, 4, 4, 2, 2, 1
    assert exponential_survivors(range(1, 17), 16) == {7, 8, 11, 12, 13, 14, 15, 16}


# The epochs on disk after each phase of keep_scenario.scenario as candle_ckpt 0.2
# (format 1, which listed `epochs_saved` in every ckpt-info.json) left them, printed by
# `PYTHONPATH=<main checkout> python tests/keep_scenario.py DIR` on main at 98e8193.
FORMAT1_KEPT = {
    "linear": {
        "earlier run": [1, 2, 3, 6, 7, 9, 12, 15, 18, 21, 24],
        "killed": [3, 4, 6, 7, 8, 9, 12, 15, 18, 21, 24],
        "restarted": [3, 7, 9, 12, 14, 15, 16, 18, 21, 24],
        "rolled back to 12": [3, 7, 9, 18, 19, 20, 21, 24],
        "restarted again": [3, 7, 9, 23, 24, 25],
    },
    "exponential": {
        "earlier run": [1, 2, 3, 6, 7, 9, 12, 15, 18, 21, 24],
        "killed": [2, 3, 4, 6, 7, 8, 9, 12, 15, 18, 21, 24],
        "restarted": [3, 7, 9, 10, 12, 14, 15, 16, 18, 21, 24],
        "rolled back to 12": [3, 7, 9, 17, 18, 19, 20, 21, 24],
        "restarted again": [3, 7, 9, 21, 23, 24, 25],
    },
    "all": {
        "earlier run": [1, 2, 3, 6, 7, 9, 12, 15, 18, 21, 24],
        "killed": [1, 2, 3, 4, 6, 7, 8, 9, 12, 15, 18, 21, 24],
        "restarted": [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 14, 15, 16, 18, 21, 24],
        "rolled back to 12": [1, 2, 3, 4, 6, 7, 8, 9, 10, *range(12, 22), 24],
        "restarted again": [1, 2, 3, 4, 6, 7, 8, 9, 10, *range(12, 26)],
    },
}


def test_keep_policies_keep_what_format1_kept_across_kill_restart_and_rollback(tmp_path):
    assert keep_scenario.scenario(str(tmp_path)) == FORMAT1_KEPT
