"""Toy Triton kernels that each trip one detector of the compile gate (tests/test_kernels_compile.py).
A package beside the tests, so the gate's clean compile processes can import them by name."""
