/* Matrix products for generation on CPUs with AVX-512 BF16 (local_node/cpu_kernels.py builds this).

   At batch 1 a frame is a few hundred matrix-vector products whose weights come from memory once
   each, so the pace is how fast the weights stream in. Both products read their weights in a
   layout written for them (cpu_kernels.py), in exactly the order the loop uses them: one
   sequential stream the hardware prefetcher follows, no per-call set-up.

   Layout: blocks of 16 g output rows; within a block, for each pair of columns k, k + 1, the
   block's rows' two values, 16 rows at a time: [N / 16g][K / 2][g][16][2]. One vdpbf16ps takes a
   pair of x (broadcast) against 16 rows, each lane summing its own output in float32; g = 4 (2 or
   1 where N is not a multiple of 64) keeps that many sums in flight. Up to 4 rows of x share each
   weight read (batches, prefills).

   bf16_linear  y = bf16(x @ w.T), bfloat16 weights. It reproduces oneDNN's inner product bit for
                bit (what PyTorch runs for a bfloat16 nn.Linear on such CPUs, and so what qwen-tts
                computes): each output a float32 sum of vdpbf16ps steps over k in order, in blocks
                of kblock columns, the blocks' sums added in order. oneDNN picks the block size by
                shape and row count; cpu_kernels.py finds it per shape by comparing with oneDNN
                and uses this kernel only where one matches.
   q8_linear    y = bf16(scale * (x @ w.T)), int8 weights (weights: int8), the same loop with each
                int8 widened to bfloat16 as it is read (exact: |w| <= 127 fits bfloat16's 8-bit
                significand), by table lookup (AVX-512 VBMI). PyTorch's own weight-only int8
                kernel is compute-bound on such CPUs and reads int8 no faster than oneDNN reads
                bfloat16. */

#include <immintrin.h>
#include <stdint.h>

#define TILE 4 /* rows of x per pass over the weights */

/* 32 weights (16 rows x a pair of columns) as bfloat16. */
static inline __m512bh load_bf16(const uint16_t *w) { return (__m512bh)_mm512_loadu_si512(w); }

/* The bytes of bfloat16(m) for m = 0..127, low and high: m = 1.f * 2^e with e = 0..6. */
#define EXP(m) ((m) >= 64 ? 6 : (m) >= 32 ? 5 : (m) >= 16 ? 4 : (m) >= 8 ? 3 : (m) >= 4 ? 2 : (m) >= 2 ? 1 : 0)
#define BF16(m) ((m) ? ((127 + EXP(m)) << 7) | (((m) << (7 - EXP(m))) & 0x7f) : 0)
#define LO(m) (BF16(m) & 0xff)
#define HI(m) (BF16(m) >> 8)
#define X8(F, m) F(m), F(m + 1), F(m + 2), F(m + 3), F(m + 4), F(m + 5), F(m + 6), F(m + 7)
#define X32(F, m) X8(F, m), X8(F, m + 8), X8(F, m + 16), X8(F, m + 24)
#define X128(F) X32(F, 0), X32(F, 32), X32(F, 64), X32(F, 96)
static const uint8_t BF16_LO[128] __attribute__((aligned(64))) = {X128(LO)};
static const uint8_t BF16_HI[128] __attribute__((aligned(64))) = {X128(HI)};

/* 64 int8 weights (two blocks of 16 rows x a pair of columns) as two vectors of 32 bfloat16, by
   table lookup: 7 instructions where converting through int32 and float32 takes about 16, which
   made the loop compute-bound. Each byte is sign | magnitude (|w| <= 127); the tables give the
   low and high byte of bfloat16(magnitude), the sign goes into the high byte, and interleaving
   the bytes makes 16-bit words. The interleave works within 128-bit lanes, so the layout stores
   each lane as the first block's 8 weights then the second's (cpu_kernels.py). */
static inline void load_int8(const int8_t *w, __m512bh *first, __m512bh *second) {
    const __m512i src = _mm512_loadu_si512(w);
    const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(BF16_LO), src, _mm512_load_si512(BF16_LO + 64));
    __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(BF16_HI), src, _mm512_load_si512(BF16_HI + 64));
    hi = _mm512_ternarylogic_epi32(hi, src, _mm512_set1_epi8((char)0x80), 0xF8); /* hi | (src & 0x80) */
    *first = (__m512bh)_mm512_unpacklo_epi8(lo, hi);
    *second = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
}

/* rows (<= TILE) rows of x [., K] against one block of 16 g outputs, k in blocks of kblock.
   int8 weights when scale is given (their per-row scales), else bfloat16. */
static inline __attribute__((always_inline)) void tile(const uint32_t *x, const void *w, const float *scale,
                                                       uint16_t *y, const int rows, const int g, int N, int K,
                                                       int kblock) {
    __m512 total[TILE][4];
    for (int m = 0; m < rows; m++)
        for (int b = 0; b < g; b++) total[m][b] = _mm512_setzero_ps();
    for (int k0 = 0; k0 < K / 2; k0 += kblock / 2) {
        int k1 = k0 + kblock / 2 < K / 2 ? k0 + kblock / 2 : K / 2;
        __m512 acc[TILE][4];
        for (int m = 0; m < rows; m++)
            for (int b = 0; b < g; b++) acc[m][b] = _mm512_setzero_ps();
        for (int k = k0; k < k1; k++) {
            __m512bh wv[4];
            if (scale)
                for (int b = 0; b < g; b += 2) load_int8((const int8_t *)w + ((long)k * g + b) * 32, &wv[b], &wv[b + 1]);
            else
                for (int b = 0; b < g; b++) wv[b] = load_bf16((const uint16_t *)w + ((long)k * g + b) * 32);
            for (int m = 0; m < rows; m++) {
                __m512bh xv = (__m512bh)_mm512_set1_epi32((int)x[(long)m * K / 2 + k]);
                for (int b = 0; b < g; b++) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], xv, wv[b]);
            }
        }
        for (int m = 0; m < rows; m++)
            for (int b = 0; b < g; b++) total[m][b] = _mm512_add_ps(total[m][b], acc[m][b]);
    }
    for (int m = 0; m < rows; m++)
        for (int b = 0; b < g; b++) {
            __m512 out = scale ? _mm512_mul_ps(total[m][b], _mm512_loadu_ps(scale + 16 * b)) : total[m][b];
            _mm256_storeu_si256((__m256i *)(y + (long)m * N + 16 * b), (__m256i)_mm512_cvtneps_pbh(out));
        }
}

#define TILES(G)                                                                                   \
    for (int n = 0; n < N; n += 16 * G) {                                                          \
        const char *wn = (const char *)w + (long)n * K * width;                                    \
        const float *sn = scale ? scale + n : 0;                                                   \
        int m = 0;                                                                                 \
        for (; m + TILE <= M; m += TILE) tile(x + (long)m * K / 2, wn, sn, y + (long)m * N + n, TILE, G, N, K, kblock); \
        switch (M - m) {                                                                           \
        case 3: tile(x + (long)m * K / 2, wn, sn, y + (long)m * N + n, 3, G, N, K, kblock); break; \
        case 2: tile(x + (long)m * K / 2, wn, sn, y + (long)m * N + n, 2, G, N, K, kblock); break; \
        case 1: tile(x + (long)m * K / 2, wn, sn, y + (long)m * N + n, 1, G, N, K, kblock); break; \
        }                                                                                          \
    }

/* x [M, K] and y [M, N] bfloat16, x read as pairs of columns (K even); N a multiple of 16 g. */
static inline __attribute__((always_inline)) void linear(const uint32_t *x, const void *w, const float *scale, int width, uint16_t *y, int M, int N,
                   int K, int g, int kblock) {
    if (g == 4) { TILES(4) }
    else if (g == 2) { TILES(2) }
    else { TILES(1) }
}

void bf16_linear(const uint32_t *x, const uint16_t *w, uint16_t *y, int M, int N, int K, int g, int kblock) {
    linear(x, w, 0, 2, y, M, N, K, g, kblock);
}

void q8_linear(const uint32_t *x, const int8_t *w, const float *scale, uint16_t *y, int M, int N, int K, int g) {
    linear(x, w, scale, 1, y, M, N, K, g, K);
}

/* Whether this CPU has every instruction set this file is compiled for (cpu_kernels.py asks
   before any product): Intel's first AVX-512 BF16 parts (Cooper Lake) lack VBMI. */
int supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi");
}
