/* A beam step's reorder of key/value rows: row targets[p] takes row sources[p]'s positions
 * starts[p] .. stop - 1, for every pair at once (every source is read before any target is
 * written, through scratch), in every buffer of the list. One pass per buffer, where
 * torch's indexing gathered into a new tensor and scattered back, per buffer, with one
 * start for all pairs (the earliest). */

#include <stdint.h>
#include <string.h>

/* buffers: count (rows, heads, positions, dim) float buffers, contiguous, alike; scratch
 * holds heads * sum over pairs of (stop - starts[p]) * dim floats. */
void copy_spans(float *const *buffers, int64_t count, int64_t row_stride, int64_t head_stride,
                int64_t dim, int64_t heads, const int64_t *sources, const int64_t *targets,
                const int64_t *starts, int64_t pairs, int64_t stop, float *scratch,
                int threads) {
    int64_t offsets[pairs + 1];
    offsets[0] = 0;
    for (int64_t p = 0; p < pairs; p++)
        offsets[p + 1] = offsets[p] + heads * (stop - starts[p]) * dim;
    for (int64_t b = 0; b < count; b++) {
        float *buffer = buffers[b];
        for (int phase = 0; phase < 2; phase++) {
#pragma omp parallel for num_threads(threads) schedule(static)
            for (int64_t item = 0; item < pairs * heads; item++) {
                int64_t p = item / heads, h = item % heads;
                int64_t span = (stop - starts[p]) * dim;
                float *kept = scratch + offsets[p] + h * span;
                int64_t at = h * head_stride + starts[p] * dim;
                if (phase == 0)
                    memcpy(kept, buffer + sources[p] * row_stride + at, span * sizeof(float));
                else
                    memcpy(buffer + targets[p] * row_stride + at, kept, span * sizeof(float));
            }
        }
    }
}
