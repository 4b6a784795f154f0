"""tf.distribute, as the core's writer election and restart agreement need it."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from ..core.run.writer import AllGather, WriterDecision


def multi_worker_strategy(model: Any) -> Any | None:
    """The model's tf.distribute strategy if it spans several workers, else None."""
    strategy = getattr(model, "distribute_strategy", None)
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().jobs:
        return None
    return strategy


def strategy_decision(model: Any) -> WriterDecision | None:
    """Rule 2 of `core.run.writer`: the chief of a multi-worker strategy writes."""
    strategy = multi_worker_strategy(model)
    if strategy is None:
        return None
    should = bool(strategy.extended.should_checkpoint)
    return WriterDecision(
        should, f"{type(strategy).__name__}.extended.should_checkpoint is {should}"
    )


def strategy_scope(model: Any) -> contextlib.AbstractContextManager[Any]:
    """The scope of the model's tf.distribute strategy, or a null context without one.

    Variables created while restoring (the optimizer's slots, built on first use) must
    be created in it, as the model's were; otherwise TensorFlow raises "Need to be
    inside with strategy.scope()".
    """
    strategy = getattr(model, "distribute_strategy", None)
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def strategy_all_gather(model: Any) -> AllGather | None:
    """A collective over the workers of the model's multi-worker strategy, or None.

    A worker with several local replicas (GPUs) contributes its row once per replica.
    """
    strategy = multi_worker_strategy(model)
    if strategy is None:
        return None

    def all_gather(values: Sequence[int]) -> list[tuple[int, ...]]:
        import tensorflow as tf

        local = tf.constant([list(values)], dtype=tf.int64)
        replicas = strategy.run(lambda: tf.identity(local))
        return [tuple(int(v) for v in row) for row in strategy.gather(replicas, axis=0).numpy()]

    return all_gather
