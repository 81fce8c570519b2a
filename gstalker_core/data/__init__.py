"""The data path's inputs: stored frames, the training dataset, per-frame tensors on a device."""
