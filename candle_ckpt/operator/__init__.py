"""The operator's side: inspecting and repairing a tree between jobs (`candle-ckpt`).

Nothing here imports TensorFlow, Keras or torch.
"""
