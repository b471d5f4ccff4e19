/* slmkit's native CPU kernels (issue #24): int8- and fp32-weight matrix products for decoding.
 *
 * Built on first use by slmkit/models/native.py with the system C compiler (-O3 -march=native) and loaded with
 * ctypes; everything here is optional (without a compiler the layers use torch's kernels).
 *
 * Weights: int8 codes of an (N, K) matrix with one fp32 scale per output row, laid out in tiles of 4 rows x 32
 * columns, each tile 128 contiguous bytes (row r of the tile at bytes 32r..32r+31), the tiles of a block of 4 rows
 * in column order, the blocks in row order: element (n, k) at (n/4)*4K + (k/32)*128 + (n%4)*32 + k%32. N is padded
 * to a multiple of 4 with zero rows; K is a multiple of 32. One sequential stream per block of rows: this layout
 * streams at the machine's read bandwidth where the (N, K) row-major layout read four rows at a time did not
 * (about 25 vs 10 GB/s on one core of the 2-core AMD EPYC this was written on).
 *
 * Activations: each row of x is quantized to int16 with one scale (max |x| / 32767), a relative error of at most
 * 2^-16 of the row's largest entry (bf16, what torch's int8 kernel rounds activations to, is 2^-9 of each entry);
 * the products are summed exactly in int32 lanes (int16 x int8 pairs, VNNI vpdpwssd where the CPU has it,
 * vpmaddwd otherwise), flushed to fp32 every CHUNK columns so that no int32 sum can overflow.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#if defined(__AVX512VNNI__)
#define SLM_LEVEL 3
#else
#define SLM_LEVEL 2
#endif
#elif defined(__AVX2__)
#include <immintrin.h>
#define SLM_LEVEL 1
#else
#define SLM_LEVEL 0
#endif

#define TILE_ROWS 4
#define TILE_COLS 32
#define TILE_BYTES (TILE_ROWS * TILE_COLS)
/* at most CHUNK / 8 products of |32767 x 128| per int32 lane (the AVX2 path's 8 lanes): 2048 / 8 * 2^22 = 2^30;
 * the lanes are widened to fp32 before they are added up (a whole chunk's sum can pass 2^31) */
#define CHUNK 2048
#define PREFETCH_BYTES 1024

int slm_simd_level(void) { return SLM_LEVEL; }

/* Quantize one row of K floats to int16 (round to nearest); returns the scale, or NAN if the row is not finite. */
static float quantize_row(const float *x, int16_t *q, int64_t k) {
    float amax = 0.0f;
    int finite = 1;
    for (int64_t i = 0; i < k; i++) {
        float a = fabsf(x[i]);
        finite &= a <= 3.4e38f; /* false for inf and nan */
        amax = a > amax ? a : amax;
    }
    if (!finite) return NAN;
    if (amax == 0.0f) {
        memset(q, 0, (size_t)k * sizeof(int16_t));
        return 0.0f;
    }
    float inv = 32767.0f / amax;
    for (int64_t i = 0; i < k; i++) q[i] = (int16_t)lrintf(x[i] * inv);
    return amax / 32767.0f;
}

/* sums[r] = sum over columns [c0, c1) of tile row r times xq, for one block of rows (exact per int32 lane) */
static void block_dot(const int8_t *block, const int16_t *xq, int64_t c0, int64_t c1, float sums[TILE_ROWS]) {
    const int8_t *p = block + (c0 / TILE_COLS) * TILE_BYTES;
#if SLM_LEVEL >= 2
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = c0; i < c1; i += TILE_COLS, p += TILE_BYTES) {
        __m512i xv = _mm512_loadu_si512((const void *)(xq + i));
        _mm_prefetch((const char *)(p + PREFETCH_BYTES), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + PREFETCH_BYTES + 64), _MM_HINT_T0);
        __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)));
        __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + 32)));
        __m512i w2 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + 64)));
        __m512i w3 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + 96)));
#if SLM_LEVEL == 3
        a0 = _mm512_dpwssd_epi32(a0, w0, xv);
        a1 = _mm512_dpwssd_epi32(a1, w1, xv);
        a2 = _mm512_dpwssd_epi32(a2, w2, xv);
        a3 = _mm512_dpwssd_epi32(a3, w3, xv);
#else
        a0 = _mm512_add_epi32(a0, _mm512_madd_epi16(w0, xv));
        a1 = _mm512_add_epi32(a1, _mm512_madd_epi16(w1, xv));
        a2 = _mm512_add_epi32(a2, _mm512_madd_epi16(w2, xv));
        a3 = _mm512_add_epi32(a3, _mm512_madd_epi16(w3, xv));
#endif
    }
    sums[0] = _mm512_reduce_add_ps(_mm512_cvtepi32_ps(a0));
    sums[1] = _mm512_reduce_add_ps(_mm512_cvtepi32_ps(a1));
    sums[2] = _mm512_reduce_add_ps(_mm512_cvtepi32_ps(a2));
    sums[3] = _mm512_reduce_add_ps(_mm512_cvtepi32_ps(a3));
#elif SLM_LEVEL == 1
    __m256i acc[TILE_ROWS];
    for (int r = 0; r < TILE_ROWS; r++) acc[r] = _mm256_setzero_si256();
    for (int64_t i = c0; i < c1; i += TILE_COLS, p += TILE_BYTES) {
        __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + i));
        __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + i + 16));
        _mm_prefetch((const char *)(p + PREFETCH_BYTES), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + PREFETCH_BYTES + 64), _MM_HINT_T0);
        for (int r = 0; r < TILE_ROWS; r++) {
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 32 * r)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 32 * r + 16)));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(w0, x0));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(w1, x1));
        }
    }
    for (int r = 0; r < TILE_ROWS; r++) {
        int32_t lanes[8];
        _mm256_storeu_si256((__m256i *)lanes, acc[r]);
        float s = 0.0f;
        for (int j = 0; j < 8; j++) s += (float)lanes[j];
        sums[r] = s;
    }
#else
    for (int r = 0; r < TILE_ROWS; r++) sums[r] = 0.0f;
    for (int64_t i = c0; i < c1; i += TILE_COLS, p += TILE_BYTES)
        for (int r = 0; r < TILE_ROWS; r++) {
            int32_t s = 0;
            for (int j = 0; j < TILE_COLS; j++) s += (int32_t)p[TILE_COLS * r + j] * (int32_t)xq[i + j];
            sums[r] += (float)s;
        }
#endif
}

/* y (M, N) = (x (M, K) @ W^T) * scale[n] (+ bias[n]); W in the tiled layout above (N padded to a multiple of 4
 * rows, K a multiple of 32). bias may be NULL. Returns 0, or -1 if the scratch allocation failed. */
int slm_q8_linear(const float *x, const int8_t *tiles, const float *scale, const float *bias, float *y, int64_t m,
                  int64_t n, int64_t k) {
    int16_t *xq = (int16_t *)aligned_alloc(64, (size_t)(((m * k * 2) + 63) / 64 * 64));
    float *xs = (float *)malloc((size_t)m * sizeof(float));
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
    for (int64_t row = 0; row < m; row++) xs[row] = quantize_row(x + row * k, xq + row * k, k);
    for (int64_t b = 0; b < n; b += TILE_ROWS) {
        const int8_t *block = tiles + b * k;
        int64_t rows = n - b < TILE_ROWS ? n - b : TILE_ROWS;
        for (int64_t row = 0; row < m; row++) {
            float acc[TILE_ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t c0 = 0; c0 < k; c0 += CHUNK) {
                float sums[TILE_ROWS];
                block_dot(block, xq + row * k, c0, c0 + CHUNK < k ? c0 + CHUNK : k, sums);
                for (int r = 0; r < TILE_ROWS; r++) acc[r] += sums[r];
            }
            float *out = y + row * n + b;
            for (int64_t r = 0; r < rows; r++) {
                out[r] = acc[r] * scale[b + r] * xs[row];
                if (bias) out[r] += bias[b + r];
            }
        }
    }
    free(xq);
    free(xs);
    return 0;
}

/* ---- fp32 weights ---------------------------------------------------------------------------------------------
 * y (M, N) = x (M, K) @ W^T (+ bias), W (N, K) row-major as nn.Linear stores it. One weight row at a time: the
 * whole matrix is then read as one sequential stream (about 26 GB/s on one core of the AMD EPYC this was written
 * on, where MKL's matrix-vector product streamed 14 GB/s over this layout and 21 GB/s over the transposed one);
 * for several input rows the weight row is reused from L1. Sums in fp32, in another order than MKL's. */
static float dot_f32(const float *a, const float *b, int64_t k) {
    int64_t i = 0;
    float s = 0.0f;
#if SLM_LEVEL >= 2
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (; i + 64 <= k; i += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
    }
    for (; i + 16 <= k; i += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#elif SLM_LEVEL == 1
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (; i + 32 <= k; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (int j = 0; j < 8; j++) s += lanes[j];
#endif
    for (; i < k; i++) s += a[i] * b[i];
    return s;
}

#if SLM_LEVEL >= 2
/* One weight row against 4 input rows: the row is loaded once for the four (5 loads per 4 FMAs where a dot product
 * at a time needs 2 per FMA) and still read as one sequential stream (4 rows at a time streamed slower: 16.9 vs
 * 25.7 GB/s). With several input rows (a batch, a speculative verification) the products are bound by loads and
 * FMA latency, not memory. k a multiple of 32. */
static void f32_row_x4(const float *w, const float *x, int64_t k, float out[4]) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const float *x1 = x + k, *x2 = x + 2 * k, *x3 = x + 3 * k;
    for (int64_t j = 0; j < k; j += 32) {
        const __m512 w0 = _mm512_loadu_ps(w + j), w1 = _mm512_loadu_ps(w + j + 16);
        a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x1 + j), a1);
        a2 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x2 + j), a2);
        a3 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x3 + j), a3);
        b0 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + j + 16), b0);
        b1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x1 + j + 16), b1);
        b2 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x2 + j + 16), b2);
        b3 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x3 + j + 16), b3);
    }
    out[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0));
    out[1] = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
    out[2] = _mm512_reduce_add_ps(_mm512_add_ps(a2, b2));
    out[3] = _mm512_reduce_add_ps(_mm512_add_ps(a3, b3));
}
#endif

void slm_f32_linear(const float *x, const float *w, const float *bias, float *y, int64_t m, int64_t n, int64_t k) {
    const int64_t m4 = SLM_LEVEL >= 2 && k % 32 == 0 ? m - m % 4 : 0; /* inputs taken four at a time */
    for (int64_t row = 0; row < n; row++) {
        const float *wr = w + row * k;
        float b = bias ? bias[row] : 0.0f;
#if SLM_LEVEL >= 2
        for (int64_t i = 0; i < m4; i += 4) {
            float out[4];
            f32_row_x4(wr, x + i * k, k, out);
            for (int c = 0; c < 4; c++) y[(i + c) * n + row] = out[c] + b;
        }
#endif
        for (int64_t i = m4; i < m; i++) y[i * n + row] = dot_f32(wr, x + i * k, k) + b;
    }
}

/* ---- int4 weights ---------------------------------------------------------------------------------------------
 * Group-wise asymmetric int4 (w = (q - 8) * scale + zero per group of G columns, G a multiple of 32), in tiles of
 * 4 rows x 32 columns of 64 bytes: row r of a tile at bytes 16r..16r+15, byte j holding column j in its low
 * nibble and column j + 16 in its high nibble; tiles of a block of 4 rows in column order, blocks in row order
 * (N padded to a multiple of 4 with zero rows). Scales and zeros as fp32 (ceil(N/4), K/G, 2, 4): for each block
 * and group, the 4 rows' scales then their zeros.
 * Per input row (quantized to int16 as above, scale s): y[n] = s * sum_g (scale[n,g] * sum_{k in g} (q - 8) xq_k
 * + zero[n,g] * sum_{k in g} xq_k); the inner sums are exact in int32 (G * 8 * 32767 < 2^31 for G <= 4096). */
static void q4_block(const uint8_t *block, const float *sz, const int16_t *xq, const float *xsum, int64_t k,
                     int64_t group, float out[TILE_ROWS]) {
    const int64_t groups = k / group;
    const uint8_t *p = block;
#if SLM_LEVEL >= 2
    const __m512i eight = _mm512_set1_epi16(8);
    const __m128i low = _mm_set1_epi8(0x0F);
    __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    float zsum[TILE_ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t g = 0; g < groups; g++, sz += 2 * TILE_ROWS) {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = g * group; i < (g + 1) * group; i += TILE_COLS, p += 64) {
            __m512i xv = _mm512_loadu_si512((const void *)(xq + i));
            _mm_prefetch((const char *)(p + PREFETCH_BYTES), _MM_HINT_T0);
#define SLM_Q4_ROW(acc, r)                                                                                       \
    {                                                                                                             \
        __m128i b = _mm_loadu_si128((const __m128i *)(p + 16 * (r)));                                             \
        __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), low), _mm_and_si128(b, low));       \
        __m512i w = _mm512_sub_epi16(_mm512_cvtepu8_epi16(codes), eight);                                        \
        acc = SLM_DOT(acc, w, xv);                                                                                \
    }
#if SLM_LEVEL == 3
#define SLM_DOT(acc, w, x) _mm512_dpwssd_epi32(acc, w, x)
#else
#define SLM_DOT(acc, w, x) _mm512_add_epi32(acc, _mm512_madd_epi16(w, x))
#endif
            SLM_Q4_ROW(a0, 0)
            SLM_Q4_ROW(a1, 1)
            SLM_Q4_ROW(a2, 2)
            SLM_Q4_ROW(a3, 3)
#undef SLM_Q4_ROW
#undef SLM_DOT
        }
        f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), _mm512_set1_ps(sz[0]), f0);
        f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), _mm512_set1_ps(sz[1]), f1);
        f2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a2), _mm512_set1_ps(sz[2]), f2);
        f3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a3), _mm512_set1_ps(sz[3]), f3);
        for (int r = 0; r < TILE_ROWS; r++) zsum[r] += sz[TILE_ROWS + r] * xsum[g];
    }
    out[0] = _mm512_reduce_add_ps(f0) + zsum[0];
    out[1] = _mm512_reduce_add_ps(f1) + zsum[1];
    out[2] = _mm512_reduce_add_ps(f2) + zsum[2];
    out[3] = _mm512_reduce_add_ps(f3) + zsum[3];
#else
    for (int r = 0; r < TILE_ROWS; r++) out[r] = 0.0f;
    for (int64_t g = 0; g < groups; g++, sz += 2 * TILE_ROWS) {
        int32_t acc[TILE_ROWS] = {0, 0, 0, 0};
        for (int64_t i = g * group; i < (g + 1) * group; i += TILE_COLS, p += 64)
            for (int r = 0; r < TILE_ROWS; r++)
                for (int j = 0; j < 16; j++) {
                    uint8_t b = p[16 * r + j];
                    acc[r] += ((int32_t)(b & 0x0F) - 8) * (int32_t)xq[i + j];
                    acc[r] += ((int32_t)(b >> 4) - 8) * (int32_t)xq[i + j + 16];
                }
        for (int r = 0; r < TILE_ROWS; r++) out[r] += sz[r] * (float)acc[r] + sz[TILE_ROWS + r] * xsum[g];
    }
#endif
}

/* y (M, N) = x (M, K) @ W^T for the int4 tiles above; returns 0, or -1 if the scratch allocation failed. */
int slm_q4_linear(const float *x, const uint8_t *tiles, const float *sz, float *y, int64_t m, int64_t n, int64_t k,
                  int64_t group) {
    int64_t groups = k / group;
    int16_t *xq = (int16_t *)malloc((size_t)(m * k) * sizeof(int16_t));
    float *xs = (float *)malloc((size_t)m * sizeof(float));
    float *xsum = (float *)malloc((size_t)(m * groups) * sizeof(float));
    if (!xq || !xs || !xsum) {
        free(xq);
        free(xs);
        free(xsum);
        return -1;
    }
    for (int64_t row = 0; row < m; row++) {
        xs[row] = quantize_row(x + row * k, xq + row * k, k);
        for (int64_t g = 0; g < groups; g++) {
            int64_t s = 0;
            for (int64_t i = g * group; i < (g + 1) * group; i++) s += xq[row * k + i];
            xsum[row * groups + g] = (float)s;
        }
    }
    for (int64_t b = 0; b < n; b += TILE_ROWS) {
        const uint8_t *block = tiles + (b / TILE_ROWS) * (TILE_ROWS * k / 2);
        const float *bsz = sz + (b / TILE_ROWS) * groups * 2 * TILE_ROWS;
        int64_t rows = n - b < TILE_ROWS ? n - b : TILE_ROWS;
        for (int64_t row = 0; row < m; row++) {
            float acc[TILE_ROWS];
            q4_block(block, bsz, xq + row * k, xsum + row * groups, k, group, acc);
            float *out = y + row * n + b;
            for (int64_t r = 0; r < rows; r++) out[r] = acc[r] * xs[row];
        }
    }
    free(xq);
    free(xs);
    free(xsum);
    return 0;
}

/* ---- a whole decode step through Llama-style blocks ----------------------------------------------------------
 * One call runs every layer of a batch-1, one-token decode step: pre-norm RMSNorm, the q/k/v products, rotary
 * positions on q and k, the new key and value written into an fp32 cache (slot = position), grouped-query
 * attention over the cache's slots, the output product and residual, the post-attention RMSNorm, the (gated) MLP
 * and its residual; then the final RMSNorm. What torch spends per layer on ~40 small ops and Python calls (about
 * 0.3 ms of a 12-layer step on one core) is gone; the products are the same kernels as above.
 *
 * Each layer is described by int64 fields (slmkit/models/native_decode.py builds them): SLM_LINS linears of
 * SLM_LIN_FIELDS each (kind, weight, scales / scales-and-zeros, bias, n, k, int4 group), then the two norm weights,
 * the layer's key and value caches ((rows, KV, S, D) fp32), the q and k norm weights with their kind (SLM_QK_*: none,
 * per head (Qwen3), over all heads' projection (OLMoE); applied before rotary) and the sliding window (0: none; a
 * query at p sees slots p - window + 1 .. p), then a mixture of experts' fields: its description (0: a dense MLP;
 * else SLM_LIN_FIELDS for the router and 3 x SLM_LIN_FIELDS per expert, gate, up (absent: gate's product covers it)
 * and down; the layer's own gate, up and down absent), the number of experts, k, and flags (SLM_MOE_*). A linear of kind SLM_LIN_NONE is absent:
 * q's product then covers k and v too (the decode layout's fused q/k/v), gate's covers up (fused gate/up), and
 * without a gate the MLP is ungated (down(act(up(x)))). */
enum { SLM_LIN_NONE = -1, SLM_LIN_F32 = 0, SLM_LIN_Q8 = 1, SLM_LIN_Q4 = 2 };
enum { SLM_ACT_SILU = 0, SLM_ACT_GELU = 1, SLM_ACT_GELU_TANH = 2, SLM_ACT_RELU = 3, SLM_ACT_RELU2 = 4 };
#define SLM_LIN_FIELDS 7
#define SLM_LINS 7 /* q, k, v, o, gate, up, down */
#define SLM_LAYER_FIELDS (SLM_LINS * SLM_LIN_FIELDS + 12)
enum { SLM_QK_NONE = 0, SLM_QK_HEAD = 1, SLM_QK_PROJECTION = 2 };
/* a mixture of experts: the k chosen weights renormalised to sum to 1; every chosen weight exactly 1 */
enum { SLM_MOE_NORMALIZE = 1, SLM_MOE_UNIT = 2 };
/* dims: d_model, heads, kv heads, head dim, d_ff, cache slots, rotary dims, activation, rotary table rows */
#define SLM_DIMS 9

int slm_decode_fields(void) { return SLM_LAYER_FIELDS * 100 + SLM_DIMS; }

static int lin_apply(const int64_t *d, const float *x, float *y, int64_t m) {
    const int64_t n = d[4], k = d[5];
    const float *bias = (const float *)(intptr_t)d[3];
    switch (d[0]) {
    case SLM_LIN_F32:
        slm_f32_linear(x, (const float *)(intptr_t)d[1], bias, y, m, n, k);
        return 0;
    case SLM_LIN_Q8:
        return slm_q8_linear(x, (const int8_t *)(intptr_t)d[1], (const float *)(intptr_t)d[2], bias, y, m, n, k);
    case SLM_LIN_Q4: {
        int rc = slm_q4_linear(x, (const uint8_t *)(intptr_t)d[1], (const float *)(intptr_t)d[2], y, m, n, k, d[6]);
        if (bias)
            for (int64_t r = 0; r < m; r++)
                for (int64_t i = 0; i < n; i++) y[r * n + i] += bias[i];
        return rc;
    }
    default:
        return -3;
    }
}

static void rms_norm(const float *x, const float *w, float eps, float *y, int64_t n) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

static float activate(float v, int64_t act) {
    switch (act) {
    case SLM_ACT_SILU:
        return v / (1.0f + expf(-v));
    case SLM_ACT_GELU:
        return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case SLM_ACT_GELU_TANH:
        return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case SLM_ACT_RELU:
        return v > 0.0f ? v : 0.0f;
    default: /* SLM_ACT_RELU2 */
        return v > 0.0f ? v * v : 0.0f;
    }
}

/* rotate the first r channels of a head (rotate-half layout) by cos/sin rows of r entries */
static void rotate(float *h, const float *c, const float *s, int64_t r) {
    const int64_t half = r / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = h[i], b = h[i + half];
        h[i] = a * c[i] - b * s[i];
        h[i + half] = b * c[i + half] + a * s[i + half];
    }
}

/* A mixture of experts' MLP for `rows` rows of normed input, added into x: the router's logits, a softmax over the
 * experts, the k largest probabilities (ties to the lower index, as torch.topk), renormalised or set to 1 as the
 * flags say, and each chosen expert's gated MLP (one row at a time: each row has its own experts) weighted by its
 * probability. router: (rows, experts) scratch; hidden (2 ff), staged (ff) and tmp (c): one row's scratch. */
static int moe_apply(const int64_t *moe, int64_t n_experts, int64_t top_k, int64_t flags, const float *normed,
                     float *x, float *router, float *hidden, float *staged, float *tmp, int64_t rows, int64_t c,
                     int64_t ff, int64_t act) {
    int rc;
    if (n_experts < 1 || top_k < 1 || top_k > n_experts || top_k > 64) return -3;
    if ((rc = lin_apply(moe, normed, router, rows))) return rc;
    for (int64_t r = 0; r < rows; r++) {
        float *logits = router + r * n_experts, top = -INFINITY, total = 0.0f;
        for (int64_t e = 0; e < n_experts; e++) top = logits[e] > top ? logits[e] : top;
        for (int64_t e = 0; e < n_experts; e++) {
            logits[e] = expf(logits[e] - top);
            total += logits[e];
        }
        for (int64_t e = 0; e < n_experts; e++) logits[e] /= total;
        int64_t chosen[64];
        float weight[64], sum = 0.0f;
        for (int64_t j = 0; j < top_k; j++) {
            int64_t best = -1;
            for (int64_t e = 0; e < n_experts; e++) {
                int taken = 0;
                for (int64_t i = 0; i < j; i++) taken |= chosen[i] == e;
                if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
            }
            chosen[j] = best;
            weight[j] = logits[best];
            sum += weight[j];
        }
        for (int64_t j = 0; j < top_k; j++) {
            const float w = (flags & SLM_MOE_UNIT) ? 1.0f : (flags & SLM_MOE_NORMALIZE) ? weight[j] / sum : weight[j];
            const int64_t *expert = moe + SLM_LIN_FIELDS * (1 + 3 * chosen[j]);
            const float *in = normed + r * c;
            if ((rc = lin_apply(expert, in, hidden, 1))) return rc; /* gate (with up when fused: 2 ff outputs) */
            if (expert[SLM_LIN_FIELDS] != SLM_LIN_NONE && (rc = lin_apply(expert + SLM_LIN_FIELDS, in, hidden + ff, 1)))
                return rc;
            for (int64_t i = 0; i < ff; i++) staged[i] = activate(hidden[i], act) * hidden[ff + i];
            if ((rc = lin_apply(expert + 2 * SLM_LIN_FIELDS, staged, tmp, 1))) return rc;
            for (int64_t i = 0; i < c; i++) x[r * c + i] += w * tmp[i];
        }
    }
    return 0;
}

/* Returns 0, -1 (a kernel could not allocate), -2 (a position outside the cache or the rotary table: nothing was
 * written) or -3 (a bad description). x (rows, d_model) is updated in place; out gets its final norm. Row r sits at
 * position pos[r * pos_stride] (pos_stride 0: one position for every row) and writes and reads batch row
 * r * cache_stride of each cache ((rows or 1, KV, S, D)): cache_stride 0 makes the rows consecutive tokens of one
 * sequence (a speculative verification, a short prefill), each written before the next attends. A row attends to
 * slots [0, upto) with one shared position and upto >= 0 (as the layers do without a mask), else to slots [0, its
 * position] (within the window, if any). */
int slm_decode_layers(float *x, const int64_t *layers, int64_t n_layers, const int64_t *dims, float eps,
                      const float *cos_table, const float *sin_table, const int64_t *pos, int64_t pos_stride,
                      int64_t rows, int64_t cache_stride, int64_t upto, const float *final_norm, float *out,
                      float *scratch) {
    const int64_t c = dims[0], nh = dims[1], nkv = dims[2], hd = dims[3], ff = dims[4], slots = dims[5];
    const int64_t rot = dims[6], act = dims[7], table_rows = dims[8];
    if (nkv <= 0 || nh % nkv || rot > hd || rot % 2 || rows < 1) return -3;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t p = pos[r * pos_stride], keys = (pos_stride == 0 && upto >= 0) ? upto : p + 1;
        if (p < 0 || p >= slots || p >= table_rows || keys <= p || keys > slots) return -2;
    }
    const int64_t group = nh / nkv, qn = nh * hd, kn = nkv * hd, qkv_n = qn + 2 * kn;
    float *normed = scratch, *qkv = normed + rows * c, *att = qkv + rows * qkv_n, *tmp = att + rows * qn;
    float *hidden = tmp + rows * c, *staged = hidden + rows * 2 * ff, *scores = staged + rows * ff;
    float *router = scores + slots; /* (rows, experts) router logits: the scratch holds them after the scores */
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t cache_row = nkv * slots * hd;
    int rc;
    for (int64_t l = 0; l < n_layers; l++) {
        const int64_t *d = layers + l * SLM_LAYER_FIELDS;
        const int64_t *lq = d, *lk = d + SLM_LIN_FIELDS, *lv = d + 2 * SLM_LIN_FIELDS, *lo = d + 3 * SLM_LIN_FIELDS;
        const int64_t *lg = d + 4 * SLM_LIN_FIELDS, *lu = d + 5 * SLM_LIN_FIELDS, *ld = d + 6 * SLM_LIN_FIELDS;
        const float *ln1 = (const float *)(intptr_t)d[SLM_LINS * SLM_LIN_FIELDS];
        const float *ln2 = (const float *)(intptr_t)d[SLM_LINS * SLM_LIN_FIELDS + 1];
        float *kcache = (float *)(intptr_t)d[SLM_LINS * SLM_LIN_FIELDS + 2];
        float *vcache = (float *)(intptr_t)d[SLM_LINS * SLM_LIN_FIELDS + 3];
        const float *qnorm = (const float *)(intptr_t)d[SLM_LINS * SLM_LIN_FIELDS + 4];
        const float *knorm = (const float *)(intptr_t)d[SLM_LINS * SLM_LIN_FIELDS + 5];
        const int64_t qk = d[SLM_LINS * SLM_LIN_FIELDS + 6], window = d[SLM_LINS * SLM_LIN_FIELDS + 7];
        const int64_t *moe = (const int64_t *)(intptr_t)d[SLM_LINS * SLM_LIN_FIELDS + 8];
        const int64_t n_experts = d[SLM_LINS * SLM_LIN_FIELDS + 9], top_k = d[SLM_LINS * SLM_LIN_FIELDS + 10];
        const int64_t moe_flags = d[SLM_LINS * SLM_LIN_FIELDS + 11];
        /* attention: q, k, v of row r at q + r * qs, k + r * ks, v + r * ks (one fused (rows, qkv_n) output, or
         * three outputs of their own widths) */
        for (int64_t r = 0; r < rows; r++) rms_norm(x + r * c, ln1, eps, normed + r * c, c);
        float *q = qkv, *k, *v;
        int64_t qs, ks;
        if ((rc = lin_apply(lq, normed, qkv, rows))) return rc;
        if (lk[0] == SLM_LIN_NONE) {
            k = q + qn, v = k + kn, qs = ks = qkv_n;
        } else {
            k = q + rows * qn, v = k + rows * kn, qs = qn, ks = kn;
            if ((rc = lin_apply(lk, normed, k, rows)) || (rc = lin_apply(lv, normed, v, rows))) return rc;
        }
        for (int64_t r = 0; r < rows; r++) {
            const int64_t p = pos[r * pos_stride];
            /* without a window and with one shared position: [0, upto) as the layers (no mask); else masked */
            const int64_t keys = (pos_stride == 0 && upto >= 0 && window <= 0) ? upto : p + 1;
            const int64_t first = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
            const float *cos_row = cos_table + p * rot, *sin_row = sin_table + p * rot;
            float *qr = q + r * qs, *kr = k + r * ks, *vr = v + r * ks;
            float *kc = kcache + r * cache_stride * cache_row, *vc = vcache + r * cache_stride * cache_row;
            if (qk == SLM_QK_PROJECTION) {
                rms_norm(qr, qnorm, eps, qr, qn);
                rms_norm(kr, knorm, eps, kr, kn);
            } else if (qk == SLM_QK_HEAD) {
                for (int64_t h = 0; h < nh; h++) rms_norm(qr + h * hd, qnorm, eps, qr + h * hd, hd);
                for (int64_t h = 0; h < nkv; h++) rms_norm(kr + h * hd, knorm, eps, kr + h * hd, hd);
            }
            for (int64_t h = 0; h < nh; h++) rotate(qr + h * hd, cos_row, sin_row, rot);
            for (int64_t h = 0; h < nkv; h++) {
                rotate(kr + h * hd, cos_row, sin_row, rot);
                memcpy(kc + (h * slots + p) * hd, kr + h * hd, (size_t)hd * sizeof(float));
                memcpy(vc + (h * slots + p) * hd, vr + h * hd, (size_t)hd * sizeof(float));
            }
            for (int64_t h = 0; h < nh; h++) {
                const float *qh = qr + h * hd, *kh = kc + (h / group) * slots * hd, *vh = vc + (h / group) * slots * hd;
                float top = -INFINITY;
                for (int64_t j = first; j < keys; j++) {
                    scores[j] = dot_f32(qh, kh + j * hd, hd) * scale;
                    top = scores[j] > top ? scores[j] : top;
                }
                float total = 0.0f, *o = att + r * qn + h * hd;
                for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
                for (int64_t j = first; j < keys; j++) {
                    const float w = expf(scores[j] - top);
                    const float *vj = vh + j * hd;
                    total += w;
                    for (int64_t i = 0; i < hd; i++) o[i] += w * vj[i];
                }
                const float inv = 1.0f / total;
                for (int64_t i = 0; i < hd; i++) o[i] *= inv;
            }
        }
        if ((rc = lin_apply(lo, att, tmp, rows))) return rc;
        for (int64_t i = 0; i < rows * c; i++) x[i] += tmp[i];
        /* MLP: gate and up of row r at hidden + r * gs and + r * gs + us (fused: one (rows, 2 ff) output) */
        for (int64_t r = 0; r < rows; r++) rms_norm(x + r * c, ln2, eps, normed + r * c, c);
        if (moe) {
            if ((rc = moe_apply(moe, n_experts, top_k, moe_flags, normed, x, router, hidden, staged, tmp, rows, c, ff, act)))
                return rc;
            continue;
        }
        float *act_out = hidden; /* (rows, ff) */
        if (lg[0] == SLM_LIN_NONE) { /* ungated: down(act(up(x))) */
            if ((rc = lin_apply(lu, normed, hidden, rows))) return rc;
            for (int64_t i = 0; i < rows * ff; i++) hidden[i] = activate(hidden[i], act);
        } else {
            int64_t gs, us;
            if ((rc = lin_apply(lg, normed, hidden, rows))) return rc;
            if (lu[0] == SLM_LIN_NONE) {
                gs = 2 * ff, us = ff;
            } else {
                gs = ff, us = rows * ff;
                if ((rc = lin_apply(lu, normed, hidden + rows * ff, rows))) return rc;
            }
            for (int64_t r = 0; r < rows; r++) {
                const float *g = hidden + r * gs, *u = g + us;
                float *a = staged + r * ff; /* apart: row r's output would overwrite row r + 1's fused input */
                for (int64_t i = 0; i < ff; i++) a[i] = activate(g[i], act) * u[i];
            }
            act_out = staged;
        }
        if ((rc = lin_apply(ld, act_out, tmp, rows))) return rc;
        for (int64_t i = 0; i < rows * c; i++) x[i] += tmp[i];
    }
    if (final_norm)
        for (int64_t r = 0; r < rows; r++) rms_norm(x + r * c, final_norm, eps, out + r * c, c);
    return 0;
}
