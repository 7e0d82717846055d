/* Fused elementwise passes of the dense SAE training nodes (float32, row-major, CPU).
 *
 * Each function does in one pass over a [n, d] matrix what the PyTorch fallback in activations.py does in several:
 * masking, per-row sums (L0, penalties) and per-column sums (bias and threshold gradients, firing counts). Rows
 * are split into contiguous blocks, one per thread; each thread sums its columns into its own double-precision
 * accumulators, which are added up at the end (so the result does not depend on timing; a block whose thread cannot
 * be started runs in the calling thread). Every function returns 0, or -1 when its accumulators could not be
 * allocated, before it has touched any input.
 *
 * Compiled by prisma_lightning/sae/native/__init__.py with the optimiser's vectoriser on; the inner loops are
 * written branch-free (selects) so they vectorise.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 256

/* ------------------------------------------------------------------ vectorisable tanh
 * tanh(a) for a >= 0: an odd Taylor polynomial below 0.4 (truncation error < 2e-9 relative), else
 * 1 - 2 / (exp(2a) + 1) with exp from a degree-7 polynomial on [-ln2/2, ln2/2] and an exponent built in the bits
 * (clamped at 2^64, where the quotient is far below float32's resolution of 1). Accuracy: about 2 ulp (tested
 * against torch.tanh); NaN stays NaN, +-inf give +-1. The clamps are integer ones: a float clamp in front of the
 * float-to-int conversion makes gcc's if-conversion give up on the whole loop. */
static inline __attribute__((always_inline)) float exp_pos(float y) { /* y >= 0 */
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693145751953125f, ln2_lo = 1.428606765330187e-06f;
    int32_t k = (int32_t)(y * log2e + 0.5f); /* (INT_MIN for inf / NaN / overflow: clamped to 0 below) */
    k = k < 0 ? 0 : k;
    k = k > 64 ? 64 : k;
    float kf = (float)k;
    float r = (y - kf * ln2_hi) - kf * ln2_lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union {
        int32_t i;
        float f;
    } scale;
    scale.i = (k + 127) << 23;
    return p * scale.f;
}

static inline __attribute__((always_inline)) float tanh_f(float x) {
    float a = fabsf(x);
    float a2 = a * a;
    float q = 21844.0f / 6081075.0f;
    q = q * a2 - 1382.0f / 155925.0f;
    q = q * a2 + 62.0f / 2835.0f;
    q = q * a2 - 17.0f / 315.0f;
    q = q * a2 + 2.0f / 15.0f;
    q = q * a2 - 1.0f / 3.0f;
    float small = a + a * a2 * q;
    float large = 1.0f - 2.0f / (exp_pos(2.0f * a) + 1.0f);
    float t = a < 0.4f ? small : large;
    return copysignf(t, x);
}

/* exported for the accuracy test */
void prisma_tanh(int64_t n, const float *x, float *out) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = tanh_f(x[i]);
}

/* ------------------------------------------------------------------ threads */
typedef void (*rows_fn)(const void *args, int64_t r0, int64_t r1, double *acc);

typedef struct {
    rows_fn fn;
    const void *args;
    int64_t r0, r1;
    double *acc;
} job_t;

static void *run_job(void *p) {
    job_t *j = (job_t *)p;
    j->fn(j->args, j->r0, j->r1, j->acc);
    return NULL;
}

/* Runs fn over rows [0, n) in `threads` blocks; each block sums into its own n_acc * d doubles, added into acc. */
static int parallel_rows(rows_fn fn, const void *args, int64_t n, int64_t d, int n_acc, int threads, double *acc) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = n > 0 ? (int)n : 1;
    int64_t width = (int64_t)n_acc * d;
    double *all = width ? (double *)calloc((size_t)threads * (size_t)width, sizeof(double)) : NULL;
    if (width && !all) return -1;
    job_t jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    int64_t block = (n + threads - 1) / threads;
    for (int t = 0; t < threads; t++) {
        int64_t r0 = t * block, r1 = r0 + block < n ? r0 + block : n;
        jobs[t] = (job_t){fn, args, r0 < n ? r0 : n, r1, all ? all + (size_t)t * width : NULL};
        started[t] = t > 0 && pthread_create(&ids[t], NULL, run_job, &jobs[t]) == 0;
    }
    for (int t = 0; t < threads; t++) /* block 0, and any block whose thread could not start, run here */
        if (!started[t]) run_job(&jobs[t]);
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], NULL);
    if (acc) {
        memset(acc, 0, (size_t)width * sizeof(double));
        for (int t = 0; t < threads; t++) {
            const double *src = all + (size_t)t * width;
            for (int64_t i = 0; i < width; i++) acc[i] += src[i];
        }
    }
    free(all);
    return 0;
}

/* A rows_fn calling `block` with its flag argument a constant: each variant is compiled (and vectorised) alone. */
#define ROWS_FN(name, type, block, cond)                                     \
    static void name(const void *p, int64_t r0, int64_t r1, double *acc) {   \
        const type *a = (const type *)p;                                     \
        if (cond)                                                            \
            block(a, r0, r1, acc, 1);                                        \
        else                                                                 \
            block(a, r0, r1, acc, 0);                                        \
    }

/* Runs fn over the rows and writes its n_out column sums (n_out * d accumulators) into outs[k] (NULL: not wanted). */
static int run_rows(rows_fn fn, const void *args, int64_t n, int64_t d, int n_out, int threads, float *const *outs) {
    double *acc = (double *)malloc((size_t)n_out * (size_t)d * sizeof(double));
    if (!acc) return -1;
    int rc = parallel_rows(fn, args, n, d, n_out, threads, acc);
    for (int k = 0; !rc && k < n_out; k++) {
        if (!outs[k]) continue;
        const double *src = acc + (size_t)k * d;
        for (int64_t j = 0; j < d; j++) outs[k][j] = (float)src[j];
    }
    free(acc);
    return rc;
}

/* ------------------------------------------------------------------ ReLU
 * Forward, in place on x [n, d] (the encoder matmul's output, before its bias): feats = relu(x + bias[j]);
 * l0[i] = active features; with norms, l1[i] = sum_j feats * norms[j]; fired[j] = rows where feature j is active. */
typedef struct {
    int64_t d;
    float *x;
    const float *bias, *norms;
    float *l0, *l1;
} relu_fwd_t;

static inline __attribute__((always_inline)) void relu_fwd_block(const relu_fwd_t *a, int64_t r0, int64_t r1,
                                                                 double *acc, const int with_l1) {
    int64_t d = a->d;
    const float *bias = a->bias, *norms = a->norms;
    for (int64_t i = r0; i < r1; i++) {
        float *row = a->x + i * d;
        float count = 0.0f, l1 = 0.0f;
#pragma omp simd reduction(+ : count, l1)
        for (int64_t j = 0; j < d; j++) {
            float v = row[j] + bias[j];
            float f = v < 0.0f ? 0.0f : v; /* keeps a NaN */
            float on = f > 0.0f ? 1.0f : 0.0f;
            row[j] = f;
            count += on;
            acc[j] += on;
            if (with_l1) l1 += f * norms[j];
        }
        a->l0[i] = count;
        if (with_l1) a->l1[i] = l1;
    }
}

ROWS_FN(relu_fwd_rows, relu_fwd_t, relu_fwd_block, a->norms)

int prisma_relu_forward(int64_t n, int64_t d, float *x, const float *bias, const float *norms, float *l0, float *l1,
                        float *fired, int threads) {
    relu_fwd_t a = {d, x, bias, norms, l0, norms ? l1 : NULL};
    float *outs[1] = {fired};
    return run_rows(relu_fwd_rows, &a, n, d, 1, threads, outs);
}

/* Backward, in place on grad [n, d] (the gradient reaching the features): adds grad_l1[i] * norms[j] (when grad_l1
 * is given), masks to the active features, and sums columns: b_enc[j] = sum of the masked gradient,
 * feats_l1[j] = sum_i feats * grad_l1[i] (the L1 term's gradient of ||W_dec[j]||, before / ||W_dec[j]||). */
typedef struct {
    int64_t d;
    float *g;
    const float *feats, *norms, *grad_l1;
} relu_bwd_t;

static inline __attribute__((always_inline)) void relu_bwd_block(const relu_bwd_t *a, int64_t r0, int64_t r1,
                                                                 double *acc, const int with_l1) {
    int64_t d = a->d;
    double *b_enc = acc, *feats_l1 = acc + d;
    const float *norms = a->norms;
    for (int64_t i = r0; i < r1; i++) {
        float *g = a->g + i * d;
        const float *f = a->feats + i * d;
        float gl1 = with_l1 ? a->grad_l1[i] : 0.0f;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) {
            float fv = f[j];
            float gv = with_l1 ? g[j] + gl1 * norms[j] : g[j];
            float out = fv <= 0.0f ? 0.0f : gv;
            g[j] = out;
            b_enc[j] += out;
            if (with_l1) feats_l1[j] += fv * gl1;
        }
    }
}

ROWS_FN(relu_bwd_rows, relu_bwd_t, relu_bwd_block, a->grad_l1)

int prisma_relu_backward(int64_t n, int64_t d, float *grad, const float *feats, const float *norms,
                         const float *grad_l1, float *b_enc, float *feats_l1, int threads) {
    relu_bwd_t a = {d, grad, feats, norms, norms ? grad_l1 : NULL};
    float *outs[2] = {b_enc, feats_l1};
    return run_rows(relu_bwd_rows, &a, n, d, 2, threads, outs);
}

/* ------------------------------------------------------------------ JumpReLU
 * Forward, in place on x [n, d] (the encoder matmul's output, before its bias): with pre = x + bias[j] (the encoder
 * bias, adding it here saves the matmul a pass), feats = pre where pre > theta, else 0;
 * near[i, j] = |pre - theta| < half_bw (the straight-through kernel, read by the backward); l0[i] = number of active
 * features; with tanh_coef (scale * ||W_dec[j]||), tanh_sum[i] = sum_j tanh(tanh_coef[j] * feats[i, j]);
 * fired[j] = number of rows where feature j is active. */
typedef struct {
    int64_t d;
    float *x;
    const float *bias, *theta, *coef;
    float half_bw;
    uint8_t *near;
    float *l0, *tanh_sum;
} jr_fwd_t;

static inline __attribute__((always_inline)) void jr_fwd_block(const jr_fwd_t *a, int64_t r0, int64_t r1,
                                                               double *acc, const int with_tanh) {
    int64_t d = a->d;
    const float *bias = a->bias, *theta = a->theta, *coef = a->coef;
    const float half_bw = a->half_bw;
    for (int64_t i = r0; i < r1; i++) {
        float *row = a->x + i * d;
        uint8_t *nr = a->near + i * d;
        float count = 0.0f, tsum = 0.0f;
#pragma omp simd reduction(+ : count, tsum)
        for (int64_t j = 0; j < d; j++) {
            float v = row[j] + bias[j], th = theta[j];
            float gap = v - th;
            float f = gap <= 0.0f ? 0.0f : v; /* a NaN pre-activation stays NaN, as in PyTorch */
            float on = f > 0.0f ? 1.0f : 0.0f;
            nr[j] = fabsf(gap) < half_bw;
            row[j] = f;
            count += on;
            acc[j] += on;
            if (with_tanh) tsum += tanh_f(coef[j] * f);
        }
        a->l0[i] = count;
        if (with_tanh) a->tanh_sum[i] = tsum;
    }
}

ROWS_FN(jr_fwd_rows, jr_fwd_t, jr_fwd_block, a->coef)

int prisma_jumprelu_forward(int64_t n, int64_t d, float *pre, const float *bias, const float *theta, float half_bw,
                            const float *coef, uint8_t *near, float *l0, float *tanh_sum, float *fired, int threads) {
    jr_fwd_t a = {d, pre, bias, theta, coef, half_bw, near, l0, coef ? tanh_sum : NULL};
    float *outs[1] = {fired};
    return run_rows(jr_fwd_rows, &a, n, d, 1, threads, outs);
}

/* Backward, in place on grad [n, d] (the gradient reaching the features from the decoder): adds the tanh penalty's
 * gradient grad_tanh[i] * coef[j] * (1 - tanh(coef[j] * feats)^2) when coef is given, then
 *   thr[j]   = sum_i near * grad          (the JumpReLU estimator's sum, before -theta / bw)
 *   thr_l0[j]= sum_i near * grad_l0[i]    (the step estimator's, before -1 / bw; when grad_l0 is given)
 *   tnorm[j] = sum_i grad_tanh[i] * (1 - tanh^2) * feats   (before * scale: the penalty's gradient of ||W_dec[j]||)
 * and leaves grad masked to the active features (feats > 0), whose column sums are b_enc[j]. */
typedef struct {
    int64_t d;
    float *g;
    const float *feats, *coef, *grad_tanh, *grad_l0;
    const uint8_t *near;
} jr_bwd_t;

static inline __attribute__((always_inline)) void jr_bwd_block(const jr_bwd_t *a, int64_t r0, int64_t r1,
                                                               double *acc, const int with_tanh) {
    int64_t d = a->d;
    double *b_enc = acc, *thr = acc + d, *thr_l0 = acc + 2 * d, *tnorm = acc + 3 * d;
    const float *coef = a->coef;
    for (int64_t i = r0; i < r1; i++) {
        float *g = a->g + i * d;
        const float *f = a->feats + i * d;
        const uint8_t *nr = a->near + i * d;
        float gt = with_tanh ? a->grad_tanh[i] : 0.0f;
        float gl0 = a->grad_l0 ? a->grad_l0[i] : 0.0f;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) {
            float fv = f[j], gv = g[j];
            if (with_tanh) {
                float t = tanh_f(coef[j] * fv);
                float dt = gt * (1.0f - t * t);
                gv += dt * coef[j];
                tnorm[j] += dt * fv;
            }
            float in = nr[j] ? 1.0f : 0.0f;
            thr[j] += in * gv;
            thr_l0[j] += in * gl0;
            float out = fv <= 0.0f ? 0.0f : gv;
            g[j] = out;
            b_enc[j] += out;
        }
    }
}

ROWS_FN(jr_bwd_rows, jr_bwd_t, jr_bwd_block, a->coef)

int prisma_jumprelu_backward(int64_t n, int64_t d, float *grad, const float *feats, const uint8_t *near,
                             const float *coef, const float *grad_tanh, const float *grad_l0, float *b_enc,
                             float *thr, float *thr_l0, float *tnorm, int threads) {
    jr_bwd_t a = {d, grad, feats, grad_tanh ? coef : NULL, grad_tanh, grad_l0, near};
    float *outs[4] = {b_enc, thr, thr_l0, tnorm};
    return run_rows(jr_bwd_rows, &a, n, d, 4, threads, outs);
}

/* ------------------------------------------------------------------ Gated
 * Forward, in place on h [n, d] (the shared encoder matmul): gate = relu(h + b_gate) into gate [n, d];
 * feats = relu(h * scale + b_mag) where h + b_gate > 0, else 0, into h; l1[i] = sum_j gate * norms[j];
 * l0[i] = active features; fired[j] = rows where feature j is active. */
typedef struct {
    int64_t d;
    float *h, *gate;
    const float *b_gate, *scale, *b_mag, *norms;
    float *l1, *l0;
} gated_fwd_t;

static void gated_fwd_rows(const void *p, int64_t r0, int64_t r1, double *acc) {
    const gated_fwd_t *a = (const gated_fwd_t *)p;
    int64_t d = a->d;
    /* (pointers in locals: read through `a` inside the loop they might alias the stores, which stops the vectoriser) */
    const float *b_gate = a->b_gate, *scale = a->scale, *b_mag = a->b_mag, *norms = a->norms;
    for (int64_t i = r0; i < r1; i++) {
        float *h = a->h + i * d, *gate = a->gate + i * d;
        float count = 0.0f, l1 = 0.0f;
#pragma omp simd reduction(+ : count, l1)
        for (int64_t j = 0; j < d; j++) {
            float hv = h[j];
            float pg = hv + b_gate[j];
            float gv = pg < 0.0f ? 0.0f : pg; /* relu that keeps a NaN, as torch.relu does */
            float m = hv * scale[j] + b_mag[j];
            float f = pg <= 0.0f ? 0.0f : (m < 0.0f ? 0.0f : m);
            float on = f > 0.0f ? 1.0f : 0.0f;
            gate[j] = gv;
            h[j] = f;
            l1 += gv * norms[j];
            count += on;
            acc[j] += on;
        }
        a->l1[i] = l1;
        a->l0[i] = count;
    }
}

int prisma_gated_forward(int64_t n, int64_t d, float *h, float *gate, const float *b_gate, const float *scale,
                         const float *b_mag, const float *norms, float *l1, float *l0, float *fired, int threads) {
    gated_fwd_t a = {d, h, gate, b_gate, scale, b_mag, norms, l1, l0};
    float *outs[1] = {fired};
    return run_rows(gated_fwd_rows, &a, n, d, 1, threads, outs);
}

/* Backward, in place on gm [n, d] (the main reconstruction's gradient of the features): with gg [n, d] (the
 * auxiliary reconstruction's gradient of the gate, or NULL) and grad_l1 [n] (or NULL), writes the gradient of h
 *   scale[j] * (gm masked to feats > 0) + (gg + grad_l1[i] * norms[j]) masked to gate > 0
 * into gm, and the column sums
 *   b_mag[j] = sum masked gm;  r_raw[j] = sum masked gm * feats;  b_gate[j] = sum masked gate gradient;
 *   gate_l1[j] = sum_i gate * grad_l1[i]  (for the L1 term's gradient of ||W_dec[j]||). */
typedef struct {
    int64_t d;
    float *gm;
    const float *gg, *feats, *gate, *scale, *norms, *grad_l1;
} gated_bwd_t;

static inline __attribute__((always_inline)) void gated_bwd_block(const gated_bwd_t *a, int64_t r0, int64_t r1,
                                                                  double *acc, const int with_aux) {
    int64_t d = a->d;
    double *b_mag = acc, *r_raw = acc + d, *b_gate = acc + 2 * d, *gate_l1 = acc + 3 * d;
    const float *scale = a->scale, *norms = a->norms;
    for (int64_t i = r0; i < r1; i++) {
        float *gm = a->gm + i * d;
        const float *gg = with_aux ? a->gg + i * d : NULL;
        const float *f = a->feats + i * d, *gate = a->gate + i * d;
        float gl1 = a->grad_l1 ? a->grad_l1[i] : 0.0f;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) {
            float fv = f[j], gv = gate[j];
            float mag = fv <= 0.0f ? 0.0f : gm[j];
            float gate_in = (with_aux ? gg[j] : 0.0f) + gl1 * norms[j];
            float gate_grad = gv <= 0.0f ? 0.0f : gate_in;
            gm[j] = mag * scale[j] + gate_grad;
            b_mag[j] += mag;
            r_raw[j] += mag * fv;
            b_gate[j] += gate_grad;
            gate_l1[j] += gv * gl1;
        }
    }
}

ROWS_FN(gated_bwd_rows, gated_bwd_t, gated_bwd_block, a->gg)

int prisma_gated_backward(int64_t n, int64_t d, float *gm, const float *gg, const float *feats, const float *gate,
                          const float *scale, const float *norms, const float *grad_l1, float *b_mag, float *r_raw,
                          float *b_gate, float *gate_l1, int threads) {
    gated_bwd_t a = {d, gm, gg, feats, gate, scale, norms, grad_l1};
    float *outs[4] = {b_mag, r_raw, b_gate, gate_l1};
    return run_rows(gated_bwd_rows, &a, n, d, 4, threads, outs);
}
