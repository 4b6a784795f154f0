"""Pre-emption: on a signal, stop at the end of the batch, keep the last epoch, exit 75.

With `ckpt_save_steps` (step checkpoints on), step 2 below is instead: save the state
at the end of that batch as a step checkpoint (core/run/session.py), so that the
restart resumes after it and trains no batch twice.

Batch systems warn a job before killing it (Slurm: `#SBATCH --signal=B:USR1@120`, or
SIGTERM at the time limit). With `ckpt_signal` set (USR1, USR2, TERM or INT), the
callback installs a handler for that signal when training begins. The handler only
records the signal; at the end of the batch that is running then (or at the end of
the epoch, if it arrives during validation or a save) the callback:

1. stops training: the partial epoch is abandoned, a restart re-runs it;
2. makes sure the last completed epoch is on disk: if the save interval skipped it,
   it is saved now, from the host-memory snapshot taken at that epoch's end (only
   when `ckpt_signal` is on, the callback takes one at each epoch end it does not
   save); a save that was running when the signal came finishes first, so no save
   is left half-done;
3. logs what happened (WARNING, "PRE-EMPTED by SIGUSR1 ...") to ckpt.log;
4. raises `Preempted`, a `SystemExit` with status `PREEMPTED_EXIT_STATUS` (75,
   EX_TEMPFAIL of sysexits.h: "temporary failure, try again"): unless the script
   catches it, the process exits with status 75 and the job script requeues::

       python train.py --ckpt_signal USR1 ...; [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID

With `ckpt_save_interval 0` (saving disabled) nothing is saved, but training still
stops and exits with 75. The signal is handled in the main thread only; it is refused
under a multi-worker tf.distribute strategy, whose workers could stop at different
batches and wait for each other forever (with other multi-process launchers the same
can happen: use it there only if every rank gets the signal between the same batches).
The handler is installed from the start of fit to its end; outside fit the signal
keeps its previous handler (for USR1/USR2/TERM by default: terminate, which loses
nothing a restart needs).

Example (what the callback does)::

    watch = PreemptionWatch("USR1")
    watch.install()
    ...                                   # at each batch end:
    if watch.requested: raise watch.stop(...)
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..logs import LibraryLogger

PREEMPTED_EXIT_STATUS = 75


class Preempted(SystemExit):
    """Training stopped on the pre-emption signal; the exit status is 75."""

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT_STATUS)
        self.message = message


class PreemptionWatch:
    """Records the arrival of one signal, and which epoch is the last completed one.

    Args:
        signal_name: "USR1", "USR2", "TERM" or "INT" (the `ckpt_signal` value).
    """

    def __init__(self, signal_name: str) -> None:
        self.signal_name = f"SIG{signal_name}"
        self.signum: int = getattr(signal, self.signal_name)
        self.received: int | None = None
        self.completed_epoch = 0  # the last completed 1-based epoch
        self.pending: Any = None  # its state, if it is not on disk
        self._previous: Any = None  # the handler `install` replaced

    @property
    def requested(self) -> bool:
        """Whether the signal has arrived."""
        return self.received is not None

    def install(self) -> None:
        """Handle the signal from now on; call from the main thread (Python's rule)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                f"ckpt_signal={self.signal_name[3:]} needs model.fit in the "
                f"main thread, where Python delivers signals; found "
                f"{threading.current_thread().name}"
            )
        self._previous = signal.signal(self.signum, self._record)

    def uninstall(self) -> None:
        """Put back the handler that was there before `install`."""
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def epoch_completed(self, epoch: int, saved: bool, take_snapshot: Callable[[], Any]) -> None:
        """Note that 1-based `epoch` ended; keep `take_snapshot()` if it was not saved."""
        self.completed_epoch = epoch
        self.pending = None if saved else take_snapshot()

    def stop(
        self,
        stopped_at: str,
        save_pending: Callable[[int, Any], None] | str,
        logger: LibraryLogger,
        step_saved: str | None = None,
    ) -> Preempted:
        """Save the pending epoch if any, log, uninstall; return the `Preempted` to raise.

        Args:
            stopped_at: where training stopped, for the log ("epoch 5, batch 3").
            save_pending: callable(epoch, state) that saves the pending state; or, when
                this process saves nothing, a string saying why (a non-writer worker,
                `ckpt_save_interval` 0).
            logger: where to log.
            step_saved: what was kept instead, when the caller saved the state at this
                very batch (a step checkpoint, ckpt_save_steps): nothing pending is
                saved and the epoch resumes after that batch.
        """
        epoch = self.completed_epoch
        resumes = "the partial epoch will be re-run"
        if step_saved is not None:
            kept, resumes = step_saved, "the epoch resumes after this batch"
            self.pending = None
        elif isinstance(save_pending, str):
            kept = f"nothing saved: {save_pending}"
        elif epoch == 0:
            kept = "no epoch completed in this run"
        elif self.pending is None:
            kept = f"epoch {epoch} is already on disk"
        else:
            save_pending(epoch, self.pending)
            self.pending = None
            kept = f"epoch {epoch} saved now"
        self.uninstall()
        message = (
            f"PRE-EMPTED by {self.signal_name} at the end of {stopped_at}: training "
            f"stopped, {resumes}; {kept}; exiting with status "
            f"{PREEMPTED_EXIT_STATUS} so that the job script can requeue"
        )
        logger.warning(message)
        return Preempted(message)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
