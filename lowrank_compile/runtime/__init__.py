"""Runtime: per-parameter state, optimizer bindings, projectors and kernels."""
