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

void slm_f32_linear(const float *x, const float *w, const float *bias, float *y, int64_t m, int64_t n, int64_t k) {
    for (int64_t row = 0; row < n; row++) {
        const float *wr = w + row * k;
        float b = bias ? bias[row] : 0.0f;
        for (int64_t i = 0; i < m; i++) y[i * n + row] = dot_f32(wr, x + i * k, k) + b;
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
