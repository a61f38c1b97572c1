/* The int8 weight-only product of local_node/int8.py, for CPUs with AVX-512 BF16.

   y[m, n] = bf16(scale[n] * sum_k x[m, k] * w[n, k])     x, y bfloat16; w int8; scale float32

   At batch 1 a frame is a few hundred matrix-vector products whose weights come from memory once
   each, so the pace is how fast the weights stream in. PyTorch's own weight-only int8 kernel
   (_weight_int8pack_mm) is compute-bound on such a CPU and reads int8 no faster than oneDNN reads
   bfloat16; this one reads at close to the memory's speed because:

   - the weights are laid out in the order the loop reads them (one sequential stream, see
     ROWS below), which the hardware prefetcher follows;
   - each int8 is widened to bfloat16 once (exact: |w| <= 127 fits bfloat16's 8-bit significand)
     and serves every row of x through vdpbf16ps, which multiplies exactly and adds in float32.

   Layout of w, written by int8.py: blocks of ROWS output rows; within a block, for each run of
   32 columns, the ROWS rows' 32 int8 each, contiguous. N must be a multiple of ROWS and K of 32.
   The rows of x go through in pairs; a pair re-reads its weight block from cache, not memory. */

#include <immintrin.h>
#include <stdint.h>

#define ROWS 8

int q8_rows(void) { return ROWS; }

static inline __m512bh widen(const int8_t *w) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo); /* element i from w[i], 0 <= i < 32 */
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as PyTorch does */
    union { float f; uint32_t u; } v = { f };
    return (uint16_t)((v.u + 0x7fff + ((v.u >> 16) & 1)) >> 16);
}

/* One block of ROWS outputs for PAIR (1 or 2) rows of x. */
static inline __attribute__((always_inline)) void block(const uint16_t *x, const int8_t *w, const float *scale,
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
        for (; m + 2 <= M; m += 2) block(x + (long)m * K, wn, scale + n, y + (long)m * N + n, 2, N, K);
        if (m < M) block(x + (long)m * K, wn, scale + n, y + (long)m * N + n, 1, N, K);
    }
}
