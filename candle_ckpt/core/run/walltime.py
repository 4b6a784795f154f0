"""The job's wall-clock end, and whether one more epoch and a save still fit before it.

Batch systems kill a job at its time limit. Many send no warning signal, or the user
forgot `--signal`, so with `ckpt_walltime_margin` (seconds, > 0) the session stops at an
epoch end when the next epoch plus a save plus the margin would not finish before the
job's end: it saves the last completed epoch if the policy did not, logs why, and exits
with status 75 like `ckpt_signal` (core/run/preemption.py), so the job script requeues.

Where the job's end comes from, first found wins (asked once, when training begins):

1. `ckpt_end_time`: an absolute ISO 8601 time ("2026-12-03T10:05:00", local time unless
   it names its offset, as Slurm prints times), or a duration from the start of training
   ("+3600", "+1:00:00", "+1-00:00:00": seconds or Slurm's `[D-]H:MM:SS`/`M:SS` forms).
2. `SLURM_JOB_END_TIME` in the environment (Unix seconds; newer Slurm releases set it).
3. Under Slurm (`SLURM_JOB_ID` set): `squeue -h -j $SLURM_JOB_ID -o %L`, the time left
   (Slurm 22.05 exports no end time). An operator may change a running job's limit, so
   the question is asked again at an epoch end at most every `REASK_SECONDS`, never
   per batch.

If none gives an end, or squeue fails, a warning names what was tried and training runs
without the wall-clock stop.

The estimates are the longest of the last `WINDOW` measured epochs and saves: the
longest rather than the mean because an underestimate costs the job its last epoch,
and a short window so that the first epoch's compilation stops counting after a few.
Before any save of this run was timed, a save is assumed to take as long as an epoch
(at a batch end before the first epoch ended: as long as all training so far).
With ckpt_async a save's time is the longer of the training loop's stall and the last
background write (a stop waits for the write in flight).

With step checkpoints (`ckpt_save_steps`), the stop can come at any batch end instead:
the unit is then the next `every` batches (the longest of the last `BATCH_WINDOW`
measured, times `every`, the batches until the next check: 1, or more where the
processes must agree through a collective), and a save is a step save, so an
allocation is used to its last safe minute rather than to its last whole epoch.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import ParameterValueError
from ..logs import LibraryLogger

clock: Callable[[], float] = time.time
"""The wall clock every estimate reads (tests/keras_job.py --virtual_clock replaces it)."""

WINDOW = 3
BATCH_WINDOW = 16
REASK_SECONDS = 600.0
SQUEUE_TIMEOUT_SECONDS = 20.0


def parse_duration(text: str) -> float:
    """Seconds in "90", "1:30", "1:00:00" or "2-03:00:00" (squeue's %L forms); ValueError."""
    days, dash, clock_part = text.strip().rpartition("-")
    parts = clock_part.split(":")
    numbers = [days] * bool(dash) + parts
    if (
        not all(number.isdigit() for number in numbers)
        or len(parts) > 3
        or (dash and len(parts) != 3)
    ):
        raise ValueError(f"{text!r} is not a duration")
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(seconds + (int(days) * 86400 if dash else 0))


def parse_end_time(value: str, start: float) -> float:
    """The Unix time `ckpt_end_time` names; `start` is when training started.

    Raises:
        ParameterValueError: naming the value and the accepted forms.
    """
    text = value.strip()
    try:
        if text.startswith("+"):
            return start + parse_duration(text[1:])
        moment = datetime.datetime.fromisoformat(text)
        return moment.timestamp()  # a naive time is local time, as Slurm prints it
    except ValueError:
        raise ParameterValueError(
            f"parameter 'ckpt_end_time': received {value!r}; expected an ISO 8601 time "
            f"such as '2026-12-03T10:05:00' (local unless it has an offset) or a duration "
            f"from the start of training such as '+3600', '+1:00:00' or '+1-00:00:00'"
        ) from None


def check_end_time(value: str) -> None:
    """Raise the ParameterValueError of `parse_end_time` if `value` is not a valid
    `ckpt_end_time` (the parameter table's check, run before anything is written)."""
    parse_end_time(value, 0.0)


@dataclass(frozen=True)
class JobEnd:
    """When the job will be killed (Unix time), and where that came from."""

    time: float
    source: str
    asks_squeue: bool = False


def squeue_time_left(job_id: str) -> float | None:
    """Seconds left to Slurm job `job_id` per squeue; None if it has no limit.

    Raises:
        OSError / subprocess.SubprocessError / ValueError: squeue could not be run, failed,
            or printed something that is not a time left; the message names it.
    """
    command = ["squeue", "-h", "-j", job_id, "-o", "%L"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_SECONDS, check=False
    )
    if result.returncode != 0:
        raise subprocess.SubprocessError(
            f"exited with status {result.returncode}: {result.stderr.strip()[:200]!r}"
        )
    text = result.stdout.strip()
    if text in ("UNLIMITED", "NOT_SET"):
        return None
    try:
        return parse_duration(text)
    except ValueError:
        raise ValueError(
            f"printed {text[:200]!r}; expected a time left such as "
            f"'1-02:03:04', '2:03:04' or '3:04'"
        ) from None


def find_job_end(
    end_time: str | None, environ: Mapping[str, str], start: float, logger: LibraryLogger
) -> JobEnd | None:
    """The job's end from the first source that has it (module docstring), or None
    after a warning naming what was tried."""
    if end_time is not None:
        return JobEnd(parse_end_time(end_time, start), f"ckpt_end_time={end_time}")
    tried = ["ckpt_end_time (not set)"]
    exported = environ.get("SLURM_JOB_END_TIME")
    if exported:
        try:
            return JobEnd(float(exported), "SLURM_JOB_END_TIME")
        except ValueError:
            tried.append(f"SLURM_JOB_END_TIME={exported!r} (not Unix seconds)")
    else:
        tried.append("SLURM_JOB_END_TIME (not in the environment)")
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        tried.append("squeue (not under Slurm: no SLURM_JOB_ID)")
    else:
        end = ask_squeue(job_id, logger)
        if isinstance(end, JobEnd) or end is None:
            return end
        tried.append(end)
    logger.warning(
        "ckpt_walltime_margin is set but the job's end is unknown: tried %s; "
        "training runs without the wall-clock stop (set ckpt_end_time to "
        "give the end)",
        "; ".join(tried),
    )
    return None


def ask_squeue(job_id: str, logger: LibraryLogger) -> JobEnd | str | None:
    """The end per squeue; None (logged) if the job has no limit; else why it failed."""
    command = f"squeue -h -j {job_id} -o %L"
    asked = clock()
    try:
        left = squeue_time_left(job_id)
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        return f"'{command}' ({error})"
    if left is None:
        logger.info("'%s': job %s has no time limit; no wall-clock stop", command, job_id)
        return None
    return JobEnd(asked + left, f"'{command}'", asks_squeue=True)


@dataclass(frozen=True)
class StopEstimate:
    """Why the run stops now: the estimates and the times they were compared with."""

    now: float
    epoch_seconds: float
    save_seconds: float
    margin: float
    end: JobEnd
    unit: str = "epoch"  # what epoch_seconds times: "epoch", or "N batch(es)"

    @property
    def finish(self) -> float:
        return self.now + self.epoch_seconds + self.save_seconds + self.margin

    def describe(self) -> str:
        if self.unit == "epoch":
            next_one = f"{self.epoch_seconds:.1f} s, the longest of the last {WINDOW} measured"
        else:
            next_one = (
                f"{self.epoch_seconds:.3g} s, from the longest of the last {BATCH_WINDOW} "
                f"measured batches"
            )
        return (
            f"the next {self.unit} ({next_one}) plus a save ({self.save_seconds:.1f} s) plus "
            f"ckpt_walltime_margin ({self.margin:g} s) would end at "
            f"{_clock_time(self.finish)}, after the job's end {_clock_time(self.end.time)}"
            f" ({self.end.source}; {self.end.time - self.now:.0f} s left)"
        )


class WallClockStop:
    """Times epochs and saves, and says when one more epoch and a save no longer fit.

    The session calls `start` when training begins, `epoch_ended` at each epoch end,
    `save_ended` after the epoch end's save (if any), then `should_stop`.

    Args:
        margin: `ckpt_walltime_margin`, seconds (> 0).
        end_time: `ckpt_end_time`, or None.
        logger: where the warnings about an unknown end go.
        environ: where SLURM_JOB_END_TIME and SLURM_JOB_ID are read.
    """

    def __init__(
        self,
        margin: float,
        end_time: str | None,
        logger: LibraryLogger,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.margin = margin
        self._end_time = end_time
        self._logger = logger
        self._environ = os.environ if environ is None else environ
        self.end: JobEnd | None = None
        self._asked_at = 0.0
        self._mark = 0.0
        self._epoch_ended_at = 0.0
        self.epoch_seconds: deque[float] = deque(maxlen=WINDOW)
        self.save_seconds: deque[float] = deque(maxlen=WINDOW)
        self.batch_seconds: deque[float] = deque(maxlen=BATCH_WINDOW)
        # from an epoch's last batch end to the next epoch's begin: validation, the
        # epoch end's save, whatever the loop does there
        self.between_epochs: deque[float] = deque(maxlen=WINDOW)
        self._batch_mark = 0.0
        self._last_batch_end: float | None = None
        self._started = 0.0

    def start(self) -> None:
        """Training begins: find the job's end, start timing the first epoch."""
        self._mark = self._asked_at = self._started = self._batch_mark = clock()
        self.end = find_job_end(self._end_time, self._environ, self._mark, self._logger)
        if self.end is not None:
            self._logger.info(
                "wall-clock stop on: the job ends at %s (%s, %.0f s from "
                "now), ckpt_walltime_margin %g s",
                _clock_time(self.end.time),
                self.end.source,
                self.end.time - self._mark,
                self.margin,
            )

    def epoch_ended(self) -> None:
        now = clock()
        self.epoch_seconds.append(now - self._mark)
        self._mark = self._epoch_ended_at = now

    def save_ended(self, saved: bool, background_seconds: float | None = None) -> None:
        """The epoch end's save is done (`saved`: whether there was one); the next
        epoch is timed from now, so that an epoch's time excludes its save.

        `background_seconds`: with ckpt_async, how long the last background write took
        (a stop waits for the write in flight), counted when longer than the stall.
        """
        now = clock()
        if saved:
            self.save_seconds.append(max(now - self._epoch_ended_at, background_seconds or 0.0))
        self._mark = now

    def batch_begins(self) -> None:
        """An epoch's first batch starts now: what came before is not its time (but
        what came since the last batch end is the time between two epochs)."""
        self._batch_mark = clock()
        if self._last_batch_end is not None:
            self.between_epochs.append(self._batch_mark - self._last_batch_end)
            self._last_batch_end = None

    def batch_ended(self) -> None:
        """A batch ended: time it; the next one is timed from now."""
        now = clock()
        self.batch_seconds.append(now - self._batch_mark)
        self._batch_mark = self._last_batch_end = now

    def step_save_ended(self, stall: float, background_seconds: float | None = None) -> None:
        """A step save stalled training `stall` seconds (`background_seconds`: as for
        `save_ended`); the next batch is timed from now, without it."""
        self.save_seconds.append(max(stall, background_seconds or 0.0))
        self._batch_mark = clock()

    def should_stop(self) -> StopEstimate | None:
        """The estimate that says stop now, at an epoch end, or None to go on."""
        if not self.epoch_seconds:
            return None
        return self._estimate(max(self.epoch_seconds), "epoch")

    def should_stop_batch(self, every: int = 1, epoch_ends: bool = False) -> StopEstimate | None:
        """The estimate that says stop now, at a batch end (step checkpoints), when the
        next check is `every` batches away (`epoch_ends`: and an epoch's end comes
        before it, whose time between epochs is added); or None to go on."""
        if not self.batch_seconds:
            return None
        seconds = max(self.batch_seconds) * every
        unit = f"{every} batch{'es' if every > 1 else ''}"
        if epoch_ends and self.between_epochs:
            seconds += max(self.between_epochs)
            unit += " and the epoch's end"
        return self._estimate(seconds, unit)

    def _estimate(self, seconds: float, unit: str) -> StopEstimate | None:
        if self.end is None:
            return None
        now = clock()
        if self.end.asks_squeue and now - self._asked_at >= REASK_SECONDS:
            self._asked_at = now
            self._reask()
            if self.end is None:
                return None
        if self.save_seconds:
            save = max(self.save_seconds)
        else:  # none timed yet: as long as an epoch, or all training so far
            save = max(self.epoch_seconds) if self.epoch_seconds else now - self._started
        estimate = StopEstimate(now, seconds, save, self.margin, self.end, unit)
        return estimate if estimate.finish > self.end.time else None

    def _reask(self) -> None:
        """Ask squeue again (a limit may have changed); keep the old end if it fails."""
        job_id = self._environ.get("SLURM_JOB_ID", "")
        end = ask_squeue(job_id, self._logger)
        if isinstance(end, str):
            self._logger.warning(
                "asking the job's end again failed: %s; keeping %s",
                end,
                _clock_time(self.end.time) if self.end else "none",
            )
            return
        if end is not None and self.end is not None and abs(end.time - self.end.time) > 30:
            self._logger.info("the job's end moved to %s (%s)", _clock_time(end.time), end.source)
        self.end = end


def _clock_time(moment: float) -> str:
    return datetime.datetime.fromtimestamp(moment).strftime("%Y-%m-%d %H:%M:%S")
