/* int8 activations, a scale per row, and the product's scaling back: the operations
 * int8.py would make one by one in torch (abs, amax, div, clamp, div, round, shift,
 * cast; mul, add), each row in one pass. Built with -ffp-contract=off: every operation
 * rounds as torch's does, so the bytes and floats are torch's to the bit. */

#include <float.h>
#include <math.h>
#include <stdint.h>

/* max |row[i]|, i < k. Maxima are exact in any order, so the reduction may be
 * vectorised; finite-math-only lets GCC do it (fmaxf's NaN rule kept it one element
 * at a time, a dependent chain: 1.1 G floats/s, most of the quantization's time). */
__attribute__((optimize("finite-math-only", "no-signed-zeros"))) static float
absmax(const float *row, int64_t k) {
    float top = 0.0f;
    for (int64_t i = 0; i < k; i++) top = fmaxf(top, fabsf(row[i]));
    return top;
}

/* x (n rows, row_stride apart, k each) -> out (n, k) bytes: round(x / scale), plus
 * zero_point (as uint8) or not (as int8), where scale = max|x| / levels (at least
 * FLT_MIN) goes to scales[r]. */
void quantize_rows(const float *x, int64_t n, int64_t k, int64_t row_stride, float levels,
                   int zero_point, void *out, float *scales, int threads) {
#pragma omp parallel for num_threads(threads) if (n * k >= 32768)
    for (int64_t r = 0; r < n; r++) {
        const float *row = x + r * row_stride;
        float scale = fmaxf(absmax(row, k) / levels, FLT_MIN);
        scales[r] = scale;
        if (zero_point) {
            uint8_t *bytes = (uint8_t *)out + r * k;
            for (int64_t i = 0; i < k; i++)
                bytes[i] = (uint8_t)(rintf(row[i] / scale) + (float)zero_point);
        } else {
            int8_t *bytes = (int8_t *)out + r * k;
            for (int64_t i = 0; i < k; i++) bytes[i] = (int8_t)rintf(row[i] / scale);
        }
    }
}

/* out (n, m), in place: each row times scales[r], then plus bias (if any). */
void scale_rows(float *out, int64_t n, int64_t m, const float *scales, const float *bias,
                int threads) {
#pragma omp parallel for num_threads(threads) if (n * m >= 32768)
    for (int64_t r = 0; r < n; r++) {
        float *row = out + r * m;
        float scale = scales[r];
        for (int64_t c = 0; c < m; c++) row[c] = row[c] * scale;
        if (bias)
            for (int64_t c = 0; c < m; c++) row[c] = row[c] + bias[c];
    }
}
