"""Hand-written kernels for platforms where XLA's own lowering leaves speed behind."""
