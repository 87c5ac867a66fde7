/* Decode attention for many rows in one call: one query position per row, each row
 * over its own keys and length. Every (row, head) is computed alone, by the same
 * instructions in the same order whatever else is in the call, so a row's result
 * never depends on the rows beside it (see attention.py).
 *
 * A step of many rows reads far more keys and values than the caches hold (32
 * Blenderbot-400M conversations: 270 MB a step), each (row, head) a few KB apart from
 * the next, which the hardware prefetchers, stopping at every 4 KB page, fetch late:
 * the kernel ran at 12 GB/s of this VM's 23. So while a (row, head) is computed, its
 * thread fetches the next one's keys and values into L2, a position's worth for each
 * position it reads (the same values, fetched sooner: 1.6x the pace here).
 *
 * The head sizes models use most (40, 64) get code of their own, whose loops the
 * compiler unrolls with the query and the sums in registers (``attend_one`` inlined
 * with constant sizes); with AVX2, 16 lanes are two 8-lane halves (``lanes``). On a
 * 2-core AVX2 EPYC both together took a 32-row Blenderbot call from 3.06 to 0.51 ms
 * (``benchmarks/attention_kernel.py``). The softmax's exponential is computed eight
 * lanes at a time (``exp_lanes``): libm's, one at a time, was 30% of such a call.
 *
 * Keys and values are float32 or bfloat16 (``kv_bfloat16``: the cache of a precision
 * that keeps them in half the bytes, ``precision.Precision.cache``), widened to float32
 * as they are loaded: a bfloat16 is a float32's upper half, so widening is exact, and
 * everything after it is the float32 kernel's arithmetic. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef float half_lanes __attribute__((vector_size(32)));

#define LANES 16
#define MAX_DIM 256
#define LINE 64

static inline half_lanes load_half(const float *p) {
    half_lanes x;
    memcpy(&x, p, sizeof x);
    return x;
}

/* 8 bfloat16s widened to float32: each one's bits become a float's upper half. With
 * AVX2 by intrinsics: GCC 12 lowers a vector conversion of 16-bit lanes in 128-bit
 * pieces (six instructions where vpmovzxwd and a shift do). */
#ifdef __AVX2__
static inline half_lanes load_half_bfloat16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return (half_lanes)_mm256_slli_epi32(wide, 16);
}
#else
typedef uint16_t half_shorts __attribute__((vector_size(16)));
typedef uint32_t half_words __attribute__((vector_size(32)));

static inline half_lanes load_half_bfloat16(const uint16_t *p) {
    half_shorts x;
    memcpy(&x, p, sizeof x);
    half_words wide = __builtin_convertvector(x, half_words) << 16;
    half_lanes y;
    memcpy(&y, &wide, sizeof y);
    return y;
}
#endif

/* 16 lanes: one register with AVX-512; two halves with AVX2, where GCC lowered a
 * 64-byte vector's scalar products and sums through memory, 2.5x slower. The same
 * operations on the same lanes either way. */
#ifdef __AVX512F__
typedef float lanes __attribute__((vector_size(64)));

static inline lanes zero_lanes(void) { return (lanes){0}; }

static inline lanes load(const float *p) {
    lanes x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline lanes load_bfloat16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return (lanes)_mm512_slli_epi32(wide, 16);
}

static inline lanes add_product(lanes sum, lanes a, lanes b) { return sum + a * b; }

static inline lanes add_scaled(lanes sum, float s, lanes b) { return sum + s * b; }

/* x + low in the first 8 lanes. */
static inline lanes add_low(lanes x, half_lanes low) {
    return x + __builtin_shufflevector(low, (half_lanes){0}, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                       11, 12, 13, 14, 15);
}

static inline void store_scaled(float *out, lanes x, float s) {
    x *= s;
    memcpy(out, &x, sizeof x);
}

/* The 8 sums of lane i and lane i + 8. */
static inline half_lanes fold(lanes x) {
    x += __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
}
#else
typedef struct {
    half_lanes low, high;
} lanes;

static inline lanes zero_lanes(void) { return (lanes){{0}, {0}}; }

static inline lanes load(const float *p) { return (lanes){load_half(p), load_half(p + 8)}; }

static inline lanes load_bfloat16(const uint16_t *p) {
    return (lanes){load_half_bfloat16(p), load_half_bfloat16(p + 8)};
}

static inline lanes add_product(lanes sum, lanes a, lanes b) {
    return (lanes){sum.low + a.low * b.low, sum.high + a.high * b.high};
}

static inline lanes add_scaled(lanes sum, float s, lanes b) {
    return (lanes){sum.low + s * b.low, sum.high + s * b.high};
}

static inline lanes add_low(lanes x, half_lanes low) { return (lanes){x.low + low, x.high}; }

static inline void store_scaled(float *out, lanes x, float s) {
    half_lanes low = x.low * s, high = x.high * s;
    memcpy(out, &low, sizeof low);
    memcpy(out + 8, &high, sizeof high);
}

static inline half_lanes fold(lanes x) { return x.low + x.high; }
#endif

/* The sum of a vector's lanes, halves added to halves: the same order on every CPU. */
static inline float lane_sum(lanes x) {
    half_lanes y = fold(x);
    y += __builtin_shufflevector(y, y, 4, 5, 6, 7, 0, 1, 2, 3);
    y += __builtin_shufflevector(y, y, 2, 3, 0, 1, 2, 3, 0, 1);
    return y[0] + y[1];
}

/* Element i of a key or value row, float32 or bfloat16 (a constant where inlined). */
static inline lanes load_kv(const void *row, int64_t i, int bfloat16) {
    return bfloat16 ? load_bfloat16((const uint16_t *)row + i) : load((const float *)row + i);
}

static inline half_lanes load_kv_half(const void *row, int64_t i, int bfloat16) {
    return bfloat16 ? load_half_bfloat16((const uint16_t *)row + i)
                    : load_half((const float *)row + i);
}

/* A head of dim = 16 * blocks (+ 8 when half): its vectors, loaded or summed. */
typedef struct {
    lanes full[MAX_DIM / LANES];
    half_lanes half;
} head;

/* q . key: each lane's products summed in order, then the lanes (the half's added to
 * the first 8 lanes first). */
static inline float dot(const head *q, const void *key, int64_t blocks, int half, int bfloat16) {
    lanes part = zero_lanes();
    for (int64_t b = 0; b < blocks; b++)
        part = add_product(part, q->full[b], load_kv(key, LANES * b, bfloat16));
    if (half) part = add_low(part, q->half * load_kv_half(key, LANES * blocks, bfloat16));
    return lane_sum(part);
}

typedef int32_t half_ints __attribute__((vector_size(32)));

/* e^x for 8 lanes of x <= 0 (a score less the row's top): Cephes' expf, 2^n times a
 * degree-6 polynomial of the remainder, within 2 ulp of libm's expf (NaN stays NaN),
 * and about 1.2e-38 (not 0) for x below -87.3, where a softmax weight is nothing
 * anyway. The same instructions for every (row, head): a row's softmax still never
 * depends on the rows beside it. */
static inline half_lanes exp_lanes(half_lanes x) {
    const half_lanes lowest = {-87.33654f, -87.33654f, -87.33654f, -87.33654f,
                               -87.33654f, -87.33654f, -87.33654f, -87.33654f};
    half_ints below = x < lowest;
    x = (half_lanes)(((half_ints)lowest & below) | ((half_ints)x & ~below));
    half_lanes near = x * 1.44269504088896341f + 0.5f; /* x / ln 2, rounded below */
    half_lanes n = __builtin_convertvector(__builtin_convertvector(near, half_ints), half_lanes);
    n += __builtin_convertvector(n > near, half_lanes); /* truncated up: one less */
    half_lanes r = x - n * 0.693359375f + n * 2.12194440e-4f;
    half_lanes poly = 1.9875691500e-4f * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    half_lanes y = poly * r * r + r + 1.0f;
    half_ints bits = (__builtin_convertvector(n, half_ints) + 127) << 23;
    return y * (half_lanes)bits;
}

/* scores[0..length) = e^(scores[j] - top), eight at a time (the last ones padded);
 * returns their sum, taken in order. */
static inline float exp_shifted(float *scores, int64_t length, float top) {
    float total = 0.0f;
    int64_t j = 0;
    for (; j + 8 <= length; j += 8) {
        half_lanes e = exp_lanes(load_half(scores + j) - top);
        memcpy(scores + j, &e, sizeof e);
        for (int i = 0; i < 8; i++) total += e[i];
    }
    if (j < length) {
        float chunk[8] = {0};
        for (int64_t i = j; i < length; i++) chunk[i - j] = scores[i];
        half_lanes e = exp_lanes(load_half(chunk) - top);
        for (int64_t i = j; i < length; i++) total += scores[i] = e[i - j];
    }
    return total;
}

/* Fetch [at, at + bytes) into L2, for a later read. */
static inline void fetch(const char *at, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += LINE)
        __builtin_prefetch((const char *)at + offset, 0, 2);
}

/* softmax(scale * q . k[0..length)) . v[0..length) into out; dim = 16 * blocks (+ 8);
 * k and v hold float32 or bfloat16 (2 bytes) elements, position_stride bytes apart.
 * Position j of next_k and next_v (the next item's keys and values) is fetched as
 * position j here is read. */
static inline __attribute__((always_inline)) void attend_one(
    const float *q, const char *k, const char *v, int64_t position_stride, int64_t length,
    int64_t blocks, int half, int bfloat16, float scale, float *scores, float *out,
    const char *next_k, const char *next_v) {
    int64_t bytes = (LANES * blocks + 8 * half) * (bfloat16 ? 2 : (int64_t)sizeof(float));
    head query, sums;
    for (int64_t b = 0; b < blocks; b++) {
        query.full[b] = load(q + LANES * b);
        sums.full[b] = zero_lanes();
    }
    query.half = half ? load_half(q + LANES * blocks) : (half_lanes){0};
    sums.half = (half_lanes){0};
    float top = -INFINITY;
    for (int64_t j = 0; j < length; j++) {
        fetch(next_k + j * position_stride, bytes);
        scores[j] = dot(&query, k + j * position_stride, blocks, half, bfloat16) * scale;
        top = scores[j] > top ? scores[j] : top;
    }
    float total = exp_shifted(scores, length, top);
    for (int64_t j = 0; j < length; j++) {
        const char *value = v + j * position_stride;
        fetch(next_v + j * position_stride, bytes);
        for (int64_t b = 0; b < blocks; b++)
            sums.full[b] = add_scaled(sums.full[b], scores[j], load_kv(value, LANES * b, bfloat16));
        if (half) sums.half += scores[j] * load_kv_half(value, LANES * blocks, bfloat16);
    }
    float inverse = 1.0f / total;
    for (int64_t b = 0; b < blocks; b++) store_scaled(out + LANES * b, sums.full[b], inverse);
    if (half) {
        half_lanes scaled = sums.half * inverse;
        memcpy(out + LANES * blocks, &scaled, sizeof scaled);
    }
}

/* out[r, h] = attention of query[r, h] over keys/values[rows[r], h / group, 0..lengths[r]).
 * dim is a multiple of 8, up to 256; keys and values are float32, or bfloat16 where
 * kv_bfloat16; strides are in elements; out is (n, heads, dim), contiguous; scratch
 * holds threads times
 * the longest length. A thread takes items (row, head) in runs of up to 16, so that
 * the item it fetches ahead is mostly its own next. */
void attend_rows(const float *query, int64_t query_row, int64_t query_head, const void *keys,
                 const void *values, int kv_bfloat16, int64_t kv_row, int64_t kv_head,
                 int64_t kv_position, const int64_t *rows, const int64_t *lengths, int64_t n,
                 int64_t heads, int64_t group, int64_t dim, float scale, float *out,
                 int threads, float *scratch, int64_t longest) {
    int64_t size = kv_bfloat16 ? 2 : (int64_t)sizeof(float);
    const char *k = keys, *v = values;
    int64_t items = n * heads, run = items / (4 * (int64_t)threads);
    run = run < 1 ? 1 : run > 16 ? 16 : run;
#pragma omp parallel num_threads(threads)
    {
        float *scores = scratch + omp_get_thread_num() * longest;
#pragma omp for schedule(dynamic, run)
        for (int64_t item = 0; item < items; item++) {
            int64_t r = item / heads, h = item % heads;
            int64_t at = (rows[r] * kv_row + (h / group) * kv_head) * size;
            int64_t next = item + 1 < items ? item + 1 : item;
            int64_t next_at = (rows[next / heads] * kv_row + (next % heads / group) * kv_head) * size;
            const float *q = query + r * query_row + h * query_head;
#define ATTEND(blocks, half, bfloat16)                                                          \
    attend_one(q, k + at, v + at, kv_position * size, lengths[r], blocks, half, bfloat16, scale, \
               scores, out + item * dim, k + next_at, v + next_at)
#define ATTEND_ANY(bfloat16)                                                       \
    if (dim == 40) /* Blenderbot's heads */                                        \
        ATTEND(2, 1, bfloat16);                                                    \
    else if (dim == 64) /* SmolLM2's and Llama's */                                \
        ATTEND(4, 0, bfloat16);                                                    \
    else                                                                           \
        ATTEND(dim / LANES, dim % LANES != 0, bfloat16)
            if (kv_bfloat16) {
                ATTEND_ANY(1);
            } else {
                ATTEND_ANY(0);
            }
#undef ATTEND_ANY
#undef ATTEND
        }
    }
}
