/* The tokens of a batch through the top-k experts of a MoE layer in one call, grouped by expert: each expert
 * that any token routes to runs once, on all of its tokens together (the fused gate/up GEMV, SiLU(gate) * up,
 * the down GEMV), so its weights stream from memory once per call whatever the number of tokens routed to it;
 * then each token sums its experts' outputs, weighted by routing. Weights may be plain bf16 or any quantized
 * format the GEMVs read.
 *
 * The Python loop this replaces runs about a dozen torch ops and three module calls per expert. Numerics follow
 * the torch path: SiLU in fp32 rounded to bf16, the product rounded to bf16, each expert's output times its
 * (fp32) weight rounded to bf16, then added to the token's running sum in bf16 in top-k order. A token alone
 * gets exactly what it gets in the one-token call. Quantized experts shared by up to 4 tokens run the GEMVs'
 * several-row kernels, whose fp32 sums may round differently in the last bit, and ones shared by more the GEMM,
 * which rounds the weights to bf16 as the module path does; bf16 experts run the GEMM, whose sums for a token
 * do not depend on the other tokens.
 *
 * With several threads the experts are shared out among them, one whole expert at a time (its GEMVs then run as
 * plain loops in that thread): a small model's GEMVs are too short to split. With this and the GEMVs' threading
 * threshold counting rows, the bundled model's 16-sequence step on two threads took 0.65-0.71x as long as with one
 * thread running the experts in turn (two runs), OLMoE-8L's 0.95x (benchmarks/decode_step.py --threads 2). The
 * results do not depend on the number of threads.
 */
#include "quant_cpu.h"

/* y [M, N] = x [M, K] @ W^T for one weight of the given kind (s: scales, z: zero points or NULL) */
void strata_gemv(int kind, const uint16_t *x, int64_t M, int64_t K, const void *w, const void *s, const void *z,
                 int64_t N, int64_t G, uint16_t *y) {
    switch (kind) {
    case WK_BF16: gemv_bf16(x, M, K, w, N, NULL, y, 0); break;
    case WK_INT8: gemv_int8(x, M, K, w, N, s, NULL, y); break;
    case WK_FP8: gemv_fp8(x, M, K, w, N, s, NULL, y); break;
    case WK_NESTED: gemv_nested(x, M, K, w, N, G, s, NULL, y); break;
    case WK_Q4K: case WK_Q5K: case WK_Q6K: gemv_kq(kind - WK_Q4K, x, M, K, w, N, NULL, y); break;
    case WK_Q8_0: case WK_Q4_1: case WK_Q5_0: case WK_Q5_1: gemv_qb(kind - WK_Q8_0, x, M, K, w, N, NULL, y); break;
    default: gemv_int4(x, M, K, w, N, G, s, z, NULL, y); break;
    }
}

/* strata_gemv for any M, reading the weight from memory once: up to one pass of the GEMVs (MB rows), beyond that
 * the GEMM of quant_cpu_gemm.c (weight tiles dequantized to bf16 in cache, as the module path's weights), which
 * ran as fast as the GEMVs' one pass from there (benchmarks/quant_gemm.py). bf16 weights take the GEMM at every
 * M: it streams them in address order, a tile ahead, and ran 1.2-1.4x faster than gemv_bf16 at 1-8 rows on an
 * OLMoE layer's experts (benchmarks/moe_grouped.py); its sums do not depend on the other rows. Except a weight of
 * at most GEMV_BF16_MAX_BYTES at up to GEMV_BF16_MAX_ROWS rows: a small model's weights stay in cache from step
 * to step, and there gemv_bf16 ran 1.2-1.4x faster than the GEMM at 1-8 rows and 1.1-1.3x at 9-16 (the bundled
 * model's projections, experts and head; benchmarks/decode_step.py). The AVX2 build runs bf16 on the GEMV alone. */
void gemv_once(int kind, const uint16_t *x, int64_t M, int64_t K, const void *w, const void *s, const void *z,
               int64_t N, int64_t G, uint16_t *y) {
#ifndef __AVX512F__
    /* the AVX2 build: the GEMV's own AVX2 kernel ran 1.1-2.1x the GEMM (the AVX-512 code on half-width registers)
     * at 1-128 rows of OLMoE's expert weights from memory (benchmarks/bf16_gemv.py) */
    if (kind == WK_BF16) {
        strata_gemv(kind, x, M, K, w, s, z, N, G, y);
        return;
    }
#endif
    if (kind == WK_BF16 && M <= GEMV_BF16_MAX_ROWS && N * K * 2 <= GEMV_BF16_MAX_BYTES)
        strata_gemv(kind, x, M, K, w, s, z, N, G, y);
    else if (kind != WK_BF16 && M <= MB)
        strata_gemv(kind, x, M, K, w, s, z, N, G, y);
    else
        gemm_dq(kind, x, M, K, w, s, z, N, G, NULL, y);
}

/* gemv_once for fp32 x [M, K] and y [M, N] (a float32 model's quantized projection, as QuantLinear runs it): GGUF's
 * 32-weight blocks through their fp32 GEMV (gemv_qb_f32), other kinds on x rounded to bf16 (xb: scratch of M * K)
 * with the bf16 output (yb: M * N) widened */
void gemv_once_f32(int kind, const float *x, int64_t M, int64_t K, const void *w, const void *s, const void *z,
                   int64_t N, int64_t G, float *y, uint16_t *xb, uint16_t *yb) {
    if (kind >= WK_Q8_0) {
        gemv_qb_f32(kind - WK_Q8_0, x, M, K, w, N, NULL, y);
        return;
    }
    for (int64_t i = 0; i < M * K; i += 16) {
        const __mmask16 m = tail16(M * K - i);
        store16_any(0, xb, i, m, load16_any(1, x, i, m));
    }
    gemv_once(kind, xb, M, K, w, s, z, N, G, yb);
    for (int64_t i = 0; i < M * N; i += 16) { /* bf16 -> fp32 is exact: the bits moved up */
        const __mmask16 m = tail16(M * N - i);
        store16_any(1, y, i, m, load16_any(0, yb, i, m));
    }
}

/* act [I] = silu(gate) * up for gu = [gate (I) | up (I)]: bf16(bf16(silu(gate)) * up) as torch's bf16 F.silu(g) * u,
 * or in fp32 (F32, a float32 model's MLP) */
static inline __attribute__((always_inline)) void silu_mul_any(const int F32, const void *gu, int64_t I, void *act) {
    for (int64_t i = 0; i < I; i += 16) {
        __mmask16 m = tail16(I - i);
        __m512 g = load16_any(F32, gu, i, m), u = load16_any(F32, gu, I + i, m);
        __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g)));
        __m512 s = _mm512_div_ps(g, den); /* silu(g) in fp32 (for bf16 rounded, as torch's bf16 op) */
        store16_any(F32, act, i, m, _mm512_mul_ps(F32 ? s : bf16_round_ps(s), u));
    }
}

void silu_mul_bf16(const uint16_t *gu, int64_t I, uint16_t *act) { silu_mul_any(0, gu, I, act); }

void silu_mul_f32(const float *gu, int64_t I, float *act) { silu_mul_any(1, gu, I, act); }

/* Counts since the last moe_take_counts: calls, token-expert assignments, expert runs (one per distinct expert
 * per call: the weight streams of the grouped path; the one-token-at-a-time path streamed one per assignment). */
static int64_t moe_counts[3];

/* below this many multiply-adds in a call (all tokens' experts) the experts run in the calling thread: the
 * bundled model's two experts of one token (2 x 123K) already gain from a thread each (its one-sequence step on two
 * threads 0.81x that with 1 << 20, benchmarks/decode_step.py --threads 2, 7 rounds) */
#define MOE_PAR_MIN_MACS (1 << 16)

void moe_take_counts(int64_t *out) {
    for (int i = 0; i < 3; i++) out[i] = moe_counts[i], moe_counts[i] = 0;
}

/* element i of an array of bf16 (F32 = 0) or fp32 numbers */
#define AT(F32, p, i) ((void *)((char *)(p) + (i) * ((F32) ? 4 : 2)))

static inline __attribute__((always_inline)) void moe_decode_any(
    const int F32, int64_t kind, const void *x, int64_t S, int64_t H, int64_t I, int64_t G, int64_t E, int64_t k,
    const int64_t *ids, const float *weights, const void *const *wgu, const void *const *sgu, const void *const *zgu,
    const void *const *wd, const void *const *sd, const void *const *zd, void *out) {
    const int64_t A = S * k; /* assignments, token-major */
    const size_t es = F32 ? 4 : 2;
    int64_t *count = calloc((size_t)(E + 1), sizeof(int64_t)), *order = malloc(sizeof(int64_t) * (size_t)A);
    for (int64_t a = 0; a < A; a++) count[ids[a] + 1]++;
    for (int64_t e = 0; e < E; e++) count[e + 1] += count[e]; /* count[e]: first slot of expert e in order */
    int64_t *fill = malloc(sizeof(int64_t) * (size_t)E);
    memcpy(fill, count, sizeof(int64_t) * (size_t)E);
    for (int64_t a = 0; a < A; a++) order[fill[ids[a]]++] = a; /* assignments grouped by expert, tokens in order */
    /* 64-byte aligned, as torch's buffers are, so that the GEMM need not copy the rows (see gemm_dq) */
    char *xs = aligned_alloc(64, (es * (size_t)(A * (H + 3 * I)) + 63) / 64 * 64);
    void *gu = AT(F32, xs, A * H), *act = AT(F32, gu, A * 2 * I);
    void *y = malloc(es * (size_t)(A * H)); /* per assignment, in `order` */
    /* fp32: the bf16 in- and outputs of kinds that take bf16 activations (gemv_once_f32), per assignment */
    const int64_t wx = H > I ? H : I, wy = 2 * I > H ? 2 * I : H;
    uint16_t *xb = F32 ? aligned_alloc(64, (sizeof(uint16_t) * (size_t)(A * (wx + wy)) + 63) / 64 * 64) : NULL;
    uint16_t *yb = F32 ? xb + A * wx : NULL;
    int64_t *slot = malloc(sizeof(int64_t) * (size_t)A); /* assignment -> its row of y */
    for (int64_t r = 0; r < A; r++) slot[order[r]] = r;
    /* the experts any token routes to, most tokens first: the threads take them one at a time (each expert's
     * GEMVs then run in one thread, their PAR_FOR plain), and the large ones started first even out the end */
    int64_t *active = malloc(sizeof(int64_t) * (size_t)E), na = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t c = count[e + 1] - count[e];
        if (!c) continue;
        int64_t j = na++;
        for (; j > 0 && count[active[j - 1] + 1] - count[active[j - 1]] < c; j--) active[j] = active[j - 1];
        active[j] = e;
    }
    moe_counts[2] += na;
    const int par = na > 1 && A * 3 * H * I > MOE_PAR_MIN_MACS && omp_get_max_threads() > 1 && !omp_in_parallel();
#pragma omp parallel for schedule(dynamic, 1) if (par)
    for (int64_t j = 0; j < na; j++) {
        const int64_t e = active[j], c = count[e + 1] - count[e], r0 = count[e];
        void *xe = AT(F32, xs, r0 * H), *gue = AT(F32, gu, r0 * 2 * I), *acte = AT(F32, act, r0 * I); /* its rows */
        void *ye = AT(F32, y, r0 * H);
        for (int64_t i = 0; i < c; i++) memcpy(AT(F32, xe, i * H), AT(F32, x, order[r0 + i] / k * H), es * (size_t)H);
        if (F32) {
            uint16_t *xbe = xb + r0 * wx, *ybe = yb + r0 * wy;
            gemv_once_f32((int)kind, xe, c, H, wgu[e], sgu[e], zgu[e], 2 * I, G, gue, xbe, ybe);
            for (int64_t i = 0; i < c; i++) silu_mul_any(1, AT(1, gue, i * 2 * I), I, AT(1, acte, i * I));
            gemv_once_f32((int)kind, acte, c, I, wd[e], sd[e], zd[e], H, G, ye, xbe, ybe);
        } else {
            gemv_once((int)kind, xe, c, H, wgu[e], sgu[e], zgu[e], 2 * I, G, gue);
            for (int64_t i = 0; i < c; i++) silu_mul_any(0, AT(0, gue, i * 2 * I), I, AT(0, acte, i * I));
            gemv_once((int)kind, acte, c, I, wd[e], sd[e], zd[e], H, G, ye);
        }
    }
    free(active);
    float *acc = malloc(sizeof(float) * (size_t)H);
    for (int64_t t = 0; t < S; t++) {
        for (int64_t h = 0; h < H; h++) acc[h] = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            const void *yr = AT(F32, y, slot[t * k + j] * H);
            /* fp32 (Mixtral) or bf16-exact: torch multiplies in fp32 */
            const __m512 w = _mm512_set1_ps(weights[t * k + j]);
            for (int64_t h = 0; h < H; h += 16) {
                __mmask16 m = tail16(H - h);
                __m512 a = _mm512_maskz_loadu_ps(m, acc + h);
                const __m512 yw = _mm512_mul_ps(load16_any(F32, yr, h, m), w);
                /* fp32 throughout for F32, as the module path's out += expert(x) * w; else bf16 per op */
                a = F32 ? _mm512_add_ps(a, yw) : bf16_round_ps(_mm512_add_ps(a, bf16_round_ps(yw)));
                _mm512_mask_storeu_ps(acc + h, m, a);
            }
        }
        for (int64_t h = 0; h < H; h += 16) { /* acc is bf16-exact for bf16: the store's rounding changes nothing */
            __mmask16 m = tail16(H - h);
            store16_any(F32, out, t * H + h, m, _mm512_maskz_loadu_ps(m, acc + h));
        }
    }
    moe_counts[0]++;
    moe_counts[1] += A;
    free(acc);
    free(slot);
    free(xb);
    free(y);
    free(xs);
    free(fill);
    free(order);
    free(count);
}
#undef AT

/* out [S, H] (bf16): row t = sum_j bf16(weights[t, j]) * expert_{ids[t, j]}(x[t]) over j < k.
 * Per expert e: wgu[e], sgu[e], zgu[e] describe the fused [2I, H] gate/up weight (gate rows first); wd, sd, zd
 * the [H, I] down weight. s* / z* entries may be NULL where the kind has no scales / zero points. ids [S, k]
 * must lie in [0, E). */
void moe_decode_batch(int64_t kind, const uint16_t *x, int64_t S, int64_t H, int64_t I, int64_t G, int64_t E,
                      int64_t k, const int64_t *ids, const float *weights, const void *const *wgu,
                      const void *const *sgu, const void *const *zgu, const void *const *wd, const void *const *sd,
                      const void *const *zd, uint16_t *out) {
    moe_decode_any(0, kind, x, S, H, I, G, E, k, ids, weights, wgu, sgu, zgu, wd, sd, zd, out);
}

/* moe_decode_batch for a float32 model's quantized experts: x, out fp32; each expert's projections through
 * gemv_once_f32 and SiLU in fp32, the weighted sum in fp32 (as the expert modules compute it) */
void moe_decode_batch_f32(int64_t kind, const float *x, int64_t S, int64_t H, int64_t I, int64_t G, int64_t E,
                          int64_t k, const int64_t *ids, const float *weights, const void *const *wgu,
                          const void *const *sgu, const void *const *zgu, const void *const *wd,
                          const void *const *sd, const void *const *zd, float *out) {
    moe_decode_any(1, kind, x, S, H, I, G, E, k, ids, weights, wgu, sgu, zgu, wd, sd, zd, out);
}
