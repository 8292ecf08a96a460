"""The DiT's linear layers on x86 CPUs: float32 matmuls through oneDNN instead of aten's default (MKL sgemm).

On this project's reference CPU (2 AVX-512 cores) the oneDNN inner-product primitive runs the block's linear shapes
([~1k tokens, 512] x [512, 512..2048]) at 172-205 GFLOP/s against MKL's 130-175 (forward, bias fused) and 190-203
against 144-179 for the input gradient; the weight gradient stays on MKL, faster there for 3 of the 4 block shapes
(oneDNN for the fourth, fc2's).
The whole training step is 1.06x faster than on F.linear (`benchmarks/dit_step.py --linear-kernels`, 63
interleaved rounds). Same float32 arithmetic in another summation order: results differ from F.linear by float32
rounding only (tested against float64).

`linear(x, w, b, kernel)` picks the kernel: "onednn" where it applies (a float32 CPU matmul and a PyTorch with
oneDNN on x86-64), else F.linear; "aten" always F.linear; "auto" = "onednn". Under torch.compile
(`model.compile_blocks`) the oneDNN path is a `torch.library` custom op with its own autograd, kept as one opaque
kernel; in eager mode the same forward and backward run as an autograd.Function (no op dispatch per call).
torch's FlopCounterMode is given the matmul formula for it. (No `from __future__ import annotations` here: the
ops' schemas are read from the annotations.)
"""

import platform
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

KERNELS = ("auto", "onednn", "aten")


def _probe() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _probe()


def onednn_available() -> bool:
    """oneDNN's float32 linear is used on x86-64 builds that have it (on ARM it may route to slower code)."""
    return _ONEDNN


def _onednn(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _dgrad(g: Tensor, w: Tensor) -> Tensor:
    """The input gradient g [..., out] @ w [out, in]: oneDNN reads w through its transposed view."""
    return _onednn(g, w.t(), None)


def _wgrad(g: Tensor, x: Tensor) -> Tensor:
    """The weight gradient g [rows, out]^T @ x [rows, in]: on MKL, except for layers that narrow 4x or more (the
    MLP's fc2), where oneDNN's inner product is 1.04-1.18x faster (256-4,096 rows; 0.87-0.94x on the others)."""
    if x.shape[1] >= 4 * g.shape[1]:
        return _onednn(g.t(), x.t(), None)
    return torch.mm(g.t(), x)


def gemm_dims(x_shape, w_shape) -> tuple[int, int, int]:
    """(rows, inner, cols) of a linear: input [..., in] @ weight [out, in]^T (its FLOPs: 2 x their product)."""
    rows = 1
    for n in x_shape[:-1]:
        rows *= n
    return rows, x_shape[-1], w_shape[0]


@torch.library.custom_op("cogvx_ds::linear", mutates_args=())
def _linear_op(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:  # noqa: UP045 (schema inference)
    """x [..., in] @ w[out, in]^T + b."""
    return _onednn(x, w, b)


@_linear_op.register_fake
def _(x, w, b):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("cogvx_ds::linear_dgrad", mutates_args=())
def _dgrad_op(g: Tensor, w: Tensor) -> Tensor:
    return _dgrad(g, w)


@_dgrad_op.register_fake
def _(g, w):
    return g.new_empty(*g.shape[:-1], w.shape[1])


@torch.library.custom_op("cogvx_ds::linear_wgrad", mutates_args=())
def _wgrad_op(g: Tensor, x: Tensor) -> Tensor:
    """The weight gradient as one opaque op: inside a compiled graph inductor would otherwise lower its oneDNN
    call (fc2's) as an inference linear with a constant weight, and fail."""
    return _wgrad(g, x)


@_wgrad_op.register_fake
def _(g, x):
    return g.new_empty(g.shape[1], x.shape[1])


def _setup(ctx, inputs, output):
    x, w, b = inputs
    ctx.save_for_backward(x, w)
    ctx.has_bias = b is not None


def _backward(ctx, g, dgrad=_dgrad_op, wgrad=_wgrad_op):
    x, w = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    g2 = g.reshape(-1, g.shape[-1])
    gx = dgrad(g, w) if need_x else None
    gw = wgrad(g2, x.reshape(-1, x.shape[-1])) if need_w else None
    gb = g2.sum(0) if ctx.has_bias and need_b else None
    return gx, gw, gb


_linear_op.register_autograd(_backward, setup_context=_setup)


def _register_flops() -> None:
    """torch's FlopCounterMode has no formula for oneDNN's linear: give it the matmul's, so counting FLOPs of the
    model (cogvx_ds.perf_model's check, a user's MFU) sees these linears as it sees F.linear's."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    packet = torch.ops.mkldnn._linear_pointwise
    if packet in flop_registry:
        return

    @register_flop_formula(packet)
    def _flops(x_shape, w_shape, *args, **kwargs) -> int:
        rows, inner, cols = gemm_dims(x_shape, w_shape)
        return 2 * rows * inner * cols


if _ONEDNN:
    _register_flops()


class _EagerLinear(torch.autograd.Function):
    """The same forward and backward as the custom op, without the op dispatch around each call (about 0.1 ms a
    call on a 2-core CPU); eager mode takes this one, torch.compile the op."""

    @staticmethod
    def forward(ctx, x, w, b):
        _setup(ctx, (x, w, b), None)
        return _onednn(x, w, b)

    @staticmethod
    def backward(ctx, g):
        return _backward(ctx, g, dgrad=_dgrad, wgrad=_wgrad)


def use_onednn(x: Tensor, w: Tensor, b: Tensor | None, kernel: str = "auto") -> bool:
    if kernel not in KERNELS:
        raise ValueError(f"linear kernel must be one of {KERNELS}, got {kernel!r}")
    return (kernel != "aten" and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and (b is None or b.dtype == torch.float32) and x.dim() >= 2 and x.numel() > 0 and onednn_available())


def onednn_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """The oneDNN linear with autograd, for callers that already checked `use_onednn`."""
    return _linear_op(x, w, b) if torch.compiler.is_compiling() else _EagerLinear.apply(x, w, b)


def linear(x: Tensor, w: Tensor, b: Tensor | None = None, kernel: str = "auto") -> Tensor:
    """F.linear(x, w, b), on oneDNN where `use_onednn` says so."""
    return onednn_linear(x, w, b) if use_onednn(x, w, b, kernel) else F.linear(x, w, b)
