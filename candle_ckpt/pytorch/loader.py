"""The data position of a PyTorch run: where the next batch comes from, and every random
state the loader draws from, so that a resumed run reads the very batches an
uninterrupted one reads, at an epoch end or inside an epoch.

Two ways, both registered with `set_model`:

- A `torchdata.stateful_dataloader.StatefulDataLoader` (``{"loader": loader}``). Its own
  `state_dict` restores the rest of the running epoch, but not the random state its
  generator has after that (loading draws the epoch's permutation again, without the
  workers' base seed drawn after it the first time: the next epochs are shuffled
  differently), nor the next epoch at an epoch end (loading a finished epoch's state
  draws that epoch's permutation again before the next one). So a save holds the
  loader's `state_dict` only inside an epoch, and the states of the generators it
  draws from always (`loader_state`); a restore loads the position and sets those
  generators, and the process's torch random state, back to the saved ones once the
  iterator that resumes the epoch has been made (`restore_loader`).
- A plain `torch.utils.data.DataLoader` whose shuffling draws from its `generator`:
  `EpochPosition`, which records that generator's state at each epoch's start, makes
  the resumed epoch's permutation again and skips the batches already trained without
  loading them (the batch sampler's index lists are skipped, never the data).

The loader state is stored as JSON and tensors (`state._encode`): nothing is pickled.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ..core.errors import ParameterValueError

# The keys of a StatefulDataLoader's entry in the model file.
ITERATOR = "iterator"  # its state_dict inside an epoch; None: the next epoch starts anew
GENERATOR = "generator"  # its `generator`'s state, or None without one
SAMPLER_GENERATOR = "sampler_generator"  # its sampler's own generator's, else None
KEYS = frozenset({ITERATOR, GENERATOR, SAMPLER_GENERATOR})
# A key of every StatefulDataLoader state_dict: an entry holding it is the state_dict
# alone, as candle_ckpt before this module stored it.
TORCHDATA_KEY = "_iterator_finished"

# The one-shot hook a restored StatefulDataLoader makes its next iterator with.
_RESUME = "_candle_ckpt_resume"


def is_stateful_loader(value: Any) -> bool:
    """Whether `value` is a torchdata StatefulDataLoader (never imports torchdata)."""
    module = sys.modules.get("torchdata.stateful_dataloader")
    return module is not None and isinstance(value, module.StatefulDataLoader)


def is_data_position(value: Any) -> bool:
    """Whether `value` is one of the two kinds of data position this module restores:
    its entry holds generator states (which the restart's checks read)."""
    return is_stateful_loader(value) or isinstance(value, EpochPosition)


def check_registered(name: str, value: Any) -> None:
    """Refuse, at `set_model`, a StatefulDataLoader whose position cannot be restored
    exactly.

    Raises:
        ParameterValueError: persistent workers (their random streams run on from one
            epoch to the next, and a new process cannot restore them); a sampler drawing
            with replacement from the loader's generator; or a
            `torch.utils.data.RandomSampler` (not stateful: torchdata would replay the
            epoch's indices from the generator's current state, another permutation).
    """
    if not is_stateful_loader(value):
        return
    if value.persistent_workers and value.num_workers > 0:
        raise ParameterValueError(
            f"set_model: entry {name!r} is a StatefulDataLoader with persistent_workers=True "
            f"and num_workers={value.num_workers}; its workers' random states carry over "
            f"from epoch to epoch and cannot be restored in a new process. Build it with "
            f"persistent_workers=False"
        )
    sampler = value.sampler
    shared = value.generator is not None and getattr(sampler, "generator", None) is value.generator
    if getattr(sampler, "replacement", False) and shared:
        raise ParameterValueError(
            f"set_model: entry {name!r} is a StatefulDataLoader whose sampler draws with "
            f"replacement from the loader's own generator, which also draws the workers' "
            f"seed between the sampler's draws: torchdata resumes such an epoch with "
            f"other samples. Give the sampler a generator of its own"
        )
    if isinstance(sampler, torch.utils.data.RandomSampler):
        raise ParameterValueError(
            f"set_model: entry {name!r} is a StatefulDataLoader with a "
            f"torch.utils.data.RandomSampler, which keeps no position: a resumed epoch "
            f"would be shuffled differently. Pass shuffle=True and generator=... (or "
            f"torchdata.stateful_dataloader.sampler.RandomSampler) instead"
        )


def generators(loader: Any) -> tuple[torch.Generator | None, torch.Generator | None]:
    """The loader's generator and its sampler's own one (None where there is none, or
    where the sampler draws from the loader's)."""
    own = getattr(loader.sampler, "generator", None)
    if not isinstance(own, torch.Generator) or own is loader.generator:
        own = None
    return loader.generator, own


def loader_state(loader: Any) -> dict:
    """A StatefulDataLoader's entry: `ITERATOR`, its `state_dict()` inside an epoch
    (None once the epoch ended, or before the first: the next `iter` starts a new
    one); `GENERATOR` and `SAMPLER_GENERATOR`, the states of what it draws from.

    Never makes an iterator (the loader's own `state_dict` would, drawing from the
    generators): a loader restored but not iterated yet gives the state it was
    restored to.
    """
    pending = getattr(loader, _RESUME, None)
    if pending is not None:
        return pending.saved
    iterator = loader._iterator
    running = iterator is not None and not iterator._finished
    loader_generator, sampler_generator = generators(loader)
    return {
        ITERATOR: loader.state_dict() if running else None,
        GENERATOR: None if loader_generator is None else loader_generator.get_state(),
        SAMPLER_GENERATOR: None if sampler_generator is None else sampler_generator.get_state(),
    }


def restore_loader(loader: Any, saved: dict) -> None:
    """Load an entry of `loader_state`, checked by `fits.check_loader_state` (or the
    loader's bare state_dict an earlier release saved, as that release loaded it).

    An epoch end: the loader is reset and its generators set, so its next `iter`
    draws the next epoch as the uninterrupted run did. Inside an epoch: the position is
    loaded, and the next iterator, once made, sets the generators and torch's random
    state back to the saved ones (`_Resume`).
    """
    setattr(loader, _RESUME, None)
    loader.__dict__.pop("_get_iterator", None)  # an earlier restore's `_Resume`
    if TORCHDATA_KEY in saved:  # an earlier release's entry: loaded as it loaded it
        loader.load_state_dict(saved)
    elif saved[ITERATOR] is None:
        loader.load_state_dict({})
        _set_generators(loader, saved)
    else:
        loader.load_state_dict(saved[ITERATOR])
        setattr(loader, _RESUME, _Resume(loader, saved))


def _set_generators(loader: Any, saved: dict) -> None:
    for generator, state in zip(generators(loader), (saved[GENERATOR], saved[SAMPLER_GENERATOR])):
        if generator is not None:
            generator.set_state(state)


class _Resume:
    """The next iterator of a loader restored inside an epoch: made by torchdata from
    the loaded position (which draws from the generators, and from torch's random
    state without a loader generator), then every random state set back to where the
    uninterrupted run had it at the save."""

    def __init__(self, loader: Any, saved: dict) -> None:
        self.loader = loader
        self.saved = saved
        loader._get_iterator = self

    def __call__(self) -> Any:
        loader = self.loader
        del loader._get_iterator  # the class's own, from now on
        setattr(loader, _RESUME, None)
        torch_state = torch.get_rng_state()
        iterator = loader._get_iterator()
        _set_generators(loader, self.saved)
        torch.set_rng_state(torch_state)
        return iterator


# -- a plain DataLoader ----------------------------------------------------------------


class EpochPosition:
    """Resume a plain `DataLoader` inside an epoch without loading the batches skipped.

    A shuffled DataLoader draws each epoch's permutation from its `generator` when the
    epoch's iteration starts (after the workers' base seed), so the permutation of the
    epoch a checkpoint was taken in is made again from the generator's state at that
    epoch's start, which this object records and a checkpoint holds. Register it with
    `set_model` instead of the loader's generator, and iterate every epoch through
    `batches`::

        loader = DataLoader(data, batch_size=64, shuffle=True, generator=gen)
        position = candle_ckpt.pytorch.loader.EpochPosition(loader)
        ckpt.set_model({"model": net, "optimizer": opt, "data": position})
        J = ckpt.restart(net)
        for epoch in range(J["epoch"] if J else 0, params["epochs"]):
            first = J["batch"] if J and epoch == J["epoch"] else 0
            for batch, (x, y) in enumerate(position.batches(first), start=first):
                ...train one step...
                ckpt.batch_end(batch)
            ckpt.ckpt_epoch(epoch, logs)

    `batches(first)` with `first` > 0 sets the generator back to the epoch's start and
    iterates a DataLoader like `loader` whose batch sampler skips the first `first`
    index lists of `loader`'s: the same base seed and permutation, the generator left
    where the uninterrupted run had it, and no skipped sample read. Every other random
    state is the checkpoint's. The generator must serve this loader only (anything
    else drawing from it during an epoch moves it between the epoch's start and the
    save); a sampler without a generator (sequential, `DistributedSampler` after
    `set_epoch`) is deterministic and skipped the same way.

    Args:
        loader: a `torch.utils.data.DataLoader` over a map-style dataset, with a
            `generator` if it shuffles, and no persistent workers.
    """

    def __init__(self, loader: DataLoader) -> None:
        if not isinstance(loader, DataLoader) or loader.batch_sampler is None:
            raise ParameterValueError(
                f"EpochPosition: received {type(loader).__name__}"
                f"{' without batches (batch_size=None)' if isinstance(loader, DataLoader) else ''}"
                f"; expected a torch.utils.data.DataLoader that makes batches"
            )
        if loader.generator is None:
            raise ParameterValueError(
                "EpochPosition: the DataLoader has no generator, so its shuffling and its "
                "workers' seeds draw from torch's global random state, which training "
                "moves too; pass generator=torch.Generator().manual_seed(seed)"
            )
        if loader.persistent_workers and loader.num_workers > 0:
            raise ParameterValueError(
                "EpochPosition: the DataLoader has persistent_workers=True; its workers' "
                "random states carry over from epoch to epoch and cannot be restored"
            )
        self.loader = loader
        self._epoch_start: torch.Tensor | None = None  # the generator's, at this epoch's
        self._done: int | None = None  # batches of this epoch yielded; None between epochs
        self._restored_at: int | None = None  # the first batch `batches` must start at

    def state_dict(self) -> dict:
        """{"generator": its state now, "epoch_start": its state when the running
        epoch began (None between epochs), "batches": batches of it yielded (None)}."""
        generator = self.loader.generator
        assert generator is not None  # checked in __init__
        return {
            "generator": generator.get_state(),
            "epoch_start": self._epoch_start,
            "batches": self._done,
        }

    def load_state_dict(self, state: dict) -> None:
        generator = self.loader.generator
        assert generator is not None
        generator.set_state(state["generator"])
        self._epoch_start, self._done = state["epoch_start"], state["batches"]
        self._restored_at = state["batches"] or 0

    def batches(self, first: int = 0) -> Iterator[Any]:
        """This epoch's batches from the 0-based batch `first` on (`J["batch"]` in the
        epoch a checkpoint was taken in, else 0).

        Raises:
            ParameterValueError: `first` is not the number of batches the checkpoint
                restored had trained in its epoch (0 after the first epoch).
        """
        generator = self.loader.generator
        assert generator is not None
        expected, self._restored_at = self._restored_at or 0, None
        if first != expected:
            raise ParameterValueError(
                f"EpochPosition.batches: asked to start at batch {first}; the data "
                f"position is after {expected} batches of the epoch. Pass J['batch'] in "
                f"the first epoch after restart, 0 in the others"
            )
        if first:
            assert self._epoch_start is not None  # fits.check_state: batches with a start
            generator.set_state(self._epoch_start)
            loader = _skipping(self.loader, first)
        else:
            self._epoch_start = generator.get_state()
            loader = self.loader
        self._done = first
        for batch in loader:
            self._done += 1
            yield batch
        self._epoch_start = self._done = None


class _Skip(Sampler[list[int]]):
    """`batch_sampler`'s index lists but the first `first`: made, never loaded."""

    def __init__(self, batch_sampler: Any, first: int) -> None:
        self.batch_sampler, self.first = batch_sampler, first

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batch_sampler), self.first, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.first)


def _skipping(loader: DataLoader, first: int) -> DataLoader:
    """A DataLoader like `loader` but for its batch sampler, which skips `first`."""
    return DataLoader(
        loader.dataset,
        batch_sampler=_Skip(loader.batch_sampler, first),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        in_order=loader.in_order,
    )
