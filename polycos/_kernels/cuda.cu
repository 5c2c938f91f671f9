// polycos CUDA kernels: cosine similarity and its exact VJP, one pass per row.
//
// The per-row arithmetic is rows.h (shared with the CPU kernel, cpu.cpp), which
// mirrors polycos/_core.py operation by operation; this file holds only what is
// specific to the GPU: the storage types, the order in which a row's products
// are summed (a strided loop per thread, then a fixed butterfly / block
// combine), batch indexing and the kernels. Read _core.py's module docstring
// and rows.h first.
//
// * Storage T in {__half, __nv_bfloat16, float, double}; accumulation dtype A
//   as _core.accumulation_dtype: float for half/bf16, double for float and
//   double. Compensated (Dot2) sums and the precise quotient where A is T
//   (double); range rescue (rows recomputed from x / max|x|) where A cannot
//   hold every square (bfloat16, double): rows.h's flags C and R.
// * The rescue pass divides by max|x| with IEEE division (NVRTC's default
//   -prec-div=true), as the core; it runs for a reduction unit (warp or block)
//   when any of its rows needs it, and only those rows take its values.
// * No atomics, a fixed reduction tree and a launch configuration that depends
//   only on shapes and strides: bitwise repeatable (G8). Every lane of a row
//   ends with bitwise identical totals (the xor butterfly and the block
//   combine are symmetric), so all lanes use the same per-row scalars.
// * Residuals: 5 values per row in A, (s, n1s, n2s, m1, m2) (_core.Residuals;
//   scaled norms and scales, as the CPU kernel writes them).
// * 64-bit indexing throughout (rows, lengths, strides, offsets).
// * Strided rows: a row is `length` elements at element stride sd1 (sd2) from
//   an offset given by up to 4 coalesced batch dimensions (sizes z0..z3,
//   outermost first, and per-operand strides); stride 0 is a broadcast.
// * GROUP threads per row: 1 (a thread per row, for dim != last with rows
//   adjacent in memory), 8 or 32 (sub-warp / warp per row, blocks of 256
//   threads), or 256 (a block per row, for long rows).
// * Compiled with --fmad=false so that a*b - c*d rounds as in NumPy (explicit
//   fma() is used only for the error-free TwoProduct).
//
// Loaded by polycos/cupy/__init__.py with cupy.RawModule(name_expressions=...)
// and -I<this directory>; the expressions are listed by
// polycos._kernels.cuda_launch.all_name_expressions().

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "rows.h"

namespace polycos_detail {

using namespace polycos_rows;

// ------------------------------------------------------------------ dtypes

PC_HD float widen(__half v) { return __half2float(v); }
PC_HD float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
PC_HD float widen(float v) { return v; }
PC_HD double widen(double v) { return v; }

template <typename To> struct Cast;
template <> struct Cast<__half> {
    static PC_HD __half from(float x) { return __float2half_rn(x); }
};
template <> struct Cast<__nv_bfloat16> {
    static PC_HD __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};
template <> struct Cast<float> {
    static PC_HD float from(float x) { return x; }
    static PC_HD float from(double x) { return (float)x; }  // round to nearest even
};
template <> struct Cast<double> {
    static PC_HD double from(double x) { return x; }
};

// _core.accumulation_dtype (acc) and rows.h's flags: compensated (C: A is T)
// and rescaled (R: squares of T may leave A's range).
template <typename T> struct Traits;
template <> struct Traits<__half> {
    typedef float acc;
    static const bool rescale = false;
    static const bool compensated = false;
};
template <> struct Traits<__nv_bfloat16> {
    typedef float acc;
    static const bool rescale = true;
    static const bool compensated = false;
};
template <> struct Traits<float> {
    typedef double acc;
    static const bool rescale = false;
    static const bool compensated = false;
};
template <> struct Traits<double> {
    typedef double acc;
    static const bool rescale = true;
    static const bool compensated = true;
};

// ------------------------------------------------------------------ row sums

// A running sum of products: Dot2 (rows.h dot2_add with an fma TwoProduct)
// when compensated, else plain (products exact in A: 11+11, 8+8, 24+24 bits).
template <typename A, bool COMP> struct Sum {
    A hi, lo;
    PC_HD void init() { hi = A(0); lo = A(0); }
    PC_HD void add(A a, A b) {
        if (COMP) {
            A p, e;
            two_prod(a, b, p, e);
            dot2_add(hi, lo, p, e);
        } else {
            hi = hi + a * b;
        }
    }
    PC_HD void merge(const Sum& o) {  // symmetric: merge(a,b) == merge(b,a) bitwise
        if (COMP) dot2_merge(hi, lo, o.hi, o.lo);
        else hi = hi + o.hi;
    }
    // (w, l): the sum rounded and its remainder (rows.h dot2_split).
    PC_HD void split(A& w, A& l) const {
        if (COMP) dot2_split(hi, lo, w, l);
        else { w = hi; l = A(0); }
    }
};

// The three reductions of _core.dots (<x1,x2>, <x1,x1>, <x2,x2>) and, where
// rescaling may be needed, max|x1| and max|x2| (_core._row_scale, _out_of_range).
template <typename A, bool COMP> struct RowSums {
    Sum<A, COMP> d12, d11, d22;
    A m1, m2;
    PC_HD void init() { d12.init(); d11.init(); d22.init(); m1 = A(0); m2 = A(0); }
    PC_HD void add(A a, A b, bool track_max) {
        d12.add(a, b); d11.add(a, a); d22.add(b, b);
        if (track_max) { m1 = pmax(pabs(a), m1); m2 = pmax(pabs(b), m2); }
    }
    PC_HD void merge(const RowSums& o) {
        d12.merge(o.d12); d11.merge(o.d11); d22.merge(o.d22);
        m1 = pmax(m1, o.m1); m2 = pmax(m2, o.m2);
    }
};

// One row's sums over this thread's share (k = lane, lane + group, ...),
// reduced across the row's threads by `red` (every thread gets the totals),
// rescued where out of range, finished: _core's steps 1-3 for one row.
// `n` is 0 for an inactive slot (it still takes part in the reductions).
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#pragma nv_exec_check_disable
#endif
template <typename T, class Red>
PC_HD Res5<typename Traits<T>::acc> row_stats(const T* x1, const T* x2, i64 n, i64 sd1, i64 sd2, int lane,
                                              int group, Red& red, double eps_d) {
    typedef typename Traits<T>::acc A;
    const bool C = Traits<T>::compensated;
    const bool R = Traits<T>::rescale;
    RowSums<A, C> r;
    r.init();
#pragma unroll 4
    for (i64 k = lane; k < n; k += group) r.add((A)widen(x1[k * sd1]), (A)widen(x2[k * sd2]), R);
    red.reduce(r);
    A w12, w11, w22, l12, l11, l22;
    r.d12.split(w12, l12);
    r.d11.split(w11, l11);
    r.d22.split(w22, l22);
    A m1 = A(1), m2 = A(1);
    if (R) {
        const bool bad = rescue_needed(w11, w22, r.m1, r.m2);
        // The pass runs where any row of the reduction unit (warp or block)
        // needs it, so that the reductions stay convergent; only the bad rows
        // take its values (the where(bad, scaled, unscaled) of _core._row_sums).
        if (red.any(bad)) {
            const A s1 = row_scale(r.m1, (A)eps_d), s2 = row_scale(r.m2, (A)eps_d);
            RowSums<A, C> q;
            q.init();
#pragma unroll 4
            for (i64 k = lane; k < n; k += group) {
                q.add((A)widen(x1[k * sd1]) / s1, (A)widen(x2[k * sd2]) / s2, false);
            }
            red.reduce(q);
            if (bad) {
                q.d12.split(w12, l12);
                q.d11.split(w11, l11);
                q.d22.split(w22, l22);
                m1 = s1;
                m2 = s2;
            }
        }
    }
    return finish<C>(w12, w11, w22, l12, l11, l22, m1, m2, (A)eps_d);
}

// _core.grad_elementwise over this thread's share of a row.
template <typename T, typename O, bool DIV>
PC_HD void grad_row(const T* x1, const T* x2, O* d1, O* d2, i64 n, i64 sd1, i64 sd2, i64 sdx, int lane,
                    int group, const GradCoefs<typename Traits<T>::acc>& k) {
    typedef typename Traits<T>::acc A;
#pragma unroll 4
    for (i64 i = lane; i < n; i += group) {
        A g1, g2;
        grad_element<DIV>((A)widen(x1[i * sd1]), (A)widen(x2[i * sd2]), k, g1, g2);
        d1[i * sdx] = Cast<O>::from(g1);
        d2[i * sdx] = Cast<O>::from(g2);
    }
}

// ------------------------------------------------------------------ batch indexing

// Flat row index -> per-dimension index over up to 4 batch dimensions
// (outermost first, unused ones have size 1), all in 64 bits.
struct Index4 { i64 i0, i1, i2, i3; };

PC_HD Index4 unravel(i64 r, i64 z1, i64 z2, i64 z3) {
    Index4 ix;
    ix.i3 = z3 == 1 ? 0 : r % z3; r = z3 == 1 ? r : r / z3;
    ix.i2 = z2 == 1 ? 0 : r % z2; r = z2 == 1 ? r : r / z2;
    ix.i1 = z1 == 1 ? 0 : r % z1; r = z1 == 1 ? r : r / z1;
    ix.i0 = r;  // the outermost dimension takes the rest
    return ix;
}

PC_HD i64 offset(const Index4& ix, i64 s0, i64 s1, i64 s2, i64 s3) {
    return ix.i0 * s0 + ix.i1 * s1 + ix.i2 * s2 + ix.i3 * s3;
}

// ------------------------------------------------------------------ reductions

struct SerialReducer {  // one thread per row, no partners
    template <class S> PC_HD void reduce(S&) {}
    PC_HD bool any(bool b) { return b; }
};

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// GROUP <= 32: a row per GROUP consecutive lanes of a warp, xor butterfly.
// GROUP > 32: a row per block of GROUP threads; warp partials combined through
// shared memory in a fixed order by every thread.
template <int GROUP, class S> struct GroupReducer {
    S* smem;  // GROUP / 32 slots (block mode only)

    static __device__ __forceinline__ void shfl(S& o, const S& v, int mask) {
        o.d12.hi = __shfl_xor_sync(0xffffffffu, v.d12.hi, mask);
        o.d12.lo = __shfl_xor_sync(0xffffffffu, v.d12.lo, mask);
        o.d11.hi = __shfl_xor_sync(0xffffffffu, v.d11.hi, mask);
        o.d11.lo = __shfl_xor_sync(0xffffffffu, v.d11.lo, mask);
        o.d22.hi = __shfl_xor_sync(0xffffffffu, v.d22.hi, mask);
        o.d22.lo = __shfl_xor_sync(0xffffffffu, v.d22.lo, mask);
        o.m1 = __shfl_xor_sync(0xffffffffu, v.m1, mask);
        o.m2 = __shfl_xor_sync(0xffffffffu, v.m2, mask);
    }

    __device__ __forceinline__ void reduce(S& v) {
        const int width = GROUP < 32 ? GROUP : 32;
#pragma unroll
        for (int mask = width / 2; mask > 0; mask >>= 1) {
            S o;
            shfl(o, v, mask);
            v.merge(o);
        }
        if (GROUP > 32) {
            const int warp = threadIdx.x / 32;
            if ((threadIdx.x & 31) == 0) smem[warp] = v;
            __syncthreads();
            v = smem[0];
#pragma unroll
            for (int w = 1; w < (GROUP > 32 ? GROUP / 32 : 1); ++w) v.merge(smem[w]);
            __syncthreads();  // smem may be reused at once
        }
    }

    __device__ __forceinline__ bool any(bool b) {
        if (GROUP > 32) return __syncthreads_or(b) != 0;
        return __any_sync(0xffffffffu, b) != 0;
    }
};
#endif

}  // namespace polycos_detail

// ====================================================================== kernels

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

#define POLYCOS_BLOCK(GROUP) ((GROUP) > 32 ? (GROUP) : 256)
// At least 2 resident blocks per SM: up to 128 registers per thread. Without
// it ptxas squeezes some kernels to 64 registers for full occupancy on sm_75
// (1024 threads per SM) and spills around the IEEE division's slow-path call.
#define POLYCOS_MIN_BLOCKS 2

// Forward: out[row] = s (in T); with has_res, res[5 row + {0..4}] = (s, n1s,
// n2s, m1, m2) in the accumulation dtype (_core.pack_residuals' layout).
// Operand batch strides: a (x1), b (x2), o (out); all in elements.
template <typename T, int GROUP>
__global__ void __launch_bounds__(POLYCOS_BLOCK(GROUP), POLYCOS_MIN_BLOCKS)
polycos_forward(const T* __restrict__ x1, const T* __restrict__ x2, T* __restrict__ out,
                typename polycos_detail::Traits<T>::acc* __restrict__ res, int has_res,
                long long rows, long long n, long long sd1, long long sd2,
                long long z1, long long z2, long long z3,
                long long a0, long long a1, long long a2, long long a3,
                long long b0, long long b1, long long b2, long long b3,
                long long o0, long long o1, long long o2, long long o3,
                double eps) {
    using namespace polycos_detail;
    typedef typename Traits<T>::acc A;
    typedef RowSums<A, Traits<T>::compensated> S;
    const int BLOCK = POLYCOS_BLOCK(GROUP);
    const int RPB = BLOCK / GROUP;  // rows per block
    __shared__ S smem[GROUP > 32 ? GROUP / 32 : 1];
    GroupReducer<GROUP, S> red;
    red.smem = smem;
    const int lane = threadIdx.x % GROUP;
    const int slot = threadIdx.x / GROUP;
    // Block-uniform loop: every lane takes part in every reduction.
    for (i64 base = (i64)blockIdx.x * RPB; base < rows; base += (i64)gridDim.x * RPB) {
        const i64 row = base + slot;
        const bool active = row < rows;
        const Index4 ix = unravel(active ? row : 0, z1, z2, z3);
        const Res5<A> st = row_stats<T>(x1 + offset(ix, a0, a1, a2, a3), x2 + offset(ix, b0, b1, b2, b3),
                                        active ? n : 0, sd1, sd2, lane, GROUP, red, eps);
        if (active && lane == 0) {
            out[offset(ix, o0, o1, o2, o3)] = Cast<T>::from(st.s);
            if (has_res) {
                res[5 * row] = st.s;
                res[5 * row + 1] = st.n1s;
                res[5 * row + 2] = st.n2s;
                res[5 * row + 3] = st.m1;
                res[5 * row + 4] = st.m2;
            }
        }
    }
}

// Backward (VJP): dx1, dx2 (storage O: T, or A when the caller sums broadcast
// rows afterwards) from the upstream gradient g (in T) and the per-row
// residuals, recomputed (has_res == 0) or read from res (5 per row).
// Operand batch strides: a (x1), b (x2), c (g), d (dx1 and dx2); sdx is the
// element stride along the row of dx1 and dx2.
template <typename T, typename O, int GROUP>
__global__ void __launch_bounds__(POLYCOS_BLOCK(GROUP), POLYCOS_MIN_BLOCKS)
polycos_backward(const T* __restrict__ x1, const T* __restrict__ x2, const T* __restrict__ g,
                 const typename polycos_detail::Traits<T>::acc* __restrict__ res, int has_res,
                 O* __restrict__ dx1, O* __restrict__ dx2,
                 long long rows, long long n, long long sd1, long long sd2, long long sdx,
                 long long z1, long long z2, long long z3,
                 long long a0, long long a1, long long a2, long long a3,
                 long long b0, long long b1, long long b2, long long b3,
                 long long c0, long long c1, long long c2, long long c3,
                 long long d0, long long d1, long long d2, long long d3,
                 double eps) {
    using namespace polycos_detail;
    typedef typename Traits<T>::acc A;
    typedef RowSums<A, Traits<T>::compensated> S;
    const bool R = Traits<T>::rescale;
    const int BLOCK = POLYCOS_BLOCK(GROUP);
    const int RPB = BLOCK / GROUP;
    __shared__ S smem[GROUP > 32 ? GROUP / 32 : 1];
    GroupReducer<GROUP, S> red;
    red.smem = smem;
    const int lane = threadIdx.x % GROUP;
    const int slot = threadIdx.x / GROUP;
    for (i64 base = (i64)blockIdx.x * RPB; base < rows; base += (i64)gridDim.x * RPB) {
        const i64 row = base + slot;
        const bool active = row < rows;
        const i64 r = active ? row : 0;
        const Index4 ix = unravel(r, z1, z2, z3);
        const T* p1 = x1 + offset(ix, a0, a1, a2, a3);
        const T* p2 = x2 + offset(ix, b0, b1, b2, b3);
        const i64 len = active ? n : 0;
        Res5<A> st;
        if (has_res) {  // kernel-uniform branch
            st.s = res[5 * r]; st.n1s = res[5 * r + 1]; st.n2s = res[5 * r + 2];
            st.m1 = res[5 * r + 3]; st.m2 = res[5 * r + 4];
        } else {
            st = row_stats<T>(p1, p2, len, sd1, sd2, lane, GROUP, red, eps);
        }
        const A gv = active ? (A)widen(g[offset(ix, c0, c1, c2, c3)]) : A(0);
        const GradCoefs<A> k = grad_coefficients<R>(gv, st, (A)eps);
        const i64 od = offset(ix, d0, d1, d2, d3);
        if (R && (k.m1 != A(1) || k.m2 != A(1)))
            grad_row<T, O, true>(p1, p2, dx1 + od, dx2 + od, len, sd1, sd2, sdx, lane, GROUP, k);
        else
            grad_row<T, O, false>(p1, p2, dx1 + od, dx2 + od, len, sd1, sd2, sdx, lane, GROUP, k);
    }
}

#endif  // kernels
