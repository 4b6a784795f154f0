"""A restart into a Keras model whose variables do not exist yet, loaded once they do.

A subclassed model (`class M(keras.Model)` creating its layers in `__init__`, without
`build`) has no variables until its first call. With the TensorFlow backend and no
distribution strategy, `Model.fit` creates them while tracing the first training
step, after `on_train_begin` (Keras' `_maybe_symbolic_build` builds earlier only under
a strategy). `restart()` on such a model verifies the checkpoint as always and holds
it here (`hold`); `CandleCheckpointCallback.on_train_begin` hands it on
(`load_when_built`): loaded at once if something built the model meanwhile, else when
fit first calls its train function. Then the model is built from the data's spec,
exactly as Keras builds it under a strategy (`Trainer._symbolic_build`: variables,
optimizer, metrics), the verified bytes are loaded, and only then does the first step
run. The first update therefore starts from the checkpoint's weights, optimizer and
RNG state, as in an uninterrupted run.

A model built but not compiled yet (upstream CANDLE's benchmarks call restart before
`model.compile`) has no optimizer to take the checkpoint's: `KerasAdapter.restore`
loads the weights at once and holds the whole checkpoint here, loaded again at the
start of fit (weights, optimizer and RNG state, as a compiled model's restart loads
them), so the resume is exact all the same.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.adapter import Restored
from ..core.errors import CheckpointError
from ..core.logs import LibraryLogger
from ..core.restore.restart import log_restored
from ..core.restore.resume import Checkpoint
from . import h5
from .distributed import strategy_scope

# Model.build(input_shape) on a subclassed model without its own `build` marks the
# model built but creates no variables of its layers (Keras warns): calling it creates them.
_BUILD_ADVICE = (
    "build the model before calling restart(): call it on one batch "
    "(model(x[:1])), or give it a build(input_shape) method that builds its "
    "layers and call model.build(input_shape)"
)


@dataclass(frozen=True)
class PendingLoad:
    """A verified checkpoint waiting for its model's variables, and how to load it."""

    checkpoint: Checkpoint
    logger: LibraryLogger
    load: Callable[[], Restored]


# Keyed by the model; a model that is dropped drops its pending load with it.
_pending: weakref.WeakKeyDictionary[Any, PendingLoad] = weakref.WeakKeyDictionary()


def hold(
    model: Any,
    checkpoint: Checkpoint,
    logger: LibraryLogger,
    load: Callable[[], Restored],
    why: str = "has no variables yet; CandleCheckpointCallback loads the checkpoint "
    "once fit has built the model, before the first training step",
) -> Restored:
    """Keep the verified `checkpoint` for `model` until `load_when_built`; `load` loads it
    into the built model and returns what it restored. `why` ends the restart's log
    line after the model's name."""
    _pending[model] = PendingLoad(checkpoint, logger, load)
    return Restored(parts=(), exact=True, deferred=True, source=f"model '{model.name}' {why}")


def is_pending(model: Any) -> bool:
    """Whether a restart into `model` still waits to be loaded."""
    return model in _pending


def load_when_built(model: Any) -> None:
    """At the start of fit: load the checkpoint `restart()` held for `model`, now if the
    model is built, else just before fit's first training step (see the module
    docstring). Nothing to do when there is none.

    Raises:
        CheckpointError: fit has no train function to precede (not called from fit).
    """
    pending = _pending.pop(model, None)
    if pending is None:
        return
    if not h5.is_unbuilt(model):
        _load(pending, "deferred until the start of fit")
        return
    train_function = getattr(model, "train_function", None)
    if train_function is None:
        raise CheckpointError(
            f"the checkpoint of epoch {pending.checkpoint.epoch} waits for model "
            f"'{model.name}' to be built, but it is not built and has no train function "
            f"to build it; {_BUILD_ADVICE}"
        )

    def build_load_then_train(iterator: Any) -> Any:
        model.train_function = train_function
        try:
            _build_from_spec(model, iterator, pending)
        except CheckpointError as error:
            _log_refusal(pending, error)
            raise
        _load(pending, "deferred until fit built the model, before its first step")
        return train_function(iterator)

    model.train_function = build_load_then_train


def _build_from_spec(model: Any, iterator: Any, pending: PendingLoad) -> None:
    """Create the model's variables from the spec of the batches `iterator` yields."""
    spec = getattr(iterator, "element_spec", None)
    if spec is None:
        raise CheckpointError(
            f"cannot build model '{model.name}' to load the checkpoint of epoch "
            f"{pending.checkpoint.epoch}: fit's data iterator is a "
            f"{type(iterator).__name__} without an element_spec; {_BUILD_ADVICE}"
        )
    with strategy_scope(model):
        try:
            model._symbolic_build(data_batch=spec)
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(
                f"cannot build model '{model.name}' from its data ({spec}) to load the "
                f"checkpoint of epoch {pending.checkpoint.epoch}: {error}; "
                f"{_BUILD_ADVICE}"
            ) from error
    if h5.is_unbuilt(model):
        unbuilt = [layer.name for layer in model._flatten_layers() if not layer.built]
        raise CheckpointError(
            f"model '{model.name}' called on its data still has unbuilt layers "
            f"{unbuilt[:6]}, so the checkpoint of epoch {pending.checkpoint.epoch} "
            f"cannot be loaded before the first step; {_BUILD_ADVICE}"
        )


def _load(pending: PendingLoad, when: str) -> None:
    started = time.perf_counter()
    try:
        restored = pending.load()
    except CheckpointError as error:
        _log_refusal(pending, error)
        raise
    log_restored(pending.logger, pending.checkpoint, restored, started, when)


def _log_refusal(pending: PendingLoad, error: CheckpointError) -> None:
    pending.logger.error(
        "deferred restart from epoch %d refused: %s", pending.checkpoint.epoch, error
    )
