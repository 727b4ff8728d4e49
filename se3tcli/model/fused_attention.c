/* Fused CPU forward and backward of one equivariant attention layer (depthwise kernels): for every
 * receiver i, over its incoming edges e = (j -> i), in that edge's own frame,
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
 * Training saves the running maximum and sum of every receiver and head; the backward recomputes each
 * edge's frame quantities from them (as flash attention does) and never stores a per-edge tensor but the
 * gradient of the edge's frame coefficients.
 *
 * Layouts (all contiguous, channels last): features [n, D, C] with D = (lmax + 1)^2; Wigner matrices
 * [E, D, D] (block diagonal by degree); coefficients [rows, S, 2, C] (key, value), edge e reading row
 * e / edges_per_row - first_row. The file includes itself once per floating-point type.
 */
#ifndef REAL

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <omp.h>
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
    void *stats;                               /* [n, 2, H]: running maximum and sum (training), or NULL */
    int64_t n_threads;                         /* OpenMP threads (PyTorch's number) */
} se3t_attention_args;

typedef struct {
    const void *grad_out, *out, *stats;        /* [n, D, C], [n, D, C], [n, 2, H] of the forward */
    void *grad_features;                       /* [threads, n, D, C]: each thread's share, summed by the caller */
    void *grad_queries;                        /* [n, D, C] */
    void *grad_coefficients;                   /* [edges of the call, S, 2, C]: edge e at e - first_row * edges_per_row */
    int64_t n_nodes;
} se3t_attention_grads;

/* The sizes of the two structures: fused_cpu checks them against its ctypes mirrors when it loads the library. */
size_t se3t_args_size(void) { return sizeof(se3t_attention_args); }
size_t se3t_grads_size(void) { return sizeof(se3t_attention_grads); }

/* The coefficient s of frame term t: terms -|m| (t >= S) share the coefficient of their +|m| term. */
static inline int64_t term_coefficient(const se3t_attention_args *args, int64_t term) {
    return term < args->n_coefficients ? term : args->n_axial + term - args->n_coefficients;
}

/* The row of the call's coefficient block that edge e reads (both edges of a reverse pair share one). */
static inline int64_t coefficient_row(const se3t_attention_args *args, int64_t edge) {
    return edge / args->edges_per_row - args->first_row;
}

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

/* A vector of 64 bytes (16 floats or 8 doubles), unaligned loads and stores allowed. */
typedef REAL NAME(vec) __attribute__((vector_size(64), aligned(sizeof(REAL)), may_alias));
#define LANES ((int64_t)(64 / sizeof(REAL)))
#define MAX_VECTORS 8 /* rows of up to 8 vectors (128 float or 64 double channels) take the vector path */

/* out = W in (transpose = 0), or out += W^T in (transpose = 1); W block diagonal [D, D], in/out [D, C].
 * Rows of whole vectors are summed in registers (a constant channel count unrolls the vector loop). */
static inline __attribute__((always_inline)) void NAME(rotate)(const REAL *restrict w, const REAL *restrict in,
                                                                REAL *restrict out, int64_t lmax,
                                                                int64_t channels, int transpose) {
    const int64_t dim = (lmax + 1) * (lmax + 1), n_vec = channels / LANES;
    const int vector_rows = channels % LANES == 0 && n_vec <= MAX_VECTORS;
    for (int64_t l = 0; l <= lmax; ++l) {
        const int64_t base = l * l, size = 2 * l + 1;
        for (int64_t a = base; a < base + size; ++a) {
            REAL *restrict row = out + a * channels;
            if (vector_rows) {
                NAME(vec) sum[MAX_VECTORS];
                for (int64_t v = 0; v < n_vec; ++v)
                    sum[v] = transpose ? ((NAME(vec) *)row)[v] : (NAME(vec)){0};
                for (int64_t b = base; b < base + size; ++b) {
                    const REAL weight = transpose ? w[b * dim + a] : w[a * dim + b];
                    const NAME(vec) *source = (const NAME(vec) *)(in + b * channels);
                    for (int64_t v = 0; v < n_vec; ++v) sum[v] += weight * source[v];
                }
                for (int64_t v = 0; v < n_vec; ++v) ((NAME(vec) *)row)[v] = sum[v];
                continue;
            }
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

/* Scratch of one thread: [D, C] arrays; per head the running maximum and sum and the logit; per channel the
 * logit of its head and two factors. The backward adds the gradients of its [D, C] arrays. */
typedef struct {
    REAL *x_frame, *q_frame, *key, *value, *acc, *running_max, *running_sum, *logit, *channel_logit, *shrink,
        *weight;
    REAL *g_frame, *grad_key, *grad_value, *grad_x_frame, *grad_query;
} NAME(scratch);

static NAME(scratch) NAME(scratch_alloc)(int64_t per_node, int64_t n_heads, int64_t n_channels) {
    REAL *m = calloc(10 * per_node + 3 * n_heads + 3 * n_channels, sizeof(REAL));
    NAME(scratch) t = {0};
    if (!m) return t;
    REAL **dims[] = {&t.x_frame, &t.q_frame, &t.key, &t.value, &t.acc,
                     &t.g_frame, &t.grad_key, &t.grad_value, &t.grad_x_frame, &t.grad_query};
    for (int i = 0; i < 10; ++i) *dims[i] = m + i * per_node;
    t.running_max = m + 10 * per_node, t.running_sum = t.running_max + n_heads, t.logit = t.running_sum + n_heads;
    t.channel_logit = t.logit + n_heads, t.shrink = t.channel_logit + n_channels, t.weight = t.shrink + n_channels;
    return t;
}

/* The frame quantities of one edge: x_frame, q_frame, key, value (frame) and the logit of every head. */
static inline __attribute__((always_inline)) void NAME(edge_frame)(const se3t_attention_args *args, int64_t edge,
                                                                    const REAL *query, const NAME(scratch) *t,
                                                                    int64_t n_channels, int64_t lmax) {
    const int64_t n_heads = args->n_heads, dim = (lmax + 1) * (lmax + 1), per_node = dim * n_channels;
    const int64_t head_channels = n_channels / n_heads;
    const int64_t per_row = args->n_coefficients * 2 * n_channels; /* [S, 2, C] */
    const REAL *w = (const REAL *)args->wigner + edge * dim * dim;
    const REAL *coef = (const REAL *)args->coefficients + coefficient_row(args, edge) * per_row;
    REAL *restrict x_frame = t->x_frame, *restrict key = t->key, *restrict value = t->value;
    NAME(rotate)(w, (const REAL *)args->features + args->src[edge] * per_node, x_frame, lmax, n_channels, 0);
    NAME(rotate)(w, query, t->q_frame, lmax, n_channels, 0);
    for (int64_t i = 0; i < per_node; ++i) key[i] = 0, value[i] = 0;
    for (int64_t term = 0; term < args->n_terms; ++term) {
        const int64_t s = term_coefficient(args, term);
        const REAL *restrict a_key = coef + s * 2 * n_channels, *restrict a_value = a_key + n_channels;
        const REAL *restrict input = x_frame + args->term_row_in[term] * n_channels;
        REAL *restrict k_row = key + args->term_row_out[term] * n_channels;
        REAL *restrict v_row = value + args->term_row_out[term] * n_channels;
        for (int64_t c = 0; c < n_channels; ++c) {
            k_row[c] += a_key[c] * input[c];
            v_row[c] += a_value[c] * input[c];
        }
    }
    /* q . k per channel, then per head */
    REAL *restrict channel_logit = t->channel_logit;
    for (int64_t c = 0; c < n_channels; ++c) channel_logit[c] = 0;
    for (int64_t d = 0; d < dim; ++d)
        for (int64_t c = 0; c < n_channels; ++c)
            channel_logit[c] += t->q_frame[d * n_channels + c] * key[d * n_channels + c];
    for (int64_t h = 0; h < n_heads; ++h) {
        REAL logit = 0;
        for (int64_t c = h * head_channels; c < (h + 1) * head_channels; ++c) logit += channel_logit[c];
        t->logit[h] = logit * (REAL)args->scale;
    }
}

/* One receiver: every incoming edge, and the normalised sum of its values into out[node]. Inlined with
 * constant ``n_channels`` and ``lmax`` below, so that the loops over channels and degrees unroll into a
 * fixed sequence of vector operations. */
static inline __attribute__((always_inline)) void NAME(receiver)(const se3t_attention_args *args, int64_t node,
                                                                  const NAME(scratch) *t, int64_t n_channels,
                                                                  int64_t lmax) {
    const int64_t n_heads = args->n_heads, dim = (lmax + 1) * (lmax + 1);
    const int64_t per_node = dim * n_channels, head_channels = n_channels / n_heads;
    const REAL *envelope = args->envelope, *query = (const REAL *)args->queries + node * per_node;
    REAL *restrict acc = t->acc, *restrict value = t->value, *restrict shrink = t->shrink, *restrict weight = t->weight;

    for (int64_t i = 0; i < per_node; ++i) acc[i] = 0;
    for (int64_t h = 0; h < n_heads; ++h) t->running_max[h] = -INFINITY, t->running_sum[h] = 0;

    for (int64_t k = args->offsets[node]; k < args->offsets[node + 1]; ++k) {
        const int64_t edge = args->order[k];
        NAME(edge_frame)(args, edge, query, t, n_channels, lmax);
        for (int64_t h = 0; h < n_heads; ++h) {
            const REAL logit = t->logit[h];
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
        NAME(rotate)((const REAL *)args->wigner + edge * dim * dim, value, acc, lmax, n_channels, 1);
    }

    REAL *restrict target = (REAL *)args->out + node * per_node;
    for (int64_t h = 0; h < n_heads; ++h) {
        const REAL sum = t->running_sum[h];
        shrink[h] = 1 / (sum > TINY ? sum : TINY);
    }
    for (int64_t d = 0; d < dim; ++d)
        for (int64_t c = 0; c < n_channels; ++c)
            target[d * n_channels + c] = acc[d * n_channels + c] * shrink[c / head_channels];
    if (args->stats) {
        REAL *stats = (REAL *)args->stats + node * 2 * n_heads;
        for (int64_t h = 0; h < n_heads; ++h) stats[h] = t->running_max[h], stats[n_heads + h] = t->running_sum[h];
    }
}

/* The backward of one receiver i with output gradient G: for each edge, with a_e,h = p_e,h / S_h,
 *   dy = a (.) D G,  d a_e,h = (D G) . y over the head,  dl = a (d a - sum_e' a_e' d a_e') and
 *   sum_e' a_e' d a_e' = G . out_i over the head;
 *   dk = scale dl q_frame, dq_frame = scale dl k; then through the products and the rotations. */
static inline __attribute__((always_inline)) void NAME(receiver_backward)(const se3t_attention_args *args,
                                                                           const se3t_attention_grads *grads,
                                                                           int64_t node, const NAME(scratch) *t,
                                                                           REAL *grad_features, int64_t n_channels,
                                                                           int64_t lmax) {
    const int64_t n_heads = args->n_heads, dim = (lmax + 1) * (lmax + 1);
    const int64_t per_node = dim * n_channels, head_channels = n_channels / n_heads;
    const int64_t per_row = args->n_coefficients * 2 * n_channels; /* [S, 2, C] */
    const REAL *envelope = args->envelope, *query = (const REAL *)args->queries + node * per_node;
    const REAL *grad_out = (const REAL *)grads->grad_out + node * per_node;
    const REAL *out = (const REAL *)grads->out + node * per_node;
    const REAL *stats = (const REAL *)grads->stats + node * 2 * n_heads;
    REAL *restrict g_frame = t->g_frame, *restrict grad_key = t->grad_key, *restrict grad_value = t->grad_value;
    REAL *restrict grad_x_frame = t->grad_x_frame, *restrict grad_query = t->grad_query;
    REAL *restrict alpha = t->weight, *restrict grad_logit = t->shrink, *restrict delta = t->running_sum;

    for (int64_t h = 0; h < n_heads; ++h) { /* delta_h = G . out over the head */
        REAL sum = 0;
        for (int64_t d = 0; d < dim; ++d)
            for (int64_t c = h * head_channels; c < (h + 1) * head_channels; ++c)
                sum += grad_out[d * n_channels + c] * out[d * n_channels + c];
        /* a clamped denominator (sum <= TINY) is a constant: the forward's out = acc / TINY has no delta term */
        delta[h] = stats[n_heads + h] > TINY ? sum : 0;
    }
    for (int64_t i = 0; i < per_node; ++i) grad_query[i] = 0;

    for (int64_t k = args->offsets[node]; k < args->offsets[node + 1]; ++k) {
        const int64_t edge = args->order[k];
        const REAL *w = (const REAL *)args->wigner + edge * dim * dim;
        NAME(edge_frame)(args, edge, query, t, n_channels, lmax);
        NAME(rotate)(w, grad_out, g_frame, lmax, n_channels, 0);
        for (int64_t h = 0; h < n_heads; ++h) {
            const REAL sum = stats[n_heads + h];
            const REAL a = envelope[edge] * EXP(t->logit[h] - stats[h]) / (sum > TINY ? sum : TINY);
            REAL grad_alpha = 0;
            for (int64_t d = 0; d < dim; ++d)
                for (int64_t c = h * head_channels; c < (h + 1) * head_channels; ++c)
                    grad_alpha += g_frame[d * n_channels + c] * t->value[d * n_channels + c];
            const REAL dl = a * (grad_alpha - delta[h]) * (REAL)args->scale;
            for (int64_t c = h * head_channels; c < (h + 1) * head_channels; ++c) alpha[c] = a, grad_logit[c] = dl;
        }
        for (int64_t d = 0; d < dim; ++d)
            for (int64_t c = 0; c < n_channels; ++c) {
                const int64_t i = d * n_channels + c;
                grad_value[i] = alpha[c] * g_frame[i];
                grad_key[i] = grad_logit[c] * t->q_frame[i];
                t->q_frame[i] = grad_logit[c] * t->key[i]; /* now the gradient of q_frame */
                grad_x_frame[i] = 0;
            }
        NAME(rotate)(w, t->q_frame, grad_query, lmax, n_channels, 1);

        REAL *grad_coef = (REAL *)grads->grad_coefficients + (edge - args->first_row * args->edges_per_row) * per_row;
        for (int64_t i = 0; i < per_row; ++i) grad_coef[i] = 0;
        const REAL *coef = (const REAL *)args->coefficients + coefficient_row(args, edge) * per_row;
        for (int64_t term = 0; term < args->n_terms; ++term) {
            const int64_t s = term_coefficient(args, term);
            const REAL *restrict a_key = coef + s * 2 * n_channels, *restrict a_value = a_key + n_channels;
            REAL *restrict g_key = grad_coef + s * 2 * n_channels, *restrict g_value = g_key + n_channels;
            const REAL *restrict input = t->x_frame + args->term_row_in[term] * n_channels;
            REAL *restrict g_input = grad_x_frame + args->term_row_in[term] * n_channels;
            const REAL *restrict dk = grad_key + args->term_row_out[term] * n_channels;
            const REAL *restrict dv = grad_value + args->term_row_out[term] * n_channels;
            for (int64_t c = 0; c < n_channels; ++c) {
                g_input[c] += a_key[c] * dk[c] + a_value[c] * dv[c];
                g_key[c] += dk[c] * input[c];
                g_value[c] += dv[c] * input[c];
            }
        }
        NAME(rotate)(w, grad_x_frame, grad_features + args->src[edge] * per_node, lmax, n_channels, 1);
    }
    REAL *restrict target = (REAL *)grads->grad_queries + node * per_node;
    for (int64_t i = 0; i < per_node; ++i) target[i] = grad_query[i];
}

/* Dispatch: the presets' shapes (32 channels, degrees up to 1, 2, 3) as constants; any other works too. */
#define SPECIALISED(call, ...)                                                                                 \
    switch (args->channels == 32 ? args->lmax : -1) {                                                          \
    case 1: call(__VA_ARGS__, 32, 1); break;                                                                   \
    case 2: call(__VA_ARGS__, 32, 2); break;                                                                   \
    case 3: call(__VA_ARGS__, 32, 3); break;                                                                   \
    default: call(__VA_ARGS__, args->channels, args->lmax);                                                    \
    }

int NAME(se3t_attention)(const se3t_attention_args *args) {
    const int64_t per_node = (args->lmax + 1) * (args->lmax + 1) * args->channels;
    int failed = 0;
#pragma omp parallel num_threads(args->n_threads) reduction(|| : failed)
    {
        const NAME(scratch) scratch = NAME(scratch_alloc)(per_node, args->n_heads, args->channels);
        failed = scratch.x_frame == NULL;
#pragma omp for schedule(static, 4)
        for (int64_t node = args->node_begin; node < args->node_end; ++node) {
            if (!failed) SPECIALISED(NAME(receiver), args, node, &scratch)
        }
        free(scratch.x_frame);
    }
    return failed;
}

int NAME(se3t_attention_backward)(const se3t_attention_args *args, const se3t_attention_grads *grads) {
    const int64_t per_node = (args->lmax + 1) * (args->lmax + 1) * args->channels;
    int failed = 0;
#pragma omp parallel num_threads(args->n_threads) reduction(|| : failed)
    {
        const NAME(scratch) scratch = NAME(scratch_alloc)(per_node, args->n_heads, args->channels);
        failed = scratch.x_frame == NULL;
        REAL *grad_features = (REAL *)grads->grad_features + omp_get_thread_num() * grads->n_nodes * per_node;
#pragma omp for schedule(static, 4) /* static: each thread's share of grad_features sums the same terms in every run */
        for (int64_t node = args->node_begin; node < args->node_end; ++node) {
            if (!failed) SPECIALISED(NAME(receiver_backward), args, grads, node, &scratch, grad_features)
        }
        free(scratch.x_frame);
    }
    return failed;
}

#undef SPECIALISED
#undef LANES
#undef MAX_VECTORS
#undef NAME
#undef CONCAT
#undef CONCAT_
#endif
