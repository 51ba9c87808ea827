/* The vector kernels of _kernels.c, included once per instruction set with these macros set:
 * VF / VI (GCC/Clang vector types of LANES floats / int32s), KATTR (the function attribute that selects
 * the instruction set, or nothing) and K(name) (the kernel's name for that set). No include guard: it is
 * meant to be included more than once. */

static inline __attribute__((always_inline)) KATTR VF K(splat)(float x) {
    VF v = {0};
    return v + x;
}

static inline __attribute__((always_inline)) KATTR VF K(load)(const float *p) {
    VF v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) KATTR VF K(vmax)(VF a, VF b) {
    VI take_a = (VI)(a > b);
    return (VF)(((VI)a & take_a) | ((VI)b & ~take_a));
}

/* exp(x) for x in [MIN_EXP_ARG, 0] */
static inline __attribute__((always_inline)) KATTR VF K(vexp_neg)(VF x) {
    VI n = __builtin_convertvector(x * 1.44269504f - 0.5f, VI); /* truncation: rounds to nearest for x <= 0 */
    VF nf = __builtin_convertvector(n, VF);
    VF r = x - nf * 0.693359375f - nf * -2.12194440e-4f; /* x - n ln2 in two parts; |r| <= ~0.35 */
    VF p = K(splat)(1.0f / 120.0f);
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return p * (VF)((n + 127) << 23); /* times 2^n, n >= -126 */
}

static inline __attribute__((always_inline)) KATTR float K(hmax)(VF v) {
    float m = v[0];
    for (int j = 1; j < LANES; j++) m = v[j] > m ? v[j] : m;
    return m;
}

static inline __attribute__((always_inline)) KATTR double K(hsum)(VF v) {
    double s = 0.0;
    for (int j = 0; j < LANES; j++) s += v[j];
    return s;
}

/* The largest of n floats (-inf for n = 0): four vector maxima in flight, to hide the blend's latency. */
static KATTR float K(max_of)(const float *l, Py_ssize_t n) {
    const VF ninf = K(splat)(-INFINITY);
    VF m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    Py_ssize_t i = 0;
    for (; i + 4 * LANES <= n; i += 4 * LANES) {
        m0 = K(vmax)(m0, K(load)(l + i));
        m1 = K(vmax)(m1, K(load)(l + i + LANES));
        m2 = K(vmax)(m2, K(load)(l + i + 2 * LANES));
        m3 = K(vmax)(m3, K(load)(l + i + 3 * LANES));
    }
    for (; i + LANES <= n; i += LANES) m0 = K(vmax)(m0, K(load)(l + i));
    float m = K(hmax)(K(vmax)(K(vmax)(m0, m1), K(vmax)(m2, m3)));
    for (; i < n; i++) m = l[i] > m ? l[i] : m;
    return m;
}

/* The sums over d = l - m (m the maximum) that the statistics need, in one pass; the last n % LANES
 * floats go through the same vector code, padded with the maximum (d = 0, taken back out). */
static KATTR void K(sums_of)(const float *l, Py_ssize_t n, float m, Sums *out) {
    double z = 0.0, sum_ed = 0.0, sum_d = 0.0, sum_dd = 0.0;
    Py_ssize_t i = 0;
    while (i < n) {
        VF vz = {0}, ved = vz, vd = vz, vdd = vz;
        Py_ssize_t end = i + BLOCK < n ? i + BLOCK : n;
        for (; i < end; i += LANES) {
            VF x;
            if (i + LANES <= n) {
                x = K(load)(l + i);
            } else {
                float tail[LANES];
                for (int j = 0; j < LANES; j++) tail[j] = i + j < n ? l[i + j] : m;
                x = K(load)(tail);
                z -= (double)(i + LANES - n); /* each pad adds exp(0) = 1 to the sum of e, 0 to the others */
            }
            VF d = x - m;
            VF dc = K(vmax)(d, K(splat)(MIN_EXP_ARG));
            VF e = K(vexp_neg)(dc);
            vz += e;
            ved += e * dc;
            vd += d;
            vdd += d * d;
        }
        z += K(hsum)(vz);
        sum_ed += K(hsum)(ved);
        sum_d += K(hsum)(vd);
        sum_dd += K(hsum)(vdd);
    }
    out->z = z;
    out->sum_ed = sum_ed;
    out->sum_d = sum_d;
    out->sum_dd = sum_dd;
}
