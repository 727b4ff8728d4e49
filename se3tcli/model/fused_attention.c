/* Fused CPU inference of one equivariant attention layer (depthwise kernels): for every receiver i, over
 * its incoming edges e = (j -> i), in that edge's own frame,
 *
 *   x_e   = D(R_e) x_j                        rotate the neighbour's features into the frame
 *   k_e   = a_key  (.) x_e                     frame key: one coefficient per term (T terms, S coefficients)
 *   y_e   = a_value (.) x_e                    frame value
 *   l_e,h = (D(R_e) q_i) . k_e / sqrt(d)       the logit of head h (q . k is invariant: rotate q, not k)
 *   v_e   = D(R_e)^T y_e                       the value back in the lab frame
 *
 * and the envelope-weighted softmax of the logits over the receiver's edges, accumulated online (running
 * maximum, rescaled sums), so that no per-edge tensor ever leaves the cache. Same math as the PyTorch path
 * in se3tcli/model/convolution.py and attention.py; the Python side (fused_cpu.py) computes the frame
 * coefficients with one matrix product per block of edges and calls this once per block; the receivers
 * of a block are shared between the OpenMP threads (PyTorch's own pool where it uses libgomp).
 *
 * Layouts (all contiguous, channels last): features [n, D, C] with D = (lmax + 1)^2; Wigner matrices
 * [E, D, D] (block diagonal by degree); coefficients [rows, S, 2, C] (key, value), edge e reading row
 * e / edges_per_row - first_row. The file includes itself once per floating-point type.
 */
#ifndef REAL

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    int64_t lmax, channels, n_heads;
    int64_t n_terms, n_coefficients, n_axial;  /* T, S, and the S coefficients with |m| = 0 */
    const int64_t *term_row_in, *term_row_out; /* [T]: the row of D(R) each term reads / writes */
    const int64_t *src;                        /* [E] neighbour j of each edge */
    const int64_t *order, *offsets;            /* edges sorted by receiver; receiver i: order[offsets[i]:offsets[i+1]] */
    const void *envelope;                      /* [E] */
    const void *wigner;                        /* [E, D, D] */
    const void *coefficients;                  /* [rows, S, 2, C] */
    int64_t edges_per_row, first_row;
    const void *features, *queries;            /* [n, D, C] */
    void *out;                                 /* [n, D, C]: the softmax-weighted sum of values */
    double scale;                              /* 1 / sqrt(head channels * D) */
    int64_t node_begin, node_end;              /* the receivers this call writes */
} se3t_attention_args;

#define REAL float
#define SUFFIX f32
#define EXP expf
#define TINY FLT_MIN
#include __FILE__
#undef REAL
#undef SUFFIX
#undef EXP
#undef TINY

#define REAL double
#define SUFFIX f64
#define EXP exp
#define TINY DBL_MIN
#include __FILE__

#else /* the body, once per REAL */

#define CONCAT_(a, b) a##_##b
#define CONCAT(a, b) CONCAT_(a, b)
#define NAME(name) CONCAT(name, SUFFIX)

/* out = W in (transpose = 0) or W^T in (transpose = 1), W block diagonal [D, D], in/out [D, C]. */
static void NAME(rotate)(const REAL *restrict w, const REAL *restrict in, REAL *restrict out, int64_t lmax,
                         int64_t channels, int transpose) {
    const int64_t dim = (lmax + 1) * (lmax + 1);
    for (int64_t l = 0; l <= lmax; ++l) {
        const int64_t base = l * l, size = 2 * l + 1;
        for (int64_t a = base; a < base + size; ++a) {
            REAL *restrict row = out + a * channels;
            for (int64_t c = 0; c < channels; ++c) row[c] = 0;
            for (int64_t b = base; b < base + size; ++b) {
                const REAL weight = transpose ? w[b * dim + a] : w[a * dim + b];
                const REAL *restrict source = in + b * channels;
                for (int64_t c = 0; c < channels; ++c) row[c] += weight * source[c];
            }
        }
    }
}

int NAME(se3t_attention)(const se3t_attention_args *args) {
    const int64_t lmax = args->lmax, n_channels = args->channels, n_heads = args->n_heads;
    const int64_t dim = (lmax + 1) * (lmax + 1), per_node = dim * n_channels;
    const int64_t head_channels = n_channels / n_heads;
    const int64_t n_terms = args->n_terms, n_coef = args->n_coefficients, n_axial = args->n_axial;
    const REAL *envelope = args->envelope, *wigner = args->wigner, *coefficients = args->coefficients;
    const REAL *features = args->features, *queries = args->queries;
    REAL *out = args->out;
    const REAL scale = (REAL)args->scale;

    int failed = 0;
#pragma omp parallel reduction(|| : failed)
    {
    /* frame input (then the value in the lab frame), frame query, frame key, frame value, accumulator: [D, C]
     * each, and per head the running maximum, running sum and logit */
    REAL *scratch = malloc(sizeof(REAL) * (5 * per_node + 3 * n_heads));
    failed = scratch == NULL;
    REAL *x_frame = scratch, *q_frame = x_frame + per_node, *key = q_frame + per_node;
    REAL *value = key + per_node, *acc = value + per_node;
    REAL *running_max = acc + per_node, *running_sum = running_max + n_heads, *logit = running_sum + n_heads;

#pragma omp for schedule(dynamic, 4)
    for (int64_t node = args->node_begin; node < args->node_end; ++node) {
        if (failed) continue;
        for (int64_t i = 0; i < per_node; ++i) acc[i] = 0;
        for (int64_t h = 0; h < n_heads; ++h) running_max[h] = -INFINITY, running_sum[h] = 0;
        const REAL *query = queries + node * per_node;

        for (int64_t k = args->offsets[node]; k < args->offsets[node + 1]; ++k) {
            const int64_t edge = args->order[k];
            const REAL *w = wigner + edge * dim * dim;
            const REAL *coef = coefficients + (edge / args->edges_per_row - args->first_row) * n_coef * 2 * n_channels;
            NAME(rotate)(w, features + args->src[edge] * per_node, x_frame, lmax, n_channels, 0);
            NAME(rotate)(w, query, q_frame, lmax, n_channels, 0);
            for (int64_t i = 0; i < per_node; ++i) key[i] = 0, value[i] = 0;
            for (int64_t t = 0; t < n_terms; ++t) {
                const int64_t s = t < n_coef ? t : n_axial + t - n_coef; /* terms -|m| share their +|m| coefficient */
                const REAL *restrict a_key = coef + s * 2 * n_channels, *restrict a_value = a_key + n_channels;
                const REAL *restrict input = x_frame + args->term_row_in[t] * n_channels;
                REAL *restrict k_row = key + args->term_row_out[t] * n_channels;
                REAL *restrict v_row = value + args->term_row_out[t] * n_channels;
                for (int64_t c = 0; c < n_channels; ++c) {
                    k_row[c] += a_key[c] * input[c];
                    v_row[c] += a_value[c] * input[c];
                }
            }
            for (int64_t h = 0; h < n_heads; ++h) {
                REAL dot = 0;
                for (int64_t d = 0; d < dim; ++d) {
                    const REAL *restrict q_row = q_frame + d * n_channels + h * head_channels;
                    const REAL *restrict k_row = key + d * n_channels + h * head_channels;
                    for (int64_t c = 0; c < head_channels; ++c) dot += q_row[c] * k_row[c];
                }
                logit[h] = dot * scale;
            }
            NAME(rotate)(w, value, x_frame, lmax, n_channels, 1); /* x_frame now holds v in the lab frame */

            for (int64_t h = 0; h < n_heads; ++h) {
                if (logit[h] > running_max[h]) { /* a new maximum: rescale what was accumulated */
                    const REAL shrink = EXP(running_max[h] - logit[h]);
                    running_sum[h] *= shrink;
                    for (int64_t d = 0; d < dim; ++d) {
                        REAL *restrict row = acc + d * n_channels + h * head_channels;
                        for (int64_t c = 0; c < head_channels; ++c) row[c] *= shrink;
                    }
                    running_max[h] = logit[h];
                }
                const REAL weight = envelope[edge] * EXP(logit[h] - running_max[h]);
                running_sum[h] += weight;
                for (int64_t d = 0; d < dim; ++d) {
                    REAL *restrict row = acc + d * n_channels + h * head_channels;
                    const REAL *restrict v_row = x_frame + d * n_channels + h * head_channels;
                    for (int64_t c = 0; c < head_channels; ++c) row[c] += weight * v_row[c];
                }
            }
        }

        REAL *target = out + node * per_node;
        for (int64_t h = 0; h < n_heads; ++h) {
            const REAL norm = 1 / (running_sum[h] > TINY ? running_sum[h] : TINY);
            for (int64_t d = 0; d < dim; ++d)
                for (int64_t c = h * head_channels; c < (h + 1) * head_channels; ++c)
                    target[d * n_channels + c] = acc[d * n_channels + c] * norm;
        }
    }
    free(scratch);
    }
    return failed;
}

#undef NAME
#undef CONCAT
#undef CONCAT_
#endif
