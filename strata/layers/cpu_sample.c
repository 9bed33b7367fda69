/* Sampling filters and the draw over rows of fp32 weights, without sorting.
 *
 * torch.sort and torch.topk along the last dimension of several rows run far slower per row than on one row:
 * on one core, sorting 16 rows of a 2k vocabulary took 1.5 ms (one row: 0.02 ms) and 16 rows of a 49k
 * vocabulary 50 ms, more than a forward of a 135M model. Top-k and top-p need no order, only the boundary
 * value, which a radix select finds in two passes over the row: a histogram of the values' top bits, a walk
 * down the histogram to the bucket the boundary falls in, and the same again inside that bucket (11, 11 and 10
 * bits), ending on the boundary's exact value.
 *
 *   top-k (on logits): keep the entries >= the k-th largest value (ties at it all stay, as torch.topk's
 *       k-th value with `x < kth` masked does); the others become `fill`.
 *   top-p (on weights >= 0): keep the largest entries, in descending order, while the weight before each
 *       (its exclusive running sum) is at most top_p, the rule of a sorted cumulative sum; among entries of
 *       equal value at the boundary the lower indices come first. The sums run in double.
 *   draw: the first entry whose running sum (double, in index order) exceeds u x the row's total.
 */
#include "quant_cpu.h"

#define SEL_BUCKETS 2048

#define DRAW_BLOCK 256

/* the sum of p[0..n) (n <= DRAW_BLOCK) in double, 16 lanes at a time; *bad = 1 when an entry is negative or NaN */
static inline double block_sum(const float *p, int64_t n, int *bad) {
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 16) {
        __mmask16 m = tail16(n - k);
        __m512 v = _mm512_maskz_loadu_ps(m, p + k);
        if (_mm512_mask_cmp_ps_mask(m, v, zero, _CMP_NGE_UQ)) *bad = 1; /* v < 0 or NaN */
        a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
        a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
}

/* fp32 bits -> an unsigned key in the same order as the values (negatives reversed below the positives; v + 0
 * turns -0 into +0, which compares equal to it) */
static inline uint32_t order_key(float v) {
    uint32_t b;
    v += 0.0f;
    memcpy(&b, &v, 4);
    return b ^ ((uint32_t)((int32_t)b >> 31) | 0x80000000u);
}

static inline __m512i order_keys16(__m512 v) {
    __m512i b = _mm512_castps_si512(_mm512_add_ps(v, _mm512_setzero_ps()));
    return _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32((int)0x80000000u)));
}

/* Radix select of one row's boundary key. mode 0 (top-k): the key of the k-th largest entry. mode 1 (top-p): the
 * key of the last kept entry, and in *keep_ties how many entries of that key to keep (lowest indices first), in
 * *num_ties how many there are. Returns 0 when every entry is kept. keys/vals: scratch of V entries. */
static int select_boundary(const float *row, int64_t V, int mode, double param, uint32_t *keys, float *vals,
                           uint32_t *boundary, int64_t *keep_ties, int64_t *num_ties) {
    static const int shifts[3] = {21, 10, 0}, widths[3] = {11, 11, 10};
    double mass[SEL_BUCKETS];
    int32_t cnt[SEL_BUCKETS];
    int64_t n = V, above = 0; /* candidates left; entries known to lie above them */
    double sum_above = 0.0;
    uint32_t prefix = 0;
    int lv = 0;
    if (mode) { /* top-p: entries below (total - top_p) / V can never be kept (they and every smaller entry
                 * sum to less than total - top_p), so the select starts from the rest (half that bound, against
                 * rounding); on SmolLM2's 49k vocabulary at temperature 0.8 that left 572-10,829 (median 2,981)
                 * over 26 steps of three chat prompts. */
        double total = 0.0;
        int bad = 0;
        for (int64_t j = 0; j < V; j += DRAW_BLOCK) total += block_sum(row + j, V - j < DRAW_BLOCK ? V - j : DRAW_BLOCK, &bad);
        if (total <= param) return 0;
        const __m512i tk = _mm512_set1_epi32((int)order_key((float)(0.5 * (total - param) / (double)V)));
        n = 0;
        for (int64_t j = 0; j < V; j += 16) {
            __mmask16 m = tail16(V - j);
            __m512 v = _mm512_maskz_loadu_ps(m, row + j);
            __m512i k = order_keys16(v);
            __mmask16 keep = _mm512_mask_cmpge_epu32_mask(m, k, tk);
            _mm512_mask_compressstoreu_epi32(keys + n, keep, k);
            _mm512_mask_compressstoreu_ps(vals + n, keep, v);
            n += __builtin_popcount(keep);
        }
        lv = n < V; /* the candidates are gathered: every level reads keys/vals */
    }
    for (int level = 0; level < 3; level++) {
        const int sh = shifts[level];
        const uint32_t mask = (1u << widths[level]) - 1;
        const int nb = (int)mask + 1;
        memset(cnt, 0, sizeof(int32_t) * nb);
        if (mode) memset(mass, 0, sizeof(double) * nb);
        for (int64_t j = 0; j < n; j++) { /* level 0 reads the row itself; later ones the gathered candidates */
            uint32_t d = ((lv ? keys[j] : order_key(row[j])) >> sh) & mask;
            cnt[d]++;
            if (mode) mass[d] += lv ? vals[j] : row[j];
        }
        int d = nb - 1;
        for (; d >= 0; d--) {
            if (!cnt[d]) continue;
            if (mode ? sum_above + mass[d] > param : above + cnt[d] >= (int64_t)param) break;
            above += cnt[d];
            if (mode) sum_above += mass[d];
        }
        if (d < 0 && n == V) return 0; /* top-p: the whole row's weight is within top_p */
        if (d < 0) { /* rounding only: the gathered candidates hold all of top_p's weight; keep them all */
            uint32_t lo = UINT32_MAX;
            for (int64_t j = 0; j < n; j++) lo = keys[j] < lo ? keys[j] : lo;
            *boundary = lo, *keep_ties = *num_ties = V;
            return 1;
        }
        prefix |= (uint32_t)d << sh;
        int64_t m = 0; /* the candidates of bucket d go on to the next level */
        for (int64_t j = 0; j < n; j++) {
            uint32_t k = lv ? keys[j] : order_key(row[j]);
            if (((k >> sh) & mask) == (uint32_t)d) keys[m] = k, vals[m] = lv ? vals[j] : row[j], m++;
        }
        n = m;
        lv = 1;
    }
    *boundary = prefix;
    *num_ties = n;
    if (mode) { /* n entries of one value v: the i-th (from 0) is kept while sum_above + i v <= top_p */
        double v = vals[0], s = sum_above;
        int64_t t = 0;
        while (t < n && s <= param) s += v, t++;
        *keep_ties = t;
    }
    return 1;
}

/* In place on x [R, V] (fp32, contiguous): row r keeps its top-k (mode 0, k = param[r] >= 1) or top-p (mode 1,
 * top_p = param[r]) entries and the rest become `fill`; rows whose param is < 1 or >= V (top-k) or >= 1 (top-p)
 * are left alone. Returns 0, or -1 when scratch memory could not be had. */
int64_t select_rows_f32(float *x, int64_t R, int64_t V, int64_t mode, const double *param, float fill) {
    uint32_t *keys = malloc(sizeof(uint32_t) * V);
    float *vals = malloc(sizeof(float) * V);
    if (!keys || !vals) {
        free(keys), free(vals);
        return -1;
    }
    const __m512 f = _mm512_set1_ps(fill);
    for (int64_t r = 0; r < R; r++) {
        float *row = x + r * V;
        if (mode ? param[r] >= 1.0 : (param[r] < 1.0 || param[r] >= (double)V)) continue;
        uint32_t b;
        int64_t keep = 0, ties = 0;
        if (!select_boundary(row, V, (int)mode, param[r], keys, vals, &b, &keep, &ties)) continue;
        /* below the boundary key -> fill (and, for top-p, the boundary's ties past the first `keep`) */
        const __m512i bk = _mm512_set1_epi32((int)b);
        for (int64_t j = 0; j < V; j += 16) {
            __mmask16 m = tail16(V - j);
            __mmask16 lo = _mm512_mask_cmplt_epu32_mask(m, order_keys16(_mm512_maskz_loadu_ps(m, row + j)), bk);
            _mm512_mask_storeu_ps(row + j, lo, f);
        }
        if (mode && keep < ties)
            for (int64_t j = 0; j < V; j++)
                if (order_key(row[j]) == b && keep-- <= 0) row[j] = fill;
    }
    free(keys), free(vals);
    return 0;
}

/* out[r] = the first j whose running sum of p[r, 0..j] exceeds u[r] x the row's total, for weights p [R, V] >= 0
 * (unnormalized). The sums are double: blocks of DRAW_BLOCK entries summed 16 lanes at a time, then a running
 * sum inside the one block the target falls in. When rounding leaves the target at the total, the last entry of
 * positive weight. Returns -1, or the first row that has a negative or NaN weight or no positive one (nothing is
 * drawn from it), or -2 when scratch memory could not be had. */
int64_t draw_rows_f32(const float *p, int64_t R, int64_t V, const double *u, int64_t *out) {
    int64_t nb = (V + DRAW_BLOCK - 1) / DRAW_BLOCK;
    double *bs = malloc(sizeof(double) * nb);
    if (!bs) return -2;
    int64_t failed = -1;
    for (int64_t r = 0; r < R && failed < 0; r++) {
        const float *row = p + r * V;
        double total = 0.0;
        int bad = 0;
        for (int64_t b = 0; b < nb; b++) {
            int64_t n = b + 1 < nb ? DRAW_BLOCK : V - b * DRAW_BLOCK;
            bs[b] = block_sum(row + b * DRAW_BLOCK, n, &bad);
            total += bs[b];
        }
        if (bad || !(total > 0.0) || isinf(total)) {
            failed = r;
            break;
        }
        double target = u[r] * total, acc = 0.0;
        int64_t b = 0;
        while (b + 1 < nb && acc + bs[b] <= target) acc += bs[b++];
        int64_t tok = -1;
        for (int64_t j = b * DRAW_BLOCK; j < V; j++) { /* past the block only when rounding left the target */
            acc += row[j];
            if (row[j] > 0.0f && acc > target) {
                tok = j;
                break;
            }
        }
        if (tok < 0) /* u x total rounded up to the total: the last entry of positive weight */
            for (tok = V - 1; tok > 0 && !(row[tok] > 0.0f); tok--) {}
        out[r] = tok;
    }
    free(bs);
    return failed;
}

/* out[r] = softmax(x[r] / temps[r]) for fp32 rows x, out [R, V] (contiguous; out may be x), temps NULL for no
 * division: the division, the row's maximum, the exponentials and their fp32 sum, and the scaling by its
 * reciprocal, in three passes over the row where torch's `logits / t` then `softmax` make five and a new tensor.
 * As torch: y = x / t rounded to fp32, e = exp(y - max y), out = e / sum e (up to the last bit of exp and of
 * the sum's order); an entry of -inf (a filter's fill) gets exactly 0, and a row whose maximum is not finite
 * (every entry -inf, or an overflow of x / t) gets NaN everywhere, as torch's softmax gives. */
void softmax_rows_f32(const float *x, int64_t R, int64_t V, const float *temps, float *out) {
    for (int64_t r = 0; r < R; r++) {
        const float *row = x + r * V;
        float *o = out + r * V;
        const __m512 t = _mm512_set1_ps(temps ? temps[r] : 1.0f);
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < V; j += 16) {
            __mmask16 m = tail16(V - j);
            __m512 y = _mm512_maskz_loadu_ps(m, row + j);
            if (temps) y = _mm512_div_ps(y, t);
            _mm512_mask_storeu_ps(o + j, m, y);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, y);
        }
        const float mx = _mm512_reduce_max_ps(vmax);
        if (!isfinite(mx)) {
            for (int64_t j = 0; j < V; j++) o[j] = NAN;
            continue;
        }
        const __m512 vm = _mm512_set1_ps(mx), lo = _mm512_set1_ps(-87.0f); /* exp below -87: under fp32's range */
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < V; j += 16) {
            __mmask16 m = tail16(V - j);
            __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, o + j), vm);
            __m512 e = _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(m, d, lo, _CMP_GE_OQ), exp_ps(d));
            _mm512_mask_storeu_ps(o + j, m, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
        for (int64_t j = 0; j < V; j += 16) {
            __mmask16 m = tail16(V - j);
            _mm512_mask_storeu_ps(o + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, o + j), inv));
        }
    }
}
