"""`TorchAdapter`: the core's `FrameworkAdapter` for objects registered with set_model."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import h5py
import numpy
import torch
import torch.distributed as dist

from ..core.adapter import Restored
from ..core.logs import LibraryLogger
from ..core.restore.resume import Checkpoint
from ..core.run.writer import RANK_VARIABLES, AllGather, WriterDecision, writer_decision
from ..core.save.protocol import ModelFile
from ..core.storage.checksum import RegionPlanner, Regions
from ..core.storage.durable import WritebackStarter
from . import state


def _group_size() -> int:
    """The torch.distributed world size, 1 without an initialised process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class TorchAdapter:
    """Checkpoints named objects: `state_dict`/`load_state_dict` ones and generators.

    Args:
        objects: {name: module, optimizer, LR scheduler, GradScaler, torch.Generator...}.
        weights_only: snapshots hold the modules only (`ckpt_save_weights_only`).
    """

    adapter_name = "pytorch"
    model_format = f"torch-h5/{state.FORMAT_VERSION}"

    def __init__(self, objects: Mapping[str, Any], weights_only: bool = False) -> None:
        self.objects = dict(objects)
        self.weights_only = weights_only
        self._in_place: state.InPlaceRead | None = None  # the model file read last
        # The modules any file of this restart was read into, verified or not: each
        # must be loaded again by the checkpoint that is finally restored.
        self._overwritten: set[str] = set()

    def library_versions(self) -> dict[str, str]:
        return {
            "torch": torch.__version__,
            "h5py": h5py.__version__,
            "numpy": numpy.__version__,
            "platform": platform.platform(),
        }

    def writer_decision(self, explicit: bool | None) -> WriterDecision:
        framework = None
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
            framework = WriterDecision(
                rank == 0, f"torch.distributed rank {rank} of {_group_size()}"
            )
        return writer_decision(explicit, framework, os.environ, ("RANK", *RANK_VARIABLES))

    def all_gather(self) -> AllGather | None:
        if _group_size() == 1:
            return None
        # NCCL gathers CUDA tensors only; gloo and MPI take CPU ones.
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )

        def gather(mine: Sequence[int]) -> list[tuple[int, ...]]:
            tensor = torch.tensor(list(mine), dtype=torch.int64, device=device)
            everyone = [torch.empty_like(tensor) for _ in range(_group_size())]
            dist.all_gather(everyone, tensor)
            return [tuple(int(v) for v in t.tolist()) for t in everyone]

        return gather

    def trains_in_lockstep(self) -> bool:
        return _group_size() > 1

    def state_exists(self) -> bool:
        return not state.uninitialized(self.objects)

    def state_nbytes(self) -> int:
        return state.state_nbytes(self.objects, self.weights_only)

    def snapshot(self, *, copy: bool, into: Any | None = None) -> state.TrainingState:
        return state.snapshot(self.objects, self.weights_only, copy=copy, into=into)

    def write_model_file(
        self, snapshot: state.TrainingState, directory: str, checksum: bool
    ) -> ModelFile:
        path = os.path.join(directory, state.MODEL_FILE)
        written = state.write(snapshot, path, WritebackStarter(path), checksum=checksum)
        return ModelFile(state.MODEL_FILE, written.crc32)

    def read_model_into(self) -> RegionPlanner | None:
        """The large tensors of a model file of `state.IN_PLACE_MIN_BYTES` or more go
        straight into the registered modules' own (`state.plan_in_place`); without an
        initialised module there are none."""
        modules = [value for value in self.objects.values() if isinstance(value, torch.nn.Module)]
        if not modules or state.uninitialized(self.objects):
            return None
        return RegionPlanner(
            self._plan, rest_in_new_memory=True, min_file_bytes=state.IN_PLACE_MIN_BYTES
        )

    def _plan(self, path: str, stream: BinaryIO) -> Regions:
        self._in_place = state.plan_in_place(self.objects, path, stream)
        self._overwritten |= {target.name for target in self._in_place.targets.values()}
        return self._in_place.regions

    def restore(
        self, checkpoint: Checkpoint, logger: LibraryLogger, *, weights_only: bool = False
    ) -> Restored:
        """Load the verified `checkpoint` (`state.restore`), but for what was read into
        the modules already (`read_model_into`); only the modules' (`state.restore_modules`)
        with `weights_only`."""
        in_place, self._in_place = self._in_place, None
        if in_place is not None and in_place.path != checkpoint.model_path:
            in_place = None
        overwritten, self._overwritten = self._overwritten, set()
        if weights_only:
            return state.restore_modules(
                self.objects, checkpoint.model_path, checkpoint.model_contents
            )
        return state.restore(
            self.objects,
            checkpoint.model_path,
            checkpoint.model_contents,
            logger,
            in_place,
            overwritten,
        )
