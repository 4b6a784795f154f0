"""The Keras 3 adapter: `CandleCheckpointCallback`, `restart`, and the `model.h5` format."""
