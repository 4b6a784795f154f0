"""tests/steps_job.py as examples/slurm_job.sh runs a benchmark, and slow enough for a
signal Slurm sends at a set time to find it inside an epoch.

    python tests/slurm_steps_job.py --ckpt_directory DIR --epochs E
        [--batch_seconds S] [--ckpt_* VALUE ...]

`--batch_seconds S`: each batch takes S seconds more (a sleep before its `batch_end`),
so that the job's batches take real time and a signal falls between two of them.
Prints what steps_job.py prints ("trained E:B" per batch, "final digest ...").
"""

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from keras_job import take_value  # noqa: E402


def take_text(argv, flag):
    """Remove `flag X` from argv; return (argv, X)."""
    index = argv.index(flag)
    return argv[:index] + argv[index + 2 :], argv[index + 1]


def main(argv):
    import steps_job

    import candle_ckpt

    argv, seconds = take_value(argv, "--batch_seconds")
    argv, directory = take_text(argv, "--ckpt_directory")
    argv, epochs = take_text(argv, "--epochs")
    if seconds:
        batch_end = candle_ckpt.CandleCkptPyTorch.batch_end

        def slow_batch_end(self, batch):
            time.sleep(seconds)
            batch_end(self, batch)

        candle_ckpt.CandleCkptPyTorch.batch_end = slow_batch_end
    steps_job.main([directory, epochs, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
