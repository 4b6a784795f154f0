"""A plain PyTorch loop with step checkpoints (ckpt_save_steps), for the mid-epoch tests.

    python tests/steps_job.py DIR EPOCHS [--kill_at E:B] [--pause_at E:B]
        [--virtual_clock S] [--state_mb M] [--ckpt_* VALUE ...]

Each epoch's order is a permutation drawn from a seeded `torch.Generator` at the
epoch's start and kept with the checkpoint (`EpochOrder`), so a restart inside the
epoch trains the remaining batches in the same order without loading the skipped
ones; Dropout draws from torch's global generator, which every checkpoint holds. The
job prints "trained E:B" after each batch (1-based epoch E, 0-based batch B), and at
the end "final digest <sha256 of the weights and the optimizer state>".
`--kill_at E:B` sends SIGKILL after batch B (0-based) of 1-based epoch E, `--pause_at`
prints "PAUSED <pid>" there and waits for a signal (tests/keras_job.py);
`--state_mb M` adds a buffer of about M MB to the model (a larger save).
"""

import hashlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from keras_job import (  # noqa: E402
    install_virtual_clock,
    kill_myself,
    take_point,
    take_value,
    wait_for_a_signal,
)

SAMPLES, FEATURES, BATCH = 480, 16, 16  # 30 batches per epoch


class EpochOrder:
    """The running epoch's order of the samples and its loss so far: part of the state
    a checkpoint keeps, so that the epoch's end logs the same loss after a restart."""

    def __init__(self):
        self.order = None
        self.total = 0.0

    def state_dict(self):
        return {"order": self.order, "total": self.total}

    def load_state_dict(self, state):
        self.order, self.total = state["order"], state["total"]


def build(state_mb):
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 32),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 1),
    )
    if state_mb:
        model.register_buffer("ballast", torch.zeros(int(state_mb * 1e6 / 4)))
    return model


def digest(model, optimizer):
    import torch

    h = hashlib.sha256()
    tensors = list(model.state_dict().items())
    for index, state in sorted(optimizer.state_dict()["state"].items()):
        tensors += [(f"{index}.{key}", value) for key, value in sorted(state.items())]
    for name, tensor in tensors:
        h.update(name.encode())
        tensor = torch.as_tensor(tensor)
        h.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def main(argv):
    import torch

    import candle_ckpt

    argv, kill_at = take_point(argv, "--kill_at")
    argv, pause_at = take_point(argv, "--pause_at")
    argv, tick = take_value(argv, "--virtual_clock")
    argv, state_mb = take_value(argv, "--state_mb")
    advance = install_virtual_clock(tick) if tick is not None else None
    directory, epochs, flags = argv[0], int(argv[1]), argv[2:]
    params = {"ckpt_directory": directory, "epochs": epochs, "ckpt_save_best": False}
    params.update(dict(zip(flags[0::2], flags[1::2])))
    params = {key.lstrip("-"): value for key, value in params.items()}
    torch.set_num_threads(1)
    data = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, FEATURES, generator=data)
    y = x @ torch.randn(FEATURES, 1, generator=data)
    model = build(state_mb)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    shuffle = torch.Generator().manual_seed(7)
    order = EpochOrder()
    ckpt = candle_ckpt.CandleCkptPyTorch(params, verbose=False)
    ckpt.set_model({"model": model, "optimizer": optimizer, "shuffle": shuffle, "order": order})
    J = ckpt.restart()
    start = J.get("batch", 0) if J else 0  # get: the previous release has no J["batch"]
    for epoch in range(J["epoch"] if J else 0, epochs):
        if start == 0:
            order.order = torch.randperm(SAMPLES, generator=shuffle)
            order.total = 0.0
        model.train()
        for batch in range(start, SAMPLES // BATCH):
            rows = order.order[batch * BATCH : (batch + 1) * BATCH]
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
            loss.backward()
            optimizer.step()
            order.total += loss.item()
            print(f"trained {epoch + 1}:{batch}", flush=True)
            if advance is not None:
                advance()
            if (epoch + 1, batch) == kill_at:
                kill_myself()
            if (epoch + 1, batch) == pause_at:
                wait_for_a_signal()
            ckpt.batch_end(batch)
        start = 0
        print(f"epoch {epoch + 1} loss {order.total!r}", flush=True)
        ckpt.ckpt_epoch(epoch, {"loss": order.total})
    print(f"final digest {digest(model, optimizer)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
