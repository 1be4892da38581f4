"""Building and loading models, the checked output head, the training forward, optional kernels."""
