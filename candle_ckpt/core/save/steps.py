"""When to save a step checkpoint inside an epoch (`ckpt_save_steps`).

`StepSchedule` counts the training batches since the last save of any kind (an epoch
end's too: it holds the same state) and says when the next step save is due:

- `ckpt_save_steps` N > 0: after N batches.
- `ckpt_save_steps` auto: as often as the budget `ckpt_save_overhead` (percent of
  training time) allows, measured online, as SCR's `SCR_CHECKPOINT_OVERHEAD` does: a
  save is due once the training time since the last save, times the budget, covers
  what the last save cost the training loop (its stall: the whole save when
  synchronous; the snapshot, and any wait for the save before it, with ckpt_async).
  Until one save was measured, the first is taken after `FIRST_AUTO_BATCHES` batches,
  to measure it. The interval this implies in batches (the cost over the budget share
  of the recent median batch time) is logged whenever it changes by more than a
  factor of 2, so a person can see what `auto` chose.

A batch's time is from the end of the one before it (or the epoch's begin) to its own
end, without the save made at that end: what training alone costs.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from ..logs import LibraryLogger

FIRST_AUTO_BATCHES = 10
BATCH_WINDOW = 33  # batch times kept for the median: odd, so the median is one of them


class StepSchedule:
    """The step-save trigger of one run (see the module docstring).

    Args:
        steps: `ckpt_save_steps`: a positive int, or "auto".
        overhead_percent: `ckpt_save_overhead`, used with "auto".
        logger: where the interval `auto` chose is logged.
    """

    def __init__(self, steps: int | str, overhead_percent: float, logger: LibraryLogger) -> None:
        self.fixed = steps if isinstance(steps, int) else None
        self.budget = overhead_percent / 100.0
        self._logger = logger
        self.batches = 0  # since the last save
        self.train_seconds = 0.0  # since the last save
        self.save_cost: float | None = None  # the last save's stall, seconds
        self._batch_times: deque[float] = deque(maxlen=BATCH_WINDOW)
        self._logged_interval: int | None = None

    def batch_ended(self, seconds: float | None) -> None:
        """One training batch ended; it took `seconds` (None: not measured)."""
        self.batches += 1
        if seconds is not None:
            self.train_seconds += seconds
            self._batch_times.append(seconds)

    def due(self) -> bool:
        """Whether a step save is due now."""
        if self.fixed is not None:
            return self.batches >= self.fixed
        if self.save_cost is None:
            return self.batches >= FIRST_AUTO_BATCHES
        return self.train_seconds * self.budget >= self.save_cost

    def saved(self, stall_seconds: float) -> None:
        """A save (step or epoch end) ended; it stalled training `stall_seconds`."""
        self.batches = 0
        self.train_seconds = 0.0
        self.save_cost = stall_seconds
        if self.fixed is None:
            self._log_interval()

    def auto_interval(self) -> int | None:
        """The batches between two saves `auto` implies now, or None (not measured)."""
        if self.save_cost is None or not self._batch_times:
            return None
        batch = statistics.median(self._batch_times)
        if batch <= 0:
            return 1
        return max(1, math.ceil(self.save_cost / (self.budget * batch)))

    def _log_interval(self) -> None:
        interval = self.auto_interval()
        if interval is None:
            return
        previous = self._logged_interval
        if previous is None or not previous / 2 <= interval <= previous * 2:
            self._logged_interval = interval
            self._logger.info(
                "ckpt_save_steps auto: a save every %d batches (a save stalls training "
                "%.3f s, a batch takes %.4f s, budget %.3g%% of training time)",
                interval,
                self.save_cost,
                statistics.median(self._batch_times),
                self.budget * 100,
            )
