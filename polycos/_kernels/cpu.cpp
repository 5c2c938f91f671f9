// polycos CPU kernel: cosine similarity, its VJP and the pairwise row
// normalisation, fused (one pass over the inputs per row, two for the VJP),
// for NumPy (ctypes), torch (ctypes from a torch.library operator) and JAX
// (XLA FFI handlers, at the end of this file). docs/kernels.md explains the
// choices; the per-row arithmetic is polycos/_kernels/rows.h, shared with the
// CUDA kernels and mirroring polycos/_core.py.
//
// Structure of this file
//   1. (once)        includes, dtypes, the layout plan (broadcast + coalescing),
//                    the floating-point environment guard, the thread runner.
//   2. (per ISA)     the loops, compiled once per instruction set: this file
//                    includes itself inside a namespace under
//                    `#pragma GCC target`, with POLYCOS_CPU_LOOPS defined.
//   3. (once)        ISA dispatch, the C ABI (ctypes), test hooks, XLA FFI.
//
// Determinism: a row is always computed by one thread, in one fixed sequence
// that depends only on the layout (row, strided or column), never on the
// thread count or the ISA clone: the lane count is fixed in code (GCC vector
// types), sums are combined by a fixed tree, there is no FMA contraction
// (-ffp-contract=off) and no -ffast-math. The row and the strided layouts sum
// in the same order (bitwise equal); the column layout sums each row in plain
// sequence (a different order, equally within the accuracy guarantee).

#ifndef POLYCOS_CPU_LOOPS  // =========================================== part 1

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define POLYCOS_X86 1
#else
#define POLYCOS_X86 0
#endif

#include "rows.h"

#define POLYCOS_API extern "C" __attribute__((visibility("default")))
#define PCI inline __attribute__((always_inline))

namespace polycos_cpu {

using polycos_rows::i64;
using polycos_rows::Res5;
using polycos_rows::GradCoefs;

// ------------------------------------------------------------------ dtypes

// Storage of half types: their bits (float16 and bfloat16 arrive as uint16
// words from NumPy/ml_dtypes, torch and XLA alike).
struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

// Dtype codes of the C ABI.
enum Dtype : int { kF16 = 0, kBF16 = 1, kF32 = 2, kF64 = 3 };

// Status codes of the C ABI (polycos_status_message gives the text).
enum Status : int {
    kOk = 0,
    kNeedContiguous = 1,   // too many batch dimensions remain after coalescing
    kBadDtype = -1,        // unsupported storage/accumulation/output dtype combination
    kBadShape = -2,        // shapes do not broadcast, or a negative size
    kBadAxis = -3,         // axis out of range
    kBadRank = -4,         // rank 0 or above kMaxRank
    kTooLarge = -5,        // element count overflows 64 bits
    kInternal = -6,        // an exception inside the kernel (e.g. out of memory)
    kBadArgument = -7,     // a null pointer where an array is needed
};

constexpr int kMaxRank = 64;
// Batch dimensions the row iterator walks after coalescing; beyond, the caller
// passes contiguous copies (then at most two remain).
constexpr int kMaxBatch = 8;
// Operands of a plan: forward x1, x2, out, res; backward x1, x2, g, res, d1, d2;
// normalize x, xhat.
constexpr int kMaxOps = 6;

template <typename T> struct DtypeOf;
template <> struct DtypeOf<f16_t> { static constexpr int code = kF16; };
template <> struct DtypeOf<bf16_t> { static constexpr int code = kBF16; };
template <> struct DtypeOf<float> { static constexpr int code = kF32; };
template <> struct DtypeOf<double> { static constexpr int code = kF64; };

inline int itemsize(int dtype) { return dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2; }

// Ask Linux to back a large output with transparent huge pages before the
// kernel first touches it, as NumPy does for every allocation of 4 MiB or more.
// Outputs are new memory (np.empty, torch.empty, an XLA result buffer): with
// THP in "madvise" mode, 4 KiB pages make the first write fault once per page,
// which cost torch 50 ms for two new 32 MiB gradients against 10 ms for NumPy's
// (same machine, one thread). Every page the span touches is advised, not
// only its 2 MiB-aligned interior: a partial advice splits the mapping, and a
// 2 MiB range across a split (the edges of a buffer; XLA's two gradients lie
// in adjacent mappings) stays in 4 KiB pages: 1567 page faults per JAX forward
// + backward at 32768 x 256 with the interior only, 1056 this way (NumPy: 545).
// The advice is a hint (no data changes); on other systems, or when the
// kernel refuses, nothing changes.
// The memory an operand (shape, strides in elements, isz bytes an element)
// spans: from its lowest element, `start`, `bytes` long; `n` elements. False
// when it has none.
struct Extent {
    uintptr_t start = 0;
    i64 bytes = 0, n = 0;
};
inline bool extent_of(const void* base, int nd, const i64* shape, const i64* strides, int isz, Extent& x) {
    i64 lo = 0, hi = 0, n = 1;
    for (int d = 0; d < nd; ++d) {
        if (shape[d] == 0) return false;
        const i64 e = (shape[d] - 1) * strides[d];
        (e < 0 ? lo : hi) += e;
        n *= shape[d];
    }
    x.start = uintptr_t(base) + uintptr_t(lo * isz);
    x.bytes = (hi - lo + 1) * isz;
    x.n = n;
    return true;
}

inline uintptr_t page_bytes() {
    static const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE) > 0 ? sysconf(_SC_PAGESIZE) : 4096);
    return page;
}

inline void advise_huge_pages(void* base, int nd, const i64* shape, const i64* strides, int isz) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    Extent x;
    if (!base || !extent_of(base, nd, shape, strides, isz, x)) return;
    if (x.bytes < i64(4) << 20 || x.bytes > 2 * x.n * isz) return;  // small, or sparse (broadcast, strided)
    const uintptr_t a = x.start & ~(page_bytes() - 1), b = x.start + uintptr_t(x.bytes);
    madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);  // (the length is rounded up to a page)
#else
    (void)base, (void)nd, (void)shape, (void)strides, (void)isz;
#endif
}

// Whether an operand's pages are in memory already (a sample of 9 evenly
// spread pages, mincore). Streaming stores into new pages are slower than
// regular ones: the first touch of a page has the kernel zero it, which leaves
// its lines in the cache, where a regular store is cheap and a streaming one
// must first evict them (torch forward + backward at 32768 x 256 with glibc's
// default allocator, which maps each new 32 MiB gradient afresh: 1.35 times as
// long streamed).
inline bool resident(const void* base, int nd, const i64* shape, const i64* strides, int isz) {
#if defined(__linux__)
    Extent x;
    if (!base || !extent_of(base, nd, shape, strides, isz, x)) return false;
    const uintptr_t page = page_bytes();
    const uintptr_t first = x.start & ~(page - 1), last = (x.start + uintptr_t(x.bytes) - 1) & ~(page - 1);
    const uintptr_t pages = (last - first) / page;
    for (int k = 0; k <= 8; ++k) {
        unsigned char in = 0;
        const uintptr_t a = first + (pages * uintptr_t(k) / 8) * page;
        if (mincore(reinterpret_cast<void*>(a), page, &in) != 0 || !(in & 1)) return false;
    }
    return true;
#else
    (void)base, (void)nd, (void)shape, (void)strides, (void)isz;
    return false;
#endif
}

// advise_huge_pages on nbytes of contiguous memory.
inline void advise_huge_span(void* p, i64 nbytes) {
    const i64 one = 1;
    advise_huge_pages(p, 1, &nbytes, &one, 1);
}

// The supported (storage, accumulation) pairs: _core.accumulation_dtype, plus
// float32 accumulating in float32 (JAX without x64: no float64 buffers).
inline bool valid_pair(int t, int a) {
    return ((t == kF16 || t == kBF16) && a == kF32) || (t == kF32 && (a == kF32 || a == kF64)) ||
           (t == kF64 && a == kF64);
}

// A (storage, accumulation) configuration and its flags (see rows.h).
template <typename T_, typename A_> struct Cfg {
    typedef T_ T;
    typedef A_ A;
    static constexpr bool C = std::is_same<T_, A_>::value;
    static constexpr bool R = !(std::is_same<T_, f16_t>::value ||
                                (std::is_same<T_, float>::value && std::is_same<A_, double>::value));
    // Lanes per row: independent partial sums, fixed here (not by the ISA):
    // 64 bytes of accumulators per sum (8 double or 16 float lanes).
    static constexpr int L = 64 / int(sizeof(A_));
};

// ------------------------------------------------------------------ layout plan

// The rows of a problem after broadcasting and coalescing: `rows` rows of `n`
// elements; row r (C order over the batch dimensions, i.e. every dimension
// but the axis) of operand o starts at sum_d idx_d(r) * bstride[o][d] and its
// elements are astride[o] apart (all in elements of that operand).
struct Plan {
    int nops = 0;
    int nb = 0;  // batch dimensions, outermost first
    i64 rows = 0;
    i64 n = 0;
    i64 size[kMaxBatch] = {};
    i64 bstride[kMaxOps][kMaxBatch] = {};
    i64 astride[kMaxOps] = {};
};

// Whether every row of operand `op` (contiguous rows) starts a 64-byte line
// and fills whole lines. Streaming stores only pay there: a line written in
// part by regular stores between streamed ones made the VJP 2.7 times as slow
// as regular stores alone (NumPy's arrays start 16 bytes into a line).
inline bool whole_lines(const void* base, const Plan& p, int op, int isz) {
    if ((uintptr_t(base) & 63u) || (p.n * isz) % 64) return false;
    for (int d = 0; d < p.nb; ++d)
        if (p.size[d] > 1 && (p.bstride[op][d] * isz) % 64) return false;
    return true;
}

// Streaming (non-temporal) stores for the VJP's gradients when the call's
// memory does not fit in the last-level cache: its lines would leave the
// cache before anyone reads them, and a regular store first reads each line
// it writes (read for ownership), a third of the VJP's memory traffic.
// Measured (one thread, 256 float32 a row, outputs in memory, 64-byte lines,
// 32 MiB L3): the VJP from residuals took 0.85-0.90 times as long streamed
// with gradients of 16 MiB and more (64 MiB: 4.30 -> 3.66 ms), 1.16-2.1
// times as long with 2-8 MiB, which stay in the cache. Hence the threshold:
// both gradients at least half the L3 (the inputs, read alongside, fill the
// other half), the L3 size as Linux's sysfs gives it (glibc's sysconf said
// 320 MiB on a 32 MiB VM), 32 MiB if unknown; the test hook
// polycos_set_stream_bytes overrides it. The values written are the same.
inline std::atomic<i64>& stream_bytes_override() {
    static std::atomic<i64> v{-1};
    return v;
}

// Backward calls that streamed (the test hook polycos_stream_calls).
inline std::atomic<i64>& stream_calls() {
    static std::atomic<i64> v{0};
    return v;
}

// The size of the last-level (L3) cache of CPU 0 from sysfs ("32768K"), or 0.
inline i64 l3_bytes() {
#if defined(__linux__)
    for (int k = 0; k < 8; ++k) {
        const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(k) + "/";
        long long level = 0, size = 0;
        char unit = 0;
        FILE* f = std::fopen((dir + "level").c_str(), "r");
        if (!f) break;
        const bool ok = std::fscanf(f, "%lld", &level) == 1;
        std::fclose(f);
        if (!ok || level != 3 || !(f = std::fopen((dir + "size").c_str(), "r"))) continue;
        const int got = std::fscanf(f, "%lld%c", &size, &unit);
        std::fclose(f);
        if (got >= 1 && size > 0) return i64(size) << (unit == 'K' ? 10 : unit == 'M' ? 20 : 0);
    }
#endif
    return 0;
}

inline i64 stream_threshold() {
    const i64 o = stream_bytes_override().load(std::memory_order_relaxed);
    if (o >= 0) return o;
    static const i64 half_l3 = [] {
        const i64 l3 = l3_bytes();
        return (l3 > 0 ? l3 : i64(32) << 20) / 2;
    }();
    return half_l3;
}

// Drop unit batch dimensions and merge adjacent ones that every operand walks
// contiguously. `full` holds each operand's strides over the full shape (0
// where broadcast). Returns kNeedContiguous when more than kMaxBatch remain.
inline int make_plan(int ndim, const i64* shape, int axis, int nops, const i64 (*full)[kMaxRank],
                     Plan& p) {
    p.nops = nops;
    p.n = shape[axis];
    p.rows = 1;
    for (int o = 0; o < nops; ++o) p.astride[o] = shape[axis] == 1 ? 0 : full[o][axis];
    i64 size[kMaxRank];
    i64 st[kMaxOps][kMaxRank];
    int nb = 0;
    for (int d = 0; d < ndim; ++d) {
        if (d == axis) continue;
        if (shape[d] == 0) { p.rows = 0; }
        if (p.rows != 0 && shape[d] > 1 && p.rows > INT64_MAX / shape[d]) return kTooLarge;
        p.rows *= shape[d];
        if (shape[d] == 1) continue;
        if (nb > 0) {
            bool merge = true;
            for (int o = 0; o < nops; ++o) merge = merge && st[o][nb - 1] == full[o][d] * shape[d];
            if (merge) {
                size[nb - 1] *= shape[d];
                for (int o = 0; o < nops; ++o) st[o][nb - 1] = full[o][d];
                continue;
            }
        }
        size[nb] = shape[d];
        for (int o = 0; o < nops; ++o) st[o][nb] = full[o][d];
        ++nb;
    }
    if (p.rows == 0) {  // nothing to do: no work proportional to a broadcast partner
        p.nb = 0;
        return kOk;
    }
    if (p.n > 0 && p.rows > INT64_MAX / p.n) return kTooLarge;
    if (nb > kMaxBatch) return kNeedContiguous;
    p.nb = nb;
    for (int d = 0; d < nb; ++d) {
        p.size[d] = size[d];
        for (int o = 0; o < nops; ++o) p.bstride[o][d] = st[o][d];
    }
    return kOk;
}

// Software prefetch for rows that follow each other in memory. The hardware
// prefetcher alone left a two-input row loop at about half the read bandwidth
// of numpy.sum on the AMD EPYC guests we measure (a 16-float-row loop: 12.7 ns
// a row streaming against 7.7 in cache; 8.0 with this). A group of rows asks
// for the lines kPrefetchAhead bytes past itself, which a later group reads.
#ifndef POLYCOS_PREFETCH_AHEAD
#define POLYCOS_PREFETCH_AHEAD 1024
#endif
constexpr i64 kPrefetchAhead = POLYCOS_PREFETCH_AHEAD;

// Whether operand o's rows are dense (row r + 1 starts where row r ends), so
// that the memory past a row is the next rows'.
inline bool dense_rows(const Plan& p, int o) {
    return p.astride[o] == 1 && p.nb == 1 && p.bstride[o][0] == p.n;
}

// Prefetch the lines of [p + kPrefetchAhead, p + kPrefetchAhead + nbytes)
// (a hint: never faults, even past the end of an array).
inline void prefetch_ahead(const void* p, i64 nbytes) {
    const char* q = static_cast<const char*>(p) + kPrefetchAhead;
    for (i64 b = 0; b < nbytes; b += 64) __builtin_prefetch(q + b, 0, 3);
}

// The steps of L elements of a row that the dense loops unroll (1, 2 or 4;
// 0: the general loop), where every operand in `ops` has dense rows.
inline int dense_steps(const Plan& p, int lanes, std::initializer_list<int> ops) {
    for (int o : ops)
        if (!dense_rows(p, o)) return 0;
    const i64 s = p.n == 0 || p.n % lanes ? 0 : p.n / lanes;
    return s == 1 || s == 2 || s == 4 ? int(s) : 0;
}

// Row pointers of the g dense rows (n elements each) of x1 and x2 from row r.
template <typename T>
inline void dense_row_pointers(const T* x1, const T* x2, i64 r, int g, i64 n, const T** p1, const T** p2) {
    for (int j = 0; j < g; ++j) {
        p1[j] = x1 + (r + j) * n;
        p2[j] = x2 + (r + j) * n;
    }
}

// Walks rows in C order: the offsets of the first NOPS operands for the
// current row (NOPS a constant, so the per-row update is a few adds).
template <int NOPS = kMaxOps> struct Cursor {
    i64 idx[kMaxBatch];
    i64 off[kMaxOps];

    void seek(const Plan& p, i64 r) {
        for (int o = 0; o < kMaxOps; ++o) off[o] = 0;
        for (int d = p.nb - 1; d >= 0; --d) {
            idx[d] = r % p.size[d];
            r /= p.size[d];
            for (int o = 0; o < NOPS; ++o) off[o] += idx[d] * p.bstride[o][d];
        }
    }
    inline __attribute__((always_inline)) void next(const Plan& p) {
        for (int d = p.nb - 1; d >= 0; --d) {
            for (int o = 0; o < NOPS; ++o) off[o] += p.bstride[o][d];
            if (++idx[d] < p.size[d]) return;
            for (int o = 0; o < NOPS; ++o) off[o] -= p.bstride[o][d] * p.size[d];
            idx[d] = 0;
        }
    }
};

// How the rows are laid out in memory (chosen per call from the plan alone).
enum Layout : int {
    kRowContig = 0,   // elements of a row adjacent (axis stride 1): lanes, vector loads
    kRowStrided = 1,  // anything else: the same lanes with strided loads (same bits)
    kColumn = 2,      // rows strided but neighbouring rows adjacent: vectorised across rows
};

// Everything a kernel call needs. Operand order as in Plan.
struct Call {
    int dtype = 0, acc = 0, out_dtype = 0, g_dtype = 0;
    Plan plan;
    int layout = kRowStrided;
    int col_inner1 = 1, col_inner2 = 1;  // column layout: x1/x2 stride (0 or 1) across rows
    const void* x1 = nullptr;
    const void* x2 = nullptr;
    const void* g = nullptr;
    const void* res_in = nullptr;
    void* out = nullptr;
    void* res = nullptr;
    void* d1 = nullptr;
    void* d2 = nullptr;
    void* cs = nullptr;  // normalize_rows: per-row outputs (C order over rows)
    void* ns = nullptr;
    void* m = nullptr;
    double eps = 0;
    bool stream = false;  // backward: gradient rows with streaming stores (whole_lines, stream_threshold)
};

// eps as the accumulation dtype holds it: the largest finite value at most, so that
// eps cast to A stays finite (as _core._eps_for clamps it; eps = 1e300 is valid).
inline double eps_for(double eps, int acc) {
    const double top = acc == kF32 ? double(std::numeric_limits<float>::max()) : std::numeric_limits<double>::max();
    return eps < top ? eps : top;
}

// The least w with sqrt(w) > e (e >= 0 finite, in A): sqrt rounds correctly and
// is monotone, so sqrt(w) > e <=> w >= root_threshold(e), and a forward that
// keeps no residuals can tell rows above eps from their sums without the two
// roots (polycos_rows::quotient_above). e * e is within an ulp or two of it;
// infinity (every row takes the full finish) should the search not end.
template <typename A> inline A root_threshold(A e) {
    const A inf = std::numeric_limits<A>::infinity();
    A t = e * e;
    for (int i = 0; i < 64; ++i) {
        if (std::sqrt(t) > e) {
            const A below = std::nextafter(t, A(0));
            if (t == 0 || !(std::sqrt(below) > e)) return t;
            t = below;
        } else {
            t = std::nextafter(t, inf);
        }
    }
    return inf;
}

// Operand indices.
enum { kFwdX1 = 0, kFwdX2 = 1, kFwdOut = 2, kFwdRes = 3 };
enum { kBwdX1 = 0, kBwdX2 = 1, kBwdG = 2, kBwdRes = 3, kBwdD1 = 4, kBwdD2 = 5 };
enum { kNrmX = 0, kNrmXhat = 1 };

// ------------------------------------------------------------------ floating-point environment

// XLA and some torch settings run threads with flush-to-zero and
// denormals-are-zero, and a caller may have changed the rounding mode: save,
// set IEEE round-to-nearest without FTZ/DAZ, restore on exit, on every thread
// that runs kernel code. (Also discards the exception flags the kernel raised.)
struct FpEnvGuard {
#if POLYCOS_X86
    unsigned saved;
    FpEnvGuard() : saved(_mm_getcsr()) {
        _mm_setcsr(saved & ~(0x8000u /*FTZ*/ | 0x0040u /*DAZ*/ | 0x6000u /*rounding*/));
    }
    ~FpEnvGuard() { _mm_setcsr(saved); }
#elif defined(__aarch64__)
    uint64_t saved;
    FpEnvGuard() {
        __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved));
        // FZ (bit 24), FZ16 (bit 19), RMode (bits 22-23) cleared: IEEE, round to nearest.
        const uint64_t ieee = saved & ~((1ull << 24) | (1ull << 19) | (3ull << 22));
        __asm__ __volatile__("msr fpcr, %0" : : "r"(ieee));
    }
    ~FpEnvGuard() { __asm__ __volatile__("msr fpcr, %0" : : "r"(saved)); }
#else
    FpEnvGuard() {}
#endif
    FpEnvGuard(const FpEnvGuard&) = delete;
    FpEnvGuard& operator=(const FpEnvGuard&) = delete;
};

// ------------------------------------------------------------------ threads

// Elements of work below which an extra thread does not pay for its start
// (about 20 us to create and join; 64K elements stream in about 20-40 us).
constexpr i64 kMinWorkPerThread = i64(1) << 16;

// Runs body(r0, r1) over [0, rows) split into contiguous chunks, one per
// thread. std::thread, not OpenMP: torch ships its own libgomp and two OpenMP
// runtimes in one process are fragile. A chunk's rows do not depend on which
// thread runs them, so results are identical for every thread count. Returns
// false when a chunk threw (e.g. out of memory); no exception leaves a thread.
template <class Body>
bool parallel_rows(i64 rows, i64 work_per_row, int nthreads, const Body& body) {
    if (rows <= 0) return true;
    const i64 work = rows * std::max<i64>(work_per_row, 1);  // < 2^63: checked by make_plan
    i64 t = std::max(1, nthreads);
    t = std::min<i64>(t, std::max<i64>(1, work / kMinWorkPerThread));
    t = std::min<i64>(t, rows);
    auto bound = [&](i64 i) { return (rows / t) * i + std::min<i64>(i, rows % t); };
    std::atomic<bool> failed{false};
    auto run = [&](i64 r0, i64 r1) {
        try {
            FpEnvGuard env;
            body(r0, r1);
        } catch (...) {
            failed.store(true);
        }
    };
    if (t <= 1) {
        run(0, rows);
        return !failed.load();
    }
    std::vector<std::thread> pool;
    i64 started = 1;
    try {
        pool.reserve(size_t(t - 1));
        for (i64 i = 1; i < t; ++i, ++started) pool.emplace_back(run, bound(i), bound(i + 1));
    } catch (...) {
        // Could not start a thread: the chunks not started run here.
    }
    run(bound(0), bound(1));
    for (i64 i = started; i < t; ++i) run(bound(i), bound(i + 1));
    for (auto& th : pool) th.join();
    return !failed.load();
}

// ------------------------------------------------------------------ ISA selection

enum Isa : int { kIsaBaseline = 0, kIsaAvx2 = 1 };

inline bool isa_supported(int isa) {
    if (isa == kIsaBaseline) return true;
#if POLYCOS_X86 && defined(__GNUC__)
    if (isa == kIsaAvx2) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
#endif
    return false;
}

inline int best_isa() { return isa_supported(kIsaAvx2) ? kIsaAvx2 : kIsaBaseline; }

}  // namespace polycos_cpu

// ====================================================================== part 2: the loops, per ISA

#define POLYCOS_CPU_LOOPS 1

namespace polycos_cpu {
namespace isa_baseline {
#define POLYCOS_HAVE_FMA 0
#define POLYCOS_VEC_BYTES 16
#include "cpu.cpp"
#undef POLYCOS_VEC_BYTES
#undef POLYCOS_HAVE_FMA
}  // namespace isa_baseline
}  // namespace polycos_cpu

#if POLYCOS_X86 && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt,movbe")
#define POLYCOS_HAVE_AVX2_CLONE 1
namespace polycos_cpu {
namespace isa_avx2 {
#define POLYCOS_HAVE_FMA 1
#define POLYCOS_VEC_BYTES 32
#include "cpu.cpp"
#undef POLYCOS_VEC_BYTES
#undef POLYCOS_HAVE_FMA
}  // namespace isa_avx2
}  // namespace polycos_cpu
#pragma GCC pop_options
#else
#define POLYCOS_HAVE_AVX2_CLONE 0
#endif

#undef POLYCOS_CPU_LOOPS

// ====================================================================== part 3: dispatch and ABIs

namespace polycos_cpu {

std::atomic<int> g_isa{-1};

inline int current_isa() {
    int isa = g_isa.load(std::memory_order_relaxed);
    if (isa < 0) {
        isa = best_isa();
        if (!POLYCOS_HAVE_AVX2_CLONE) isa = kIsaBaseline;
        g_isa.store(isa, std::memory_order_relaxed);
    }
    return isa;
}

typedef void (*RangeFn)(const Call&, i64, i64);
struct Kernels {
    RangeFn forward, backward, normalize, normalize_vjp;
};

inline Kernels kernels_for(int isa) {
#if POLYCOS_HAVE_AVX2_CLONE
    if (isa == kIsaAvx2) return {isa_avx2::run_forward, isa_avx2::run_backward, isa_avx2::run_normalize,
                isa_avx2::run_normalize_vjp};
#endif
    (void)isa;
    return {isa_baseline::run_forward, isa_baseline::run_backward, isa_baseline::run_normalize,
            isa_baseline::run_normalize_vjp};
}

// ------------------------------------------------------------------ argument handling

inline bool valid_dtype(int d) { return d == kF16 || d == kBF16 || d == kF32 || d == kF64; }

// Right-aligned broadcast of `k` shapes. Returns kOk or kBadShape/kBadRank.
inline int broadcast_shapes(int k, const int* nds, const i64* const* shapes, int& nd, i64* out) {
    nd = 0;
    for (int i = 0; i < k; ++i) {
        if (nds[i] < 0 || nds[i] > kMaxRank) return kBadRank;
        nd = std::max(nd, nds[i]);
    }
    for (int d = 0; d < nd; ++d) out[d] = 1;
    for (int i = 0; i < k; ++i) {
        const int lead = nd - nds[i];
        for (int d = 0; d < nds[i]; ++d) {
            const i64 s = shapes[i][d];
            if (s < 0) return kBadShape;
            i64& o = out[lead + d];
            if (s == o || s == 1) continue;
            if (o != 1) return kBadShape;
            o = s;
        }
    }
    return kOk;
}

// Strides of an operand of shape `shape` over the (right-aligned) broadcast
// shape `full`: 0 along missing and size-1 dimensions.
inline void expand_strides(int nd_op, const i64* shape, const i64* strides, int nd, i64* out) {
    const int lead = nd - nd_op;
    for (int d = 0; d < nd; ++d) {
        const int k = d - lead;
        out[d] = (k < 0 || shape[k] == 1) ? 0 : strides[k];
    }
}

// Strides over the full shape of an operand given over the result shape (the
// full shape without `axis`): 0 inserted at the axis.
inline void insert_axis(const i64* strides_out, int nd, int axis, i64* out) {
    for (int d = 0, k = 0; d < nd; ++d) out[d] = d == axis ? 0 : strides_out[k++];
}

// C-order row strides of a (rows, 5) residual array over the full shape:
// 5 * the C-contiguous strides of the result shape (res_shape: the result
// shape, right-aligned in the full shape; 0 where it is 1 or missing).
inline void residual_strides(int nd, const i64* full_shape, int axis, int nd_res, const i64* res_shape,
                             i64* out) {
    // res_shape has nd_res dims, right-aligned to the full shape without axis.
    i64 step = 5;
    i64 tmp[kMaxRank];
    for (int k = nd_res - 1; k >= 0; --k) {
        tmp[k] = res_shape[k] == 1 ? 0 : step;
        step *= std::max<i64>(res_shape[k], 1);
    }
    const int nres_full = nd - 1;
    const int lead = nres_full - nd_res;
    for (int d = 0, k = 0; d < nd; ++d) {
        if (d == axis) { out[d] = 0; continue; }
        const int j = k - lead;
        out[d] = (j < 0 || full_shape[d] == 1) ? 0 : tmp[j];
        ++k;
    }
}

inline int choose_threads(int nthreads) { return nthreads < 1 ? 1 : nthreads; }

// The column layout: rows strided along the axis, but each operand's rows
// adjacent (stride 1, or 0 for a broadcast operand) along the innermost batch
// dimension, which holds enough rows to vectorise over.
inline bool column_layout(const Plan& p, int op1, int op2, const int* outs, int nouts, int& in1,
                          int& in2) {
    if (p.nb == 0 || p.n < 2) return false;
    const int d = p.nb - 1;
    if (p.size[d] < 8) return false;
    const i64 s1 = p.bstride[op1][d], s2 = p.bstride[op2][d];
    if (!((s1 == 0 || s1 == 1) && (s2 == 0 || s2 == 1) && (s1 | s2))) return false;
    if (p.astride[op1] == 1 || p.astride[op1] == -1) return false;
    for (int i = 0; i < nouts; ++i)
        if (p.bstride[outs[i]][d] != 1) return false;
    in1 = int(s1);
    in2 = int(s2);
    return true;
}

inline int run_guarded(const Call& call, RangeFn fn, i64 work_per_row, int nthreads) {
    const bool ok = parallel_rows(call.plan.rows, work_per_row, choose_threads(nthreads),
                                  [&](i64 r0, i64 r1) { fn(call, r0, r1); });
    return ok ? kOk : kInternal;
}

// ------------------------------------------------------------------ forward

// The broadcast shape of x1 and x2 (rank nd, at least 1) with axis in range.
inline int broadcast_rows(int nd1, const i64* shape1, int nd2, const i64* shape2, int axis, int& nd, i64* full) {
    const int nds[2] = {nd1, nd2};
    const i64* shapes[2] = {shape1, shape2};
    if (int st = broadcast_shapes(2, nds, shapes, nd, full)) return st;
    if (nd < 1) return kBadRank;
    if (axis < 0 || axis >= nd) return kBadAxis;
    return kOk;
}


inline int forward_pair(int dtype, int acc, const void* x1, int nd1, const i64* shape1, const i64* strides1,
                        const void* x2, int nd2, const i64* shape2, const i64* strides2, int axis, void* out,
                        const i64* out_strides, void* res, double eps, int nthreads) {
    if (!valid_dtype(dtype) || !valid_pair(dtype, acc)) return kBadDtype;
    int nd;
    i64 full[kMaxRank];
    if (int st = broadcast_rows(nd1, shape1, nd2, shape2, axis, nd, full)) return st;
    i64 strides[kMaxOps][kMaxRank];
    expand_strides(nd1, shape1, strides1, nd, strides[kFwdX1]);
    expand_strides(nd2, shape2, strides2, nd, strides[kFwdX2]);
    insert_axis(out_strides, nd, axis, strides[kFwdOut]);
    i64 res_shape[kMaxRank];
    for (int d = 0, k = 0; d < nd; ++d)
        if (d != axis) res_shape[k++] = full[d];
    residual_strides(nd, full, axis, nd - 1, res_shape, strides[kFwdRes]);
    Call call;
    call.dtype = dtype;
    call.acc = acc;
    call.eps = eps_for(eps, acc);
    if (int st = make_plan(nd, full, axis, 4, strides, call.plan)) return st;
    if (call.plan.rows == 0) return kOk;
    if (!out || ((!x1 || !x2) && call.plan.n > 0)) return kBadArgument;
    call.x1 = x1;
    call.x2 = x2;
    call.out = out;
    call.res = res;
    if (res) {  // (rows, 5) of acc, C order: 5 values per row
        const i64 n5[2] = {call.plan.rows, 5}, st5[2] = {5, 1};
        advise_huge_pages(res, 2, n5, st5, itemsize(acc));
    }
    const Plan& p = call.plan;
    if (p.astride[kFwdX1] == 1 && p.astride[kFwdX2] == 1) {
        call.layout = kRowContig;
    } else if (column_layout(p, kFwdX1, kFwdX2, nullptr, 0, call.col_inner1, call.col_inner2)) {
        call.layout = kColumn;
    } else {
        call.layout = kRowStrided;
    }
    return run_guarded(call, kernels_for(current_isa()).forward, p.n + 1, nthreads);
}

// The result of x1 and x2 (broadcast, without axis): its element count and C
// strides (for scratch results and residuals). Status as forward's checks.
inline int result_rows(int nd1, const i64* shape1, int nd2, const i64* shape2, int axis, i64& rows, i64* cst) {
    int nd;
    i64 full[kMaxRank];
    if (int st = broadcast_rows(nd1, shape1, nd2, shape2, axis, nd, full)) return st;
    rows = 1;
    for (int d = nd - 1, k = nd - 2; d >= 0; --d) {
        if (d == axis) continue;
        cst[k--] = rows;
        if (__builtin_mul_overflow(rows, full[d], &rows)) return kTooLarge;
    }
    return kOk;
}

// Float32 residuals (JAX without x64: no float64 arrays) from float64 sums.
// The (float32, float32) pair's compensated sums cost twice the float64 ones
// (32768 x 256, one thread: 4.7-5.2 ms against 2.2-2.6 for a forward that
// keeps residuals), and its residuals are used only by the VJP, which works
// from any accurate (s, n1s, n2s, m1, m2). So the forward runs the (float32,
// float64) pair, which writes the result (NumPy's bits), and rounds a row's
// residuals to float32 with m = 1 where that is the float32 pair's choice
// too: both sums of squares in its safe range [lo_th, hi_th], or 0. Other
// rows (to be rescaled in float32, or not finite) get the (float32, float32)
// pair's residuals, from a second pass made only then (its s discarded: the
// result stays the float64 sums'). Without residuals the (float32, float64)
// pair alone: the same result either way. The float64 residuals are a
// scratch of the call (40 bytes a row).
inline int forward(int dtype, int acc, const void* x1, int nd1, const i64* shape1, const i64* strides1,
                   const void* x2, int nd2, const i64* shape2, const i64* strides2, int axis, void* out,
                   const i64* out_strides, void* res, double eps, int nthreads) {
    if (!(dtype == kF32 && acc == kF32 && res))
        return forward_pair(dtype, dtype == kF32 && acc == kF32 ? int(kF64) : acc, x1, nd1, shape1, strides1, x2,
                            nd2, shape2, strides2, axis, out, out_strides, res, eps, nthreads);
    i64 rows, cst[kMaxRank];
    if (int st = result_rows(nd1, shape1, nd2, shape2, axis, rows, cst)) return st;
    if (rows == 0) return kOk;
    const std::unique_ptr<double[]> wide(new (std::nothrow) double[size_t(rows) * 5]);
    if (!wide) return kInternal;
    int st = forward_pair(kF32, kF64, x1, nd1, shape1, strides1, x2, nd2, shape2, strides2, axis, out, out_strides,
                          wide.get(), eps, nthreads);
    if (st != kOk) return st;
    const double lo = polycos_rows::Lim<float>::lo_th(), hi = polycos_rows::Lim<float>::hi_th();
    auto unscaled = [&](i64 i) {  // row i's norms both 0 or with squares in range (NaN: not)
        const double n1 = wide[i + 1], n2 = wide[i + 2];
        return (n1 == 0 || (n1 * n1 >= lo && n1 * n1 <= hi)) && (n2 == 0 || (n2 * n2 >= lo && n2 * n2 <= hi));
    };
    bool all = true;
    for (i64 i = 0; i < rows * 5 && all; i += 5) all = unscaled(i);
    if (!all) {  // the float32 pair's residuals first, then the unscaled rows' overwritten
        const std::unique_ptr<float[]> scratch(new (std::nothrow) float[size_t(rows)]);
        if (!scratch) return kInternal;
        st = forward_pair(kF32, kF32, x1, nd1, shape1, strides1, x2, nd2, shape2, strides2, axis, scratch.get(),
                          cst, res, eps, nthreads);
        if (st != kOk) return st;
    }
    float* q = static_cast<float*>(res);
    for (i64 i = 0; i < rows * 5; i += 5) {
        if (all || unscaled(i)) {
            q[i] = float(wide[i]);
            q[i + 1] = float(wide[i + 1]);
            q[i + 2] = float(wide[i + 2]);
            q[i + 3] = q[i + 4] = 1.0f;
        }
    }
    return kOk;
}

// ------------------------------------------------------------------ backward

inline int backward_pair(int dtype, int acc, int out_dtype, const void* x1, int nd1, const i64* shape1,
                         const i64* strides1, const void* x2, int nd2, const i64* shape2, const i64* strides2,
                         int axis, int g_dtype, const void* g, int ndg, const i64* shapeg, const i64* stridesg,
                         const void* res, void* d1, const i64* d1_strides, void* d2, const i64* d2_strides,
                         double eps, int nthreads) {
    if (!valid_dtype(dtype) || !valid_pair(dtype, acc)) return kBadDtype;
    if (out_dtype != dtype && out_dtype != acc) return kBadDtype;
    if (g_dtype != dtype && g_dtype != acc) return kBadDtype;
    // The shape of x1, x2 broadcast; axis indexes it.
    const int nds12[2] = {nd1, nd2};
    const i64* shapes12[2] = {shape1, shape2};
    int nd12;
    i64 full12[kMaxRank];
    if (int st = broadcast_shapes(2, nds12, shapes12, nd12, full12)) return st;
    if (nd12 < 1) return kBadRank;
    if (axis < 0 || axis >= nd12) return kBadAxis;
    if (ndg < 0 || ndg + 1 > kMaxRank) return kBadRank;
    // g broadcasts against the result: a unit axis is inserted at the axis'
    // position counted from the end, then x1, x2 and g broadcast together (g may
    // add leading or size-1 dims: e.g. JAX's vmap of the VJP over cotangents).
    const int from_end = nd12 - axis;  // >= 1
    const int ndg_full = std::max(ndg + 1, from_end);
    i64 gshape[kMaxRank], gstr[kMaxRank];
    {
        const int pos = ndg_full - from_end;
        for (int d = ndg_full - 1, k = ndg - 1; d >= 0; --d) {
            if (d == pos || k < 0) {
                gshape[d] = 1;
                gstr[d] = 0;
            } else {
                gshape[d] = shapeg[k];
                gstr[d] = stridesg[k];
                --k;
            }
        }
    }
    const int nds[3] = {nd1, nd2, ndg_full};
    const i64* shapes[3] = {shape1, shape2, gshape};
    int nd;
    i64 full[kMaxRank];
    if (int st = broadcast_shapes(3, nds, shapes, nd, full)) return st;
    const int ax = nd - from_end;
    i64 strides[kMaxOps][kMaxRank];
    expand_strides(nd1, shape1, strides1, nd, strides[kBwdX1]);
    expand_strides(nd2, shape2, strides2, nd, strides[kBwdX2]);
    expand_strides(ndg_full, gshape, gstr, nd, strides[kBwdG]);
    i64 res_shape[kMaxRank];
    for (int d = 0, k = 0; d < nd12; ++d)
        if (d != axis) res_shape[k++] = full12[d];
    residual_strides(nd, full, ax, nd12 - 1, res_shape, strides[kBwdRes]);
    for (int d = 0; d < nd; ++d) {
        strides[kBwdD1][d] = full[d] == 1 ? 0 : d1_strides[d];
        strides[kBwdD2][d] = full[d] == 1 ? 0 : d2_strides[d];
    }
    Call call;
    call.dtype = dtype;
    call.acc = acc;
    call.out_dtype = out_dtype;
    call.g_dtype = g_dtype;
    call.eps = eps_for(eps, acc);
    if (int st = make_plan(nd, full, ax, 6, strides, call.plan)) return st;
    if (call.plan.rows == 0 || call.plan.n == 0) return kOk;  // no gradient element to write
    if (!x1 || !x2 || !g || !d1 || !d2) return kBadArgument;
    call.x1 = x1;
    call.x2 = x2;
    call.g = g;
    call.res_in = res;
    call.d1 = d1;
    call.d2 = d2;
    const int osz = itemsize(out_dtype);
    advise_huge_pages(d1, nd, full, strides[kBwdD1], osz);
    if (d2 != d1) advise_huge_pages(d2, nd, full, strides[kBwdD2], osz);
    const Plan& p = call.plan;
    const int outs[2] = {kBwdD1, kBwdD2};
    if (p.astride[kBwdX1] == 1 && p.astride[kBwdX2] == 1 && p.astride[kBwdD1] == 1 &&
        p.astride[kBwdD2] == 1) {
        call.layout = kRowContig;
    } else if (column_layout(p, kBwdX1, kBwdX2, outs, 2, call.col_inner1, call.col_inner2)) {
        call.layout = kColumn;
    } else {
        call.layout = kRowStrided;
    }
    call.stream = call.layout == kRowContig && 2 * p.rows * p.n * osz >= stream_threshold() &&
                  whole_lines(d1, p, kBwdD1, osz) && whole_lines(d2, p, kBwdD2, osz) &&
                  resident(d1, nd, full, strides[kBwdD1], osz) && resident(d2, nd, full, strides[kBwdD2], osz);
    if (call.stream) stream_calls().fetch_add(1, std::memory_order_relaxed);
    return run_guarded(call, kernels_for(current_isa()).backward, (res ? 2 : 3) * p.n + 1, nthreads);
}

// The VJP. (float32, float32) without residuals takes them from forward
// first (a scratch of the call), so that its gradients are those of the VJP
// from forward's residuals, whose float64 sums no row loop here repeats.
inline int backward(int dtype, int acc, int out_dtype, const void* x1, int nd1, const i64* shape1,
                    const i64* strides1, const void* x2, int nd2, const i64* shape2, const i64* strides2,
                    int axis, int g_dtype, const void* g, int ndg, const i64* shapeg, const i64* stridesg,
                    const void* res, void* d1, const i64* d1_strides, void* d2, const i64* d2_strides,
                    double eps, int nthreads) {
    if (dtype == kF32 && acc == kF32 && !res && valid_dtype(out_dtype)) {
        i64 rows, cst[kMaxRank];
        if (int st = result_rows(nd1, shape1, nd2, shape2, axis, rows, cst)) return st;
        if (rows > 0) {
            const std::unique_ptr<float[]> value(new (std::nothrow) float[size_t(rows)]);
            const std::unique_ptr<float[]> stats(new (std::nothrow) float[size_t(rows) * 5]);
            if (!value || !stats) return kInternal;
            if (int st = forward(kF32, kF32, x1, nd1, shape1, strides1, x2, nd2, shape2, strides2, axis,
                                 value.get(), cst, stats.get(), eps, nthreads))
                return st;
            return backward_pair(dtype, acc, out_dtype, x1, nd1, shape1, strides1, x2, nd2, shape2, strides2, axis,
                                 g_dtype, g, ndg, shapeg, stridesg, stats.get(), d1, d1_strides, d2, d2_strides, eps,
                                 nthreads);
        }
    }
    return backward_pair(dtype, acc, out_dtype, x1, nd1, shape1, strides1, x2, nd2, shape2, strides2, axis,
                         g_dtype, g, ndg, shapeg, stridesg, res, d1, d1_strides, d2, d2_strides, eps, nthreads);
}

// ------------------------------------------------------------------ normalize_rows

// out_dtype: the dtype of xhat, acc (default, -1) or dtype.
inline int normalize(int dtype, int acc, const void* x, int ndx, const i64* shape, const i64* strides,
                     void* xhat, const i64* xhat_strides, void* cs, void* ns, void* m, double eps,
                     int nthreads, int out_dtype = -1) {
    if (!valid_dtype(dtype) || !valid_pair(dtype, acc)) return kBadDtype;
    if (out_dtype < 0) out_dtype = acc;
    if (out_dtype != acc && out_dtype != dtype) return kBadDtype;
    if (ndx < 1 || ndx > kMaxRank) return kBadRank;
    for (int d = 0; d < ndx; ++d)
        if (shape[d] < 0) return kBadShape;
    i64 st[kMaxOps][kMaxRank];
    for (int d = 0; d < ndx; ++d) {
        st[kNrmX][d] = shape[d] == 1 ? 0 : strides[d];
        st[kNrmXhat][d] = shape[d] == 1 ? 0 : xhat_strides[d];
    }
    Call call;
    call.dtype = dtype;
    call.acc = acc;
    call.out_dtype = out_dtype;
    call.eps = eps_for(eps, acc);
    if (int s = make_plan(ndx, shape, ndx - 1, 2, st, call.plan)) return s;
    if (call.plan.rows == 0) return kOk;
    if ((!x || !xhat) && call.plan.n > 0) return kBadArgument;
    call.x1 = x;
    call.out = xhat;
    advise_huge_pages(xhat, ndx, shape, st[kNrmXhat], itemsize(out_dtype));
    call.cs = cs;
    call.ns = ns;
    call.m = m;
    call.layout = (call.plan.astride[kNrmX] == 1 && call.plan.astride[kNrmXhat] == 1) ? kRowContig
                                                                                     : kRowStrided;
    return run_guarded(call, kernels_for(current_isa()).normalize, 2 * call.plan.n + 1, nthreads);
}

// ------------------------------------------------------------------ the normalisation's VJP

// _core.row_normalize_vjp on `rows` contiguous rows of n values: h, v and d of
// dtype (float32 or float64: the pairwise VJP's product dtype), cs, ns, m of acc
// (one value per row; m null where the dtype is not rescaled).
inline int normalize_vjp(int dtype, int acc, i64 rows, i64 n, const void* h, const void* v, const void* cs,
                         const void* ns, const void* m, double eps, void* d, int nthreads) {
    if (!((dtype == kF32 && (acc == kF32 || acc == kF64)) || (dtype == kF64 && acc == kF64))) return kBadDtype;
    if (rows < 0 || n < 0) return kBadShape;
    if (rows == 0 || n == 0) return kOk;
    if (rows > INT64_MAX / n) return kTooLarge;
    if (!h || !v || !cs || !ns || !d) return kBadArgument;
    Call call;
    call.dtype = dtype;
    call.acc = acc;
    call.eps = eps_for(eps, acc);
    call.plan.rows = rows;
    call.plan.n = n;
    call.x1 = h;
    call.x2 = v;
    call.out = d;
    call.cs = const_cast<void*>(cs);
    call.ns = const_cast<void*>(ns);
    call.m = const_cast<void*>(m);
    return run_guarded(call, kernels_for(current_isa()).normalize_vjp, 3 * n + 1, nthreads);
}

}  // namespace polycos_cpu

// ====================================================================== C ABI (ctypes)

using polycos_cpu::i64;

POLYCOS_API int polycos_abi_version(void) { return 2; }

// Cosine similarity along `axis` of x1 and x2 broadcast together.
//   dtype, acc       storage and accumulation dtype codes (0 f16, 1 bf16, 2 f32, 3 f64)
//   x*, nd*, shape*, strides*   each input: pointer, rank, shape, strides in elements
//   axis             index into the broadcast shape (>= 0)
//   out, out_strides the result (dtype), strides over the broadcast shape without axis
//   res              NULL, or a C-contiguous (rows, 5) array of acc: (s, n1s, n2s, m1, m2)
//                    per row, rows in C order over the result shape
// Returns 0, 1 (pass contiguous copies), or a negative error code.
POLYCOS_API int polycos_forward(int dtype, int acc, const void* x1, int nd1, const int64_t* shape1,
                                const int64_t* strides1, const void* x2, int nd2, const int64_t* shape2,
                                const int64_t* strides2, int axis, void* out, const int64_t* out_strides,
                                void* res, double eps, int nthreads) {
    return polycos_cpu::forward(dtype, acc, x1, nd1, (const i64*)shape1, (const i64*)strides1, x2, nd2,
                                (const i64*)shape2, (const i64*)strides2, axis, out,
                                (const i64*)out_strides, res, eps, nthreads);
}

// The VJP: d1, d2 over the full shape (x1, x2 and g broadcast together, g with
// a unit axis inserted), in out_dtype (dtype, or acc for callers that sum
// broadcast rows themselves). g (g_dtype: dtype or acc) broadcasts against the
// result. res: NULL (the row statistics are recomputed) or forward's residuals
// for x1, x2 (C order over their result shape).
POLYCOS_API int polycos_backward(int dtype, int acc, int out_dtype, const void* x1, int nd1,
                                 const int64_t* shape1, const int64_t* strides1, const void* x2, int nd2,
                                 const int64_t* shape2, const int64_t* strides2, int axis, int g_dtype,
                                 const void* g, int ndg, const int64_t* shapeg, const int64_t* stridesg,
                                 const void* res, void* d1, const int64_t* d1_strides, void* d2,
                                 const int64_t* d2_strides, double eps, int nthreads) {
    return polycos_cpu::backward(dtype, acc, out_dtype, x1, nd1, (const i64*)shape1, (const i64*)strides1,
                                 x2, nd2, (const i64*)shape2, (const i64*)strides2, axis, g_dtype, g, ndg,
                                 (const i64*)shapeg, (const i64*)stridesg, res, d1,
                                 (const i64*)d1_strides, d2, (const i64*)d2_strides, eps, nthreads);
}

// Rows along the last axis normalised: xhat (acc, strides over shape) and per
// row cs, ns, m (acc, each NULL or C-contiguous over the rows).
POLYCOS_API int polycos_normalize_rows(int dtype, int acc, const void* x, int nd, const int64_t* shape,
                                       const int64_t* strides, void* xhat, const int64_t* xhat_strides,
                                       void* cs, void* ns, void* m, double eps, int nthreads) {
    return polycos_cpu::normalize(dtype, acc, x, nd, (const i64*)shape, (const i64*)strides, xhat,
                                  (const i64*)xhat_strides, cs, ns, m, eps, nthreads);
}

// The pairwise fast path (NumPy): the rows of x1 (rows1 x n) and then of x2
// (rows2 x n; rows2 = 0 for none), both C-contiguous, normalised into one
// C-contiguous (rows1 + rows2) x n array xhat of out_dtype (acc, or dtype:
// rounded once), and, when stats is not NULL, per-row cs, ns, m of acc into
// stats[0:R], stats[R:2R], stats[2R:3R] (R = rows1 + rows2).
POLYCOS_API int polycos_normalize_pair(int dtype, int acc, int out_dtype, const void* x1, int64_t rows1,
                                       const void* x2, int64_t rows2, int64_t n, void* xhat, void* stats,
                                       double eps, int nthreads) {
    if (rows1 < 0 || rows2 < 0 || n < 0) return polycos_cpu::kBadShape;
    if (!polycos_cpu::valid_dtype(acc)) return polycos_cpu::kBadDtype;
    const int asz = polycos_cpu::itemsize(acc);
    const int osz = polycos_cpu::itemsize(out_dtype < 0 ? acc : out_dtype);
    const i64 total = rows1 + rows2;
    char* st = static_cast<char*>(stats);
    const i64 strides[2] = {n, 1};
    const void* xs[2] = {x1, x2};
    const i64 rows[2] = {rows1, rows2};
    i64 first = 0;
    for (int k = 0; k < 2; ++k) {
        if (rows[k] == 0) continue;
        const i64 shape[2] = {rows[k], n};
        char* cs = st ? st + first * asz : nullptr;
        char* ns = st ? st + (total + first) * asz : nullptr;
        char* m = st ? st + (2 * total + first) * asz : nullptr;
        const int r = polycos_cpu::normalize(dtype, acc, xs[k], 2, shape, strides,
                                             static_cast<char*>(xhat) + first * n * osz, strides, cs, ns, m,
                                             eps, nthreads, out_dtype);
        if (r != 0) return r;
        first += rows[k];
    }
    return 0;
}

// The VJP of the row normalisation (_core.row_normalize_vjp) on rows x n
// C-contiguous arrays h (xhat), v (cotangent), d (result; may be v itself) of
// dtype (float32 or float64), with per-row cs, ns, m of acc at stats[0:rows],
// stats[rows:2 rows], stats[2 rows:3 rows] (m read only when rescaled).
POLYCOS_API int polycos_normalize_vjp(int dtype, int acc, int64_t rows, int64_t n, const void* h, const void* v,
                                      const void* stats, int rescaled, double eps, void* d, int nthreads) {
    if (!polycos_cpu::valid_dtype(acc)) return polycos_cpu::kBadDtype;
    const char* st = static_cast<const char*>(stats);
    const int asz = polycos_cpu::itemsize(acc);
    return polycos_cpu::normalize_vjp(dtype, acc, rows, n, h, v, st, st ? st + rows * asz : nullptr,
                                      (st && rescaled) ? st + 2 * rows * asz : nullptr, eps, d, nthreads);
}

// The clamp and rounding of _core.pairwise_product for a float32 result:
// out[r * out_stride + i] = float(clip(p[r * cols + i], -1, 1)) for `rows` rows
// of `cols` C-contiguous float64 values (NaN stays NaN): the pairwise paths call
// it on each float64 block of the product, in cache, writing that block of the
// float32 result (rows out_stride elements apart).
POLYCOS_API int polycos_clamp_round_rows(const void* p, int64_t rows, int64_t cols, void* out,
                                         int64_t out_stride) {
    if (rows < 0 || cols < 0 || (rows > 1 && out_stride < cols)) return polycos_cpu::kBadShape;
    if (rows > 0 && cols > 0 && (!p || !out)) return polycos_cpu::kBadArgument;
    for (int64_t r = 0; r < rows; ++r) {
        const double* src = static_cast<const double*>(p) + r * cols;
        float* dst = static_cast<float*>(out) + r * out_stride;
        for (int64_t i = 0; i < cols; ++i) {
            const double v = src[i];
            dst[i] = static_cast<float>(v < -1.0 ? -1.0 : (v > 1.0 ? 1.0 : v));
        }
    }
    return 0;
}

// Ask for transparent huge pages on nbytes of new memory at p before anything
// writes it (advise_huge_pages on a contiguous span; nothing below 4 MiB; a
// hint: no data changes). The pairwise paths write their float32 result a
// block at a time; torch allocates it in 4 KiB pages (16385 first-touch faults
// per 4096 x 4096 result), NumPy advises its own allocations.
POLYCOS_API int polycos_advise_huge_pages(void* p, int64_t nbytes) {
    if (nbytes < 0) return polycos_cpu::kBadShape;
    polycos_cpu::advise_huge_span(p, nbytes);
    return 0;
}

// polycos_clamp_round_rows on n contiguous values.
POLYCOS_API int polycos_clamp_round(const void* p, int64_t n, void* out) {
    return polycos_clamp_round_rows(p, 1, n, out, n);
}

POLYCOS_API const char* polycos_status_message(int code) {
    switch (code) {
        case polycos_cpu::kOk: return "ok";
        case polycos_cpu::kNeedContiguous: return "too many batch dimensions remain after coalescing";
        case polycos_cpu::kBadDtype: return "unsupported dtype combination";
        case polycos_cpu::kBadShape: return "shapes do not broadcast";
        case polycos_cpu::kBadAxis: return "axis out of range";
        case polycos_cpu::kBadRank: return "rank out of range";
        case polycos_cpu::kTooLarge: return "element count overflows 64 bits";
        case polycos_cpu::kInternal: return "internal error (out of memory?)";
        case polycos_cpu::kBadArgument: return "null pointer for a non-empty array";
        default: return "unknown status";
    }
}

// ISA clones: 0 baseline x86-64 (or the only build elsewhere), 1 AVX2+FMA.
POLYCOS_API int polycos_isa(void) { return polycos_cpu::current_isa(); }
POLYCOS_API int polycos_isa_available(int isa) {
    if (isa == polycos_cpu::kIsaAvx2 && !POLYCOS_HAVE_AVX2_CLONE) return 0;
    return polycos_cpu::isa_supported(isa) ? 1 : 0;
}
POLYCOS_API int polycos_set_isa(int isa) {
    if (isa < 0) isa = polycos_cpu::best_isa();
    if (!polycos_isa_available(isa)) return -1;
    polycos_cpu::g_isa.store(isa, std::memory_order_relaxed);
    return isa;
}
POLYCOS_API int polycos_max_batch_dims(void) { return polycos_cpu::kMaxBatch; }

// ------------------------------------------------------------------ test hooks (bitwise mirrors)

// The VJP's streaming-store threshold in bytes of both gradients (stream_threshold):
// bytes >= 0 sets it (0: every VJP that may stream does), -1 restores the default
// (half the L3 size). Returns the threshold in force before the call.
POLYCOS_API int64_t polycos_set_stream_bytes(int64_t bytes) {
    const int64_t before = polycos_cpu::stream_threshold();
    polycos_cpu::stream_bytes_override().store(bytes < 0 ? -1 : bytes, std::memory_order_relaxed);
    return before;
}
// How many backward calls so far wrote their gradients with streaming stores.
POLYCOS_API int64_t polycos_stream_calls(void) { return polycos_cpu::stream_calls().load(); }

// The range limits of the rescue test (rows.h Lim<A>) as doubles.
POLYCOS_API int polycos_range_limits(int acc, double* lo, double* hi) {
    if (acc == polycos_cpu::kF32) {
        *lo = polycos_rows::Lim<float>::lo_th();
        *hi = polycos_rows::Lim<float>::hi_th();
    } else if (acc == polycos_cpu::kF64) {
        *lo = polycos_rows::Lim<double>::lo_th();
        *hi = polycos_rows::Lim<double>::hi_th();
    } else {
        return polycos_cpu::kBadDtype;
    }
    return 0;
}

namespace polycos_cpu {
template <typename A, bool C>
void test_finish(i64 n, const A* const* w, double eps, A* out) {
    FpEnvGuard env;
    for (i64 i = 0; i < n; ++i) {
        const Res5<A> r = polycos_rows::finish<C>(w[0][i], w[1][i], w[2][i], w[3][i], w[4][i], w[5][i],
                                                      w[6][i], w[7][i], A(eps));
        out[5 * i + 0] = r.s;
        out[5 * i + 1] = r.n1s;
        out[5 * i + 2] = r.n2s;
        out[5 * i + 3] = r.m1;
        out[5 * i + 4] = r.m2;
    }
}

template <typename A, bool R>
void test_grad(i64 rows, i64 d, const A* a1, const A* a2, const A* g, const A* res, double eps, A* d1,
               A* d2) {
    FpEnvGuard env;
    for (i64 r = 0; r < rows; ++r) {
        const Res5<A> st = {res[5 * r], res[5 * r + 1], res[5 * r + 2], res[5 * r + 3], res[5 * r + 4]};
        const GradCoefs<A> k = polycos_rows::grad_coefficients<R>(g[r], st, A(eps));
        const bool div = R && (k.m1 != A(1) || k.m2 != A(1));
        for (i64 j = 0; j < d; ++j) {
            A o1, o2;
            if (div)
                polycos_rows::grad_element<true>(a1[r * d + j], a2[r * d + j], k, o1, o2);
            else
                polycos_rows::grad_element<false>(a1[r * d + j], a2[r * d + j], k, o1, o2);
            d1[r * d + j] = o1;
            d2[r * d + j] = o2;
        }
    }
}
}  // namespace polycos_cpu

// rows.h finish on arrays of n per-row sums (each an array of acc): w12, w11,
// w22, l12, l11, l22, m1, m2 -> out (n, 5).
POLYCOS_API int polycos_test_finish(int acc, int compensated, int64_t n, const void* w12, const void* w11,
                                    const void* w22, const void* l12, const void* l11, const void* l22,
                                    const void* m1, const void* m2, double eps, void* out) {
    using namespace polycos_cpu;
    const void* w[8] = {w12, w11, w22, l12, l11, l22, m1, m2};
    if (acc == kF32) {
        if (compensated)
            test_finish<float, true>(n, (const float* const*)w, eps, (float*)out);
        else
            test_finish<float, false>(n, (const float* const*)w, eps, (float*)out);
    } else if (acc == kF64) {
        if (compensated)
            test_finish<double, true>(n, (const double* const*)w, eps, (double*)out);
        else
            test_finish<double, false>(n, (const double* const*)w, eps, (double*)out);
    } else {
        return kBadDtype;
    }
    return kOk;
}

// rows.h grad_coefficients + grad_element on rows x d arrays of acc (a1, a2:
// the widened inputs), g (rows) and residuals (rows, 5) -> d1, d2 (rows x d).
POLYCOS_API int polycos_test_grad(int acc, int rescaled, int64_t rows, int64_t d, const void* a1,
                                  const void* a2, const void* g, const void* res, double eps, void* d1,
                                  void* d2) {
    using namespace polycos_cpu;
    if (acc == kF32) {
        if (rescaled)
            test_grad<float, true>(rows, d, (const float*)a1, (const float*)a2, (const float*)g,
                                   (const float*)res, eps, (float*)d1, (float*)d2);
        else
            test_grad<float, false>(rows, d, (const float*)a1, (const float*)a2, (const float*)g,
                                    (const float*)res, eps, (float*)d1, (float*)d2);
    } else if (acc == kF64) {
        if (rescaled)
            test_grad<double, true>(rows, d, (const double*)a1, (const double*)a2, (const double*)g,
                                    (const double*)res, eps, (double*)d1, (double*)d2);
        else
            test_grad<double, false>(rows, d, (const double*)a1, (const double*)a2, (const double*)g,
                                     (const double*)res, eps, (double*)d1, (double*)d2);
    } else {
        return kBadDtype;
    }
    return kOk;
}

// The row iterator on a virtual problem (no memory touched): builds the plan
// of `shape` (rank nd, reduced along axis) for `nops` operands with element
// strides `strides` (nops x nd, row-major) and writes each operand's offset of
// row `row` (seek) into out[0:nops] and of row `row + 1` (seek, then next)
// into out[nops:2 nops]. Returns the plan status.
POLYCOS_API int polycos_test_row_offsets(int nd, const int64_t* shape, int axis, int nops, const int64_t* strides,
                                         int64_t row, int64_t* out) {
    using namespace polycos_cpu;
    if (nd < 1 || nd > kMaxRank || nops < 1 || nops > kMaxOps || axis < 0 || axis >= nd) return kBadArgument;
    i64 full[kMaxOps][kMaxRank];
    for (int o = 0; o < nops; ++o)
        for (int d = 0; d < nd; ++d) full[o][d] = strides[o * nd + d];
    Plan p;
    const int st = make_plan(nd, (const i64*)shape, axis, nops, full, p);
    if (st != kOk || p.rows == 0) return st;
    Cursor<> cur;
    cur.seek(p, row);
    for (int o = 0; o < nops; ++o) out[o] = cur.off[o];
    cur.next(p);
    for (int o = 0; o < nops; ++o) out[nops + o] = cur.off[o];
    return kOk;
}

// ====================================================================== XLA FFI handlers (jax.ffi)

#ifndef POLYCOS_NO_XLA_FFI
#include "xla/ffi/api/ffi.h"

namespace polycos_xla {

namespace ffi = xla::ffi;
using polycos_cpu::i64;

inline int code_of(ffi::DataType t) {
    switch (t) {
        case ffi::DataType::F16: return polycos_cpu::kF16;
        case ffi::DataType::BF16: return polycos_cpu::kBF16;
        case ffi::DataType::F32: return polycos_cpu::kF32;
        case ffi::DataType::F64: return polycos_cpu::kF64;
        default: return -1;
    }
}

// Row-major strides (XLA's default layout for custom-call operands).
struct Dims {
    int nd = 0;
    i64 shape[polycos_cpu::kMaxRank];
    i64 strides[polycos_cpu::kMaxRank];
    explicit Dims(ffi::AnyBuffer::Dimensions dims) {
        nd = int(dims.size());
        if (nd > polycos_cpu::kMaxRank) nd = -1;
        i64 step = 1;
        for (int d = (nd > 0 ? nd : 0) - 1; d >= 0; --d) {
            shape[d] = dims[d];
            strides[d] = step;
            step *= std::max<i64>(dims[d], 1);
        }
    }
};

// Copies an operand (row-major dims `d`) broadcast to `full` into `buf`, C
// order: the fallback when a layout keeps more unmergeable batch dimensions
// than the kernel walks.
inline void materialize(const void* src, int itemsize, const Dims& d, int nd, const i64* full,
                        std::vector<char>& buf) {
    i64 total = 1;
    for (int k = 0; k < nd; ++k) total *= full[k];
    buf.resize(size_t(std::max<i64>(total, 1)) * size_t(itemsize));
    i64 st[polycos_cpu::kMaxRank];
    polycos_cpu::expand_strides(d.nd, d.shape, d.strides, nd, st);
    i64 idx[polycos_cpu::kMaxRank] = {};
    i64 off = 0;
    for (i64 i = 0; i < total; ++i) {
        std::memcpy(buf.data() + i * itemsize, (const char*)src + off * itemsize, size_t(itemsize));
        for (int k = nd - 1; k >= 0; --k) {
            off += st[k];
            if (++idx[k] < full[k]) break;
            off -= st[k] * full[k];
            idx[k] = 0;
        }
    }
}

inline void c_strides(int nd, const i64* shape, i64* out) {
    i64 step = 1;
    for (int k = nd - 1; k >= 0; --k) {
        out[k] = step;
        step *= std::max<i64>(shape[k], 1);
    }
}

inline ffi::Error status_error(int st) {
    return ffi::Error::InvalidArgument(std::string("polycos: ") + polycos_status_message(st));
}

// axis: negative (from the end of the broadcast shape), so that it stays
// right when vmap prepends batch dimensions.
inline int resolve_axis(int64_t axis, int nd) { return int(axis < 0 ? axis + nd : axis); }

// No exception may reach XLA: the handlers run their work through this.
template <class F> ffi::Error no_throw(const F& f) {
    try {
        return f();
    } catch (...) {
        return ffi::Error::Internal("polycos: out of memory in the CPU kernel");
    }
}

// res_data: the (*result, 5) residuals of accumulation dtype `a`, or nullptr (the value only).
ffi::Error forward_body(ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::Result<ffi::AnyBuffer> out, int a,
                        void* res_data, int64_t axis, double eps, int64_t nthreads);

ffi::Error forward_impl(ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::AnyBuffer> res, int64_t axis, double eps, int64_t nthreads) {
    return no_throw([&] {
        return forward_body(x1, x2, out, code_of(res->element_type()), res->untyped_data(), axis, eps, nthreads);
    });
}

// The value without residuals (nobody differentiates): 5 accumulation-dtype
// values per row fewer to write (at D = 16 in float32, 40 of 168 bytes a row).
// The accumulation dtype code as an attribute, as for the recomputing backward.
ffi::Error forward_value_impl(ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::Result<ffi::AnyBuffer> out,
                              int64_t axis, double eps, int64_t nthreads, int64_t acc) {
    return no_throw([&] { return forward_body(x1, x2, out, int(acc), nullptr, axis, eps, nthreads); });
}

ffi::Error forward_body(ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::Result<ffi::AnyBuffer> out, int a,
                        void* res_data, int64_t axis, double eps, int64_t nthreads) {
    const int t = code_of(x1.element_type());
    if (t < 0 || code_of(x2.element_type()) != t || code_of(out->element_type()) != t)
        return status_error(polycos_cpu::kBadDtype);
    Dims d1(x1.dimensions()), d2(x2.dimensions()), dout(out->dimensions());
    const int nd = std::max(d1.nd, d2.nd);
    const int ax = resolve_axis(axis, nd);
    int st = polycos_cpu::forward(t, a, x1.untyped_data(), d1.nd, d1.shape, d1.strides, x2.untyped_data(), d2.nd,
                             d2.shape, d2.strides, ax, out->untyped_data(), dout.strides, res_data, eps,
                             int(nthreads));
    if (st == polycos_cpu::kNeedContiguous) {  // copy both inputs broadcast, then at most 2 batch dims
        const int nds[2] = {d1.nd, d2.nd};
        const i64* shapes[2] = {d1.shape, d2.shape};
        int ndf;
        i64 full[polycos_cpu::kMaxRank], cst[polycos_cpu::kMaxRank];
        polycos_cpu::broadcast_shapes(2, nds, shapes, ndf, full);
        std::vector<char> b1, b2;
        const int isz = polycos_cpu::itemsize(t);
        materialize(x1.untyped_data(), isz, d1, ndf, full, b1);
        materialize(x2.untyped_data(), isz, d2, ndf, full, b2);
        c_strides(ndf, full, cst);
        st = polycos_cpu::forward(t, a, b1.data(), ndf, full, cst, b2.data(), ndf, full, cst, ax,
                             out->untyped_data(), dout.strides, res_data, eps, int(nthreads));
    }
    return st == 0 ? ffi::Error::Success() : status_error(st);
}

ffi::Error backward_common(ffi::AnyBuffer g, ffi::AnyBuffer x1, ffi::AnyBuffer x2, const ffi::AnyBuffer* res,
                           ffi::Result<ffi::AnyBuffer> d1, ffi::Result<ffi::AnyBuffer> d2, int64_t axis,
                           double eps, int64_t nthreads, int acc_hint) {
    const int t = code_of(x1.element_type());
    const int o = code_of(d1->element_type());
    if (t < 0 || code_of(x2.element_type()) != t || code_of(d2->element_type()) != o)
        return status_error(polycos_cpu::kBadDtype);
    const int a = res ? code_of(res->element_type()) : acc_hint;
    Dims dx1(x1.dimensions()), dx2(x2.dimensions()), dg(g.dimensions()), dd(d1->dimensions());
    const int nd12 = std::max(dx1.nd, dx2.nd);
    const int ax = resolve_axis(axis, nd12);
    const int gt = code_of(g.element_type());
    if (res) {  // forward's residuals: (*result of x1 and x2, 5)
        const int nds[2] = {dx1.nd, dx2.nd};
        const i64* shapes[2] = {dx1.shape, dx2.shape};
        int nd;
        i64 full[polycos_cpu::kMaxRank];
        if (polycos_cpu::broadcast_shapes(2, nds, shapes, nd, full) == 0 && ax >= 0 && ax < nd) {
            Dims dr(res->dimensions());
            bool ok = dr.nd == nd && dr.shape[nd - 1] == 5;
            for (int k = 0, j = 0; ok && k < nd; ++k)
                if (k != ax) ok = dr.shape[j++] == full[k];
            if (!ok) return ffi::Error::InvalidArgument("polycos: residuals do not match the inputs' shape");
        }
    }
    const void* res_data = res ? res->untyped_data() : nullptr;
    int st = polycos_cpu::backward(t, a, o, x1.untyped_data(), dx1.nd, dx1.shape, dx1.strides, x2.untyped_data(),
                              dx2.nd, dx2.shape, dx2.strides, ax, gt, g.untyped_data(), dg.nd, dg.shape,
                              dg.strides, res_data, d1->untyped_data(), dd.strides, d2->untyped_data(),
                              dd.strides, eps, int(nthreads));
    if (st == polycos_cpu::kNeedContiguous) {
        // Copy x1, x2 broadcast to the gradients' (full) shape, g and the
        // residuals broadcast to its result part: then at most 2 batch dims.
        const int ndf = dd.nd;
        const int axf = ndf - (nd12 - ax);
        const int isz = polycos_cpu::itemsize(t);
        std::vector<char> b1, b2, bg, br;
        materialize(x1.untyped_data(), isz, dx1, ndf, dd.shape, b1);
        materialize(x2.untyped_data(), isz, dx2, ndf, dd.shape, b2);
        i64 rfull[polycos_cpu::kMaxRank], gst[polycos_cpu::kMaxRank];
        for (int k = 0, j = 0; k < ndf; ++k)
            if (k != axf) rfull[j++] = dd.shape[k];
        materialize(g.untyped_data(), polycos_cpu::itemsize(gt), dg, ndf - 1, rfull, bg);
        c_strides(ndf - 1, rfull, gst);
        if (res) {  // (*result, 5) broadcast to (*full result, 5)
            Dims dr(res->dimensions());
            rfull[ndf - 1] = 5;
            materialize(res->untyped_data(), polycos_cpu::itemsize(a), dr, ndf, rfull, br);
            res_data = br.data();
        }
        st = polycos_cpu::backward(t, a, o, b1.data(), ndf, dd.shape, dd.strides, b2.data(), ndf, dd.shape,
                              dd.strides, axf, gt, bg.data(), ndf - 1, rfull, gst, res_data,
                              d1->untyped_data(), dd.strides, d2->untyped_data(), dd.strides, eps,
                              int(nthreads));
    }
    return st == 0 ? ffi::Error::Success() : status_error(st);
}

ffi::Error backward_impl(ffi::AnyBuffer g, ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::AnyBuffer res,
                         ffi::Result<ffi::AnyBuffer> d1, ffi::Result<ffi::AnyBuffer> d2, int64_t axis,
                         double eps, int64_t nthreads) {
    return no_throw([&] { return backward_common(g, x1, x2, &res, d1, d2, axis, eps, nthreads, -1); });
}

// Without residuals (recomputed): the accumulation dtype code as an attribute.
ffi::Error backward_recompute_impl(ffi::AnyBuffer g, ffi::AnyBuffer x1, ffi::AnyBuffer x2,
                                   ffi::Result<ffi::AnyBuffer> d1, ffi::Result<ffi::AnyBuffer> d2,
                                   int64_t axis, double eps, int64_t nthreads, int64_t acc) {
    return no_throw([&] { return backward_common(g, x1, x2, nullptr, d1, d2, axis, eps, nthreads, int(acc)); });
}

ffi::Error normalize_impl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> xhat, ffi::Result<ffi::AnyBuffer> cs,
                          ffi::Result<ffi::AnyBuffer> ns, ffi::Result<ffi::AnyBuffer> m, double eps,
                          int64_t nthreads) {
    const int t = code_of(x.element_type()), a = code_of(xhat->element_type());
    Dims dx(x.dimensions());
    const int st = polycos_cpu::normalize(t, a, x.untyped_data(), dx.nd, dx.shape, dx.strides,
                                          xhat->untyped_data(), dx.strides, cs->untyped_data(),
                                          ns->untyped_data(), m->untyped_data(), eps, int(nthreads));
    return st == 0 ? ffi::Error::Success() : status_error(st);
}

// A new result whose contents nothing writes here, advised for huge pages: the
// initial value of a loop that overwrites every element (JAX's blocked pairwise
// product), instead of zeros XLA would write, first-touching it in 4 KiB pages.
ffi::Error uninitialized_impl(ffi::Result<ffi::AnyBuffer> out) {
    polycos_cpu::advise_huge_span(out->untyped_data(), i64(out->size_bytes()));
    return ffi::Error::Success();
}

}  // namespace polycos_xla

// The handlers are exported (the library is built with -fvisibility=hidden).
#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(PolycosXlaForward, polycos_xla::forward_impl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("axis")
                                  .Attr<double>("eps")
                                  .Attr<int64_t>("nthreads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PolycosXlaForwardValue, polycos_xla::forward_value_impl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("axis")
                                  .Attr<double>("eps")
                                  .Attr<int64_t>("nthreads")
                                  .Attr<int64_t>("acc"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PolycosXlaBackward, polycos_xla::backward_impl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("axis")
                                  .Attr<double>("eps")
                                  .Attr<int64_t>("nthreads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PolycosXlaBackwardRecompute, polycos_xla::backward_recompute_impl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<int64_t>("axis")
                                  .Attr<double>("eps")
                                  .Attr<int64_t>("nthreads")
                                  .Attr<int64_t>("acc"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PolycosXlaNormalizeRows, polycos_xla::normalize_impl,
                              xla::ffi::Ffi::Bind()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>()
                                  .Attr<double>("eps")
                                  .Attr<int64_t>("nthreads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PolycosXlaUninitialized, polycos_xla::uninitialized_impl,
                              xla::ffi::Ffi::Bind().Ret<xla::ffi::AnyBuffer>());
#pragma GCC visibility pop
#endif  // POLYCOS_NO_XLA_FFI


#else  // ================================================================ POLYCOS_CPU_LOOPS: part 2
// Compiled once per ISA clone, inside namespace polycos_cpu::isa_<name> under
// `#pragma GCC target`; no #include here. POLYCOS_VEC_BYTES: the clone's
// native vector width (16 for SSE2, 32 for AVX2). A row's lanes are held as
// Cf::L / W native vectors of W values; the arithmetic per lane and the lane
// tree do not depend on W, so every clone computes the same bits.

using polycos_rows::GradCoefs;
using polycos_rows::Res5;
using polycos_rows::dot2_add;
using polycos_rows::dot2_merge;
using polycos_rows::dot2_split;
using polycos_rows::splat;

constexpr int kVecBytes = POLYCOS_VEC_BYTES;

// A native vector of A and the number of values it holds.
template <typename A> struct Native {
    static constexpr int W = kVecBytes / int(sizeof(A));
    typedef A type __attribute__((vector_size(kVecBytes)));
};

// ------------------------------------------------------------------ conversions

template <typename To, typename From> PCI To bits_as(From x) { return __builtin_bit_cast(To, x); }

// float16 <-> float32 by bit manipulation (F. Giesen's exact conversions):
// exact widening (a NaN made quiet); round-to-nearest-even narrowing with
// subnormals, overflow to inf, NaN quiet with its payload's top bits. The
// bits of F16C's conversions (used by the AVX2 clone's vector loads/stores).
// U/F: uint32/float scalars or vectors of them.
template <typename U, typename F> PCI F half_to_float(U h) {
    const uint32_t shifted_exp = 0x7c00u << 13;
    U o = (h & 0x7fffu) << 13;
    const U e = o & shifted_exp;
    o = o + ((127u - 15u) << 23);
    o = (e == shifted_exp) ? U(o + ((128u - 16u) << 23)) : o;  // inf / NaN
    // NaN made quiet (as F16C's vcvtph2ps does, so that both clones propagate the same NaN)
    o = ((e == shifted_exp) & ((h & 0x3ffu) != 0u)) ? U(o | 0x400000u) : o;
    const F sub = bits_as<F>(U(o + (1u << 23))) - bits_as<F>(U(U{} + (113u << 23)));  // subnormal: exact
    o = (e == 0u) ? bits_as<U>(sub) : o;
    o = o | ((h & 0x8000u) << 16);
    return bits_as<F>(o);
}

template <typename U, typename F> PCI U float_to_half(F fv) {
    U f = bits_as<U>(fv);
    const U sign = f & 0x80000000u;
    f = f ^ sign;
    // normal results: round to nearest even on the 13 dropped bits
    const U mant_odd = (f >> 13) & 1u;
    const U normal = (f + ((((15u - 127u) << 23) + 0xfffu)) + mant_odd) >> 13;
    // subnormal results (|f| < 2^-14): the float addition rounds (RNE, no FTZ)
    const F magic = bits_as<F>(U(U{} + (126u << 23)));
    const U subn = bits_as<U>(F(bits_as<F>(f) + magic)) - bits_as<U>(magic);
    // overflow to inf; NaN stays NaN (quiet, top payload bits)
    const U big = (f > 0x7f800000u) ? U(((f >> 13) & 0x3ffu) | 0x7e00u) : U(U{} + 0x7c00u);
    U o = (f < (113u << 23)) ? subn : normal;
    o = (f >= ((127u + 16u) << 23)) ? big : o;
    return o | (sign >> 16);
}

// float32 -> bfloat16 bits, round to nearest even; NaN quiet, payload's top bits.
template <typename U, typename F> PCI U float_to_bf16(F fv) {
    const U u = bits_as<U>(fv);
    const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return ((u & 0x7fffffffu) > 0x7f800000u) ? U((u >> 16) | 0x40u) : rounded;
}

// Stored values (T) <-> a native vector of A: load/store W contiguous values,
// and scalar widen1/narrow1.
template <typename T, typename A> struct Conv;

template <typename A> struct Conv<A, A> {
    typedef typename Native<A>::type N;
    static PCI N load(const A* p) {
        N v;
        std::memcpy(&v, p, sizeof(N));
        return v;
    }
    static PCI void store(N v, A* q) { std::memcpy(q, &v, sizeof(N)); }
#if POLYCOS_VEC_BYTES == 32
    // kStream: store_stream stores with a non-temporal hint (q aligned to a vector).
    static constexpr bool kStream = true;
    static PCI void store_stream(N v, A* q) {
        if constexpr (sizeof(A) == 8) _mm256_stream_pd((double*)q, (__m256d)v);
        else _mm256_stream_ps((float*)q, (__m256)v);
    }
#else
    static constexpr bool kStream = false;  // (no streaming stores in this clone)
    static PCI void store_stream(N v, A* q) { store(v, q); }
#endif
    static PCI A widen1(A x) { return x; }
    static PCI A narrow1(A x) { return x; }
};

template <> struct Conv<float, double> {
    typedef Native<double>::type N;
    static constexpr int W = Native<double>::W;
    typedef float S __attribute__((vector_size(W * sizeof(float))));
    // (GCC 12 splits __builtin_convertvector float -> double through memory.)
    static PCI N load(const float* p) {
#if POLYCOS_VEC_BYTES == 32
        return (N)_mm256_cvtps_pd(_mm_loadu_ps(p));
#else
        double two;  // two floats (memcpy: no aliasing assumptions)
        std::memcpy(&two, p, sizeof(two));
        return (N)_mm_cvtps_pd(_mm_castpd_ps(_mm_set_sd(two)));
#endif
    }
    static PCI void store(N v, float* q) {  // round to nearest even (MXCSR reset)
#if POLYCOS_VEC_BYTES == 32
        _mm_storeu_ps(q, _mm256_cvtpd_ps((__m256d)v));
#else
        const double two = _mm_cvtsd_f64(_mm_castps_pd(_mm_cvtpd_ps((__m128d)v)));
        std::memcpy(q, &two, sizeof(two));
#endif
    }
#if POLYCOS_VEC_BYTES == 32
    static constexpr bool kStream = true;
    static PCI void store_stream(N v, float* q) { _mm_stream_ps(q, _mm256_cvtpd_ps((__m256d)v)); }
#else
    static constexpr bool kStream = false;
    static PCI void store_stream(N v, float* q) { store(v, q); }
#endif
    static PCI double widen1(float x) { return x; }
    static PCI float narrow1(double x) { return float(x); }
};

template <> struct Conv<bf16_t, float> {
    typedef Native<float>::type N;
    static constexpr int W = Native<float>::W;
    typedef uint16_t S __attribute__((vector_size(W * sizeof(uint16_t))));
    typedef uint32_t U __attribute__((vector_size(W * sizeof(uint32_t))));
    static PCI N load(const bf16_t* p) {
        S s;
        std::memcpy(&s, p, sizeof(S));
        return (N)(__builtin_convertvector(s, U) << 16);
    }
    static PCI void store(N v, bf16_t* q) {
        const S s = __builtin_convertvector(float_to_bf16<U, N>(v), S);
        std::memcpy(q, &s, sizeof(S));
    }
#if POLYCOS_VEC_BYTES == 32
    static constexpr bool kStream = true;
    static PCI void store_stream(N v, bf16_t* q) {
        _mm_stream_si128((__m128i*)q, (__m128i)__builtin_convertvector(float_to_bf16<U, N>(v), S));
    }
#else
    static constexpr bool kStream = false;
    static PCI void store_stream(N v, bf16_t* q) { store(v, q); }
#endif
    static PCI float widen1(bf16_t x) { return bits_as<float>(uint32_t(x.bits) << 16); }
    static PCI bf16_t narrow1(float x) { return bf16_t{uint16_t(float_to_bf16<uint32_t, float>(x))}; }
};

template <> struct Conv<f16_t, float> {
    typedef Native<float>::type N;
    static constexpr int W = Native<float>::W;
    typedef uint16_t S __attribute__((vector_size(W * sizeof(uint16_t))));
    typedef uint32_t U __attribute__((vector_size(W * sizeof(uint32_t))));
    // The AVX2 clone has F16C: the same bits as the integer code (exact
    // widening; round-to-nearest-even narrowing with MXCSR reset; NaN quieted
    // with its top payload bits), checked on every float16 bit pattern.
    static PCI N load(const f16_t* p) {
#if POLYCOS_VEC_BYTES == 32
        return (N)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
#else
        S s;
        std::memcpy(&s, p, sizeof(S));
        return half_to_float<U, N>(__builtin_convertvector(s, U));
#endif
    }
    static PCI void store(N v, f16_t* q) {
#if POLYCOS_VEC_BYTES == 32
        _mm_storeu_si128((__m128i*)q, _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
        const S s = __builtin_convertvector(float_to_half<U, N>(v), S);
        std::memcpy(q, &s, sizeof(S));
#endif
    }
#if POLYCOS_VEC_BYTES == 32
    static constexpr bool kStream = true;
    static PCI void store_stream(N v, f16_t* q) {
        _mm_stream_si128((__m128i*)q, _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
    }
#else
    static constexpr bool kStream = false;
    static PCI void store_stream(N v, f16_t* q) { store(v, q); }
#endif
    static PCI float widen1(f16_t x) { return half_to_float<uint32_t, float>(x.bits); }
    static PCI f16_t narrow1(float x) { return f16_t{uint16_t(float_to_half<uint32_t, float>(x))}; }
};

// ------------------------------------------------------------------ the lanes of a row

template <class Cf> struct Lanes {
    typedef typename Native<typename Cf::A>::type N;
    static constexpr int W = Native<typename Cf::A>::W;
    static constexpr int K = Cf::L / W;  // native vectors per row step
    static_assert(K * W == Cf::L, "lanes are whole native vectors");
};

// Cf::L values of T at p[k * s], k < count (zeros beyond), widened into K vectors.
template <class Cf, bool CONTIG>
PCI void load_lanes(const typename Cf::T* p, i64 s, int count, typename Lanes<Cf>::N* v) {
    typedef typename Cf::T T;
    typedef Conv<T, typename Cf::A> Cv;
    constexpr int W = Lanes<Cf>::W, K = Lanes<Cf>::K, L = Cf::L;
    if (CONTIG && count == L) {
        for (int k = 0; k < K; ++k) v[k] = Cv::load(p + k * W);
        return;
    }
    T tmp[L];
    std::memset(tmp, 0, sizeof(tmp));
    if (CONTIG) {
        std::memcpy(tmp, p, sizeof(T) * size_t(count));
    } else {
        for (int j = 0; j < count; ++j) tmp[j] = p[j * s];
    }
    for (int k = 0; k < K; ++k) v[k] = Cv::load(tmp + k * W);
}

// The first `count` of L lanes (K vectors of A) narrowed to O, stored at q[k * s];
// STREAM (contiguous, whole steps, q aligned to a vector; Conv<O, A>::kStream):
// with streaming stores.
template <typename O, typename A, int L, bool CONTIG, bool STREAM = false>
PCI void store_lanes(O* q, i64 s, int count, const typename Native<A>::type* v) {
    typedef Conv<O, A> Cv;
    constexpr int W = Native<A>::W, K = L / W;
    if (CONTIG && count == L) {
        for (int k = 0; k < K; ++k) {
            if constexpr (STREAM) Cv::store_stream(v[k], q + k * W);
            else Cv::store(v[k], q + k * W);
        }
        return;
    }
    O tmp[L];
    for (int k = 0; k < K; ++k) Cv::store(v[k], tmp + k * W);
    if (CONTIG) {
        std::memcpy(q, tmp, sizeof(O) * size_t(count));
    } else {
        for (int j = 0; j < count; ++j) q[j * s] = tmp[j];
    }
}

// Sums of products over a row in Cf::L lanes (plain, or Dot2 when Cf::C).
// Lane j (= vector k, position i: j = k W + i) takes elements j, j + L,
// j + 2L, ...; the lanes are then combined by a fixed tree: lane j with lane
// j + L/2, then j + L/4, ... (the first levels between whole vectors, the last
// ones inside vector 0).
template <class Cf> struct LaneOps {
    typedef typename Cf::A A;
    typedef typename Lanes<Cf>::N N;
    static constexpr int W = Lanes<Cf>::W, K = Lanes<Cf>::K;

    static PCI void add(N& hi, N& lo, N a, N b) {
        if constexpr (Cf::C) {
            const N p = a * b;
            dot2_add(hi, lo, p, polycos_rows::pfma(a, b, -p));
        } else {
            hi = hi + a * b;
        }
    }
    // add() of two inputs as stored (not rescaled) where Cf::R is false, i.e.
    // (float16, float32) and (float32, float64): their product is exact in A and
    // neither overflows nor underflows there, so fma(a, b, hi) rounds once
    // exactly where hi + a * b rounds once: the same bits in one instruction.
    static PCI void add_exact_product(N& hi, N& lo, N a, N b) {
#if POLYCOS_HAVE_FMA
        if constexpr (!Cf::C && !Cf::R) {
            hi = polycos_rows::pfma(a, b, hi);
            return;
        }
#endif
        add(hi, lo, a, b);
    }
    // The tree's levels between whole vectors: hi[0], lo[0] end up holding W
    // lanes, each the combination of the lanes W, 2W, ... apart. Destroys hi, lo.
    static PCI void fold(N* hi, N* lo) {
        for (int h = K / 2; h >= 1; h /= 2) {
            for (int k = 0; k < h; ++k) {
                if constexpr (Cf::C)
                    dot2_merge(hi[k], lo[k], hi[k + h], lo[k + h]);
                else
                    hi[k] = hi[k] + hi[k + h];
            }
        }
    }
    // The levels inside one vector (lane i with lane i + h), then (w, l): the
    // sum and its remainder (0 for plain sums).
    static PCI void finish_tree(N hi, N lo, A& w, A& l) {
        A th[W], tl[W];
        std::memcpy(th, &hi, sizeof(N));
        std::memcpy(tl, &lo, sizeof(N));
        for (int h = W / 2; h >= 1; h /= 2) {
            for (int i = 0; i < h; ++i) {
                if constexpr (Cf::C)
                    dot2_merge(th[i], tl[i], th[i + h], tl[i + h]);
                else
                    th[i] = th[i] + th[i + h];
            }
        }
        if constexpr (Cf::C) {
            dot2_split(th[0], tl[0], w, l);
        } else {
            w = th[0];
            l = A(0);
        }
    }
    static PCI void result(N* hi, N* lo, A& w, A& l) {
        fold(hi, lo);
        finish_tree(hi[0], lo[0], w, l);
    }
};

// The in-vector levels of the tree for W rows at once: rows[r] holds row r's
// W lanes; the result's lane r is row r's total, combined in exactly the order
// of LaneOps::finish_tree (lane i with lane i + h, h = W/2, W/4, ..., 1), by
// shuffles: at each level, pairs of vectors are split into the first and the
// second halves of their segments and added (or Dot2-merged).
template <int W, int H, bool Y>
constexpr int seg_index(int o) {  // output lane o of X (Y = false) or Y (Y = true)
    const int s = 2 * H;           // segment size of the inputs at this level
    const int seg = o / H, within = o % H;
    const int per = W / s;         // segments per input vector
    const int src = seg < per ? 0 : 1;
    return src * W + (seg % per) * s + within + (Y ? H : 0);
}

template <int W, int H, bool Y, typename N, int... I>
PCI N seg_shuffle(N p, N q, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(p, q, seg_index<W, H, Y>(I)...);
}

template <class Cf, typename N>
PCI void transpose_tree(N* hi, N* lo) {  // W vectors in, hi[0] / lo[0] out
    constexpr int W = Lanes<Cf>::W;
    typedef std::make_integer_sequence<int, W> Seq;
    int count = W;
    auto level = [&](auto hc) __attribute__((always_inline)) {
        constexpr int H = decltype(hc)::value;
        for (int v = 0; v < count / 2; ++v) {
            N xh = seg_shuffle<W, H, false>(hi[2 * v], hi[2 * v + 1], Seq{});
            const N yh = seg_shuffle<W, H, true>(hi[2 * v], hi[2 * v + 1], Seq{});
            if constexpr (Cf::C) {
                N xl = seg_shuffle<W, H, false>(lo[2 * v], lo[2 * v + 1], Seq{});
                const N yl = seg_shuffle<W, H, true>(lo[2 * v], lo[2 * v + 1], Seq{});
                dot2_merge(xh, xl, yh, yl);
                lo[v] = xl;
            } else {
                xh = xh + yh;
            }
            hi[v] = xh;
        }
        count /= 2;
    };
    if constexpr (W >= 8) level(std::integral_constant<int, 4>{});
    if constexpr (W >= 4) level(std::integral_constant<int, 2>{});
    level(std::integral_constant<int, 1>{});
}

template <typename A> struct Sums {
    A w12, w11, w22, l12, l11, l22;
};

// Vector k of the L elements of a row step at p (stride s), widened.
template <class Cf, bool CONTIG>
PCI typename Lanes<Cf>::N load_vec(const typename Cf::T* p, i64 s, int k) {
    typedef typename Cf::T T;
    constexpr int W = Lanes<Cf>::W;
    if constexpr (CONTIG) {
        return Conv<T, typename Cf::A>::load(p + k * W);
    } else {
        T tmp[W];
        for (int i = 0; i < W; ++i) tmp[i] = p[(k * W + i) * s];
        return Conv<T, typename Cf::A>::load(tmp);
    }
}

// The three sums of _core.dots over a row (x1 at stride s1, x2 at s2), of
// x / m when SCALED: steps of L elements into the lanes, the last one
// zero-padded; the lanes folded to one vector per sum (v: hi12, hi11, hi22,
// lo12, lo11, lo22).
template <class Cf, bool CONTIG, bool SCALED, int S = 0>
PCI void row_acc(const typename Cf::T* x1, i64 s1, const typename Cf::T* x2, i64 s2, i64 n, typename Cf::A m1,
                 typename Cf::A m2, typename Lanes<Cf>::N* v, bool prefetch = false) {
    typedef typename Lanes<Cf>::N N;
    typedef LaneOps<Cf> Ops;
    constexpr int L = Cf::L, K = Lanes<Cf>::K;
    N h12[K], h11[K], h22[K], e12[K], e11[K], e22[K];
    for (int k = 0; k < K; ++k) h12[k] = h11[k] = h22[k] = e12[k] = e11[k] = e22[k] = N{};
    auto step = [&](int k, N a, N b) __attribute__((always_inline)) {
        if constexpr (SCALED) {
            a = a / m1;
            b = b / m2;
        }
        if constexpr (SCALED) {
            Ops::add(h12[k], e12[k], a, b);
            Ops::add(h11[k], e11[k], a, a);
            Ops::add(h22[k], e22[k], b, b);
        } else {
            Ops::add_exact_product(h12[k], e12[k], a, b);
            Ops::add_exact_product(h11[k], e11[k], a, a);
            Ops::add_exact_product(h22[k], e22[k], b, b);
        }
    };
    i64 j = 0;
    if constexpr (S > 0) {  // n == S L, known at compile time: unrolled (short rows), the same steps
        for (int t = 0; t < S; ++t)
            for (int k = 0; k < K; ++k)
                step(k, load_vec<Cf, CONTIG>(x1 + t * L * s1, s1, k), load_vec<Cf, CONTIG>(x2 + t * L * s2, s2, k));
        j = n;
    }
    for (; j + L <= n; j += L) {
        const typename Cf::T* p1 = x1 + j * s1;
        const typename Cf::T* p2 = x2 + j * s2;
        // Dense rows: the lines kPrefetchAhead bytes on (see prefetch_ahead), one request a line.
        constexpr i64 kStepBytes = i64(L) * i64(sizeof(typename Cf::T));
        if (CONTIG && prefetch && (kStepBytes >= 64 || (j * i64(sizeof(typename Cf::T))) % 64 == 0)) {
            __builtin_prefetch((const char*)p1 + kPrefetchAhead, 0, 3);
            __builtin_prefetch((const char*)p2 + kPrefetchAhead, 0, 3);
        }
        for (int k = 0; k < K; ++k) step(k, load_vec<Cf, CONTIG>(p1, s1, k), load_vec<Cf, CONTIG>(p2, s2, k));
    }
    if (j < n) {  // the last, partial step: zero-padded
        N a[K], b[K];
        load_lanes<Cf, CONTIG>(x1 + j * s1, s1, int(n - j), a);
        load_lanes<Cf, CONTIG>(x2 + j * s2, s2, int(n - j), b);
        for (int k = 0; k < K; ++k) step(k, a[k], b[k]);
    }
    Ops::fold(h12, e12);
    Ops::fold(h11, e11);
    Ops::fold(h22, e22);
    v[0] = h12[0]; v[1] = h11[0]; v[2] = h22[0];
    v[3] = e12[0]; v[4] = e11[0]; v[5] = e22[0];
}

template <class Cf, bool CONTIG, bool SCALED>
Sums<typename Cf::A> row_sums(const typename Cf::T* x1, i64 s1, const typename Cf::T* x2, i64 s2, i64 n,
                              typename Cf::A m1, typename Cf::A m2) {
    typename Lanes<Cf>::N v[6];
    row_acc<Cf, CONTIG, SCALED>(x1, s1, x2, s2, n, m1, m2, v);
    Sums<typename Cf::A> w;
    LaneOps<Cf>::finish_tree(v[0], v[3], w.w12, w.l12);
    LaneOps<Cf>::finish_tree(v[1], v[4], w.w11, w.l11);
    LaneOps<Cf>::finish_tree(v[2], v[5], w.w22, w.l22);
    return w;
}

// max|x| over a row (any order: the maximum is exact), NaN-propagating.
template <class Cf, bool CONTIG>
typename Cf::A row_absmax(const typename Cf::T* x, i64 s, i64 n) {
    typedef typename Lanes<Cf>::N N;
    typedef typename Cf::A A;
    constexpr int L = Cf::L, K = Lanes<Cf>::K, W = Lanes<Cf>::W;
    N m = N{};
    for (i64 k = 0; k < n; k += L) {
        const int cnt = int(std::min<i64>(L, n - k));
        N a[K];
        load_lanes<Cf, CONTIG>(x + k * s, s, cnt, a);
        for (int j = 0; j < K; ++j) m = polycos_rows::pmax((a[j] < 0) ? -a[j] : a[j], m);
    }
    A r = A(0);
    for (int i = 0; i < W; ++i) r = polycos_rows::pmax(m[i], r);
    return r;
}

// ------------------------------------------------------------------ rows in groups

// Rows are summed and finished W at a time (one row per lane of a native
// vector): the in-vector tree runs on shuffled vectors and the square roots
// and divisions of _core.finish as vector instructions, which matters for
// short rows. A lane's result has the bits of the scalar path for its row.
template <class Cf> struct GroupSums {
    typedef typename Lanes<Cf>::N N;
    N w[6];  // w12, w11, w22, l12, l11, l22 of W rows
    N m1, m2;
    bool rescaled = false;  // a row's m1 or m2 is not 1
    PCI Res5<N> finish(typename Cf::A eps) const {
        return polycos_rows::finish<Cf::C>(w[0], w[1], w[2], w[3], w[4], w[5], m1, m2, splat<N>(eps));
    }
    // finish's s alone, for a forward without residuals; `above` =
    // root_threshold(eps). Where every lane's norms are above eps (and no row
    // was rescaled, so eps / m is eps) only the quotient is computed.
    PCI N finish_s(typename Cf::A eps, typename Cf::A above) const {
        if (!rescaled) {
            const auto both = (w[1] >= splat<N>(above)) & (w[2] >= splat<N>(above));
            bool all = true;
            for (int j = 0; j < Lanes<Cf>::W; ++j) all &= both[j] != 0;
            if (all)
                return polycos_rows::clamp_unit(
                    polycos_rows::quotient_above<Cf::C>(w[0], w[1], w[2], w[3], w[4], w[5]));
        }
        return finish(eps).s;
    }
};

template <class Cf, bool CONTIG, int S = 0>
PCI GroupSums<Cf> group_sums(const typename Cf::T* const* p1, i64 s1, const typename Cf::T* const* p2, i64 s2,
                             i64 n, int g, typename Cf::A eps, bool prefetch = false) {
    typedef typename Cf::A A;
    typedef typename Lanes<Cf>::N N;
    constexpr int W = Lanes<Cf>::W;
    N acc[6][W];
    for (int j = 0; j < W; ++j) {
        N v[6];
        if (j < g) {
            row_acc<Cf, CONTIG, false, S>(p1[j], s1, p2[j], s2, n, A(1), A(1), v, prefetch);
        } else {  // harmless values for unused lanes: w11 = w22 = 1
            for (int q = 0; q < 6; ++q) v[q] = N{};
            v[1][0] = v[2][0] = A(1);
        }
        for (int q = 0; q < 6; ++q) acc[q][j] = v[q];
    }
    GroupSums<Cf> r;
    N* w = r.w;
    transpose_tree<Cf>(acc[0], acc[3]);
    transpose_tree<Cf>(acc[1], acc[4]);
    transpose_tree<Cf>(acc[2], acc[5]);
    if constexpr (Cf::C) {
        dot2_split(acc[0][0], acc[3][0], w[0], w[3]);
        dot2_split(acc[1][0], acc[4][0], w[1], w[4]);
        dot2_split(acc[2][0], acc[5][0], w[2], w[5]);
    } else {
        w[0] = acc[0][0]; w[1] = acc[1][0]; w[2] = acc[2][0];
        w[3] = w[4] = w[5] = N{};
    }
    r.m1 = r.m2 = splat<N>(A(1));
    if constexpr (Cf::R) {
        const auto bad = (polycos_rows::in_range(w[1]) == 0) | (polycos_rows::in_range(w[2]) == 0);
        bool any = false;
        for (int j = 0; j < g; ++j) any = any || bad[j] != 0;
        if (any) {  // rare: the rows out of range, one by one
            for (int j = 0; j < g; ++j) {
                if (bad[j] == 0) continue;
                const A max1 = row_absmax<Cf, CONTIG>(p1[j], s1, n);
                const A max2 = row_absmax<Cf, CONTIG>(p2[j], s2, n);
                if (!polycos_rows::rescue_needed(w[1][j], w[2][j], max1, max2)) continue;
                const A mm1 = polycos_rows::row_scale(max1, eps), mm2 = polycos_rows::row_scale(max2, eps);
                const Sums<A> s = row_sums<Cf, CONTIG, true>(p1[j], s1, p2[j], s2, n, mm1, mm2);
                w[0][j] = s.w12; w[1][j] = s.w11; w[2][j] = s.w22;
                w[3][j] = s.l12; w[4][j] = s.l11; w[5][j] = s.l22;
                r.m1[j] = mm1;
                r.m2[j] = mm2;
                r.rescaled = true;
            }
        }
    }
    return r;
}

template <class Cf, bool CONTIG>
PCI Res5<typename Lanes<Cf>::N> group_stats(const typename Cf::T* const* p1, i64 s1, const typename Cf::T* const* p2,
                                            i64 s2, i64 n, int g, typename Cf::A eps) {
    return group_sums<Cf, CONTIG>(p1, s1, p2, s2, n, g, eps).finish(eps);
}

template <typename N> PCI auto lane(const Res5<N>& r, int j) {
    typedef decltype(r.s[0] + 0) A;
    return Res5<A>{r.s[j], r.n1s[j], r.n2s[j], r.m1[j], r.m2[j]};
}

template <class Cf> PCI Res5<typename Cf::A> read_res(const void* res, i64 off) {
    const typename Cf::A* q = (const typename Cf::A*)res + off;
    return Res5<typename Cf::A>{q[0], q[1], q[2], q[3], q[4]};
}

template <class Cf> PCI void write_res(void* res, i64 off, const Res5<typename Cf::A>& r) {
    typename Cf::A* q = (typename Cf::A*)res + off;
    q[0] = r.s;
    q[1] = r.n1s;
    q[2] = r.n2s;
    q[3] = r.m1;
    q[4] = r.m2;
}

template <typename A> PCI A read_scalar(const void* p, int dtype, i64 off) {
    switch (dtype) {
        case kF16: return A(Conv<f16_t, float>::widen1(((const f16_t*)p)[off]));
        case kBF16: return A(Conv<bf16_t, float>::widen1(((const bf16_t*)p)[off]));
        case kF32: return A(((const float*)p)[off]);
        default: return A(((const double*)p)[off]);
    }
}

// ------------------------------------------------------------------ forward / backward, row layouts

template <class Cf, bool CONTIG>
void forward_rows_general(const Call& c, i64 r0, i64 r1) {
    typedef typename Cf::T T;
    typedef typename Cf::A A;
    constexpr int W = Lanes<Cf>::W;
    constexpr int G = 2 * W;  // two groups at a time: their finish chains overlap
    const A above = c.res ? A(0) : root_threshold(A(c.eps));
    const Plan& p = c.plan;
    // Prefetch for the compensated sums (float64), whose arithmetic is slow
    // enough that the hardware prefetcher fell behind: float64 32768 x 256 took
    // 555 ns a row streaming against 350 in cache; 372 with it. Plain sums
    // stream at the floor without it (and measured slower with it).
    const bool pf = Cf::C && CONTIG && dense_rows(p, kFwdX1) && dense_rows(p, kFwdX2);
    Cursor<4> cur;
    cur.seek(p, r0);
    for (i64 r = r0; r < r1; r += G) {
        const int g = int(std::min<i64>(G, r1 - r));
        const T* p1[G];
        const T* p2[G];
        i64 o_out[G], o_res[G];
        for (int j = 0; j < g; ++j) {
            p1[j] = (const T*)c.x1 + cur.off[kFwdX1];
            p2[j] = (const T*)c.x2 + cur.off[kFwdX2];
            o_out[j] = cur.off[kFwdOut];
            o_res[j] = cur.off[kFwdRes];
            cur.next(p);
        }
        const GroupSums<Cf> ga = group_sums<Cf, CONTIG>(p1, p.astride[kFwdX1], p2, p.astride[kFwdX2], p.n,
                                                        std::min(g, W), A(c.eps), pf);
        GroupSums<Cf> gb = ga;
        if (g > W)
            gb = group_sums<Cf, CONTIG>(p1 + W, p.astride[kFwdX1], p2 + W, p.astride[kFwdX2], p.n, g - W,
                                        A(c.eps), pf);
        if (!c.res) {
            const auto sa = ga.finish_s(A(c.eps), above);
            const auto sb = gb.finish_s(A(c.eps), above);
            for (int j = 0; j < g; ++j) ((T*)c.out)[o_out[j]] = Conv<T, A>::narrow1(j < W ? sa[j] : sb[j - W]);
            continue;
        }
        const auto sa = ga.finish(A(c.eps));
        const auto sb = gb.finish(A(c.eps));
        for (int j = 0; j < g; ++j) {
            const Res5<A> rj = j < W ? lane(sa, j) : lane(sb, j - W);
            ((T*)c.out)[o_out[j]] = Conv<T, A>::narrow1(rj.s);
            if (c.res) write_res<Cf>(c.res, o_res[j], rj);
        }
    }
}

// forward_rows_general for dense inputs (dense_rows) of S L elements a row: the same
// groups and bits, with the loops unrolled for the row length, row pointers by
// arithmetic, the results of a group narrowed and stored as one vector, and
// the rows two groups ahead prefetched. Short rows (D = 16) spent most of
// their time in the general loop's bookkeeping.
template <class Cf, int S>
void forward_dense_rows(const Call& c, i64 r0, i64 r1) {
    typedef typename Cf::T T;
    typedef typename Cf::A A;
    constexpr int W = Lanes<Cf>::W;
    constexpr int G = 2 * W;
    constexpr i64 n = i64(S) * Cf::L;
    const A eps = A(c.eps);
    const A above = c.res ? A(0) : root_threshold(eps);
    const Plan& p = c.plan;
    const i64 so = p.bstride[kFwdOut][0], sr = p.bstride[kFwdRes][0];
    const T* const x1 = (const T*)c.x1;
    const T* const x2 = (const T*)c.x2;
    T* const out = (T*)c.out;
    for (i64 r = r0; r < r1; r += G) {
        const int g = int(std::min<i64>(G, r1 - r));
        const T* p1[G];
        const T* p2[G];
        dense_row_pointers(x1, x2, r, g, n, p1, p2);
        prefetch_ahead(p1[0], G * n * i64(sizeof(T)));
        prefetch_ahead(p2[0], G * n * i64(sizeof(T)));
        const GroupSums<Cf> ga = group_sums<Cf, true, S>(p1, 1, p2, 1, n, std::min(g, W), eps);
        GroupSums<Cf> gb = ga;
        if (g > W) gb = group_sums<Cf, true, S>(p1 + W, 1, p2 + W, 1, n, g - W, eps);
        if (!c.res) {
            const auto sa = ga.finish_s(eps, above);
            const auto sb = gb.finish_s(eps, above);
            if (g == G && so == 1) {
                Conv<T, A>::store(sa, out + r);
                Conv<T, A>::store(sb, out + r + W);
            } else {
                for (int j = 0; j < g; ++j) out[(r + j) * so] = Conv<T, A>::narrow1(j < W ? sa[j] : sb[j - W]);
            }
            continue;
        }
        const auto sa = ga.finish(eps);
        const auto sb = gb.finish(eps);
        for (int j = 0; j < g; ++j) {
            const Res5<A> rj = j < W ? lane(sa, j) : lane(sb, j - W);
            out[(r + j) * so] = Conv<T, A>::narrow1(rj.s);
            write_res<Cf>(c.res, (r + j) * sr, rj);
        }
    }
}

template <class Cf, bool CONTIG>
void forward_rows(const Call& c, i64 r0, i64 r1) {
    if constexpr (CONTIG) {
        switch (dense_steps(c.plan, Cf::L, {kFwdX1, kFwdX2})) {
            case 1: return forward_dense_rows<Cf, 1>(c, r0, r1);
            case 2: return forward_dense_rows<Cf, 2>(c, r0, r1);
            case 4: return forward_dense_rows<Cf, 4>(c, r0, r1);
            default: break;
        }
    }
    forward_rows_general<Cf, CONTIG>(c, r0, r1);
}

// _core.grad_elementwise over a row, L elements at a time.
// GENERAL: any coefficients (the divisions by m and the shifts p apply);
// else m1 = m2 = 1 and p1 = p2 = 1, where skipping them gives the same bits.
// The coefficients are splatted into vectors once (the stores go through
// memcpy, so a reference to them would be reloaded after every store).
// STREAM: the whole steps are written with streaming stores (Call::stream:
// every gradient row starts a 64-byte line and fills whole lines, so there is
// no partial step).
template <class Cf, typename O, bool CONTIG, bool GENERAL, bool STREAM>
void row_grad(const typename Cf::T* x1, i64 s1, const typename Cf::T* x2, i64 s2, O* d1, i64 sd1, O* d2,
              i64 sd2, i64 n, const GradCoefs<typename Cf::A>& k) {
    typedef typename Lanes<Cf>::N N;
    typedef typename Cf::A A;
    constexpr int L = Cf::L, K = Lanes<Cf>::K;
    const GradCoefs<N> kv{splat<N>(k.u1), splat<N>(k.u2), splat<N>(k.r1), splat<N>(k.r2), splat<N>(k.t1),
                          splat<N>(k.t2), splat<N>(k.m1), splat<N>(k.m2), splat<N>(k.p1), splat<N>(k.p2)};
    auto step = [&](i64 j, int cnt, auto streamed) {  // streamed: std::bool_constant
        N a[K], b[K], g1[K], g2[K];
        load_lanes<Cf, CONTIG>(x1 + j * s1, s1, cnt, a);
        load_lanes<Cf, CONTIG>(x2 + j * s2, s2, cnt, b);
        for (int v = 0; v < K; ++v) polycos_rows::grad_element<GENERAL, GENERAL>(a[v], b[v], kv, g1[v], g2[v]);
        store_lanes<O, A, L, CONTIG, decltype(streamed)::value>(d1 + j * sd1, sd1, cnt, g1);
        store_lanes<O, A, L, CONTIG, decltype(streamed)::value>(d2 + j * sd2, sd2, cnt, g2);
    };
    // Whole steps, then the partial one: the loop holds no call (the partial
    // step's memcpy), so the coefficients stay in registers.
    const i64 whole = n - n % L;
    for (i64 j = 0; j < whole; j += L) step(j, L, std::bool_constant<STREAM>{});
    if (whole < n) step(whole, int(n - whole), std::false_type{});
}

// row_grad with the arithmetic chosen by the row's coefficients: general, or
// without the unit scales and shifts (almost every row); with streaming stores
// where `stream` (Call::stream) asks for them.
template <class Cf, typename O, bool CONTIG>
PCI void row_grad_any(const typename Cf::T* x1, i64 s1, const typename Cf::T* x2, i64 s2, O* d1, i64 sd1, O* d2,
                      i64 sd2, i64 n, const GradCoefs<typename Cf::A>& k, bool stream = false) {
    typedef typename Cf::A A;
    const bool general = (Cf::R && (k.m1 != A(1) || k.m2 != A(1))) || k.p1 != A(1) || k.p2 != A(1);
    if constexpr (CONTIG && Conv<O, A>::kStream) {
        if (stream) {
            if (general) return row_grad<Cf, O, CONTIG, true, true>(x1, s1, x2, s2, d1, sd1, d2, sd2, n, k);
            return row_grad<Cf, O, CONTIG, false, true>(x1, s1, x2, s2, d1, sd1, d2, sd2, n, k);
        }
    }
    if (general) return row_grad<Cf, O, CONTIG, true, false>(x1, s1, x2, s2, d1, sd1, d2, sd2, n, k);
    row_grad<Cf, O, CONTIG, false, false>(x1, s1, x2, s2, d1, sd1, d2, sd2, n, k);
}

template <class Cf, typename O, bool CONTIG>
void backward_rows(const Call& c, i64 r0, i64 r1) {
    typedef typename Cf::T T;
    typedef typename Cf::A A;
    constexpr int G = Lanes<Cf>::W;
    const Plan& p = c.plan;
    const i64 s1 = p.astride[kBwdX1], s2 = p.astride[kBwdX2];
    const A eps = A(c.eps);
    Cursor<6> cur;
    cur.seek(p, r0);
    for (i64 r = r0; r < r1; r += G) {
        const int g = int(std::min<i64>(G, r1 - r));
        const T* p1[G];
        const T* p2[G];
        i64 off[G][kMaxOps];
        for (int j = 0; j < g; ++j) {
            for (int o = 0; o < kMaxOps; ++o) off[j][o] = cur.off[o];
            p1[j] = (const T*)c.x1 + cur.off[kBwdX1];
            p2[j] = (const T*)c.x2 + cur.off[kBwdX2];
            cur.next(p);
        }
        Res5<A> st[G];
        if (c.res_in) {
            for (int j = 0; j < g; ++j) st[j] = read_res<Cf>(c.res_in, off[j][kBwdRes]);
        } else {
            const auto sv = group_stats<Cf, CONTIG>(p1, s1, p2, s2, p.n, g, eps);
            for (int j = 0; j < g; ++j) st[j] = lane(sv, j);
        }
        for (int j = 0; j < g; ++j) {
            const A gj = read_scalar<A>(c.g, c.g_dtype, off[j][kBwdG]);
            const GradCoefs<A> k = polycos_rows::grad_coefficients<Cf::R>(gj, st[j], eps);
            O* q1 = (O*)c.d1 + off[j][kBwdD1];
            O* q2 = (O*)c.d2 + off[j][kBwdD2];
            row_grad_any<Cf, O, CONTIG>(p1[j], s1, p2[j], s2, q1, p.astride[kBwdD1], q2, p.astride[kBwdD2], p.n, k,
                                        c.stream);
        }
    }
}

// backward_rows for dense inputs and gradients (dense_rows) of S L elements a
// row: a group's coefficients computed once as vectors (grad_coefficients on
// W rows, as the column layout does; per lane the scalar operations, so the
// same bits), row pointers by arithmetic, the row loop unrolled. At D = 16 the
// per-row scalar coefficients (two divisions and the residuals' reads a row)
// were most of the time.
template <class Cf, typename O, int S>
void backward_dense_rows(const Call& c, i64 r0, i64 r1) {
    typedef typename Cf::T T;
    typedef typename Cf::A A;
    typedef typename Lanes<Cf>::N N;
    constexpr int W = Lanes<Cf>::W;
    constexpr i64 n = i64(S) * Cf::L;
    const Plan& p = c.plan;
    const A eps = A(c.eps);
    const i64 sg = p.bstride[kBwdG][0], sr = p.bstride[kBwdRes][0];
    const T* const x1 = (const T*)c.x1;
    const T* const x2 = (const T*)c.x2;
    O* const d1 = (O*)c.d1;
    O* const d2 = (O*)c.d2;
    for (i64 r = r0; r < r1; r += W) {
        const int g = int(std::min<i64>(W, r1 - r));
        const T* p1[W];
        const T* p2[W];
        dense_row_pointers(x1, x2, r, g, n, p1, p2);
        Res5<N> st;
        if (c.res_in) {
            A rs[5][W];
            for (int j = 0; j < W; ++j) {
                const Res5<A> q = j < g ? read_res<Cf>(c.res_in, (r + j) * sr) : Res5<A>{A(0), A(1), A(1), A(1), A(1)};
                rs[0][j] = q.s; rs[1][j] = q.n1s; rs[2][j] = q.n2s; rs[3][j] = q.m1; rs[4][j] = q.m2;
            }
            N* dst[5] = {&st.s, &st.n1s, &st.n2s, &st.m1, &st.m2};
            for (int i = 0; i < 5; ++i) std::memcpy(dst[i], rs[i], sizeof(N));
        } else {
            st = group_sums<Cf, true, S>(p1, 1, p2, 1, n, g, eps).finish(eps);
        }
        A gv[W];
        for (int j = 0; j < W; ++j) gv[j] = j < g ? read_scalar<A>(c.g, c.g_dtype, (r + j) * sg) : A(0);
        N gn;
        std::memcpy(&gn, gv, sizeof(N));
        const GradCoefs<N> kv = polycos_rows::grad_coefficients<Cf::R>(gn, st, splat<N>(eps));
        for (int j = 0; j < g; ++j) {
            const GradCoefs<A> k{kv.u1[j], kv.u2[j], kv.r1[j], kv.r2[j], kv.t1[j], kv.t2[j],
                                 kv.m1[j], kv.m2[j], kv.p1[j], kv.p2[j]};
            O* q1 = d1 + (r + j) * n;
            O* q2 = d2 + (r + j) * n;
            row_grad_any<Cf, O, true>(p1[j], 1, p2[j], 1, q1, 1, q2, 1, n, k, c.stream);
        }
    }
}

template <class Cf, typename O, bool CONTIG>
void backward_rows_any(const Call& c, i64 r0, i64 r1) {
    if constexpr (CONTIG) {
        switch (dense_steps(c.plan, Cf::L, {kBwdX1, kBwdX2, kBwdD1, kBwdD2})) {
            case 1: return backward_dense_rows<Cf, O, 1>(c, r0, r1);
            case 2: return backward_dense_rows<Cf, O, 2>(c, r0, r1);
            case 4: return backward_dense_rows<Cf, O, 4>(c, r0, r1);
            default: break;
        }
    }
    backward_rows<Cf, O, CONTIG>(c, r0, r1);
}

// ------------------------------------------------------------------ column layout

// Rows per block of the column layout: 8 KB of each input per element index
// (long contiguous runs for the prefetcher); the block's accumulators (48 KB)
// stay in L2.
template <class Cf> struct ColumnBlock {
    typedef typename Cf::A A;
    typedef typename Native<A>::type N;
    static constexpr int W = Native<A>::W;
    static constexpr int ROWS = 8192 / int(sizeof(typename Cf::T));
    static constexpr int NV = ROWS / W;  // vectors of rows
};

// Per-thread scratch of the column layout (on the heap: large, and the
// calling thread may be a foreign one with a small stack).
template <class Cf> struct ColumnScratch {
    typedef typename ColumnBlock<Cf>::N N;
    static constexpr int NV = ColumnBlock<Cf>::NV;
    N w[6][NV];  // sums: hi12, hi11, hi22, lo12, lo11, lo22
    N m1[NV], m2[NV];
    Res5<N> st[NV];
    GradCoefs<N> k[NV];
};

// Loads W adjacent rows' elements (IN = 1), or one element for all lanes
// (IN = 0: an operand broadcast across rows), widened to A.
template <class Cf, int IN>
PCI typename Native<typename Cf::A>::type col_load(const typename Cf::T* p, int v) {
    typedef Conv<typename Cf::T, typename Cf::A> Cv;
    typedef typename Native<typename Cf::A>::type N;
    if constexpr (IN == 1) return Cv::load(p + v * Native<typename Cf::A>::W);
    else return splat<N>(Cv::widen1(p[0]));
}

template <class Cf, int IN>
PCI typename Native<typename Cf::A>::type col_load_part(const typename Cf::T* p, int v, int rem) {
    typedef typename Cf::T T;
    constexpr int W = Native<typename Cf::A>::W;
    if constexpr (IN == 1) {
        T tmp[W];
        std::memset(tmp, 0, sizeof(tmp));
        std::memcpy(tmp, p + v * W, sizeof(T) * size_t(rem));
        return Conv<T, typename Cf::A>::load(tmp);
    } else {
        return col_load<Cf, 0>(p, v);
    }
}

// The sums of the `cnt` rows of a block, each in plain sequence (k = 0, 1, ...,
// n - 1), vectorised across rows: lane i of vector v is row v W + i. w: six
// arrays of ceil(cnt / W) vectors (hi12, hi11, hi22, lo12, lo11, lo22).
template <class Cf, int IN1, int IN2, bool SCALED>
void column_sums(const typename Cf::T* x1, i64 a1, const typename Cf::T* x2, i64 a2, i64 n, int cnt,
                 const typename Native<typename Cf::A>::type* m1, const typename Native<typename Cf::A>::type* m2,
                 typename Native<typename Cf::A>::type* const* w) {
    typedef typename Cf::T T;
    typedef typename Native<typename Cf::A>::type N;
    constexpr int W = Native<typename Cf::A>::W;
    const int full = cnt / W, rem = cnt % W, nv = full + (rem > 0);
    N* h12 = w[0];
    N* h11 = w[1];
    N* h22 = w[2];
    N* e12 = w[3];
    N* e11 = w[4];
    N* e22 = w[5];
    for (int v = 0; v < nv; ++v) h12[v] = h11[v] = h22[v] = e12[v] = e11[v] = e22[v] = N{};
    auto step = [&](int v, N a, N b) __attribute__((always_inline)) {
        if constexpr (SCALED) {
            a = a / m1[v];
            b = b / m2[v];
        }
        if constexpr (Cf::C) {
            N p = a * b;
            dot2_add(h12[v], e12[v], p, polycos_rows::pfma(a, b, -p));
            p = a * a;
            dot2_add(h11[v], e11[v], p, polycos_rows::pfma(a, a, -p));
            p = b * b;
            dot2_add(h22[v], e22[v], p, polycos_rows::pfma(b, b, -p));
        } else {
            h12[v] = h12[v] + a * b;
            h11[v] = h11[v] + a * a;
            h22[v] = h22[v] + b * b;
        }
    };
    for (i64 k = 0; k < n; ++k) {
        const T* p1 = x1 + k * a1;
        const T* p2 = x2 + k * a2;
        for (int v = 0; v < full; ++v) step(v, col_load<Cf, IN1>(p1, v), col_load<Cf, IN2>(p2, v));
        if (rem) step(full, col_load_part<Cf, IN1>(p1, full, rem), col_load_part<Cf, IN2>(p2, full, rem));
    }
    if constexpr (Cf::C) {
        for (int v = 0; v < nv; ++v) {
            dot2_split(h12[v], e12[v], h12[v], e12[v]);
            dot2_split(h11[v], e11[v], h11[v], e11[v]);
            dot2_split(h22[v], e22[v], h22[v], e22[v]);
        }
    }
}

// max|x| of a column-layout row, in sequence.
template <class Cf>
typename Cf::A column_absmax(const typename Cf::T* x, i64 a, i64 n) {
    typedef typename Cf::A A;
    A m = A(0);
    for (i64 k = 0; k < n; ++k)
        m = polycos_rows::pmax(polycos_rows::pabs(Conv<typename Cf::T, A>::widen1(x[k * a])), m);
    return m;
}

// _core's steps 1-3 for the `cnt` rows of a block, as vectors of rows, into sc.st.
template <class Cf, int IN1, int IN2>
void column_forward_block(const typename Cf::T* x1, i64 a1, const typename Cf::T* x2, i64 a2, i64 n, int cnt,
                          typename Cf::A eps, ColumnScratch<Cf>& sc) {
    typedef typename Cf::A A;
    typedef typename Native<A>::type N;
    constexpr int W = Native<A>::W;
    N* w[6] = {sc.w[0], sc.w[1], sc.w[2], sc.w[3], sc.w[4], sc.w[5]};
    column_sums<Cf, IN1, IN2, false>(x1, a1, x2, a2, n, cnt, nullptr, nullptr, w);
    const int nv = (cnt + W - 1) / W;
    for (int v = 0; v < nv; ++v) {
        N m1 = splat<N>(A(1)), m2 = splat<N>(A(1));
        if constexpr (Cf::R) {
            for (int i = 0; i < W && v * W + i < cnt; ++i) {
                if (polycos_rows::in_range(w[1][v][i]) && polycos_rows::in_range(w[2][v][i])) continue;
                const int row = v * W + i;
                const A max1 = column_absmax<Cf>(x1 + row * IN1, a1, n);
                const A max2 = column_absmax<Cf>(x2 + row * IN2, a2, n);
                if (!polycos_rows::rescue_needed(w[1][v][i], w[2][v][i], max1, max2)) continue;
                // this row again from x / m, in the same sequence (every lane the same row)
                const N s1 = splat<N>(polycos_rows::row_scale(max1, eps)), s2 = splat<N>(polycos_rows::row_scale(max2, eps));
                N one[6];
                N* po[6] = {&one[0], &one[1], &one[2], &one[3], &one[4], &one[5]};
                column_sums<Cf, 0, 0, true>(x1 + row * IN1, a1, x2 + row * IN2, a2, n, W, &s1, &s2, po);
                for (int q = 0; q < 6; ++q) w[q][v][i] = one[q][0];
                m1[i] = s1[0];
                m2[i] = s2[0];
            }
        }
        if (v == nv - 1) {  // harmless values in lanes past the block's rows
            for (int i = cnt - v * W; i < W; ++i) {
                w[0][v][i] = w[3][v][i] = w[4][v][i] = w[5][v][i] = A(0);
                w[1][v][i] = w[2][v][i] = A(1);
            }
        }
        sc.st[v] = polycos_rows::finish<Cf::C>(w[0][v], w[1][v], w[2][v], w[3][v], w[4][v], w[5][v], m1, m2,
                                               splat<N>(eps));
    }
}

// Calls block(off, cnt) for runs of at most ROWS rows of [r0, r1) that are
// adjacent along the innermost batch dimension; off: the operands' offsets of
// the run's first row.
template <int ROWS, class Block>
void column_blocks(const Plan& p, i64 r0, i64 r1, const Block& block) {
    Cursor<> cur;
    const int d = p.nb - 1;
    i64 r = r0;
    while (r < r1) {
        cur.seek(p, r);
        const i64 run = std::min<i64>(r1 - r, p.size[d] - cur.idx[d]);
        for (i64 i = 0; i < run; i += ROWS) {
            const int cnt = int(std::min<i64>(ROWS, run - i));
            i64 off[kMaxOps];
            for (int o = 0; o < p.nops; ++o) off[o] = cur.off[o] + i * p.bstride[o][d];
            block(off, cnt);
        }
        r += run;
    }
}

template <class Cf, int IN1, int IN2>
void forward_columns(const Call& c, i64 r0, i64 r1) {
    typedef typename Cf::T T;
    typedef typename Cf::A A;
    constexpr int W = ColumnBlock<Cf>::W;
    const Plan& p = c.plan;
    const int d = p.nb - 1;
    std::unique_ptr<ColumnScratch<Cf>> sc(new ColumnScratch<Cf>);
    column_blocks<ColumnBlock<Cf>::ROWS>(p, r0, r1, [&](const i64* off, int cnt) {
        column_forward_block<Cf, IN1, IN2>((const T*)c.x1 + off[kFwdX1], p.astride[kFwdX1],
                                           (const T*)c.x2 + off[kFwdX2], p.astride[kFwdX2], p.n, cnt, A(c.eps), *sc);
        T* out = (T*)c.out;
        for (int i = 0; i < cnt; ++i) {
            const Res5<A> ri = lane(sc->st[i / W], i % W);
            out[off[kFwdOut] + i * p.bstride[kFwdOut][d]] = Conv<T, A>::narrow1(ri.s);
            if (c.res) write_res<Cf>(c.res, off[kFwdRes] + i * p.bstride[kFwdRes][d], ri);
        }
    });
}

template <class Cf, typename O, int IN1, int IN2, bool DIV>
void column_grad(const typename Cf::T* x1, i64 a1, const typename Cf::T* x2, i64 a2, O* d1, i64 ad1, O* d2,
                 i64 ad2, i64 n, int cnt, const GradCoefs<typename Native<typename Cf::A>::type>* k) {
    typedef typename Cf::A A;
    typedef typename Native<A>::type N;
    typedef Conv<O, A> Cout;
    constexpr int W = Native<A>::W;
    const int full = cnt / W, rem = cnt % W;
    for (i64 j = 0; j < n; ++j) {
        const typename Cf::T* p1 = x1 + j * a1;
        const typename Cf::T* p2 = x2 + j * a2;
        O* q1 = d1 + j * ad1;
        O* q2 = d2 + j * ad2;
        for (int v = 0; v < full; ++v) {
            N g1, g2;
            polycos_rows::grad_element<DIV>(col_load<Cf, IN1>(p1, v), col_load<Cf, IN2>(p2, v), k[v], g1, g2);
            Cout::store(g1, q1 + v * W);
            Cout::store(g2, q2 + v * W);
        }
        if (rem) {
            N g1, g2;
            polycos_rows::grad_element<DIV>(col_load_part<Cf, IN1>(p1, full, rem),
                                            col_load_part<Cf, IN2>(p2, full, rem), k[full], g1, g2);
            O t1[W], t2[W];
            Cout::store(g1, t1);
            Cout::store(g2, t2);
            std::memcpy(q1 + full * W, t1, sizeof(O) * size_t(rem));
            std::memcpy(q2 + full * W, t2, sizeof(O) * size_t(rem));
        }
    }
}

template <class Cf, typename O, int IN1, int IN2>
void backward_columns(const Call& c, i64 r0, i64 r1) {
    typedef typename Cf::T T;
    typedef typename Cf::A A;
    typedef typename Native<A>::type N;
    constexpr int W = ColumnBlock<Cf>::W;
    const Plan& p = c.plan;
    const int d = p.nb - 1;
    std::unique_ptr<ColumnScratch<Cf>> sc(new ColumnScratch<Cf>);
    column_blocks<ColumnBlock<Cf>::ROWS>(p, r0, r1, [&](const i64* off, int cnt) {
        const T* x1 = (const T*)c.x1 + off[kBwdX1];
        const T* x2 = (const T*)c.x2 + off[kBwdX2];
        const int nv = (cnt + W - 1) / W;
        Res5<N>* st = sc->st;
        if (c.res_in) {
            for (int v = 0; v < nv; ++v) {
                A rs[5][W];
                for (int i = 0; i < W; ++i) {
                    const int row = v * W + i;
                    const Res5<A> q = row < cnt ? read_res<Cf>(c.res_in, off[kBwdRes] + row * p.bstride[kBwdRes][d])
                                                : Res5<A>{A(0), A(1), A(1), A(1), A(1)};
                    rs[0][i] = q.s; rs[1][i] = q.n1s; rs[2][i] = q.n2s; rs[3][i] = q.m1; rs[4][i] = q.m2;
                }
                N* dst[5] = {&st[v].s, &st[v].n1s, &st[v].n2s, &st[v].m1, &st[v].m2};
                for (int i = 0; i < 5; ++i) std::memcpy(dst[i], rs[i], sizeof(N));
            }
        } else {
            column_forward_block<Cf, IN1, IN2>(x1, p.astride[kBwdX1], x2, p.astride[kBwdX2], p.n, cnt, A(c.eps), *sc);
        }
        GradCoefs<N>* k = sc->k;
        bool div = false;
        for (int v = 0; v < nv; ++v) {
            A gv[W];
            for (int i = 0; i < W; ++i) {
                const int row = v * W + i;
                gv[i] = row < cnt ? read_scalar<A>(c.g, c.g_dtype, off[kBwdG] + row * p.bstride[kBwdG][d]) : A(0);
            }
            N gn;
            std::memcpy(&gn, gv, sizeof(N));
            k[v] = polycos_rows::grad_coefficients<Cf::R>(gn, st[v], splat<N>(A(c.eps)));
            if (Cf::R)
                for (int i = 0; i < W; ++i) div = div || k[v].m1[i] != A(1) || k[v].m2[i] != A(1);
        }
        O* q1 = (O*)c.d1 + off[kBwdD1];
        O* q2 = (O*)c.d2 + off[kBwdD2];
        // Dividing by a scale of 1 gives the same bits as not dividing, so one
        // rescued row in a block divides the whole block.
        if (div)
            column_grad<Cf, O, IN1, IN2, true>(x1, p.astride[kBwdX1], x2, p.astride[kBwdX2], q1, p.astride[kBwdD1], q2,
                                               p.astride[kBwdD2], p.n, cnt, k);
        else
            column_grad<Cf, O, IN1, IN2, false>(x1, p.astride[kBwdX1], x2, p.astride[kBwdX2], q1, p.astride[kBwdD1],
                                                q2, p.astride[kBwdD2], p.n, cnt, k);
    });
}

// ------------------------------------------------------------------ normalize_rows

// _core.normalize_rows for one row: m = max|x| (rescaling dtypes), the
// (compensated) norm of b = x / m, xhat = b / c.
template <class Cf, typename O, bool CONTIG>
void normalize_row(const typename Cf::T* x, i64 s, O* xh, i64 sh, i64 n, typename Cf::A eps,
                   polycos_rows::RowNorm<typename Cf::A>& out) {
    typedef typename Lanes<Cf>::N N;
    typedef typename Cf::A A;
    constexpr int L = Cf::L, K = Lanes<Cf>::K;
    A m = A(1);
    if constexpr (Cf::R) m = polycos_rows::row_scale(row_absmax<Cf, CONTIG>(x, s, n), eps);
    const bool div = Cf::R && m != A(1);  // b = x / m; x / 1 == x
    N hi[K], lo[K];
    for (int j = 0; j < K; ++j) hi[j] = lo[j] = N{};
    for (i64 k = 0; k < n; k += L) {
        const int cnt = int(std::min<i64>(L, n - k));
        N b[K];
        load_lanes<Cf, CONTIG>(x + k * s, s, cnt, b);
        for (int j = 0; j < K; ++j) {
            if (div) {
                b[j] = b[j] / m;
                LaneOps<Cf>::add(hi[j], lo[j], b[j], b[j]);
            } else {
                LaneOps<Cf>::add_exact_product(hi[j], lo[j], b[j], b[j]);
            }
        }
    }
    A w, l;
    LaneOps<Cf>::result(hi, lo, w, l);
    out = polycos_rows::normalize_finish<Cf::C>(w, l, m, eps);
    const A c = out.c;
    for (i64 k = 0; k < n; k += L) {
        const int cnt = int(std::min<i64>(L, n - k));
        N b[K];
        load_lanes<Cf, CONTIG>(x + k * s, s, cnt, b);
        for (int j = 0; j < K; ++j) b[j] = (div ? b[j] / m : b[j]) / c;
        store_lanes<O, A, L, CONTIG>(xh + k * sh, sh, cnt, b);
    }
}

// xhat is written in O: the accumulation dtype, or the storage dtype (rounded
// once from the accumulation dtype, as _core casts r.xhat for the VJP's products).
template <class Cf, typename O, bool CONTIG>
void normalize_rows(const Call& c, i64 r0, i64 r1) {
    typedef typename Cf::T T;
    typedef typename Cf::A A;
    const Plan& p = c.plan;
    Cursor<2> cur;
    cur.seek(p, r0);
    for (i64 r = r0; r < r1; ++r) {
        polycos_rows::RowNorm<A> nr;
        normalize_row<Cf, O, CONTIG>((const T*)c.x1 + cur.off[kNrmX], p.astride[kNrmX], (O*)c.out + cur.off[kNrmXhat],
                                  p.astride[kNrmXhat], p.n, A(c.eps), nr);
        if (c.cs) ((A*)c.cs)[r] = nr.cs;
        if (c.ns) ((A*)c.ns)[r] = nr.ns;
        if (c.m) ((A*)c.m)[r] = nr.m;
        cur.next(p);
    }
}

// ------------------------------------------------------------------ entry points of this clone

template <class Cf> void forward_dispatch(const Call& c, i64 r0, i64 r1) {
    if (c.layout == kRowContig) return forward_rows<Cf, true>(c, r0, r1);
    if (c.layout == kRowStrided) return forward_rows<Cf, false>(c, r0, r1);
    if (c.col_inner1 && c.col_inner2) return forward_columns<Cf, 1, 1>(c, r0, r1);
    if (c.col_inner1) return forward_columns<Cf, 1, 0>(c, r0, r1);
    return forward_columns<Cf, 0, 1>(c, r0, r1);
}

template <class Cf, typename O> void backward_dispatch_out(const Call& c, i64 r0, i64 r1) {
    if (c.layout == kRowContig) return backward_rows_any<Cf, O, true>(c, r0, r1);
    if (c.layout == kRowStrided) return backward_rows<Cf, O, false>(c, r0, r1);
    if (c.col_inner1 && c.col_inner2) return backward_columns<Cf, O, 1, 1>(c, r0, r1);
    if (c.col_inner1) return backward_columns<Cf, O, 1, 0>(c, r0, r1);
    return backward_columns<Cf, O, 0, 1>(c, r0, r1);
}

template <class Cf> void backward_dispatch(const Call& c, i64 r0, i64 r1) {
    if (c.out_dtype == DtypeOf<typename Cf::T>::code) return backward_dispatch_out<Cf, typename Cf::T>(c, r0, r1);
    return backward_dispatch_out<Cf, typename Cf::A>(c, r0, r1);
}

template <class Cf, typename O> void normalize_dispatch_out(const Call& c, i64 r0, i64 r1) {
    if (c.layout == kRowContig) return normalize_rows<Cf, O, true>(c, r0, r1);
    return normalize_rows<Cf, O, false>(c, r0, r1);
}

template <class Cf> void normalize_dispatch(const Call& c, i64 r0, i64 r1) {
    if (c.out_dtype == DtypeOf<typename Cf::T>::code) return normalize_dispatch_out<Cf, typename Cf::T>(c, r0, r1);
    return normalize_dispatch_out<Cf, typename Cf::A>(c, r0, r1);
}

// ------------------------------------------------------------------ pairwise: the normalisation's VJP

// _core.row_normalize_vjp for contiguous rows of n values of W (the product
// dtype, float32 or float64; also the output dtype): h = xhat, v = the
// cotangent, per-row cs, ns, m of A (m may be null: no rescaling). Per row:
// above = ns > eps / m; proj = above ? <h, v> : 0 (summed in A in 8 lanes,
// combined by a fixed tree: more accurate than W, and the same bits on every
// clone); inv = 1 / cs (0 where cs == 0) rounded to W;
// d = ((v - proj h) inv) / m, in W; a rescaled row at or below eps > 0 is
// v / eps (inv / m would underflow first); an unscaled row whose 1 / cs is not
// a normal W (float32 norms past 1 / FLT_MIN) is shifted by 2^64 (_core._reciprocal_shift).
template <typename W, typename A>
void normalize_vjp_rows(const Call& c, i64 r0, i64 r1) {
    const i64 n = c.plan.n;
    const A eps = A(c.eps);
    const A* cs = (const A*)c.cs;
    const A* ns = (const A*)c.ns;
    const A* ms = (const A*)c.m;
    for (i64 r = r0; r < r1; ++r) {
        const W* h = (const W*)c.x1 + r * n;
        const W* v = (const W*)c.x2 + r * n;
        W* d = (W*)c.out + r * n;
        const A m = ms ? ms[r] : A(1);
        const A e = ms ? eps / m : eps;
        const bool above = ns[r] > e;
        W proj = W(0);
        if (above) {
            A acc[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
            i64 k = 0;
            for (; k + 8 <= n; k += 8)
                for (int j = 0; j < 8; ++j) acc[j] += A(h[k + j]) * A(v[k + j]);
            for (int j = 0; k + j < n; ++j) acc[j] += A(h[k + j]) * A(v[k + j]);
            proj = W(((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])));
        }
        const A inva = cs[r] == A(0) ? A(0) : A(1) / cs[r];
        const W inv = W(inva);
        const W wm = W(m);
        // _core._reciprocal_shift: an unscaled float32 row whose 1 / cs is not a normal W
        // (norms past 1 / FLT_MIN, or below 1 / FLT_MAX) multiplies by inv 2^64 then 2^-64
        // (or 2^-64 then 2^64); 0 and NaN take the plain loop (the same bits)
        const bool low = inva > A(0) && inva < A(std::numeric_limits<W>::min());
        const bool high = inva > A(std::numeric_limits<W>::max());
        if (ms && ns[r] <= e && eps != A(0)) {  // (not !above: a NaN row stays NaN)
            const W we = W(eps);
            for (i64 k = 0; k < n; ++k) d[k] = v[k] / we;
        } else if (ms && wm != W(1)) {
            for (i64 k = 0; k < n; ++k) d[k] = ((v[k] - proj * h[k]) * inv) / wm;
        } else if (sizeof(A) > sizeof(W) && (low || high)) {
            const W shifted = W(inva * (low ? A(0x1p64) : A(0x1p-64)));
            const W post = low ? W(0x1p-64) : W(0x1p64);
            for (i64 k = 0; k < n; ++k) d[k] = ((v[k] - proj * h[k]) * shifted) * post;
        } else {
            for (i64 k = 0; k < n; ++k) d[k] = (v[k] - proj * h[k]) * inv;
        }
    }
}

#define POLYCOS_BY_CONFIG(FN)                                            \
    switch (c.dtype) {                                                   \
        case kF16: return FN<Cfg<f16_t, float>>(c, r0, r1);              \
        case kBF16: return FN<Cfg<bf16_t, float>>(c, r0, r1);            \
        case kF32:                                                       \
            if (c.acc == kF64) return FN<Cfg<float, double>>(c, r0, r1); \
            return FN<Cfg<float, float>>(c, r0, r1);                     \
        default: return FN<Cfg<double, double>>(c, r0, r1);              \
    }

void run_forward(const Call& c, i64 r0, i64 r1) { POLYCOS_BY_CONFIG(forward_dispatch) }
// Streaming stores are weakly ordered: fenced before the thread reports its rows done.
void run_backward_rows(const Call& c, i64 r0, i64 r1) { POLYCOS_BY_CONFIG(backward_dispatch) }
void run_backward(const Call& c, i64 r0, i64 r1) {
    run_backward_rows(c, r0, r1);
#if POLYCOS_X86
    if (c.stream) _mm_sfence();
#endif
}
void run_normalize(const Call& c, i64 r0, i64 r1) { POLYCOS_BY_CONFIG(normalize_dispatch) }
void run_normalize_vjp(const Call& c, i64 r0, i64 r1) {
    if (c.dtype == kF64) return normalize_vjp_rows<double, double>(c, r0, r1);
    if (c.acc == kF64) return normalize_vjp_rows<float, double>(c, r0, r1);
    return normalize_vjp_rows<float, float>(c, r0, r1);
}

#undef POLYCOS_BY_CONFIG

#endif  // POLYCOS_CPU_LOOPS
