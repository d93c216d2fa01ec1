/* Expert products for few rows per expert on a CPU (float32), built by cpu_kernels.py on first use.

Shape legend: N rows (token-expert assignments) sorted by expert, expert e owning rows
[off[e], off[e + 1]); O the rows of one expert's weight, K its columns (the dimension each
weight row is contiguous in).

  moe_dot:   y[r, o]    = b[e, o] + sum_k x[r, k] w[e, o, k]     (the forward: nn.Linear)
  moe_axpy:  y[r, k]   (+)= sum_o g[r, o] w[e, o, k]             (the input gradient)
  moe_outer: dw[e, o, k] (+)= sum_r g[r, o] x[r, k]              (the weight gradient; experts
             without rows get zeros unless accumulating)
  moe_grad:  moe_axpy and moe_outer in one pass over w         (the backward, few rows)

Why not BLAS: with a few rows per expert these products stream the weights (or write the weight
gradient) once and do little arithmetic per byte; MKL's gemm, called per expert or batched over
padded experts, runs them at a fraction of the memory bandwidth and pays for padding rows that carry
no token. Here each weight vector loaded from memory is used against every row of its expert held in
registers, experts without rows cost nothing (or one write of zeros for their weight gradient), and
one call covers all experts, split over the threads in chunks of weight rows or columns. With few
rows the backward is bound by memory traffic, so moe_grad reads each weight once for both gradients
and writes the weight gradient with non-temporal stores (no read of the lines it overwrites).

All pointers are float32 with unit stride along k (or o for g in moe_dot's sense); ld* are row
strides in elements, s*e the stride between experts' weights. The same tile code builds for AVX-512
(16 lanes, 32 registers) or AVX2 with FMA (8 lanes, 16 registers, smaller tiles): the macros below.
*/
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

typedef int64_t i64;

#if defined(__AVX512F__)
typedef __m512 vec;
#define VL 16
#define LD(p) _mm512_loadu_ps(p)
#define ST(p, v) _mm512_storeu_ps((p), (v))
#define ADD(a, b) _mm512_add_ps((a), (b))
#define STREAM(p, v) _mm512_stream_ps((p), (v))
#define BCAST(s) _mm512_set1_ps(s)
#define HSUM(v) _mm512_reduce_add_ps(v)
#define FMA(acc, a, b) acc = _mm512_fmadd_ps((a), (b), (acc))
/* tiles: accumulators + operands fit the 32 vector registers */
#define DOT_OB 4
#define DOT_R 6
#define DOT_OB_SMALL 8
#define DOT_R_SMALL 3
#define AXPY_R 6
#define AXPY_KV 4
#define OUTER_OB 6
#define OUTER_KV 4
#define GRAD_R 6
#define GRAD_KV 2
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define VL 8
#define LD(p) _mm256_loadu_ps(p)
#define ST(p, v) _mm256_storeu_ps((p), (v))
#define ADD(a, b) _mm256_add_ps((a), (b))
#define STREAM(p, v) _mm256_stream_ps((p), (v))
#define BCAST(s) _mm256_set1_ps(s)
#define HSUM(v) hsum256(v)
#define FMA(acc, a, b) acc = _mm256_fmadd_ps((a), (b), (acc))
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
/* tiles: accumulators + operands fit the 16 vector registers */
#define DOT_OB 2
#define DOT_R 4
#define DOT_OB_SMALL 4
#define DOT_R_SMALL 2
#define AXPY_R 6
#define AXPY_KV 2
#define OUTER_OB 6
#define OUTER_KV 2
#define GRAD_R 6
#define GRAD_KV 1
#else
#error "moeify's CPU expert kernels need AVX-512 or AVX2 with FMA"
#endif

/* Keep a loaded vector in a register: without this, GCC folds each use of it into a memory
   operand of the FMA, reloading it once per use. */
#define PIN(v) __asm__("" : "+v"(v))
#define UNROLL _Pragma("GCC unroll 8")

int moe_kernels_abi(void) { return 3; }
int moe_kernels_vector_width(void) { return VL; }

static inline i64 min64(i64 a, i64 b) { return a < b ? a : b; }

/* ---- moe_dot ---- */

/* OB weight rows against R rows of x, over all of K. */
static inline __attribute__((always_inline)) void dot_tile(const int OB, const int R, i64 K, const float* x,
        i64 ldx, const float* w, i64 ldw, const float* b, float* y, i64 ldy) {
    vec acc[DOT_OB_SMALL > DOT_OB ? DOT_OB_SMALL : DOT_OB][DOT_R > DOT_R_SMALL ? DOT_R : DOT_R_SMALL];
    UNROLL for (int o = 0; o < OB; ++o) UNROLL for (int r = 0; r < R; ++r) acc[o][r] = BCAST(0.f);
    i64 k = 0;
    for (; k + VL <= K; k += VL) {
        vec xv[DOT_R > DOT_R_SMALL ? DOT_R : DOT_R_SMALL];
        UNROLL for (int r = 0; r < R; ++r) { xv[r] = LD(x + r * ldx + k); PIN(xv[r]); }
        UNROLL for (int o = 0; o < OB; ++o) {
            vec wv = LD(w + o * ldw + k);
            PIN(wv);
            /* the next tile's weight rows (a tile reads short pieces of OB rows at once), into L2:
               (2048, 512) weights, 4 rows per expert, 1.35 ms with an L1 prefetch, 0.79 with this */
            _mm_prefetch((const char*)(w + (o + OB) * ldw + k), _MM_HINT_T1);
            UNROLL for (int r = 0; r < R; ++r) FMA(acc[o][r], wv, xv[r]);
        }
    }
    UNROLL for (int o = 0; o < OB; ++o)
        UNROLL for (int r = 0; r < R; ++r) {
            float s = HSUM(acc[o][r]);
            for (i64 kk = k; kk < K; ++kk) s += x[r * ldx + kk] * w[o * ldw + kk];
            y[r * ldy + o] = s + (b ? b[o] : 0.f);
        }
}

#define DOT_TILE(OB, R) dot_tile(OB, R, K, x + r * ldx, ldx, w, ldw, b, y + r * ldy, ldy)

/* All n rows against DOT_OB weight rows (R rows at a time, then the rest). */
static void dot_rows(i64 n, i64 K, const float* x, i64 ldx, const float* w, i64 ldw, const float* b, float* y,
                     i64 ldy) {
    i64 r = 0;
    for (; r + DOT_R <= n; r += DOT_R) DOT_TILE(DOT_OB, DOT_R);
    switch (n - r) { /* the rows left: fewer than DOT_R */
        case 1: DOT_TILE(DOT_OB, 1); break;
        case 2: DOT_TILE(DOT_OB, 2); break;
        case 3: DOT_TILE(DOT_OB, 3); break;
#if DOT_R > 4
        case 4: DOT_TILE(DOT_OB, 4); break;
#endif
#if DOT_R > 5
        case 5: DOT_TILE(DOT_OB, 5); break;
#endif
        default: break;
    }
}

/* Experts with at most DOT_R_SMALL rows: more weight rows per tile, more loads in flight. */
static void dot_rows_small(i64 n, i64 K, const float* x, i64 ldx, const float* w, i64 ldw, const float* b,
                           float* y, i64 ldy) {
    i64 r = 0;
    switch (n) { /* at most DOT_R_SMALL rows */
        case 1: DOT_TILE(DOT_OB_SMALL, 1); break;
        case 2: DOT_TILE(DOT_OB_SMALL, 2); break;
#if DOT_R_SMALL > 2
        case 3: DOT_TILE(DOT_OB_SMALL, 3); break;
#endif
        default: break;
    }
}

#define DOT_CHUNK 64 /* weight rows per work item */

void moe_dot(int threads, int E, const i64* off, i64 O, i64 K, const float* x, i64 ldx, const float* w, i64 swe,
             i64 ldw, const float* b, i64 sbe, float* y, i64 ldy) {
    const i64 chunks = (O + DOT_CHUNK - 1) / DOT_CHUNK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (i64 item = 0; item < (i64)E * chunks; ++item) {
        const int e = (int)(item / chunks);
        const i64 n = off[e + 1] - off[e];
        if (n == 0) continue;
        const i64 o0 = (item % chunks) * DOT_CHUNK, o1 = min64(o0 + DOT_CHUNK, O);
        const float* xe = x + off[e] * ldx;
        const float* we = w + e * swe;
        const float* be = b ? b + e * sbe : 0;
        float* ye = y + off[e] * ldy;
        const int small = n <= DOT_R_SMALL;
        const int ob = small ? DOT_OB_SMALL : DOT_OB;
        i64 o = o0;
        for (; o + ob <= o1; o += ob) {
            if (small) dot_rows_small(n, K, xe, ldx, we + o * ldw, ldw, be ? be + o : 0, ye + o, ldy);
            else dot_rows(n, K, xe, ldx, we + o * ldw, ldw, be ? be + o : 0, ye + o, ldy);
        }
        for (; o < o1; ++o) /* weight rows left over */
            for (i64 r = 0; r < n; ++r) {
                float s = be ? be[o] : 0.f;
                for (i64 k = 0; k < K; ++k) s += xe[r * ldx + k] * we[o * ldw + k];
                ye[r * ldy + o] = s;
            }
    }
}

/* ---- moe_axpy ---- */

/* R rows of y, AXPY_KV vectors of k, over all O weight rows. */
static inline __attribute__((always_inline)) void axpy_tile(const int R, i64 O, const float* g, i64 ldg,
        const float* w, i64 ldw, float* y, i64 ldy, int accumulate) {
    vec acc[AXPY_R][AXPY_KV];
    UNROLL for (int r = 0; r < R; ++r) UNROLL for (int j = 0; j < AXPY_KV; ++j) acc[r][j] = BCAST(0.f);
    for (i64 o = 0; o < O; ++o) {
        vec wv[AXPY_KV];
        UNROLL for (int j = 0; j < AXPY_KV; ++j) {
            wv[j] = LD(w + o * ldw + j * VL);
            PIN(wv[j]);
            _mm_prefetch((const char*)(w + (o + 8) * ldw + j * VL), _MM_HINT_T0);
        }
        UNROLL for (int r = 0; r < R; ++r) {
            vec gv = BCAST(g[r * ldg + o]);
            PIN(gv);
            UNROLL for (int j = 0; j < AXPY_KV; ++j) FMA(acc[r][j], gv, wv[j]);
        }
    }
    UNROLL for (int r = 0; r < R; ++r)
        UNROLL for (int j = 0; j < AXPY_KV; ++j) {
            float* p = y + r * ldy + j * VL;
            ST(p, accumulate ? ADD(LD(p), acc[r][j]) : acc[r][j]);
        }
}

#define AXPY_TILE(R) axpy_tile(R, O, g + r * ldg, ldg, w, ldw, y + r * ldy, ldy, accumulate)

static void axpy_rows(i64 n, i64 O, const float* g, i64 ldg, const float* w, i64 ldw, float* y, i64 ldy,
                      int accumulate) {
    i64 r = 0;
    for (; r + AXPY_R <= n; r += AXPY_R) AXPY_TILE(AXPY_R);
    switch (n - r) {
        case 1: AXPY_TILE(1); break;
        case 2: AXPY_TILE(2); break;
#if AXPY_R > 3
        case 3: AXPY_TILE(3); break;
        case 4: AXPY_TILE(4); break;
        case 5: AXPY_TILE(5); break;
#endif
        default: break;
    }
}

#define AXPY_CHUNK (AXPY_KV * VL) /* columns per work item */

void moe_axpy(int threads, int E, const i64* off, i64 O, i64 K, const float* g, i64 ldg, const float* w, i64 swe,
              i64 ldw, float* y, i64 ldy, int accumulate) {
    const i64 full = K / AXPY_CHUNK, chunks = full + (K % AXPY_CHUNK != 0);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (i64 item = 0; item < (i64)E * chunks; ++item) {
        const int e = (int)(item / chunks);
        const i64 n = off[e + 1] - off[e];
        if (n == 0) continue;
        const i64 c = item % chunks;
        const float* ge = g + off[e] * ldg;
        const float* we = w + e * swe;
        float* ye = y + off[e] * ldy;
        if (c < full) {
            axpy_rows(n, O, ge, ldg, we + c * AXPY_CHUNK, ldw, ye + c * AXPY_CHUNK, ldy, accumulate);
            continue;
        }
        for (i64 r = 0; r < n; ++r) /* columns left over */
            for (i64 k = full * AXPY_CHUNK; k < K; ++k) {
                float s = 0.f;
                for (i64 o = 0; o < O; ++o) s += ge[r * ldg + o] * we[o * ldw + k];
                ye[r * ldy + k] = accumulate ? ye[r * ldy + k] + s : s;
            }
    }
}

/* ---- moe_outer ---- */

/* A weight gradient's vectors go to memory with non-temporal stores when the gradient is written
   whole (not accumulated) and 64-byte aligned: the write then costs no read of the line it replaces,
   and the gradient, which the optimizer reads much later, does not evict the weights from the caches. */
static inline int nt_ok(int accumulate, const float* dw, i64 swe, i64 ldw) {
    return !accumulate && (uintptr_t)dw % 64 == 0 && ldw % VL == 0 && swe % VL == 0;
}

static inline void put(float* p, vec v, int nt) {
    if (nt) STREAM(p, v);
    else ST(p, v);
}

/* Zeros over columns [k0, k1) of O weight-gradient rows (k0 a multiple of VL when nt). */
static void zero_rows(float* dw, i64 ldw, i64 O, i64 k0, i64 k1, int nt) {
    const i64 kv = k0 + (k1 - k0) / VL * VL;
    for (i64 o = 0; o < O; ++o) {
        for (i64 k = k0; k < kv; k += VL) put(dw + o * ldw + k, BCAST(0.f), nt);
        for (i64 k = kv; k < k1; ++k) dw[o * ldw + k] = 0.f;
    }
}

#define OUTER_CHUNK (16 * OUTER_OB) /* weight-gradient rows per work item */

void moe_outer(int threads, int E, const i64* off, i64 O, i64 K, const float* g, i64 ldg, const float* x, i64 ldx,
               float* dw, i64 swe, i64 ldw, int accumulate) {
    const i64 chunks = (O + OUTER_CHUNK - 1) / OUTER_CHUNK;
    const int nt = nt_ok(accumulate, dw, swe, ldw);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (i64 item = 0; item < (i64)E * chunks; ++item) {
        const int e = (int)(item / chunks);
        const i64 n = off[e + 1] - off[e];
        const i64 o0 = (item % chunks) * OUTER_CHUNK, o1 = min64(o0 + OUTER_CHUNK, O);
        float* de = dw + e * swe;
        if (n == 0) {
            if (!accumulate) zero_rows(de + o0 * ldw, ldw, o1 - o0, 0, K, nt);
            _mm_sfence();
            continue;
        }
        const float* ge = g + off[e] * ldg;
        const float* xe = x + off[e] * ldx;
        for (i64 o = o0; o < o1; o += OUTER_OB) {
            const int ob = (int)min64(OUTER_OB, o1 - o);
            i64 k = 0;
            for (; k + OUTER_KV * VL <= K; k += OUTER_KV * VL) {
                vec acc[OUTER_OB][OUTER_KV];
                UNROLL for (int i = 0; i < OUTER_OB; ++i) UNROLL for (int j = 0; j < OUTER_KV; ++j) acc[i][j] = BCAST(0.f);
                for (i64 r = 0; r < n; ++r) {
                    vec xv[OUTER_KV];
                    UNROLL for (int j = 0; j < OUTER_KV; ++j) { xv[j] = LD(xe + r * ldx + k + j * VL); PIN(xv[j]); }
                    UNROLL for (int i = 0; i < OUTER_OB; ++i) {
                        vec gv = BCAST(i < ob ? ge[r * ldg + o + i] : 0.f);
                        PIN(gv);
                        UNROLL for (int j = 0; j < OUTER_KV; ++j) FMA(acc[i][j], gv, xv[j]);
                    }
                }
                UNROLL for (int i = 0; i < OUTER_OB; ++i) {
                    if (i >= ob) break;
                    UNROLL for (int j = 0; j < OUTER_KV; ++j) {
                        float* p = de + (o + i) * ldw + k + j * VL;
                        put(p, accumulate ? ADD(LD(p), acc[i][j]) : acc[i][j], nt);
                    }
                }
            }
            for (int i = 0; i < ob; ++i) /* columns left over */
                for (i64 kk = k; kk < K; ++kk) {
                    float s = 0.f;
                    for (i64 r = 0; r < n; ++r) s += ge[r * ldg + o + i] * xe[r * ldx + kk];
                    float* p = de + (o + i) * ldw + kk;
                    *p = accumulate ? *p + s : s;
                }
        }
        _mm_sfence();
    }
}


/* ---- moe_grad: moe_axpy and moe_outer in one pass over the weights ---- */

#define GRAD_OB 16 /* weight rows per block: one block of weights and its gradient stay in L1 */

/* R rows of one expert, weight rows [o0, o1), GRAD_KV vectors of columns: the input gradient's R
   rows updated in place, and this row group's part of the weight gradient summed into dwb. */
static inline __attribute__((always_inline)) void grad_tile(const int R, int first, i64 o0, i64 o1,
        const float* g, i64 ldg, const float* x, i64 ldx, const float* w, i64 ldw, float* dx, i64 lddx, float* dwb) {
    vec xv[GRAD_R][GRAD_KV], acc[GRAD_R][GRAD_KV];
    UNROLL for (int r = 0; r < R; ++r) UNROLL for (int j = 0; j < GRAD_KV; ++j) {
        xv[r][j] = LD(x + r * ldx + j * VL);
        acc[r][j] = LD(dx + r * lddx + j * VL);
    }
    for (i64 o = o0; o < o1; ++o) {
        vec wv[GRAD_KV], dv[GRAD_KV];
        float* d = dwb + (o - o0) * GRAD_KV * VL;
        UNROLL for (int j = 0; j < GRAD_KV; ++j) {
            wv[j] = LD(w + o * ldw + j * VL);
            PIN(wv[j]);
            _mm_prefetch((const char*)(w + (o + GRAD_OB) * ldw + j * VL), _MM_HINT_T1);
            dv[j] = first ? BCAST(0.f) : LD(d + j * VL);
        }
        UNROLL for (int r = 0; r < R; ++r) {
            vec gv = BCAST(g[r * ldg + o]);
            PIN(gv);
            UNROLL for (int j = 0; j < GRAD_KV; ++j) {
                FMA(acc[r][j], gv, wv[j]);
                FMA(dv[j], gv, xv[r][j]);
            }
        }
        UNROLL for (int j = 0; j < GRAD_KV; ++j) ST(d + j * VL, dv[j]);
    }
    UNROLL for (int r = 0; r < R; ++r) UNROLL for (int j = 0; j < GRAD_KV; ++j) ST(dx + r * lddx + j * VL, acc[r][j]);
}

#define GRAD_TILE(R) grad_tile(R, r == 0, o0, o1, g + r * ldg, ldg, x + r * ldx + k, ldx, w + k, ldw, \
                               dx + r * lddx + k, lddx, dwb)

/* One expert's n rows, columns [k0, k1): dx[:, k0:k1] += g @ w[:, k0:k1] and
   dw[:, k0:k1] (+)= g.T @ x[:, k0:k1], reading each weight and writing each gradient element once. */
static void grad_columns(i64 n, i64 O, i64 k0, i64 k1, const float* g, i64 ldg, const float* x, i64 ldx,
                         const float* w, i64 ldw, float* dx, i64 lddx, float* dw, i64 lddw, int acc_dw, int nt) {
    float dwb[GRAD_OB * GRAD_KV * VL] __attribute__((aligned(64)));
    const i64 kv = k0 + (k1 - k0) / (GRAD_KV * VL) * (GRAD_KV * VL);
    for (i64 o0 = 0; o0 < O; o0 += GRAD_OB) {
        const i64 o1 = min64(o0 + GRAD_OB, O);
        for (i64 k = k0; k < kv; k += GRAD_KV * VL) {
            i64 r = 0;
            for (; r + GRAD_R <= n; r += GRAD_R) GRAD_TILE(GRAD_R);
            switch (n - r) {
                case 1: GRAD_TILE(1); break;
                case 2: GRAD_TILE(2); break;
                case 3: GRAD_TILE(3); break;
                case 4: GRAD_TILE(4); break;
                case 5: GRAD_TILE(5); break;
                default: break;
            }
            for (i64 o = o0; o < o1; ++o)
                UNROLL for (int j = 0; j < GRAD_KV; ++j) {
                    float* p = dw + o * lddw + k + j * VL;
                    vec v = LD(dwb + (o - o0) * GRAD_KV * VL + j * VL);
                    put(p, acc_dw ? ADD(LD(p), v) : v, nt);
                }
        }
        for (i64 o = o0; o < o1; ++o) /* columns left over */
            for (i64 kk = kv; kk < k1; ++kk) {
                float s = 0.f;
                for (i64 r = 0; r < n; ++r) {
                    s += g[r * ldg + o] * x[r * ldx + kk];
                    dx[r * lddx + kk] += g[r * ldg + o] * w[o * ldw + kk];
                }
                dw[o * lddw + kk] = acc_dw ? dw[o * lddw + kk] + s : s;
            }
    }
}

void moe_grad(int threads, int E, const i64* off, i64 O, i64 K, const float* g, i64 ldg, const float* x, i64 ldx,
              const float* w, i64 swe, i64 ldw, float* dx, i64 lddx, float* dw, i64 sdwe, i64 lddw, int acc_dx,
              int acc_dw) {
    /* work items: (expert, column range); the ranges are whole vector tiles, enough of them to keep
       every thread busy, and no two items write the same element (no reduction between threads) */
    const i64 tile = GRAD_KV * VL;
    i64 splits = (2 * (i64)threads + E - 1) / E;
    i64 width = ((K + splits - 1) / splits + tile - 1) / tile * tile;
    if (width < tile) width = tile;
    splits = (K + width - 1) / width;
    const int nt = nt_ok(acc_dw, dw, sdwe, lddw);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (i64 item = 0; item < (i64)E * splits; ++item) {
        const int e = (int)(item / splits);
        const i64 n = off[e + 1] - off[e];
        const i64 k0 = (item % splits) * width, k1 = min64(k0 + width, K);
        float* de = dw + e * sdwe;
        if (n == 0) {
            if (!acc_dw) zero_rows(de, lddw, O, k0, k1, nt);
            _mm_sfence();
            continue;
        }
        float* dxe = dx + off[e] * lddx;
        if (!acc_dx)
            for (i64 r = 0; r < n; ++r) memset(dxe + r * lddx + k0, 0, sizeof(float) * (k1 - k0));
        grad_columns(n, O, k0, k1, g + off[e] * ldg, ldg, x + off[e] * ldx, ldx, w + e * swe, ldw, dxe, lddx, de, lddw,
                     acc_dw, nt);
        _mm_sfence();
    }
}
