// polycos CUDA kernels: cosine similarity and its exact VJP, one pass per row.
//
// The math mirrors polycos/_core.py line by line (the same formulas, the same
// rounding sequence for the per-row scalars and the gradient's elementwise
// pass); only the order in which a row's products are summed differs (a
// strided loop per thread, then a fixed tree). Each function below names the
// _core.py function it mirrors. Read _core.py's module docstring first.
//
// * Storage T in {__half, __nv_bfloat16, float, double}; accumulation dtype A
//   as _core.accumulation_dtype: float for half/bf16, double for float
//   (products of float32 are exact in double, and the sum's rounding is far
//   below float32's ulp for any D: G2 with margin; float64 also holds the
//   square of every finite float32, so no rescaling: _core.needs_rescaling),
//   double for double with Ogita-Rump-Oishi Dot2 compensation (TwoSum +
//   fma-based TwoProduct) and the core's first-order correction of s.
//   On GPUs with slow float64 the float32 kernels still stream at memory
//   bandwidth: three float64 FMAs per 8 bytes read.
// * Range (G3): where A cannot hold every square (bf16 in float, double in
//   double) the first pass also reduces max|x|; a row whose sum of squares is
//   out of range (_core._out_of_range) is recomputed from x / max|x|, decided
//   on the device per row (_core._stats, the `eager` branch: only offending
//   rows take the rescaled values).
// * G1 clamp keeping NaN, G4 0/0 -> 0 only where the denominator is 0, G6
//   NaN rows stay NaN in their own element: as _core._clamp_unit, _safe_divide.
// * No atomics, a fixed reduction tree and a launch configuration that depends
//   only on shapes and strides: bitwise repeatable (G8). Every lane of a row
//   ends with bitwise identical totals (the xor butterfly and the block
//   combine are symmetric), so all lanes use the same per-row scalars.
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
// Loaded by polycos/cupy/__init__.py with cupy.RawModule(name_expressions=...);
// the expressions are listed by polycos.cupy._launch.all_name_expressions().

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define PC_HD __host__ __device__ __forceinline__

namespace polycos_detail {

typedef long long i64;

// ------------------------------------------------------------------ scalar helpers

PC_HD float pabs(float x) { return fabsf(x); }
PC_HD double pabs(double x) { return fabs(x); }
PC_HD float psqrt(float x) { return sqrtf(x); }   // IEEE correctly rounded (-prec-sqrt=true)
PC_HD double psqrt(double x) { return sqrt(x); }
PC_HD float pfma(float a, float b, float c) { return fmaf(a, b, c); }
PC_HD double pfma(double a, double b, double c) { return fma(a, b, c); }

// 1 / x, correctly rounded (the intrinsics avoid the division's slow-path call).
PC_HD float recip(float x) {
#ifdef __CUDA_ARCH__
    return __frcp_rn(x);
#else
    return 1.0f / x;
#endif
}
PC_HD double recip(double x) {
#ifdef __CUDA_ARCH__
    return __drcp_rn(x);
#else
    return 1.0 / x;
#endif
}

// NaN-propagating maximum, as xp.maximum / xp.max (CUDA's fmax drops NaN).
template <typename A> PC_HD A pmax(A a, A b) { return (a != a || a > b) ? a : b; }

// _core._safe_divide: num / den with 0 where den == 0 (NaN still propagates).
template <typename A> PC_HD A safe_div(A num, A den) { return den == A(0) ? A(0) : num / den; }

// _core._clamp_unit: clamp to [-1, 1] keeping NaN.
template <typename A> PC_HD A clamp_unit(A s) {
    s = s > A(1) ? A(1) : s;
    return s < A(-1) ? A(-1) : s;
}

template <typename A> struct Lim;
template <> struct Lim<float> {
    static PC_HD float max() { return 3.40282346638528859812e+38f; }
    static PC_HD float tiny() { return 1.17549435082228750797e-38f; }  // 2^-126
};
template <> struct Lim<double> {
    static PC_HD double max() { return 1.79769313486231570815e+308; }
    static PC_HD double tiny() { return 2.22507385850720138309e-308; }  // 2^-1022
};

// x -> x / m for the rescaling pass (_core._scale's a / m). A true division
// calls a slow-path subroutine whose calling convention spills registers in
// the loop; instead: Markstein's correction of x * (1/m) by its residual. The
// correctly rounded quotient whenever the residual x - q m is exact (x and x/m
// normal, |x| >= 2^(emin+p)); otherwise within one ulp of it, far below the
// rounding of the sums it feeds. One deviation from the core: a subnormal m
// (a row whose largest entry is subnormal) is replaced by the smallest normal
// number, so that 1/m stays finite: an exact power-of-two scaling, and s and
// n = n_scaled * m are the same. Non-finite x gives NaN (the row is NaN anyway).
// tests/test_cupy_kernels.py checks these regimes.
template <typename A> struct Scaler {
    A m, r;
    PC_HD void init(A mx) {
        m = mx < Lim<A>::tiny() ? Lim<A>::tiny() : mx;
        r = recip(m);
    }
    PC_HD A div(A x) const {
        const A q = x * r;
        return pfma(pfma(-q, m, x), r, q);
    }
};



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
    static PC_HD double from(float x) { return (double)x; }
};

// _core.accumulation_dtype (acc), _core.work_dtype (work), _core.needs_rescaling
// (rescale), and "nothing wider to accumulate in" (compensated).
template <typename T> struct Traits;
template <> struct Traits<__half> {
    typedef float acc; typedef float work;
    static const bool rescale = false; static const bool compensated = false;
};
template <> struct Traits<__nv_bfloat16> {
    typedef float acc; typedef float work;
    static const bool rescale = true; static const bool compensated = false;
};
template <> struct Traits<float> {
    typedef double acc; typedef float work;
    static const bool rescale = false; static const bool compensated = false;
};
template <> struct Traits<double> {
    typedef double acc; typedef double work;
    static const bool rescale = true; static const bool compensated = true;
};

// ------------------------------------------------------------------ row sums

// A running sum of products. COMP: Ogita-Rump-Oishi Dot2 (as _core.accurate_dot):
// TwoProduct by fma, TwoSum into hi, the errors collected in lo. Otherwise the
// products are exact in A (11+11, 8+8 and 24+24 significand bits) and summed.
template <typename A, bool COMP> struct Sum {
    A hi, lo;
    PC_HD void init() { hi = A(0); lo = A(0); }
    PC_HD void add(A a, A b) {
        if (COMP) {
            const A p = a * b;
            const A e = pfma(a, b, -p);           // a*b == p + e exactly
            const A t = hi + p;                   // TwoSum(hi, p)
            const A bb = t - hi;
            const A err = (hi - (t - bb)) + (p - bb);
            hi = t;
            lo = lo + (err + e);
        } else {
            hi = hi + a * b;
        }
    }
    PC_HD void merge(const Sum& o) {              // symmetric: merge(a,b) == merge(b,a) bitwise
        if (COMP) {
            const A t = hi + o.hi;
            const A bb = t - hi;
            const A err = (hi - (t - bb)) + (o.hi - bb);
            hi = t;
            lo = (lo + o.lo) + err;
        } else {
            hi = hi + o.hi;
        }
    }
    // (w, l): the sum rounded and its remainder, as _core.accurate_dot's Fast2Sum.
    PC_HD void split(A& w, A& l) const {
        if (COMP) { w = hi + lo; l = lo - (w - hi); } else { w = hi; l = A(0); }
    }
};

// The three reductions of _core.dots (<x1,x2>, <x1,x1>, <x2,x2>) and, where
// rescaling may be needed, max|x1| and max|x2| (_core._scale, _out_of_range).
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

template <typename A> struct Stats { A s, n1, n2; };  // _core.Residuals (one row)

// ------------------------------------------------------------------ per-row formulas

// The tail of _core._stats: from the sums (and remainders) in scaled units
// with scales m1, m2 to (s, n1, n2).
template <typename A, bool COMP>
PC_HD Stats<A> finish(A w12, A w11, A w22, A l12, A l11, A l22, A m1, A m2, A eps) {
    const A n1s = psqrt(w11), n2s = psqrt(w22);
    const A e1 = eps / m1, e2 = eps / m2;         // max(n*m, eps)/m == max(n, eps/m)
    const bool above1 = n1s > e1, above2 = n2s > e2;
    // Above eps: sqrt(w11 * w22), one rounding and s(x, x) == 1 exactly.
    const A den = (above1 && above2) ? psqrt(w11 * w22) : pmax(n1s, e1) * pmax(n2s, e2);
    A s = safe_div(w12, den);
    if (COMP && above1 && above2) {
        // _core._precise_quotient: the product, root and quotient roundings
        // recovered exactly and folded into one correction; s rounds once.
        const A p = w11 * w22, pe = pfma(w11, w22, -p);
        A r = psqrt(p);
        r = r > A(0) ? r : A(1);
        const A rr = r * r, rre = pfma(r, r, -rr);
        const A dr = (((p - rr) - rre) + pe + (w11 * l22 + w22 * l11)) / (A(2) * r);
        const A q = w12 / r;
        const A qr = q * r, qre = pfma(q, r, -qr);
        s = q + (((w12 - qr) - qre) + l12 - q * dr) / r;
    } else if (COMP) {
        const A rel = (above1 ? safe_div(l11, A(2) * w11) : A(0))
                    + (above2 ? safe_div(l22, A(2) * w22) : A(0));
        s = s + (safe_div(l12, den) - s * rel);
    }
    Stats<A> st;
    st.s = clamp_unit(s);
    st.n1 = n1s * m1;
    st.n2 = n2s * m2;
    return st;
}

// _core.grad_coefficients (one row): computed in A, used in the work dtype W.
template <typename W> struct Coefs { W u1, u2, p1, p2, q1, q2; };

template <typename W, typename A>
PC_HD Coefs<W> coefficients(A g, const Stats<A>& st, A eps) {
    const A c1 = pmax(st.n1, eps), c2 = pmax(st.n2, eps);
    const A p1 = safe_div(A(1), c1), p2 = safe_div(A(1), c2);
    const A q1 = st.n1 > eps ? safe_div(st.s, st.n1) : A(0);
    const A q2 = st.n2 > eps ? safe_div(st.s, st.n2) : A(0);
    Coefs<W> k;
    k.u1 = Cast<W>::from(g * p1); k.u2 = Cast<W>::from(g * p2);
    k.p1 = Cast<W>::from(p1); k.p2 = Cast<W>::from(p2);
    k.q1 = Cast<W>::from(q1); k.q2 = Cast<W>::from(q2);
    return k;
}

// One row's sums, over this thread's share (k = lane, lane + group, ...), then
// reduced across the row's threads by `red` (every thread gets the totals),
// rescaled where out of range, finished: _core._stats for one row.
// `n` is 0 for an inactive slot (it still takes part in the reductions).
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#pragma nv_exec_check_disable
#endif
template <typename T, class Red>
PC_HD Stats<typename Traits<T>::acc> row_stats(
    const T* x1, const T* x2, i64 n, i64 sd1, i64 sd2, int lane, int group, Red& red,
    double eps_d, double lo_d, double hi_d) {
    typedef typename Traits<T>::acc A;
    const bool C = Traits<T>::compensated;
    const bool R = Traits<T>::rescale;
    RowSums<A, C> r;
    r.init();
#pragma unroll 4
    for (i64 k = lane; k < n; k += group) {
        r.add((A)widen(x1[k * sd1]), (A)widen(x2[k * sd2]), R);
    }
    red.reduce(r);
    A w12, w11, w22, l12, l11, l22;
    r.d12.split(w12, l12); r.d11.split(w11, l11); r.d22.split(w22, l22);
    A m1 = A(1), m2 = A(1);
    if (R) {
        // _core._out_of_range: keep w11 * w22 normal and finite and every
        // square's rounding far below eps; all-zero rows are fine as they are.
        const A lo = (A)lo_d, hi = (A)hi_d;
        const bool bad = (!(r.d11.hi >= lo && r.d11.hi <= hi) && r.m1 > A(0))
                      || (!(r.d22.hi >= lo && r.d22.hi <= hi) && r.m2 > A(0));
        // The pass runs where any row of the reduction unit (warp or block)
        // needs it, so that the reductions stay convergent; only the bad rows
        // take its values (the where(bad, scaled, unscaled) of _core._stats).
        if (red.any(bad)) {
            // _core._scale: m = max|x|, 1 for zero or non-finite rows.
            const A s1 = (r.m1 > A(0) && r.m1 <= Lim<A>::max()) ? r.m1 : A(1);
            const A s2 = (r.m2 > A(0) && r.m2 <= Lim<A>::max()) ? r.m2 : A(1);
            Scaler<A> d1, d2;
            d1.init(s1);
            d2.init(s2);
            RowSums<A, C> q;
            q.init();
#pragma unroll 4
            for (i64 k = lane; k < n; k += group) {
                q.add(d1.div((A)widen(x1[k * sd1])), d2.div((A)widen(x2[k * sd2])), false);
            }
            red.reduce(q);
            if (bad) {
                q.d12.split(w12, l12); q.d11.split(w11, l11); q.d22.split(w22, l22);
                m1 = d1.m; m2 = d2.m;
            }
        }
    }
    return finish<A, C>(w12, w11, w22, l12, l11, l22, m1, m2, (A)eps_d);
}

// _core.grad_elementwise, factored form: g1 = u1 (p2 x2 - q1 x1), g2 = u2 (p1 x1 - q2 x2).
template <typename T, typename O>
PC_HD void grad_row(const T* x1, const T* x2, O* d1, O* d2, i64 n, i64 sd1, i64 sd2, i64 sdx,
                    int lane, int group, const Coefs<typename Traits<T>::work>& k) {
    typedef typename Traits<T>::work W;
#pragma unroll 4
    for (i64 i = lane; i < n; i += group) {
        const W a = (W)widen(x1[i * sd1]);
        const W b = (W)widen(x2[i * sd2]);
        d1[i * sdx] = Cast<O>::from(k.u1 * (k.p2 * b - k.q1 * a));
        d2[i * sdx] = Cast<O>::from(k.u2 * (k.p1 * a - k.q2 * b));
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

struct SerialReducer {  // one thread per row, no partners (also the host emulation)
    template <class S> PC_HD void reduce(S&) {}
    PC_HD bool any(bool b) { return b; }
};

#if (defined(__CUDACC__) || defined(__CUDACC_RTC__)) && !defined(POLYCOS_HOST_ONLY)
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

// POLYCOS_HOST_ONLY: the per-row functions alone, for the host emulation in
// tests/test_cupy_kernels.py.
#if (defined(__CUDACC__) || defined(__CUDACC_RTC__)) && !defined(POLYCOS_HOST_ONLY)

#define POLYCOS_BLOCK(GROUP) ((GROUP) > 32 ? (GROUP) : 256)

// Forward: out[row] = s (in T); with has_res, res[3 row + {0,1,2}] = (s, n1, n2)
// in the accumulation dtype (the residuals _core.vjp accepts).
// Operand batch strides: a (x1), b (x2), o (out); all in elements.
template <typename T, int GROUP>
__global__ void __launch_bounds__(POLYCOS_BLOCK(GROUP))
polycos_forward(const T* __restrict__ x1, const T* __restrict__ x2, T* __restrict__ out,
                typename polycos_detail::Traits<T>::acc* __restrict__ res, int has_res,
                long long rows, long long n, long long sd1, long long sd2,
                long long z1, long long z2, long long z3,
                long long a0, long long a1, long long a2, long long a3,
                long long b0, long long b1, long long b2, long long b3,
                long long o0, long long o1, long long o2, long long o3,
                double eps, double lo, double hi) {
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
        const Stats<A> st = row_stats<T>(
            x1 + offset(ix, a0, a1, a2, a3), x2 + offset(ix, b0, b1, b2, b3),
            active ? n : 0, sd1, sd2, lane, GROUP, red, eps, lo, hi);
        if (active && lane == 0) {
            out[offset(ix, o0, o1, o2, o3)] = Cast<T>::from(st.s);
            if (has_res) {
                res[3 * row] = st.s;
                res[3 * row + 1] = st.n1;
                res[3 * row + 2] = st.n2;
            }
        }
    }
}

// Backward (VJP): dx1, dx2 (storage O: T, or float for half/bf16 when the
// caller sums broadcast rows afterwards) from the upstream gradient g and the
// per-row scalars, recomputed (has_res == 0) or read from res.
// Operand batch strides: a (x1), b (x2), c (g), d (dx1 and dx2); sdx is the
// element stride along the row of dx1 and dx2.
template <typename T, typename O, int GROUP>
__global__ void __launch_bounds__(POLYCOS_BLOCK(GROUP))
polycos_backward(const T* __restrict__ x1, const T* __restrict__ x2, const T* __restrict__ g,
                 const typename polycos_detail::Traits<T>::acc* __restrict__ res, int has_res,
                 O* __restrict__ dx1, O* __restrict__ dx2,
                 long long rows, long long n, long long sd1, long long sd2, long long sdx,
                 long long z1, long long z2, long long z3,
                 long long a0, long long a1, long long a2, long long a3,
                 long long b0, long long b1, long long b2, long long b3,
                 long long c0, long long c1, long long c2, long long c3,
                 long long d0, long long d1, long long d2, long long d3,
                 double eps, double lo, double hi) {
    using namespace polycos_detail;
    typedef typename Traits<T>::acc A;
    typedef typename Traits<T>::work W;
    typedef RowSums<A, Traits<T>::compensated> S;
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
        Stats<A> st;
        if (has_res) {  // kernel-uniform branch
            st.s = res[3 * r]; st.n1 = res[3 * r + 1]; st.n2 = res[3 * r + 2];
        } else {
            st = row_stats<T>(p1, p2, len, sd1, sd2, lane, GROUP, red, eps, lo, hi);
        }
        const A gv = active ? (A)widen(g[offset(ix, c0, c1, c2, c3)]) : A(0);
        const Coefs<W> k = coefficients<W>(gv, st, (A)eps);
        const i64 od = offset(ix, d0, d1, d2, d3);
        grad_row<T, O>(p1, p2, dx1 + od, dx2 + od, len, sd1, sd2, sdx, lane, GROUP, k);
    }
}

#endif  // kernels
