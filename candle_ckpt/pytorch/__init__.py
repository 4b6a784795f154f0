"""The PyTorch adapter: `CandleCkptPyTorch` and the `model.h5` (HDF5 + JSON) format."""
