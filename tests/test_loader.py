"""The data position (candle_ckpt/pytorch/loader.py): a registered StatefulDataLoader, or
a plain DataLoader's EpochPosition, resumes the very batches, in the very order, with
every random state as the uninterrupted run has it, at an epoch end or inside an epoch.

In process: a save and a restore into objects built differently (another seed), then
the rest of the epoch and two more against the original's. Real jobs
(tests/loader_job.py) killed with SIGKILL and rerun: the same weights, optimizer state,
epoch logs and batches, none trained twice."""

import logging
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchdata")

from torch.utils.data import DataLoader  # noqa: E402
from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402
from torchdata.stateful_dataloader.sampler import RandomSampler  # noqa: E402

import candle_ckpt  # noqa: E402
from candle_ckpt.core.errors import CheckpointFormatError, ParameterValueError  # noqa: E402
from candle_ckpt.pytorch import state  # noqa: E402
from candle_ckpt.pytorch.loader import EpochPosition  # noqa: E402

LOG = logging.getLogger("test")
HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
JOB = os.path.join(HERE, "loader_job.py")


class Indexed:
    """Samples (index, noise): `noise` draws from torch's random state (a worker's, with
    workers), so a restore that leaves it elsewhere shows; `fetched` counts the
    samples this process read."""

    def __init__(self, n=40, noise=True):
        self.n, self.noise, self.fetched = n, noise, 0

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        self.fetched += 1
        return k, torch.rand(()) if self.noise else torch.zeros(())


def stateful(workers=0, seed=7, generator=True, noise=True):
    if not generator:
        torch.manual_seed(seed)  # the sampler seeds its own generator from it
    return StatefulDataLoader(
        Indexed(noise=noise),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed) if generator else None,
        num_workers=workers,
    )


def plain(workers=0, seed=7, noise=True):
    loader = DataLoader(
        Indexed(noise=noise),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
    )
    return EpochPosition(loader)


def save(objects, tmp_path):
    path = str(tmp_path / "model.h5")
    state.write(state.snapshot(objects, copy=True), path)
    with open(path, "rb") as stream:
        return path, memoryview(stream.read())


def values(batches):
    """The batches as lists of (index, noise) numbers."""
    return [list(zip(k.tolist(), noise.tolist())) for k, noise in batches]


def generator_states(loader):
    own = getattr(loader.sampler, "generator", None)
    return [g.get_state() for g in (loader.generator, own) if g is not None]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("taken", [3, "end"])
@pytest.mark.parametrize("generator", [True, False])
def test_a_stateful_loader_resumes_exactly_inside_an_epoch_and_at_its_end(
    tmp_path, workers, taken, generator
):
    # Workers restart their random streams from the epoch's base seed: noise drawn in
    # them is exact from an epoch's start only.
    noise = workers == 0 or taken == "end"
    loader = stateful(workers, generator=generator, noise=noise)
    running = iter(loader)
    done = values(running) if taken == "end" else values(next(running) for _ in range(taken))
    path, contents = save({"loader": loader}, tmp_path)
    expected = values(running) + values(loader) + values(loader)
    expected_rng = torch.get_rng_state()
    expected_generators = generator_states(loader)

    fresh = stateful(workers, seed=99, generator=generator, noise=noise)
    state.restore({"loader": fresh}, path, contents, LOG)
    got = (values(fresh) if taken != "end" else []) + values(fresh) + values(fresh)
    assert got == expected
    assert len(done) + len(got) == 30  # three epochs of ten batches, none twice
    assert all(map(torch.equal, generator_states(fresh), expected_generators))
    assert torch.equal(torch.get_rng_state(), expected_rng)


def test_a_sampler_with_replacement_and_a_generator_of_its_own_resumes_exactly(tmp_path):
    def replacing(seed):
        data = Indexed(100)
        sampler = RandomSampler(data, True, generator=torch.Generator().manual_seed(seed))
        return StatefulDataLoader(
            data, batch_size=4, sampler=sampler, generator=torch.Generator().manual_seed(seed)
        )

    loader = replacing(1)
    running = iter(loader)
    for _ in range(10):  # past the sampler's first 32 draws
        next(running)
    path, contents = save({"loader": loader}, tmp_path)
    expected = values(running) + values(loader)
    fresh = replacing(2)
    state.restore({"loader": fresh}, path, contents, LOG)
    assert values(fresh) + values(fresh) == expected


def test_a_stateful_loader_resumed_inside_an_epoch_reads_only_the_rest(tmp_path):
    loader = stateful()
    running = iter(loader)
    for _ in range(7):
        next(running)
    path, contents = save({"loader": loader}, tmp_path)
    fresh = stateful(seed=99)
    state.restore({"loader": fresh}, path, contents, LOG)
    assert len(values(fresh)) == 3 and fresh.dataset.fetched == 12


def test_a_loader_saved_again_before_it_is_iterated_saves_what_it_was_restored_to(tmp_path):
    loader = stateful()
    running = iter(loader)
    next(running)
    path, contents = save({"loader": loader}, tmp_path)
    expected = values(running)
    fresh = stateful(seed=99)
    state.restore({"loader": fresh}, path, contents, LOG)
    again = tmp_path / "again"
    again.mkdir()
    path, contents = save({"loader": fresh}, again)
    other = stateful(seed=5)
    state.restore({"loader": other}, path, contents, LOG)
    assert values(other) == expected


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("taken", [3, "end"])
def test_an_epoch_position_resumes_a_plain_loader_exactly(tmp_path, workers, taken):
    noise = workers == 0 or taken == "end"
    position = plain(workers, noise=noise)
    running = position.batches(0)
    done = values(running) if taken == "end" else values(next(running) for _ in range(taken))
    path, contents = save({"data": position}, tmp_path)
    expected = values(running) + values(position.batches(0)) + values(position.batches(0))
    expected_rng = torch.get_rng_state()
    expected_generator = position.loader.generator.get_state()

    fresh = plain(workers, seed=99, noise=noise)
    state.restore({"data": fresh}, path, contents, LOG)
    first = len(done) if taken != "end" else 0
    got = [] if taken == "end" else values(fresh.batches(first))
    got += values(fresh.batches(0)) + values(fresh.batches(0))
    assert got == expected
    assert len(done) + len(got) == 30
    assert torch.equal(fresh.loader.generator.get_state(), expected_generator)
    assert torch.equal(torch.get_rng_state(), expected_rng)
    if workers == 0 and taken != "end":
        assert fresh.loader.dataset.fetched == 40 - 4 * taken + 2 * 40  # never the skipped


def test_an_epoch_position_refuses_a_start_other_than_the_checkpoints(tmp_path):
    position = plain()
    running = position.batches(0)
    next(running)
    next(running)
    path, contents = save({"data": position}, tmp_path)
    fresh = plain(seed=99)
    state.restore({"data": fresh}, path, contents, LOG)
    with pytest.raises(ParameterValueError, match="start at batch 0; the data position is after 2"):
        next(fresh.batches(0))
    with pytest.raises(ParameterValueError, match="start at batch 3;.* is after 0 batches"):
        next(plain().batches(3))


def test_an_epoch_position_entry_that_does_not_fit_is_refused_before_anything_changes():
    from candle_ckpt.pytorch.fits import check_state

    position = plain()
    state_now = position.state_dict()
    for broken, match in [
        ({**state_now, "batches": 3}, "epoch_start is a NoneType and batches 3"),
        ({**state_now, "generator": torch.zeros(3, dtype=torch.uint8)}, "'generator' is uint8"),
        ({"generator": state_now["generator"]}, "an EpochPosition's has keys"),
    ]:
        with pytest.raises(CheckpointFormatError, match=match):
            check_state("data", position, broken, "f.h5")
    assert torch.equal(position.loader.generator.get_state(), state_now["generator"])


def test_an_epoch_position_needs_a_generator_and_batches():
    data = Indexed()
    with pytest.raises(ParameterValueError, match="no generator"):
        EpochPosition(DataLoader(data, batch_size=4, shuffle=True))
    with pytest.raises(ParameterValueError, match="without batches"):
        EpochPosition(DataLoader(data, batch_size=None))
    with pytest.raises(ParameterValueError, match="persistent_workers=True"):
        EpochPosition(
            DataLoader(
                data,
                batch_size=4,
                generator=torch.Generator(),
                num_workers=1,
                persistent_workers=True,
            )
        )


def test_set_model_refuses_a_stateful_loader_it_cannot_resume_exactly(tmp_path):
    ckpt = candle_ckpt.CandleCkptPyTorch(
        {"epochs": 1, "ckpt_directory": str(tmp_path)}, logger=None, verbose=False
    )
    net = torch.nn.Linear(1, 1)
    persistent = StatefulDataLoader(Indexed(), batch_size=4, num_workers=1, persistent_workers=True)
    with pytest.raises(ParameterValueError, match="'loader' .*persistent_workers=True"):
        ckpt.set_model({"model": net, "loader": persistent})
    data = Indexed()
    unstateful = StatefulDataLoader(
        data, batch_size=4, sampler=torch.utils.data.RandomSampler(data)
    )
    with pytest.raises(ParameterValueError, match="torch.utils.data.RandomSampler"):
        ckpt.set_model({"model": net, "loader": unstateful})
    shared = torch.Generator()
    replacing = StatefulDataLoader(
        data, batch_size=4, sampler=RandomSampler(data, True, generator=shared), generator=shared
    )
    with pytest.raises(ParameterValueError, match="replacement from the loader's own generator"):
        ckpt.set_model({"model": net, "loader": replacing})
    own = RandomSampler(data, True, generator=torch.Generator())
    ckpt.set_model({"model": net, "loader": StatefulDataLoader(data, batch_size=4, sampler=own)})


class Remembers(Indexed):
    """A dataset torchdata saves the state_dict of (it is Stateful)."""

    def __init__(self, state):
        super().__init__()
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def test_a_loader_state_that_would_need_pickle_is_refused_naming_it(tmp_path):
    loader = StatefulDataLoader(Remembers({"seen": b"raw"}), batch_size=4)
    next(iter(loader))
    with pytest.raises(
        CheckpointFormatError,
        match=r"cannot save state\['loader'\].*\['dataset_state'\]\['seen'\]: a builtins.bytes",
    ):
        state.snapshot({"loader": loader})


def test_a_stateful_datasets_own_state_round_trips(tmp_path):
    loader = StatefulDataLoader(Remembers({"seen": [1, 2], "pos": (3, 4.5)}), batch_size=4)
    next(iter(loader))
    path, contents = save({"loader": loader}, tmp_path)
    fresh = StatefulDataLoader(Remembers({"seen": [], "pos": (0, 0.0)}), batch_size=4)
    state.restore({"loader": fresh}, path, contents, LOG)
    iter(fresh)
    assert fresh.dataset.state == {"seen": [1, 2], "pos": (3, 4.5)}


def test_a_loader_built_otherwise_is_refused_before_anything_changes(tmp_path):
    net = torch.nn.Linear(2, 1)
    loader = stateful(workers=0)
    next(iter(loader))
    path, contents = save({"model": net, "loader": loader}, tmp_path)
    other_net = torch.nn.Linear(2, 1)
    before = [t.clone() for t in other_net.state_dict().values()]
    for other, match in [
        (stateful(workers=2), "num_workers=0; the registered StatefulDataLoader has num_workers=2"),
        (StatefulDataLoader(Indexed(), batch_size=4), "'generator' holds a generator state"),
    ]:
        with pytest.raises(CheckpointFormatError, match=match):
            state.restore({"model": other_net, "loader": other}, path, contents, LOG)
        assert all(map(torch.equal, before, other_net.state_dict().values()))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_crafted_position_is_refused_before_the_epoch_resumes(workers):
    """A count torchdata would skip one by one, or a sampler generator state it would
    set when the epoch resumes, is checked at the restart."""
    from candle_ckpt.pytorch.fits import check_state
    from candle_ckpt.pytorch.loader import loader_state

    loader = stateful(workers)
    next(iter(loader))
    entry = loader_state(loader)
    position = entry["iterator"]
    where = position["_snapshot"]["_main_snapshot"] if workers else position
    check_state("loader", stateful(workers), entry, "f.h5")
    where["_sampler_iter_state"]["sampler_iter_state"]["yielded"] = 10**12
    with pytest.raises(CheckpointFormatError, match=r"\['yielded'\] is 1000000000000; .* 0 to 40"):
        check_state("loader", stateful(workers), entry, "f.h5")
    where["_sampler_iter_state"]["sampler_iter_state"]["yielded"] = 4
    where["_sampler_iter_state"]["sampler_iter_state"]["generator"] = torch.zeros(
        5056, dtype=torch.uint8
    )
    with pytest.raises(CheckpointFormatError, match=r"\['generator'\] is not a state"):
        check_state("loader", stateful(workers), entry, "f.h5")


def test_a_registered_loader_leaves_the_restart_reading_into_the_modules(tmp_path):
    net = torch.nn.Linear(512, 512)
    loader = stateful()
    next(iter(loader))
    path, _ = save({"model": net, "loader": loader}, tmp_path)
    with open(path, "rb") as stream:
        plan = state.plan_in_place(
            {"model": torch.nn.Linear(512, 512), "loader": stateful()}, path, stream
        )
    assert [target.key for target in plan.targets.values()] == ["weight"]


# -- real jobs, killed -----------------------------------------------------------------


def job(directory, *flags, expect=0):
    env = dict(os.environ, PYTHONPATH=TOP, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, JOB, "--ckpt_directory", str(directory), *map(str, flags)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def outcome(stdout):
    """The epoch logs and the final digest a job printed."""
    return [line for line in stdout.splitlines() if line.startswith(("epoch ", "final digest"))]


def trained(trace):
    with open(trace) as stream:
        return stream.read().splitlines()


JOBS = {
    "stateful": ("--loader", "stateful", "--augment"),
    "stateful-2-workers": ("--loader", "stateful", "--num_workers", "2"),
    "plain": ("--loader", "plain", "--augment"),
    "plain-2-workers": ("--loader", "plain", "--num_workers", "2"),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """{config: (what the job printed, the batches it trained)}, each run once."""
    runs = {}

    def run(config):
        if config not in runs:
            directory = tmp_path_factory.mktemp(config)
            stdout = job(directory / "save", *JOBS[config], "--trace", directory / "trace")
            runs[config] = outcome(stdout), trained(directory / "trace")
        return runs[config]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("config", ["stateful", "stateful-2-workers", "plain"])
def test_a_job_killed_after_an_epoch_resumes_bit_identically(tmp_path, config, uninterrupted):
    flags = (*JOBS[config], "--trace", tmp_path / "trace")
    first = job(tmp_path, *flags, "--kill_after_epoch", "2", expect=-9)
    rest = job(tmp_path, *flags)
    assert "resumed at 3:0" in rest
    assert (outcome(first) + outcome(rest), trained(tmp_path / "trace")) == uninterrupted(config)


@pytest.mark.slow
@pytest.mark.parametrize("config", list(JOBS))
def test_a_job_killed_inside_an_epoch_resumes_at_its_batch_bit_identically(
    tmp_path, config, uninterrupted
):
    # Saving after every batch, the job is killed once a save has returned: the rerun
    # starts at the very next batch, so the traces add up to the uninterrupted run's,
    # with no batch twice.
    flags = (*JOBS[config], "--trace", tmp_path / "trace", "--ckpt_save_steps", "1")
    first = job(tmp_path, *flags, "--kill_at", "2:5", expect=-9)
    rest = job(tmp_path, *flags)
    assert "resumed at 2:5" in rest
    assert (outcome(first) + outcome(rest), trained(tmp_path / "trace")) == uninterrupted(config)


def resumed_at(stdout):
    """(1-based epoch, batches of it done) of the job's "resumed at E:B" line."""
    line = next(line for line in stdout.splitlines() if line.startswith("resumed at "))
    epoch, batches = line.removeprefix("resumed at ").split(":")
    return int(epoch), int(batches)


@pytest.mark.slow
def test_a_job_killed_during_background_step_saves_resumes_bit_identically(tmp_path, uninterrupted):
    # With ckpt_async the kill may come before the running save is in place: the rerun
    # resumes at the newest one that is, and trains again only the batches after it.
    flags = (*JOBS["stateful-2-workers"], "--ckpt_save_steps", "2", "--ckpt_async", "true")
    first = job(tmp_path, *flags, "--trace", tmp_path / "first", "--kill_at", "2:8", expect=-9)
    rest = job(tmp_path, *flags, "--trace", tmp_path / "rest")
    epoch, done = resumed_at(rest)
    assert (2, 4) <= (epoch, done) <= (2, 8)
    before = [
        line
        for line in trained(tmp_path / "first")
        if tuple(map(int, line.split()[:2])) < (epoch, done)
    ]
    logs = [line for line in outcome(first) if int(line.split()[1][:-1]) < epoch]
    assert (logs + outcome(rest), before + trained(tmp_path / "rest")) == uninterrupted(
        "stateful-2-workers"
    )


@pytest.mark.slow
def test_a_job_killed_after_an_epochs_last_batch_resumes_with_none_of_it(tmp_path, uninterrupted):
    # The step save of the last batch (13 of 13) comes before the epoch's end (which the
    # policy does not save here: a step save is made at the last batch only then): the
    # rerun trains no batch of that epoch, ends it and goes on.
    flags = (*JOBS["stateful"], "--trace", tmp_path / "trace", "--ckpt_save_steps", "1")
    flags += ("--ckpt_save_interval", "2", "--ckpt_save_best", "false")
    first = job(tmp_path, *flags, "--kill_at", "3:13", expect=-9)
    rest = job(tmp_path, *flags)
    assert "resumed at 3:13" in rest
    assert (outcome(first) + outcome(rest), trained(tmp_path / "trace")) == uninterrupted(
        "stateful"
    )


@pytest.mark.slow
def test_a_signalled_job_saves_its_batch_and_resumes_there(tmp_path, uninterrupted):
    # ckpt_save_steps on (far apart: the signal's save is the only one inside an epoch)
    # makes the signal save the batch that just ended rather than keep the last epoch.
    flags = (*JOBS["stateful"], "--trace", tmp_path / "trace", "--ckpt_signal", "USR1")
    flags += ("--ckpt_save_steps", "1000")
    first = job(tmp_path, *flags, "--signal_at", "2:7", expect=75)
    rest = job(tmp_path, *flags)
    assert "resumed at 2:7" in rest
    assert (outcome(first) + outcome(rest), trained(tmp_path / "trace")) == uninterrupted(
        "stateful"
    )


class Bare:
    """A loader as candle_ckpt stored it before loader.py: its state_dict alone."""

    def __init__(self, loader):
        self.loader = loader

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def test_an_earlier_releases_loader_entry_loads_as_it_did(tmp_path):
    loader = stateful()
    next(iter(loader))
    path, contents = save({"loader": Bare(loader)}, tmp_path)
    fresh = stateful(seed=99)
    state.restore({"loader": fresh}, path, contents, LOG)
    assert len(values(fresh)) == 9


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["stateful", "plain"])
def test_two_ranks_killed_inside_an_epoch_resume_each_its_shard_bit_identically(tmp_path, loader):
    """DistributedDataParallel over gloo, each rank its shard of every epoch: both killed
    after a step save, rerun together, each rank goes on with the batches of its own
    shard from there (rank 0's entry restores both: a position is a count)."""
    from test_pytorch_distributed import digests, two_ranks

    flags = ("--loader", loader, "--ckpt_save_steps", "1", "--epochs", "3")

    def ranks(name, *more):
        return two_ranks([tmp_path / name] * 2, *flags, "--trace", tmp_path / name, *more, job=JOB)

    whole = ranks("whole")
    killed = ranks("run", "--kill_at", "2:3")
    assert [code for code, _, _ in killed] == [-9, -9], killed[0][2][-2000:]
    rest = ranks("run")
    assert digests(rest) == digests(whole)
    assert all("resumed at 2:3" in out for _, out, _ in rest)
    for rank in (0, 1):
        assert trained(f"{tmp_path / 'run'}.{rank}") == trained(f"{tmp_path / 'whole'}.{rank}")
    assert outcome(killed[0][1]) + outcome(rest[0][1]) == outcome(whole[0][1])
