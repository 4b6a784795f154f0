"""The seam between the core and a framework: what an adapter supplies, typed.

The core owns every step that is the same for every framework (when to save, the save
protocol, links, keep policy, async writes, pre-emption, which process writes, finding
and verifying the restart checkpoint). An adapter owns only what touches the
framework's objects: copying the training state to host memory, writing that copy as
the epoch's model file, loading a verified model file back, and the framework's view
of a multi-process job. `candle_ckpt.keras.adapter` and `candle_ckpt.pytorch.adapter`
are the two implementations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .logs import LibraryLogger
    from .restore.resume import Checkpoint
    from .run.writer import AllGather, WriterDecision
    from .save.protocol import ModelFile
    from .storage.checksum import RegionPlanner


@dataclass(frozen=True)
class Restored:
    """What an adapter's `restore` loaded, for the restart log and its warnings.

    Attributes:
        parts: what was restored, e.g. ("weights", "optimizer", "RNG").
        exact: whether that is everything an exact resume needs.
        missing: what an inexact restore lacks, for the warning ("optimizer state").
        source: a note on where it came from, e.g. "legacy upstream-CANDLE file".
        deferred: nothing was loaded yet: the checkpoint is verified and held until the
            framework's objects exist (a model built by its first batch); `source` then
            says when and by what it will be loaded, and that load logs itself
            (`core.restore.restart.log_restored`).
    """

    parts: tuple[str, ...]
    exact: bool
    missing: str = ""
    source: str = ""
    deferred: bool = False

    @classmethod
    def of(
        cls,
        parts: Iterable[str],
        *,
        rng_restored: bool,
        exact: bool,
        missing: str = "",
        source: str = "",
    ) -> Restored:
        """A `Restored` whose parts end with "RNG" when the random state was restored."""
        return cls(tuple(parts) + (("RNG",) if rng_restored else ()), exact, missing, source)


class FrameworkAdapter(Protocol):
    """A framework's part of checkpointing one model (and whatever trains with it)."""

    adapter_name: str
    """Recorded in ckpt-info.json as `adapter`, e.g. "keras"."""
    model_format: str
    """Recorded in ckpt-info.json as `model_format`: the model file's own format."""

    def library_versions(self) -> dict[str, str]:
        """The framework's library versions, recorded in every ckpt-info.json."""

    def writer_decision(self, explicit: bool | None) -> WriterDecision:
        """Whether this process writes the tree (`core.run.writer.writer_decision` rules)."""

    def all_gather(self) -> AllGather | None:
        """The collective the restart agreement runs on, or None for a single process."""

    def trains_in_lockstep(self) -> bool:
        """Whether processes run collectives every step (a stop at different batches
        would hang them): pre-emption by signal is then refused."""

    def state_exists(self) -> bool:
        """Whether every variable of the state exists yet: false for a model that
        creates its variables at its first call (an unbuilt Keras model, a PyTorch lazy
        module), which no snapshot can hold before then."""

    def state_nbytes(self) -> int:
        """The bytes a copied snapshot holds, computed without copying."""

    def snapshot(self, *, copy: bool, into: Any | None = None) -> Any:
        """The training state now, on the training thread: views where the framework
        keeps them unchanged until the save is written (`copy=False`, a synchronous
        save), copies otherwise, made into `into` (an older snapshot nobody reads any
        more) where possible. The result must not refer to live framework objects."""

    def write_model_file(self, snapshot: Any, directory: str, checksum: bool) -> str | ModelFile:
        """Write `snapshot` into `directory`; return the model file's name, or a
        `protocol.ModelFile` with the CRC32 computed while writing (`checksum`: whether
        `ckpt_checksum` asks for one at all). May run in another thread; need not fsync
        (the protocol does)."""

    def read_model_into(self) -> RegionPlanner | None:
        """Where a restart reads the model file's large arrays: the framework's own
        memory, straight from the file while it is verified (`checksum.read_file`'s
        `read_into`), or None to read them into new memory with the rest. `restore`
        then finds them loaded already, once the file has verified."""

    def restore(
        self, checkpoint: Checkpoint, logger: LibraryLogger, *, weights_only: bool = False
    ) -> Restored:
        """Load the verified `checkpoint` (its bytes: `checkpoint.model_contents`).
        Everything is checked before the first value changes. `weights_only` (a warm
        start, `ckpt_init_from`): the model's weights only, never the optimizer, the
        other registered objects or the random states. An adapter whose objects cannot
        take the state yet may hold it and return a `deferred` Restored."""
