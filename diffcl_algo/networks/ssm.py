"""Selective state-space scan (paper eq. 4) and the Mamba block, portable PyTorch with optional CUDA kernels.

``selective_scan`` has the signature, shapes and semantics of ``mamba_ssm``'s ``selective_scan_fn``; ``Mamba``
has the constructor, parameter names/shapes and initialisation of ``mamba_ssm.Mamba`` (v1, ``mamba_simple.py``),
so a checkpoint moves between this module and ``mamba_ssm`` unchanged. When ``mamba_ssm`` (and
``causal_conv1d``) import and the input is on CUDA, ``Mamba`` calls their kernels; otherwise it runs the
portable scan below. ``mamba_ssm`` is never needed to import this module.

Portable scan algorithm (no Python loop over the sequence length ``L``). The recurrence
``h_l = a_l h_{l-1} + x_l``, ``a_l = exp(delta_l A)`` in (0, 1] (for ``delta >= 0``, ``A <= 0``),
``x_l = delta_l u_l B_l``, is evaluated with time split into ``L/T`` chunks of ``T ~ sqrt(L)`` steps and laid out
``(T, L/T, batch, dim[, N])``, the within-chunk step slowest, so that step ``t`` of *all* chunks is one
contiguous slab and one vectorised operation:

1. one pass over the ``T`` steps with a zero initial state gives every chunk's local final state;
2. a loop over the ``L/T`` chunks propagates the true chunk-initial states
   ``H_c = local_c + exp(A * sum(delta over chunk c)) * H_{c-1}``;
3. a second pass over the ``T`` steps from those states writes every ``h_l`` and ``y_l = C_l h_l``.

``a_l``, ``x_l`` and ``C_l h_l`` are formed slab by slab (cache-sized temporaries), so the only full-size
``(batch, dim, N, L)`` tensor is ``h`` itself, kept for the backward pass (without autograd only one slab of
states is alive). Only decays ``<= 1`` are multiplied,
never ``exp`` of a positive cumulative sum, so large ``delta`` cannot overflow (decays underflow to 0). The
backward pass runs the same two-level scheme in reverse on the adjoint ``lam_l = dL/dh_l + a_{l+1} lam_{l+1}``
and accumulates the gradients of ``delta``, ``A``, ``delta * u``, ``B`` and ``C`` slab by slab; bias, softplus,
``D u`` and ``silu(z)`` are ordinary autograd, so every input gets its gradient (first order only).

TorchScript: ``torch.jit.script`` of ``Mamba`` (and of the networks using it, e.g. a bundle's ``ckpt_export``)
compiles the portable path only; without gradients it runs the same forward code (``_scan_forward``) as the eager
scan, so the outputs are identical, and with gradients an autograd form of it (``_scan_forward_differentiable``).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.utils import optional_import
from torch.autograd.function import once_differentiable

__all__ = ["MAMBA_SSM_AVAILABLE", "CAUSAL_CONV1D_AVAILABLE", "Mamba", "selective_scan", "selective_scan_reference"]

_cuda_selective_scan_fn, MAMBA_SSM_AVAILABLE = optional_import(
    "mamba_ssm.ops.selective_scan_interface", name="selective_scan_fn"
)
_causal_conv1d_fn, CAUSAL_CONV1D_AVAILABLE = optional_import("causal_conv1d", name="causal_conv1d_fn")


def _at(t_mat: torch.Tensor, t: int) -> torch.Tensor:
    """Slab ``t`` of a B/C operand whose time dimension is ``T`` or 1 (time-invariant)."""
    return t_mat[t] if t_mat.shape[0] > 1 else t_mat[0]


def _decay(delta: torch.Tensor, A: torch.Tensor, t: int) -> torch.Tensor:
    """``a_l = exp(delta_l A)`` of slab ``t``."""
    return torch.exp(delta[t].unsqueeze(-1) * A)


def _drive(delta_u: torch.Tensor, B: torch.Tensor, t: int) -> torch.Tensor:
    """``x_l = delta_l u_l B_l`` of slab ``t``."""
    return delta_u[t].unsqueeze(-1) * _at(B, t)


def _chunk_carries(delta: torch.Tensor, A: torch.Tensor, delta_u: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``carry[c]``, the true state just before chunk ``c`` (nc, batch, dim, N), from each chunk's local scan.

    No in-place writes, so autograd (TorchScript's included) can differentiate it.
    """
    n_steps, n_chunks = delta.shape[0], delta.shape[1]
    local = _drive(delta_u, B, 0)
    for t in range(1, n_steps):
        local = torch.addcmul(_drive(delta_u, B, t), _decay(delta, A, t), local)
    chunk_decay = torch.exp(delta.sum(0).unsqueeze(-1) * A)
    carries = [torch.zeros_like(local[0])]
    for c in range(1, n_chunks):
        carries.append(torch.addcmul(local[c - 1], chunk_decay[c - 1], carries[c - 1]))
    return torch.stack(carries)


def _scan_forward(
    delta: torch.Tensor,
    A: torch.Tensor,
    delta_u: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    last_t: int,
    last_c: int,
    keep_states: bool,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Forward pass of the chunked scan (operands as in ``_SelectiveScanCore``); TorchScript-compatible.

    Returns ``y`` (T, nc, batch, dim), the state at step ``(last_t, last_c)`` (batch, dim, N) and, when
    ``keep_states``, every state ``h`` (T, nc, batch, dim, N) (else ``None``: one slab of states alive at a time).
    """
    n_steps, n_chunks = delta.shape[0], delta.shape[1]
    h: Optional[torch.Tensor] = None
    if keep_states:
        h = delta.new_empty(list(delta.shape) + [A.shape[1]])
    y = torch.empty_like(delta)
    state: Optional[torch.Tensor] = None  # the state before slab t of every chunk
    if n_chunks > 1:
        state = _chunk_carries(delta, A, delta_u, B)
    last_state = y.new_empty(0)
    for t in range(n_steps):
        if h is None:
            if state is None:
                state = _drive(delta_u, B, 0)
            else:
                state = torch.addcmul(_drive(delta_u, B, t), _decay(delta, A, t), state)
        else:
            out = h[t]
            if state is None:
                out.copy_(_drive(delta_u, B, 0))
            else:
                torch.addcmul(_drive(delta_u, B, t), _decay(delta, A, t), state, out=out)
            state = out
        torch.sum(state * _at(C, t), dim=-1, out=y[t])
        if t == last_t:
            last_state = state[last_c].clone()
    return y, last_state, h


def _scan_forward_differentiable(
    delta: torch.Tensor,
    A: torch.Tensor,
    delta_u: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    last_t: int,
    last_c: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``_scan_forward`` without in-place writes, so that autograd (TorchScript's included) differentiates it.

    Used by TorchScript when a gradient is needed (eager uses ``_SelectiveScanCore``'s hand-written backward).
    Same recurrence and chunking, so the same values up to rounding; returns ``y`` and the last state.
    """
    n_steps, n_chunks = delta.shape[0], delta.shape[1]
    state: Optional[torch.Tensor] = None
    if n_chunks > 1:
        state = _chunk_carries(delta, A, delta_u, B)
    ys: List[torch.Tensor] = []
    last_state = delta.new_empty(0)
    for t in range(n_steps):
        if state is None:
            state = _drive(delta_u, B, 0)
        else:
            state = torch.addcmul(_drive(delta_u, B, t), _decay(delta, A, t), state)
        ys.append(torch.sum(state * _at(C, t), dim=-1))
        if t == last_t:
            last_state = state[last_c].detach().clone()
    return torch.stack(ys), last_state


class _SelectiveScanCore(torch.autograd.Function):
    """Chunked selective scan ``h_l = exp(delta_l A) h_{l-1} + delta_u_l B_l``, ``y_l = sum_N C_l h_l``.

    Inputs (compute dtype): ``delta``, ``delta_u`` (T, nc, batch, dim); ``A`` (dim, N); ``B``, ``C`` of shape
    (T or 1, nc or 1, batch or 1, dim or 1, N), broadcastable to ``h``. Step ``l = c * T + t`` is at ``[t, c]``;
    ``last`` = (t, c) of the final real step. ``keep_states``: store all states for the backward pass (otherwise
    only one slab of states is alive at a time). Outputs: ``y`` (T, nc, batch, dim) and the final state
    (batch, dim, N), not differentiable.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        delta: torch.Tensor,
        A: torch.Tensor,
        delta_u: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        last: tuple[int, int],
        keep_states: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, last_state, h = _scan_forward(delta, A, delta_u, B, C, last[0], last[1], keep_states)
        if keep_states:
            ctx.save_for_backward(delta, A, delta_u, B, C, h)
        ctx.mark_non_differentiable(last_state)
        return y, last_state

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: torch.Tensor, _grad_last: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        delta, A, delta_u, B, C, h = ctx.saved_tensors
        n_steps, n_chunks = delta.shape[:2]
        grad_y = grad_y.contiguous()

        def decay(t: int) -> torch.Tensor:
            return torch.exp(delta[t].unsqueeze(-1) * A)

        def grad_state(t: int) -> torch.Tensor:  # direct dL/dh_l from y_l = sum_N C_l h_l
            return grad_y[t].unsqueeze(-1) * _at(C, t)

        carry = None  # carry[c] = a_l lam_l at the first step l of chunk c + 1
        if n_chunks > 1:
            local = grad_state(n_steps - 1)
            for t in range(n_steps - 2, -1, -1):
                local = torch.addcmul(grad_state(t), decay(t + 1), local)
            inner_decay = torch.exp(delta[1:].sum(0).unsqueeze(-1) * A)  # steps 1..T-1 of each chunk
            first_decay = decay(0)
            carry = torch.zeros_like(local)
            for c in range(n_chunks - 2, -1, -1):
                lam_first = torch.addcmul(local[c + 1], inner_decay[c + 1], carry[c + 1])
                torch.mul(first_decay[c + 1], lam_first, out=carry[c])
            h_before_first = torch.cat([torch.zeros_like(h[0, :1]), h[n_steps - 1, :-1]])
        else:
            h_before_first = torch.zeros_like(h[0])

        grad_delta = torch.empty_like(delta)
        grad_delta_u = torch.empty_like(delta_u)
        grad_a_mat = torch.zeros_like(A)
        need_b, need_c = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_b = torch.zeros_like(B) if need_b else None
        grad_c = torch.zeros_like(C) if need_c else None
        lam = a_next = None
        for t in range(n_steps - 1, -1, -1):
            if lam is None:
                lam = grad_state(t) if carry is None else grad_state(t) + carry
            else:
                lam = torch.addcmul(grad_state(t), a_next, lam)
            a_t = decay(t)
            b_t, c_t = _at(B, t), _at(C, t)
            torch.sum(lam * b_t, dim=-1, out=grad_delta_u[t])
            if need_b:
                _at(grad_b, t).add_((lam * delta_u[t].unsqueeze(-1)).sum_to_size(b_t.shape))
            if need_c:
                _at(grad_c, t).add_((grad_y[t].unsqueeze(-1) * h[t]).sum_to_size(c_t.shape))
            grad_w = lam * (h[t - 1] if t > 0 else h_before_first) * a_t  # dL/d(delta_l A)
            torch.sum(grad_w * A, dim=-1, out=grad_delta[t])
            grad_a_mat.add_((grad_w * delta[t].unsqueeze(-1)).sum((0, 1)))
            a_next = a_t
        return grad_delta, grad_a_mat, grad_delta_u, grad_b, grad_c, None, None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _check_bc(name: str, t: torch.Tensor, batch: int, dim: int, n_state: int, length: int) -> None:
    """``B`` / ``C`` must be (dim, N), (batch, N, L) or (batch, G, N, L) with G | dim."""
    shape = list(t.shape)
    ok = (
        shape == [dim, n_state]
        or shape == [batch, n_state, length]
        or (len(shape) == 4 and shape[0] == batch and shape[2:] == [n_state, length] and dim % shape[1] == 0)
    )
    if not ok:
        raise ValueError(
            f"{name} must be (dim, N), (batch, N, L) or (batch, groups, N, L) with groups | dim; "
            f"got {_shape_str(shape)}."
        )


def _shape_str(shape: List[int]) -> str:
    """``(a, b, c)``: a shape as Python prints a tuple (TorchScript-compatible)."""
    return "(" + ", ".join([str(s) for s in shape]) + ")"


def _prepare(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and return ``(u, delta)`` in the compute dtype, ``delta`` with bias and softplus applied."""
    if A.is_complex():
        raise NotImplementedError("selective_scan: only real A is supported (as used by Mamba).")
    if u.dim() != 3 or list(delta.shape) != list(u.shape) or u.shape[-1] == 0:
        raise ValueError(
            f"u, delta must be equal (batch, dim, L>0), got {_shape_str(list(u.shape))}, "
            f"{_shape_str(list(delta.shape))}."
        )
    batch, dim, length = u.shape[0], u.shape[1], u.shape[2]
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim={dim}, N), got {_shape_str(list(A.shape))}.")
    n_state = A.shape[1]
    _check_bc("B", B, batch, dim, n_state, length)
    _check_bc("C", C, batch, dim, n_state, length)
    ct = _compute_dtype(u.dtype)
    u = u.to(ct)
    delta = delta.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u, delta


def _to_chunks(t: torch.Tensor, n_chunks: int, steps: int) -> torch.Tensor:
    """(..., L) -> (T, n_chunks, ...), contiguous; padded steps are zero (decay 1, input 0)."""
    pad = n_chunks * steps - t.shape[-1]
    if pad > 0:
        t = F.pad(t, [0, pad])
    return t.reshape(list(t.shape[:-1]) + [n_chunks, steps]).movedim([-1, -2], [0, 1]).contiguous()


def _chunk_bc(t: torch.Tensor, n_chunks: int, steps: int, dim: int, ct: torch.dtype) -> torch.Tensor:
    """B or C -> (T or 1, n_chunks or 1, batch or 1, dim or 1, N)."""
    t = t.to(ct)
    if t.dim() == 2:
        return t[None, None, None]
    if t.dim() == 3:
        return _to_chunks(t, n_chunks, steps).unsqueeze(-2)
    return _to_chunks(t, n_chunks, steps).repeat_interleave(dim // t.shape[1], dim=-2)


def _ceil_sqrt(n: int) -> int:
    """``ceil(sqrt(n))`` for ``n >= 1``, exact (TorchScript has no ``math.isqrt``)."""
    root = int(math.sqrt(n))
    while root * root < n:
        root += 1
    while root > 1 and (root - 1) * (root - 1) >= n:
        root -= 1
    return root


def _selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    chunk_size: Optional[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``selective_scan`` returning ``(out, last_state)``; TorchScript-compatible.

    Eager: ``_SelectiveScanCore`` (hand-written backward). TorchScript (``torch.jit.script`` of a ``Mamba``,
    e.g. a bundle's ``ckpt_export``), which cannot compile an ``autograd.Function``: the same forward computation
    (``_scan_forward``, identical results) when no gradient is needed, else ``_scan_forward_differentiable``
    (ordinary autograd, which keeps every intermediate: far more memory than the eager backward).
    """
    dtype_in = u.dtype
    u, delta = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    ct = u.dtype
    batch, dim, length = u.shape[0], u.shape[1], u.shape[2]
    steps = chunk_size if chunk_size is not None else _ceil_sqrt(length)
    if steps < 1:
        raise ValueError(f"chunk_size must be >= 1, got {steps}.")
    n_chunks = (length + steps - 1) // steps
    delta_c = _to_chunks(delta, n_chunks, steps)
    a_c = A.to(ct)
    delta_u = _to_chunks(delta * u, n_chunks, steps)
    b_c = _chunk_bc(B, n_chunks, steps, dim, ct)
    c_c = _chunk_bc(C, n_chunks, steps, dim, ct)
    needs_grad = torch.is_grad_enabled() and (
        delta_c.requires_grad or a_c.requires_grad or delta_u.requires_grad or b_c.requires_grad or c_c.requires_grad
    )
    last_t, last_c = (length - 1) % steps, (length - 1) // steps
    if torch.jit.is_scripting():
        if needs_grad:
            y, last_state = _scan_forward_differentiable(delta_c, a_c, delta_u, b_c, c_c, last_t, last_c)
        else:
            y, last_state, _ = _scan_forward(delta_c, a_c, delta_u, b_c, c_c, last_t, last_c, False)
    else:
        y, last_state = _SelectiveScanCore.apply(delta_c, a_c, delta_u, b_c, c_c, (last_t, last_c), needs_grad)
    y = y.movedim([0, 1], [-1, -2]).reshape(batch, dim, n_chunks * steps)[..., :length]
    out = y if D is None else y + u * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    return out.to(dtype_in), last_state


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    chunk_size: int | None = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Selective scan (paper eq. 4), portable and parallel over the sequence; ``selective_scan_fn`` semantics.

    ``delta <- softplus(delta + delta_bias)`` (each step optional), then for every step ``l``:
    ``h_l = exp(delta_l A) h_{l-1} + delta_l B_l u_l`` (``h_{-1} = 0``), ``y_l = C_l h_l + D u_l``,
    and ``y *= silu(z)`` when ``z`` is given. Eq. 4's ``A_bar_t = exp(delta_t A)``, ``B_bar_t = delta_t B_t``.

    Args:
        u: input, (batch, dim, L).
        delta: step sizes before bias/softplus, (batch, dim, L).
        A: real state matrix (diagonal per channel), (dim, N). Stable when ``delta * A <= 0``.
        B: input matrix: constant (dim, N), variable (batch, N, L), or grouped (batch, G, N, L) with G | dim.
        C: output matrix, same three forms as ``B``.
        D: skip connection, (dim,).
        z: gate, (batch, dim, L).
        delta_bias: (dim,), added to ``delta``.
        delta_softplus: apply softplus to ``delta`` (after the bias).
        return_last_state: also return ``h_{L-1}``, (batch, dim, N) in the compute dtype.
        chunk_size: steps per chunk ``T`` (default ``ceil(sqrt(L))``); any value gives the same result.

    Returns:
        out, (batch, dim, L), in ``u``'s dtype (computed in float32, or float64 for float64 inputs);
        ``(out, last_state)`` when ``return_last_state``.

    Complex ``A`` is not supported. Memory: autograd keeps the states, one tensor of ``batch * dim * N * L``
    elements (the CUDA kernel of ``mamba_ssm`` recomputes them instead); no double backward.
    """
    out, last_state = _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size)
    if return_last_state:
        return out, last_state
    return out


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Sequential (one Python step per position) evaluation of eq. 4; same signature and result as ``selective_scan``.

    Slow; meant as the ground truth in tests and benchmarks.
    """
    dtype_in = u.dtype
    u, delta = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    ct = u.dtype
    batch, dim, length = u.shape

    def step_bc(t: torch.Tensor, i: int) -> torch.Tensor:
        """B or C at step ``i``, broadcastable to (batch, dim, N)."""
        if t.dim() == 2:
            return t.to(ct)
        if t.dim() == 3:
            return t[:, None, :, i].to(ct)
        return t[..., i].to(ct).repeat_interleave(dim // t.shape[1], dim=1)

    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for i in range(length):
        d_i = delta[:, :, i, None]
        h = torch.exp(d_i * A.to(ct)) * h + d_i * u[:, :, i, None] * step_bc(B, i)
        ys.append((h * step_bc(C, i)).sum(-1))
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + u * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(dtype_in)
    return (out, h) if return_last_state else out


class Mamba(nn.Module):
    """Mamba (v1) block, a drop-in for ``mamba_ssm.Mamba`` (same arguments, parameters and initialisation).

    ``in_proj`` -> split ``(x, z)`` -> causal depthwise ``conv1d`` -> SiLU -> ``x_proj`` -> ``(dt, B, C)`` ->
    ``dt_proj`` (its bias passed as ``delta_bias``, softplus) -> selective scan (eq. 4) with ``D`` and gate ``z``
    -> ``out_proj``: the non-fused path of ``mamba_ssm/modules/mamba_simple.py``. Parameters:
    ``in_proj.weight`` (2 d_inner, d_model), ``conv1d.weight`` (d_inner, 1, d_conv), ``conv1d.bias`` (d_inner),
    ``x_proj.weight`` (dt_rank + 2 d_state, d_inner), ``dt_proj.weight`` (d_inner, dt_rank),
    ``dt_proj.bias`` (d_inner), ``A_log`` (d_inner, d_state), ``D`` (d_inner), ``out_proj.weight``
    (d_model, d_inner), plus ``in_proj.bias``/``out_proj.bias`` when ``bias``; ``d_inner = expand * d_model``.
    Parameters are created in ``mamba_ssm``'s order with the same random draws, so under the same seed both
    initialise identically.

    Args:
        d_model: token width.
        d_state: SSM state size N.
        d_conv: causal convolution width.
        expand: ``d_inner = expand * d_model``.
        dt_rank: rank of the ``dt`` projection; ``"auto"`` = ``ceil(d_model / 16)``.
        dt_min, dt_max: ``softplus(dt_proj.bias)`` is initialised log-uniform in ``[dt_min, dt_max]``.
        dt_init: ``"random"`` (uniform) or ``"constant"`` init of ``dt_proj.weight``.
        dt_scale: ``dt_proj.weight`` init scale is ``dt_rank**-0.5 * dt_scale``.
        dt_init_floor: lower clamp of the initial ``dt``.
        conv_bias: bias in ``conv1d``.
        bias: biases in ``in_proj`` and ``out_proj``.
        use_kernels: use ``mamba_ssm``'s ``selective_scan_fn`` and ``causal_conv1d_fn`` for CUDA inputs when they
            import (not a ``mamba_ssm`` argument; set False to force the portable path, e.g. for comparisons).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_kernels: bool = True,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_kernels = use_kernels

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + d_state * 2, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}.")
        # softplus(dt_proj.bias) log-uniform in [dt_min, dt_max]: bias = inverse softplus of dt
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(
            min=dt_init_floor
        )
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel, stored as log(-A) in fp32
        a_init = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a_init))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, L, d_model) -> (batch, L, d_model)."""
        seqlen = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, 2 d_inner, L)
        x, z = xz.chunk(2, dim=1)
        # mamba_ssm / causal_conv1d kernels: eager with CUDA inputs; TorchScript compiles the portable path alone
        if torch.jit.is_scripting():
            x = self._conv(x, seqlen)
        elif self.use_kernels and x.is_cuda and CAUSAL_CONV1D_AVAILABLE:
            x = _causal_conv1d_fn(
                x=x.contiguous(), weight=self.conv1d.weight.squeeze(1), bias=self.conv1d.bias, activation="silu"
            )
        else:
            x = self._conv(x, seqlen)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, dt_rank + 2 d_state)
        dt, b_mat, c_mat = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (batch, d_inner, L), bias added in the scan
        b_mat = b_mat.transpose(1, 2).contiguous()  # (batch, d_state, L)
        c_mat = c_mat.transpose(1, 2).contiguous()
        x, dt, z, a_mat = x.contiguous(), dt.contiguous(), z.contiguous(), -torch.exp(self.A_log.float())
        if torch.jit.is_scripting():
            y = self._scan(x, dt, a_mat, b_mat, c_mat, z)
        elif self.use_kernels and x.is_cuda and MAMBA_SSM_AVAILABLE:
            y = _cuda_selective_scan_fn(
                x,
                dt,
                a_mat,
                b_mat,
                c_mat,
                self.D.float(),
                z=z,
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            )
        else:
            y = self._scan(x, dt, a_mat, b_mat, c_mat, z)
        return self.out_proj(y.transpose(1, 2))

    def _conv(self, x: torch.Tensor, seqlen: int) -> torch.Tensor:
        """Causal depthwise convolution + SiLU (portable)."""
        return self.act(self.conv1d(x)[..., :seqlen])

    def _scan(
        self,
        x: torch.Tensor,
        dt: torch.Tensor,
        a_mat: torch.Tensor,
        b_mat: torch.Tensor,
        c_mat: torch.Tensor,
        z: torch.Tensor,
    ) -> torch.Tensor:
        """Portable selective scan with ``D``, gate ``z``, ``delta_bias = dt_proj.bias`` and softplus."""
        return _selective_scan(x, dt, a_mat, b_mat, c_mat, self.D.float(), z, self.dt_proj.bias.float(), True, None)[0]
