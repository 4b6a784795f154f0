"""When to save and what to keep: pure decisions, no I/O.

- `infer_metric_mode` and `BestMetric`: which direction is better, and whether an epoch
  improved on the best so far.
- `save_reason`: whether an epoch is saved, and why.
- `epochs_to_keep`: the keep policies (linear, exponential, all).

Epochs are 1-based everywhere, as in CANDLE.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..errors import ParameterValueError

# Checked in order; the first fragment found in the metric name decides.
_MINIMISED = ("loss", "error", "mse", "mae", "mape", "msle", "crossentropy", "hinge", "perplexity")
_MAXIMISED = ("acc", "auc", "precision", "recall", "f1", "iou", "r2")


def infer_metric_mode(metric: str, mode: str = "auto") -> str:
    """Return "min" or "max" for a metric name; `mode` other than "auto" wins.

    auto: names containing loss, error, mse, mae, ... are minimised; names containing
    acc, auc, precision, recall, f1, ... are maximised (a `val_` prefix is ignored).

    Raises:
        ParameterValueError: auto cannot tell, naming the metric and asking for the mode.
    """
    if mode in ("min", "max"):
        return mode
    name = metric.lower()
    for fragment in _MINIMISED:
        if fragment in name:
            return "min"
    for fragment in _MAXIMISED:
        if fragment in name:
            return "max"
    raise ParameterValueError(
        f"parameter 'ckpt_best_metric_mode' is 'auto' but the direction of "
        f"ckpt_save_best_metric={metric!r} cannot be inferred from its name; "
        f"expected ckpt_best_metric_mode 'min' or 'max'"
    )


class BestMetric:
    """The best value of one metric seen so far, and the epoch it was seen at.

    Args:
        metric: the metric name, e.g. "val_loss".
        mode: "min" or "max".
        value: the best value so far, or None before any.
        epoch: the epoch of that value, or None.
    """

    def __init__(
        self, metric: str, mode: str, value: float | None = None, epoch: int | None = None
    ) -> None:
        if mode not in ("min", "max"):
            raise ParameterValueError(
                f"BestMetric mode: received {mode!r}; expected 'min' or 'max'"
            )
        self.metric, self.mode, self.value, self.epoch = metric, mode, value, epoch

    def improves(self, value: float) -> bool:
        """Whether `value` is strictly better than the best so far (NaN never is)."""
        if value is None or math.isnan(value):
            return False
        if self.value is None:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def update(self, value: float, epoch: int) -> bool:
        """Record `value` at `epoch` if it improves; return whether it did."""
        if not self.improves(value):
            return False
        self.value, self.epoch = float(value), epoch
        return True


def save_reason(
    epoch: int, *, final_epoch: int, interval: int, skip_epochs: int, improved: bool
) -> str | None:
    """Why `epoch` is saved ("best", "final", "interval"), or None if it is not.

    The rules apply in this order, the first that holds deciding: interval 0 never
    saves; an epoch before `skip_epochs` is not saved; then best, final epoch, multiple
    of `interval`.
    """
    if interval == 0 or epoch < skip_epochs:
        return None
    if improved:
        return "best"
    if epoch == final_epoch:
        return "final"
    if epoch % interval == 0:
        return "interval"
    return None


def exponential_survivors(epochs: Iterable[int], now: int) -> set[int]:
    """`now`, plus the newest epoch in each window of age about 2^k, k = 0, 1, 2, ...

    An epoch of age d = now - epoch >= 1 is at level k = floor(log2(d)) and falls in the
    window of epochs [j * 2^k, (j + 1) * 2^k) with j = epoch // 2^k; the newest epoch of
    each window survives. Windows are aligned to multiples of 2^k rather than measured
    from `now`, so that applying the policy after every save is stable: as an epoch ages
    its window only widens, and an epoch deleted once is never wanted again (windows
    relative to `now` would want back epochs already deleted). A window of age 2^k
    overlaps at most two aligned windows, so at most 2 log2(now) + 1 epochs survive.
    """
    newest_in_window: dict[tuple[int, int] | None, int] = {}
    for epoch in epochs:
        age = now - epoch
        if age < 0:
            continue
        level = age.bit_length() - 1
        window = (level, epoch >> level) if age > 0 else None
        if window not in newest_in_window or epoch > newest_in_window[window]:
            newest_in_window[window] = epoch
    return set(newest_in_window.values())


def epochs_to_keep(run_epochs: Iterable[int], now: int, mode: str, limit: int) -> set[int]:
    """Which of this run's epochs a keep policy keeps after saving epoch `now`.

    `last` and `best` are protected by the caller, not here. Epochs of earlier runs
    are never passed in, so never deleted.

    Args:
        run_epochs: the epochs this run has saved that are still on disk.
        now: the epoch just saved.
        mode: "linear" (the `limit` newest), "exponential" (see
            `exponential_survivors`, then at most `limit` of them) or "all".
        limit: the maximum number kept (ignored by "all").
    """
    epochs = sorted(set(run_epochs))
    if mode == "all":
        return set(epochs)
    if mode == "exponential":
        epochs = sorted(exponential_survivors(epochs, now))
    elif mode != "linear":
        raise ParameterValueError(
            f"parameter 'ckpt_keep_mode': received {mode!r}; "
            f"expected one of ['linear', 'exponential', 'all']"
        )
    return set(epochs[-limit:])
