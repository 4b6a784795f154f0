"""A PyTorch training job for the tests: the example benchmark, small, optionally killed.

    python tests/torch_job.py --ckpt_directory DIR --epochs 6 [--kill_at 4:3] [flags]

`--kill_at E:B` sends SIGKILL to this process after batch B of (1-based) epoch E;
`--pause_at E:B` prints "PAUSED <pid>" and waits for a signal there; `--virtual_clock S`
advances the wall-clock stop's clock S seconds per batch (tests/keras_job.py has all three).
The job prints "final digest <sha256 of the weights>" when it finishes.
Under WORLD_SIZE > 1 (MASTER_ADDR, MASTER_PORT, RANK set) it trains with
DistributedDataParallel over gloo. `--lazy` builds the same network of
`torch.nn.LazyLinear` layers, uninitialised until the first batch (the optimizer is
made before that, from the uninitialised parameters).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from keras_job import (  # noqa: E402
    install_virtual_clock,
    kill_myself,
    load_example,
    take_point,
    take_value,
    wait_for_a_signal,
)

SMALL = [
    "--n_samples",
    "512",
    "--n_features",
    "16",
    "--dense",
    "[32,16]",
    "--batch_size",
    "64",
    "--lr_step",
    "2",
    "--ckpt_keep_limit",
    "1000",
]


def main(argv):
    argv, kill_at = take_point(argv, "--kill_at")
    argv, pause_at = take_point(argv, "--pause_at")
    argv, tick = take_value(argv, "--virtual_clock")
    example = load_example("benchmark_pytorch.py")
    if "--lazy" in argv:
        argv = [arg for arg in argv if arg != "--lazy"]
        example.build_model = build_lazy_model
    params = example.initialize_parameters(SMALL + argv)
    advance = install_virtual_clock(tick) if tick is not None else None

    def at_batch(epoch, batch):
        if advance is not None:
            advance()
        if (epoch, batch) == kill_at:
            kill_myself()
        if (epoch, batch) == pause_at:
            wait_for_a_signal()

    try:
        net = example.run(params, at_batch=at_batch)
    except BaseException:
        leave_process_group(failed=True)
        raise
    print(f"final digest {example.digest(net)}", flush=True)
    leave_process_group(failed=False)


def leave_process_group(failed):
    """Wait for every rank, then tear the gloo group down before the interpreter exits.

    Left to interpreter exit, a rank whose peer has already gone can abort in gloo's
    teardown ("terminate called without an active exception"). After a failure (exit
    75, a refused restart) the peers may never arrive: a monitored barrier with a
    timeout then names them instead of waiting forever, and the group is torn down
    all the same.
    """
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if failed:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
        else:
            dist.barrier()
    except RuntimeError as error:
        print(
            f"rank {dist.get_rank()}: leaving the process group without every rank: {error}",
            file=sys.stderr,
            flush=True,
        )
    finally:
        dist.destroy_process_group()


def build_lazy_model(params):
    """The example's network with every Linear a LazyLinear (in_features from the data)."""
    import torch

    layers = []
    for hidden in params["dense"]:
        layers += [
            torch.nn.LazyLinear(hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(params["dropout"]),
        ]
    return torch.nn.Sequential(*layers, torch.nn.LazyLinear(1))


if __name__ == "__main__":
    main(sys.argv[1:])
