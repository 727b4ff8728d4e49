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

/* out = W in (transpose = 0), or out += W^T in (transpose = 1); W block diagonal [D, D], in/out [D, C]. */
static inline __attribute__((always_inline)) void NAME(rotate)(const REAL *restrict w, const REAL *restrict in,
                                                                REAL *restrict out, int64_t lmax,
                                                                int64_t channels, int transpose) {
    const int64_t dim = (lmax + 1) * (lmax + 1);
    for (int64_t l = 0; l <= lmax; ++l) {
        const int64_t base = l * l, size = 2 * l + 1;
        for (int64_t a = base; a < base + size; ++a) {
            REAL *restrict row = out + a * channels;
            if (!transpose)
                for (int64_t c = 0; c < channels; ++c) row[c] = 0;
            for (int64_t b = base; b < base + size; ++b) {
                const REAL weight = transpose ? w[b * dim + a] : w[a * dim + b];
                const REAL *restrict source = in + b * channels;
                for (int64_t c = 0; c < channels; ++c) row[c] += weight * source[c];
            }
        }
    }
}

/* Scratch of one thread: [D, C] frame input, frame query, frame key, frame value, accumulator; per head the
 * running maximum and sum; per channel the logit of its head, and two factors. */
typedef struct {
    REAL *x_frame, *q_frame, *key, *value, *acc, *running_max, *running_sum, *channel_logit, *shrink, *weight;
} NAME(scratch);

/* One receiver: every incoming edge, and the normalised sum of its values into out[node]. Inlined with
 * constant ``n_channels`` and ``lmax`` below, so that the loops over channels and degrees unroll into a
 * fixed sequence of vector operations. */
static inline __attribute__((always_inline)) void NAME(receiver)(const se3t_attention_args *args, int64_t node,
                                                                  const NAME(scratch) *t, int64_t n_channels,
                                                                  int64_t lmax) {
    const int64_t n_heads = args->n_heads, dim = (lmax + 1) * (lmax + 1);
    const int64_t per_node = dim * n_channels, head_channels = n_channels / n_heads;
    const int64_t n_terms = args->n_terms, n_coef = args->n_coefficients, n_axial = args->n_axial;
    const REAL *envelope = args->envelope, *wigner = args->wigner, *coefficients = args->coefficients;
    const REAL *query = (const REAL *)args->queries + node * per_node, *features = args->features;
    const REAL scale = (REAL)args->scale;
    REAL *restrict x_frame = t->x_frame, *restrict q_frame = t->q_frame, *restrict key = t->key;
    REAL *restrict value = t->value, *restrict acc = t->acc, *restrict channel_logit = t->channel_logit;
    REAL *restrict shrink = t->shrink, *restrict weight = t->weight;

    for (int64_t i = 0; i < per_node; ++i) acc[i] = 0;
    for (int64_t h = 0; h < n_heads; ++h) t->running_max[h] = -INFINITY, t->running_sum[h] = 0;

    for (int64_t k = args->offsets[node]; k < args->offsets[node + 1]; ++k) {
        const int64_t edge = args->order[k];
        const REAL *w = wigner + edge * dim * dim;
        const REAL *coef = coefficients + (edge / args->edges_per_row - args->first_row) * n_coef * 2 * n_channels;
        NAME(rotate)(w, features + args->src[edge] * per_node, x_frame, lmax, n_channels, 0);
        NAME(rotate)(w, query, q_frame, lmax, n_channels, 0);
        for (int64_t i = 0; i < per_node; ++i) key[i] = 0, value[i] = 0;
        for (int64_t term = 0; term < n_terms; ++term) {
            /* terms -|m| share the coefficient of their +|m| term */
            const int64_t s = term < n_coef ? term : n_axial + term - n_coef;
            const REAL *restrict a_key = coef + s * 2 * n_channels, *restrict a_value = a_key + n_channels;
            const REAL *restrict input = x_frame + args->term_row_in[term] * n_channels;
            REAL *restrict k_row = key + args->term_row_out[term] * n_channels;
            REAL *restrict v_row = value + args->term_row_out[term] * n_channels;
            for (int64_t c = 0; c < n_channels; ++c) {
                k_row[c] += a_key[c] * input[c];
                v_row[c] += a_value[c] * input[c];
            }
        }
        /* q . k per channel, then per head (the sum over the head's channels, spread back to them) */
        for (int64_t c = 0; c < n_channels; ++c) channel_logit[c] = 0;
        for (int64_t d = 0; d < dim; ++d)
            for (int64_t c = 0; c < n_channels; ++c) channel_logit[c] += q_frame[d * n_channels + c] * key[d * n_channels + c];
        for (int64_t h = 0; h < n_heads; ++h) {
            REAL logit = 0;
            for (int64_t c = h * head_channels; c < (h + 1) * head_channels; ++c) logit += channel_logit[c];
            logit *= scale;
            REAL factor = 1; /* a new maximum rescales what was accumulated */
            if (logit > t->running_max[h]) {
                factor = EXP(t->running_max[h] - logit);
                t->running_max[h] = logit;
            }
            const REAL p = envelope[edge] * EXP(logit - t->running_max[h]);
            t->running_sum[h] = t->running_sum[h] * factor + p;
            for (int64_t c = h * head_channels; c < (h + 1) * head_channels; ++c) shrink[c] = factor, weight[c] = p;
        }
        /* acc = shrink * acc + D^T (weight * y): the weighted value, rotated back into the lab frame */
        for (int64_t d = 0; d < dim; ++d)
            for (int64_t c = 0; c < n_channels; ++c) {
                acc[d * n_channels + c] *= shrink[c];
                value[d * n_channels + c] *= weight[c];
            }
        NAME(rotate)(w, value, acc, lmax, n_channels, 1);
    }

    REAL *restrict target = (REAL *)args->out + node * per_node;
    for (int64_t h = 0; h < n_heads; ++h) {
        const REAL sum = t->running_sum[h];
        shrink[h] = 1 / (sum > TINY ? sum : TINY);
    }
    for (int64_t d = 0; d < dim; ++d)
        for (int64_t c = 0; c < n_channels; ++c) target[d * n_channels + c] = acc[d * n_channels + c] * shrink[c / head_channels];
}

int NAME(se3t_attention)(const se3t_attention_args *args) {
    const int64_t n_channels = args->channels, n_heads = args->n_heads;
    const int64_t per_node = (args->lmax + 1) * (args->lmax + 1) * n_channels;
    int failed = 0;
#pragma omp parallel reduction(|| : failed)
    {
        REAL *memory = malloc(sizeof(REAL) * (5 * per_node + 2 * n_heads + 3 * n_channels));
        failed = memory == NULL;
        const NAME(scratch) scratch = {
            .x_frame = memory,
            .q_frame = memory + per_node,
            .key = memory + 2 * per_node,
            .value = memory + 3 * per_node,
            .acc = memory + 4 * per_node,
            .running_max = memory + 5 * per_node,
            .running_sum = memory + 5 * per_node + n_heads,
            .channel_logit = memory + 5 * per_node + 2 * n_heads,
            .shrink = memory + 5 * per_node + 2 * n_heads + n_channels,
            .weight = memory + 5 * per_node + 2 * n_heads + 2 * n_channels,
        };
#pragma omp for schedule(dynamic, 4)
        for (int64_t node = args->node_begin; node < args->node_end; ++node) {
            if (failed) continue;
            /* the presets' shapes as constants (32 channels, degrees up to 1, 2, 3); any other works too */
            switch (n_channels == 32 ? args->lmax : -1) {
            case 1: NAME(receiver)(args, node, &scratch, 32, 1); break;
            case 2: NAME(receiver)(args, node, &scratch, 32, 2); break;
            case 3: NAME(receiver)(args, node, &scratch, 32, 3); break;
            default: NAME(receiver)(args, node, &scratch, n_channels, args->lmax);
            }
        }
        free(memory);
    }
    return failed;
}

#undef NAME
#undef CONCAT
#undef CONCAT_
#endif
