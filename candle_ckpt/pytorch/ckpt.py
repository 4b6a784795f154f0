"""CandleCkptPyTorch: upstream CANDLE's PyTorch checkpoint API, crash-consistent and exact."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..core.restore.restart import restart_run
from ..core.run.session import TrainingSession
from .adapter import TorchAdapter
from .fits import is_generator
from .loader import check_registered

_LOOP_FIX = 'loop over range(J["epoch"], params["epochs"]) and pass that epoch to ckpt_epoch'


class CandleCkptPyTorch:
    """Checkpoint a PyTorch training loop so a killed job resumes bit-identically.

    The API and semantics of upstream CANDLE's `CandleCkptPyTorch`; the tree, the keep
    policies, `ckpt_async`, `ckpt_signal`, the writer lock and the `candle-ckpt` CLI are
    those of `CandleCheckpointCallback`::

        ckpt = candle_ckpt.CandleCkptPyTorch(params)
        ckpt.set_model({"model": net, "optimizer": opt, "scheduler": sched,
                        "generator": loader_generator})
        J = ckpt.restart(net)                  # None, or the ckpt-info.json dict
        for epoch in range(J["epoch"] if J else 0, params["epochs"]):
            for batch, (x, y) in enumerate(loader):
                ...train one step...
                ckpt.batch_end(batch)          # optional: stop here on ckpt_signal
            ckpt.ckpt_epoch(epoch, {"val_loss": val_loss})   # the last one finishes

    With `ckpt_save_steps`, `batch_end` also saves inside the epoch (a step checkpoint;
    ckpt_signal and the wall-clock stop save the batch that just ended), and a restart
    may resume inside an epoch: `J["batch"]` batches of epoch `J["epoch"] + 1` are
    already trained, and the loop skips them, numbering the rest from there::

        start = J["batch"] if J else 0
        for epoch in range(J["epoch"] if J else 0, params["epochs"]):
            for batch in range(start, batches_per_epoch):
                ...train on batch `batch` of this epoch's order...
                ckpt.batch_end(batch)          # saves when a step save is due
            start = 0
            ckpt.ckpt_epoch(epoch, {"val_loss": val_loss})

    Each save holds every registered object's `state_dict()` (a `torch.Generator`'s
    `get_state()`) and the torch, CUDA, numpy and Python random states, in
    `epochs/NNN/model.h5` (HDF5 + JSON: `candle_ckpt.pytorch.state`; loading never
    unpickles). `epoch` is upstream's 0-based loop index: its checkpoint is epoch
    directory `epoch + 1`, and `J["epoch"]` counts the completed epochs, so the loop
    above starts where the checkpoint left off.

    A benchmark written for upstream CANDLE switches by its import: `ckpt_directory`
    None means `<output_dir>/ckpts`, and the tree upstream CANDLE wrote there (or at any
    `ckpt_directory`) is continued (`candle_ckpt.core.format.locate`). A loop that does not
    start at `J["epoch"]` after a restart is refused at its first `ckpt_epoch`.

    In a `torch.distributed` job rank 0 of the process group writes (else `RANK`, then
    the MPI/Slurm rank variables); `restart` checks, with an all_gather, that every rank
    found the same checkpoint before anything is loaded. `ckpt_signal` is refused when
    the group has more than one process (the ranks could stop at different batches).

    Args:
        gParams: the parameter dict (every `ckpt_*` key is checked here; `epochs` is
            required).
        logger: "DEFAULT" logs to `<ckpt_directory>/ckpt.log` (and the console when
            verbose); a `logging.Logger`; None for no log.
        verbose: INFO messages also go to the console.
        is_writer: True/False to say whether this process writes, or None to detect it.
    """

    def __init__(
        self,
        gParams: Mapping[str, Any],
        logger: Any = "DEFAULT",
        verbose: bool = True,
        is_writer: bool | None = None,
    ) -> None:
        self.params = gParams
        self.session = TrainingSession(gParams, logger=logger, verbose=verbose, is_writer=is_writer)
        self._is_writer, self._verbose = is_writer, verbose
        self.model: dict[str, Any] | None = None
        self._started = self._finished = False
        self._next_epoch = 0
        self._restored_batch = 0  # J["batch"] of the restart, if any
        self._epoch_ended = False  # whether ckpt_epoch was called yet

    def set_model(self, model: Mapping[str, Any]) -> None:
        """Register what a checkpoint holds: {"model": net, "optimizer": opt, ...}.

        Any value with `state_dict`/`load_state_dict` (LR scheduler, GradScaler, EMA)
        or a `torch.Generator` (the one a shuffled DataLoader draws from). A
        `torchdata.stateful_dataloader.StatefulDataLoader` (or a plain DataLoader's
        `candle_ckpt.pytorch.loader.EpochPosition`) is the data position: registered,
        it is enough for a resume that reads the very batches an uninterrupted run
        reads, at an epoch end or inside one (`candle_ckpt.pytorch.loader`). Upstream's
        older key "net" is taken as "model".
        """
        if not isinstance(model, Mapping) or not model:
            raise TypeError(
                f"set_model: received {type(model).__name__}; expected a "
                f"non-empty dict such as {{'model': net, 'optimizer': opt}}"
            )
        objects = {
            ("model" if k == "net" and "model" not in model else str(k)): v
            for k, v in model.items()
        }
        for name, value in objects.items():
            if not is_generator(value) and not (
                hasattr(value, "state_dict") and hasattr(value, "load_state_dict")
            ):
                raise TypeError(
                    f"set_model: entry {name!r} is a {type(value).__name__}; "
                    f"expected an object with state_dict and load_state_dict, "
                    f"or a torch.Generator"
                )
            check_registered(name, value)
        self.model = objects

    def restart(self, model: Any = None, verbose: bool | None = None) -> dict | None:
        """Restore everything registered from `ckpts/last`, if `ckpt_restart_mode` asks.

        Call it after `set_model` (upstream passes the model again; it is not needed),
        or pass the set_model dict here. Everything is verified (checksums, the state
        of each entry against its object) before the first value changes. Warm start
        (`ckpt_init_from`): with no checkpoint of the run's own, only the registered
        modules' weights are loaded from that source, and None is returned.

        Lazy modules (`torch.nn.LazyLinear`...) need no first batch: loading
        materialises their parameters from the file's shapes, in place, so an optimizer
        made from the uninitialised parameters holds the loaded ones and the resume is
        exact.

        Returns:
            The ckpt-info.json dict (`J["epoch"]`: epochs completed; `J["batch"]`:
            batches of the next epoch already trained, 0 but after a step
            checkpoint), or None.
        """
        if isinstance(model, Mapping):
            self.set_model(model)
        if verbose is None:  # candle_lib ignores it: the constructor's verbose decides
            verbose = self._verbose
        J = restart_run(self.params, self._adapter(), verbose=verbose, is_writer=self._is_writer)
        self._next_epoch = J["epoch"] if J else 0
        self._restored_batch = J["batch"] if J else 0
        self._start(self._next_epoch)
        return J

    def batch_end(self, batch: int) -> None:
        """0-based `batch` of the running epoch ended (counted from the epoch's start,
        also after a restart at `J["batch"]`): save a step checkpoint when one is due
        (ckpt_save_steps); with `ckpt_signal`, stop here if the signal came (saving this
        batch with ckpt_save_steps, else keeping the last completed epoch; exit
        status 75).

        Raises:
            ParameterValueError: the first batch after a restart is not `J["batch"]`.
        """
        self._start(self._next_epoch)
        self.session.batch_end(batch)

    def ckpt_epoch(self, epoch: int, metric_value: Any = None) -> None:
        """0-based `epoch` ended: save it if the policy says so (epoch `epoch + 1`).

        `metric_value`: a dict of metrics, or a number taken as the value of
        `ckpt_save_best_metric` (better as `ckpt_best_metric_mode` says). The run's
        last epoch (`epochs`) also finishes (`finish`).

        Raises:
            ParameterValueError: the first `epoch` after a restart that restored
                epoch E is not E (the loop did not start at `J["epoch"]`): nothing
                of it is saved.
        """
        self._start(epoch)
        if not self._epoch_ended:
            self._epoch_ended = True
            self.session.check_start(epoch, _LOOP_FIX, self._restored_batch)
        if isinstance(metric_value, Mapping):
            logs = dict(metric_value)
        else:
            name = self.session.settings["ckpt_save_best_metric"]
            logs = {} if metric_value is None or not name else {name: float(metric_value)}
        self.session.epoch_end(epoch + 1, logs)
        self._next_epoch = epoch + 1
        self.session.epoch_begin(epoch + 1)
        if epoch + 1 >= self.session.settings["epochs"]:
            self.finish()

    def finish(self) -> None:
        """Training ended: wait for a background save, log the kept epochs, unlock."""
        if self._started and not self._finished:
            self._finished = True
            self.session.end()

    def __enter__(self) -> CandleCkptPyTorch:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if exc_info[0] is None:
            self.finish()

    def _adapter(self) -> TorchAdapter:
        if self.model is None:
            raise RuntimeError(
                "CandleCkptPyTorch: call set_model({'model': net, 'optimizer': opt, ...}) first"
            )
        return TorchAdapter(self.model, self.session.settings["ckpt_save_weights_only"])

    def _start(self, completed: int) -> None:
        """restart, or else the first batch or epoch end, starts the session: the
        writer lock, the signal watch, the bookkeeping of a resumed run."""
        if not self._started:
            self._started = True
            self.session.begin(self._adapter())
            self.session.epoch_begin(completed, _LOOP_FIX, batch=self._restored_batch)
