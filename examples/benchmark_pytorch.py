"""A CANDLE-style PyTorch benchmark with checkpoint/restart that resumes bit-identically.

Trains a multilayer perceptron with Dropout, AdamW and a StepLR schedule on a
regression problem the script generates (no downloads), from a shuffled DataLoader
whose generator is checkpointed. Parameters come from `default_model_pytorch.txt`
(CANDLE's INI format), overridden by command-line flags, including every `--ckpt_*`.

Kill it (Ctrl-C, `kill -9`, a time limit) and run it again: it resumes from
`save_pytorch/ckpts/last` and ends with the very weights an uninterrupted run ends with
(the printed digest). Under `torchrun --nproc_per_node 2` it trains with
DistributedDataParallel (gloo) and rank 0 writes the checkpoints.

    python examples/benchmark_pytorch.py                 # 8 epochs into ./save_pytorch
    python examples/benchmark_pytorch.py --epochs 12     # 4 more epochs

Ctrl-C saves and stops: `default_model_pytorch.txt` sets `ckpt_signal = 'INT'`, so
the first Ctrl-C stops training at the end of the running batch, makes sure the last
completed epoch is on disk and exits with status 75. Under torchrun that default is
dropped: ckpt_signal is refused while ranks train in lock-step.

Exit status: 0 done; 75 stopped by ckpt_signal (rerun it to continue); and, after one
line on stderr naming the problem and its remedy, 2 a bad parameter, 3 the checkpoint
to restart from is unusable, 4 another job writes the checkpoint tree, 5 a save failed
(`candle_ckpt.core.errors.exit_status`).
"""

import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # candle_params.py sits beside this script
import candle_params  # noqa: E402

DEFAULT_CONFIG = os.path.join(HERE, "default_model_pytorch.txt")


def add_arguments(parser):
    """The flags of this benchmark only."""
    parser.add_argument("--weight_decay", type=float, help="AdamW's (default: %(default)s)")
    parser.add_argument(
        "--lr_step", type=int, help="StepLR: halve the rate every N epochs (default: %(default)s)"
    )


def initialize_parameters(argv=None):
    """gParameters: defaults < parameter file (--config_file) < command line."""
    # the file's Ctrl-C default is for one process; ranks in lock-step refuse it
    lock_step = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return candle_params.initialize_parameters(
        __doc__.splitlines()[0],
        DEFAULT_CONFIG,
        add_arguments,
        argv,
        optimizer="AdamW",
        seeded="the data, the weights, Dropout and the shuffling",
        not_from_config=("ckpt_signal",) if lock_step else (),
    )


def make_data(params):
    """`candle_params.regression_data` as torch tensors."""
    import torch

    (x, y), (xv, yv) = candle_params.regression_data(params)
    return (
        (torch.from_numpy(x), torch.from_numpy(y)),
        (torch.from_numpy(xv), torch.from_numpy(yv)),
    )


def build_model(params):
    import torch

    layers, width = [], params["n_features"]
    for hidden in params["dense"]:
        layers += [
            torch.nn.Linear(width, hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(params["dropout"]),
        ]
        width = hidden
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def digest(model):
    """SHA-256 of every parameter's bytes: equal digests, bit-identical weights."""
    import torch

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def run(params, at_batch=None):
    """Restart if there is a checkpoint, train to params["epochs"]; return the model.

    `at_batch(epoch, batch)`, if given, is called after each (1-based) batch of each
    1-based epoch (the tests kill or pause the process there).
    """
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    import candle_ckpt

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    distributed = dist.is_initialized()
    torch.manual_seed(params["seed"])  # the same on every rank
    torch.use_deterministic_algorithms(True)
    (x, y), (xv, yv) = make_data(params)
    net = build_model(params)
    model = torch.nn.parallel.DistributedDataParallel(net) if distributed else net
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=params["learning_rate"], weight_decay=params["weight_decay"]
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, params["lr_step"], gamma=0.5)
    generator = torch.Generator().manual_seed(params["seed"])
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, seed=params["seed"]) if distributed else None
    loader = DataLoader(
        data,
        batch_size=params["batch_size"],
        sampler=sampler,
        shuffle=sampler is None,
        generator=generator,
    )
    loss_fn = torch.nn.MSELoss()

    ckpt = candle_ckpt.CandleCkptPyTorch(params)
    ckpt.set_model(
        {"model": model, "optimizer": optimizer, "scheduler": scheduler, "generator": generator}
    )
    J = ckpt.restart(model)
    initial_epoch = J["epoch"] if J else 0
    if initial_epoch >= params["epochs"]:
        print(
            f"checkpoint is at epoch {initial_epoch}, --epochs is {params['epochs']}: "
            f"nothing more to train"
        )
    for epoch in range(initial_epoch, params["epochs"]):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        for batch, (xb, yb) in enumerate(loader):
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            ckpt.batch_end(batch)
            if at_batch is not None:
                at_batch(epoch + 1, batch + 1)
        scheduler.step()
        model.eval()
        with torch.no_grad():
            val_loss = loss_fn(model(xv), yv).item()
        print(f"epoch {epoch + 1}: loss {loss.item()!r} val_loss {val_loss!r}", flush=True)
        ckpt.ckpt_epoch(epoch, {"loss": loss.item(), "val_loss": val_loss})
    ckpt.finish()
    return net


def main(argv=None):
    import candle_ckpt

    params = initialize_parameters(argv)
    try:
        net = run(params)
    except candle_ckpt.CheckpointError as error:
        return candle_params.report_refusal(__file__, error)
    print(f"final digest {digest(net)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
