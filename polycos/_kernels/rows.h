// polycos per-row functions: the arithmetic of one row of cosine similarity
// and of its VJP, shared by the CPU kernel (cpu.cpp, g++) and the CUDA kernels
// (cuda.cu, nvcc / NVRTC).
//
// Every function here mirrors a function of polycos/_core.py operation by
// operation (named in its comment) so that, given the same per-row sums, the
// kernels round exactly like the array-API core. What is *not* here is the
// order in which a row's products are summed: each kernel chooses it (fixed
// lanes and a fixed tree on the CPU, a strided loop per thread and a fixed
// butterfly on the GPU), always the same for the same layout.
//
// Notation (see _core.py's module docstring): storage dtype T, accumulation
// dtype A (float for half/bfloat16, double or float for float, double for
// double). Flags:
//   C (compensated)  A is T: Ogita-Rump-Oishi Dot2 sums and the precise quotient;
//   R (rescaling)    the squares of T may leave A's range (bfloat16 in float,
//                    float in float, double in double): rows whose sums are out
//                    of range are recomputed from x / max|x|.
//
// Rules that make the bits reproducible: no FMA contraction (g++
// -ffp-contract=off, NVRTC --fmad=false); fma() appears only in the explicit
// error-free TwoProduct; IEEE division and square root; no fast-math.
//
// Value types. The functions are templates over V: a scalar A (CUDA, and the
// CPU's per-row code) or, on the CPU, a GCC vector of A holding one row per
// lane (several rows finished at once). Everything is elementwise, so a lane
// of the vector result has exactly the bits of the scalar result for that row.
// Hence the spelling: masks are combined with & and | (not && and ||), tested
// with == 0 (not !), and chosen with ?: on values of type V.

#ifndef POLYCOS_KERNELS_ROWS_H_
#define POLYCOS_KERNELS_ROWS_H_

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define POLYCOS_CUDA 1
#define PC_HD __host__ __device__ __forceinline__
#else
#define POLYCOS_CUDA 0
#define PC_HD inline __attribute__((always_inline))
#endif

namespace polycos_rows {

typedef long long i64;

// The scalar type of a value type (A itself, or the element type of a vector).
template <typename V> struct ScalarOf {
    typedef V type;
};

// ------------------------------------------------------------------ primitives

#if POLYCOS_CUDA
PC_HD float pabs(float x) { return fabsf(x); }
PC_HD double pabs(double x) { return fabs(x); }
PC_HD float psqrt(float x) { return sqrtf(x); }  // IEEE correctly rounded (-prec-sqrt=true)
PC_HD double psqrt(double x) { return sqrt(x); }
PC_HD float pfma(float a, float b, float c) { return fmaf(a, b, c); }
PC_HD double pfma(double a, double b, double c) { return fma(a, b, c); }
#else
PC_HD float pabs(float x) { return __builtin_fabsf(x); }
PC_HD double pabs(double x) { return __builtin_fabs(x); }
PC_HD float psqrt(float x) { return __builtin_sqrtf(x); }
PC_HD double psqrt(double x) { return __builtin_sqrt(x); }
// Hardware FMA where the ISA clone has it, glibc's correctly rounded fma()
// otherwise: the same bits either way.
PC_HD float pfma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
PC_HD double pfma(double a, double b, double c) { return __builtin_fma(a, b, c); }

// The CPU's vector value types (SSE and AVX widths) and their elementwise
// sqrt / fma (the compiler emits vsqrtpd, vfmadd... in clones that have them).
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x2 __attribute__((vector_size(16)));
typedef double f64x4 __attribute__((vector_size(32)));
#define POLYCOS_VECTOR_OPS(V, S, N)                                                 \
    template <> struct ScalarOf<V> {                                                \
        typedef S type;                                                             \
    };                                                                              \
    PC_HD V psqrt(V x) {                                                            \
        V r;                                                                        \
        for (int i = 0; i < N; ++i) r[i] = psqrt(x[i]);                             \
        return r;                                                                   \
    }                                                                               \
    PC_HD V pfma(V a, V b, V c) {                                                   \
        V r;                                                                        \
        for (int i = 0; i < N; ++i) r[i] = pfma(a[i], b[i], c[i]);                  \
        return r;                                                                   \
    }
POLYCOS_VECTOR_OPS(f32x4, float, 4)
POLYCOS_VECTOR_OPS(f32x8, float, 8)
POLYCOS_VECTOR_OPS(f64x2, double, 2)
POLYCOS_VECTOR_OPS(f64x4, double, 4)
#undef POLYCOS_VECTOR_OPS
#endif

// A constant of value type V (a scalar, or the constant in every lane).
template <typename V> PC_HD V splat(typename ScalarOf<V>::type c) { return V{} + c; }

// NaN-propagating maximum, as xp.maximum / xp.max (fmax would drop NaN).
template <typename V> PC_HD V pmax(V a, V b) { return ((a != a) | (a > b)) ? a : b; }

// _core._safe_divide: num / den with 0 where den == 0 (NaN still propagates).
// (The division of a lane whose den is 0 is computed and discarded.)
template <typename V> PC_HD V safe_div(V num, V den) { return (den == 0) ? V{} : num / den; }

// _core._clamp_unit: clamp to [-1, 1] keeping NaN (comparisons with NaN are false).
template <typename V> PC_HD V clamp_unit(V s) {
    s = (s > 1) ? splat<V>(1) : s;
    return (s < -1) ? splat<V>(-1) : s;
}

// Limits of the accumulation dtype and the range of _core's rescue test
// (_core._suspect): sums of squares outside [lo_th, hi_th] are recomputed from
// x / max|x|. lo_th = sqrt(smallest_normal) / eps, hi_th = sqrt(max) / 4
// (evaluated in double, then rounded to A, as the core's Python scalars are).
template <typename A> struct Lim;
template <> struct Lim<float> {
    static PC_HD float max() { return 0x1.fffffep+127f; }
    static PC_HD float tiny() { return 0x1p-126f; }
    static PC_HD float lo_th() { return 0x1p-40f; }
    static PC_HD float hi_th() { return 0x1.fffffep+61f; }
    static PC_HD float down() { return 0x1p-64f; }  // _core._GRAD_SHIFT: g / c past max
    static PC_HD float up() { return 0x1p+64f; }
};
template <> struct Lim<double> {
    static PC_HD double max() { return 0x1.fffffffffffffp+1023; }
    static PC_HD double tiny() { return 0x1p-1022; }
    static PC_HD double lo_th() { return 0x1p-459; }
    static PC_HD double hi_th() { return 0x1.fffffffffffffp+509; }
    static PC_HD double down() { return 0x1p-512; }
    static PC_HD double up() { return 0x1p+512; }
};

// ------------------------------------------------------------------ error-free transformations

// TwoProduct: p + e == a * b exactly (fma; _core._two_product computes the same
// e with Dekker's split, identical wherever neither over- nor underflows, which
// holds for every use below: sums in the safe range).
template <typename V> PC_HD void two_prod(V a, V b, V& p, V& e) {
    p = a * b;
    e = pfma(a, b, -p);
}

// One step of Ogita-Rump-Oishi Dot2 (_core.accurate_dot): the product a*b,
// given exactly as p + e, is added to the running sum hi by Knuth's TwoSum; the
// sum's rounding error and e are collected in lo.
template <typename V> PC_HD void dot2_add(V& hi, V& lo, V p, V e) {
    const V t = hi + p;
    const V bb = t - hi;
    const V err = (hi - (t - bb)) + (p - bb);
    hi = t;
    lo = lo + (err + e);
}

// Two Dot2 partial sums combined (TwoSum of the his, the los added):
// symmetric, merge(a, b) == merge(b, a) bitwise.
template <typename V> PC_HD void dot2_merge(V& hi, V& lo, V ohi, V olo) {
    const V t = hi + ohi;
    const V bb = t - hi;
    const V err = (hi - (t - bb)) + (ohi - bb);
    hi = t;
    lo = (lo + olo) + err;
}

// The end of Dot2 (_core.accurate_dot's Fast2Sum): the sum rounded (w) and its
// remainder (l).
template <typename V> PC_HD void dot2_split(V hi, V lo, V& w, V& l) {
    w = hi + lo;
    l = lo - (w - hi);
}

// ------------------------------------------------------------------ range rescue

// Not _core._suspect for one sum: w in [lo_th, hi_th] (NaN is not in range).
template <typename V> PC_HD auto in_range(V w) {
    typedef typename ScalarOf<V>::type A;
    return (w >= Lim<A>::lo_th()) & (w <= Lim<A>::hi_th());
}

// _core._out_of_range for a row: a sum of squares out of range on a side that
// is not all zero (max|x| > 0; a NaN max is not > 0).
template <typename V> PC_HD auto rescue_needed(V w11, V w22, V max1, V max2) {
    return ((in_range(w11) == 0) & (max1 > 0)) | ((in_range(w22) == 0) & (max2 > 0));
}

// _core._row_scale's m: max(max|x|, smallest normal, eps / hi_th) where max|x|
// is positive and finite, else 1. The floor keeps 1/m and eps/m finite, so a
// row far below eps still has c = eps representable in units of m.
template <typename V> PC_HD V row_scale(V max_abs, typename ScalarOf<V>::type eps) {
    typedef typename ScalarOf<V>::type A;
    const A by_eps = eps / Lim<A>::hi_th();
    const V floor = splat<V>(by_eps > Lim<A>::tiny() ? by_eps : Lim<A>::tiny());
    const V m = max_abs > floor ? max_abs : floor;
    return ((max_abs > 0) & (max_abs <= Lim<A>::max())) ? m : splat<V>(1);
}

// ------------------------------------------------------------------ forward: finish

// _core.Residuals for one row: s and the *scaled* norms with their scales
// (n = ns * m can overflow A while the gradient is representable).
template <typename V> struct Res5 {
    V s, n1s, n2s, m1, m2;
};

// _core._precise_quotient: (w12 + l12) / sqrt((w11 + l11)(w22 + l22)) with the
// roundings of the product, the root and the quotient recovered exactly and
// folded into one correction, so s rounds once.
template <typename V>
PC_HD V precise_quotient(V w12, V w11, V w22, V l12, V l11, V l22) {
    V p, pe;
    two_prod(w11, w22, p, pe);
    V r = psqrt(p);
    r = (r > 0) ? r : splat<V>(1);  // not taken (both norms above eps): avoids 0/0
    V rr, rre;
    two_prod(r, r, rr, rre);
    const V dr = (((p - rr) - rre) + pe + (w11 * l22 + w22 * l11)) / (splat<V>(2) * r);
    const V q = w12 / r;
    V qr, qre;
    two_prod(q, r, qr, qre);
    return q + (((w12 - qr) - qre) + l12 - q * dr) / r;
}

// finish's s, before the clamp, for rows whose norms are both above eps (the
// case of almost every row): the quotient alone, without the norms a forward
// that keeps no residuals never reads. Callers test the case on the sums
// (cpu.cpp: root_threshold), so the bits are finish's for those rows.
template <bool C, typename V>
PC_HD V quotient_above(V w12, V w11, V w22, V l12, V l11, V l22) {
    if (C) return precise_quotient(w12, w11, w22, l12, l11, l22);
    return safe_div(w12, psqrt(w11 * w22));
}

// _core.finish: from the sums (and, compensated, their remainders) in scaled
// units with scales m1, m2 to the residuals (s, n1s, n2s, m1, m2).
template <bool C, typename V>
PC_HD Res5<V> finish(V w12, V w11, V w22, V l12, V l11, V l22, V m1, V m2, V eps) {
    const V n1s = psqrt(w11), n2s = psqrt(w22);
    const V e1 = eps / m1, e2 = eps / m2;  // max(n*m, eps)/m == max(ns, eps/m)
    const auto above1 = n1s > e1, above2 = n2s > e2;
    const auto both = above1 & above2;
    // Above eps: sqrt(w11 * w22), one rounding, and s(x, x) == 1 exactly.
    const V den = both ? psqrt(w11 * w22) : pmax(n1s, e1) * pmax(n2s, e2);
    V s = safe_div(w12, den);
    if (C) {
        // Below eps: first-order correction by the remainders,
        // (w12 + l12) / (den (1 + l11/(2 w11) + l22/(2 w22))).
        const V rel = (above1 ? safe_div(l11, splat<V>(2) * w11) : V{}) +
                      (above2 ? safe_div(l22, splat<V>(2) * w22) : V{});
        const V rough = s + (safe_div(l12, den) - s * rel);
        s = both ? precise_quotient(w12, w11, w22, l12, l11, l22) : rough;
    }
    Res5<V> r;
    r.s = clamp_unit(s);
    r.n1s = n1s;
    r.n2s = n2s;
    r.m1 = m1;
    r.m2 = m2;
    return r;
}

// ------------------------------------------------------------------ backward

// _core.GradCoefficients for one row: d1 = (u1 ((h2 - t1 h1) / m1)) p1 and
// d2 = (u2 ((h1 - t2 h2) / m2)) p2, with h = (x / m) r.
template <typename V> struct GradCoefs {
    V u1, u2;  // g / c, 0 where cs == 0 (a zero vector with eps = 0); g 2^-k / c past max
    V r1, r2;  // 1 / c, c = max(ns, eps/m) (1 where that is 0)
    V t1, t2;  // [ns > eps/m] s
    V m1, m2;  // the row scales (1 without rescaling)
    V p1, p2;  // 2^k where u is shifted, else 1
};

// _core.grad_coefficients for one row. R: the dtype may be rescaled (else
// m == 1 and eps / m is eps itself).
template <bool R, typename V>
PC_HD GradCoefs<V> grad_coefficients(V g, const Res5<V>& res, V eps) {
    typedef typename ScalarOf<V>::type A;
    GradCoefs<V> k;
    const V top = splat<V>(Lim<A>::max());
    const V e1 = R ? eps / res.m1 : eps, e2 = R ? eps / res.m2 : eps;
    const V cs1 = pmax(res.n1s, e1), cs2 = pmax(res.n2s, e2);
    const V c1 = (cs1 == 0) ? splat<V>(1) : cs1;
    const V c2 = (cs2 == 0) ? splat<V>(1) : cs2;
    k.r1 = splat<V>(1) / c1;
    k.r2 = splat<V>(1) / c2;
    // 1 / c overflows only for c = eps below 1 / max (a subnormal eps) on a zero row
    // (a nonzero row that small is rescaled): there u = g / c, and r is capped at max
    // (h = 0 r stays 0; it was 0 inf = NaN).
    const auto huge1 = k.r1 > top, huge2 = k.r2 > top;
    k.u1 = (cs1 == 0) ? V{} : huge1 ? g / c1 : g * k.r1;
    k.u2 = (cs2 == 0) ? V{} : huge2 ? g / c2 : g * k.r2;
    k.p1 = splat<V>(1);
    k.p2 = splat<V>(1);
    if (R) {
        // g / c overflows where the gradient need not (a finite g near max, c of a row in the
        // safe range, down to 2^-230 / 2^-20): then g 2^-k / c, and 2^k after the last product.
        const V down = splat<V>(Lim<A>::down());
        const auto finite = (g <= top) & (g >= -top);
        const auto over1 = finite & ((k.u1 > top) | (k.u1 < -top));
        const auto over2 = finite & ((k.u2 > top) | (k.u2 < -top));
        k.u1 = over1 ? (huge1 ? (g * down) / c1 : (g * down) * k.r1) : k.u1;
        k.u2 = over2 ? (huge2 ? (g * down) / c2 : (g * down) * k.r2) : k.u2;
        k.p1 = over1 ? splat<V>(Lim<A>::up()) : k.p1;
        k.p2 = over2 ? splat<V>(Lim<A>::up()) : k.p2;
    }
    k.r1 = huge1 ? top : k.r1;
    k.r2 = huge2 ? top : k.r2;
    k.t1 = (res.n1s > e1) ? res.s : V{};
    k.t2 = (res.n2s > e2) ? res.s : V{};
    k.m1 = res.m1;
    k.m2 = res.m2;
    return k;
}

// _core.grad_elementwise for one element (or lanes of elements V of one row,
// with the row's scalar coefficients K = GradCoefs<A>; or lanes of rows with
// K = GradCoefs<V>): a1, a2 are the inputs widened to A. DIV: the row scales
// apply (x / m first; the bracket, at most 2 in magnitude, divided by m >=
// smallest normal before u multiplies it, so nothing over- or underflows
// unless the gradient does); callers pass false when both scales are 1, which
// gives the same bits. P: the shifts p apply; callers pass false when both
// are 1 (x * 1 is x: the same bits again).
template <bool DIV, bool P = true, typename V, typename K>
PC_HD void grad_element(V a1, V a2, const K& k, V& d1, V& d2) {
    if (DIV) {
        const V h1 = (a1 / k.m1) * k.r1;
        const V h2 = (a2 / k.m2) * k.r2;
        d1 = k.u1 * ((h2 - k.t1 * h1) / k.m1);
        d2 = k.u2 * ((h1 - k.t2 * h2) / k.m2);
    } else {
        const V h1 = a1 * k.r1;
        const V h2 = a2 * k.r2;
        d1 = k.u1 * (h2 - k.t1 * h1);
        d2 = k.u2 * (h1 - k.t2 * h2);
    }
    if (P) {
        d1 = d1 * k.p1;
        d2 = d2 * k.p2;
    }
}

// ------------------------------------------------------------------ pairwise: normalize_rows

// _core.normalize_rows for one row, from the sum of squares of b = x / m:
// ns = ||b|| (compensated: sqrt(hi) + lo / (2 sqrt(hi)), i.e. sqrt(hi + lo) to
// first order), cs = max(ns, eps / m), and the divisor c (1 where cs == 0).
template <typename V> struct RowNorm {
    V cs, ns, m, c;
};

template <bool C, typename V>
PC_HD RowNorm<V> normalize_finish(V w, V l, V m, V eps) {
    RowNorm<V> r;
    if (C) {
        const V root = psqrt(w);
        r.ns = root + safe_div(l, splat<V>(2) * root);
    } else {
        r.ns = psqrt(w);
    }
    r.cs = pmax(r.ns, eps / m);
    r.c = (r.cs == 0) ? splat<V>(1) : r.cs;
    r.m = m;
    return r;
}

}  // namespace polycos_rows

#endif  // POLYCOS_KERNELS_ROWS_H_
