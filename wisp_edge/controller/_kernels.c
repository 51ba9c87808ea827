/* The stop rule's per-token work, compiled: the drafter's distribution statistics (three SIMD passes over
 * the logits) and the predictor's 3-layer MLP, in one call (`stop_score`) or apart (`stats`, `mlp3`).
 *
 * Why C: the controller runs once per drafted token, right after the drafter's evaluation has pushed
 * the interpreter, numpy and their buffers out of the caches, where every numpy call costs 3 to 5 times
 * its warm time. In numpy the rule takes ten calls (about 0.16 ms per token on a 2-core x86 VM, with
 * llama.cpp's SIMD exp); here it is one (tools/bench_controller.py prints both). The package builds this
 * file when a C compiler is present (the edge install already compiles llama.cpp); without it
 * `features.py` and `predictor.py` fall back to numpy and give the same values to float rounding.
 *
 * Arguments are raw addresses and sizes (METH_FASTCALL, no buffer protocol): the Python side owns the
 * arrays, checks their dtype, contiguity and shape, and keeps them alive across the call.
 *
 * Vectors are GCC/Clang vector extensions (_kernels_simd.h), built twice: 4 floats (SSE2 on any x86-64,
 * NEON on ARM) and, on x86, 8 floats with AVX2 and FMA, chosen at import when the CPU has them. The
 * exponential is a range reduction to [-ln2/2, ln2/2] and a degree-5 Taylor polynomial (relative error
 * < 3e-6), enough for statistics compared with a learned threshold.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512 /* floats summed per lane in float before the lane sums move to double */
#define MIN_EXP_ARG (-87.0f) /* exp(-87) ~ 1.6e-38: below it a term adds nothing to a sum >= 1 */
#define MAX_LOGIT_GAP 50.0 /* as features.MAX_LOGIT_GAP */

typedef struct {
    double z, sum_ed, sum_d, sum_dd; /* sums of e = exp(d), e * d, d, d^2 with d = l - max */
} Sums;

/* Four-float vectors: SSE2 on any x86-64, NEON on ARM; the portable build. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
#define VF v4f
#define VI v4i
#define LANES 4
#define KATTR
#define K(name) name##_4
#include "_kernels_simd.h"
#undef VF
#undef VI
#undef LANES
#undef KATTR
#undef K

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
/* Eight-float vectors with AVX2 and FMA, used when the CPU has them (checked once, at import). */
#define WISP_HAVE_AVX2 1
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#define VF v8f
#define VI v8i
#define LANES 8
#define KATTR __attribute__((target("avx2,fma")))
#define K(name) name##_8
#include "_kernels_simd.h"
#undef VF
#undef VI
#undef LANES
#undef KATTR
#undef K
#endif

static float (*max_of)(const float *, Py_ssize_t) = max_of_4;
static void (*sums_of)(const float *, Py_ssize_t, float, Sums *) = sums_of_4;

/* The five statistics of a row of n >= 2 finite logits, as features.FEATURE_NAMES[:5]. The GIL stays held:
 * the call is tens of microseconds, shorter than a wait to take the GIL back from another thread. */
static void row_stats(const float *l, Py_ssize_t n, double out[5]) {
    Sums s;
    Py_ssize_t top = 0;
    float m = max_of(l, n);
    while (top < n - 1 && l[top] != m) top++; /* the first index of the maximum, as numpy's argmax */
    float a = max_of(l, top), b = max_of(l + top + 1, n - top - 1);
    float runner_up = a > b ? a : b; /* the largest logit but the first maximum */
    sums_of(l, n, m, &s);
    double top1 = 1.0 / s.z, entropy = log(s.z) - s.sum_ed / s.z, gap = (double)m - (double)runner_up;
    double second = gap < -MIN_EXP_ARG ? exp(-gap) / s.z : 0.0;
    if (second <= 0.0 || gap > MAX_LOGIT_GAP) gap = MAX_LOGIT_GAP;
    double mean = s.sum_d / (double)n, var = s.sum_dd / (double)n - mean * mean;
    out[0] = top1;
    out[1] = entropy > 0.0 ? entropy : 0.0;
    out[2] = top1 - second;
    out[3] = gap;
    out[4] = sqrt(var > 0.0 ? var : 0.0);
}

/* The folded 3-layer MLP: w0 [(f + 1) x h1], w1 [(h1 + 1) x h2], w2 [h2 + 1], each with its bias as the
 * last row; x [f]; ReLU between; h1, h2 <= MAX_HIDDEN. */
#define MAX_HIDDEN 1024
static float mlp_score(const float *w0, const float *w1, const float *w2, const float *x, long f, long h1, long h2) {
    float a[MAX_HIDDEN], b[MAX_HIDDEN];
    for (long j = 0; j < h1; j++) a[j] = w0[f * h1 + j];
    for (long i = 0; i < f; i++)
        for (long j = 0; j < h1; j++) a[j] += x[i] * w0[i * h1 + j];
    for (long j = 0; j < h1; j++) a[j] = a[j] > 0.0f ? a[j] : 0.0f;
    for (long k = 0; k < h2; k++) b[k] = w1[h1 * h2 + k];
    for (long j = 0; j < h1; j++)
        for (long k = 0; k < h2; k++) b[k] += a[j] * w1[j * h2 + k];
    float out = w2[h2];
    for (long k = 0; k < h2; k++) out += (b[k] > 0.0f ? b[k] : 0.0f) * w2[k];
    return out;
}

static const float *row_arg(PyObject *address, PyObject *size, Py_ssize_t *n) {
    const float *l = PyLong_AsVoidPtr(address);
    *n = PyLong_AsSsize_t(size);
    if (PyErr_Occurred()) return NULL;
    if (l == NULL || *n < 2) {
        PyErr_SetString(PyExc_ValueError, "need a non-null row of at least 2 logits");
        return NULL;
    }
    return l;
}

/* Reads (w0, w1, w2, x, f, h1, h2) from args[0..6]; 0 on success. */
static int mlp_args(PyObject *const *args, const float **w, long *f, long *h1, long *h2) {
    for (int i = 0; i < 4; i++) w[i] = PyLong_AsVoidPtr(args[i]);
    *f = PyLong_AsLong(args[4]);
    *h1 = PyLong_AsLong(args[5]);
    *h2 = PyLong_AsLong(args[6]);
    if (PyErr_Occurred()) return -1;
    if (!w[0] || !w[1] || !w[2] || !w[3] || *f < 1 || *h1 < 1 || *h2 < 1 || *h1 > MAX_HIDDEN || *h2 > MAX_HIDDEN) {
        PyErr_SetString(PyExc_ValueError, "mlp: null weights or sizes outside [1, 1024]");
        return -1;
    }
    return 0;
}

/* stats(address, n) -> (top-1 prob, entropy, top-1 minus top-2 prob, top-1 minus top-2 logit, std) */
static PyObject *stats(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "stats(address, n)");
        return NULL;
    }
    Py_ssize_t n;
    const float *l = row_arg(args[0], args[1], &n);
    if (l == NULL) return NULL;
    double o[5];
    row_stats(l, n, o);
    return Py_BuildValue("(ddddd)", o[0], o[1], o[2], o[3], o[4]);
}

/* mlp3(w0, w1, w2, x, n_features, h1, h2) -> the pre-sigmoid score for the feature row x */
static PyObject *mlp3(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "mlp3(w0, w1, w2, x, n_features, h1, h2)");
        return NULL;
    }
    const float *w[4];
    long f, h1, h2;
    if (mlp_args(args, w, &f, &h1, &h2) < 0) return NULL;
    return PyFloat_FromDouble(mlp_score(w[0], w[1], w[2], w[3], f, h1, h2));
}

/* stop_score(w0, w1, w2, x, n_features, h1, h2, address, n, index, log_top1) -> (score, log_top1):
 * the whole per-token stop rule. Writes the token's feature row (the five statistics, its index in the
 * block, the block's running log product of top-1 probabilities, as features.BlockFeatures) into x, and
 * returns the MLP's pre-sigmoid score with the new running log product (log_top1: the previous token's,
 * ignored at index 0). */
static PyObject *stop_score(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 11) {
        PyErr_SetString(PyExc_TypeError, "stop_score(w0, w1, w2, x, n_features, h1, h2, address, n, index, log_top1)");
        return NULL;
    }
    const float *w[4];
    long f, h1, h2;
    if (mlp_args(args, w, &f, &h1, &h2) < 0) return NULL;
    if (f != 7) {
        PyErr_SetString(PyExc_ValueError, "stop_score: the MLP must read 7 features");
        return NULL;
    }
    Py_ssize_t n;
    const float *l = row_arg(args[7], args[8], &n);
    long index = PyLong_AsLong(args[9]);
    double log_top1 = PyFloat_AsDouble(args[10]);
    if (l == NULL || PyErr_Occurred()) return NULL;
    double o[5];
    row_stats(l, n, o);
    log_top1 = (index == 0 ? 0.0 : log_top1) + log(o[0] > 1e-12 ? o[0] : 1e-12);
    float *x = (float *)w[3];
    for (int i = 0; i < 5; i++) x[i] = (float)o[i];
    x[5] = (float)index;
    x[6] = (float)log_top1;
    return Py_BuildValue("(dd)", (double)mlp_score(w[0], w[1], w[2], x, f, h1, h2), log_top1);
}

static PyMethodDef methods[] = {
    {"stats", (PyCFunction)(void (*)(void))stats, METH_FASTCALL,
     "stats(address, n): the five distribution statistics of a float32 row of n logits."},
    {"mlp3", (PyCFunction)(void (*)(void))mlp3, METH_FASTCALL,
     "mlp3(w0, w1, w2, x, n_features, h1, h2): the predictor's pre-sigmoid score."},
    {"stop_score", (PyCFunction)(void (*)(void))stop_score, METH_FASTCALL,
     "stop_score(w0, w1, w2, x, n_features, h1, h2, address, n, index, log_top1): (score, log_top1)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "The controller's compiled kernels.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    const char *lanes = "4";
#ifdef WISP_HAVE_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        max_of = max_of_8;
        sums_of = sums_of_8;
        lanes = "8";
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "LANES", lanes) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
