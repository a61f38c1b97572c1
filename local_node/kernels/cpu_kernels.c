/* The node's hot kernels for generation (local_node/cpu_kernels.py builds this once per tier).

   One source for every CPU: the compiler flags of a tier (cpu_kernels.py: TIERS) decide the vector
   width and the instructions. The portable parts are written with GCC's vector extensions, which
   the compiler maps onto AVX-512, AVX2 or NEON; the AVX-512 BF16 tier adds a bfloat16 dot-product
   and an int8 widening by table lookup (VBMI) where those instructions exist.

   These kernels define the node's numbers: float32 sums rounded once to bfloat16. They do not try
   to reproduce a vendor library's rounding; tests hold them to PyTorch's results by stated
   tolerances, and the tiers to each other.

   At batch 1 a frame is a few hundred matrix-vector products whose weights come from memory once
   each, so the pace is how fast the weights stream in. The products read their weights in a
   layout written for them (cpu_kernels.py), in exactly the order the loop uses them: one
   sequential stream the hardware prefetcher follows, no per-call set-up.

   Layout: blocks of R output rows (R = 16, 32 or 64: up to 4 vectors of the tier's width); within
   a block, for each pair of columns k, k + 1, the block's rows' two values: [N / R][K / 2][R][2].
   A 32-bit word then holds one row's weights for two columns, which a bfloat16 dot-product takes
   as it is and other tiers split into two float vectors with a shift and a mask. int8 weights
   keep each pair's two columns apart instead ([N / R][K / 2][2][R]), widened a vector at a time;
   the AVX-512 BF16 tier has a layout of its own for them (load_int8_pair). Up to TILE rows of x
   share each weight read (batches, prefills).

   Cores: a product's blocks of rows are shared with helper threads, in chunks claimed one at a
   time (a helper that the system preempts holds up one chunk, not a fixed half). A helper spins a
   while after each product, since the next comes within microseconds and waking a sleeping thread
   costs about as much as a small product; then it sleeps. A busy decoder reserves its cores
   (reserve_cores): products then run on the cores left, so decoding, which the audio waits for,
   is not slowed. Which thread computes an output row changes nothing in it. */

#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define PAUSE() _mm_pause()
#elif defined(__aarch64__)
#include <arm_neon.h>
#define PAUSE() __asm__ __volatile__("yield")
#else
#error "cpu_kernels.c: x86-64 or aarch64"
#endif

#if defined(__AVX512F__)
#define W 16
#elif defined(__AVX2__)
#define W 8
#elif defined(__ARM_NEON)
#define W 4
#else
#error "cpu_kernels.c: build with a tier's flags (cpu_kernels.py)"
#endif

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
#define DOT_BF16 1 /* vdpbf16ps for products, table lookup for int8 (its own int8 layout) */
#else
#define DOT_BF16 0
#endif

#define TILE 4 /* rows of x per pass over the weights */
#define MAX_DIM 4096 /* rms_norm's rows, attention's head size */

typedef float vf __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));

static inline vf load_f(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vu load_u(const void *p) { vu v; memcpy(&v, p, sizeof v); return v; }
static inline void store_f(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf splat(float x) { const vf v = {x}; return __builtin_shuffle(v, (vi){0}); }
static inline float lane_sum(vf v) {
    float s = 0;
    for (int i = 0; i < W; i++) s += v[i];
    return s;
}
static inline vf vmax(vf a, vf b) { vi m = a > b; return (vf)(((vi)a & m) | ((vi)b & ~m)); }

static inline float bf16_to_float(uint16_t v) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)v << 16};
    return c.f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as PyTorch (no NaNs here) */
    union { float f; uint32_t u; } c = {.f = f};
    return (uint16_t)((c.u + 0x7fff + ((c.u >> 16) & 1)) >> 16);
}

static inline vf load_bf16(const uint16_t *p) { /* W bfloat16 as floats */
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

static inline void store_bf16(uint16_t *p, vf v) { /* rounded to nearest even */
    const vu u = (vu)v;
    const vh h = __builtin_convertvector((u + 0x7fff + ((u >> 16) & 1)) >> 16, vh);
    memcpy(p, &h, sizeof h);
}

/* --- products -------------------------------------------------------------------------------- */

#if DOT_BF16
/* 64 int8 weights (two groups of 16 rows x a pair of columns) as two vectors of 32 bfloat16, by
   table lookup: 7 instructions where converting through int32 and float32 takes about 16. Each
   byte is sign | magnitude (|w| <= 127); the tables give the low and high byte of
   bfloat16(magnitude), the sign goes into the high byte, and interleaving the bytes makes 16-bit
   words. The interleave works within 128-bit lanes, so this tier's int8 layout stores each lane
   as the first group's 8 weights then the second's (cpu_kernels.py). */
#define EXP(m) ((m) >= 64 ? 6 : (m) >= 32 ? 5 : (m) >= 16 ? 4 : (m) >= 8 ? 3 : (m) >= 4 ? 2 : (m) >= 2 ? 1 : 0)
#define BF16(m) ((m) ? ((127 + EXP(m)) << 7) | (((m) << (7 - EXP(m))) & 0x7f) : 0)
#define LO(m) (BF16(m) & 0xff)
#define HI(m) (BF16(m) >> 8)
#define X8(F, m) F(m), F(m + 1), F(m + 2), F(m + 3), F(m + 4), F(m + 5), F(m + 6), F(m + 7)
#define X32(F, m) X8(F, m), X8(F, m + 8), X8(F, m + 16), X8(F, m + 24)
#define X128(F) X32(F, 0), X32(F, 32), X32(F, 64), X32(F, 96)
static const uint8_t BF16_LO[128] __attribute__((aligned(64))) = {X128(LO)};
static const uint8_t BF16_HI[128] __attribute__((aligned(64))) = {X128(HI)};

static inline void load_int8_pair(const int8_t *w, __m512bh *first, __m512bh *second) {
    const __m512i src = _mm512_loadu_si512(w);
    const __m512i lo = _mm512_permutex2var_epi8(_mm512_load_si512(BF16_LO), src, _mm512_load_si512(BF16_LO + 64));
    __m512i hi = _mm512_permutex2var_epi8(_mm512_load_si512(BF16_HI), src, _mm512_load_si512(BF16_HI + 64));
    hi = _mm512_ternarylogic_epi32(hi, src, _mm512_set1_epi8((char)0x80), 0xF8); /* hi | (src & 0x80) */
    *first = (__m512bh)_mm512_unpacklo_epi8(lo, hi);
    *second = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
}

/* rows (<= TILE) rows of x against one block of V vectors of 16 outputs; int8 or bfloat16
   weights, times their rows' scales where given. */
static inline __attribute__((always_inline)) void tile(const uint32_t *x, const void *w, const float *scale,
                                                       const int int8, uint16_t *y, const int rows, const int V,
                                                       int N, int K) {
    __m512 acc[TILE][4];
    for (int m = 0; m < rows; m++)
        for (int b = 0; b < V; b++) acc[m][b] = _mm512_setzero_ps();
    for (int k = 0; k < K / 2; k++) {
        __m512bh wv[4];
        if (int8)
            for (int b = 0; b < V; b += 2) load_int8_pair((const int8_t *)w + ((long)k * V + b) * 32, &wv[b], &wv[b + 1]);
        else
            for (int b = 0; b < V; b++) wv[b] = (__m512bh)_mm512_loadu_si512((const uint16_t *)w + ((long)k * V + b) * 32);
        for (int m = 0; m < rows; m++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)x[(long)m * K / 2 + k]);
            for (int b = 0; b < V; b++) acc[m][b] = _mm512_dpbf16_ps(acc[m][b], xv, wv[b]);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int b = 0; b < V; b++) {
            vf out = (vf)acc[m][b];
            if (scale) out *= load_f(scale + W * b);
            store_bf16(y + (long)m * N + W * b, out);
        }
}
#else
/* Two columns' weights of W rows as floats. bfloat16: pairs, one 32-bit word per row, the even
   column in the low half. int8: the even column's W rows, then (`apart` bytes on) the odd's. */
static inline void split_bf16(const void *w, vf *even, vf *odd) {
    const vu u = load_u(w);
    *even = (vf)(u << 16);
    *odd = (vf)(u & 0xffff0000u);
}

static inline vf load_int8(const int8_t *w) { /* GCC's generic conversion goes a byte at a time */
#if W == 16
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
#elif W == 8
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
#else
    int8x8_t q;
    memcpy(&q, w, 4);
    return (vf)vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(q))));
#endif
}

/* rows (<= TILE) rows of x against one block of V vectors of W outputs; int8 or bfloat16
   weights, times their rows' scales where given. */
static inline __attribute__((always_inline)) void tile(const uint32_t *x, const void *w, const float *scale,
                                                       const int int8, uint16_t *y, const int rows, const int V,
                                                       int N, int K) {
    vf acc[TILE][4];
    for (int m = 0; m < rows; m++)
        for (int b = 0; b < V; b++) acc[m][b] = (vf){0};
    for (int k = 0; k < K / 2; k++) {
        vf even[4], odd[4];
        for (int b = 0; b < V; b++) {
            if (int8) {
                const int8_t *wk = (const int8_t *)w + (long)k * 2 * V * W + b * W;
                even[b] = load_int8(wk), odd[b] = load_int8(wk + V * W);
            } else {
                split_bf16((const uint16_t *)w + ((long)k * V + b) * 2 * W, &even[b], &odd[b]);
            }
        }
        for (int m = 0; m < rows; m++) {
            const uint32_t pair = x[(long)m * K / 2 + k];
            const vf x0 = splat(bf16_to_float((uint16_t)pair)), x1 = splat(bf16_to_float((uint16_t)(pair >> 16)));
            for (int b = 0; b < V; b++) acc[m][b] += x0 * even[b] + x1 * odd[b];
        }
    }
    for (int m = 0; m < rows; m++)
        for (int b = 0; b < V; b++) {
            vf out = acc[m][b];
            if (scale) out *= load_f(scale + W * b);
            store_bf16(y + (long)m * N + W * b, out);
        }
}
#endif

/* One block's weights widened from int8 to bfloat16, in the bfloat16 layout (exact: |w| <= 127
   fits bfloat16's significand). Several rows of x then share one widening instead of each tile
   of them repeating it. */
static void widen_int8(const int8_t *w, uint16_t *out, int V, int K) {
    for (int k = 0; k < K / 2; k++)
#if DOT_BF16
        for (int b = 0; b < V; b += 2) {
            __m512bh first, second;
            load_int8_pair(w + ((long)k * V + b) * 32, &first, &second);
            _mm512_storeu_si512(out + ((long)k * V + b) * 32, (__m512i)first);
            _mm512_storeu_si512(out + ((long)k * V + b + 1) * 32, (__m512i)second);
        }
#else
        for (int b = 0; b < V; b++) {
            const int8_t *wk = w + (long)k * 2 * V * W + b * W;
            const vu pairs = ((vu)load_int8(wk) >> 16) | ((vu)load_int8(wk + V * W) & 0xffff0000u);
            memcpy(out + ((long)k * V + b) * 2 * W, &pairs, sizeof pairs);
        }
#endif
}

/* All M rows of x against the block of V vectors of outputs starting at n. */
static inline __attribute__((always_inline)) void block(const uint32_t *x, const void *w, const float *scale,
                                                        int int8, uint16_t *y, int M, int N, int K, const int V,
                                                        int n) {
    int m = 0;
    for (; m + TILE <= M; m += TILE) tile(x + (long)m * K / 2, w, scale, int8, y + (long)m * N + n, TILE, V, N, K);
    switch (M - m) {
    case 3: tile(x + (long)m * K / 2, w, scale, int8, y + (long)m * N + n, 3, V, N, K); break;
    case 2: tile(x + (long)m * K / 2, w, scale, int8, y + (long)m * N + n, 2, V, N, K); break;
    case 1: tile(x + (long)m * K / 2, w, scale, int8, y + (long)m * N + n, 1, V, N, K); break;
    }
}

static __thread uint16_t *widened; /* per thread: helpers widen their own blocks */
static __thread long widened_size;

/* Outputs n0..n1 of x [M, K] and y [M, N] bfloat16, x read as pairs of columns (K even), weights
   (int8 where scale is given, else bfloat16) in blocks of V vectors; N, n0 and n1 multiples of
   V * W. */
static inline __attribute__((always_inline)) void blocks(const uint32_t *x, const void *w, const float *scale,
                                                         uint16_t *y, int M, int N, int K, const int V, int n0,
                                                         int n1) {
    const int int8 = scale != 0, width = int8 ? 1 : 2; /* bytes per weight */
    const long size = (long)V * W * K;
    if (int8 && M > TILE && widened_size < size) {
        free(widened);
        widened = malloc(size * sizeof *widened);
        widened_size = widened ? size : 0;
    }
    for (int n = n0; n < n1; n += V * W) {
        const char *wn = (const char *)w + (long)n * K * width;
        const float *sn = scale ? scale + n : 0;
        if (int8 && M > TILE && widened) {
            widen_int8((const int8_t *)wn, widened, V, K);
            block(x, widened, sn, 0, y, M, N, K, V, n);
        } else {
            block(x, wn, sn, int8, y, M, N, K, V, n);
        }
    }
}

static void linear(const uint32_t *x, const void *w, const float *scale, uint16_t *y, int M, int N, int K, int V,
                   int n0, int n1) {
    if (V == 4) blocks(x, w, scale, y, M, N, K, 4, n0, n1);
    else if (V == 2) blocks(x, w, scale, y, M, N, K, 2, n0, n1);
    else blocks(x, w, scale, y, M, N, K, 1, n0, n1);
}

/* --- helper threads ---------------------------------------------------------------------- */

#define MAX_HELPERS 31 /* each sleeps on its own bit of the futex */
#define SPIN_NS 200000 /* a frame's products come microseconds apart; between frames, longer */

struct job { const uint32_t *x; const void *w; const float *scale; uint16_t *y; int M, N, K, V; };

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
    const int block = j->V * W, blocks = j->N / block;
    const int n0 = blocks * part / parts * block, n1 = blocks * (part + 1) / parts * block;
    linear(j->x, j->w, j->scale, j->y, j->M, j->N, j->K, j->V, n0, n1);
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
                PAUSE();
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
    const int blocks = job->N / (job->V * W), chunks = blocks < 4 * threads ? blocks : 4 * threads;
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
        if (spins < 4096) PAUSE();
        else sched_yield();
    atomic_store(&pool.taken, 0);
}

/* y = bf16(x @ w.T): x [M, K] bfloat16, w [N, K] bfloat16 in the layout above with blocks of
   V vectors, y [M, N]. */
void bf16_linear(const uint32_t *x, const uint16_t *w, uint16_t *y, int M, int N, int K, int V) {
    run(&(struct job){x, w, NULL, y, M, N, K, V});
}

/* y = bf16(scale * (x @ w.T)), int8 weights (sign | magnitude, lane-interleaved, on the BF16 tier;
   two's complement, columns apart, elsewhere) with a float32 scale per row. */
void q8_linear(const uint32_t *x, const int8_t *w, const float *scale, uint16_t *y, int M, int N, int K, int V) {
    run(&(struct job){x, w, scale, y, M, N, K, V});
}

/* Facts cpu_kernels.py lays weights out by. */
int lanes(void) { return W; }
int int8_sign_magnitude(void) { return DOT_BF16; }

/* --- RMS norm and rotary embedding ------------------------------------------------------------ */

/* y = Qwen3TTSRMSNorm(x) for `rows` rows of `dim` bfloat16 (row r at x + r / per * stride +
   r % per * dim: heads inside positions), weight row r % per; y contiguous. With cos and sin
   ([rows / per][dim] bfloat16), then rotated: y * cos + rotate_half(y) * sin. Rounded to bfloat16
   where the module's ops round (after the scaling, the weight, and each term of the rotation);
   the sum of squares in float32. dim <= MAX_DIM. */
void rms_norm(const uint16_t *x, long stride, int per, const uint16_t *weight, uint16_t *y, int rows, int dim,
              float eps, const uint16_t *cos, const uint16_t *sin) {
    uint16_t normed[MAX_DIM];
    for (int r = 0; r < rows; r++) {
        const uint16_t *xr = x + (long)(r / per) * stride + (long)(r % per) * dim, *w = weight + (long)(r % per) * dim;
        uint16_t *yr = cos ? normed : y + (long)r * dim;
        vf squares = {0};
        int i = 0;
        for (; i + W <= dim; i += W) {
            const vf h = load_bf16(xr + i);
            squares += h * h;
        }
        float sum = lane_sum(squares);
        for (; i < dim; i++) sum += bf16_to_float(xr[i]) * bf16_to_float(xr[i]);
        const float scale = 1.0f / sqrtf(sum / (float)dim + eps);
        for (i = 0; i < dim; i++)
            yr[i] = float_to_bf16(bf16_to_float(w[i]) * bf16_to_float(float_to_bf16(bf16_to_float(xr[i]) * scale)));
        if (!cos) continue;
        const uint16_t *c = cos + (long)(r / per) * dim, *s = sin + (long)(r / per) * dim;
        uint16_t *out = y + (long)r * dim;
        for (int j = 0, half = dim / 2; j < dim; j++) {
            const float rotated = j < half ? -bf16_to_float(normed[j + half]) : bf16_to_float(normed[j - half]);
            const float a = bf16_to_float(float_to_bf16(bf16_to_float(normed[j]) * bf16_to_float(c[j])));
            const float b = bf16_to_float(float_to_bf16(rotated * bf16_to_float(s[j])));
            out[j] = float_to_bf16(a + b);
        }
    }
}

/* --- attention for one new position ----------------------------------------------------------- */

/* e^x for x <= 0: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 Taylor polynomial in r (error ~1e-8,
   below float32's rounding), times 2^n. */
static inline vf exp_nonpositive(vf x) {
    x = vmax(x, splat(-87.0f));
    const vf magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vf n = (x * 1.44269504f + magic) - magic;
    vf r = x - n * 0.693145751953125f; /* ln2 in two parts */
    r = r - n * 1.428606765330187e-06f;
    static const float taylor[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    vf p = splat(taylor[0]);
    for (int i = 1; i < 8; i++) p = p * r + taylor[i];
    return (vf)((vu)p + (vu)(__builtin_convertvector(n, vi) << 23));
}

/* W cache entries of a key or value as floats: bfloat16 or float32 caches. */
static inline vf load_cache(const void *p, long at, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)p + at) : load_f((const float *)p + at);
}

/* One query head (bfloat16 q) against `length` cached keys and values, in float32: softmax(q.k *
   scale) @ v. scores holds length + W floats. */
static void attend_head(const uint16_t *q, const void *k, const void *v, int bf16, int length, int dim, float scale,
                        float *scores, uint16_t *out) {
    const int vectors = dim / W;
    vf query[MAX_DIM / W], sums[MAX_DIM / W];
    for (int d = 0; d < vectors; d++) query[d] = load_bf16(q + d * W);
    float top = -INFINITY;
    for (int t = 0; t < length; t++) {
        vf dot = {0};
        for (int d = 0; d < vectors; d++) dot += query[d] * load_cache(k, (long)t * dim + d * W, bf16);
        scores[t] = lane_sum(dot) * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    for (int t = length; t < (length + W - 1) / W * W; t++) scores[t] = -INFINITY; /* e = 0 */
    vf total = {0};
    for (int t = 0; t < length; t += W) {
        const vf e = exp_nonpositive(load_f(scores + t) - top);
        store_f(scores + t, e);
        total += e;
    }
    const float reciprocal = 1.0f / lane_sum(total);
    for (int d = 0; d < vectors; d++) sums[d] = (vf){0};
    for (int t = 0; t < length; t++) {
        const vf p = splat(scores[t]);
        for (int d = 0; d < vectors; d++) sums[d] += p * load_cache(v, (long)t * dim + d * W, bf16);
    }
    for (int d = 0; d < vectors; d++) store_bf16(out + d * W, sums[d] * reciprocal);
}

/* Attention of one new position per sequence, grouped-query heads. For each of the n sequences j:
   its new key and value (qk's last kv_heads heads, v's row) go into position starts[j] of cache
   row rows[j], then each of its query heads attends over positions 0..starts[j] of its kv head
   (q head h reads kv head h / (heads / kv_heads)). qk [n][heads + kv_heads][dim] and v (row j at
   v + j * v_stride, [kv_heads][dim]): bfloat16. keys, values: [cache rows][kv_heads][capacity][dim],
   bfloat16 when bf16, else float32. out: [n][heads][dim] bfloat16. dim a multiple of 16, at most
   MAX_DIM. */
void attend_one(const uint16_t *qk, const uint16_t *v, long v_stride, void *keys, void *values, long capacity,
                const int *rows, const int *starts, int n, int heads, int kv_heads, int dim, float scale, int bf16,
                uint16_t *out) {
    const int group = heads / kv_heads;
    int longest = 0;
    for (int j = 0; j < n; j++) longest = starts[j] + 1 > longest ? starts[j] + 1 : longest;
    float *scores = malloc(sizeof(float) * ((size_t)longest + W));
    for (int j = 0; j < n; j++) {
        const uint16_t *q = qk + (long)j * (heads + kv_heads) * dim;
        for (int g = 0; g < kv_heads; g++) {
            const long cache = ((long)rows[j] * kv_heads + g) * capacity * dim, at = cache + (long)starts[j] * dim;
            for (int i = 0; i < dim; i++) {
                const uint16_t key = q[(heads + g) * dim + i], value = v[j * v_stride + (long)g * dim + i];
                if (bf16) ((uint16_t *)keys)[at + i] = key, ((uint16_t *)values)[at + i] = value;
                else ((float *)keys)[at + i] = bf16_to_float(key), ((float *)values)[at + i] = bf16_to_float(value);
            }
            const int size = bf16 ? 2 : 4;
            for (int h = g * group; h < (g + 1) * group; h++)
                attend_head(q + h * dim, (char *)keys + cache * size, (char *)values + cache * size, bf16, starts[j] + 1,
                            dim, scale, scores, out + ((long)j * heads + h) * dim);
        }
    }
    free(scores);
}

/* --- a decoder layer for one new position --------------------------------------------------- */

/* One product of a layer: its weight in the layout above, int8 scales or NULL, vectors per block. */
struct product { const void *weight; const float *scale; int vectors; };

/* What a layer step needs of one decoder layer; cpu_kernels.py fills one per layer. */
struct layer {
    struct product qkv, o, gate_up, down;
    const uint16_t *input_norm, *post_norm, *qk_norm; /* qk_norm: a row per q head, then per kv head */
    float norm_eps, qk_eps, scale;
};

static void product(const struct product *p, const uint16_t *x, uint16_t *y, int M, int N, int K) {
    run(&(struct job){(const uint32_t *)x, p->weight, p->scale, y, M, N, K, p->vectors});
}

static void add_into(uint16_t *x, const uint16_t *delta, long count) { /* x = bf16(x + delta) */
    for (long i = 0; i < count; i++) x[i] = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(delta[i]));
}

/* x [n][hidden] bfloat16, one new position per sequence, through `count` decoder layers in place:
   per layer  x += o(attention(rope(q_norm(q)), rope(k_norm(k)), v))  on input_norm(x)
              x += down(silu(gate(h)) * up(h))                         on post_norm(x)
   each op rounded to bfloat16 where the model's ops round. Sequence j's key and value go into
   position starts[j] of cache row rows[j]; layer i's caches start layer_stride elements after
   layer i - 1's. cos and sin: [n][dim]. The same arithmetic as the per-op calls, in one call. */
void stack_step(const struct layer *layers, int count, uint16_t *x, int n, int hidden, int heads, int kv_heads,
                int dim, int intermediate, void *keys, void *values, long layer_stride, long capacity, const int *rows,
                const int *starts, const uint16_t *cos, const uint16_t *sin, int bf16_cache) {
    const int all = heads + 2 * kv_heads, size = bf16_cache ? 2 : 4;
    uint16_t *h = malloc(2L * n * hidden), *qkv = malloc(2L * n * all * dim), *qk = malloc(2L * n * (heads + kv_heads) * dim),
             *attended = malloc(2L * n * heads * dim), *out = malloc(2L * n * hidden),
             *gate_up = malloc(4L * n * intermediate), *act = malloc(2L * n * intermediate);
    for (int i = 0; i < count; i++) {
        const struct layer *L = &layers[i];
        rms_norm(x, hidden, 1, L->input_norm, h, n, hidden, L->norm_eps, NULL, NULL);
        product(&L->qkv, h, qkv, n, all * dim, hidden);
        rms_norm(qkv, (long)all * dim, heads + kv_heads, L->qk_norm, qk, n * (heads + kv_heads), dim, L->qk_eps, cos, sin);
        attend_one(qk, qkv + (heads + kv_heads) * dim, (long)all * dim, (char *)keys + i * layer_stride * size,
                   (char *)values + i * layer_stride * size, capacity, rows, starts, n, heads, kv_heads, dim, L->scale,
                   bf16_cache, attended);
        product(&L->o, attended, out, n, hidden, heads * dim);
        add_into(x, out, (long)n * hidden);
        rms_norm(x, hidden, 1, L->post_norm, h, n, hidden, L->norm_eps, NULL, NULL);
        product(&L->gate_up, h, gate_up, n, 2 * intermediate, hidden);
        for (int r = 0; r < n; r++)
            for (int j = 0; j < intermediate; j++) {
                const float g = bf16_to_float(gate_up[(long)r * 2 * intermediate + j]);
                const float up = bf16_to_float(gate_up[(long)r * 2 * intermediate + intermediate + j]);
                act[(long)r * intermediate + j] = float_to_bf16(bf16_to_float(float_to_bf16(g / (1.0f + expf(-g)))) * up);
            }
        product(&L->down, act, out, n, hidden, intermediate);
        add_into(x, out, (long)n * hidden);
    }
    free(h), free(qkv), free(qk), free(attended), free(out), free(gate_up), free(act);
}

/* --- the machine ------------------------------------------------------------------------------ */

struct reader { const vf *data; long vectors; vf sum; };

static void *read_part(void *arg) {
    struct reader *r = arg;
    vf a = {0}, b = {0}, c = {0}, d = {0};
    for (long i = 0; i + 4 <= r->vectors; i += 4) a += r->data[i], b += r->data[i + 1], c += r->data[i + 2], d += r->data[i + 3];
    r->sum = a + b + c + d;
    return NULL;
}

/* Seconds to read `bytes` (a multiple of 256) at p, 64-byte aligned, shared among `threads`
   threads: the streaming read bandwidth the products are bound by (bench). */
double read_seconds(const void *p, long bytes, int threads) {
    struct reader parts[64];
    pthread_t ids[64];
    threads = threads < 1 ? 1 : threads > 64 ? 64 : threads;
    const long vectors = bytes / sizeof(vf), share = vectors / threads / 4 * 4;
    const long start = now_ns();
    for (int t = 0; t < threads; t++) {
        parts[t] = (struct reader){.data = (const vf *)p + t * share, .vectors = share};
        if (t) pthread_create(&ids[t], NULL, read_part, &parts[t]);
    }
    read_part(&parts[0]);
    for (int t = 1; t < threads; t++) pthread_join(ids[t], NULL);
    const double seconds = (now_ns() - start) * 1e-9;
    volatile float sink = 0;
    for (int t = 0; t < threads; t++) sink += lane_sum(parts[t].sum);
    (void)sink;
    return seconds;
}

/* Whether this CPU has every instruction set this build was compiled for (cpu_kernels.py asks
   before anything else). */
int supported(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    int ok = __builtin_cpu_supports("fma");
#if defined(__AVX512F__)
    ok = ok && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
    ok = ok && __builtin_cpu_supports("avx2");
#endif
#if DOT_BF16
    ok = ok && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi");
#endif
    return ok;
#else
    return 1; /* NEON is part of every aarch64 CPU */
#endif
}

#ifdef SELF_TEST
/* A standalone check of the kernels against plain double-precision sums, for builds that cannot
   be loaded into this Python (another architecture, under qemu-user): cc <tier flags> -DSELF_TEST
   cpu_kernels.c -o self_test && ./self_test. Prints what it checked; exits 1 on a mismatch. */
#include <stdio.h>

static uint32_t seed = 12345;
static float uniform(void) { seed = seed * 1664525u + 1013904223u; return (float)(seed >> 8) / (1 << 24) * 2 - 1; }

static void layout_bf16(const uint16_t *w, uint16_t *out, int N, int K, int V) {
    const int R = V * W; /* [N / R][K / 2][R][2] */
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) out[(((long)(n / R) * (K / 2) + k / 2) * R + n % R) * 2 + k % 2] = w[(long)n * K + k];
}

static int check_products(int M, int N, int K, int V) {
    uint16_t *w = malloc(2L * N * K), *laid = malloc(2L * N * K), *x = malloc(2L * M * K), *y = malloc(2L * M * N);
    for (long i = 0; i < (long)N * K; i++) w[i] = float_to_bf16(uniform() * 0.05f);
    for (long i = 0; i < (long)M * K; i++) x[i] = float_to_bf16(uniform());
    layout_bf16(w, laid, N, K, V);
    bf16_linear((const uint32_t *)x, laid, y, M, N, K, V);
    int bad = 0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double want = 0, size = 0;
            for (int k = 0; k < K; k++) {
                const double term = (double)bf16_to_float(x[(long)m * K + k]) * bf16_to_float(w[(long)n * K + k]);
                want += term, size += fabs(term);
            }
            const double got = bf16_to_float(y[(long)m * N + n]);
            bad += fabs(got - want) > fabs(want) * 0x1p-8 + size * 0x1p-20;
        }
    printf("bf16_linear M=%d N=%d K=%d: %s\n", M, N, K, bad ? "MISMATCH" : "ok");
    free(w), free(laid), free(x), free(y);
    return bad;
}

#if !DOT_BF16
static int check_int8(int M, int N, int K, int V) {
    const int R = V * W; /* [N / R][K / 2][2][R] */
    int8_t *w = malloc((long)N * K), *laid = malloc((long)N * K);
    float *scale = malloc(4L * N);
    uint16_t *x = malloc(2L * M * K), *y = malloc(2L * M * N);
    for (long i = 0; i < (long)N * K; i++) w[i] = (int8_t)(uniform() * 127);
    for (int n = 0; n < N; n++) scale[n] = 0.01f + uniform() * uniform() * 0.01f;
    for (long i = 0; i < (long)M * K; i++) x[i] = float_to_bf16(uniform());
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) laid[(((long)(n / R) * (K / 2) + k / 2) * 2 + k % 2) * R + n % R] = w[(long)n * K + k];
    q8_linear((const uint32_t *)x, laid, scale, y, M, N, K, V);
    int bad = 0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double want = 0, size = 0;
            for (int k = 0; k < K; k++) {
                const double term = (double)bf16_to_float(x[(long)m * K + k]) * w[(long)n * K + k] * scale[n];
                want += term, size += fabs(term);
            }
            bad += fabs(bf16_to_float(y[(long)m * N + n]) - want) > fabs(want) * 0x1p-8 + size * 0x1p-20;
        }
    printf("q8_linear M=%d N=%d K=%d: %s\n", M, N, K, bad ? "MISMATCH" : "ok");
    free(w), free(laid), free(scale), free(x), free(y);
    return bad;
}
#endif

static int check_attention(int length, int dim) {
    const int heads = 2, kv_heads = 1;
    float *keys = calloc((size_t)length * dim, 4), *values = calloc((size_t)length * dim, 4);
    uint16_t qk[3 * MAX_DIM], v[MAX_DIM], out[2 * MAX_DIM];
    for (long i = 0; i < (long)length * dim; i++) keys[i] = uniform(), values[i] = uniform();
    for (int i = 0; i < 3 * dim; i++) qk[i] = float_to_bf16(uniform() * 2);
    for (int i = 0; i < dim; i++) v[i] = float_to_bf16(uniform());
    const int row = 0, start = length - 1;
    attend_one(qk, v, dim, keys, values, length, &row, &start, 1, heads, kv_heads, dim, 1.0f / sqrtf(dim), 0, out);
    int bad = 0;
    for (int h = 0; h < heads; h++) {
        double s[4096], top = -1e30, total = 0;
        for (int t = 0; t < length; t++) {
            s[t] = 0;
            for (int d = 0; d < dim; d++) s[t] += (double)bf16_to_float(qk[h * dim + d]) * keys[(long)t * dim + d];
            s[t] /= sqrt(dim);
            top = s[t] > top ? s[t] : top;
        }
        for (int t = 0; t < length; t++) total += s[t] = exp(s[t] - top);
        for (int d = 0; d < dim; d++) {
            double want = 0;
            for (int t = 0; t < length; t++) want += s[t] / total * values[(long)t * dim + d];
            bad += fabs(bf16_to_float(out[h * dim + d]) - want) > fabs(want) * 0x1p-7 + 1e-5;
        }
    }
    printf("attend_one length=%d dim=%d: %s\n", length, dim, bad ? "MISMATCH" : "ok");
    free(keys), free(values);
    return bad;
}

int main(void) {
    printf("cpu_kernels self-test: %d float lanes%s, CPU %s\n", W, DOT_BF16 ? ", bf16 dot-products" : "",
           supported() ? "supported" : "NOT supported");
    if (!supported()) return 1;
    use_cores(2);
    int bad = 0;
    for (int V = 1; V <= 4; V *= 2)
        if (V * W <= 64) bad += check_products(1, 64 * 3, 256, V) + check_products(5, 128, 96, V);
    bad += check_products(3, 1024, 1024, 64 / W < 4 ? 64 / W : 4);
#if !DOT_BF16
    bad += check_int8(1, 256, 512, 64 / W < 4 ? 64 / W : 4) + check_int8(5, 64, 96, 1);
#endif
    bad += check_attention(1, 64) + check_attention(37, 128) + check_attention(600, 64);
    printf("%s\n", bad ? "FAILED" : "passed");
    return bad != 0;
}
#endif
