"""The architecture's promises (issue 14): one route per call, one registry, no import circles.

* a public forward + backward validates its arguments once and plans the outer
  product once, on every backend;
* the registry (``polycos/_backends/__init__.py``) is the only module outside
  the backends themselves (and the per-framework public modules and the
  benchmarks' peer lists) that names array libraries;
* the modules' top-level imports form no circle; ``import polycos`` imports no
  framework;
* every backend honours the contract (``polycos._backends._base.Backend``).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cases import BACKENDS, BackendInfo

import polycos
from polycos import _backends, _outer, _validate
from polycos._backends._base import Backend

PACKAGE = Path(polycos.__file__).parent
backends = pytest.mark.parametrize("info", BACKENDS, ids=lambda b: b.name)


# --------------------------------------------------------------------------- one route per call


def _count(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    counts = {"validate": 0, "plan": 0}
    validate, plan = _validate.validate, _outer.plan
    monkeypatch.setattr(_validate, "_ROWWISE_PLANS", {})  # no shapes known yet: the long way, once

    def counting_validate(*a, **k):  # type: ignore[no-untyped-def]
        counts["validate"] += 1
        return validate(*a, **k)

    def counting_plan(*a, **k):  # type: ignore[no-untyped-def]
        counts["plan"] += 1
        return plan(*a, **k)

    monkeypatch.setattr(_validate, "validate", counting_validate)
    monkeypatch.setattr(_outer, "plan", counting_plan)
    return counts


@backends
@pytest.mark.parametrize("outer", [False, True], ids=["rowwise", "outer"])
def test_forward_and_backward_validate_and_plan_once(info: BackendInfo, outer: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    z = np.random.default_rng(0).standard_normal((4, 3))
    x1, x2 = (z[:, None, :], z[None, :, :]) if outer else (z, z[::-1].copy())
    a1, a2 = info.array(x1, "float32"), info.array(x2, "float32")
    counts = _count(monkeypatch)
    if info.autodiff:
        grads = info.grad_of(lambda a, b: polycos.cosine_similarity(a, b, dim=-1), a1, a2)
        assert grads is not None
    else:
        s, vjp = polycos.cosine_similarity_with_vjp(a1, a2, dim=-1)
        vjp(info.array(np.ones(tuple(s.shape)), "float32"))
    assert counts == {"validate": 1, "plan": 1}


def test_numpy_rowwise_shapes_are_validated_once_and_errors_still_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NumPy row-wise call repeating known shapes and ``dim`` skips the shape checks and the plan
    (the same :class:`Call`, the same bits); any other argument still gets the full checks."""
    monkeypatch.setattr(_validate, "_ROWWISE_PLANS", {})
    r = np.random.default_rng(1)
    z1, z2 = r.standard_normal((5, 1, 3)).astype(np.float32), r.standard_normal((1, 4, 3)).astype(np.float32)
    first = _validate.validate(z1, z2, 2, 1e-8)
    counts = _count(monkeypatch)
    _validate._ROWWISE_PLANS.update(
        {((5, 1, 3), (1, 4, 3), 2): (first.shape, first.axis, first.outer, first.out_shape)}
    )
    again = _validate.validate(z1.copy(), z2.copy(), 2, 1e-8)
    assert counts == {"validate": 1, "plan": 0}
    assert (again.shape, again.axis, again.outer, again.eps) == (first.shape, first.axis, first.outer, first.eps)
    assert again.out_shape == first.out_shape == (5, 4)
    assert polycos.cosine_similarity(z1, z2, 2).tobytes() == polycos.cosine_similarity(z1, z2, 2).tobytes()
    with pytest.raises(ValueError, match="eps"):
        polycos.cosine_similarity(z1, z2, 2, eps=-1.0)
    with pytest.raises(IndexError, match="dim=3"):
        polycos.cosine_similarity(z1, z2, 3)
    with pytest.raises(TypeError, match="axis"):
        polycos.cosine_similarity(z1, z2, 2, axis=2)
    mixed = polycos.cosine_similarity(z1, z2.astype(np.float64), 2)  # promoted: the full path
    assert mixed.dtype == np.float64


# --------------------------------------------------------------------------- one registry


#: Where framework names may appear: the registry, the backends, the per-framework
#: public modules, the kernels' loader (its jax.ffi helpers), the benchmarks (peers).
ALLOWED = ("_backends/", "torch.py", "jax.py", "cupy/", "_kernels/", "bench/")
FRAMEWORK = re.compile(r"\b(torch|jax|jnp|cupy|dask|array_api_strict)\b")


def test_frameworks_are_named_only_in_the_registry_and_the_backends() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(ALLOWED) or rel in ALLOWED:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node is not getattr(tree.body[0], "value", None):
                continue  # strings (docstrings, messages) may mention libraries
            elif isinstance(node, ast.Attribute | ast.Name):
                names = [node.attr if isinstance(node, ast.Attribute) else node.id]
            offenders += [f"{rel}:{node.lineno}: {n}" for n in names if FRAMEWORK.search(n)]
    assert not offenders, "frameworks named outside the registry:\n" + "\n".join(offenders)


def test_registry_entries_are_backends_with_predicates() -> None:
    names = [e.name for e in _backends.ENTRIES]
    assert len(set(names)) == len(names)
    for entry in _backends.ENTRIES:
        assert callable(entry.owns)
        assert entry.owns(object()) is False
    for name in _backends.installed():
        backend = _backends.get(name)
        assert isinstance(backend, Backend)
        assert backend.name == name
        assert _backends.get(name) is backend  # one instance per process


def test_a_new_backend_is_one_module_and_one_entry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The MLX/Paddle exercise of docs/architecture.md, done with a toy library: one module, one entry."""
    module = tmp_path / "toyarrays_backend.py"
    module.write_text(
        "from polycos._backends.array_api import ArrayAPIBackend\n"
        "class ToyBackend(ArrayAPIBackend):\n"
        "    eager = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import array_api_strict as xs

    entry = _backends.Entry("toy", lambda x: type(x).__module__.startswith("array_api_strict"),
                            "toyarrays_backend", "ToyBackend", ())
    monkeypatch.setattr(_backends, "ENTRIES", (entry, *_backends.ENTRIES))
    monkeypatch.setattr(_backends, "_instances", {})
    a = xs.asarray([[1.0, 2.0], [3.0, 4.0]])
    s = polycos.cosine_similarity(a, a[::-1, ...])
    assert type(_backends.backend_for((("a", a),))).__name__ == "ToyBackend"
    assert abs(float(s[0]) - 0.9838699100999074) < 1e-12


# --------------------------------------------------------------------------- no import circles, light import


def _top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """polycos modules imported at module level (not under TYPE_CHECKING, not inside functions).

    ``from polycos import _core`` imports the submodule ``polycos._core``;
    ``from polycos._core import forward`` imports ``polycos._core``.
    """
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("polycos")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("polycos"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            out |= subs if subs else {node.module}
    return out


def test_no_import_circles() -> None:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("").as_posix().replace("/", ".")
        modules[rel.removesuffix(".__init__")] = path
    graph = {m: {i for i in _top_level_imports(p, set(modules)) if i in modules and i != m} for m, p in modules.items()}

    def visit(m: str, stack: list[str]) -> None:
        if m in stack:
            raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(m):], m]))
        for n in graph[m]:
            visit(n, [*stack, m])

    for m in graph:
        visit(m, [])


def test_import_polycos_imports_no_framework() -> None:
    code = (
        "import sys, polycos, polycos.testing\n"
        "heavy = [m for m in ('torch', 'jax', 'cupy', 'dask', 'array_api_strict', 'scipy') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --------------------------------------------------------------------------- the contract


@backends
def test_every_backend_honours_the_contract(info: BackendInfo) -> None:
    backend = _backends.get(info.name)
    for flag in ("autodiff", "lazy", "eager"):
        assert isinstance(getattr(backend, flag), bool)
    assert isinstance(backend.native, bool)
    for method in ("forward", "vjp", "forward_with_residuals", "rowwise_forward", "rowwise_vjp",
                   "pairwise_forward", "pairwise_vjp", "accept", "promote", "to_numpy", "from_numpy"):
        assert callable(getattr(backend, method))
    a = backend.from_numpy(np.arange(6.0).reshape(2, 3), "float32")
    assert backend.owns(a)
    np.testing.assert_array_equal(backend.to_numpy(a), np.arange(6.0).reshape(2, 3))
