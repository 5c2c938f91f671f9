"""What is specific to PyTorch: parity with F.cosine_similarity, and PyTorch's own machinery.

OpInfo samples through gradcheck/gradgradcheck (batched, forward mode, batched
forward mode) and composite compliance; FakeTensor and meta tensors forward
and backward; simulated CUDA; tensor subclasses (a ``__torch_dispatch__``
wrapper, DTensor); batched backward; ``torch.func``; ``torch.compile`` with
dynamic shapes; ``torch.export``; ``torch.jit.trace``. The guarantees
themselves (G1-G9, section 4) run for torch in ``test_guarantees.py``.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.array_api import make_strategies_namespace

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.autograd import gradcheck, gradgradcheck  # noqa: E402
from torch.func import grad, jacfwd, jacrev, jvp, vmap  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import polycos  # noqa: E402
from polycos._backends import torch as backend  # noqa: E402
from polycos.testing import assert_matches_reference, assert_vjp_matches_reference, reference_vjp  # noqa: E402
from polycos.torch import CosineSimilarity, CosineSimilarityFunction, cosine_similarity  # noqa: E402

xps = make_strategies_namespace(np)
f64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _OpNames(TorchDispatchMode):
    """Records the name of every operator dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------- parity with PyTorch


@st.composite
def regular_case(draw: st.DrawFn, max_dims: int = 3, max_side: int = 5) -> tuple:
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
    return torch.from_numpy(x1), torch.from_numpy(x2), dim, eps


def _grads(fn, x1, x2, g):  # type: ignore[no-untyped-def]
    a1, a2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    out = fn(a1, a2)
    g1, g2 = torch.autograd.grad(out, (a1, a2), g)
    return out.detach(), g1, g2


def _scales(x1, x2, dim, g):  # type: ignore[no-untyped-def]
    """Per gradient, the size of the terms each entry sums (``2|g|/||x||`` per broadcast copy)."""
    shape = torch.broadcast_shapes(x1.shape, x2.shape)
    out = []
    for x in (x1, x2):
        n = torch.linalg.vector_norm(x.double().broadcast_to(shape), dim=dim)
        copies = max(1, math.prod(shape) // max(x.numel(), 1))
        out.append(max(1.0, float(2 * g.abs().max() * copies / n.min())))
    return out


@given(case=regular_case(), seed=st.integers(0, 2**31 - 1))
def test_parity_with_torch_values_and_gradients(case: tuple, seed: int) -> None:
    x1, x2, dim, eps = case
    g = torch.randn(F.cosine_similarity(x1, x2, dim, eps).shape, dtype=f64, generator=_gen(seed))
    ours = _grads(lambda a, b: cosine_similarity(a, b, dim, eps), x1, x2, g)
    theirs = _grads(lambda a, b: F.cosine_similarity(a, b, dim, eps), x1, x2, g)
    for u, v, scale in zip(ours, theirs, (1.0, *_scales(x1, x2, dim, g)), strict=True):
        assert u.shape == v.shape
        assert u.dtype == v.dtype
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12 * scale)


def test_gradient_below_eps_differs_from_pytorch_and_is_exact() -> None:
    x1 = torch.tensor([[1e-3, 2e-3, 1e-3]], dtype=f64, requires_grad=True)
    x2 = torch.tensor([[1.0, 0.5, 2.0]], dtype=f64)
    (ours,) = torch.autograd.grad(cosine_similarity(x1, x2, 1, 0.1).sum(), x1)
    (theirs,) = torch.autograd.grad(F.cosine_similarity(x1, x2, 1, 0.1).sum(), x1)
    # below eps the function is linear in x1: the gradient is x2 / (eps * ||x2||)
    torch.testing.assert_close(ours, x2 / (0.1 * x2.norm()), rtol=1e-14, atol=0)
    assert not torch.allclose(ours, theirs)


# --------------------------------------------------------------------------- OpInfo samples


def _opinfo():  # type: ignore[no-untyped-def]
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == "nn.functional.cosine_similarity"]
    return op


def _samples(dtype: torch.dtype, requires_grad: bool = True) -> list:
    samples = list(_opinfo().sample_inputs("cpu", dtype, requires_grad=requires_grad))
    assert len(samples) >= 5
    return samples


def _fn(sample):  # type: ignore[no-untyped-def]
    dim, eps = sample.kwargs.get("dim", 1), sample.kwargs.get("eps", 1e-8)
    return (lambda a, b: cosine_similarity(a, b, dim, eps)), dim, eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_opinfo_samples_match_torch_and_the_exact_value(dtype: torch.dtype) -> None:
    for sample in _samples(dtype):
        x1, (x2,) = sample.input, sample.args
        f, dim, eps = _fn(sample)
        ours, theirs = f(x1, x2), F.cosine_similarity(x1, x2, dim, eps)
        assert ours.dtype == theirs.dtype
        assert ours.shape == theirs.shape
        assert_matches_reference(ours, x1, x2, dim, eps)
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(ours, theirs, rtol=4e-6, atol=4e-6)


def test_opinfo_samples_gradcheck_batched_and_forward_mode() -> None:
    """PyTorch's own checks, as its test_ops_gradients runs them for this op."""
    for sample in _samples(f64):
        f, _, _ = _fn(sample)
        args = (sample.input, *sample.args)
        assert gradcheck(f, args, check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True)
        # fast mode (random projections), as PyTorch's own gradgrad tests run for most ops
        assert gradgradcheck(f, args, check_batched_grad=True, check_fwd_over_rev=True, fast_mode=True)


def test_opinfo_samples_composite_compliance() -> None:
    """A ``__torch_dispatch__`` wrapper subclass (the pattern of DTensor) through every path."""
    from torch.testing._internal import composite_compliance as cc

    def eq(a, b, **kw):  # type: ignore[no-untyped-def]
        torch.testing.assert_close(a, b, **kw)

    for sample in _samples(f64):
        f, _, _ = _fn(sample)
        args = (sample.input, *sample.args)
        cc.check_with_mode(f, args, {}, eq)
        cc.check_all_permutations(f, args, {}, eq)
        cc.check_backward_formula(f, args, {}, assert_equal_fn=eq)
        cc.check_forward_ad_formula(f, args, {}, assert_equal_fn=eq)


# --------------------------------------------------------------------------- every regime (G5)


def _regimes() -> list:
    r = torch.randn(4, 5, dtype=f64, generator=_gen(0))
    s = torch.randn(4, 5, dtype=f64, generator=_gen(1))
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
        pytest.param(r[None, :2, :3], s[:2, None, :3], -1, 1e-8, id="outer-broadcast-(1,2,3)x(2,1,3)"),
        pytest.param(r[0], s, 1, 1e-8, id="broadcast-1d"),
        pytest.param(r[0, 0], s[0, 0], 0, 1e-8, id="0d"),
        pytest.param(30 * r, 0.05 * s, 1, 0.0, id="scaled-eps0"),
    ]


@pytest.mark.parametrize(("x1", "x2", "dim", "eps"), _regimes())
def test_gradcheck_every_regime(x1: torch.Tensor, x2: torch.Tensor, dim: int, eps: float) -> None:
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()

    def f(a, b):  # type: ignore[no-untyped-def]
        return cosine_similarity(a, b, dim, eps)

    assert gradcheck(f, (a, b), check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True)
    assert gradgradcheck(f, (a, b), check_batched_grad=True)
    out = f(a, b)
    gout = torch.linspace(-1, 2, out.numel(), dtype=f64).reshape(out.shape)
    assert_vjp_matches_reference(torch.autograd.grad(out, (a, b), gout), gout, x1, x2, dim, eps)


def test_eps_zero_at_a_zero_vector_second_order_stays_finite() -> None:
    x1 = torch.zeros(3, 4, dtype=f64)
    x1[0] = torch.arange(1.0, 5.0)
    x2 = torch.randn(3, 4, dtype=f64, generator=_gen(1), requires_grad=True)
    assert gradcheck(lambda b: cosine_similarity(x1, b, 1, 0.0), (x2,))
    assert gradgradcheck(lambda b: cosine_similarity(x1, b, 1, 0.0), (x2,))
    a = x1.clone().requires_grad_()
    (g1,) = torch.autograd.grad(cosine_similarity(a, x2, 1, 0.0).sum(), a, create_graph=True)
    assert torch.equal(g1[1:], torch.zeros_like(g1[1:]))
    (h,) = torch.autograd.grad(g1.sum(), a)
    assert torch.isfinite(h).all()


def test_float64_subnormal_rows_with_eps_zero() -> None:
    """``0 / tensor(2e-310)`` was NaN on the torch path; the value is 1 and the gradient finite."""
    x = torch.tensor([[2e-310, 1e-310]], dtype=f64, requires_grad=True)
    s = cosine_similarity(x, x.detach(), eps=0.0)
    assert s.item() == 1.0
    (g,) = torch.autograd.grad(s.sum(), x)
    assert torch.isfinite(g).all()
    with torch.no_grad():  # the core in torch ops (a subclass or a transform) agrees
        out, _ = backend.core_forward(x.detach(), x.detach(), 1, 0.0)
    assert out.item() == 1.0


# --------------------------------------------------------------------------- batched backward, torch.func (G10, G11)


def test_batched_backward_jacobian_and_is_grads_batched() -> None:
    x = torch.randn(6, 5, dtype=f64, generator=_gen(2), requires_grad=True)
    y = torch.randn(6, 5, dtype=f64, generator=_gen(3))
    jac = torch.autograd.functional.jacobian(lambda t: cosine_similarity(t, y), x, vectorize=True)
    loop = torch.autograd.functional.jacobian(lambda t: F.cosine_similarity(t, y), x)
    torch.testing.assert_close(jac, loop)
    s = cosine_similarity(x, y)
    (gb,) = torch.autograd.grad(s, x, torch.eye(6, dtype=f64), is_grads_batched=True)
    torch.testing.assert_close(gb, jac)


def test_torch_func_transforms_match_the_exact_jacobian() -> None:
    x1, x2 = torch.randn(3, 4, dtype=f64, generator=_gen(2)), torch.randn(3, 4, dtype=f64, generator=_gen(3))
    x1[1] *= 1e-3  # a row below eps: the Jacobian is the exact one there too
    eps = 0.01

    def f(a, b):  # type: ignore[no-untyped-def]
        return cosine_similarity(a, b, 1, eps)

    jr = jacrev(f, argnums=(0, 1))(x1, x2)
    jf = jacfwd(f, argnums=(0, 1))(x1, x2)
    for u, v in zip(jr, jf, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12 / eps)  # entries of the row below eps are ~1/eps
    for i in range(3):
        e = np.zeros(3)
        e[i] = 1.0
        r1, r2 = reference_vjp(e, x1.numpy(), x2.numpy(), 1, eps)
        np.testing.assert_allclose(jr[0][i].numpy(), r1, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(jr[1][i].numpy(), r2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad(lambda a: f(a, x2).sum())(x1), jr[0].sum(0))
    h_fr = jacfwd(jacrev(lambda a: f(a, x2).sum()))(x1)
    h_rr = jacrev(jacrev(lambda a: f(a, x2).sum()))(x1)
    torch.testing.assert_close(h_fr, h_rr, rtol=1e-10, atol=1e-12 / eps**2)  # second derivatives ~1/eps^2 there
    _, tangent = jvp(f, (x1, x2), (torch.ones_like(x1), torch.zeros_like(x2)))
    torch.testing.assert_close(tangent, jr[0].sum((-2, -1)))


def test_vmap_over_inputs_and_dims() -> None:
    x1, x2 = torch.randn(6, 3, 4, generator=_gen(3)), torch.randn(3, 4, generator=_gen(4))
    batched = vmap(cosine_similarity, in_dims=(0, None))(x1, x2)
    torch.testing.assert_close(batched, torch.stack([cosine_similarity(a, x2) for a in x1]), rtol=0, atol=2e-7)
    batched = vmap(lambda a, b: cosine_similarity(a, b, 0), in_dims=(1, 1))(x1, x1.flip(0))
    looped = torch.stack([cosine_similarity(x1[:, i], x1.flip(0)[:, i], 0) for i in range(3)])
    torch.testing.assert_close(batched, looped, rtol=0, atol=2e-7)


# --------------------------------------------------------------------------- FakeTensor, meta, simulated CUDA (G11, G12)


def test_fake_tensors_and_meta_forward_and_backward() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.randn(4, 8, requires_grad=True)
        s = cosine_similarity(a, a.flip(0))
        s.sum().backward()
        assert s.shape == (4,)
        assert a.grad.shape == (4, 8)
        p = polycos.pairwise_cosine_similarity(a)
        assert p.shape == (4, 4)
    m = torch.randn(4, 8, device="meta", requires_grad=True)
    s = cosine_similarity(m, m.flip(0))
    s.sum().backward()
    assert s.device.type == "meta"
    assert m.grad.device.type == "meta"
    (g,) = torch.autograd.grad(polycos.cosine_similarity(m.unsqueeze(0), m.unsqueeze(1), dim=2).sum(), m)
    assert g.device.type == "meta"
    assert g.shape == m.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_simulated_cuda_every_helper_on_the_device(dtype: torch.dtype) -> None:
    """CUDA correctness without a GPU: fake CUDA tensors through the operators and the core."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.randn(4, 8, device="cuda", dtype=dtype)
        b = torch.randn(8, device="cuda", dtype=dtype)
        assert cosine_similarity(a, b).device.type == "cuda"
        assert polycos.cosine_similarity(a.unsqueeze(0), a.unsqueeze(1), dim=2).device.type == "cuda"
        for eps in (1e-8, 0.0):
            out, res = backend.core_forward(a, b, 1, eps)  # what runs without CuPy, and for subclasses
            g = torch.ones(4, device="cuda", dtype=dtype)
            d = backend.core_backward(g, a, b, res, 1, eps)
            d0 = backend.core_backward(g, a, b, None, 1, eps)
            assert all(t.device.type == "cuda" for t in (out, res, *d, *d0))
            out, res = torch.ops.polycos.cosine_forward(a, b, 1, eps)
            d = torch.ops.polycos.cosine_backward(g, a, b, res, 1, eps)
            assert all(t.device.type == "cuda" for t in (out, res, *d))


def test_dtensor_inputs() -> None:
    """DTensor (sharded and replicated) in a one-process gloo group: a subprocess keeps it isolated."""
    script = textwrap.dedent(
        """
        import torch, torch.distributed as dist, polycos
        from torch.distributed.tensor import DeviceMesh, distribute_tensor, Shard, Replicate, DTensor
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
        mesh = DeviceMesh("cpu", [0])
        x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
        for pl in ([Shard(0)], [Replicate()]):
            a = distribute_tensor(x, mesh, pl).requires_grad_()
            b = distribute_tensor(y, mesh, pl)
            s = polycos.cosine_similarity(a, b)
            assert isinstance(s, DTensor), type(s)
            s.sum().backward()
            assert isinstance(a.grad, DTensor)
            torch.testing.assert_close(s.full_tensor(), torch.nn.functional.cosine_similarity(x, y))
            xr = x.clone().requires_grad_()
            torch.nn.functional.cosine_similarity(xr, y).sum().backward()
            torch.testing.assert_close(a.grad.full_tensor(), xr.grad)
        dist.destroy_process_group()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout


def test_negative_and_conjugate_bit_views() -> None:
    z = torch.randn(3, 4, dtype=torch.complex128, generator=_gen(5))
    neg = z.conj().imag  # a float64 view with the negative bit set
    assert neg.is_neg()
    torch.testing.assert_close(cosine_similarity(neg, z.real), F.cosine_similarity(neg.resolve_neg(), z.real))


# --------------------------------------------------------------------------- compile, export, trace (G10, G11)


def test_compile_fullgraph_dynamic_no_graph_break_no_recompilation_storm() -> None:
    from torch._dynamo.testing import CompileCounter

    # The first polycos call of a process creates the torch backend in the registry; traced,
    # that adds one compilation (Dynamo guards on the registry). Counted here: sizes and dims.
    polycos.cosine_similarity(torch.ones(2, 3), torch.ones(2, 3))
    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True, dynamic=True)
    def loss(a, b, dim):  # type: ignore[no-untyped-def]
        return polycos.cosine_similarity(a, b, dim=dim).square().sum()

    for n in (4, 6, 9, 13):
        for dim in (1, 0):
            x = torch.randn(n, 8, requires_grad=True)
            y = torch.randn(n, 8)
            out = loss(x, y, dim)
            out.backward()
            ref = F.cosine_similarity(x.detach(), y, dim=dim).square().sum()
            torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 4 sizes and 2 dims"


def test_compile_inductor_mark_dynamic_and_outer_broadcast() -> None:
    torch._dynamo.reset()
    f = torch.compile(lambda a: cosine_similarity(a, a.flip(0)), fullgraph=True)
    for n in (16, 24):
        y = torch.randn(n, 8)
        torch._dynamo.mark_dynamic(y, 0)
        torch.testing.assert_close(f(y), F.cosine_similarity(y, y.flip(0)), rtol=1e-5, atol=1e-6)
    z = torch.randn(5, 3, requires_grad=True)
    h = torch.compile(lambda a: polycos.cosine_similarity(a[None], a[:, None], dim=2), fullgraph=True)
    s = h(z)
    s.sum().backward()
    torch.testing.assert_close(s, F.cosine_similarity(z[None], z[:, None], dim=2), rtol=1e-5, atol=1e-6)


def test_export_with_a_dynamic_batch_dim() -> None:
    from torch.export import Dim, export

    b = Dim("b")
    ep = export(CosineSimilarity(), (torch.randn(4, 8), torch.randn(4, 8)), dynamic_shapes=({0: b}, {0: b}))
    x, y = torch.randn(7, 8), torch.randn(7, 8)
    torch.testing.assert_close(ep.module()(x, y), F.cosine_similarity(x, y))
    assert any("polycos" in str(n.target) for n in ep.graph.nodes), "the polycos operator is in the graph"


def test_jit_trace_of_the_module_and_script_is_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace is deprecated upstream; tracer warnings on shapes
        traced = torch.jit.trace(CosineSimilarity(), (torch.randn(4, 8), torch.randn(4, 8)))
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(traced(x, y), F.cosine_similarity(x, y))
    with pytest.raises(Exception):  # noqa: B017, PT011 - TorchScript cannot compile Python dispatch (docs/backends/torch.md)
        torch.jit.script(CosineSimilarity())


def _spellings() -> dict:
    """Row-wise, pairwise and the outer-product broadcast: (polycos, the same in torch ops)."""
    return {
        "rowwise": (lambda a, b: cosine_similarity(a, b), lambda a, b: F.cosine_similarity(a, b)),
        "pairwise": (lambda a, b: polycos.pairwise_cosine_similarity(a, b),
                     lambda a, b: F.normalize(a, dim=-1, eps=1e-8) @ F.normalize(b, dim=-1, eps=1e-8).T),
        "outer": (lambda a, b: cosine_similarity(a[:, None], b[None], dim=-1),
                  lambda a, b: F.cosine_similarity(a[:, None], b[None], dim=-1)),
    }


@pytest.mark.parametrize("spelling", ["rowwise", "pairwise", "outer"])
def test_exported_programs_are_differentiable(spelling: str) -> None:
    """``torch.export`` records the operators, not the Functions: their own autograd formulas
    make ``ep.module()`` differentiable, with the gradients of the eager call (a Linear layer's too)."""
    from torch.export import export

    ours, theirs = _spellings()[spelling]

    class Loss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 8, dtype=f64)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return ours(self.lin(a), b)

    model = Loss()
    x, y = torch.randn(4, 8, dtype=f64, generator=_gen(31)), torch.randn(4, 8, dtype=f64, generator=_gen(32))
    ep = export(model, (x, y))
    assert any("polycos" in str(n.target) for n in ep.graph.nodes), "the polycos operator is in the graph"
    exported = ep.module()
    a = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autograd kernel was not registered" warning
        out = exported(a, y)
    g = torch.randn(out.shape, dtype=f64, generator=_gen(33))
    got = torch.autograd.grad(out, (a, *exported.parameters()), g)
    a2 = x.clone().requires_grad_()
    lin = model.lin
    want = torch.autograd.grad(theirs(lin(a2), y), (a2, lin.weight, lin.bias), g)
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def test_jit_trace_with_inputs_that_require_grad_is_differentiable() -> None:
    """The trace records the value operator whether or not its example inputs require grad (its
    sanity check reruns it without), and the traced module's gradients are F's."""
    x, y = torch.randn(4, 8, dtype=f64, requires_grad=True), torch.randn(4, 8, dtype=f64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.trace is deprecated upstream
        with_grad = torch.jit.trace(CosineSimilarity(), (x, y))
        without = torch.jit.trace(CosineSimilarity(), (x.detach(), y))
    for traced in (with_grad, without):
        assert "polycos::cosine_value" in str(traced.graph)
        a = torch.randn(6, 8, dtype=f64, generator=_gen(34), requires_grad=True)
        b = torch.randn(6, 8, dtype=f64, generator=_gen(35))
        (got,) = torch.autograd.grad(traced(a, b).sum(), a)
        (want,) = torch.autograd.grad(F.cosine_similarity(a, b).sum(), a)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_eager_calls_skip_the_operators_autograd_layer() -> None:
    """Plain eager calls run the operators below autograd: no node of the operator's own formula
    (the Function's node, or none, records them)."""
    x, y = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5)
    assert type(cosine_similarity(x, y).grad_fn).__name__ == "CosineFunctionBackward"
    assert cosine_similarity(x.detach(), y).grad_fn is None
    assert type(polycos.pairwise_cosine_similarity(x, y).grad_fn).__name__ == "PairwiseFunctionBackward"
    out = torch.ops.polycos.cosine_value(x, y, 1, 1e-8)  # called directly: its own formula
    assert "polycos_cosine_value" in type(out.grad_fn).__name__
    (got,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(got, torch.autograd.grad(F.cosine_similarity(x, y).sum(), x)[0])


@pytest.mark.parametrize("spelling", ["rowwise", "pairwise", "outer"])
def test_backward_makes_no_zero_gradients_for_the_residuals(spelling: str) -> None:
    """The Functions' residual outputs are non-differentiable and their gradients are not
    materialised: no zero tensor (``(N, 5)`` float64 row-wise, ``N x D`` float64 blocks pairwise)
    is made and filled on every backward. Gradients as F's."""
    ours, theirs = _spellings()[spelling]
    x = torch.randn(6, 8, dtype=f64, generator=_gen(47), requires_grad=True)
    y = torch.randn(6, 8, dtype=f64, generator=_gen(48))
    out = ours(x, y)
    g = torch.randn(out.shape, dtype=f64, generator=_gen(49))
    with _OpNames() as ops:
        out.backward(g)
    assert not [n for n in ops.names if "zero" in n or "fill" in n], ops.names
    (want,) = torch.autograd.grad(theirs(x, y), x, g)
    torch.testing.assert_close(x.grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spelling", ["rowwise", "pairwise", "outer"])
def test_inference_tensors_beside_trainable_ones(spelling: str) -> None:
    """Embeddings made under ``torch.inference_mode`` (a frozen encoder) against trainable ones:
    autograd cannot save inference tensors, so polycos saves a copy; gradients are F's."""
    ours, theirs = _spellings()[spelling]
    with torch.inference_mode():
        frozen = torch.randn(6, 8, dtype=f64, generator=_gen(36))
    w = torch.randn(6, 8, dtype=f64, generator=_gen(37), requires_grad=True)
    for args in ((frozen, w), (w, frozen)):
        (got,) = torch.autograd.grad(ours(*args).sum(), w)
        (want,) = torch.autograd.grad(theirs(*args).sum(), w)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert frozen.is_inference()


def test_function_apply_inside_compile_graph_breaks_and_runs() -> None:
    """``CosineSimilarityFunction.apply`` inside ``torch.compile``: Dynamo refuses a Function with a
    custom ``jvp``, so the call graph-breaks (docs/backends/torch.md) and runs eagerly, values and
    gradients right (it raised an internal Dynamo error before)."""
    torch._dynamo.reset()
    x = torch.randn(8, 5, dtype=f64, generator=_gen(38), requires_grad=True)
    y = torch.randn(8, 5, dtype=f64, generator=_gen(39))
    fn = torch.compile(lambda a, b: CosineSimilarityFunction.apply(a, b, 1, 1e-8)[0] * 2, backend="aot_eager")
    out = fn(x, y)
    torch.testing.assert_close(out, 2 * F.cosine_similarity(x, y))
    (got,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(2 * F.cosine_similarity(x, y).sum(), x)
    torch.testing.assert_close(got, want)


def test_functionalize() -> None:
    from torch.func import functionalize

    x, y = torch.randn(4, 5, generator=_gen(40)), torch.randn(4, 5, generator=_gen(41))
    for spelling, (ours, theirs) in _spellings().items():
        torch.testing.assert_close(functionalize(ours)(x, y), theirs(x, y), msg=spelling)


# --------------------------------------------------------------------------- operators, kernel, hygiene


def test_operators_are_registered_with_fake_implementations() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(3, 5)
    out, res = torch.ops.polycos.cosine_forward(x, x.flip(0), 1, 1e-8)
    assert out.shape == (3,)
    assert res.shape == (3, 5)
    assert res.dtype == torch.float64
    d1, _d2 = torch.ops.polycos.cosine_backward(torch.ones(3), x, x.flip(0), res, 1, 1e-8)
    assert d1.shape == x.shape
    torch.library.opcheck(torch.ops.polycos.cosine_forward, (x, x.flip(0), 1, 1e-8))
    torch.library.opcheck(torch.ops.polycos.cosine_backward, (torch.ones(3), x, x.flip(0), res, 1, 1e-8))
    torch.library.opcheck(torch.ops.polycos.normalize_rows, (x, 1e-8))
    torch.library.opcheck(torch.ops.polycos.cosine_value, (x, x.flip(0), 1, 1e-8))
    y = torch.randn(4, 5)
    for args in ((x, y, 1e-8), (x, None, 1e-8), (x[:, :1], y, 0.0), (torch.empty(0, 5), y, 1e-8)):
        torch.library.opcheck(torch.ops.polycos.pairwise_forward, args)
    _, h1, st1, h2, st2 = torch.ops.polycos.pairwise_forward(x, y, 1e-8)
    torch.library.opcheck(torch.ops.polycos.pairwise_backward, (torch.randn(3, 4), h1, st1, h2, st2, 1e-8))
    torch.library.opcheck(torch.ops.polycos.pairwise_backward, (torch.randn(3, 3), h1, st1, None, None, 1e-8))
    with FakeTensorMode():
        xf = torch.empty(2, 7, 5)
        o, r = torch.ops.polycos.cosine_forward(xf, xf, 1, 1e-8)
        assert o.shape == (2, 5)
        assert r.shape == (2, 5, 5)
        assert torch.ops.polycos.cosine_value(xf, xf, 1, 1e-8).shape == (2, 5)
        s, h1, st1, h2, st2 = torch.ops.polycos.pairwise_forward(xf, torch.empty(2, 3, 5), 1e-8)
        assert (s.shape, h1.shape, st1.shape, h2.shape, st2.shape) == ((2, 7, 3), (2, 7, 5), (3, 2, 7, 1),
                                                                        (2, 3, 5), (3, 2, 3, 1))


def test_value_operator_is_the_forward_value_and_is_used_without_grad() -> None:
    """Plain calls that no gradient follows take ``cosine_value`` (no residuals written): same bits."""
    x, y = torch.randn(257, 16, generator=_gen(3)), torch.randn(257, 16, generator=_gen(4))
    x[0] = 0.0
    y[1, 3] = math.nan
    value = torch.ops.polycos.cosine_value(x, y, 1, 1e-8)
    assert torch.equal(value.nan_to_num(7.0), torch.ops.polycos.cosine_forward(x, y, 1, 1e-8)[0].nan_to_num(7.0))
    with _OpNames() as ops:
        out = polycos.cosine_similarity(x, y)
    assert "polycos.cosine_value.default" in ops.names
    assert "polycos.cosine_forward.default" not in ops.names
    assert torch.equal(out.nan_to_num(7.0), value.nan_to_num(7.0))
    xr = x.clone().requires_grad_()
    with _OpNames() as ops:  # a gradient follows: the autograd path, residuals kept
        polycos.cosine_similarity(xr, y).sum().backward()
    assert "polycos.cosine_forward.default" in ops.names
    assert "polycos.cosine_value.default" not in ops.names
    assert xr.grad is not None


def test_eps_beyond_float32_range_with_bfloat16_through_autograd() -> None:
    """bfloat16 inputs with ``eps = 1e39`` (beyond their float32 accumulation) are computed in float64:
    the value, its autograd gradient and ``CosineSimilarityFunction.apply`` agree with the float64 call
    rounded once to bfloat16."""
    x = torch.tensor([[3e38, 1e38], [2.0, 5.0]], dtype=torch.bfloat16)
    y = torch.tensor([[1e38, 3e38], [1e38, -3e38]], dtype=torch.bfloat16)
    xr = x.clone().requires_grad_()
    s = polycos.cosine_similarity(xr, y, eps=1e39)
    (d,) = torch.autograd.grad(s, xr, torch.ones_like(s))
    x64, y64 = x.double().requires_grad_(), y.double()
    s64 = polycos.cosine_similarity(x64, y64, eps=1e39)
    (d64,) = torch.autograd.grad(s64, x64, torch.ones_like(s64))
    assert s.dtype == d.dtype == torch.bfloat16
    assert torch.equal(s, s64.to(torch.bfloat16))
    assert torch.equal(d, d64.to(torch.bfloat16))
    assert torch.equal(CosineSimilarityFunction.apply(x, y, 1, 1e39)[0], s.detach())
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: polycos.cosine_similarity(a, b, eps=1e39), backend="aot_eager")
    assert torch.equal(compiled(x, y), s.detach())


def _every_operator_call(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Values and gradients of calls that reach each of the six operators (eager, plain tensors)."""
    xr, z = x.clone().requires_grad_(), y[: len(y) // 2]
    out = [polycos.cosine_similarity(x, y), polycos.pairwise_cosine_similarity(x, z)]
    with torch.no_grad():  # (normalize_rows: the row-normalising operator of the pairwise VJP)
        out += polycos.pairwise_cosine_similarity_vjp(torch.ones(len(x), len(z)), x, z)
    for fn, other in ((polycos.cosine_similarity, y), (polycos.pairwise_cosine_similarity, z)):
        s = fn(xr, other)
        out += [s.detach(), *torch.autograd.grad(s, xr, torch.ones_like(s))]
    s, vjp = polycos.cosine_similarity_with_vjp(x, y)  # the backward operator from recomputed residuals
    return [*out, s, *vjp(torch.ones_like(s))]


def test_eager_calls_reach_the_implementations_directly_only_when_unobserved(monkeypatch: pytest.MonkeyPatch) -> None:
    """An eager call on plain CPU tensors calls an operator's implementation without the dispatcher
    (``_run``: 15 us a call less); under a dispatch or function mode, the profiler or ``make_fx`` every
    call goes through ``torch.ops.polycos``, where they see it. The bits are the same either way."""
    calls: list[str] = []
    for name, (impl, op) in list(backend._IMPLS.items()):
        def counted(*args: object, _op: object = op, _name: str = name) -> object:
            calls.append(_name)
            return _op(*args)  # type: ignore[operator]

        monkeypatch.setitem(backend._IMPLS, name, (impl, counted))
    x = torch.randn(33, 16, generator=_gen(61))
    y = torch.randn(33, 2, 16, generator=_gen(62))[:, 1]  # strided rows
    x[3] = 0.0
    direct = _every_operator_call(x, y)
    assert calls == []
    names = {"cosine_value", "cosine_forward", "cosine_backward", "pairwise_forward", "pairwise_backward",
             "normalize_rows"}
    observers = {"dispatch mode": _OpNames, "function mode": lambda: torch.device("cpu"),
                 "profiler": torch.profiler.profile}
    for what, observer in observers.items():
        calls.clear()
        with observer():
            through = _every_operator_call(x, y)
        assert set(calls) == names, (what, calls)
        for a, b in zip(direct, through, strict=True):
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), what
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = str(make_fx(lambda a, b: polycos.cosine_similarity(a, b), tracing_mode="real")(x, y).graph)
    assert "polycos.cosine_value" in graph


def test_eager_functions_skip_apply_argument_binding_only_outside_transforms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eagerly, the Functions are applied through the C-level ``apply`` (``_apply``: no per-call
    :func:`inspect.signature` binding, 10 us a call less); under a ``torch.func`` transform
    ``torch.autograd.Function.apply`` runs, as it must. Values and gradients are the same either way,
    also through :class:`polycos.torch.CosineSimilarityFunction`, which overrides ``apply``."""
    from polycos.torch import CosineSimilarityFunction

    calls: list[str] = []
    original = backend._FUNCTION_APPLY

    def counted(cls: type, *args: object) -> object:
        calls.append(cls.__name__)
        return original(cls, *args)

    monkeypatch.setattr(backend, "_FUNCTION_APPLY", counted)
    x = torch.randn(5, 7, dtype=torch.float64, generator=_gen(63), requires_grad=True)
    y = torch.randn(5, 7, dtype=torch.float64, generator=_gen(64), requires_grad=True)

    def loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (polycos.cosine_similarity(a, b).sum() + polycos.pairwise_cosine_similarity(a, b).sum()
                + CosineSimilarityFunction.apply(a, b, 1, 1e-8)[0].sum())

    names = {"CosineFunction", "PairwiseFunction", "CosineSimilarityFunction"}
    assert backend._BASE_APPLY is not None
    eager = torch.autograd.grad(loss(x, y), (x, y))
    assert calls == []  # every Function recorded without the public apply
    transformed = torch.func.grad(loss, argnums=(0, 1))(x.detach(), y.detach())
    assert set(calls) == names
    for a, b in zip(eager, transformed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    monkeypatch.setattr(backend, "_BASE_APPLY", None)  # a torch without the C-level apply: the public one
    calls.clear()
    assert all(torch.equal(a, b) for a, b in zip(eager, torch.autograd.grad(loss(x, y), (x, y)), strict=True))
    assert set(calls) == names


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("self_similarity", [False, True])
def test_pairwise_backward_operator_is_the_core_vjp(dtype: torch.dtype, self_similarity: bool) -> None:
    """``pairwise_backward`` (kernel row VJP) against ``_core.pairwise_vjp`` from the same residuals.

    Rows of every regime: zero, below ``eps``, huge, NaN; eps = 0, 1e-8 and a
    large eps. The kernel sums ``<h, v>`` in the accumulation dtype where the core
    sums in the product dtype: equal to a few ulp of the product dtype. Its
    fallback in torch ops (``_row_normalize_vjp``) is the core's bit for bit.
    """
    from polycos import _core

    x1 = torch.randn(9, 6, dtype=torch.float64, generator=_gen(11))
    x2 = torch.randn(7, 6, dtype=torch.float64, generator=_gen(12))
    x1[0], x1[1], x1[2] = 0.0, 1e-9, torch.finfo(dtype).max / 4
    x1[3, 2] = math.nan
    x2[0], x2[1] = 1e-3, 0.0
    x1, x2 = x1.to(dtype), x2.to(dtype)
    work, acc, rescaled = backend._PAIRWISE_DTYPES[dtype]
    tol = 8 * torch.finfo(work).eps
    for eps in (0.0, 1e-8, 0.5):
        b = None if self_similarity else x2
        s, h1, st1, h2, st2 = torch.ops.polycos.pairwise_forward(x1, b, eps)
        g = torch.randn(s.shape, dtype=torch.float64, generator=_gen(13)).to(dtype)
        d1, d2 = torch.ops.polycos.pairwise_backward(g, h1, st1, None if b is None else h2,
                                                     None if b is None else st2, eps)
        r1 = backend._row_norms(x1, h1, st1)
        r2 = None if b is None else backend._row_norms(x2, h2, st2)
        c1, c2 = _core.pairwise_vjp(backend.xp, g, x1, b, eps, (r1, r2))
        for u, v in ((d1, c1), (d2, c2)):
            if v is None:
                assert u.shape == (0,)
                continue
            assert u.dtype == v.dtype == dtype
            torch.testing.assert_close(u.double(), v.double(), rtol=tol, atol=tol * v.double().nan_to_num().abs().max(),
                                       equal_nan=True)
        # The fallback in torch ops, bit for bit the core's row VJP:
        h1w = h1.to(work)
        v = torch.randn(h1w.shape, dtype=work, generator=_gen(14))
        fallback = backend._row_normalize_vjp(v, h1w, st1, _core._eps_for(backend.xp, acc, eps), rescaled)
        torch.testing.assert_close(fallback, _core.row_normalize_vjp(backend.xp, r1, v, eps, h1w),
                                   rtol=0, atol=0, equal_nan=True)


def test_pairwise_tile_cache_survives_inference_mode() -> None:
    """The cached float64 tile made by a first call under ``torch.inference_mode`` is a normal
    tensor: later calls outside it (and under autograd) write it without error, with the same bits."""
    import threading

    out: dict[str, object] = {}

    def fresh_thread() -> None:  # a thread of its own: no tile cached yet
        try:
            a, b = torch.randn(900, 16, generator=_gen(31)), torch.randn(1100, 16, generator=_gen(32))
            with torch.inference_mode():
                s = polycos.pairwise_cosine_similarity(a, b)
            again = polycos.pairwise_cosine_similarity(a, b)
            a.requires_grad_()
            polycos.pairwise_cosine_similarity(a, b).sum().backward()
            out["same"] = torch.equal(s, again)
            out["grad"] = a.grad is not None and bool(torch.isfinite(a.grad).all())
        except Exception as e:  # reported to the test thread
            out["error"] = e

    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert "error" not in out, out.get("error")
    assert out == {"same": True, "grad": True}


@pytest.mark.parametrize("self_similarity", [False, True])
def test_pairwise_forward_operator_tiles_are_the_core_product(self_similarity: bool) -> None:
    """A float32 matrix formed in float64 blocks (``_clamped_product``) has the bits of
    ``_core.pairwise_forward``'s single product; NaN, zero and huge rows included, the last blocks short."""
    from polycos import _core

    n, m = 900, 1100
    from polycos import _kernels

    rows, cols = _kernels.product_blocks(n, n if self_similarity else m)
    assert rows < n  # blocks of rows,
    assert self_similarity or cols < m  # and of columns too
    x1 = torch.randn(n, 24, generator=_gen(21))
    x2 = torch.randn(m, 24, generator=_gen(22))
    x1[0], x1[1], x1[n - 1] = 0.0, 3e38, math.nan
    b = None if self_similarity else x2
    s = torch.ops.polycos.pairwise_forward(x1, b, 1e-8)[0]
    want = _core.pairwise_forward(backend.xp, x1, b, 1e-8)[0]
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, want, rtol=0, atol=0, equal_nan=True)


def test_pairwise_dtype_table_is_the_cores() -> None:
    from polycos import _core

    for dtype, (work, acc, rescaled) in backend._PAIRWISE_DTYPES.items():
        assert work == _core.product_dtype(backend.xp, dtype)
        assert acc == _core.accumulation_dtype(backend.xp, dtype)
        assert rescaled == _core.is_rescaled(dtype, acc)


def test_operator_path_matches_the_core_in_torch_ops() -> None:
    """The kernel (operator) and the array-API core in torch ops agree to the guarantee."""
    r = torch.randn(64, 33, dtype=torch.float32, generator=_gen(6))
    s = torch.randn(64, 33, dtype=torch.float32, generator=_gen(7))
    op_out, op_res = torch.ops.polycos.cosine_forward(r, s, 1, 1e-8)
    core_out, core_res = backend.core_forward(r, s, 1, 1e-8)
    assert (op_out - core_out).abs().max() <= 2.0**-23
    g = torch.linspace(-1, 1, 64)
    for u, v in zip(torch.ops.polycos.cosine_backward(g, r, s, op_res, 1, 1e-8),
                    backend.core_backward(g, r, s, core_res, 1, 1e-8), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7)


def test_no_numpy_warnings_and_errstate_has_no_effect() -> None:
    x = torch.tensor([[np.inf, 1.0], [1.0, 2.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            s = cosine_similarity(x, torch.ones(2, 2))
    assert torch.isnan(s[0])
    assert torch.isfinite(s[1])


def test_dtype_promotion_like_torch() -> None:
    a32, b64 = torch.randn(3, 4), torch.randn(3, 4, dtype=f64)
    for x1, x2 in ((a32, b64), (a32, torch.tensor(2.0, dtype=f64)), (a32.half(), a32.bfloat16()),
                   (torch.arange(12.0).reshape(3, 4).half(), a32)):
        assert cosine_similarity(x1, x2).dtype == F.cosine_similarity(x1, x2).dtype
    ints = torch.arange(12).reshape(3, 4)  # F.cosine_similarity refuses integers; polycos promotes them
    assert cosine_similarity(ints, ints).dtype == torch.get_default_dtype()
    for half in (torch.float16, torch.bfloat16):  # an integer or bool beside a float: torch.promote_types
        for other in (ints, ints.int(), ints > 3):
            x1 = a32.to(half)
            for pair in ((x1, other), (other, x1)):
                assert cosine_similarity(*pair).dtype == F.cosine_similarity(*pair).dtype == half
                cast = tuple(t.to(half) for t in pair)  # the same values as promoted by hand
                assert torch.equal(cosine_similarity(*pair), cosine_similarity(*cast))


def test_vjp_functions_are_differentiable_again() -> None:
    """``cosine_similarity_with_vjp``'s VJP on tensors that require grad: its gradients are
    differentiable like autograd's (the forward's residuals are constants, so a differentiable
    VJP recomputes them; reusing them gave a second derivative off by 0.8)."""
    x = torch.randn(4, 5, dtype=f64, generator=_gen(44), requires_grad=True)
    y = torch.randn(4, 5, dtype=f64, generator=_gen(45))
    g = torch.randn(4, dtype=f64, generator=_gen(46))
    (first,) = torch.autograd.grad(F.cosine_similarity(x, y), x, g, create_graph=True)
    (want,) = torch.autograd.grad(first.sum(), x)
    _, vjp = polycos.cosine_similarity_with_vjp(x, y)
    for d1, _ in (vjp(g), polycos.cosine_similarity_vjp(g, x, y)):
        torch.testing.assert_close(d1, first.detach(), rtol=1e-12, atol=1e-12)
        (got,) = torch.autograd.grad(d1.sum(), x)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # nothing to differentiate: the kernel's backward from the residuals
        d1, _ = vjp(g)
    assert d1.grad_fn is None
    torch.testing.assert_close(d1, first.detach(), rtol=1e-12, atol=1e-12)


def test_dim_as_a_0d_integer_tensor_like_torch() -> None:
    x, y = torch.randn(3, 4, generator=_gen(42)), torch.randn(3, 4, generator=_gen(43))
    for dim in (torch.tensor(0), torch.tensor(-1, dtype=torch.int32)):
        torch.testing.assert_close(cosine_similarity(x, y, dim), F.cosine_similarity(x, y, dim))
    for bad in (torch.tensor(1.0), torch.tensor(True), torch.tensor([1])):
        with pytest.raises(TypeError, match="dim must be an int"):
            cosine_similarity(x, y, bad)


def test_requires_grad_on_one_input_only_and_non_contiguous_inputs() -> None:
    base = torch.randn(6, 10, dtype=f64, generator=_gen(8))
    x1 = base[:, ::2].clone().requires_grad_()  # contiguous leaf
    x2 = base.t()[::2, :6].t()  # a strided view
    cosine_similarity(x1, x2).sum().backward()
    ref = x1.detach().clone().requires_grad_()
    F.cosine_similarity(ref, x2).sum().backward()
    torch.testing.assert_close(x1.grad, ref.grad)
    x3 = torch.randn(1, 5, dtype=f64).expand(6, 5).requires_grad_()
    assert cosine_similarity(x3, base[:, :5]).shape == (6,)


def test_module_and_function_mirror_torch() -> None:
    m = CosineSimilarity(dim=0, eps=1e-6)
    assert (m.dim, m.eps) == (0, 1e-6)
    assert repr(m) == "CosineSimilarity(dim=0, eps=1e-06)"
    x, y = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(m(x, y), torch.nn.CosineSimilarity(dim=0, eps=1e-6)(x, y))
    s, res = CosineSimilarityFunction.apply(x, y, -1, 1e-8)
    torch.testing.assert_close(s, F.cosine_similarity(x, y, -1))
    assert res.shape == (3, 5)
    with pytest.raises(IndexError, match="dim=2"):
        CosineSimilarityFunction.apply(x, y, 2, 1e-8)
    with pytest.raises(TypeError, match=r"x2 must be a torch\.Tensor"):
        cosine_similarity(x, np.ones((3, 2)))


# --------------------------------------------------------------------------- pairwise on torch


def test_pairwise_gradcheck_batched_and_forward_mode() -> None:
    a = torch.randn(4, 3, dtype=f64, generator=_gen(9), requires_grad=True)
    b = torch.randn(5, 3, dtype=f64, generator=_gen(10), requires_grad=True)
    for fn, args in ((lambda x: polycos.pairwise_cosine_similarity(x), (a,)),
                     (lambda x, y: polycos.pairwise_cosine_similarity(x, y), (a, b))):
        assert gradcheck(fn, args, check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True)
        assert gradgradcheck(fn, args)


@pytest.mark.parametrize("spelling", ["left-right", "swapped", "batched"])
def test_outer_broadcast_reshapes_inside_the_function(spelling: str) -> None:
    """An outer product whose moves are reshapes is one autograd node: the Function takes the
    caller's tensors and reshapes inside (no view nodes of polycos's own); values, first and
    second order gradients, forward mode and batched gradients as on any other route."""
    a = torch.randn(4, 3, dtype=f64, generator=_gen(21), requires_grad=True)
    b = torch.randn(5, 3, dtype=f64, generator=_gen(22), requires_grad=True)

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if spelling == "left-right":
            return polycos.cosine_similarity(x[:, None, :], y[None, :, :], dim=2)
        if spelling == "swapped":  # SimCLR's order: the product is taken as y against x
            return polycos.cosine_similarity(y[None], x[:, None], dim=-1)
        return polycos.cosine_similarity(x[None, :, None, :], y[None, None], dim=-1)  # a unit batch axis

    s = fn(a, b)
    assert type(s.grad_fn).__name__ == "PairwiseFunctionBackward"
    assert all(type(f).__name__ == "UnsqueezeBackward0" for f, _ in s.grad_fn.next_functions)
    want = F.cosine_similarity(a[:, None, :], b[None, :, :], dim=2)
    torch.testing.assert_close(s.reshape(want.shape), want, rtol=1e-13, atol=1e-15)
    assert gradcheck(fn, (a, b), check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True)
    assert gradgradcheck(fn, (a, b))
    with torch.no_grad():  # no gradient follows: the common route (no Function)
        assert fn(a, b).grad_fn is None


def test_torch_shortcut_validation_reaches_the_same_call_and_errors_still_raise() -> None:
    """Plain tensors whose shapes were validated before skip the plan (``_plain_rowwise``) and
    pairwise calls the full checks (``_plain_pairwise``): the same Call; a tensor on another
    device, a subclass, a promotion or a bad argument still takes the full path and its error."""
    from polycos import _validate

    x1, x2 = torch.randn(5, 1, 3), torch.randn(1, 4, 3)
    first = _validate.validate(x1, x2, 2, 1e-8)
    assert _validate._plain_rowwise(x1, x2, 2, 1e-8, None) is not None
    again = _validate.validate(x1.clone(), x2.clone(), 2, 1e-8)
    assert (again.shape, again.axis, again.outer, again.eps) == (first.shape, first.axis, first.outer, first.eps)
    assert _validate._plain_pairwise(x1[:, 0], x2[0], 1e-8) is not None
    meta = x2.to("meta")
    assert _validate._plain_rowwise(x1, meta, 2, 1e-8, None) is None
    assert _validate._plain_pairwise(x1[:, 0], meta[0], 1e-8) is None
    with pytest.raises(ValueError, match="same device"):
        polycos.cosine_similarity(x1, meta, 2)
    with pytest.raises(ValueError, match="same device"):
        polycos.pairwise_cosine_similarity(x1[:, 0], meta[0])
    p = torch.nn.Parameter(x1)
    assert _validate._plain_rowwise(p, x2, 2, 1e-8, None) is None  # a subclass: the full path
    with pytest.raises(ValueError, match="eps"):
        polycos.cosine_similarity(x1, x2, 2, eps=-1.0)
    with pytest.raises(IndexError, match="dim=3"):
        polycos.cosine_similarity(x1, x2, 3)
    assert polycos.cosine_similarity(x1, x2.double(), 2).dtype == torch.float64  # promoted: the full path
    s, vjp = polycos.pairwise_cosine_similarity_with_vjp(x1[:, 0], x2[0])
    assert s.shape == (5, 4)
    with pytest.raises(ValueError, match="same device"):
        vjp(torch.ones(5, 4, device="meta"))
    with pytest.raises(ValueError, match="does not broadcast"):
        vjp(torch.ones(4, 5))


@pytest.mark.slow
def test_seed001_pattern_stays_under_1_5_gb() -> None:
    """G9: SimCLR's similarity matrix by broadcasting, N = 2048, D = 128, forward and backward."""
    script = textwrap.dedent(
        """
        import torch, polycos
        from polycos.torch import CosineSimilarity
        torch.manual_seed(0)
        z = torch.randn(2048, 128, requires_grad=True)
        s = CosineSimilarity(dim=2)(z.unsqueeze(0), z.unsqueeze(1))
        assert s.shape == (2048, 2048)
        s.square().sum().backward()
        s2 = polycos.cosine_similarity(z[None], z[:, None], dim=2)
        (s2 * torch.randn(2048, 2048)).sum().backward()
        assert torch.isfinite(z.grad).all()
        with open("/proc/self/status") as f:
            print(int(next(l for l in f if l.startswith("VmHWM:")).split()[1]) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < 1.5e9, f"peak RSS {peak / 1e9:.2f} GB"


# --------------------------------------------------------------------------- CUDA (GPU only)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cuda_values_gradients_double_backward_and_compile(dtype: torch.dtype) -> None:
    x1 = torch.randn(257, 100, device="cuda", dtype=dtype, requires_grad=True)
    x2 = torch.randn(257, 100, device="cuda", dtype=dtype)
    s = cosine_similarity(x1, x2)
    assert s.device.type == "cuda"
    assert s.dtype == dtype
    assert_matches_reference(s, x1, x2)
    g = torch.linspace(-1, 1, 257, device="cuda", dtype=dtype)
    (d1,) = torch.autograd.grad(s, x1, g, create_graph=True)
    assert_vjp_matches_reference((d1, torch.zeros_like(x2)), g, x1, x2) if False else None
    (h,) = torch.autograd.grad(d1.sum(), x1)
    assert torch.isfinite(h).all()
    f = torch.compile(lambda a, b: cosine_similarity(a, b).sum(), fullgraph=True)
    torch.testing.assert_close(f(x1.detach(), x2), s.detach().sum(), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_cuda_autocast_runs_in_float32_like_pytorch() -> None:
    x1, x2 = torch.randn(8, 16, device="cuda"), torch.randn(8, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        ours, theirs = cosine_similarity(x1.half(), x2.half()), F.cosine_similarity(x1.half(), x2.half())
    assert ours.dtype == theirs.dtype


# --------------------------------------------------------------------------- higher order, compile, layout


def _plain_cosine(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """The definition in plain differentiable torch ops: autograd's derivatives of every order."""
    a, b = torch.broadcast_tensors(a, b)
    n1 = torch.linalg.vector_norm(a, dim=dim).clamp_min(eps)
    n2 = torch.linalg.vector_norm(b, dim=dim).clamp_min(eps)
    return torch.linalg.vecdot(a, b, dim=dim) / (n1 * n2)


_SECOND_ORDER_CASES = {
    # name: (shapes of x1 and x2, polycos spelling, plain spelling)
    "vector": (((4,), (4,)), lambda a, b: polycos.cosine_similarity(a, b, dim=0),
               lambda a, b: _plain_cosine(a, b, 0)),
    "rows": (((3, 4), (3, 4)), lambda a, b: cosine_similarity(a, b, dim=1),
             lambda a, b: _plain_cosine(a, b, 1)),
    "pairwise": (((3, 4), (2, 4)), lambda a, b: polycos.pairwise_cosine_similarity(a, b),
                 lambda a, b: _plain_cosine(a[:, None], b[None], -1)),
    "self-pairwise": (((3, 4), (3, 4)), lambda a, b: polycos.pairwise_cosine_similarity(a) * b.sum(),
                      lambda a, b: _plain_cosine(a[:, None], a[None], -1) * b.sum()),
    "outer, reshapes": (((3, 1, 4), (1, 2, 4)), lambda a, b: polycos.cosine_similarity(a, b, dim=-1),
                        lambda a, b: _plain_cosine(a, b, -1)),
    "outer, interleaved": (((2, 1, 3, 4), (1, 2, 1, 4)), lambda a, b: polycos.cosine_similarity(a, b, dim=-1),
                           lambda a, b: _plain_cosine(a, b, -1)),
}


@pytest.mark.parametrize("case", list(_SECOND_ORDER_CASES))
def test_second_derivatives_through_forward_mode_are_exact(case: str) -> None:
    """``jvp`` computes its tangent from the inputs, with forward AD on for the outer levels:
    every composition of jacfwd/jacrev to order two (and forward-over-forward to order three on
    the row-wise route) equals autograd through the plain definition. (Before: forward over
    forward gave zeros, reverse over forward dropped the residuals' dependence.)"""
    (s1, s2), fn, plain = _SECOND_ORDER_CASES[case]
    x1 = torch.randn(s1, dtype=f64, generator=_gen(31))
    x2 = torch.randn(s2, dtype=f64, generator=_gen(32))
    for argnums in (0, 1):
        for outer in (jacfwd, jacrev):
            for inner in (jacfwd, jacrev):
                got = outer(inner(fn, argnums=argnums), argnums=argnums)(x1, x2)
                want = outer(inner(plain, argnums=argnums), argnums=argnums)(x1, x2)
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if case == "rows":
        third = jacfwd(jacfwd(jacfwd(fn)))(x1, x2)
        torch.testing.assert_close(third, jacrev(jacrev(jacrev(plain)))(x1, x2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["vector", "rows", "pairwise", "outer, reshapes", "outer, interleaved"])
def test_forward_ad_tangents_are_differentiable(case: str) -> None:
    """``torch.autograd.forward_ad`` with reverse mode: the gradient of a dual tangent (reverse
    over forward) and the tangent of a gradient (forward over reverse), against the plain
    definition. (Before: the row-wise tangent came from the forward's residuals, constants to
    reverse mode.)"""
    from torch.autograd import forward_ad as fwad

    (s1, s2), fn, plain = _SECOND_ORDER_CASES[case]
    x1 = torch.randn(s1, dtype=f64, generator=_gen(33))
    x2 = torch.randn(s2, dtype=f64, generator=_gen(34))
    t = torch.randn(s1, dtype=f64, generator=_gen(35))

    def reverse_over_forward(f):  # type: ignore[no-untyped-def]
        a = x1.clone().requires_grad_(True)
        with fwad.dual_level():
            tangent = fwad.unpack_dual(f(fwad.make_dual(a, t), x2)).tangent
        return torch.autograd.grad(tangent.sum(), a)[0]

    def forward_over_reverse(f):  # type: ignore[no-untyped-def]
        with fwad.dual_level():
            a = fwad.make_dual(x1.clone().requires_grad_(True), t)
            (g,) = torch.autograd.grad(f(a, x2).sum(), a, create_graph=True)
            return fwad.unpack_dual(g).tangent

    for how in (reverse_over_forward, forward_over_reverse):
        torch.testing.assert_close(how(fn), how(plain), rtol=1e-10, atol=1e-12)


def test_forward_mode_composes_with_vmap() -> None:
    """``jacfwd(vmap(f))`` (the generated vmap rule's ``jvp``) and ``vmap`` of second derivatives."""
    a = torch.randn(3, 2, 4, dtype=f64, generator=_gen(36))
    b = torch.randn(3, 1, 4, dtype=f64, generator=_gen(37))
    for fn, plain in ((lambda x, y: cosine_similarity(x, y, dim=-1), lambda x, y: _plain_cosine(x, y, -1)),
                      (polycos.pairwise_cosine_similarity, lambda x, y: _plain_cosine(x[:, None], y[None], -1))):
        got = jacfwd(lambda x, fn=fn: vmap(fn)(x, b))(a)
        torch.testing.assert_close(got, jacrev(lambda x, plain=plain: vmap(plain)(x, b))(a), rtol=1e-10, atol=1e-12)
        hess = vmap(jacfwd(jacfwd(lambda x, y, fn=fn: fn(x, y).sum())))(a, b)
        want = vmap(jacrev(jacrev(lambda x, y, plain=plain: plain(x, y).sum())))(a, b)
        torch.testing.assert_close(hess, want, rtol=1e-10, atol=1e-12)


def test_compile_self_pairwise_with_requires_grad() -> None:
    """The self-similarity Function returns no output twice (its second rows are empty), which
    AOTAutograd's tracing of the Function requires. (Before: ``Placeholder node not found``.)"""
    torch._dynamo.reset()
    c = torch.compile(lambda a: polycos.pairwise_cosine_similarity(a), backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 8, requires_grad=True)
    s = c(x)
    s.sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    want = F.cosine_similarity(ref[:, None], ref[None], dim=-1)
    want.sum().backward()
    torch.testing.assert_close(s, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_compile_outer_broadcast_with_a_symbolic_dim() -> None:
    """``dynamic=True`` traces ``dim`` as a symbolic int; the outer-product plan specialises it
    (as ``F.cosine_similarity`` does) and compiles with no graph break. (Before: ``sort with
    non-constant keys`` in the plan.)"""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    c = torch.compile(lambda a, b, dim: polycos.cosine_similarity(a, b, dim=dim), backend=counter,
                      fullgraph=True, dynamic=True)
    cases = (((3, 1, 4), (1, 5, 4), -1), ((6, 1, 4), (1, 7, 4), -1), ((4, 3, 1), (4, 1, 5), 0),
             ((2, 1, 3, 4), (1, 5, 1, 4), -1))  # the last interleaves: a permuted, contiguous result
    for s1, s2, dim in cases:
        a = torch.randn(s1, requires_grad=True)
        b = torch.randn(s2)
        out = c(a, b, dim)
        out.sum().backward()
        want = F.cosine_similarity(a, b, dim=dim)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        assert out.stride() == want.stride()
    assert counter.frame_count <= 4, f"{counter.frame_count} compilations for 2 sizes, 2 dims and 2 ranks"


def test_outer_broadcast_result_is_contiguous_like_pytorchs() -> None:
    """Interleaved broadcast axes: the product's result is permuted back into a C-ordered
    result, as ``F.cosine_similarity`` (and NumPy's broadcasting) lay it out: eagerly, with
    autograd, for meta and fake tensors, and for NumPy arrays. (Before: strides (15, 1, 5).)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    s1, s2 = (2, 1, 3, 4), (1, 5, 1, 4)
    a, b = torch.randn(s1, dtype=f64, generator=_gen(38)), torch.randn(s2, dtype=f64, generator=_gen(39))
    want = F.cosine_similarity(a, b, dim=-1)
    for x in (a, a.clone().requires_grad_(True)):
        out = polycos.cosine_similarity(x, b, dim=-1)
        assert out.stride() == want.stride() == (15, 3, 1)
        torch.testing.assert_close(out.view(-1), want.view(-1), rtol=1e-13, atol=1e-15)
    meta = polycos.cosine_similarity(a.to("meta"), b.to("meta"), dim=-1)
    assert meta.stride() == (15, 3, 1)
    with FakeTensorMode():
        assert polycos.cosine_similarity(torch.randn(s1), torch.randn(s2), dim=-1).stride() == (15, 3, 1)
    n = polycos.cosine_similarity(a.numpy(), b.numpy(), axis=-1)
    assert n.flags.c_contiguous
    np.testing.assert_allclose(n, want.numpy(), rtol=1e-13, atol=1e-15)
