"""The compile gate: every Triton kernel launch megalong makes at real sizes, compiled ahead of time
for sm_90 and sm_80 without a GPU, and checked for shared memory, register spills and tensor-core
instructions. Run it with `python -m megalong.kernels.compile_gate`."""
