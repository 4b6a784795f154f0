"""CandleCkptKeras: upstream CANDLE's Keras checkpoint API, crash-consistent and exact."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from .callback import CandleCheckpointCallback
from .restart import restart as restart_model


class CandleCkptKeras(CandleCheckpointCallback):
    """Checkpoint a Keras benchmark written for upstream CANDLE (`candle.CandleCkptKeras`).

    The API and semantics of candle_lib's class, on Keras 3 (where candle_lib's own
    fails in its constructor), so that a benchmark switches by its import alone::

        ckpt = candle_ckpt.CandleCkptKeras(gParameters, verbose=False)
        ckpt.set_model(model)
        J = ckpt.restart(model)               # None, or the ckpt-info.json dict
        initial_epoch = J["epoch"] if J else 0
        model.compile(...)                    # before or after restart: both are exact
        model.fit(..., initial_epoch=initial_epoch, callbacks=[..., ckpt])
        ckpt.report_final()

    It is a `CandleCheckpointCallback` (same tree, keep policies, `ckpt_async`,
    `ckpt_signal`, wall-time stop, writer lock, `candle-ckpt`), and `restart` is
    `candle_ckpt.restart` on the model given to `set_model`. Called before
    `model.compile` (NT3's order), `restart` loads the weights at once and the
    optimizer and RNG state when fit starts with this callback, so the resume is exact.
    `J` holds candle_lib's keys (`epoch`, `best_metric_last`, ...) on trees of either
    writer; `J["epoch"]` must be fit's `initial_epoch`, and a fit that begins at another
    epoch is refused before its first step.

    `ckpt_directory` None (candle_lib's default) means `<output_dir>/ckpts`, and a tree
    candle_lib wrote there (or at any `ckpt_directory`) is continued: see
    `candle_ckpt.core.format.locate`.

    Args: those of `CandleCheckpointCallback` (candle_lib's `gParameters`, `logger`
    and `verbose`, and `is_writer`); `gParameters` may hold every key of candle_lib's
    parser (`candle_ckpt.core.params`).
    """

    def __init__(
        self,
        gParameters: Mapping[str, Any],
        logger: Any = "DEFAULT",
        verbose: bool = True,
        is_writer: bool | None = None,
    ) -> None:
        super().__init__(gParameters, logger=logger, verbose=verbose, is_writer=is_writer)
        self.gParameters = gParameters
        self._is_writer, self._verbose = is_writer, verbose

    def restart(self, model: Any = None, verbose: bool | None = None) -> dict | None:
        """Restore the model given to `set_model` from the tree's `last`, if
        `ckpt_restart_mode` asks (candle_lib's call; see `candle_ckpt.restart`).

        `model`: a Keras model (registered here if `set_model` was not called), or
        anything else (Uno passes its parameters), which is ignored. `verbose`: INFO on
        the console; None (candle_lib ignores it) keeps the constructor's.

        Returns:
            The ckpt-info.json dict (`J["epoch"]`: the epochs completed, fit's
            `initial_epoch`), or None.
        """
        if isinstance(model, keras.Model) and self.model is None:
            self.set_model(model)
        if self.model is None:
            raise RuntimeError(
                f"CandleCkptKeras.restart: received {type(model).__name__} and no model "
                f"was registered; call ckpt.set_model(model) first, or pass the model"
            )
        if verbose is None:  # candle_lib ignores it: the constructor's verbose decides
            verbose = self._verbose
        return restart_model(
            self.gParameters, self.model, verbose=verbose, is_writer=self._is_writer
        )
