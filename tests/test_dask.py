"""What is specific to dask: everything stays lazy and chunk-wise, on threads and on a cluster.

Row-wise calls are one ``map_blocks`` of the NumPy backend (the CPU kernel) over
chunks that hold whole rows; pairwise calls are dask's blockwise matrix
product of normalised rows. Values and gradients are checked for dask in
``test_guarantees.py`` like every backend.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

import polycos  # noqa: E402
from polycos.testing import assert_matches_reference, assert_vjp_matches_reference  # noqa: E402


def _counted(a: np.ndarray, chunks: tuple, touched: list) -> da.Array:
    def touch(block: np.ndarray) -> np.ndarray:
        if block.size:  # dask calls it on empty arrays to learn the output type
            touched.append(block.shape)
        return block

    return da.from_array(a, chunks=chunks).map_blocks(touch, dtype=a.dtype)


def test_rowwise_is_lazy_and_chunkwise() -> None:
    touched: list = []
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((40, 6)), rng.standard_normal((40, 6))
    x, y = _counted(a, (10, 6), touched), _counted(b, (10, 6), touched)
    s = polycos.cosine_similarity(x, y)
    g1, g2 = polycos.cosine_similarity_vjp(da.ones(40, chunks=10), x, y)
    q = polycos.cosine_similarity(x, da.from_array(b[0]), dim=1)  # a broadcast query: no copy of it per row
    assert touched == [], "polycos computed a dask array eagerly"
    assert isinstance(s, da.Array)
    assert isinstance(g1, da.Array)
    assert s.numblocks == (4,)
    with dask.config.set(scheduler="threads"):
        s_np, g1_np, g2_np, q_np = dask.compute(s, g1, g2, q)
    assert max(int(np.prod(t)) for t in touched) <= 60  # only input chunks were formed
    assert_matches_reference(s_np, a, b)
    assert_matches_reference(q_np, a, b[0], 1)
    assert_vjp_matches_reference((g1_np, g2_np), np.ones(40), a, b)


def test_rows_split_along_the_axis_are_rechunked_whole() -> None:
    a = np.random.default_rng(5).standard_normal((12, 9))
    x = da.from_array(a, chunks=(4, 3))  # rows cut into three chunks along dim=1
    s = polycos.cosine_similarity(x, x[::-1])
    assert s.chunks == ((4, 4, 4),)
    assert_matches_reference(s.compute(), a, a[::-1])


def test_pairwise_is_lazy_and_chunkwise() -> None:
    rng = np.random.default_rng(13)
    a = rng.standard_normal((60, 10)).astype(np.float32)
    b = rng.standard_normal((45, 10)).astype(np.float32)
    touched: list = []
    x, y = _counted(a, (20, 5), touched), _counted(b, (15, 5), touched)
    s = polycos.pairwise_cosine_similarity(x, y)
    d = polycos.cosine_similarity(x[:, None, :], y[None, :, :], dim=-1)
    g = polycos.pairwise_cosine_similarity_vjp(s, x, y)
    assert touched == []
    assert s.chunks == ((20, 20, 20), (15, 15, 15))  # one output block per pair of row blocks
    with dask.config.set(scheduler="threads"):
        s_np, d_np, g_np = dask.compute(s, d, g)
    assert max(int(np.prod(t)) for t in touched) <= 100
    assert_matches_reference(s_np, a[:, None, :], b[None, :, :], -1)
    assert_matches_reference(d_np, a[:, None, :], b[None, :, :], -1)
    want = polycos.pairwise_cosine_similarity_vjp(s_np, a, b)
    for got_, want_ in zip(g_np, want, strict=True):
        np.testing.assert_allclose(got_, want_, rtol=1e-5, atol=1e-6)


def test_pairwise_of_many_row_blocks_does_not_warn() -> None:
    """docs/pairwise.md's call: 20 row blocks give 20 x 20 blocks of S, as meant, without
    dask's PerformanceWarning ("Increasing number of chunks by factor of 20"; G13)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = da.random.standard_normal((200_000, 256), chunks=(10_000, 256)).astype("float32")
        s = polycos.pairwise_cosine_similarity(x)  # the docs' graph, not computed here
        assert s.numblocks == (20, 20)
        a = np.random.default_rng(16).standard_normal((200, 8))
        x = da.from_array(a, chunks=(10, 8))  # the same block counts, small enough to compute
        y = da.from_array(a[:150], chunks=(10, 8))
        s = polycos.pairwise_cosine_similarity(x)
        d = polycos.cosine_similarity(x[:, None, :], y[None, :, :], dim=-1)  # the outer broadcast
        (g,) = polycos.pairwise_cosine_similarity_vjp(s, x)
        g1, g2 = polycos.cosine_similarity_vjp(d, x[:, None, :], y[None, :, :], dim=-1)
        with dask.config.set(scheduler="threads"):
            top, d_np, g_np, g1_np, g2_np = dask.compute(s[:10].max(axis=1), d, g, g1, g2)
    np.testing.assert_allclose(top, 1.0)
    assert_matches_reference(d_np, a[:, None, :], a[None, :150, :], -1, ulps=(8 + 4) / 2)  # float64: (D + 4)/2
    np.testing.assert_allclose(g_np, polycos.pairwise_cosine_similarity_vjp(s.compute(), a)[0], atol=1e-13)
    assert g1_np.shape == (200, 1, 8)
    assert g2_np.shape == (1, 150, 8)


@pytest.mark.skipif(importlib.util.find_spec("distributed") is None, reason="dask.distributed not installed")
def test_two_workers() -> None:
    from distributed import Client, LocalCluster

    rng = np.random.default_rng(15)
    a, b = rng.standard_normal((30, 8)), rng.standard_normal((20, 8))
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        x, y = da.from_array(a, chunks=(10, 8)), da.from_array(b, chunks=(10, 8))
        s = polycos.pairwise_cosine_similarity(x, y)
        r = polycos.cosine_similarity(x, x[::-1])
        (gx,) = polycos.pairwise_cosine_similarity_vjp(da.ones((30, 30), chunks=10), x)
        s_np, r_np, gx_np = client.compute([s, r, gx], sync=True)
    assert_matches_reference(s_np, a[:, None, :], b[None, :, :], -1, ulps=(8 + 4) / 2)
    assert_matches_reference(r_np, a, a[::-1])
    np.testing.assert_allclose(gx_np, polycos.pairwise_cosine_similarity_vjp(np.ones((30, 30)), a)[0], atol=1e-13)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_unknown_row_counts_stay_lazy_and_match_numpy(dtype: str) -> None:
    """After boolean indexing (shape ``(nan, D)``): row-wise values and gradients, with ``grad``
    made from the result, and pairwise matrices, bit for bit NumPy's; pairwise VJPs within a few ulps."""
    y = np.random.default_rng(5).standard_normal((20, 3)).astype(dtype)
    d = da.from_array(y, chunks=5)
    sel = d[d[:, 0] > 0]
    ys, ys2 = y[y[:, 0] > 0], y[y[:, 0] > 0] * 2 + 1
    assert np.isnan(sel.shape[0])
    s = polycos.cosine_similarity(sel, sel * 2 + 1)
    g = polycos.cosine_similarity_vjp(da.ones_like(s), sel, sel * 2 + 1)
    _, vjp = polycos.cosine_similarity_with_vjp(sel, sel * 2 + 1)
    gv = vjp(s)
    s_np, *gs = dask.compute(s, *g, *gv)
    np.testing.assert_array_equal(s_np, polycos.cosine_similarity(ys, ys2))
    want = polycos.cosine_similarity_vjp(np.ones(len(ys), dtype), ys, ys2)
    want_v = polycos.cosine_similarity_vjp(s_np, ys, ys2)
    for got, w in zip(gs, [*want, *want_v], strict=True):
        np.testing.assert_array_equal(got, w)
    # pairwise: the row axis of unknown length is paired block by block
    p, q = polycos.pairwise_cosine_similarity(sel), polycos.pairwise_cosine_similarity(sel, d)
    (gp,) = polycos.pairwise_cosine_similarity_vjp(p, sel)
    gq = polycos.pairwise_cosine_similarity_vjp(q, sel, d)
    p_np, q_np, gp_np, *gq_np = dask.compute(p, q, gp, *gq)
    np.testing.assert_array_equal(p_np, polycos.pairwise_cosine_similarity(ys))
    np.testing.assert_array_equal(q_np, polycos.pairwise_cosine_similarity(ys, y))
    # The VJP's products sum over the partner rows, which dask holds in several chunks: partial
    # products added in another order than one BLAS call (equal bits on an AVX2 OpenBLAS, a few
    # ulps apart with its AVX-512 kernels)
    tiny = 8 * float(np.finfo(dtype).eps)
    np.testing.assert_allclose(gp_np, polycos.pairwise_cosine_similarity_vjp(p_np, ys)[0], rtol=tiny, atol=0)
    for got, w in zip(gq_np, polycos.pairwise_cosine_similarity_vjp(q_np, ys, y), strict=True):
        np.testing.assert_allclose(got, w, rtol=tiny, atol=tiny * float(np.abs(w).max()))
    # dim on the unknown axis: one chunk holds whole rows; several cannot be paired
    one = da.from_array(y, chunks=20)
    whole = one[one[:, 0] > 0]
    assert len(whole.chunks[0]) == 1
    np.testing.assert_array_equal(
        polycos.cosine_similarity(whole, whole * 2 + 1, dim=0).compute(), polycos.cosine_similarity(ys, ys2, dim=0)
    )
    with pytest.raises(ValueError, match=r"dim indexes axis 0, of unknown length.*compute_chunk_sizes"):
        polycos.cosine_similarity(sel, sel * 2 + 1, dim=0)
