"""Tests of the portable selective scan (eq. 4) and the Mamba block in diffcl_algo.networks.ssm."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from diffcl_algo.networks.ssm import MAMBA_SSM_AVAILABLE, Mamba, selective_scan, selective_scan_reference

# mamba_ssm.Mamba(d_model=8) (v1, bias=False): named parameters in registration order, with shapes
MAMBA_SSM_PARAMS_D8 = [
    ("A_log", (16, 16)),
    ("D", (16,)),
    ("in_proj.weight", (32, 8)),
    ("conv1d.weight", (16, 1, 4)),
    ("conv1d.bias", (16,)),
    ("x_proj.weight", (33, 16)),
    ("dt_proj.weight", (16, 1)),
    ("dt_proj.bias", (16,)),
    ("out_proj.weight", (8, 16)),
]


def _bc(form: str, batch: int, dim: int, n: int, length: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """B or C in one of mamba_ssm's forms: constant (dim, N), variable (batch, N, L), grouped (batch, G, N, L)."""
    if form == "constant":
        return torch.randn(dim, n, generator=gen, dtype=dtype)
    if form == "variable":
        return torch.randn(batch, n, length, generator=gen, dtype=dtype)
    return torch.randn(batch, 2, n, length, generator=gen, dtype=dtype)  # 2 groups


def _inputs(
    batch: int,
    dim: int,
    n: int,
    length: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    b_form: str = "variable",
    c_form: str = "variable",
    delta_scale: float = 0.5,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, dim, length, generator=gen, dtype=dtype),
        "delta": torch.randn(batch, dim, length, generator=gen, dtype=dtype) * delta_scale,
        "A": -torch.rand(dim, n, generator=gen, dtype=dtype) * 3.0,
        "B": _bc(b_form, batch, dim, n, length, gen, dtype),
        "C": _bc(c_form, batch, dim, n, length, gen, dtype),
        "D": torch.randn(dim, generator=gen, dtype=dtype),
        "z": torch.randn(batch, dim, length, generator=gen, dtype=dtype),
        "delta_bias": torch.randn(dim, generator=gen, dtype=dtype) * 0.5,
    }


def _compare(inputs: dict, use: tuple, softplus: bool, chunk_size: int | None, atol: float, rtol: float) -> None:
    """Forward, last state and gradients of every tensor input: selective_scan vs the sequential reference."""
    kw = {k: v.clone().requires_grad_() for k, v in inputs.items() if k in ("u", "delta", "A", "B", "C") + use}
    kw_ref = {k: v.detach().clone().requires_grad_() for k, v in kw.items()}
    out, last = selective_scan(**kw, delta_softplus=softplus, return_last_state=True, chunk_size=chunk_size)
    out_ref, last_ref = selective_scan_reference(**kw_ref, delta_softplus=softplus, return_last_state=True)
    torch.testing.assert_close(out, out_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(last, last_ref, atol=atol, rtol=rtol)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), list(kw.values()))
    grads_ref = torch.autograd.grad((out_ref * weight).sum(), list(kw_ref.values()))
    for name, g, g_ref in zip(kw, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=atol, rtol=rtol, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize(
    "batch,dim,n,length,chunk_size",
    [(2, 3, 4, 1, None), (1, 4, 2, 7, None), (2, 4, 3, 7, 3), (2, 2, 5, 37, 4), (1, 4, 4, 64, 8), (2, 3, 2, 50, None)],
)
def test_scan_matches_reference_fp64(batch: int, dim: int, n: int, length: int, chunk_size: int | None) -> None:
    inputs = _inputs(batch, dim, n, length)
    _compare(inputs, ("D", "z", "delta_bias"), True, chunk_size, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "use,softplus",
    [((), False), (("D",), False), (("z",), True), (("delta_bias",), True), (("D", "z", "delta_bias"), False)],
)
def test_scan_optional_inputs(use: tuple, softplus: bool) -> None:
    inputs = _inputs(2, 4, 3, 23)
    inputs["delta"] = inputs["delta"].abs()  # keep delta >= 0 without softplus
    if "delta_bias" in use:
        inputs["delta_bias"] = inputs["delta_bias"].abs()
    _compare(inputs, use, softplus, 5, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "b_form,c_form",
    [("constant", "constant"), ("grouped", "grouped"), ("constant", "variable"), ("grouped", "constant")],
)
def test_scan_bc_forms(b_form: str, c_form: str) -> None:
    inputs = _inputs(2, 4, 3, 19, b_form=b_form, c_form=c_form)
    _compare(inputs, ("D", "z", "delta_bias"), True, 4, atol=1e-10, rtol=1e-10)


def test_scan_fp32_long_sequence() -> None:
    inputs = _inputs(1, 8, 16, 700, dtype=torch.float32)
    _compare(inputs, ("D", "z", "delta_bias"), True, None, atol=2e-3, rtol=2e-4)


def test_scan_chunk_size_invariance() -> None:
    inputs = _inputs(2, 3, 4, 30)
    with torch.no_grad():  # also the path that keeps one slab of states only
        out_ref, last_ref = selective_scan_reference(**inputs, delta_softplus=True, return_last_state=True)
        for chunk_size in (1, 4, 7, 30, 64):
            out, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True, chunk_size=chunk_size)
            torch.testing.assert_close(out, out_ref, atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(last, last_ref, atol=1e-12, rtol=1e-12)


def test_scan_stable_with_large_delta() -> None:
    """Decays underflow to 0 instead of overflowing; result still equals the reference."""
    inputs = _inputs(1, 4, 8, 200, dtype=torch.float32, delta_scale=1e3)
    inputs["delta_bias"] = torch.full((4,), 50.0)
    inputs["A"] = inputs["A"] * 30.0
    _compare(inputs, ("D", "z", "delta_bias"), True, None, atol=1e-2, rtol=1e-4)
    kw = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out = selective_scan(**kw, delta_softplus=True)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(v.grad).all() for v in kw.values())


def test_scan_half_input_returns_input_dtype() -> None:
    inputs = {
        k: v.to(torch.bfloat16) if k in ("u", "delta", "z") else v.float() for k, v in _inputs(1, 4, 4, 9).items()
    }
    out = selective_scan(**inputs, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_reference(**inputs, delta_softplus=True)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_scan_rejects_bad_inputs() -> None:
    inputs = _inputs(1, 4, 3, 5)
    with pytest.raises(ValueError):
        selective_scan(**{**inputs, "B": inputs["B"][:, :2]})
    with pytest.raises(NotImplementedError):
        selective_scan(**{**inputs, "A": inputs["A"].to(torch.complex128)})


def test_mamba_parameters_match_mamba_ssm() -> None:
    m = Mamba(d_model=8)
    assert [(k, tuple(p.shape)) for k, p in m.named_parameters()] == MAMBA_SSM_PARAMS_D8
    assert list(m.state_dict()) == [k for k, _ in MAMBA_SSM_PARAMS_D8]
    assert [k for k, _ in Mamba(8, bias=True).named_parameters()][-1] == "out_proj.bias"
    assert isinstance(MAMBA_SSM_AVAILABLE, bool)


def test_mamba_initialisation() -> None:
    m = Mamba(d_model=16, d_state=8, dt_min=0.01, dt_max=0.05)
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, 9.0)).repeat(32, 1))
    torch.testing.assert_close(m.D.detach(), torch.ones(32))
    dt = F.softplus(m.dt_proj.bias.detach())
    assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.05 + 1e-6
    bound = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= bound
    assert m.dt_rank == math.ceil(16 / 16)
    assert torch.all(Mamba(16, dt_init="constant").dt_proj.weight == Mamba(16).dt_rank ** -0.5)


def _mamba_reference(m: Mamba, hidden: torch.Tensor) -> torch.Tensor:
    """mamba_simple's non-fused path written out with the sequential scan."""
    length = hidden.shape[1]
    xz = (hidden @ m.in_proj.weight.T).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=m.d_inner)[..., :length])
    dt, b_mat, c_mat = torch.split(x.transpose(1, 2) @ m.x_proj.weight.T, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (dt @ m.dt_proj.weight.T).transpose(1, 2)
    y = selective_scan_reference(
        x,
        dt,
        -torch.exp(m.A_log),
        b_mat.transpose(1, 2),
        c_mat.transpose(1, 2),
        m.D,
        z=z,
        delta_bias=m.dt_proj.bias,
        delta_softplus=True,
    )
    return y.transpose(1, 2) @ m.out_proj.weight.T


def test_mamba_forward_backward_and_round_trip() -> None:
    torch.manual_seed(0)
    m = Mamba(d_model=8, d_state=4).double()
    hidden = torch.randn(2, 21, 8, dtype=torch.float64, requires_grad=True)
    out = m(hidden)
    assert out.shape == (2, 21, 8)
    torch.testing.assert_close(out, _mamba_reference(m, hidden), atol=1e-10, rtol=1e-10)
    out.square().sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    buffer = io.BytesIO()
    torch.save(m.state_dict(), buffer)
    buffer.seek(0)
    m2 = Mamba(d_model=8, d_state=4).double()
    m2.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(m2(hidden), out)
