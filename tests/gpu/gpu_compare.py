"""What the GPU tests share: bf16 kernel inputs beside float32 copies of the same values, relative
errors of outputs and gradients, a spy on Triton launches, and the torch path forced.

Error measure: ||got - want|| / ||want|| over a whole tensor (float64 arithmetic), `want` from a
float32 reference on the same values. Gradients are those of sum(output * W) for a fixed random W,
so every output element's gradient path is checked at once.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

DEVICE = "cuda"  # a CPU dry run of the test logic sets this module attribute to "cpu"


def pair(*shape: int, scale: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 leaf, float32 leaf) holding the same values: the kernel's input and the reference's."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * scale).to(DEVICE).bfloat16()
    return x.requires_grad_(), x.float().requires_grad_()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def compare(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
            got_inputs: Sequence[torch.Tensor], want_inputs: Sequence[torch.Tensor],
            out_tol: float, grad_tol: float, seed: int = 1) -> dict:
    """Assert rel(got[i], want[i]) < out_tol and the same for the gradients of every input (< grad_tol);
    returns the measured errors (shown in the assertion messages)."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(w.shape, generator=g).to(DEVICE) for w in want]
    errors = {f"out{i}": rel(o, w) for i, (o, w) in enumerate(zip(got, want))}
    got_grads = torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(got, weights)), got_inputs)
    want_grads = torch.autograd.grad(sum((o.float() * w).sum() for o, w in zip(want, weights)), want_inputs)
    errors.update({f"grad{i}": rel(a, b) for i, (a, b) in enumerate(zip(got_grads, want_grads))})
    for name, err in errors.items():
        assert err < (out_tol if name.startswith("out") else grad_tol), errors
    return errors


@contextlib.contextmanager
def kernel_launches() -> Iterator[list[str]]:
    """Records "module.kernel" of every Triton launch inside the block."""
    from triton.runtime.jit import KernelInterface

    seen: list[str] = []
    launch = KernelInterface.__getitem__

    def recording(kernel, grid):
        seen.append(f"{kernel.fn.__module__}.{kernel.fn.__name__}")
        return launch(kernel, grid)

    KernelInterface.__getitem__ = recording
    try:
        yield seen
    finally:
        KernelInterface.__getitem__ = launch


def launched_from(seen: list[str], module: str) -> int:
    """How many of the recorded launches were kernels of `module` (e.g. "window_attention")."""
    return sum(name.startswith(f"megalong.kernels.{module}.") for name in seen)


@contextlib.contextmanager
def torch_path() -> Iterator[None]:
    """`execution.kernels: reference` inside the block: modules cannot take a kernel."""
    from megalong.kernels import select

    select.set_mode("reference")
    try:
        yield
    finally:
        select.set_mode("auto")
