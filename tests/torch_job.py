"""A PyTorch training job for the tests: the example benchmark, small, optionally killed.

    python tests/torch_job.py --ckpt_directory DIR --epochs 6 [--kill_at 4:3] [flags]

`--kill_at E:B` sends SIGKILL to this process after batch B of (1-based) epoch E;
`--pause_at E:B` prints "PAUSED <pid>" and waits for a signal there (tests/keras_job.py
has both). The job prints "final digest <sha256 of the weights>" when it finishes.
Under WORLD_SIZE > 1 (MASTER_ADDR, MASTER_PORT, RANK set) it trains with
DistributedDataParallel over gloo.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from keras_job import kill_myself, load_example, take_point, wait_for_a_signal  # noqa: E402

SMALL = ["--n_samples", "512", "--n_features", "16", "--dense", "[32,16]",
         "--batch_size", "64", "--lr_step", "2", "--ckpt_keep_limit", "1000"]


def main(argv):
    argv, kill_at = take_point(argv, "--kill_at")
    argv, pause_at = take_point(argv, "--pause_at")
    example = load_example("benchmark_pytorch.py")
    params = example.initialize_parameters(SMALL + argv)

    def at_batch(epoch, batch):
        if (epoch, batch) == kill_at:
            kill_myself()
        if (epoch, batch) == pause_at:
            wait_for_a_signal()

    net = example.run(params, at_batch=at_batch)
    print(f"final digest {example.digest(net)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
