"""Several processes, one checkpoint tree: who writes, and agreeing on the restart epoch.

Only one process of a multi-process job writes `ckpt_directory` (the *writer*); the
others train in lock-step and write nothing there: no epochs, no links, no ckpt.log.
`writer_decision` finds the writer, in this order:

1. the caller's explicit `is_writer=True/False` (Horovod: `is_writer=hvd.rank() == 0`);
2. the framework's own process group, as the adapter reports it: the chief of a
   multi-worker `tf.distribute` strategy (`extended.should_checkpoint`), rank 0 of an
   initialised `torch.distributed` process group;
3. `TF_CONFIG`: task type "chief" writes; with no chief in the cluster, "worker" 0 does;
   any other task (evaluator, ps, other workers) does not;
4. the first rank variable set, in the order of `RANK_VARIABLES` (Open MPI, MPICH/Intel
   MPI/PMI, Slurm): rank 0 writes;
5. otherwise this is a single-process job, and it writes.

`agree_on_checkpoint` makes every worker of a multi-process job restart from the
same epoch: each worker gathers every other's (epoch, CRC32 of the model file) with a
collective the adapter supplies (a tf.distribute gather, a torch.distributed
all_gather), and if they differ (e.g. an operator relinked `last` between two workers'
reads, or `ckpt_directory` is not on a file system every worker sees) every worker
raises the same error, before anything is loaded into the model. It is a check, not
a vote: nobody silently follows the chief. Launchers without a framework process group
have no collective here; their ranks read the same `last` and the operator must not relink it
while a job starts.

Example::

    decision = writer_decision(explicit=None)
    if decision.is_writer: ...               # decision.reason: "TF_CONFIG task chief"
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..restore.resume import Checkpoint

AllGather = Callable[[Sequence[int]], list[tuple[int, ...]]]
"""A collective: every process's tuple of ints, in rank order (every process calls it)."""

RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID")


@dataclass(frozen=True)
class WriterDecision:
    """Whether this process writes the checkpoint tree, and which rule decided it."""

    is_writer: bool
    reason: str


def writer_decision(
    explicit: bool | None = None,
    framework: WriterDecision | None = None,
    environ: Mapping[str, str] | None = None,
    rank_variables: tuple[str, ...] = RANK_VARIABLES,
) -> WriterDecision:
    """Decide whether this process writes the checkpoint tree (see the module docstring).

    Args:
        explicit: True/False to decide without detection, or None to detect.
        framework: the adapter's decision from the framework's own process group
            (rule 2), or None when the framework runs a single process.
        environ: the environment to read (default `os.environ`).
        rank_variables: the rank variables of rule 4, in order; the PyTorch adapter
            puts torchrun's `RANK` first.

    Raises:
        TypeError: `explicit` is neither None nor a bool.
        ValueError: `TF_CONFIG` or a rank variable is malformed (the message names it).
    """
    if check_is_writer(explicit) is not None:
        return WriterDecision(bool(explicit), f"is_writer={explicit} given by the caller")
    if framework is not None:
        return framework
    environ = os.environ if environ is None else environ
    if environ.get("TF_CONFIG"):
        return _tf_config_decision(environ["TF_CONFIG"])
    for variable in rank_variables:
        if variable in environ:
            rank = _parse_rank(variable, environ[variable])
            return WriterDecision(rank == 0, f"{variable}={rank}")
    return WriterDecision(True, "a single process (no process group, TF_CONFIG or rank variable)")


def check_is_writer(value: object) -> bool | None:
    """Return the `is_writer` argument if it is None, True or False; else TypeError."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(
            f"argument 'is_writer': received {value!r} "
            f"({type(value).__name__}); expected True, False or None"
        )
    return value


def _tf_config_decision(text: str) -> WriterDecision:
    try:
        config = json.loads(text)
        task_type = config["task"]["type"]
        index = int(config["task"].get("index", 0))
        cluster = config.get("cluster", {})
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"environment variable TF_CONFIG is {text!r}: {error!r}; expected "
            f"JSON with 'cluster' and 'task': {{'type': ..., 'index': ...}}"
        ) from None
    if task_type == "chief":
        return WriterDecision(True, "TF_CONFIG task type chief")
    if task_type == "worker" and "chief" not in cluster:
        return WriterDecision(index == 0, f"TF_CONFIG worker {index} (no chief: worker 0 writes)")
    return WriterDecision(False, f"TF_CONFIG task {task_type} {index} (not the chief)")


def _parse_rank(variable: str, text: str) -> int:
    try:
        rank = int(text)
    except ValueError:
        rank = -1
    if rank < 0:
        raise ValueError(
            f"environment variable {variable} is {text!r}; expected a rank, an integer >= 0"
        )
    return rank


# -- agreeing on the restart checkpoint ---------------------------------------------

_NOTHING = 0  # epoch reported by a worker that found no checkpoint
_FAILED = -1  # epoch reported by a worker whose search raised


def agree_on_checkpoint(
    all_gather: AllGather | None, find: Callable[[], Checkpoint | None]
) -> Checkpoint | None:
    """Run `find()` on this worker and check that every worker found the same checkpoint.

    Collective: every process must call it, once, at the same point (restart does,
    before loading). A worker whose `find()` raises still takes part, so the others
    fail too instead of waiting forever.

    Args:
        all_gather: the adapter's collective (`FrameworkAdapter.all_gather`), or None
            for a single process (then just `find()`).
        find: callable() -> a `resume.Checkpoint` or None; may raise.

    Returns:
        What `find()` returned, the same checkpoint (epoch and batch) on every worker.

    Raises:
        What `find()` raised on this worker; or CheckpointError when any other worker
        failed or found another (epoch, batch, model CRC32) than this one: a rank
        that would resume at another batch fails before training.
    """
    try:
        checkpoint, error = find(), None
    except Exception as raised:  # any failure: the other workers must not wait forever
        checkpoint, error = None, raised
    if all_gather is None:
        if error is not None:
            raise error
        return checkpoint
    mine = _identity(checkpoint, error)
    everyone = all_gather(mine)
    if error is not None:
        raise error
    if any(found[0] == _FAILED for found in everyone):
        failed = [i for i, found in enumerate(everyone) if found[0] == _FAILED]
        raise CheckpointError(
            f"restart failed on process(es) {failed} (see their logs); "
            f"every worker stops so that none trains alone"
        )
    if any(found != mine for found in everyone):
        raise CheckpointError(
            f"the workers do not agree on the checkpoint to restart from: (epoch, batch, "
            f"model CRC32) per process is {everyone} ({(_NOTHING, 0, 0)}: none "
            f"found); expected the same on every worker. Is ckpt_directory on a file "
            f"system every worker sees, and was 'last' (or 'last_step') relinked while "
            f"the job started?"
        )
    return checkpoint


def _identity(checkpoint: Checkpoint | None, error: Exception | None) -> tuple[int, int, int]:
    """(epoch, batch, CRC32 of the model file or 0) of what this worker found, as ints."""
    if error is not None:
        return (_FAILED, 0, 0)
    if checkpoint is None:
        return (_NOTHING, 0, 0)
    model_crc = str(checkpoint.info.get("checksum"))  # a digit string, or the disabled marker
    return (checkpoint.epoch, checkpoint.batch, int(model_crc) if model_crc.isdigit() else 0)
