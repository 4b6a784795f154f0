"""`KerasAdapter`: the core's `FrameworkAdapter` for a Keras 3 model (`model.h5`)."""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any, BinaryIO

import h5py
import keras
import numpy

from ..core.adapter import Restored
from ..core.logs import LibraryLogger
from ..core.restore.resume import Checkpoint
from ..core.run.writer import AllGather, WriterDecision, writer_decision
from ..core.save.protocol import ModelFile
from ..core.storage.checksum import RegionPlanner, Regions
from ..core.storage.durable import WritebackStarter
from . import deferred, h5, steps
from .distributed import (
    multi_worker_strategy,
    strategy_all_gather,
    strategy_decision,
    strategy_scope,
)


class KerasAdapter:
    """Checkpoints a built and compiled Keras model: weights, optimizer, RNG state.

    Args:
        model: the Keras model.
        weights_only: snapshots leave out the optimizer (`ckpt_save_weights_only`).
    """

    adapter_name = "keras"
    model_format = f"keras-h5/{h5.FORMAT_VERSION}"

    def __init__(
        self, model: Any, weights_only: bool = False, batches_per_epoch: int | None = None
    ) -> None:
        self.model = model
        self.weights_only = weights_only
        self.batches_per_epoch = batches_per_epoch  # of fit's data, for step saves
        self._position = (0, 0)  # (epochs completed, batches) of the next snapshot
        self._in_place: h5.InPlaceRead | None = None  # the model file read last
        # The variables any file of this restart was read into, verified or not: each
        # must be loaded again by the checkpoint that is finally restored.
        self._overwritten: set[int] = set()

    def library_versions(self) -> dict[str, str]:
        versions = {
            "keras": keras.__version__,
            "h5py": h5py.__version__,
            "numpy": numpy.__version__,
            "backend": keras.backend.backend(),
        }
        if versions["backend"] == "tensorflow":
            import tensorflow

            versions["tensorflow"] = tensorflow.__version__
        versions["platform"] = platform.platform()
        return versions

    def writer_decision(self, explicit: bool | None) -> WriterDecision:
        return writer_decision(explicit, strategy_decision(self.model))

    def all_gather(self) -> AllGather | None:
        return strategy_all_gather(self.model)

    def trains_in_lockstep(self) -> bool:
        return multi_worker_strategy(self.model) is not None

    def state_exists(self) -> bool:
        return not h5.is_unbuilt(self.model)

    def state_nbytes(self) -> int:
        return h5.state_nbytes(self.model, self.weights_only)

    def set_position(self, epochs_completed: int, batches_done: int) -> None:
        """The next snapshot is taken after `batches_done` batches of epoch
        `epochs_completed` + 1 (0: at an epoch end)."""
        self._position = (epochs_completed, batches_done)

    def snapshot(self, *, copy: bool, into: Any | None = None) -> h5.TrainingState:
        """The state as `h5.snapshot` takes it, and inside an epoch (`set_position`)
        what fit holds besides (`steps.StepState`, always a copy: it is small)."""
        state = h5.snapshot(self.model, self.weights_only, copy=copy, into=into)
        epoch, batch = self._position
        if batch == 0:
            return state
        step = steps.StepState.capture(self.model, epoch, batch, self.batches_per_epoch)
        return dataclasses.replace(state, extra=(step.write,))

    def write_model_file(
        self, snapshot: h5.TrainingState, directory: str, checksum: bool
    ) -> ModelFile:
        path = os.path.join(directory, h5.MODEL_FILE)
        written = h5.write(snapshot, path, WritebackStarter(path), checksum=checksum)
        return ModelFile(h5.MODEL_FILE, written.crc32)

    def read_model_into(self) -> RegionPlanner | None:
        """The large arrays of a model file go straight into the built model's
        variables (`h5.plan_in_place`); an unbuilt model has no buffers to take them,
        and an uncompiled one is loaded from the file's bytes twice."""
        if h5.is_unbuilt(self.model) or not self._compiled():
            return None  # loaded twice (`restore`): the contents must hold every array
        return RegionPlanner(self._plan)

    def _compiled(self) -> bool:
        return getattr(self.model, "optimizer", None) is not None

    def _plan(self, path: str, stream: BinaryIO) -> Regions:
        self._in_place = h5.plan_in_place(self.model, path, stream)
        self._overwritten |= self._in_place.offsets.keys()
        return self._in_place.regions

    def restore(
        self, checkpoint: Checkpoint, logger: LibraryLogger, *, weights_only: bool = False
    ) -> Restored:
        """Load `checkpoint` now, or hold it (`deferred`) while the model is unbuilt;
        into a model not compiled yet, load the weights now and hold the rest. A step
        checkpoint's position and metrics (`steps.read`, checked first) are held for
        the callback to start fit at its batch."""
        listed = None
        if not weights_only:  # one listing of the file for both (`h5.list_for_restore`)
            listed = h5.list_for_restore(
                checkpoint.model_contents, checkpoint.model_path, self._planned(checkpoint)
            )
        step = None if listed is None else steps.read(checkpoint, listed.listing.root)
        restored = self._restore(checkpoint, logger, weights_only, listed)
        steps.hold(self.model, step)
        if step is not None and not step.metrics_saved:
            logger.warning(
                "the checkpoint after batch %d of epoch %d was saved under a multi-worker "
                "strategy, without the metrics' running state: that epoch's logs will "
                "average only its batches trained from here",
                step.batch,
                step.epoch + 1,
            )
        return restored

    def _restore(
        self,
        checkpoint: Checkpoint,
        logger: LibraryLogger,
        weights_only: bool,
        listed: h5.Listed | None,
    ) -> Restored:
        if h5.is_unbuilt(self.model):
            return deferred.hold(
                self.model,
                checkpoint,
                logger,
                lambda: self.load(checkpoint, logger, weights_only=weights_only, listed=listed),
            )
        if not weights_only and not self._compiled():
            self.load(checkpoint, logger, weights_only=True, listed=listed)
            return deferred.hold(
                self.model,
                checkpoint,
                logger,
                lambda: self.load(checkpoint, logger, listed=listed),
                why="is not compiled: its weights are loaded now; the whole checkpoint "
                "(weights, optimizer and RNG state) is loaded again once fit starts "
                "with this callback (CandleCkptKeras, CandleCheckpointCallback)",
            )
        return self.load(checkpoint, logger, weights_only=weights_only, listed=listed)

    def _planned(self, checkpoint: Checkpoint) -> h5.InPlaceRead | None:
        """The plan `checkpoint`'s model file was read by (`read_model_into`), if any."""
        in_place = self._in_place
        return in_place if in_place is not None and in_place.path == checkpoint.model_path else None

    def load(
        self,
        checkpoint: Checkpoint,
        logger: LibraryLogger,
        *,
        weights_only: bool = False,
        listed: h5.Listed | None = None,
    ) -> Restored:
        """Load the verified `checkpoint` into the built model (`h5.restore`, from
        `listed` if `restore` listed the file), but for what was read into its
        variables already (`read_model_into`)."""
        in_place, self._in_place = self._planned(checkpoint), None
        overwritten, self._overwritten = self._overwritten, set()
        with strategy_scope(self.model):
            loaded = h5.restore(
                self.model,
                checkpoint.model_path,
                contents=checkpoint.model_contents,
                logger=logger,
                weights_only=weights_only,
                in_place=in_place,
                overwritten=overwritten,
                listed=listed,
            )
        parts = ("weights",) + (("optimizer",) if loaded["optimizer_restored"] else ())
        return Restored.of(
            parts,
            rng_restored=loaded["rng_restored"],
            exact=loaded["optimizer_restored"],
            missing="optimizer state",
            source="legacy upstream-CANDLE file" if loaded["legacy"] else "",
        )
