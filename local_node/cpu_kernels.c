/* Matrix products for generation on CPUs with AVX-512 BF16 (local_node/cpu_kernels.py builds this).

   At batch 1 a frame is a few hundred matrix-vector products whose weights come from memory once
   each, so the pace is how fast the weights stream in. Both kernels read their weights in a
   layout written for them (local_node/cpu_kernels.py) in exactly the order the loop uses them: one
   sequential stream the hardware prefetcher follows, with no per-call set-up.

   bf16_linear  y = bf16(x @ w.T), bfloat16 weights. It reproduces oneDNN's inner product bit for
                bit (what PyTorch runs for bfloat16 nn.Linear on such CPUs, and so what qwen-tts
                computes): each output is a float32 sum of vdpbf16ps steps over k in order, in
                blocks of kblock columns, the blocks' sums added in order. oneDNN's block size
                depends on the shape and on one row or several; cpu_kernels.py finds it per shape
                by comparing with oneDNN, and uses this kernel only where one matches.
   q8_linear    y = bf16(scale * (x @ w.T)), int8 weights (weights: int8). PyTorch's own
                weight-only int8 kernel is compute-bound on such CPUs and reads int8 no faster
                than oneDNN reads bfloat16; here each int8 is widened to bfloat16 once (exact:
                |w| <= 127 fits bfloat16's 8-bit significand) and serves every row of x. */

#include <immintrin.h>
#include <stdint.h>

static inline uint16_t to_bf16(float f) { /* round to nearest even, as PyTorch does */
    union { float f; uint32_t u; } v = { f };
    return (uint16_t)((v.u + 0x7fff + ((v.u >> 16) & 1)) >> 16);
}

/* --- bfloat16 ------------------------------------------------------------------------------

   Layout of w: blocks of 16 g output rows; within a block, for each pair of columns k, k + 1, the
   block's rows' two values, 16 rows at a time: [N / 16g][K / 2][g][16][2]. A vdpbf16ps takes one
   pair of x (broadcast) against 16 rows; g = 4 (2 or 1 where N is not a multiple of 64) keeps
   that many independent sums in flight. */

static inline __attribute__((always_inline)) void bf16_block(const uint32_t *x, const uint16_t *w, uint16_t *y,
                                                             const int g, int K, int kblock) {
    __m512 total[4];
    for (int b = 0; b < g; b++) total[b] = _mm512_setzero_ps();
    for (int k0 = 0; k0 < K / 2; k0 += kblock / 2) {
        int k1 = k0 + kblock / 2 < K / 2 ? k0 + kblock / 2 : K / 2;
        __m512 acc[4];
        for (int b = 0; b < g; b++) acc[b] = _mm512_setzero_ps();
        const uint16_t *wk = w + (long)k0 * 32 * g;
        for (int k = k0; k < k1; k++, wk += 32 * g) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)x[k]);
            for (int b = 0; b < g; b++) acc[b] = _mm512_dpbf16_ps(acc[b], xv, (__m512bh)_mm512_loadu_si512(wk + 32 * b));
        }
        for (int b = 0; b < g; b++) total[b] = _mm512_add_ps(total[b], acc[b]);
    }
    for (int b = 0; b < g; b++) _mm256_storeu_si256((__m256i *)(y + 16 * b), (__m256i)_mm512_cvtneps_pbh(total[b]));
}

/* x [M, K] and y [M, N] bfloat16 (x read as pairs of columns, K even); N a multiple of 16 g. */
void bf16_linear(const uint32_t *x, const uint16_t *w, uint16_t *y, int M, int N, int K, int g, int kblock) {
    for (int n = 0; n < N; n += 16 * g) {
        const uint16_t *wn = w + (long)n * K;
        for (int m = 0; m < M; m++) {
            const uint32_t *xm = x + (long)m * K / 2;
            uint16_t *ym = y + (long)m * N + n;
            if (g == 4) bf16_block(xm, wn, ym, 4, K, kblock);
            else if (g == 2) bf16_block(xm, wn, ym, 2, K, kblock);
            else bf16_block(xm, wn, ym, 1, K, kblock);
        }
    }
}

/* --- int8 -----------------------------------------------------------------------------------

   Layout of w: blocks of ROWS output rows; within a block, for each run of 32 columns, the ROWS
   rows' 32 int8 each, contiguous. N must be a multiple of ROWS and K of 32. The rows of x go
   through in pairs; a pair re-reads its weight block from cache, not memory. */

#define ROWS 8

int q8_rows(void) { return ROWS; }

static inline __m512bh widen(const int8_t *w) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo); /* element i from w[i], 0 <= i < 32 */
}

/* One block of ROWS outputs for PAIR (1 or 2) rows of x. */
static inline __attribute__((always_inline)) void q8_block(const uint16_t *x, const int8_t *w, const float *scale,
                                                        uint16_t *y, const int pair, int N, int K) {
    __m512 acc[2][ROWS];
    for (int m = 0; m < pair; m++)
        for (int r = 0; r < ROWS; r++) acc[m][r] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32, w += 32 * ROWS) {
        __m512bh wv[ROWS];
        for (int r = 0; r < ROWS; r++) wv[r] = widen(w + 32 * r);
        for (int m = 0; m < pair; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (long)m * K + k);
            for (int r = 0; r < ROWS; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
        }
    }
    for (int m = 0; m < pair; m++)
        for (int r = 0; r < ROWS; r++) y[(long)m * N + r] = to_bf16(_mm512_reduce_add_ps(acc[m][r]) * scale[r]);
}

void q8_linear(const uint16_t *x, const int8_t *w, const float *scale, uint16_t *y, int M, int N, int K) {
    for (int n = 0; n < N; n += ROWS) {
        const int8_t *wn = w + (long)n * K;
        int m = 0;
        for (; m + 2 <= M; m += 2) q8_block(x + (long)m * K, wn, scale + n, y + (long)m * N + n, 2, N, K);
        if (m < M) q8_block(x + (long)m * K, wn, scale + n, y + (long)m * N + n, 1, N, K);
    }
}
