"""Hand-written Triton kernels, each beside a pure-torch reference and a checker.

Layout, per kernel file: `_name_kernel` (`@triton.jit`) -> `name_update` (launcher) -> the checker
`name_applicable` that says when the fused path may run. The reference in plain torch sits in
the same file. Importing this package does not import triton; each kernel module does, lazily.
"""
