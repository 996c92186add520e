/* One row through a dense layer on the CPU: out = weight @ x + bias, for a single input row.
 *
 * A single stream's decode step is one row, and there a dense layer is a matrix-vector product bound by how fast
 * the weight streams in from memory. oneDNN and MKL, built for many rows, read a row-major weight at 15-18 GB/s on
 * the machine this was measured on; one sequential pass with the products in independent lanes reads it at 22-24
 * GB/s, close to what summing the same memory reaches.
 *
 * weight: [out_features, in_features], row-major (nn.Linear's layout). Only outputs [first, last) are computed, so
 * callers can split a layer between threads. float32; each output is a dot product over its weight row, summed in
 * LANES interleaved partial sums (the order is fixed, so results do not depend on the split). Built and loaded at
 * run time by dense_kernel.py.
 */
#include <stdint.h>

#define LANES 16

void dense_row(const float *restrict x, const float *restrict weight, const float *restrict bias, float *restrict out,
               int64_t in_features, int64_t first, int64_t last) {
    for (int64_t j = first; j < last; j++) {
        const float *restrict w = weight + j * in_features;
        float partial[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= in_features; i += LANES)
            for (int k = 0; k < LANES; k++) partial[k] += x[i + k] * w[i + k];
        float sum = 0.0f;
        for (int k = 0; k < LANES; k++) sum += partial[k];
        for (; i < in_features; i++) sum += x[i] * w[i];
        out[j] = bias ? sum + bias[j] : sum;
    }
}
