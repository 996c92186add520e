/* Decode attention over the paged KV cache on the CPU: every decoding row of a step in one call.
 *
 * Each row has one query token per head and reads its keys and values through its block table, straight from the
 * head-major cache ([kv_heads, slots, head_dim] for one layer). PyTorch's flash kernel, called once per row and
 * layer, spends more time setting up than reading memory at decode sizes; this reads each key and value once, with
 * the dot products and the exponentials vectorized, and no setup per row.
 *
 * A row may cover only part of its context, [begin, end) in token positions, and merge it with an earlier part's
 * result: that is how rows that share a cached prompt start attend to it once, all of them together, and to their
 * own keys here.
 *
 * float32 throughout, with the softmax in float32 as PyTorch computes it. Built and loaded at run time by
 * decode_kernel.py.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* The run of consecutive slots that holds position `pos` of a row and the positions after it in the same block, up
 * to `end`: its first slot in *slot, its length returned. */
static inline int64_t run_at(const int64_t *table, int64_t block_size, int64_t pos, int64_t end, int64_t *slot) {
    int64_t block = pos / block_size, offset = pos - block * block_size;
    int64_t count = block_size - offset;
    *slot = table[block] * block_size + offset;
    return count < end - pos ? count : end - pos;
}

/* query: [rows, heads, dim] at the given row and head strides (dim contiguous).
 * key, value: one layer of the cache, [kv_heads, slots, dim].
 * tables: [rows, width] block ids; begins, ends: [rows] token positions each row attends to.
 * merge: [rows] or NULL; where 1, out[row] and lse[row] hold an earlier part's output and log-sum-exp on entry,
 * and the result is their softmax-weighted combination with this part.
 * out: [rows, heads, dim]; lse: [rows, heads] or NULL, the log-sum-exp of the scaled scores (both parts).
 * Only rows [row_first, row_last) are computed, so callers can split the rows between threads. */
int paged_decode_attention(const float *query, int64_t query_row_stride, int64_t query_head_stride,
                           const float *key, const float *value, int64_t slots, const int64_t *tables,
                           int64_t width, const int64_t *begins, const int64_t *ends, const int64_t *merge,
                           int64_t row_first, int64_t row_last, int64_t heads, int64_t kv_heads, int64_t dim,
                           int64_t block_size, float scale, float *out, float *lse) {
    int64_t longest = 1;
    for (int64_t r = row_first; r < row_last; r++)
        if (ends[r] - begins[r] > longest) longest = ends[r] - begins[r];
    float *scores = malloc(sizeof(float) * (size_t)(longest + dim));
    if (!scores) return -1;
    float *accumulator = scores + longest;
    int64_t groups = heads / kv_heads;
    for (int64_t r = row_first; r < row_last; r++) {
        const int64_t *table = tables + r * width;
        int64_t begin = begins[r], end = ends[r], n = end - begin;
        for (int64_t h = 0; h < heads; h++) {
            const float *q = query + r * query_row_stride + h * query_head_stride;
            const float *head_keys = key + (h / groups) * slots * dim;
            const float *head_values = value + (h / groups) * slots * dim;
            float *o = out + (r * heads + h) * dim;
            float maximum = -FLT_MAX;
            for (int64_t pos = begin, slot, count; pos < end; pos += count) {
                count = run_at(table, block_size, pos, end, &slot);
                const float *k = head_keys + slot * dim;
                float *run_scores = scores + (pos - begin);
                for (int64_t j = 0; j < count; j++, k += dim) {
                    float s = 0.f;
#pragma omp simd reduction(+ : s)
                    for (int64_t d = 0; d < dim; d++) s += q[d] * k[d];
                    s *= scale;
                    run_scores[j] = s;
                    maximum = s > maximum ? s : maximum;
                }
            }
            float total = 0.f;
#pragma omp simd reduction(+ : total)
            for (int64_t t = 0; t < n; t++) {
                float e = expf(scores[t] - maximum);
                scores[t] = e;
                total += e;
            }
            for (int64_t d = 0; d < dim; d++) accumulator[d] = 0.f;
            for (int64_t pos = begin, slot, count; pos < end; pos += count) {
                count = run_at(table, block_size, pos, end, &slot);
                const float *v = head_values + slot * dim;
                const float *run_scores = scores + (pos - begin);
                for (int64_t j = 0; j < count; j++, v += dim) {
                    float p = run_scores[j];
#pragma omp simd
                    for (int64_t d = 0; d < dim; d++) accumulator[d] += p * v[d];
                }
            }
            float part_lse = n ? maximum + logf(total) : -FLT_MAX;
            float inverse = n ? 1.f / total : 0.f;
            if (merge && merge[r]) {
                /* Two normalized parts, weighted by their shares of the softmax's mass. */
                float before = lse[r * heads + h];
                float top = before > part_lse ? before : part_lse;
                float w_before = expf(before - top), w_part = n ? expf(part_lse - top) : 0.f;
                float norm = 1.f / (w_before + w_part);
                for (int64_t d = 0; d < dim; d++)
                    o[d] = (o[d] * w_before + accumulator[d] * inverse * w_part) * norm;
                lse[r * heads + h] = top + logf(w_before + w_part);
            } else {
                for (int64_t d = 0; d < dim; d++) o[d] = accumulator[d] * inverse;
                if (lse) lse[r * heads + h] = part_lse;
            }
        }
    }
    free(scores);
    return 0;
}
