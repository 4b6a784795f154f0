"""One training run's checkpointing, driven by any framework's training loop.

`TrainingSession` is the end-of-epoch flow every adapter shares: which process writes,
the writer lock, resuming the run's bookkeeping after a restart, deciding each epoch
(`Checkpointer.decide`), capturing the state through the adapter (views for a save
written at once, reused copies for one written in the background or held for
pre-emption), the save itself (sync or async), and the pre-emption stop. A framework
calls five methods at the matching points of its loop::

    session = TrainingSession(params)           # checks every ckpt_* parameter
    session.begin(adapter)                      # training starts (takes the lock)
    for epoch in range(J["epoch"], params["epochs"]):
        session.epoch_begin(epoch, batch=first) # epochs completed so far; `first`:
                                                # J["batch"] at the first, then 0
        for batch in range(first, n): train; session.batch_end(batch)
        session.epoch_end(epoch + 1, logs)      # the 1-based epoch that just ended
    session.end()                               # waits for the last save, unlocks

The Keras callback maps its hooks onto these one to one; `CandleCkptPyTorch` calls
them from `ckpt_epoch`.

With `ckpt_save_steps`, `batch_end` also saves step checkpoints inside the epoch
(`core/save/steps.py` says when; docs/FORMAT.md, "Step checkpoints", where), and the
signal and the wall-clock stop save the state of the batch that just ended rather
than keep only the last completed epoch. `batch_end`'s index is absolute within the
epoch: after a restart at J["batch"] = B its first call is `batch_end(B)`. Before each
save the adapter learns its position (`set_position(epochs_completed, batches_done)`,
if it has that method), for the data position it keeps in the model file.

With `ckpt_walltime_margin`, `epoch_end` also stops the run before the job's wall-clock
end (core/run/walltime.py). Only the writer asks for the end and times the epochs; in a
multi-process job every process then joins one collective per epoch end
(`FrameworkAdapter.all_gather`) that carries the writer's verdict, so all of them stop
after the same epoch and none waits for a peer that left.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ..adapter import FrameworkAdapter
from ..errors import NoCheckpointError, ParameterValueError
from ..logs import console_logger
from ..restore.restart import take_restored_epoch, take_warm_start
from ..restore.resume import read_epoch_info
from ..save.checkpointer import Checkpointer, SaveDecision, WriteFiles
from ..save.policies import save_reason
from ..save.steps import StepSchedule
from ..storage.background import check_snapshot_fits
from .preemption import PREEMPTED_EXIT_STATUS, Preempted, PreemptionWatch
from .walltime import StopEstimate, WallClockStop
from .writer import check_is_writer

# Batches between two wall-clock checks at batch ends where every check is a collective
# (a multi-process job): the estimate then covers that many batches.
WALLTIME_CHECK_BATCHES = 16


class TrainingSession:
    """Checkpoints one training run for a framework's loop (see the module docstring).

    Args:
        gParameters: the parameter dict; every `ckpt_*` key is checked here, before
            anything is written, and `epochs` (the run's last epoch) is required.
        logger: "DEFAULT" logs to `<ckpt_directory>/ckpt.log` (and the console when
            verbose); a `logging.Logger` to use instead; None for no log.
        verbose: whether INFO messages also go to the console.
        is_writer: True/False to say whether this process writes the tree, or None to
            detect it (`core.run.writer`).
    """

    def __init__(
        self,
        gParameters: Mapping[str, Any],
        logger: Any = "DEFAULT",
        verbose: bool = True,
        is_writer: bool | None = None,
    ) -> None:
        self.checkpointer = Checkpointer(gParameters, logger=logger, verbose=verbose)
        self.settings = self.checkpointer.settings
        self._explicit_writer = check_is_writer(is_writer)
        self._verbose = verbose
        self._adapter: FrameworkAdapter | None = None
        self._writer: bool | None = None
        self._watch: PreemptionWatch | None = None
        self._epoch = 0  # the running 1-based epoch
        self._epoch_started: float | None = None  # perf_counter() at its begin
        self._first_epoch_seen = False
        self._async_snapshot: Any = None  # reused copies (see _capture)
        self._held_snapshot: Any = None
        self._walltime: WallClockStop | None = None
        # (epochs, batches) a restart in this process loaded
        self._restored: tuple[int, int] | None = None
        self._steps: StepSchedule | None = None  # the step-save trigger of a writer
        self._first_batch: int | None = None  # what the first batch_end must be
        self._batch_clock: float | None = None  # perf_counter() at the last batch end
        self._step_saved: tuple[int, int] | None = None  # the last step checkpoint's
        self._walltime_every = 1  # batches between two wall-clock checks (begin)
        self._epoch_batches: int | None = None  # the batches of the last epoch that ended
        self._last_batch: int | None = None  # of the running epoch
        self._check_walltime_settings()

    @property
    def adapter(self) -> FrameworkAdapter:
        if self._adapter is None:
            raise RuntimeError("TrainingSession.begin(adapter) was not called")
        return self._adapter

    @property
    def is_writer(self) -> bool:
        """Whether this process writes the tree; decided once, when first asked."""
        if self._writer is None:
            decision = self.adapter.writer_decision(self._explicit_writer)
            self._writer = decision.is_writer
            if not decision.is_writer:
                console_logger("save", self._verbose).info(
                    "not the checkpoint writer (%s): this process writes nothing in '%s'",
                    decision.reason,
                    self.checkpointer.layout.root,
                )
        return self._writer

    # -- the training loop's points ----------------------------------------------------

    def begin(self, adapter: FrameworkAdapter) -> None:
        """Training starts: become the writer (lock, cleanup) and watch for the signal.

        With ckpt_async, the snapshot's host memory is allocated and filled here, before
        the first step, so that the first save stalls training no longer than the later
        ones, which copy into it (and a snapshot too large for memory fails now); for a
        model whose variables do not exist yet (`adapter.state_exists`), at the first
        save instead.

        Raises:
            WriterLockedError: another process writes this tree.
            ParameterValueError: `ckpt_signal` under lock-step multi-process training.
        """
        self._adapter = adapter
        self.checkpointer.init_from = take_warm_start(self.checkpointer.layout)
        self._restored = take_restored_epoch(self.checkpointer.layout)
        self.checkpointer.describe_writer(
            adapter.adapter_name, adapter.model_format, adapter.library_versions()
        )
        if self.is_writer:
            self.checkpointer.start_writing()
            if self.checkpointer.background is not None and adapter.state_exists():
                self._async_snapshot = self._copy_state(None, "ckpt_async=true", "ckpt_async=false")
            if self._saves_steps():
                self._steps = StepSchedule(
                    self.settings["ckpt_save_steps"],
                    self.settings["ckpt_save_overhead"],
                    self.checkpointer.logger,
                )
        self._watch = self._start_preemption_watch()
        self._check_walltime_agreement()
        if self._stops_at_batches() and adapter.all_gather() is not None:
            # each check is a collective: not at every batch
            self._walltime_every = WALLTIME_CHECK_BATCHES
        if self.settings["ckpt_walltime_margin"] > 0 and self.is_writer:
            self._walltime = WallClockStop(
                self.settings["ckpt_walltime_margin"],
                self.settings["ckpt_end_time"],
                self.checkpointer.logger,
            )
            self._walltime.start()

    def epoch_begin(
        self, epoch: int, fix: str = 'fit(..., initial_epoch=J["epoch"])', batch: int = 0
    ) -> None:
        """An epoch starts after `epoch` completed ones; the first one resumes the run,
        `batch` batches into that epoch (J["batch"] after a restart; later epochs: 0).

        `fix`: how the caller's training starts after the restored epoch, for the
        error of `check_start`.
        """
        if not self._first_epoch_seen:
            self.check_start(epoch, fix, batch)
        self._epoch = epoch + 1
        self._epoch_started = self._batch_clock = time.perf_counter()
        if self._walltime is not None:
            self._walltime.batch_begins()
        if self._first_epoch_seen:
            return
        self._first_epoch_seen = True
        self._first_batch = batch if batch > 0 else None
        if self._watch is not None:
            self._watch.completed_epoch = epoch
        if (epoch > 0 or batch > 0) and self.is_writer:
            self._resume(epoch, batch)

    def check_start(self, completed: int, fix: str, batch: int = 0) -> None:
        """Training begins after `completed` epochs and `batch` batches of the next:
        refuse (ending the session) unless that is what a restart in this process
        restored, if any.

        A loop that starts elsewhere (`fit` without `initial_epoch`, a loop that does
        not skip the J["batch"] batches already trained) would train the restored
        batches again and replace their checkpoints.

        Raises:
            ParameterValueError: naming both positions and `fix`.
        """
        restored = self._restored
        if restored is None or (completed, batch) == restored:
            return
        self.end()
        restored_epoch, restored_batch = restored
        if (completed, restored_batch) == restored:  # the right epoch, another batch
            raise ParameterValueError(
                f"restart restored epoch {completed + 1} after batch {restored_batch} "
                f"from '{self.checkpointer.layout.ckpts}' in this process, but training "
                f"begins at batch {batch} of that epoch; expected it to begin at batch "
                f'{restored_batch} (0-based): skip the first J["batch"] batches of the '
                f"first epoch, with J the dict restart returned. Refused before anything "
                f"was saved: those batches would be trained twice"
            )
        raise ParameterValueError(
            f"restart restored epoch {restored_epoch}"
            f"{f' and {restored_batch} batches' if restored_batch else ''} from "
            f"'{self.checkpointer.layout.ckpts}' in this process, but training begins at "
            f"epoch {completed + 1} (after {completed} completed); expected it to begin "
            f"at epoch {restored_epoch + 1}: {fix}, with J the dict restart returned. "
            f"Refused before anything was saved: the epochs from {completed + 1} on "
            f"would be trained again and replace the saved ones"
        )

    def batch_end(self, batch: int) -> None:
        """0-based `batch` of the running epoch ended (absolute in the epoch): save a
        step checkpoint if one is due (ckpt_save_steps); stop here if pre-empted.

        Raises:
            ParameterValueError: the first batch after a restart at J["batch"] = B is
                not B (the loop did not skip the batches already trained).
            CheckpointWriteError: a step save failed (with ckpt_async: the previous one).
            Preempted: the signal came (a SystemExit with status 75).
        """
        ended = time.perf_counter()
        if self._first_batch is not None:
            expected, self._first_batch = self._first_batch, None
            if batch != expected:
                self.end()
                raise ParameterValueError(
                    f"restart restored epoch {self._epoch} after batch {expected} from "
                    f"'{self.checkpointer.layout.ckpts}' in this process, but the first "
                    f"batch that ended is batch {batch} (0-based); expected batch "
                    f'{expected}: skip the first J["batch"] batches of the first epoch '
                    f"and number the others from there, with J the dict restart returned"
                )
        position = (self._epoch - 1, batch + 1)
        self._last_batch = batch
        seconds = None if self._batch_clock is None else ended - self._batch_clock
        if self._steps is not None:
            self._steps.batch_ended(seconds)
        if self._walltime is not None:
            self._walltime.batch_ended()
        if self._watch is not None and self._watch.requested:
            raise self._stop_preempted(f"epoch {self._epoch}, batch {batch + 1}", position)
        if (
            self._steps is not None
            and self._steps.due()
            and self._epoch_may_save()
            and not self._epoch_end_saves_next(batch)
        ):
            self._save_step(position, "steps")
        if self._stops_at_batches() and (batch + 1) % self._walltime_every == 0:
            estimate = None
            if self._walltime is not None:
                ends = self._epoch_batches is not None and (
                    batch + 1 + self._walltime_every >= self._epoch_batches
                )
                estimate = self._walltime.should_stop_batch(self._walltime_every, ends)
            if self._all_agree_to_stop(estimate is not None):
                raise self._stop_walltime_at_batch(position, estimate)
        self._batch_clock = time.perf_counter()

    def epoch_end(self, epoch: int, logs: Mapping[str, Any] | None) -> None:
        """1-based `epoch` ended with metrics `logs`: record it in the history, and save
        it if the policy says so.

        Raises:
            CheckpointWriteError: the save failed (with ckpt_async: the previous one).
            Preempted: the signal came during the epoch, or (ckpt_walltime_margin) the
                next epoch and a save would not finish before the job's end.
        """
        # a restart at the epoch's last batch (a step saved there) trains no batch of it
        self._first_batch = None
        if self._last_batch is not None:
            self._epoch_batches, self._last_batch = self._last_batch + 1, None
        train_seconds = (
            None if self._epoch_started is None else time.perf_counter() - self._epoch_started
        )
        decision = None
        if self._walltime is not None:
            self._walltime.epoch_ended()
        if self.is_writer:
            self.checkpointer.record_epoch(epoch, logs, train_seconds)
            # a metric missing from the logs is refused here, before anything is saved
            decision = self._refuse_unless(
                lambda: self.checkpointer.decide(epoch, logs, train_seconds)
            )
            if decision is not None:
                started = time.perf_counter()
                self.checkpointer.save(decision, lambda: self._capture(epoch, 0))
                if self._steps is not None:
                    self._steps.saved(time.perf_counter() - started, self._background_seconds())
        if self._walltime is not None:
            self._walltime.save_ended(
                saved=decision is not None, background_seconds=self._background_seconds()
            )
        if self._watch is not None:
            self._watch.epoch_completed(
                epoch,
                saved=decision is not None or self._not_saving() is not None,
                take_snapshot=lambda: self._hold(epoch, logs, train_seconds),
            )
            if self._watch.requested:
                raise self._stop_preempted(f"epoch {epoch}")
        if self.settings["ckpt_walltime_margin"] > 0 and epoch < self.settings["epochs"]:
            # with step checkpoints the next epoch need not fit: its batches until the
            # margin do (and are saved), so stop when not even the next ones fit
            if self._walltime is None:
                estimate = None
            elif self._stops_at_batches():
                estimate = self._walltime.should_stop_batch(self._walltime_every)
            else:
                estimate = self._walltime.should_stop()
            if self._all_agree_to_stop(estimate is not None):
                raise self._stop_walltime(epoch, saved=decision is not None, estimate=estimate)

    def check_metric_names(self, reported: Collection[str], what: str) -> None:
        """Before the first epoch ends, the metrics known so far (`what`): a near miss
        of one of them for `ckpt_save_best_metric` is a typo, refused at once
        (`Checkpointer.check_metric_early`); the writer lock is released first.

        Raises:
            ParameterValueError: naming the metric and the reported ones.
        """
        if self.is_writer:
            self._refuse_unless(lambda: self.checkpointer.check_metric_early(reported, what))

    def _refuse_unless(self, check: Callable[[], Any]) -> Any:
        """Return `check()`; if it raises a parameter error, end the session (unlock)
        before the error leaves: nothing was saved for it, and a caller that goes on
        in this process may train again."""
        try:
            return check()
        except ParameterValueError:
            self.end()
            raise

    def end(self) -> None:
        """Training ended: wait for the last save, report, release the lock."""
        if self._watch is not None:
            self._watch.uninstall()
        if self._adapter is not None and self.is_writer:
            self.checkpointer.finish()

    # -- resuming ----------------------------------------------------------------------

    def _resume(self, initial_epoch: int, batch: int) -> None:
        """Continue the run whose checkpoint of `initial_epoch` (and `batch`) the
        restart loaded."""
        layout = self.checkpointer.layout
        try:
            info = read_epoch_info(layout, initial_epoch, batch)
        except NoCheckpointError:
            self.checkpointer.logger.warning(
                "training starts at epoch %d but '%s' has no checkpoint: best-metric and "
                "keep state start afresh",
                initial_epoch + 1,
                layout.checkpoint_dir(initial_epoch, batch),
            )
            return
        self.checkpointer.resume(info)
        if batch:
            self._step_saved = (initial_epoch, batch)

    # -- step checkpoints (ckpt_save_steps) --------------------------------------------

    def _saves_steps(self) -> bool:
        """Whether this run saves step checkpoints: ckpt_save_steps is not 0 (the loop
        then resumes at J["batch"]: an opt-in) and this process saves."""
        return self.settings["ckpt_save_steps"] != 0 and self._not_saving() is None

    def _epoch_end_saves_next(self, batch: int) -> bool:
        """Whether `batch` is the epoch's last (as long as the last epoch was) and the
        policy saves the epoch's end whatever its metrics (interval, final): a step
        save now would be superseded a moment later. When it is not the last after
        all, the step save is still due at the next batch."""
        if self._epoch_batches is None or batch + 1 != self._epoch_batches:
            return False
        return (
            save_reason(
                self._epoch,
                final_epoch=self.settings["epochs"],
                interval=self.settings["ckpt_save_interval"],
                skip_epochs=self.settings["ckpt_skip_epochs"],
                improved=False,
            )
            is not None
        )

    def _epoch_may_save(self) -> bool:
        """ckpt_skip_epochs: nothing is saved in the epochs before it."""
        return self._epoch >= self.settings["ckpt_skip_epochs"]

    def _stops_at_batches(self) -> bool:
        """Whether the wall-clock stop may come at a batch end (step checkpoints on).
        The same in every process, writer or not: each check may be a collective."""
        settings = self.settings
        return (
            settings["ckpt_walltime_margin"] > 0
            and settings["ckpt_save_steps"] != 0
            and settings["ckpt_save_interval"] != 0
        )

    def _save_step(self, position: tuple[int, int], reason: str) -> None:
        """Save the state now as the step checkpoint after `position` = (epochs
        completed, batches done), unless it is already the last one saved."""
        if position == self._step_saved:
            return
        started = time.perf_counter()
        decision = self.checkpointer.step_decision(*position, reason)
        self.checkpointer.save(decision, lambda: self._capture(*position))
        self._step_saved = position
        stall = time.perf_counter() - started
        assert self._steps is not None
        self._steps.saved(stall, self._background_seconds())
        if self._walltime is not None:
            self._walltime.step_save_ended(stall, self._background_seconds())

    def _background_seconds(self) -> float | None:
        """With ckpt_async: how long the last finished background write took."""
        if self.checkpointer.background is None:
            return None
        return self.checkpointer.last_write_seconds

    # -- capturing the state -----------------------------------------------------------

    def _capture(self, epoch: int, batch: int) -> WriteFiles:
        """Snapshot the state for a save now (training thread) of the checkpoint after
        `epoch` epochs and `batch` batches (which the adapter learns first, if it has
        `set_position`); return its writer.

        A synchronous save is written at once, before training goes on: its snapshot
        is made of views and costs neither a copy nor memory. With ckpt_async it is
        written while training goes on, so it is a copy in host memory, made into the
        previous save's (written by then: `Checkpointer.save` waits for it), so that
        the memory is allocated once per run.
        """
        self._set_position(epoch, batch)
        if self.checkpointer.background is None:
            return self._files_writer(self.adapter.snapshot(copy=False))
        self._async_snapshot = self._copy_state(
            self._async_snapshot, "ckpt_async=true", "ckpt_async=false"
        )
        return self._files_writer(self._async_snapshot)

    def _hold(
        self, epoch: int, logs: Mapping[str, Any] | None, train_seconds: float | None
    ) -> tuple[SaveDecision, WriteFiles]:
        """Copy the state of unsaved `epoch` for a save pre-emption may ask for later."""
        signal = self.settings["ckpt_signal"]
        self._set_position(epoch, 0)
        self._held_snapshot = self._copy_state(
            self._held_snapshot, f"ckpt_signal={signal}", "ckpt_signal=off"
        )
        decision = self.checkpointer.decision_with_current_best(
            epoch, "pre-emption", logs=logs, train_seconds=train_seconds
        )
        return decision, self._files_writer(self._held_snapshot)

    def _set_position(self, epoch: int, batch: int) -> None:
        set_position = getattr(self.adapter, "set_position", None)
        if set_position is not None:
            set_position(epoch, batch)

    def _copy_state(self, spare: Any, setting: str, off: str) -> Any:
        """A host-memory copy of the state, into `spare` (a snapshot no longer needed);
        the first one is checked to fit in memory (`check_snapshot_fits`)."""
        if spare is None:
            check_snapshot_fits(self.adapter.state_nbytes(), setting, off)
        return self.adapter.snapshot(copy=True, into=spare)

    def _files_writer(self, snapshot: Any) -> WriteFiles:
        adapter, checksum = self.adapter, self.settings["ckpt_checksum"]
        return lambda directory: adapter.write_model_file(snapshot, directory, checksum)

    # -- pre-emption (ckpt_signal) -----------------------------------------------------

    def _start_preemption_watch(self) -> PreemptionWatch | None:
        name = self.settings["ckpt_signal"]
        if name == "off":
            return None
        if self.adapter.trains_in_lockstep():
            raise ParameterValueError(
                f"parameter 'ckpt_signal' is {name!r} while several processes train in "
                f"lock-step ({self.adapter.adapter_name}); expected 'off': the processes "
                f"could stop at different batches and wait for each other forever"
            )
        watch = PreemptionWatch(name)
        watch.install()
        return watch

    def _not_saving(self) -> str | None:
        """Why this process saves nothing at all, or None if it saves."""
        if not self.is_writer:
            return "this process does not write the checkpoint tree"
        if self.settings["ckpt_save_interval"] == 0:
            return "ckpt_save_interval is 0"
        return None

    def _stop_preempted(self, where: str, position: tuple[int, int] | None = None) -> Preempted:
        """Stop on the signal at `where`: with step checkpoints and a batch `position`,
        saving the state of that batch; else keeping the last completed epoch."""
        watch = self._watch
        assert watch is not None
        if not self.is_writer:
            return watch.stop(where, self._not_saving() or "", console_logger("save"))
        self._wait_for_saves()
        if position is not None and self._steps is not None:
            self._save_step(position, "pre-emption")
            self._wait_for_saves()
            step = f"epoch {position[0] + 1}, batch {position[1]} saved now"
            return watch.stop(where, "", self.checkpointer.logger, step_saved=step)

        def save_pending(epoch: int, pending: tuple[SaveDecision, WriteFiles]) -> None:
            decision, write_files = pending
            self.checkpointer.save_captured(decision, write_files)
            self._wait_for_saves()

        saving: Callable[[int, Any], None] | str = self._not_saving() or save_pending
        return watch.stop(where, saving, self.checkpointer.logger)

    # -- the job's wall-clock end (ckpt_walltime_margin) ---------------------------------

    def _check_walltime_settings(self) -> None:
        """ckpt_end_time (its form checked with the parameters) needs a margin."""
        end_time = self.settings["ckpt_end_time"]
        if end_time is None:
            return
        if self.settings["ckpt_walltime_margin"] == 0:
            raise ParameterValueError(
                f"parameter 'ckpt_end_time' is {end_time!r} but 'ckpt_walltime_margin' is 0 "
                f"(the wall-clock stop is off); expected a margin in seconds > 0, e.g. 60, "
                f"or no ckpt_end_time"
            )

    def _check_walltime_agreement(self) -> None:
        """A non-writer without a collective could not learn the writer's verdict."""
        margin = self.settings["ckpt_walltime_margin"]
        if margin > 0 and not self.is_writer and self.adapter.all_gather() is None:
            raise ParameterValueError(
                f"parameter 'ckpt_walltime_margin' is {margin:g} in a process that does not "
                f"write the checkpoint (is_writer=False) and has no collective "
                f"({self.adapter.adapter_name}) to learn the writer's decision to stop; "
                f"expected 0 here: the writer would stop alone and the others wait for it "
                f"forever (use ckpt_walltime_margin only where every process can agree)"
            )

    def _all_agree_to_stop(self, writer_says_stop: bool) -> bool:
        """The writer's verdict, the same in every process of a multi-process job."""
        all_gather = self.adapter.all_gather()
        if all_gather is None:
            return writer_says_stop
        everyone = all_gather([int(self.is_writer), int(writer_says_stop)])
        return any(is_writer and stop for is_writer, stop in everyone)

    def _stop_walltime(self, epoch: int, saved: bool, estimate: StopEstimate | None) -> Preempted:
        """Keep `epoch` on disk (unless the policy saved it), log why; the stop to raise."""
        if self._watch is not None:
            self._watch.uninstall()
        if not self.is_writer:
            return self._stop_as_the_writer_says(f"epoch {epoch}", "next epoch")
        not_saving = self._not_saving()
        if not_saving is not None:
            kept = f"nothing saved: {not_saving}"
        elif saved:
            kept = f"epoch {epoch} is already on disk"
        else:
            decision = self.checkpointer.decision_with_current_best(epoch, "wall-clock")
            self.checkpointer.save(decision, lambda: self._capture(epoch, 0))
            kept = f"epoch {epoch} saved now"
        self._wait_for_saves()
        return self._stopped_writing(f"epoch {epoch}", estimate, kept)

    def _stop_as_the_writer_says(self, where: str, what: str) -> Preempted:
        """A process that does not write stops after `where` because the writer said
        `what` would not finish before the job's end; the stop to raise."""
        message = (
            f"WALL-CLOCK STOP after {where}: the checkpoint writer says the {what} would "
            f"not finish before the job's end; exiting with status {PREEMPTED_EXIT_STATUS}"
        )
        console_logger("save", self._verbose).warning(message)
        return Preempted(message)

    def _stop_walltime_at_batch(
        self, position: tuple[int, int], estimate: StopEstimate | None
    ) -> Preempted:
        """Save the state of the batch that ended (`position`) as a step checkpoint,
        log why; the stop to raise."""
        if self._watch is not None:
            self._watch.uninstall()
        where = f"epoch {position[0] + 1}, batch {position[1]}"
        if not self.is_writer:
            return self._stop_as_the_writer_says(where, "next batches")
        self._wait_for_saves()
        self._save_step(position, "wall-clock")
        self._wait_for_saves()
        kept = f"{where} is on disk (a step checkpoint: the epoch resumes after this batch)"
        return self._stopped_writing(where, estimate, kept)

    def _stopped_writing(self, where: str, estimate: StopEstimate | None, kept: str) -> Preempted:
        """The writer stops after `where`, for `estimate`, having `kept` the state on
        disk as said: logged; the stop to raise."""
        assert estimate is not None
        message = (
            f"WALL-CLOCK STOP after {where}: {estimate.describe()}; {kept}; exiting with "
            f"status {PREEMPTED_EXIT_STATUS} so that the job script can requeue"
        )
        self.checkpointer.logger.warning(message)
        return Preempted(message)

    def _wait_for_saves(self) -> None:
        """With ckpt_async: wait for the save in flight (raising its error)."""
        if self.checkpointer.background is not None:
            self.checkpointer.background.wait()
