"""The PyTorch adapter: parity with F.cosine_similarity, autograd in every regime, torch.func,
torch.compile, autocast, and guarantees G1-G8 on tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.array_api import make_strategies_namespace

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.autograd import gradcheck, gradgradcheck  # noqa: E402
from torch.func import grad, jacfwd, jacrev, jvp, vmap  # noqa: E402

import polycos  # noqa: E402
import polycos.torch as pt  # noqa: E402
from polycos.testing import (  # noqa: E402
    assert_matches_reference,
    assert_vjp_matches_reference,
    cosine_inputs,
    reference,
    reference_vjp,
)
from polycos.torch import CosineSimilarity, CosineSimilarityFunction, cosine_similarity  # noqa: E402

xps = make_strategies_namespace(np)
f64 = torch.float64


def t64(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


@st.composite
def regular_case(draw, max_dims=3, max_side=5):
    """Broadcastable float64 inputs whose every row norm is far above eps (PyTorch's regime)."""
    shapes = draw(xps.mutually_broadcastable_shapes(2, min_dims=1, max_dims=max_dims, min_side=1, max_side=max_side))
    nd = len(shapes.result_shape)
    dim = draw(st.integers(-nd, nd - 1))
    elements = st.floats(-10, 10, allow_subnormal=False)
    x1 = draw(xps.arrays(np.float64, shapes.input_shapes[0], elements=elements))
    x2 = draw(xps.arrays(np.float64, shapes.input_shapes[1], elements=elements))
    eps = draw(st.sampled_from([1e-8, 1e-3, 0.1]))
    for x in (x1, x2):
        n = np.linalg.norm(np.broadcast_to(x, shapes.result_shape), axis=dim)
        assume(np.all(n > 2 * eps) and np.all(n > 1e-3))
    return t64(x1), t64(x2), dim, eps


def grads(fn, x1, x2, g):
    a1, a2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    out = fn(a1, a2)
    g1, g2 = torch.autograd.grad(out, (a1, a2), g)
    return out.detach(), g1, g2


# --------------------------------------------------------------------------- parity with PyTorch


@given(case=regular_case(), seed=st.integers(0, 2**31 - 1))
def test_parity_with_torch_values_and_gradients(case, seed):
    x1, x2, dim, eps = case
    out_shape = F.cosine_similarity(x1, x2, dim, eps).shape
    g = torch.randn(out_shape, dtype=f64, generator=torch.Generator().manual_seed(seed))
    ours = grads(lambda a, b: cosine_similarity(a, b, dim, eps), x1, x2, g)
    theirs = grads(lambda a, b: F.cosine_similarity(a, b, dim, eps), x1, x2, g)
    for u, v, scale in zip(ours, theirs, (1.0, *_scales(x1, x2, dim, g)), strict=True):
        assert u.shape == v.shape
        assert u.dtype == v.dtype
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12 * scale)


@given(case=regular_case())
def test_parity_with_torch_float32(case):
    x1, x2, dim, eps = (case[0].float(), case[1].float(), *case[2:])
    g = torch.ones(F.cosine_similarity(x1, x2, dim, eps).shape)
    ours = grads(lambda a, b: cosine_similarity(a, b, dim, eps), x1, x2, g)
    theirs = grads(lambda a, b: F.cosine_similarity(a, b, dim, eps), x1, x2, g)
    for u, v, scale in zip(ours, theirs, (1.0, *_scales(x1, x2, dim, g)), strict=True):
        assert u.dtype == torch.float32
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5 * scale)


def _scales(x1, x2, dim, g):
    """Per gradient, the size of the terms each of its entries sums: ``2 |g| / ||x||``
    per broadcast copy. Where they cancel (nearly parallel rows, inputs broadcast
    along ``dim``) both libraries keep an absolute error of about eps times this."""
    shape = torch.broadcast_shapes(x1.shape, x2.shape)
    out = []
    for x in (x1, x2):
        n = torch.linalg.vector_norm(x.double().broadcast_to(shape), dim=dim)
        copies = max(1, math.prod(shape) // max(x.numel(), 1))
        out.append(max(1.0, float(2 * g.abs().max() * copies / n.min())))
    return out


def _opinfo_samples(dtype, requires_grad=False):
    pytest.importorskip("expecttest")  # needed by torch.testing._internal
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == "nn.functional.cosine_similarity"]
    return list(op.sample_inputs("cpu", dtype, requires_grad=requires_grad))


def _above_eps(x1, x2, dim, eps):
    shape = torch.broadcast_shapes(x1.shape, x2.shape)
    if not shape:
        return bool(x1.abs() > eps and x2.abs() > eps)
    return all(
        bool((torch.linalg.vector_norm(x.detach().broadcast_to(shape), dim=dim) > eps).all()) for x in (x1, x2)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opinfo_samples_match_torch(dtype):
    samples = _opinfo_samples(dtype, requires_grad=True)
    assert len(samples) >= 5
    for sample in samples:
        x1, (x2,), kw = sample.input, sample.args, sample.kwargs
        dim, eps = kw.get("dim", 1), kw.get("eps", 1e-8)
        ours = cosine_similarity(x1, x2, dim, eps)
        theirs = F.cosine_similarity(x1, x2, dim, eps)
        tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
        torch.testing.assert_close(ours, theirs, **tol)
        assert_matches_reference(ours, x1, x2, dim, eps)
        g = torch.linspace(-1, 1, ours.numel(), dtype=dtype).reshape(ours.shape)
        ga = torch.autograd.grad(ours, (x1, x2), g)
        if _above_eps(x1, x2, dim, eps):
            gb = torch.autograd.grad(theirs, (x1, x2), g)
            for u, v in zip(ga, gb, strict=True):
                torch.testing.assert_close(u, v, **tol)
        else:  # inside the eps regime the spec gives the exact derivative
            assert_vjp_matches_reference(ga, g, x1, x2, dim, eps)


def test_opinfo_samples_gradcheck_vmap_jvp():
    for sample in _opinfo_samples(f64, requires_grad=True):
        x1, (x2,), kw = sample.input, sample.args, sample.kwargs
        dim, eps = kw.get("dim", 1), kw.get("eps", 1e-8)

        def f(a, b, dim=dim, eps=eps):
            return cosine_similarity(a, b, dim, eps)

        assert gradcheck(f, (x1, x2))
        assert gradgradcheck(f, (x1, x2))
        a, b = x1.detach(), x2.detach()
        batched = vmap(f)(torch.stack([a, 2 * a, -a]), torch.stack([b, b, 3 * b]))
        looped = torch.stack([f(a, b), f(2 * a, b), f(-a, 3 * b)])
        torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
        ta, tb = torch.ones_like(a), torch.linspace(-1, 1, b.numel(), dtype=f64).reshape(b.shape)
        _, tangent = jvp(f, (a, b), (ta, tb))
        (_, vjp_fn) = torch.func.vjp(f, a, b)
        # <J t, u> == <t, J^T u> for a random cotangent u
        u = torch.linspace(0.5, 1.5, tangent.numel(), dtype=f64).reshape(tangent.shape)
        c1, c2 = vjp_fn(u)
        torch.testing.assert_close((tangent * u).sum(), (c1 * ta).sum() + (c2 * tb).sum())


# --------------------------------------------------------------------------- gradcheck in every regime (G5)


def _regimes():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 5, dtype=f64, generator=g)
    s = torch.randn(4, 5, dtype=f64, generator=g)
    mixed = r.clone()
    mixed[1] = 0.0
    mixed[2] *= 1e-3
    return [
        pytest.param(r, s, 1, 1e-8, id="regular"),
        pytest.param(r, s, 0, 1e-8, id="dim0"),
        pytest.param(1e-3 * r, s, 1, 0.5, id="x1-below-eps"),
        pytest.param(1e-3 * r, 1e-3 * s, 1, 0.5, id="both-below-eps"),
        pytest.param(torch.zeros(4, 5, dtype=f64), s, 1, 1e-3, id="zero-vectors-eps>0"),
        pytest.param(mixed, s, -1, 0.01, id="mixed-rows"),
        pytest.param(r, 3 * r, 1, 1e-8, id="parallel-clamped"),
        pytest.param(r[:, None, :], s[None, :3, :], -1, 1e-8, id="outer-broadcast"),
        pytest.param(r[0], s, 1, 1e-8, id="broadcast-1d"),
        pytest.param(r[0, 0], s[0, 0], 0, 1e-8, id="0d"),
        pytest.param(30 * r, 0.05 * s, 1, 0.0, id="scaled-eps0"),
    ]


@pytest.mark.parametrize(("x1", "x2", "dim", "eps"), _regimes())
def test_gradcheck_and_gradgradcheck_every_regime(x1, x2, dim, eps):
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()

    def f(a, b):
        return cosine_similarity(a, b, dim, eps)

    assert gradcheck(f, (a, b))
    assert gradgradcheck(f, (a, b))
    # the analytic gradient is the exact reference in every regime
    out = f(a, b)
    gout = torch.linspace(-1, 2, out.numel(), dtype=f64).reshape(out.shape)
    assert_vjp_matches_reference(torch.autograd.grad(out, (a, b), gout), gout, x1, x2, dim, eps)


def test_gradcheck_eps_zero_with_zero_vector():
    # With eps = 0 the function is discontinuous at a zero vector (the spec takes
    # its gradient as 0), so finite differences are taken in the other input only.
    x1 = torch.zeros(3, 4, dtype=f64)
    x1[0] = torch.arange(1.0, 5.0)
    x2 = torch.randn(3, 4, dtype=f64, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def f(b):
        return cosine_similarity(x1, b, 1, 0.0)

    assert gradcheck(f, (x2,))
    assert gradgradcheck(f, (x2,))
    a = x1.clone().requires_grad_()
    (g1,) = torch.autograd.grad(cosine_similarity(a, x2, 1, 0.0).sum(), a, create_graph=True)
    assert torch.equal(g1[1:], torch.zeros_like(g1[1:]))
    (h,) = torch.autograd.grad(g1.sum(), a)  # second order stays finite at the zero rows
    assert torch.isfinite(h).all()


def test_gradient_below_eps_differs_from_pytorch_and_is_exact():
    x1 = torch.tensor([[1e-3, 2e-3, 1e-3]], dtype=f64, requires_grad=True)
    x2 = torch.tensor([[1.0, 0.5, 2.0]], dtype=f64)
    (ours,) = torch.autograd.grad(cosine_similarity(x1, x2, 1, 0.1).sum(), x1)
    (theirs,) = torch.autograd.grad(F.cosine_similarity(x1, x2, 1, 0.1).sum(), x1)
    # below eps the function is linear in x1: the gradient is x2 / (eps * ||x2||)
    torch.testing.assert_close(ours, x2 / (0.1 * x2.norm()), rtol=1e-14, atol=0)
    assert not torch.allclose(ours, theirs)


@given(case=cosine_inputs(torch, dtypes=("float64",), kinds=("random", "zero_rows", "scaled", "parallel"), max_side=4))
def test_autograd_matches_exact_vjp(case):
    a, b = case.x1.clone().requires_grad_(), case.x2.clone().requires_grad_()
    out = cosine_similarity(a, b, case.dim, case.eps)
    g = torch.linspace(-1, 1, out.numel(), dtype=f64).reshape(out.shape)
    got = torch.autograd.grad(out, (a, b), g, allow_unused=True)
    got = tuple(torch.zeros_like(x) if v is None else v for v, x in zip(got, (a, b), strict=True))
    assert_vjp_matches_reference(got, g, case.x1, case.x2, case.dim, case.eps)


# --------------------------------------------------------------------------- torch.func (G10)


def test_torch_func_transforms_match_reference():
    gen = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(3, 4, dtype=f64, generator=gen), torch.randn(3, 4, dtype=f64, generator=gen)
    x1[1] *= 1e-3  # a row below eps: our Jacobian is the exact one there too
    eps = 0.01

    def f(a, b):
        return cosine_similarity(a, b, 1, eps)

    jr = jacrev(f, argnums=(0, 1))(x1, x2)
    jf = jacfwd(f, argnums=(0, 1))(x1, x2)
    for u, v in zip(jr, jf, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-14)
    # rows of the Jacobian are the exact reference VJP at one-hot cotangents
    for i in range(3):
        e = torch.zeros(3, dtype=f64)
        e[i] = 1.0
        r1, r2 = reference_vjp(e.numpy(), x1.numpy(), x2.numpy(), 1, eps)
        np.testing.assert_allclose(jr[0][i].numpy(), r1, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(jr[1][i].numpy(), r2, rtol=1e-12, atol=1e-14)
    g1 = grad(lambda a: f(a, x2).sum())(x1)
    torch.testing.assert_close(g1, jr[0].sum(0))
    # Hessians: forward-over-reverse equals reverse-over-reverse
    h_fr = jacfwd(jacrev(lambda a: f(a, x2).sum()))(x1)
    h_rr = jacrev(jacrev(lambda a: f(a, x2).sum()))(x1)
    torch.testing.assert_close(h_fr, h_rr, rtol=1e-10, atol=1e-12)
    _, tangent = jvp(f, (x1, x2), (torch.ones_like(x1), torch.zeros_like(x2)))
    torch.testing.assert_close(tangent, jr[0].sum((-2, -1)))


def test_vmap_over_dims_and_inputs():
    gen = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(6, 3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    batched = vmap(cosine_similarity, in_dims=(0, None))(x1, x2)
    torch.testing.assert_close(batched, torch.stack([cosine_similarity(a, x2) for a in x1]), rtol=0, atol=0)
    batched = vmap(lambda a, b: cosine_similarity(a, b, 0), in_dims=(1, 1))(x1, x1.flip(0))
    looped = torch.stack([cosine_similarity(x1[:, i], x1.flip(0)[:, i], 0) for i in range(3)])
    torch.testing.assert_close(batched, looped, rtol=0, atol=0)
    per_sample = vmap(grad(lambda a, b: cosine_similarity(a, b, 0)))(x1[:, 0], x1[:, 1])
    ref = reference_vjp(np.ones(6), x1[:, 0].numpy(), x1[:, 1].numpy(), 1)[0]
    np.testing.assert_allclose(per_sample.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_forward_mode_autograd_dual_tensors():
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(5, 3, dtype=f64, generator=gen), torch.randn(5, 3, dtype=f64, generator=gen)
    t1 = torch.randn(5, 3, dtype=f64, generator=gen)
    with fwAD.dual_level():
        out = cosine_similarity(fwAD.make_dual(x1, t1), x2)
        tangent = fwAD.unpack_dual(out).tangent
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(F.cosine_similarity(fwAD.make_dual(x1, t1), x2)).tangent
    torch.testing.assert_close(tangent, expected, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- torch.compile (G10)


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    x1 = torch.randn(8, 6, generator=gen, requires_grad=True)
    x2 = torch.randn(8, 6, generator=gen, requires_grad=True)
    compiled = torch.compile(lambda a, b: cosine_similarity(a, b, 1, 1e-8), fullgraph=True)
    out = compiled(x1, x2)  # fullgraph=True raises on any graph break
    g1, g2 = torch.autograd.grad(out.sum(), (x1, x2))
    e1, e2 = torch.autograd.grad(cosine_similarity(x1, x2).sum(), (x1, x2))
    torch.testing.assert_close(out, cosine_similarity(x1, x2), rtol=2e-7, atol=2e-7)
    torch.testing.assert_close(g1, e1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g2, e2, rtol=1e-5, atol=1e-6)
    assert_matches_reference(out, x1, x2)


def test_compile_module_zero_vectors_and_eps_zero():
    torch._dynamo.reset()
    module = torch.compile(CosineSimilarity(dim=-1, eps=0.0), fullgraph=True)
    x1 = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1e30, 1e30]], requires_grad=True)
    x2 = torch.tensor([[1.0, 1.0], [4.0, 3.0], [1e30, 1e30]])
    out = module(x1, x2)
    (g,) = torch.autograd.grad(out.sum(), x1)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.96, 1.0]))
    assert torch.isfinite(g).all()
    assert torch.equal(g[0], torch.zeros(2))


# --------------------------------------------------------------------------- autocast


def test_autocast_cpu_keeps_input_dtype_and_accuracy():
    # polycos never computes in the autocast dtype; on CPU PyTorch keeps the
    # input dtype for cosine_similarity, and so does polycos (bit for bit).
    gen = torch.Generator().manual_seed(6)
    x1 = torch.randn(64, 4096, generator=gen, requires_grad=True)
    x2 = (x1.detach() + 1e-3 * torch.randn(64, 4096, generator=gen)).requires_grad_()
    plain = cosine_similarity(x1, x2)
    gp = torch.autograd.grad(plain.sum(), (x1, x2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = cosine_similarity(x1, x2)
        ga = torch.autograd.grad(auto.sum(), (x1, x2))
        assert F.cosine_similarity(x1, x2).dtype == auto.dtype == torch.float32
    assert torch.equal(auto, plain)
    assert all(torch.equal(u, v) for u, v in zip(ga, gp, strict=True))
    assert_matches_reference(auto, x1, x2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = cosine_similarity(x1.detach().bfloat16(), x2.detach().bfloat16())
    assert h.dtype == torch.bfloat16


@pytest.mark.gpu
def test_autocast_cuda_runs_in_float32_like_pytorch():
    x1 = torch.randn(16, 32, device="cuda", dtype=torch.float16)
    x2 = torch.randn(16, 32, device="cuda", dtype=torch.float16)
    with torch.autocast("cuda", dtype=torch.float16):
        ours, theirs = cosine_similarity(x1, x2), F.cosine_similarity(x1, x2)
    assert ours.dtype == theirs.dtype == torch.float32
    assert ours.device == x1.device
    assert_matches_reference(ours, x1.float(), x2.float())


@pytest.mark.gpu
def test_cuda_values_and_gradients():
    x1 = torch.randn(64, 300, device="cuda", requires_grad=True)
    x2 = torch.randn(64, 300, device="cuda", requires_grad=True)
    out = cosine_similarity(x1, x2)
    assert out.device == x1.device
    assert_matches_reference(out, x1, x2)
    g = torch.autograd.grad(out.sum(), (x1, x2))
    assert_vjp_matches_reference(g, torch.ones(64), x1, x2)


# --------------------------------------------------------------------------- guarantees G1-G4, G6-G8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_identical_vectors_never_exceed_one(dtype):
    x = torch.randn(2000, 33, generator=torch.Generator().manual_seed(7)).to(dtype)
    s = cosine_similarity(x, x)
    assert (s.abs() <= 1).all()
    assert (s == 1).all()


@given(case=cosine_inputs(torch, dtypes=("float16", "bfloat16", "float32", "float64")))
def test_within_one_ulp_of_exact_every_dtype(case):
    s = cosine_similarity(case.x1, case.x2, case.dim, case.eps)
    assert s.dtype == case.x1.dtype
    assert_matches_reference(s, case.x1, case.x2, case.dim, case.eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("d", [4097, 65536])
def test_long_rows_within_one_ulp(dtype, d):
    gen = torch.Generator().manual_seed(d)
    x1 = torch.randn(4, d, generator=gen, dtype=f64) + 0.5
    x2 = x1 + torch.tensor([[0.0], [1e-3], [1.0], [100.0]], dtype=f64) * torch.randn(4, d, generator=gen, dtype=f64)
    x1, x2 = x1.to(dtype), x2.to(dtype)
    assert_matches_reference(cosine_similarity(x1, x2, 1, 0.0), x1, x2, 1, 0.0)


@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1e10, 1e20, 1e30, 1e36])
def test_float32_scale_safe(scale):
    gen = torch.Generator().manual_seed(8)
    x1, x2 = torch.randn(16, 64, generator=gen), torch.randn(16, 64, generator=gen)
    s = cosine_similarity(x1, x2, 1, 0.0)
    a = (x1 * scale).requires_grad_()
    b = (x2 * scale).requires_grad_()
    scaled = cosine_similarity(a, b, 1, 0.0)
    torch.testing.assert_close(scaled, s, rtol=0, atol=2**-23)
    g = torch.autograd.grad(scaled.sum(), (a, b))
    assert all(torch.isfinite(t).all() for t in g)
    assert_vjp_matches_reference(g, torch.ones(16), a, b, 1, 0.0)


def test_half_precision_extremes():
    x = torch.tensor([[60000.0, 60000.0]], dtype=torch.float16)
    assert cosine_similarity(x, x).item() == 1.0
    y = torch.tensor([[3e38, -3e38], [1e-38, 1e-38]], dtype=torch.bfloat16)
    torch.testing.assert_close(cosine_similarity(y, y, 1, 0.0).float(), torch.ones(2))


@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_zero_vectors_give_zero_and_finite_gradients(eps):
    x1 = torch.zeros(2, 3, requires_grad=True)
    x2 = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], requires_grad=True)
    s = cosine_similarity(x1, x2, 1, eps)
    assert torch.equal(s, torch.zeros(2))
    g1, g2 = torch.autograd.grad(s.sum(), (x1, x2))
    assert torch.isfinite(g1).all()
    assert torch.isfinite(g2).all()
    if eps == 0.0:
        assert torch.equal(g1, torch.zeros(2, 3))
        assert torch.equal(g2, torch.zeros(2, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_rows_are_isolated(bad):
    gen = torch.Generator().manual_seed(9)
    x1, x2 = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    clean = cosine_similarity(x1, x2)
    x1[2, 1] = bad
    a = x1.clone().requires_grad_()
    s = cosine_similarity(a, x2)
    assert torch.isnan(s[2])
    keep = [0, 1, 3, 4]
    assert torch.equal(s[keep], clean[keep])
    (g,) = torch.autograd.grad(s.sum(), a)
    assert torch.isfinite(g[keep]).all()


@given(case=cosine_inputs(torch, dtypes=("float32", "float64")))
def test_inputs_unmodified_and_outputs_fresh(case):
    c1, c2 = case.x1.clone(), case.x2.clone()
    a, b = case.x1.requires_grad_(), case.x2.requires_grad_()
    s = cosine_similarity(a, b, case.dim, case.eps)
    outs = [s]
    if s.numel():
        outs += [t for t in torch.autograd.grad(s.sum(), (a, b), allow_unused=True) if t is not None]
    assert torch.equal(a.detach().nan_to_num(1.5), c1.nan_to_num(1.5))
    assert torch.equal(b.detach().nan_to_num(1.5), c2.nan_to_num(1.5))
    inputs = {a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}
    for out in outs:
        assert out.numel() == 0 or out.untyped_storage().data_ptr() not in inputs


def test_bitwise_repeatable():
    gen = torch.Generator().manual_seed(10)
    x1 = torch.randn(3000, 200, generator=gen, requires_grad=True)
    x2 = torch.randn(3000, 200, generator=gen, requires_grad=True)
    runs = []
    for _ in range(2):
        s = cosine_similarity(x1, x2)
        runs.append((s, *torch.autograd.grad(s.sum(), (x1, x2))))
    for u, v in zip(*runs, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("block", [1, 7, 1 << 19])
def test_cpu_blocks_match_the_generic_core(block, monkeypatch):
    # The blocked CPU kernels are the core's sums and elementwise pass, over rows.
    gen = torch.Generator().manual_seed(11)
    x1 = torch.randn(37, 9, 5, generator=gen, requires_grad=True)
    x2 = torch.randn(37, 9, 5, generator=gen, requires_grad=True)
    monkeypatch.setattr(pt, "BLOCK_ELEMENTS", block)  # the gradient's blocks
    monkeypatch.setattr(pt._array_api, "BLOCK_ELEMENTS", block)  # the forward sums' blocks
    s = cosine_similarity(x1, x2, 1)
    g = torch.autograd.grad(s.sum(), (x1, x2))
    with torch.enable_grad():  # the generic path: a graph is being recorded
        s2 = cosine_similarity(x1, x2, 1)
        g2 = torch.autograd.grad(s2.sum(), (x1, x2), create_graph=True)
    assert torch.equal(s, s2.detach())
    for u, v in zip(g, g2, strict=True):
        torch.testing.assert_close(u, v.detach(), rtol=0, atol=2e-7)
    assert_vjp_matches_reference(g, torch.ones(37, 5), x1, x2, 1)


# --------------------------------------------------------------------------- layouts, dtypes, one input


def test_non_contiguous_and_expanded_inputs():
    gen = torch.Generator().manual_seed(12)
    base = torch.randn(6, 10, generator=gen, dtype=f64)
    other = torch.randn(10, 6, generator=gen, dtype=f64)
    cases = [
        (base[:, ::2], other.T[:, ::2], 1),
        (base.T, other, 0),
        (base[0].expand(6, 10), base, 1),
        (torch.randn(6, 1, generator=gen, dtype=f64).expand(6, 10), base, 1),
    ]
    for x1, x2, dim in cases:
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        assert not x1.is_contiguous() or x1.stride()[0] == 0
        s = cosine_similarity(x1, x2, dim)
        assert_matches_reference(s, x1, x2, dim)
        g = torch.autograd.grad(cosine_similarity(a, b, dim).sum(), (a, b))
        assert_vjp_matches_reference(g, torch.ones(s.shape, dtype=f64), x1, x2, dim)
        torch.testing.assert_close(s, F.cosine_similarity(x1, x2, dim), rtol=1e-12, atol=1e-12)
    leaf = torch.randn(10, dtype=f64, generator=gen, requires_grad=True)
    g = torch.autograd.grad(cosine_similarity(leaf.expand(6, 10), base).sum(), leaf)[0]
    ref = reference_vjp(np.ones(6), leaf.detach().numpy(), base.numpy(), 1)[0]
    np.testing.assert_allclose(g.numpy(), ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("which", [0, 1])
def test_requires_grad_on_one_input_only(which):
    gen = torch.Generator().manual_seed(13)
    xs = [torch.randn(4, 3, dtype=f64, generator=gen) for _ in range(2)]
    xs[which].requires_grad_()
    s = cosine_similarity(*xs)
    s.backward(torch.ones(4, dtype=f64))
    assert xs[1 - which].grad is None
    ref = reference_vjp(np.ones(4), xs[0].detach().numpy(), xs[1].detach().numpy())[which]
    np.testing.assert_allclose(xs[which].grad.numpy(), ref, rtol=1e-12, atol=1e-14)
    assert gradcheck(lambda t: cosine_similarity(*(t if i == which else x for i, x in enumerate(xs))), (xs[which],))


def test_dtype_promotion():
    i = torch.tensor([[1, 2], [3, 4]])
    assert cosine_similarity(i, i).dtype == torch.get_default_dtype()
    assert cosine_similarity(i.bool(), i).dtype == torch.get_default_dtype()
    a = torch.randn(2, 2, requires_grad=True)
    b = torch.randn(2, 2, dtype=f64)
    s = cosine_similarity(a, b)
    assert s.dtype == f64
    (g,) = torch.autograd.grad(s.sum(), a)
    assert g.dtype == torch.float32


def test_zero_dim_and_size_zero():
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(-3.0)
    s = cosine_similarity(a, b, 0)
    assert s.shape == ()
    assert s.item() == -1.0
    assert torch.autograd.grad(s, a)[0].shape == ()
    e = cosine_similarity(torch.zeros(0, 3), torch.zeros(0, 3))
    assert e.shape == (0,)
    z = cosine_similarity(torch.zeros(2, 0), torch.zeros(2, 0))
    assert torch.equal(z, torch.zeros(2))


# --------------------------------------------------------------------------- module, routing, bad input


def test_module_mirrors_torch_module():
    m = CosineSimilarity()
    assert (m.dim, m.eps) == (torch.nn.CosineSimilarity().dim, torch.nn.CosineSimilarity().eps)
    assert repr(m) == "CosineSimilarity(dim=1, eps=1e-08)"
    assert repr(CosineSimilarity(dim=-1, eps=0.5)) == "CosineSimilarity(dim=-1, eps=0.5)"
    x1, x2 = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    m0 = CosineSimilarity(dim=0, eps=1e-6)
    torch.testing.assert_close(m0(x1, x2), torch.nn.CosineSimilarity(dim=0, eps=1e-6)(x1, x2))
    assert isinstance(m0, torch.nn.Module)
    assert list(m0.parameters()) == []


def test_polycos_routes_tensors_to_the_function():
    x1 = torch.randn(3, 4, dtype=f64, requires_grad=True)
    x2 = torch.randn(3, 4, dtype=f64, requires_grad=True)
    s = polycos.cosine_similarity(x1, x2, axis=-1)
    assert type(s) is torch.Tensor
    assert type(s.grad_fn).__name__ == "CosineSimilarityFunctionBackward"
    g = torch.linspace(-1, 1, 3, dtype=f64)
    auto = torch.autograd.grad(s, (x1, x2), g)
    v1, v2 = polycos.cosine_similarity_vjp(g, x1.detach(), x2.detach(), dim=1)
    assert torch.equal(auto[0], v1)
    assert torch.equal(auto[1], v2)
    s_plain, *res = CosineSimilarityFunction.apply(x1, x2, 1, 1e-8)
    assert torch.equal(s_plain, s)
    assert all(not r.requires_grad for r in res)
    np.testing.assert_allclose(res[0].detach().numpy()[:, 0], reference(x1, x2), rtol=1e-15, atol=1e-15)


ENTRY_POINTS = [
    pytest.param(lambda a, b, **kw: cosine_similarity(a, b, **kw), id="function"),
    pytest.param(lambda a, b, **kw: CosineSimilarity(**kw)(a, b), id="module"),
    pytest.param(lambda a, b, **kw: CosineSimilarityFunction.apply(a, b, kw.get("dim", 1), kw.get("eps", 1e-8)), id="apply"),
]


@pytest.mark.parametrize("call", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((np.ones(2), torch.ones(2)), {"dim": 0}, TypeError, "x1 must be a torch.Tensor.*numpy"),
        ((torch.ones(2), [1.0, 2.0]), {"dim": 0}, TypeError, "x2 must be a torch.Tensor.*list"),
        ((torch.ones(2, dtype=torch.complex64), torch.ones(2)), {"dim": 0}, TypeError, "x1 has complex dtype"),
        ((torch.ones(2, 3), torch.ones(4, 3)), {}, ValueError, r"x1 with shape \(2, 3\) and x2 with shape \(4, 3\)"),
        ((torch.ones(2, 3), torch.ones(2, 3)), {"dim": 2}, IndexError, r"dim=2 is out of range"),
        ((torch.ones(()), torch.ones(())), {"dim": 1}, IndexError, "dim=1"),
        ((torch.ones(2, 3), torch.ones(2, 3)), {"dim": 1.0}, TypeError, "dim must be an int"),
        ((torch.ones(2, 3), torch.ones(2, 3)), {"eps": -1.0}, ValueError, "eps=-1.0"),
        ((torch.ones(2, 3), torch.ones(2, 3)), {"eps": float("nan")}, ValueError, "eps=nan"),
        ((torch.ones(2, 3), torch.ones(2, 3)), {"eps": float("inf")}, ValueError, "eps=inf"),
    ],
)
def test_bad_input_raises_clearly(call, args, kwargs, exc, match):
    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(exc, match=match):
        call(*args, **kwargs)
    for a, c in zip(args, copies, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, c)


# --------------------------------------------------------------------------- pairwise (G9)


EPS = 0.5  # large, so a finite-difference step never moves a row across it


def _z(n=5, d=4, seed=11):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen, dtype=f64) + 1.0
    z[1] = 0.0  # a zero row
    z[2] *= 0.1 / z[2].norm()  # a row below eps: the linear regime
    return z


OUTER_SPELLINGS = [
    ("seed001 module", lambda z, y: CosineSimilarity(dim=2, eps=EPS)(z.unsqueeze(0), z.unsqueeze(1))),
    ("x[:, None] vs y[None]", lambda z, y: cosine_similarity(z[:, None, :], y[None, :, :], -1, EPS)),
    ("polycos entry, batched", lambda z, y: polycos.cosine_similarity(
        z.reshape(1, 5, 1, 4), y.reshape(1, 1, 3, 4), dim=-1, eps=EPS)),
    ("pairwise self", lambda z, y: polycos.pairwise_cosine_similarity(z, eps=EPS)),
    ("pairwise", lambda z, y: polycos.pairwise_cosine_similarity(z, y, eps=EPS)),
]


@pytest.mark.parametrize(("name", "fn"), OUTER_SPELLINGS, ids=[n for n, _ in OUTER_SPELLINGS])
def test_outer_broadcast_takes_the_matrix_path_and_is_exact(name, fn):
    z, y = _z(), _z(3, 4, seed=12)
    out = fn(z.clone().requires_grad_(), y)
    # The matrix path's autograd node, never the row-wise Function over N*M*D.
    nodes, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in nodes:
            nodes.add(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
    assert any("Pairwise" in n for n in nodes), nodes
    assert not any("CosineSimilarityFunction" in n for n in nodes), nodes
    a, b = _outer_inputs(name, z, y)
    direct = reference(a, b, -1, EPS)
    np.testing.assert_allclose(out.detach().numpy().reshape(direct.shape), direct, atol=4e-16)
    z.requires_grad_()
    assert gradcheck(lambda a: fn(a, y), (z,))
    assert gradgradcheck(lambda a: fn(a, y), (z,))


def _outer_inputs(name, z, y):
    if "self" in name or "seed001" in name:
        return z[None, :, :].numpy(), z[:, None, :].numpy()
    return z[:, None, :].numpy(), y[None, :, :].numpy()


def test_outer_broadcast_gradients_match_the_direct_definition():
    z, y = _z(), _z(3, 4, seed=12)
    g = torch.randn(5, 3, dtype=f64, generator=torch.Generator().manual_seed(3))
    a = z.clone().requires_grad_()
    b = y.clone().requires_grad_()
    out = cosine_similarity(a[:, None, :], b[None, :, :], -1, EPS)
    ga, gb = torch.autograd.grad(out, (a, b), g)
    # The exact row-wise VJP of the definition, summed over the broadcast partner.
    r1, r2 = reference_vjp(g.numpy(), z[:, None, :].numpy(), y[None, :, :].numpy(), -1, EPS)
    np.testing.assert_allclose(ga.numpy(), r1.reshape(5, 4), atol=1e-12)
    np.testing.assert_allclose(gb.numpy(), r2.reshape(3, 4), atol=1e-12)
    v1, v2 = polycos.cosine_similarity_vjp(g, z[:, None, :], y[None, :, :], dim=-1, eps=EPS)
    np.testing.assert_allclose(v1.reshape(5, 4).numpy(), ga.numpy(), atol=1e-14)
    np.testing.assert_allclose(v2.reshape(3, 4).numpy(), gb.numpy(), atol=1e-14)


def test_outer_broadcast_forward_mode_vmap_and_compile():
    z, y = _z().float(), _z(3, 4, seed=12).float()
    f = lambda a: polycos.cosine_similarity(a[:, None], y[None], dim=-1)  # noqa: E731
    torch.testing.assert_close(jacfwd(f)(z), jacrev(f)(z), atol=1e-5, rtol=1e-5)
    batched = vmap(f)(torch.stack([z, -z]))
    torch.testing.assert_close(batched[1], -f(z))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    a = z.clone().requires_grad_()
    out = compiled(a)
    out.square().sum().backward()
    b = z.clone().requires_grad_()
    f(b).square().sum().backward()
    torch.testing.assert_close(out, f(z))
    torch.testing.assert_close(a.grad, b.grad)
