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
                bfloat16.

   Cores: one core draws ~35-40 GB/s from memory here, two ~48, so a product's blocks of rows are
   shared with helper threads, in chunks claimed one at a time (a helper that the system preempts
   holds up one chunk, not a fixed half). A helper spins a while after each product, since the
   next comes within microseconds and waking a sleeping thread costs about as much as a small
   product; then it sleeps. A busy decoder reserves its cores (reserve_cores): products then run
   on the cores left, and helpers not needed sleep at once, so decoding, which the audio waits
   for, is not slowed. Which thread computes an output row changes nothing in it. */

#include <immintrin.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

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
    for (int n = n0; n < n1; n += 16 * G) {                                                          \
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

/* Outputs n0..n1 of x [M, K] and y [M, N] bfloat16, x read as pairs of columns (K even); N, n0
   and n1 multiples of 16 g. */
static inline __attribute__((always_inline)) void linear(const uint32_t *x, const void *w, const float *scale, int width, uint16_t *y, int M, int N,
                   int K, int g, int kblock, int n0, int n1) {
    if (g == 4) { TILES(4) }
    else if (g == 2) { TILES(2) }
    else { TILES(1) }
}

/* --- helper threads ---------------------------------------------------------------------- */

#define MAX_HELPERS 31 /* each sleeps on its own bit of the futex */
#define SPIN_NS 200000 /* a frame's products come microseconds apart; between frames, longer */

struct job { const uint32_t *x; const void *w; const float *scale; uint16_t *y; int M, N, K, g, kblock; };

/* A job is cut into chunks of its blocks of rows, claimed one at a time, so a helper that the
   system preempts (a busy box: the relay, the encoder) holds up at most the chunk it is on while
   the others take the rest. Chunks and the next to claim share one word that each job replaces
   whole: a helper late from one job can only ever claim chunks of the current one. */
static struct {
    _Atomic unsigned seq;     /* bumped per job; sleeping helpers wait on it */
    _Atomic uint64_t claim;   /* chunks << 32 | next chunk */
    _Atomic int done;         /* chunks finished */
    _Atomic int sleeping;
    _Atomic int taken;        /* one product at a time uses the helpers; others run alone */
    _Atomic int reserved;     /* cores held by busy decoders */
    _Atomic int helpers;
    struct job job;
} pool;

static void linear_part(const struct job *j, int part, int parts) {
    const int blocks = j->N / (16 * j->g), n0 = blocks * part / parts * 16 * j->g, n1 = blocks * (part + 1) / parts * 16 * j->g;
    linear(j->x, j->w, j->scale, j->scale ? 1 : 2, j->y, j->M, j->N, j->K, j->g, j->kblock, n0, n1);
}

/* Claim and run chunks of the current job until none is left. */
static void work(void) {
    for (;;) {
        const uint64_t claimed = atomic_fetch_add_explicit(&pool.claim, 1, memory_order_acquire);
        const int chunks = (int)(claimed >> 32), chunk = (int)(uint32_t)claimed;
        if (chunk >= chunks) return;
        linear_part(&pool.job, chunk, chunks);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static int needed(int id) { return id <= pool.helpers - atomic_load_explicit(&pool.reserved, memory_order_relaxed); }

/* Helper `id` (1..helpers): works on each job while its core is not reserved. */
static void *helper(void *arg) {
    const int id = (int)(long)arg;
    unsigned seen = 0, seq;
    for (;;) {
        long since = now_ns();
        for (int spins = 0; (seq = atomic_load_explicit(&pool.seq, memory_order_acquire)) == seen; spins++) {
            if (needed(id) && (spins & 63 || now_ns() - since < SPIN_NS)) {
                _mm_pause();
                continue;
            }
            atomic_fetch_add(&pool.sleeping, 1);
            syscall(SYS_futex, &pool.seq, FUTEX_WAIT_BITSET_PRIVATE, seen, NULL, NULL, 1u << id);
            atomic_fetch_sub(&pool.sleeping, 1);
            since = now_ns();
        }
        seen = seq;
        if (needed(id)) work();
    }
    return NULL;
}

/* Start helpers so that products run on up to `cores` threads; returns how many can. */
int use_cores(int cores) {
    while (pool.helpers < cores - 1 && pool.helpers < MAX_HELPERS) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, helper, (void *)(long)(pool.helpers + 1))) break;
        pthread_detach(thread);
        pool.helpers++;
    }
    return pool.helpers + 1;
}

/* A decoder starting (cores > 0) or finishing (cores < 0) a piece of work. */
void reserve_cores(int cores) { atomic_fetch_add(&pool.reserved, cores); }

static void run(const struct job *job) {
    const int threads = pool.helpers + 1 - atomic_load_explicit(&pool.reserved, memory_order_relaxed);
    const int blocks = job->N / (16 * job->g), chunks = blocks < 4 * threads ? blocks : 4 * threads;
    if (threads <= 1 || chunks <= 1 || atomic_exchange(&pool.taken, 1)) {
        linear_part(job, 0, 1);
        return;
    }
    pool.job = *job;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.claim, (uint64_t)chunks << 32, memory_order_release);
    atomic_fetch_add(&pool.seq, 1); /* sequentially consistent with the helpers' `sleeping` */
    if (atomic_load(&pool.sleeping)) /* only helpers 1..threads-1: the others' cores are reserved */
        syscall(SYS_futex, &pool.seq, FUTEX_WAKE_BITSET_PRIVATE, MAX_HELPERS, NULL, NULL, (2u << (threads - 1)) - 2);
    work();
    /* A helper preempted on its chunk: after ~100 us, let the system run it here if it will. */
    for (int spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < chunks; spins++)
        if (spins < 4096) _mm_pause();
        else sched_yield();
    atomic_store(&pool.taken, 0);
}

void bf16_linear(const uint32_t *x, const uint16_t *w, uint16_t *y, int M, int N, int K, int g, int kblock) {
    run(&(struct job){x, w, NULL, y, M, N, K, g, kblock});
}

void q8_linear(const uint32_t *x, const int8_t *w, const float *scale, uint16_t *y, int M, int N, int K, int g) {
    run(&(struct job){x, w, scale, y, M, N, K, g, K});
}

/* --- RMS norm and rotary embedding, rounded as PyTorch's ops round them -------------------- */

static inline float bf16_to_float(uint16_t v) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)v << 16};
    return c.f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as PyTorch (no NaNs here) */
    union { float f; uint32_t u; } c = {.f = f};
    return (uint16_t)((c.u + 0x7fff + ((c.u >> 16) & 1)) >> 16);
}

static inline __m512 bf16x16_to_float(const uint16_t *v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)v)), 16));
}

static inline __m256i float_to_bf16x16(__m512 f) { /* round to nearest even, as float_to_bf16 */
    const __m512i u = _mm512_castps_si512(f);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16));
}

/* sum(v[0..n)) in the order of PyTorch's CPU sum over a contiguous last dimension (SumKernel.cpp,
   vectorized_inner_sum with 8-float vectors, n >= 8): 4 interleaved chains of vectors, each
   summed in blocks of 16 whose sums cascade up 4 levels, the chains added, then the lanes left to
   right. decoder_stack checks it against torch.sum on each size (row_sums) before using it. */
#define LANES 8
static float torch_sum(const float *v, int n) {
    const int vectors = n / LANES, rows = vectors / 4;
    float acc[4][4][LANES] = {{{0}}}; /* [level][chain][lane] */
    int i = 0;
    for (; i + 16 <= rows;) {
        for (int j = 0; j < 16; j++, i++)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < LANES; l++) acc[0][k][l] += v[(i * 4 + k) * LANES + l];
        for (int level = 1; level < 4; level++) {
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < LANES; l++) {
                    acc[level][k][l] += acc[level - 1][k][l];
                    acc[level - 1][k][l] = 0;
                }
            if (i & (15 << (4 * level))) break;
        }
    }
    for (; i < rows; i++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < LANES; l++) acc[0][k][l] += v[(i * 4 + k) * LANES + l];
    for (int level = 1; level < 4; level++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < LANES; l++) acc[0][k][l] += acc[level][k][l];
    for (int r = rows * 4; r < vectors; r++)
        for (int l = 0; l < LANES; l++) acc[0][0][l] += v[r * LANES + l];
    for (int k = 1; k < 4; k++)
        for (int l = 0; l < LANES; l++) acc[0][0][l] += acc[0][k][l];
    float total = 0;
    for (int r = vectors * LANES; r < n; r++) total += v[r];
    for (int l = 0; l < LANES; l++) total += acc[0][0][l];
    return total;
}

/* The sums of `rows` rows of `dim` floats, as rms_norm sums them (for the check above). */
void row_sums(const float *v, float *out, int rows, int dim) {
    for (int r = 0; r < rows; r++) out[r] = torch_sum(v + (long)r * dim, dim);
}

/* y = Qwen3TTSRMSNorm(x) for `rows` rows of `dim` bfloat16 (row r at x + r / per * stride +
   r % per * dim: heads inside positions), weight row r % per; y contiguous. With cos and sin
   ([rows / per][dim] bfloat16), then rotated: y * cos + rotate_half(y) * sin, each op rounded to
   bfloat16 as PyTorch's. dim <= 4096. */
void rms_norm(const uint16_t *x, long stride, int per, const uint16_t *weight, uint16_t *y, int rows, int dim,
              float eps, const uint16_t *cos, const uint16_t *sin) {
    float h[4096], sq[4096];
    uint16_t normed[4096];
    for (int r = 0; r < rows; r++) {
        const uint16_t *xr = x + (long)(r / per) * stride + (long)(r % per) * dim, *w = weight + (long)(r % per) * dim;
        uint16_t *yr = y + (long)r * dim;
        for (int i = 0; i < dim; i++) {
            h[i] = bf16_to_float(xr[i]);
            sq[i] = h[i] * h[i];
        }
        const float scale = 1.0f / sqrtf(torch_sum(sq, dim) / (float)dim + eps);
        for (int i = 0; i < dim; i++)
            normed[i] = float_to_bf16(bf16_to_float(w[i]) * bf16_to_float(float_to_bf16(h[i] * scale)));
        if (!cos) {
            for (int i = 0; i < dim; i++) yr[i] = normed[i];
            continue;
        }
        const uint16_t *c = cos + (long)(r / per) * dim, *s = sin + (long)(r / per) * dim;
        for (int i = 0, half = dim / 2; i < dim; i++) {
            const float rotated = i < half ? -bf16_to_float(normed[i + half]) : bf16_to_float(normed[i - half]);
            const float a = bf16_to_float(float_to_bf16(bf16_to_float(normed[i]) * bf16_to_float(c[i])));
            const float b = bf16_to_float(float_to_bf16(rotated * bf16_to_float(s[i])));
            yr[i] = float_to_bf16(a + b);
        }
    }
}

/* --- attention for one new position, in float32 (int8 models) ------------------------------ */

/* e^x for x <= 0: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 Taylor polynomial in r (error ~1e-8,
   below float32's rounding), times 2^n. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln2 in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    static const float taylor[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    __m512 p = _mm512_set1_ps(taylor[0]);
    for (int i = 1; i < 8; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(taylor[i]));
    return _mm512_scalef_ps(p, n);
}

/* One query head (bfloat16 q) against `length` float32 keys and values: SDPA's arithmetic in
   float32, not its rounding. scores holds length + 16 floats. */
static void attend_head_f32(const uint16_t *q, const float *k, const float *v, int length, int dim, float scale,
                            float *scores, uint16_t *out) {
    const int vectors = dim / 16;
    __m512 query[32], sums[32];
    for (int d = 0; d < vectors; d++) query[d] = bf16x16_to_float(q + d * 16);
    float top = -INFINITY;
    for (int t = 0; t < length; t++) {
        __m512 dot = _mm512_setzero_ps();
        for (int d = 0; d < vectors; d++) dot = _mm512_fmadd_ps(query[d], _mm512_loadu_ps(k + (long)t * dim + d * 16), dot);
        scores[t] = _mm512_reduce_add_ps(dot) * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    __m512 total = _mm512_setzero_ps();
    int t = 0;
    for (; t + 16 <= length; t += 16) {
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(scores + t), _mm512_set1_ps(top)));
        _mm512_storeu_ps(scores + t, e);
        total = _mm512_add_ps(total, e);
    }
    const __mmask16 rest = (__mmask16)((1u << (length - t)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(rest, scores + t), _mm512_set1_ps(top)));
    _mm512_mask_storeu_ps(scores + t, rest, e);
    const __m512 denominator = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_mask_add_ps(total, rest, total, e)));
    for (int d = 0; d < vectors; d++) sums[d] = _mm512_setzero_ps();
    for (int u = 0; u < length; u++) {
        const __m512 p = _mm512_set1_ps(scores[u]);
        for (int d = 0; d < vectors; d++) sums[d] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + (long)u * dim + d * 16), sums[d]);
    }
    for (int d = 0; d < vectors; d++) _mm256_storeu_si256((__m256i *)(out + d * 16), float_to_bf16x16(_mm512_div_ps(sums[d], denominator)));
}

/* --- attention for one new position in bfloat16, rounded as PyTorch's SDPA ------------------ */

/* For one query, PyTorch's CPU flash attention (bfloat16, one block of at most 512 keys) computes
   s = (q . k) * scale; e = exp(s - max(s)), by its fexp_u20 for the first L / 16 * 16 positions
   (summed 16 at a time into two vectors in turn, added, then folded: halves, quarters, pairs,
   neighbours) and by expf for the rest (added one by one); p = bf16(e);
   out = bf16((p @ v) * (1 / sum(e))). Its two products go to MKL's bfloat16 GEMM, whose sums were
   found by probing it with values that cancel: q . k in 4 chains (d mod 4), each in order, then
   (c0 + c2) + (c1 + c3); p @ v per output in blocks of 4 positions ((0 + 2) + (1 + 3)), the
   blocks added in turn, then the positions left over from the last back. Every product of two
   bfloat16 is exact in float32. decoder_stack checks all of this against SDPA for every length
   at load and keeps SDPA where it differs. */

/* PyTorch's Vectorized<float>::fexp_u20 (AVX-512). */
static inline __m512 fexp_u20(__m512 x) {
    const __mmask16 low = _mm512_cmp_ps_mask(x, _mm512_castsi512_ps(_mm512_set1_epi32(0xc2aeac50)), _CMP_LT_OS);
    const __mmask16 high = _mm512_cmp_ps_mask(x, _mm512_castsi512_ps(_mm512_set1_epi32(0x42b17218)), _CMP_GT_OS);
    __m512 src = _mm512_mul_ps(x, _mm512_castsi512_ps(_mm512_set1_epi32(0x3fb8aa3b))); /* x log2(e) */
    const __m512 fraction = _mm512_sub_ps(src, _mm512_floor_ps(src));
    __m512 poly = _mm512_fmadd_ps(fraction, _mm512_set1_ps(-0.079204240219773236f), _mm512_set1_ps(-0.22433836478672356f));
    poly = _mm512_fmadd_ps(fraction, poly, _mm512_set1_ps(0.30354260500649682f));
    poly = _mm512_fmadd_ps(fraction, poly, _mm512_set1_ps(0.00010703434948458272f));
    src = _mm512_sub_ps(src, poly);
    __m512i bits = _mm512_cvttps_epi32(_mm512_fmadd_ps(_mm512_set1_ps(8388608.0f), src, _mm512_set1_ps(8388608.0f * 127)));
    bits = _mm512_mask_mov_epi32(bits, low, _mm512_setzero_si512());
    bits = _mm512_mask_mov_epi32(bits, high, _mm512_set1_epi32(0x7F800000));
    return _mm512_castsi512_ps(bits);
}

static inline float fold_lanes(__m512 v) { /* at::vec::vec_reduce_all's order */
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4E));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xB1));
    v = _mm512_add_ps(v, _mm512_shuffle_ps(v, v, 0x4E));
    v = _mm512_add_ps(v, _mm512_shuffle_ps(v, v, 0xB1));
    return _mm512_cvtss_f32(v);
}

/* One query head against `length` <= 512 bfloat16 keys and values, as SDPA (above). s holds
   length + 16 floats. */
static void attend_head_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, int length, int dim, float scale,
                             float *s, uint16_t *out) {
    float query[512], e[16];
    uint16_t p[512];
    for (int d = 0; d < dim; d++) query[d] = bf16_to_float(q[d]);
    float top = -INFINITY;
    for (int t = 0; t < length; t++) {
        const uint16_t *key = k + (long)t * dim;
        float chain[4] = {0, 0, 0, 0};
        for (int d = 0; d < dim; d += 4)
            for (int r = 0; r < 4; r++) chain[r] = fmaf(query[d + r], bf16_to_float(key[d + r]), chain[r]);
        s[t] = ((chain[0] + chain[2]) + (chain[1] + chain[3])) * scale;
        top = s[t] > top ? s[t] : top;
    }
    const int vectors = length / 16 * 16;
    __m512 lanes[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int t = 0; t < vectors; t += 16) {
        const __m512 x = fexp_u20(_mm512_sub_ps(_mm512_loadu_ps(s + t), _mm512_set1_ps(top)));
        lanes[t / 16 % 2] = _mm512_add_ps(lanes[t / 16 % 2], x);
        _mm512_storeu_ps(e, x);
        for (int i = 0; i < 16; i++) p[t + i] = float_to_bf16(e[i]);
    }
    float sum = fold_lanes(_mm512_add_ps(lanes[0], lanes[1]));
    for (int t = vectors; t < length; t++) {
        const float x = expf(s[t] - top);
        sum += x;
        p[t] = float_to_bf16(x);
    }
    const float reciprocal = 1 / sum;
    const int blocks = length / 4;
    for (int d = 0; d < dim; d += 16) {
#define PV(t) _mm512_mul_ps(_mm512_set1_ps(bf16_to_float(p[t])), bf16x16_to_float(v + (long)(t) * dim + d))
        __m512 total = _mm512_setzero_ps();
        for (int b = 0; b < blocks; b++) {
            const int t = 4 * b;
            const __m512 block = _mm512_add_ps(_mm512_add_ps(PV(t), PV(t + 2)), _mm512_add_ps(PV(t + 1), PV(t + 3)));
            total = b ? _mm512_add_ps(total, block) : block;
        }
        int t = length - 1;
        if (!blocks) total = PV(t), t--; /* not 0 + x: that would turn -0 into +0 */
        for (; t >= 4 * blocks; t--) total = _mm512_add_ps(total, PV(t));
#undef PV
        _mm256_storeu_si256((__m256i *)(out + d), float_to_bf16x16(_mm512_mul_ps(total, _mm512_set1_ps(reciprocal))));
    }
}

/* Attention of one new position per sequence, grouped-query heads. For each of the n sequences j:
   its new key and value (qk's last kv_heads heads, v's row) go into position starts[j] of cache
   row rows[j], then each of its query heads attends over positions 0..starts[j] of its kv head
   (q head h reads kv head h / (heads / kv_heads)). qk [n][heads + kv_heads][dim] and v (row j at
   v + j * v_stride, [kv_heads][dim]): bfloat16. keys, values: [cache rows][kv_heads][capacity][dim],
   bfloat16 when as_sdpa (rounded as SDPA, starts[j] < 512), else float32. out: [n][heads][dim]
   bfloat16. dim a multiple of 16, at most 512. */
void attend_one(const uint16_t *qk, const uint16_t *v, long v_stride, void *keys, void *values, long capacity,
                const int *rows, const int *starts, int n, int heads, int kv_heads, int dim, float scale, int as_sdpa,
                uint16_t *out) {
    const int group = heads / kv_heads;
    int longest = 0;
    for (int j = 0; j < n; j++) longest = starts[j] + 1 > longest ? starts[j] + 1 : longest;
    float *scores = malloc(sizeof(float) * ((size_t)longest + 16));
    for (int j = 0; j < n; j++) {
        const uint16_t *q = qk + (long)j * (heads + kv_heads) * dim;
        for (int g = 0; g < kv_heads; g++) {
            const long cache = ((long)rows[j] * kv_heads + g) * capacity * dim, at = cache + (long)starts[j] * dim;
            for (int i = 0; i < dim; i++) {
                const uint16_t key = q[(heads + g) * dim + i], value = v[j * v_stride + (long)g * dim + i];
                if (as_sdpa) ((uint16_t *)keys)[at + i] = key, ((uint16_t *)values)[at + i] = value;
                else ((float *)keys)[at + i] = bf16_to_float(key), ((float *)values)[at + i] = bf16_to_float(value);
            }
            for (int h = g * group; h < (g + 1) * group; h++) {
                uint16_t *o = out + ((long)j * heads + h) * dim;
                if (as_sdpa)
                    attend_head_bf16(q + h * dim, (uint16_t *)keys + cache, (uint16_t *)values + cache, starts[j] + 1, dim, scale, scores, o);
                else
                    attend_head_f32(q + h * dim, (float *)keys + cache, (float *)values + cache, starts[j] + 1, dim, scale, scores, o);
            }
        }
    }
    free(scores);
}

/* Whether this CPU has every instruction set this file is compiled for (cpu_kernels.py asks
   before any product): Intel's first AVX-512 BF16 parts (Cooper Lake) lack VBMI. */
int supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi");
}
