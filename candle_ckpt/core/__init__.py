"""The framework-neutral core: what a checkpoint is on disk and how it is written and read.

Nothing here imports TensorFlow, Keras or torch. An adapter (`candle_ckpt.keras`,
`candle_ckpt.pytorch`) supplies the framework's part through `adapter.FrameworkAdapter`.
"""
