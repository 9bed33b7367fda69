/* Int8-activation GEMV / GEMM for the integer-coded weight formats, on AVX-512 VNNI (vpdpbusd).
 *
 * Each activation row is quantized in blocks of 32 consecutive values (as llama.cpp's Q8_0; 256 for the
 * K-quants, as Q8_K, see a8k_block): a float scale dx = max|x| / 127 and int8 codes xq = round(x / dx). Every weight format here is read as unsigned 8-bit
 * codes u with, per 32-weight block (q6_k: per 16), a float factor dw and offset cw, w = dw * u + cw:
 *
 *     int4-gG      u = q (0..15)           dw = s          cw = -z s  (z = 8 when symmetric)
 *     int8-nested  u = b                   dw = s          cw = -136 s
 *     int8, q8_0   u = q + 128             dw = s or d     cw = -128 dw
 *     q4_1         u = q                   dw = d          cw = m
 *     q4_k, q5_k   u = q                   dw = d sc[j]    cw = -dmin m[j]
 *     q6_k         u = q (0..63)           dw = d sc[g]    cw = -32 dw
 *
 * so y = sum_j dx_j (dw_j dot(u, xq)_j + cw_j sum(xq)_j). vpdpbusd multiplies 64 codes by 64 activation codes
 * into 16 int32 lanes of 4 products each; a "step" is those 64 weights (two blocks of 32). The four bytes of a
 * lane always belong to one block, so one fp32 multiply by a 16-lane vector of dw * dx per step applies the
 * scales. The activation codes are stored in the order in which a format's codes come out of its bytes (the
 * "step order"; see a8_slot), so the weights are only widened, never shuffled. The offsets are applied at the
 * end as one dot product of cw with the activation's per-16 sums dx * sum(xq).
 *
 * The weight is read in tiles of A8_R output rows: each tile is unpacked once into codes, dw vectors and cw
 * (in L1) and then serves every activation row, A8_MX rows at a time held in registers; activation rows are
 * taken in chunks that stay in L2. Without VNNI at compile time (gcc -mavx512vnni), a8_supported() returns 0
 * and callers keep the bf16-activation kernels.
 */
#include "quant_cpu.h"

enum { A8_INT4 = 0, A8_NESTED = 1, A8_INT8 = 2, A8_Q8_0 = 3, A8_Q4_1 = 4, A8_Q4K = 5, A8_Q5K = 6, A8_Q6K = 7 };
#define A8_R 4          /* weight rows per tile */
#define A8_MX 4         /* activation rows per register block */
#define A8_CHUNK 256    /* activation rows per pass over the weight (their codes stay in L2) */

int64_t a8_supported(void) {
#ifdef __AVX512VNNI__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512VNNI__

/* position of activation element k inside its row in step order (see the top of the file) */
static inline int64_t a8_slot(int fmt, int64_t k) {
    int64_t s = k / 64, e = k % 64;
    switch (fmt) {
    case A8_INT4: /* byte j of a 64-element block holds elements 2j (low nibble) and 2j + 1 (high) */
        return s * 64 + (e & 1) * 32 + e / 2;
    case A8_Q4_1: /* two 32-blocks: low nibbles of each (weights 0-15), then high nibbles (16-31) */
        return s * 64 + ((e & 31) >> 4) * 32 + (e >> 5) * 16 + (e & 15);
    case A8_Q6K: { /* chunk c of a super-block holds sub-blocks 4h + t and 4h + t + 2 (h = c / 2, t = c % 2) */
        int64_t sb = k / 256, sub = (k % 256) / 32, h = sub / 4, t = sub % 2, second = (sub % 4) / 2;
        return sb * 256 + (2 * h + t) * 64 + second * 32 + k % 32;
    }
    default:
        return k;
    }
}

/* 16 activations at p (bf16, or fp32 when f32), lanes outside mk read as 0 */
static inline __m512 a8_load16(const void *p, int f32, __mmask16 mk) {
    return f32 ? _mm512_maskz_loadu_ps(mk, p) : bf16x16_load(p, mk);
}

/* rows x [M, K] (bf16, or fp32 when x_f32) -> xq [M, ldx] int8 in step order, dxv [M, ns * 16] (the dx of
 * each lane of each step), a16 [M, n16p] (dx times the sum of the codes of each 16 values; 0 past K) */
static void a8_quantize(int fmt, int ab, const void *x, int x_f32, int64_t M, int64_t K, int8_t *xq, int64_t ldx,
                        float *dxv, int64_t ns, float *a16, int64_t n16p) {
    /* slot[k] for k < 256 (the permutation repeats every 256 values) and, per step of a 4-step window, the
     * block (0..7) of each lane */
    int16_t slot[256];
    int32_t lane_blk[64];
    for (int k = 0; k < 256; k++) {
        slot[k] = (int16_t)a8_slot(fmt, k);
        if ((slot[k] & 3) == 0) lane_blk[slot[k] / 4] = k / 32;
    }
    const int64_t nb = 2 * ns, nbp = nb + 16;
    const int natural = fmt != A8_INT4 && fmt != A8_Q4_1 && fmt != A8_Q6K;
#pragma omp parallel for schedule(static) if (M * K > (1 << 16))
    for (int64_t m = 0; m < M; m++) {
        int8_t tmp[ns * 64];
        float d[nbp];
        int8_t *q = natural ? xq + m * ldx : tmp;
        memset(q, 0, (size_t)(ns * 64));
        memset(d, 0, sizeof(float) * (size_t)nbp);
        memset(a16 + m * n16p, 0, sizeof(float) * (size_t)n16p);
        const char *xr = (const char *)x + (size_t)(m * K) * (x_f32 ? 4 : 2);
        float wmax = 0.0f; /* ab == 256: max |x| of the current 256 values */
        for (int64_t j = 0; j * 32 < K; j++) {
            int64_t k0 = 32 * j;
            __m512 v0 = a8_load16(xr + k0 * (x_f32 ? 4 : 2), x_f32, tail16(K - k0));
            __m512 v1 = a8_load16(xr + (k0 + 16) * (x_f32 ? 4 : 2), x_f32, K - k0 > 16 ? tail16(K - k0 - 16) : 0);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            if (ab == 256) {
                if (j % 8 == 0) {
                    wmax = 0.0f;
                    for (int64_t k = k0; k < k0 + 256 && k < K; k += 16)
                        wmax = fmaxf(wmax, _mm512_reduce_max_ps(_mm512_abs_ps(
                                               a8_load16(xr + k * (x_f32 ? 4 : 2), x_f32, tail16(K - k)))));
                }
                amax = wmax;
            }
            float dj = amax / 127.0f, id = dj > 0.0f ? 1.0f / dj : 0.0f;
            /* round to nearest, ties to even (the default rounding mode), as torch.round */
            __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
            __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
            _mm_storeu_si128((__m128i *)(q + k0), _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(q + k0 + 16), _mm512_cvtepi32_epi8(q1));
            d[j] = dj;
            a16[m * n16p + 2 * j] = dj * (float)_mm512_reduce_add_epi32(q0);
            a16[m * n16p + 2 * j + 1] = dj * (float)_mm512_reduce_add_epi32(q1);
        }
        if (!natural) {
            int8_t *o = xq + m * ldx;
            for (int64_t k = 0; k < ns * 64; k++) o[(k & ~(int64_t)255) + slot[k & 255]] = tmp[k];
        }
        for (int64_t st = 0; st < ns; st++) {
            __m512i idx = _mm512_loadu_si512(lane_blk + (st & 3) * 16);
            __m512 win = _mm512_loadu_ps(d + (st & ~(int64_t)3) * 2); /* the 8 blocks of this 256 (and 8 more) */
            _mm512_storeu_ps(dxv + (m * ns + st) * 16, _mm512_permutexvar_ps(idx, win));
        }
    }
}

/* 32 bytes -> their low nibbles at o[0..32), high nibbles at o[32..64) */
static inline void split_nibbles(__m256i b, uint8_t *o) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    _mm256_storeu_si256((__m256i *)o, _mm256_and_si256(b, m4));
    _mm256_storeu_si256((__m256i *)(o + 32), _mm256_and_si256(_mm256_srli_epi16(b, 4), m4));
}

/* 16 lanes: lanes in mask `second` get b, the others a */
static inline void lanes2(float *o, float a, float b, __mmask16 second) {
    _mm512_storeu_ps(o, _mm512_mask_mov_ps(_mm512_set1_ps(a), second, _mm512_set1_ps(b)));
}

/* q4_k / q5_k: 6-bit scale and min of sub-block j from the 12 packed bytes */
static inline void scale_min_k4(const uint8_t *s, int j, float *sc, float *mn) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *mn = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4));
        *mn = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

/* weight row n -> codes [ns * 64] in step order, dwv [ns * 16] (dw per lane), cw [n16p] (cw per 16 values);
 * s: scales (fp16 [N, K / G] grouped, fp32 [N] int8), z: int4 zero points or NULL. K-quants also give their
 * integer sub-block scales per int16 lane of a vpmaddubsw product, sc16 [ns * 32], and d per super-block,
 * dsb [K / 256] (see a8k_block) */
static void a8_unpack(int fmt, const uint8_t *w, const void *s, const uint8_t *z, int64_t K, int64_t G, int64_t n,
                      uint8_t *codes, float *dwv, int64_t ns, float *cw, int64_t n16p, int16_t *sc16, float *dsb) {
    memset(cw, 0, sizeof(float) * (size_t)n16p);
    const int64_t nb = (K + 31) / 32;
    if (fmt == A8_INT4 || fmt == A8_NESTED || fmt == A8_INT8 || fmt == A8_Q8_0) {
        float db[2 * ns], cb[2 * ns]; /* dw and cw of each block of 32 */
        memset(db, 0, sizeof(db));
        memset(cb, 0, sizeof(cb));
        if (fmt == A8_INT8) {
            for (int64_t j = 0; j < nb; j++) db[j] = ((const float *)s)[n], cb[j] = -128.0f * db[j];
        } else if (fmt == A8_Q8_0) {
            for (int64_t j = 0; j < nb; j++) db[j] = half_at(w + (n * nb + j) * 34), cb[j] = -128.0f * db[j];
        } else {
            int64_t ng = K / G, per = G / 32;
            float sc[ng + 1];
            row_scales((const uint16_t *)s + n * ng, ng, sc);
            for (int64_t g = 0; g < ng; g++) {
                float c = -(fmt == A8_NESTED ? 136.0f : z ? (float)z[n * ng + g] : 8.0f) * sc[g];
                for (int64_t j = g * per; j < (g + 1) * per; j++) db[j] = sc[g], cb[j] = c;
            }
        }
        for (int64_t st = 0; st < ns; st++) lanes2(dwv + st * 16, db[2 * st], db[2 * st + 1], fmt == A8_INT4 ? 0xF0F0 : 0xFF00);
        for (int64_t j = 0; j < nb; j++) cw[2 * j] = cw[2 * j + 1] = cb[j];
        for (int64_t st = 0; st < ns; st++) {
            uint8_t *o = codes + st * 64;
            if (fmt == A8_INT4) {
                int64_t ldw = K / 2, left = ldw - st * 32;
                const uint8_t *p = w + n * ldw + st * 32;
                split_nibbles(left >= 32 ? _mm256_loadu_si256((const __m256i *)p)
                                         : _mm256_maskz_loadu_epi8((__mmask32)((1ull << left) - 1), p), o);
            } else if (fmt == A8_Q8_0) {
                for (int h = 0; h < 2; h++) {
                    int64_t j = 2 * st + h;
                    __m256i q = j < nb ? _mm256_loadu_si256((const __m256i *)(w + (n * nb + j) * 34 + 2))
                                       : _mm256_set1_epi8((char)0x80);
                    _mm256_storeu_si256((__m256i *)(o + 32 * h), _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)));
                }
            } else { /* int8 [N, K] (flip the sign bit) or nested uint8 [N, K]; zero past K */
                int64_t left = K - st * 64;
                __mmask64 mk = left >= 64 ? ~0ull : (1ull << left) - 1;
                __m512i q = _mm512_maskz_loadu_epi8(mk, w + n * K + st * 64);
                if (fmt == A8_INT8) q = _mm512_xor_si512(q, _mm512_set1_epi8((char)0x80));
                _mm512_storeu_si512(o, q);
            }
        }
        return;
    }
    if (fmt == A8_Q4_1) {
        const uint8_t *row = w + n * nb * 20;
        for (int64_t st = 0; st < ns; st++) {
            const uint8_t *b0 = row + 2 * st * 20, *b1 = b0 + 20;
            int has1 = 2 * st + 1 < nb;
            __m128i q0 = _mm_loadu_si128((const __m128i *)(b0 + 4));
            __m128i q1 = has1 ? _mm_loadu_si128((const __m128i *)(b1 + 4)) : _mm_setzero_si128();
            split_nibbles(_mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1), codes + st * 64);
            lanes2(dwv + st * 16, half_at(b0), has1 ? half_at(b1) : 0.0f, 0xF0F0);
            cw[4 * st] = cw[4 * st + 1] = half_at(b0 + 2);
            if (has1) cw[4 * st + 2] = cw[4 * st + 3] = half_at(b1 + 2);
        }
        return;
    }
    const int64_t nsb = K / 256, B = fmt == A8_Q4K ? 144 : fmt == A8_Q5K ? 176 : 210;
    for (int64_t sb = 0; sb < nsb; sb++) {
        const uint8_t *b = w + (n * nsb + sb) * B;
        for (int c = 0; c < 4; c++) {
            uint8_t *o = codes + (sb * 4 + c) * 64;
            float *dv = dwv + (sb * 4 + c) * 16;
            if (fmt == A8_Q6K) {
                int h = c >> 1, t = c & 1, ja = 4 * h + t, jb = ja + 2;
                const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
                __m256i q = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32 * t));
                __m256i hb = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
                __m256i ha = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * t)), m2);
                __m256i hh = _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(2 * t + 4)), m2);
                __m256i lo = _mm256_or_si256(_mm256_and_si256(q, m4), _mm256_slli_epi16(ha, 4));
                __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), _mm256_slli_epi16(hh, 4));
                _mm256_storeu_si256((__m256i *)o, lo);
                _mm256_storeu_si256((__m256i *)(o + 32), hi);
                float d = half_at(b + 208);
                const int8_t *sc = (const int8_t *)(b + 192);
                for (int l = 0; l < 16; l++) { /* lanes 0-3, 4-7: groups 2ja, 2ja + 1; 8-11, 12-15: 2jb, 2jb + 1 */
                    int g = l < 8 ? 2 * ja + l / 4 : 2 * jb + (l - 8) / 4;
                    dv[l] = d * (float)sc[g];
                    sc16[(sb * 4 + c) * 32 + 2 * l] = sc16[(sb * 4 + c) * 32 + 2 * l + 1] = sc[g];
                }
                dsb[sb] = d;
                continue;
            }
            const uint8_t *qs = b + (fmt == A8_Q5K ? 48 : 16) + 32 * c;
            __m256i q = _mm256_loadu_si256((const __m256i *)qs);
            split_nibbles(q, o);
            if (fmt == A8_Q5K) { /* fifth bit of sub-block j: bit j of the byte at the same position */
                __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16)), one = _mm256_set1_epi8(1);
                for (int hh = 0; hh < 2; hh++) {
                    __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c + hh)), one);
                    __m256i cur = _mm256_loadu_si256((const __m256i *)(o + 32 * hh));
                    _mm256_storeu_si256((__m256i *)(o + 32 * hh), _mm256_or_si256(cur, _mm256_slli_epi16(bit, 4)));
                }
            }
            float d = half_at(b), sa, sb2, unused;
            scale_min_k4(b + 4, 2 * c, &sa, &unused);
            scale_min_k4(b + 4, 2 * c + 1, &sb2, &unused);
            lanes2(dv, d * sa, d * sb2, 0xFF00);
            for (int l = 0; l < 32; l++) sc16[(sb * 4 + c) * 32 + l] = (int16_t)(l < 16 ? sa : sb2);
            dsb[sb] = d;
        }
        if (fmt == A8_Q6K) {
            float d = half_at(b + 208);
            for (int g = 0; g < 16; g++) cw[sb * 16 + g] = -32.0f * d * (float)((const int8_t *)(b + 192))[g];
        } else {
            float dmin = half_at(b + 2);
            for (int j = 0; j < 8; j++) {
                float sc, mn;
                scale_min_k4(b + 4, j, &sc, &mn);
                cw[sb * 16 + 2 * j] = cw[sb * 16 + 2 * j + 1] = -dmin * mn;
            }
        }
    }
}

/* The end of a register block, shared by a8_block and a8k_block (a macro: `acc` must stay in registers): add the
 * per-block offset terms cw [A8_R, n16p] . a16 [mb, n16p] to the accumulators, then reduce each to out. */
#define A8_FINISH(acc)                                                                                          \
    do {                                                                                                        \
        for (int64_t g = 0; g < n16p; g += 16) {                                                                \
            __m512 c[A8_R];                                                                                     \
            for (int r = 0; r < A8_R; r++) c[r] = _mm512_loadu_ps(cw + r * n16p + g);                           \
            for (int m = 0; m < mb; m++) {                                                                      \
                __m512 a = _mm512_loadu_ps(a16 + m * n16p + g);                                                 \
                for (int r = 0; r < A8_R; r++) (acc)[r][m] = _mm512_fmadd_ps(c[r], a, (acc)[r][m]);             \
            }                                                                                                   \
        }                                                                                                       \
        for (int r = 0; r < A8_R; r++)                                                                          \
            for (int m = 0; m < mb; m++) out[r][m] = _mm512_reduce_add_ps((acc)[r][m]);                         \
    } while (0)

/* out[r][m] = sum over steps of cvt(dot(codes r, xq m)) * dw_r * dx_m + cw_r . a16_m for A8_R tile rows and mb
 * x rows (the offsets are added to the accumulators before their one horizontal sum) */
static inline __attribute__((always_inline)) void a8_block(int mb, const uint8_t *codes, const float *dwv,
                                                           int64_t ns, const int8_t *xq, int64_t ldx,
                                                           const float *dxv, const float *cw, const float *a16,
                                                           int64_t n16p, float out[A8_R][A8_MX]) {
    __m512 acc[A8_R][A8_MX];
    for (int r = 0; r < A8_R; r++)
        for (int m = 0; m < mb; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t s = 0; s < ns; s++) {
        __m512i wv[A8_R];
        __m512 dw[A8_R];
        for (int r = 0; r < A8_R; r++) {
            wv[r] = _mm512_loadu_si512(codes + r * ns * 64 + s * 64);
            dw[r] = _mm512_loadu_ps(dwv + r * ns * 16 + s * 16);
        }
        for (int m = 0; m < mb; m++) {
            __m512i xv = _mm512_loadu_si512(xq + m * ldx + s * 64);
            __m512 dx = _mm512_loadu_ps(dxv + m * ns * 16 + s * 16);
            for (int r = 0; r < A8_R; r++) {
                __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[r], xv);
                acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw[r], dx), acc[r][m]);
            }
        }
    }
    A8_FINISH(acc);
}

/* K-quants, activations quantized per 256 (one dx per super-block, as llama.cpp's Q8_K): within a super-block
 * every factor is d times a small integer sub-block scale, so the products stay integers: vpmaddubsw gives 32
 * int16 sums of two code products (at most 2 * 63 * 127, no saturation), vpdpwssd multiplies them by the
 * sub-block scales (sc16) and accumulates int32 over the super-block, and one fp32 multiply-add per
 * super-block applies d * dx. Two uops per 64 weights instead of a8_block's five. */
#define A8K_MX 2 /* activation rows per register block (int32 and fp32 accumulators both live) */
static inline __attribute__((always_inline)) void a8k_block(int mb, const uint8_t *codes, const int16_t *sc16,
                                                            const float *dsb, int64_t nsb, const int8_t *xq,
                                                            int64_t ldx, const float *dxv, const float *cw,
                                                            const float *a16, int64_t n16p,
                                                            float out[A8_R][A8_MX]) {
    const int64_t ns = nsb * 4;
    __m512 acc[A8_R][A8K_MX];
    for (int r = 0; r < A8_R; r++)
        for (int m = 0; m < mb; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m512i ai[A8_R][A8K_MX];
        for (int r = 0; r < A8_R; r++)
            for (int m = 0; m < mb; m++) ai[r][m] = _mm512_setzero_si512();
        for (int64_t s = sb * 4; s < sb * 4 + 4; s++) {
            __m512i wv[A8_R], sv[A8_R];
            for (int r = 0; r < A8_R; r++) {
                wv[r] = _mm512_loadu_si512(codes + r * ns * 64 + s * 64);
                sv[r] = _mm512_loadu_si512(sc16 + r * ns * 32 + s * 32);
            }
            for (int m = 0; m < mb; m++) {
                __m512i xv = _mm512_loadu_si512(xq + m * ldx + s * 64);
                for (int r = 0; r < A8_R; r++)
                    ai[r][m] = _mm512_dpwssd_epi32(ai[r][m], _mm512_maddubs_epi16(wv[r], xv), sv[r]);
            }
        }
        for (int m = 0; m < mb; m++) {
            __m512 dx = _mm512_set1_ps(dxv[m * ns * 16 + sb * 64]);
            for (int r = 0; r < A8_R; r++)
                acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[r][m]),
                                            _mm512_mul_ps(dx, _mm512_set1_ps(dsb[r * nsb + sb])), acc[r][m]);
        }
    }
    A8_FINISH(acc);
}

/* y [M, N] = x [M, K] @ W^T (+ bias) with x quantized to int8 per 32 values. fmt: A8_*; w, s, z as the format
 * stores them (K = padded in_features for int4 / nested); x bf16 or fp32 (x_f32), y bf16 or fp32 (y_f32) */
void gemm_a8(int64_t fmt, const void *x, int64_t x_f32, int64_t M, int64_t K, const uint8_t *w, const void *s,
             const uint8_t *z, int64_t N, int64_t G, const float *bias, void *y, int64_t y_f32) {
    const int64_t ns = (K + 63) / 64, ldx = ns * 64 + 64, n16p = (2 * ns * 2 + 15) / 16 * 16;
    const int64_t chunk = M < A8_CHUNK ? M : A8_CHUNK;
    int8_t *xq = aligned_alloc(64, (size_t)(chunk * ldx));
    float *dxv = malloc(sizeof(float) * (size_t)(chunk * (ns * 16 + n16p))), *a16 = dxv + chunk * ns * 16;
    const int64_t ntiles = (N + A8_R - 1) / A8_R;
    const int64_t wbytes = N * K; /* about: decides threading like the other kernels */
    const int kq = fmt == A8_Q4K || fmt == A8_Q5K || fmt == A8_Q6K, mx = kq ? A8K_MX : A8_MX;
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        int64_t mc = M - m0 < chunk ? M - m0 : chunk;
        const size_t xs = x_f32 ? 4 : 2;
        a8_quantize((int)fmt, kq ? 256 : 32, (const char *)x + (size_t)(m0 * K) * xs, (int)x_f32, mc, K, xq, ldx, dxv,
                    ns, a16, n16p);
#pragma omp parallel if (wbytes * mc > PAR_MIN_WORK)
        {
            uint8_t *codes = aligned_alloc(64, (size_t)(A8_R * ns * 64));
            float *dwv = malloc(sizeof(float) * (size_t)(A8_R * (ns * 16 + n16p + ns / 4 + 1)));
            float *cw = dwv + A8_R * ns * 16, *dsb = cw + A8_R * n16p;
            int16_t *sc16 = kq ? aligned_alloc(64, sizeof(int16_t) * (size_t)(A8_R * ns * 32)) : NULL;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < ntiles; t++) {
                int64_t n0 = t * A8_R;
                int rows = N - n0 < A8_R ? (int)(N - n0) : A8_R;
                for (int r = 0; r < A8_R; r++) {
                    if (r < rows) {
                        a8_unpack((int)fmt, w, s, z, K, G, n0 + r, codes + r * ns * 64, dwv + r * ns * 16, ns,
                                  cw + r * n16p, n16p, kq ? sc16 + r * ns * 32 : NULL, dsb + r * (ns / 4));
                    } else { /* a missing row: zero codes and factors */
                        memset(codes + r * ns * 64, 0, (size_t)(ns * 64));
                        memset(dsb + r * (ns / 4), 0, sizeof(float) * (size_t)(ns / 4));
                        memset(dwv + r * ns * 16, 0, sizeof(float) * (size_t)(ns * 16));
                        memset(cw + r * n16p, 0, sizeof(float) * (size_t)n16p);
                    }
                }
                for (int64_t mm = 0; mm < mc; mm += mx) {
                    int mb = mc - mm < mx ? (int)(mc - mm) : mx;
                    float out[A8_R][A8_MX];
                    const int8_t *xm = xq + mm * ldx;
                    const float *dm = dxv + mm * ns * 16;
                    if (kq) {
                        if (mb == 1)
                            a8k_block(1, codes, sc16, dsb, ns / 4, xm, ldx, dm, cw, a16 + mm * n16p, n16p, out);
                        else
                            a8k_block(2, codes, sc16, dsb, ns / 4, xm, ldx, dm, cw, a16 + mm * n16p, n16p, out);
                    } else {
#define BLOCK(MBC) a8_block(MBC, codes, dwv, ns, xm, ldx, dm, cw, a16 + mm * n16p, n16p, out)
                        SWITCH_MB(mb, BLOCK);
#undef BLOCK
                    }
                    for (int r = 0; r < rows; r++)
                        for (int m = 0; m < mb; m++) {
                            int64_t row = m0 + mm + m, col = n0 + r;
                            float v = out[r][m];
                            if (bias) v += bias[col];
                            if (y_f32)
                                ((float *)y)[row * N + col] = v;
                            else
                                ((uint16_t *)y)[row * N + col] = f32_to_bf16(v);
                        }
                }
            }
            free(codes);
            free(dwv);
            free(sc16);
        }
    }
    free(xq);
    free(dxv);
}

#else /* no VNNI at compile time: a8_supported() is 0 and this is never called */

void gemm_a8(int64_t fmt, const void *x, int64_t x_f32, int64_t M, int64_t K, const uint8_t *w, const void *s,
             const uint8_t *z, int64_t N, int64_t G, const float *bias, void *y, int64_t y_f32) {
    (void)fmt, (void)x, (void)x_f32, (void)M, (void)K, (void)w, (void)s, (void)z, (void)N, (void)G, (void)bias;
    (void)y, (void)y_f32;
    abort();
}

#endif
