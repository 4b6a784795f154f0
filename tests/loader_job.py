"""A PyTorch training job whose data position is a registered loader (tests/test_loader.py).

    python tests/loader_job.py --ckpt_directory DIR --epochs 4 --loader stateful
        [--num_workers 2] [--augment] [--trace FILE] [--kill_at E:B] [--signal_at E:B]
        [--kill_after_epoch E] [--ckpt_* ...]

`--loader stateful`: a torchdata StatefulDataLoader (shuffle=True, a seeded generator)
registered as "loader"; `--loader plain`: a DataLoader registered through
`candle_ckpt.pytorch.loader.EpochPosition` as "data". Nothing else about the data is
registered: the loader entry alone must resume it. `--augment` adds noise drawn from
torch's random state to each sample (in the workers with `--num_workers`).

Under WORLD_SIZE > 1 (MASTER_ADDR, MASTER_PORT, RANK set) it trains with
DistributedDataParallel over gloo, each rank its shard (torchdata's
StatefulDistributedSampler, or torch's DistributedSampler for `plain`), its trace in
FILE.RANK.

`--kill_at E:B` sends SIGKILL to the job after batch B (1-based) of epoch E (1-based)
has ended (`batch_end` has run, and saved if it was to); `--signal_at E:B` sends it
SIGUSR1 before that batch's `batch_end`; `--kill_after_epoch E` kills it once epoch E's
`ckpt_epoch` has returned. `--trace FILE` appends a line "E B i,j,..." per trained batch
(1-based epoch, 0-based batch, its samples). Each epoch prints "epoch E: loss L
val_loss V" (L: the epoch's mean training loss, a registered object's); the end prints
"final digest H" (the weights and the optimizer's state), a restart "resumed at E:B"
(1-based epoch, batches of it already trained).
"""

import hashlib
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from keras_job import kill_myself, take_point, take_value  # noqa: E402
from torch_job import leave_process_group  # noqa: E402

N_SAMPLES, N_FEATURES, BATCH = 200, 8, 16


class Samples:
    """A map-style dataset of (index, x, y); `augment` adds torch-random noise to x."""

    def __init__(self, x, y, augment):
        self.x, self.y, self.augment = x, y, augment

    def __len__(self):
        return len(self.x)

    def __getitem__(self, k):
        import torch

        x = self.x[k] + 0.01 * torch.randn(self.x.shape[1]) if self.augment else self.x[k]
        return k, x, self.y[k]


class Mean:
    """The epoch's mean training loss so far, registered so that a run resumed inside
    the epoch logs the mean of all its batches."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, value):
        self.total, self.count = self.total + value, self.count + 1

    def result(self):
        result = self.total / self.count
        self.total, self.count = 0.0, 0
        return result

    def state_dict(self):
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state):
        self.total, self.count = state["total"], state["count"]


def digest(net, optimizer):
    """SHA-256 of the weights and the optimizer's state, tensors by their bytes."""
    import torch

    h = hashlib.sha256()

    def add(value):
        if isinstance(value, torch.Tensor):
            h.update(value.detach().contiguous().view(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key in value:
                h.update(repr(key).encode())
                add(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)
        else:
            h.update(repr(value).encode())

    add(net.state_dict())
    add(optimizer.state_dict())
    return h.hexdigest()


def main(argv):
    import argparse

    argv, kill_at = take_point(argv, "--kill_at")
    argv, signal_at = take_point(argv, "--signal_at")
    argv, kill_after_epoch = take_value(argv, "--kill_after_epoch")
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--loader", choices=("stateful", "plain"), required=True)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--trace")
    import candle_ckpt

    candle_ckpt.ckpt_parser(parser)
    params = vars(parser.parse_args(argv))

    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(2026)
    torch.use_deterministic_algorithms(True)
    x = torch.randn(N_SAMPLES + 40, N_FEATURES)
    y = torch.sin(x).sum(dim=1, keepdim=True)
    data = Samples(x[:N_SAMPLES], y[:N_SAMPLES], params["augment"])
    generator = torch.Generator().manual_seed(7)
    common = dict(batch_size=BATCH, shuffle=True, generator=generator)
    common["num_workers"] = params["num_workers"]
    sampler = None
    if dist.is_initialized():  # each rank its shard, shuffled by seed and epoch
        from torch.utils.data.distributed import DistributedSampler
        from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

        kind = StatefulDistributedSampler if params["loader"] == "stateful" else DistributedSampler
        sampler = kind(data, seed=7)
        common.update(shuffle=False, sampler=sampler)
        if params["trace"]:
            params["trace"] += f".{dist.get_rank()}"
    if params["loader"] == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        loader = StatefulDataLoader(data, **common)
        position = loader
        registered = {"loader": loader}
    else:
        from candle_ckpt.pytorch.loader import EpochPosition

        loader = DataLoader(data, **common)
        position = EpochPosition(loader)
        registered = {"data": position}
    net = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 32),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 1),
    )
    model = torch.nn.parallel.DistributedDataParallel(net) if dist.is_initialized() else net
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.5)

    ckpt = candle_ckpt.CandleCkptPyTorch(params)
    train_loss = Mean()
    objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, **registered}
    ckpt.set_model({**objects, "train_loss": train_loss})
    J = ckpt.restart(net)
    start = J["epoch"] if J else 0
    resumed_at = J.get("batch", 0) if J else 0
    if J:
        print(f"resumed at {start + 1}:{resumed_at}", flush=True)
    trace = open(params["trace"], "a") if params["trace"] else None
    for epoch in range(start, params["epochs"]):
        first = resumed_at if epoch == start else 0
        if sampler is not None:
            sampler.set_epoch(epoch)
        batches = loader if position is loader else position.batches(first)
        model.train()
        for batch, (index, xb, yb) in enumerate(batches, start=first):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            optimizer.step()
            train_loss.add(loss.item())
            if trace is not None:
                print(epoch + 1, batch, ",".join(map(str, index.tolist())), file=trace, flush=True)
            if signal_at == (epoch + 1, batch + 1):
                os.kill(os.getpid(), signal.SIGUSR1)
            ckpt.batch_end(batch)
            if kill_at == (epoch + 1, batch + 1):
                kill_myself()
        scheduler.step()
        net.eval()
        with torch.no_grad():
            val_loss = torch.nn.functional.mse_loss(net(x[N_SAMPLES:]), y[N_SAMPLES:]).item()
        mean = train_loss.result()
        print(f"epoch {epoch + 1}: loss {mean!r} val_loss {val_loss!r}", flush=True)
        ckpt.ckpt_epoch(epoch, {"val_loss": val_loss})
        if kill_after_epoch == epoch + 1:
            kill_myself()
    ckpt.finish()
    print(f"final digest {digest(net, optimizer)}", flush=True)
    leave_process_group(failed=False)


if __name__ == "__main__":
    main(sys.argv[1:])
