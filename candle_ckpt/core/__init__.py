"""The framework-neutral core: what a checkpoint is on disk and how it is written and read.

Nothing here imports TensorFlow, Keras or torch. An adapter (`candle_ckpt.keras`,
`candle_ckpt.pytorch`) supplies the framework's part through `adapter.FrameworkAdapter`.

The parts: `format` (the on-disk format), `storage` (how bytes reach the disk and come
back), `save` (the save path), `restore` (the restart path), `run` (the run's control);
what they all share (errors, parameters, logging, the adapter interface) is here.
"""
