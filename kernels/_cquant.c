/* Fast CPU quantizers of quantforge: the same bytes as the PyTorch reference codecs (kernels/q*.py, iq4_*.py).
 *
 * A C99 translation of the searches of kernels/_search.py, _legacy_common.py and _iq4_common.py, function for
 * function in the layout described in kernels/_cpu_fast.py: per chunk of groups (sub-blocks or blocks), the data
 * is laid out position-major (n, G) with row stride `ld`, and every loop runs over the G groups innermost, so each
 * group's float32 sums stay strictly sequential ((0 + t0) + t1) + ... while the compiler vectorizes across groups.
 *
 * Byte-exactness rests on these rules (build with -ffp-contract=off and without -ffast-math; -fno-math-errno and
 * -fno-trapping-math change no value, they only let more loops vectorize):
 *   - float32 arithmetic throughout, in the reference's operation order (no FMA contraction, no reassociation);
 *   - nearest() is (v + 1.5*2^23) - 1.5*2^23: round half to even, exact for |v| < 2^22;
 *   - candidates replace the running best only when strictly better, in the reference's order;
 *   - fp16 conversion is round-to-nearest-even on the bit pattern (f16_bits);
 *   - float -> int conversions give x86's "integer indefinite" (INT_MIN) for NaN and out-of-range values, as the
 *     reference's casts do there, without C's undefined behaviour; left shifts of codes are done unsigned.
 *
 * Entry points (called through ctypes, which releases the GIL): qf_quantize_rows, qf_widen_f32, qf_f16_bits,
 * qf_f16_values, qf_abi_version; qf_iq_encode_rows (the lattice i-quants, looked up on its own by _cpu_fast so
 * that an older build without it still serves the other types). PyInit__cquant only makes the file a valid (method-less) extension module.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef int64_t i64;
typedef uint64_t u64;

/* HOT functions are compiled for AVX-512, AVX2 and baseline x86-64, and the loader picks one per machine (ifunc):
 * the wheel stays portable (no -march=native) yet vectorizes as wide as the CPU allows. All variants give the
 * same bytes: each float operation is the same IEEE operation on any vector width, and FMA contraction is off. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && !defined(QF_NO_CLONES)
#define HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HOT
#endif

enum {
    MAXG = 512,          /* groups per search chunk at most (32 super-blocks of 16 sub-blocks) */
    MAXNG = 8192,        /* n * ld of any (n, G) lane array */
    CHUNK_SB = 32,       /* super-blocks per K-quant search chunk (8-16 groups each) */
    CHUNK_BLOCKS = 256,  /* 32-weight blocks per search chunk of the legacy and IQ4 encoders */
};

static const float MAGIC = 12582912.0f;
static const float EPS = 1e-15f;
static const float TENTH = 0.1f;
static const float KV[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* ------------------------------------------------------------------------------------------- scalar helpers */

/* ggml nearest_int as a float: round half to even for |v| < 2^22 (larger values stay large). */
static inline float nearest(float v) { return (v + MAGIC) - MAGIC; }

static inline float clampf(float v, float lo, float hi)
{
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

/* Truncating float -> int64; NaN and out-of-range give INT64_MIN (cvttss2si). */
static inline i64 to_i64(float v)
{
    return (v >= -9223372036854775808.0f) & (v < 9223372036854775808.0f) ? (i64)v : INT64_MIN;
}

/* Truncating float -> int32; NaN and out-of-range give INT32_MIN (cvttss2si). */
static inline int32_t to_i32(float v)
{
    return (v >= -2147483648.0f) & (v < 2147483648.0f) ? (int32_t)v : INT32_MIN;
}

static inline uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float bitsf(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float32 -> IEEE fp16 bit pattern, round to nearest even (torch.half(), GGML_FP32_TO_FP16). */
static i64 f16_bits(float f)
{
    i64 x = fbits(f);
    i64 sign = (x >> 16) & 0x8000;
    i64 a = x & 0x7FFFFFFF;
    if (a >= 0x7F800000) /* inf / nan */
        return sign | 0x7C00 | (a > 0x7F800000 ? 0x200 : 0);
    if (a < 0x38800000) /* below the smallest normal fp16: multiples of 2^-24 (1024 is the smallest normal) */
        return sign | (i64)nearest(fabsf(f) * 16777216.0f);
    i64 h = (((a >> 23) - 112) << 10) | ((a >> 13) & 0x3FF);
    i64 rem = a & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1) == 1))
        h += 1;
    if (h > 0x7C00)
        h = 0x7C00;
    return sign | h;
}

/* IEEE fp16 bit pattern -> float32. */
static float f16_value(i64 h)
{
    i64 sign = (h & 0x8000) << 16;
    i64 e = (h >> 10) & 0x1F;
    i64 m = h & 0x3FF;
    if (e == 0) {
        float v = (float)m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    i64 bits = e == 31 ? (sign | 0x7F800000 | (m << 13)) : (sign | ((e + 112) << 23) | (m << 13));
    return bitsf((uint32_t)bits);
}

static inline float f16_round(float f) { return f16_value(f16_bits(f)); }

static inline void put_f16(uint8_t *out, i64 pos, float f)
{
    i64 h = f16_bits(f);
    out[pos] = h & 255;
    out[pos + 1] = (h >> 8) & 255;
}

/* Index of the IQ4 grid value nearest to a / 2, for a = twice the scaled weight (ggml best_index_int8, exact ties
 * to the upper index). Every midpoint between neighbours is a multiple of 1/2, so a lies above midpoint k exactly
 * when a >= IQ4_EDGE2[k] = KV[k] + KV[k+1]. !(a < e) also counts NaN (float overflow in the scale search of
 * weights beyond ~1e12) as above every edge: the top index, where ggml's loop ends when every comparison is false
 * (never an out-of-range index). Compare-and-select instead of a table: it vectorizes without gathers. */
static const float IQ4_EDGE2[15] = {-231, -187, -148, -114, -84, -57, -32, -9, 14, 38, 63, 91, 122, 158, 202};

static inline int32_t iq4_index(float a)
{
    int32_t k = 0;
    for (int e = 0; e < 15; e++)
        k += !(a < IQ4_EDGE2[e]);
    return k;
}

/* The grid value KV[iq4_index(a)]. */
static inline float iq4_value(float a)
{
    float v = KV[0];
    for (int e = 0; e < 15; e++)
        v = !(a < IQ4_EDGE2[e]) ? KV[e + 1] : v;
    return v;
}

/* --------------------------------------------------------------------------------- searches on (n, G) groups
 * xt, wt, L: float32 (n, ld) row-major, group g is column g < G; per-group outputs are the first G entries. */

/* Per group, the value of largest magnitude with its sign (first one on ties, C's > loop from 0). */
HOT static void signed_absmax_lanes(const float *restrict xt, i64 n, i64 ld, i64 G, float *restrict out)
{
    float amax[MAXG];
    for (i64 g = 0; g < G; g++) {
        amax[g] = 0.0f;
        out[g] = 0.0f;
    }
    for (i64 i = 0; i < n; i++) {
        const float *xi = xt + i * ld;
        for (i64 g = 0; g < G; g++) {
            float v = xi[g], a = fabsf(v);
            int take = a > amax[g];
            amax[g] = take ? a : amax[g];
            out[g] = take ? v : out[g];
        }
    }
}

/* Settings of make_qkx2_quants / make_qkx3_quants. */
typedef struct {
    i64 nmax;
    float rmin, rdelta;
    i64 nstep;
    int use_mad;     /* |error| instead of error^2 (Q2_K without imatrix) */
    int strict_flat; /* a group is flat when max == min (else max <= min) */
} QkxCfg;

/* make_qkx2_quants / make_qkx3_quants (_search.qkx_search_t): codes L (float, 0..nmax), scale_out and min_out
 * (= the_min >= 0) for each group. */
HOT static void qkx_lanes(const float *restrict xt, const float *restrict wt, i64 n, i64 ld, i64 G, QkxCfg c,
                          float *restrict L, float *restrict scale_out, float *restrict min_out)
{
    const float fmax = (float)c.nmax;
    float mn[MAXG], mx[MAXG], sum_w[MAXG], sum_x[MAXG], best[MAXG], scale[MAXG], best_isc[MAXG];
    float best_base[MAXG], cur_min[MAXG], isc[MAXG], s_l[MAXG], s_l2[MAXG], s_xl[MAXG], t_scale[MAXG];
    float t_min[MAXG], cur[MAXG];
    uint8_t flat[MAXG];
    for (i64 g = 0; g < G; g++) {
        mn[g] = mx[g] = xt[g];
        sum_w[g] = sum_x[g] = best[g] = 0.0f;
    }
    for (i64 i = 0; i < n; i++) {
        const float *xi = xt + i * ld, *wi = wt + i * ld;
        for (i64 g = 0; g < G; g++) {
            float v = xi[g];
            mn[g] = v < mn[g] ? v : mn[g];
            mx[g] = v > mx[g] ? v : mx[g];
            sum_w[g] += wi[g];
            sum_x[g] += wi[g] * v;
        }
    }
    for (i64 g = 0; g < G; g++) {
        float m0 = mn[g] > 0.0f ? 0.0f : mn[g];
        mn[g] = m0;
        int fl = c.strict_flat ? mx[g] == m0 : mx[g] <= m0;
        flat[g] = (uint8_t)fl;
        float iscale = fmax / (fl ? 1.0f : mx[g] - m0);
        isc[g] = best_isc[g] = iscale;
        scale[g] = 1.0f / iscale;
        best_base[g] = cur_min[g] = m0;
    }
    for (i64 i = 0; i < n; i++) {
        const float *xi = xt + i * ld, *wi = wt + i * ld;
        for (i64 g = 0; g < G; g++) {
            float v = xi[g];
            float lv = clampf(nearest((v - mn[g]) * isc[g]), 0.0f, fmax);
            float d = (lv * scale[g] + mn[g]) - v;
            d = c.use_mad ? fabsf(d) : d * d;
            best[g] += d * wi[g];
        }
    }
    for (i64 k = 0; k <= c.nstep; k++) {
        float cst = (c.rmin + c.rdelta * (float)k) + fmax;
        for (i64 g = 0; g < G; g++) {
            isc[g] = cst / (mx[g] - cur_min[g]);
            s_l[g] = s_l2[g] = s_xl[g] = cur[g] = 0.0f;
        }
        for (i64 i = 0; i < n; i++) {
            const float *xi = xt + i * ld, *wi = wt + i * ld;
            float *li = L + i * ld;
            for (i64 g = 0; g < G; g++) {
                float v = xi[g];
                float lv = clampf(nearest((v - cur_min[g]) * isc[g]), 0.0f, fmax);
                li[g] = lv;
                float a = wi[g] * lv;
                s_l[g] += a;
                s_l2[g] += a * lv;
                s_xl[g] += a * v;
            }
        }
        for (i64 g = 0; g < G; g++) {
            float D = sum_w[g] * s_l2[g] - s_l[g] * s_l[g];
            float ts = (sum_w[g] * s_xl[g] - sum_x[g] * s_l[g]) / D;
            float tm = (s_l2[g] * sum_x[g] - s_l[g] * s_xl[g]) / D;
            int over = tm > 0.0f;
            t_min[g] = over ? 0.0f : tm;
            t_scale[g] = over ? s_xl[g] / s_l2[g] : ts;
            s_l[g] = D;
        }
        for (i64 i = 0; i < n; i++) {
            const float *xi = xt + i * ld, *wi = wt + i * ld, *li = L + i * ld;
            for (i64 g = 0; g < G; g++) {
                float d = (li[g] * t_scale[g] + t_min[g]) - xi[g];
                d = c.use_mad ? fabsf(d) : d * d;
                cur[g] += d * wi[g];
            }
        }
        for (i64 g = 0; g < G; g++) {
            int acc = (s_l[g] > 0.0f) & (cur[g] < best[g]);
            best[g] = acc ? cur[g] : best[g];
            scale[g] = acc ? t_scale[g] : scale[g];
            best_isc[g] = acc ? isc[g] : best_isc[g];
            best_base[g] = acc ? cur_min[g] : best_base[g];
            cur_min[g] = acc ? t_min[g] : cur_min[g];
        }
    }
    for (i64 i = 0; i < n; i++) {
        const float *xi = xt + i * ld;
        float *li = L + i * ld;
        for (i64 g = 0; g < G; g++) {
            float lv = clampf(nearest((xi[g] - best_base[g]) * best_isc[g]), 0.0f, fmax);
            li[g] = flat[g] ? 0.0f : lv;
        }
    }
    for (i64 g = 0; g < G; g++) {
        scale_out[g] = flat[g] ? 0.0f : scale[g];
        min_out[g] = -(flat[g] ? mn[g] : cur_min[g]);
    }
}

/* make_qx_quants (rmse_type=1; _search.qx_search_t): codes L (float, 0..2*nmax-1) and scales. Weights wt where
 * has_w, else x^2. */
HOT static void qx_lanes(const float *restrict xt, const float *restrict wt, int has_w, i64 n, i64 ld, i64 G, i64 nmax,
                         float *restrict L, float *restrict scale_out)
{
    const float fmax = (float)nmax, lo = -fmax, hi = fmax - 1.0f;
    float mx[MAXG], scale[MAXG], best[MAXG], best_isc[MAXG], isc[MAXG], slx[MAXG], sl2[MAXG];
    float w[MAXNG], wx[MAXNG];
    uint8_t zero[MAXG];
    signed_absmax_lanes(xt, n, ld, G, mx);
    for (i64 g = 0; g < G; g++) {
        zero[g] = fabsf(mx[g]) < EPS;
        mx[g] = zero[g] ? 1.0f : mx[g];
    }
    for (i64 i = 0; i < n; i++) {
        const float *xi = xt + i * ld, *src = wt + i * ld;
        float *wi = w + i * ld, *wxi = wx + i * ld;
        for (i64 g = 0; g < G; g++) {
            float v = xi[g];
            float ww = has_w ? src[g] : v * v;
            wi[g] = ww;
            wxi[g] = ww * v;
        }
    }
    for (i64 k = 0; k < 19; k++) {
        float c = k == 0 ? fmax : fmax + TENTH * (float)(k <= 9 ? k - 10 : k - 9);
        for (i64 g = 0; g < G; g++) {
            isc[g] = (-c) / mx[g];
            slx[g] = sl2[g] = 0.0f;
        }
        for (i64 i = 0; i < n; i++) {
            const float *xi = xt + i * ld, *wi = w + i * ld, *wxi = wx + i * ld;
            for (i64 g = 0; g < G; g++) {
                float lv = clampf(nearest(xi[g] * isc[g]), lo, hi);
                slx[g] += wxi[g] * lv;
                sl2[g] += (wi[g] * lv) * lv;
            }
        }
        for (i64 g = 0; g < G; g++) {
            if (k == 0) {
                float s = sl2[g] != 0.0f ? slx[g] / sl2[g] : 0.0f;
                scale[g] = s;
                best[g] = s * slx[g];
                best_isc[g] = isc[g];
            } else {
                int acc = (sl2[g] > 0.0f) & (slx[g] * slx[g] > best[g] * sl2[g]);
                float s = slx[g] / sl2[g];
                scale[g] = acc ? s : scale[g];
                best[g] = acc ? s * slx[g] : best[g];
                best_isc[g] = acc ? isc[g] : best_isc[g];
            }
        }
    }
    for (i64 i = 0; i < n; i++) {
        const float *xi = xt + i * ld;
        float *li = L + i * ld;
        for (i64 g = 0; g < G; g++) {
            float lv = clampf(nearest(xi[g] * best_isc[g]), lo, hi) + fmax;
            li[g] = zero[g] ? 0.0f : lv;
        }
    }
    for (i64 g = 0; g < G; g++)
        scale_out[g] = zero[g] ? 0.0f : scale[g];
}

/* Up to 5 passes of the coordinate descent of make_qp_quants (qp) / make_q3_quants on codes L (float, in place).
 * sumlx / suml2 receive the final sum(w*x*l) and sum(w*l^2) per group. */
HOT static void descent_lanes(const float *restrict xt, const float *restrict w, float *restrict L, i64 n, i64 ld,
                              i64 G, float lo, float hi, int qp, float *restrict sumlx, float *restrict suml2)
{
    float wx[MAXNG];
    for (i64 g = 0; g < G; g++)
        sumlx[g] = suml2[g] = 0.0f;
    for (i64 i = 0; i < n; i++) {
        const float *xi = xt + i * ld, *wi = w + i * ld, *li = L + i * ld;
        float *wxi = wx + i * ld;
        for (i64 g = 0; g < G; g++) {
            float a = wi[g] * xi[g];
            wxi[g] = a;
            sumlx[g] += a * li[g];
            suml2[g] += (wi[g] * li[g]) * li[g];
        }
    }
    for (int pass = 0; pass < 5; pass++) {
        i64 changed = 0;
        for (i64 i = 0; i < n; i++) {
            const float *xi = xt + i * ld, *wi = w + i * ld, *wxi = wx + i * ld;
            float *li = L + i * ld;
            for (i64 g = 0; g < G; g++) {
                float l0 = li[g];
                float slx = sumlx[g] - wxi[g] * l0;
                float sl2 = suml2[g] - (wi[g] * l0) * l0;
                int ok = (slx > 0.0f) & (!qp | (sl2 > 0.0f));
                float nw = nearest((xi[g] * sl2) / slx);
                nw = nw > hi ? hi : nw;
                nw = (!qp & (nw < lo)) ? lo : nw;
                ok &= nw != l0;
                slx = slx + wxi[g] * nw;
                sl2 = sl2 + (wi[g] * nw) * nw;
                ok &= (qp | (sl2 > 0.0f)) & ((slx * slx) * suml2[g] > (sumlx[g] * sumlx[g]) * sl2);
                li[g] = ok ? nw : l0;
                sumlx[g] = ok ? slx : sumlx[g];
                suml2[g] = ok ? sl2 : suml2[g];
                changed += ok;
            }
        }
        if (changed == 0)
            break;
    }
}

/* make_qp_quants (_search.qp_search_t) for non-negative xt: codes L (float) and scales. */
HOT static void qp_lanes(const float *restrict xt, const float *restrict wt, i64 n, i64 ld, i64 G, i64 nmax,
                         float *restrict L, float *restrict scale_out)
{
    static const int steps[8] = {-4, -3, -2, -1, 1, 2, 3, 4};
    const float fmax = (float)nmax;
    float mx[MAXG], iscale[MAXG], best[MAXG], isc[MAXG], sc[MAXG], cur[MAXG], sumlx[MAXG], suml2[MAXG];
    uint8_t zero[MAXG];
    for (i64 g = 0; g < G; g++)
        mx[g] = best[g] = 0.0f;
    for (i64 i = 0; i < n; i++) {
        const float *xi = xt + i * ld;
        for (i64 g = 0; g < G; g++)
            mx[g] = xi[g] > mx[g] ? xi[g] : mx[g];
    }
    for (i64 g = 0; g < G; g++) {
        zero[g] = mx[g] < EPS;
        mx[g] = zero[g] ? 1.0f : mx[g];
        iscale[g] = fmax / mx[g];
        sc[g] = 1.0f / iscale[g];
    }
    for (i64 i = 0; i < n; i++) {
        const float *xi = xt + i * ld, *wi = wt + i * ld;
        for (i64 g = 0; g < G; g++) {
            float d = xi[g] - nearest(xi[g] * iscale[g]) * sc[g];
            best[g] += (d * wi[g]) * d;
        }
    }
    for (int s = 0; s < 8; s++) {
        float c = TENTH * (float)steps[s] + fmax;
        for (i64 g = 0; g < G; g++) {
            isc[g] = c / mx[g];
            sc[g] = 1.0f / isc[g];
            cur[g] = 0.0f;
        }
        for (i64 i = 0; i < n; i++) {
            const float *xi = xt + i * ld, *wi = wt + i * ld;
            for (i64 g = 0; g < G; g++) {
                float lv = nearest(xi[g] * isc[g]);
                lv = lv > fmax ? fmax : lv;
                float d = xi[g] - lv * sc[g];
                cur[g] += (d * wi[g]) * d;
            }
        }
        for (i64 g = 0; g < G; g++) {
            int acc = cur[g] < best[g];
            best[g] = acc ? cur[g] : best[g];
            iscale[g] = acc ? isc[g] : iscale[g];
        }
    }
    for (i64 i = 0; i < n; i++) {
        const float *xi = xt + i * ld;
        float *li = L + i * ld;
        for (i64 g = 0; g < G; g++) {
            float lv = nearest(xi[g] * iscale[g]);
            li[g] = lv > fmax ? fmax : lv;
        }
    }
    descent_lanes(xt, wt, L, n, ld, G, 0.0f, fmax, 1, sumlx, suml2);
    for (i64 g = 0; g < G; g++) {
        float s = suml2[g] > 0.0f ? sumlx[g] / suml2[g] : 0.0f;
        scale_out[g] = zero[g] ? 0.0f : s;
    }
    for (i64 i = 0; i < n; i++) {
        float *li = L + i * ld;
        for (i64 g = 0; g < G; g++)
            li[g] = zero[g] ? 0.0f : li[g];
    }
}

/* make_q3_quants(do_rmse=true) (_search.q3_search_t): codes L (float, 0..2*nmax-1) and scales; w is scratch
 * (n, ld) for the weights x^2. */
HOT static void q3_lanes(const float *restrict xt, i64 n, i64 ld, i64 G, i64 nmax, float *restrict w,
                         float *restrict L, float *restrict scale_out)
{
    const float fmax = (float)nmax, lo = -fmax, hi = fmax - 1.0f;
    float mx[MAXG], sumlx[MAXG], suml2[MAXG];
    uint8_t zero[MAXG];
    signed_absmax_lanes(xt, n, ld, G, mx);
    for (i64 g = 0; g < G; g++) {
        zero[g] = fabsf(mx[g]) < EPS;
        mx[g] = zero[g] ? 1.0f : mx[g];
        mx[g] = (-fmax) / mx[g]; /* iscale */
    }
    for (i64 i = 0; i < n; i++) {
        const float *xi = xt + i * ld;
        float *li = L + i * ld, *wi = w + i * ld;
        for (i64 g = 0; g < G; g++) {
            li[g] = clampf(nearest(xi[g] * mx[g]), lo, hi);
            wi[g] = xi[g] * xi[g];
        }
    }
    descent_lanes(xt, w, L, n, ld, G, lo, hi, 0, sumlx, suml2);
    for (i64 g = 0; g < G; g++)
        scale_out[g] = zero[g] ? 0.0f : sumlx[g] / suml2[g];
    for (i64 i = 0; i < n; i++) {
        float *li = L + i * ld;
        for (i64 g = 0; g < G; g++)
            li[g] = zero[g] ? 0.0f : li[g] + fmax;
    }
}

/* The block-scale search of quantize_row_iq4_nl_impl with ntry = 7 (_iq4_common.block_scales). */
HOT static void iq4_scales_lanes(const float *restrict xt, const float *restrict wt, i64 n, i64 ld, i64 G,
                                 float *restrict d_out)
{
    const float k0 = KV[0];
    float mx[MAXG], inv[MAXG], sqx[MAXG], sq2[MAXG], best[MAXG], d[MAXG];
    float x2[MAXNG];
    uint8_t skip[MAXG];
    signed_absmax_lanes(xt, n, ld, G, mx);
    for (i64 i = 0; i < n; i++)
        for (i64 g = 0; g < G; g++)
            x2[i * ld + g] = xt[i * ld + g] * 2.0f;
    for (i64 g = 0; g < G; g++) {
        skip[g] = fabsf(mx[g]) < EPS;
        mx[g] = skip[g] ? 1.0f : mx[g];
        inv[g] = 1.0f / ((-mx[g]) / k0);
    }
    for (i64 t = 0; t < 16; t++) {
        if (t > 0) {
            float c = (float)(t - 8) + k0;
            for (i64 g = 0; g < G; g++)
                inv[g] = c / mx[g];
        }
        for (i64 g = 0; g < G; g++)
            sqx[g] = sq2[g] = 0.0f;
        for (i64 i = 0; i < n; i++) {
            const float *xi = xt + i * ld, *x2i = x2 + i * ld, *wi = wt + i * ld;
            for (i64 g = 0; g < G; g++) {
                float q = iq4_value(x2i[g] * inv[g]);
                float wq = wi[g] * q;
                sqx[g] += wq * xi[g];
                sq2[g] += wq * q;
            }
        }
        for (i64 g = 0; g < G; g++) {
            if (t == 0) {
                d[g] = sqx[g] / sq2[g];
                best[g] = d[g] * sqx[g];
            } else {
                int better = (sq2[g] > 0.0f) & (sqx[g] * sqx[g] > best[g] * sq2[g]);
                float dn = sqx[g] / sq2[g];
                d[g] = better ? dn : d[g];
                best[g] = better ? dn * sqx[g] : best[g];
            }
        }
    }
    for (i64 g = 0; g < G; g++)
        d_out[g] = skip[g] ? 0.0f : d[g];
}

/* ------------------------------------------------------------------------------------------- layout helpers */

/* Groups g < G of n consecutive values starting at x[base] -> columns of xt (n, ld). */
HOT static void gather(const float *restrict x, i64 base, i64 n, i64 G, float *restrict xt, i64 ld)
{
    for (i64 g = 0; g < G; g++)
        for (i64 i = 0; i < n; i++)
            xt[i * ld + g] = x[base + g * n + i];
}

/* Sequential sum(x^2) over count consecutive runs of sb values from x[start] -> out[:count]. */
HOT static void block_sumsq(const float *restrict x, i64 start, i64 count, i64 sb, float *restrict out)
{
    for (i64 s = 0; s < count; s++)
        out[s] = 0.0f;
    for (i64 e = 0; e < sb; e++)
        for (i64 s = 0; s < count; s++) {
            float v = x[start + s * sb + e];
            out[s] += v * v;
        }
}

/* qw[col] * sqrt(sigma2 + x^2) for xt (n, ld): group g covers columns (col0 + g*n) % ncol + i and uses
 * sigma2[g / per]. */
HOT static void imatrix_weights(const float *restrict xt, const float *restrict qw, i64 G, i64 n, i64 ld, i64 col0,
                                i64 ncol, const float *restrict sigma2, i64 per, float *restrict wt)
{
    for (i64 g = 0; g < G; g++) {
        i64 c = (col0 + g * n) % ncol;
        float s2 = sigma2[g / per];
        for (i64 i = 0; i < n; i++) {
            float v = xt[i * ld + g];
            wt[i * ld + g] = sqrtf(v * v + s2) * qw[c + i];
        }
    }
}

/* Per group, the sequential sum over its n entries (sum_w of the imatrix searches) -> out[:G]. */
HOT static void lane_sums(const float *restrict wt, i64 n, i64 ld, i64 G, float *restrict out)
{
    for (i64 g = 0; g < G; g++)
        out[g] = 0.0f;
    for (i64 i = 0; i < n; i++)
        for (i64 g = 0; g < G; g++)
            out[g] += wt[i * ld + g];
}

/* Re-quantize one sub-block of the row data xs (n contiguous weights) with the stored scale dj and offset mj:
 * codes clamp(nearest((x + mj) / dj), lo, hi) + add, or the search's codes (column g of L, (n, ld)) when dj == 0.
 * Types without an offset or a code bias pass mj = add = 0: that changes at most the sign of a zero, which the
 * integer code drops. */
static inline void requant(const float *restrict xs, i64 n, float dj, float mj, float lo, float hi, float add,
                           const float *restrict L, i64 ld, i64 g, int32_t *restrict Li)
{
    if (dj != 0.0f)
        for (i64 i = 0; i < n; i++)
            Li[i] = to_i32(clampf(nearest((xs[i] + mj) / dj), lo, hi) + add);
    else
        for (i64 i = 0; i < n; i++)
            Li[i] = to_i32(L[i * ld + g]);
}

/* ----------------------------------------------------------------------------------------- K-quant encoders */

/* Re-quantize the chunk's weights xc (S super-blocks) with the stored scales and write super-blocks c0 .. c0 + S
 * of Q4_K / Q5_K. ls / lm: 6-bit sub-block scales and mins; d / dmin: fp16-rounded super-block scales. */
HOT static void pack_q45k(const float *xc, const float *L, i64 ld, i64 c0, i64 S, int five, i64 ls[8][CHUNK_SB],
                          i64 lm[8][CHUNK_SB], const float *d, const float *dmin, uint8_t *out)
{
    const float fmax = five ? 31.0f : 15.0f;
    const i64 ts = five ? 176 : 144;
    int32_t Li[256];
    for (i64 s = 0; s < S; s++) {
        i64 o = (c0 + s) * ts;
        put_f16(out, o, d[s]);
        put_f16(out, o + 2, dmin[s]);
        for (int j = 0; j < 4; j++) {
            out[o + 4 + j] = (ls[j][s] | ((u64)(ls[j + 4][s] >> 4) << 6)) & 255;
            out[o + 8 + j] = (lm[j][s] | ((u64)(lm[j + 4][s] >> 4) << 6)) & 255;
            out[o + 12 + j] = ((ls[j + 4][s] & 15) | ((lm[j + 4][s] & 15) << 4)) & 255;
        }
        for (int j = 0; j < 8; j++) {
            float dj = d[s] * (float)ls[j][s], mj = dmin[s] * (float)lm[j][s];
            requant(xc + s * 256 + j * 32, 32, dj, mj, 0.0f, fmax, 0.0f, L, ld, s * 8 + j, Li + j * 32);
        }
        i64 q = o + 16;
        if (five) {
            for (int ln = 0; ln < 32; ln++) {
                uint32_t h = 0;
                for (int k = 0; k < 8; k++)
                    h |= (uint32_t)(Li[32 * k + ln] >> 4) << k;
                out[o + 16 + ln] = h & 255;
            }
            q = o + 48;
        }
        for (int c = 0; c < 4; c++)
            for (int ln = 0; ln < 32; ln++)
                out[q + 32 * c + ln] = ((Li[64 * c + ln] & 15) | ((Li[64 * c + 32 + ln] & 15) << 4)) & 255;
    }
}

/* quantize_row_q{4,5}_K_ref for super-blocks sb0 .. sb1 of the flat x (five: Q5_K). */
HOT static void enc_q45k_ref(const float *x, uint8_t *out, i64 sb0, i64 sb1, int five)
{
    const QkxCfg cfg = five ? (QkxCfg){31, -0.5f, 0.1f, 15, 0, 1} : (QkxCfg){15, -1.0f, 0.1f, 20, 0, 1};
    enum { LD = CHUNK_SB * 8 };
    float xt[32 * LD], wt[32 * LD], L[32 * LD], scale[LD], the_min[LD], av[LD], d[CHUNK_SB], dmin[CHUNK_SB];
    i64 ls[8][CHUNK_SB], lm[8][CHUNK_SB];
    for (i64 c0 = sb0; c0 < sb1; c0 += CHUNK_SB) {
        i64 S = sb1 - c0 < CHUNK_SB ? sb1 - c0 : CHUNK_SB, G = S * 8;
        gather(x, c0 * 256, 32, G, xt, LD);
        for (i64 g = 0; g < G; g++)
            av[g] = 0.0f;
        for (i64 i = 0; i < 32; i++)
            for (i64 g = 0; g < G; g++) {
                float v = xt[i * LD + g];
                av[g] += v * v;
            }
        for (i64 g = 0; g < G; g++)
            av[g] = sqrtf(av[g] / 32.0f);
        for (i64 i = 0; i < 32; i++)
            for (i64 g = 0; g < G; g++)
                wt[i * LD + g] = fabsf(xt[i * LD + g]) + av[g];
        qkx_lanes(xt, wt, 32, LD, G, cfg, L, scale, the_min);
        for (i64 s = 0; s < S; s++) {
            float max_scale = 0.0f, max_min = 0.0f;
            for (int j = 0; j < 8; j++) {
                float v = scale[s * 8 + j];
                max_scale = v > max_scale ? v : max_scale;
                v = the_min[s * 8 + j];
                max_min = v > max_min ? v : max_min;
            }
            float inv_s = max_scale > 0.0f ? 63.0f / max_scale : 0.0f;
            float inv_m = max_min > 0.0f ? 63.0f / max_min : 0.0f;
            for (int j = 0; j < 8; j++) {
                i64 a = to_i64(nearest(scale[s * 8 + j] * inv_s)) & 255;
                i64 b = to_i64(nearest(the_min[s * 8 + j] * inv_m)) & 255;
                ls[j][s] = a < 63 ? a : 63;
                lm[j][s] = b < 63 ? b : 63;
            }
            d[s] = f16_round(max_scale / 63.0f);
            dmin[s] = f16_round(max_min / 63.0f);
        }
        pack_q45k(x + c0 * 256, L, LD, c0, S, five, ls, lm, d, dmin, out);
    }
}

/* quantize_row_q{4,5}_K_impl (imatrix qw) for super-blocks sb0 .. sb1 of the flat x. */
HOT static void enc_q45k_imat(const float *x, i64 n_per_row, const float *qw, uint8_t *out, i64 sb0, i64 sb1, int five)
{
    const QkxCfg cfg = {five ? 31 : 15, -0.9f, 0.05f, 36, 0, 0};
    enum { LD = CHUNK_SB * 8 };
    float xt[32 * LD], wt[32 * LD], L[32 * LD], scale[LD], the_min[LD], sw[LD], sig[CHUNK_SB];
    float sc_t[8 * CHUNK_SB], mn_t[8 * CHUNK_SB], sw_t[8 * CHUNK_SB], Ls[8 * CHUNK_SB], Lm[8 * CHUNK_SB];
    float d_blk[CHUNK_SB], m_blk[CHUNK_SB], d[CHUNK_SB], dmin[CHUNK_SB];
    i64 ls[8][CHUNK_SB], lm[8][CHUNK_SB];
    for (i64 c0 = sb0; c0 < sb1; c0 += CHUNK_SB) {
        i64 S = sb1 - c0 < CHUNK_SB ? sb1 - c0 : CHUNK_SB, G = S * 8;
        gather(x, c0 * 256, 32, G, xt, LD);
        block_sumsq(x, c0 * 256, S, 256, sig);
        for (i64 s = 0; s < S; s++)
            sig[s] = (sig[s] * 2.0f) / 256.0f;
        imatrix_weights(xt, qw, G, 32, LD, c0 * 256, n_per_row, sig, 8, wt);
        lane_sums(wt, 32, LD, G, sw);
        qkx_lanes(xt, wt, 32, LD, G, cfg, L, scale, the_min);
        for (i64 s = 0; s < S; s++)
            for (int j = 0; j < 8; j++) {
                sc_t[j * CHUNK_SB + s] = scale[s * 8 + j];
                mn_t[j * CHUNK_SB + s] = the_min[s * 8 + j];
                sw_t[j * CHUNK_SB + s] = sw[s * 8 + j];
            }
        qp_lanes(sc_t, sw_t, 8, CHUNK_SB, S, 63, Ls, d_blk);
        qp_lanes(mn_t, sw_t, 8, CHUNK_SB, S, 63, Lm, m_blk);
        for (i64 s = 0; s < S; s++) {
            for (int j = 0; j < 8; j++) {
                ls[j][s] = to_i64(Ls[j * CHUNK_SB + s]) & 255;
                lm[j][s] = to_i64(Lm[j * CHUNK_SB + s]) & 255;
            }
            d[s] = f16_round(d_blk[s]);
            dmin[s] = f16_round(m_blk[s]);
        }
        pack_q45k(x + c0 * 256, L, LD, c0, S, five, ls, lm, d, dmin, out);
    }
}

/* Write one Q6_K super-block at out[o] from its weights xs and 16 sub-block scales (groups g0 .. g0 + 16 of the
 * chunk's codes L). */
HOT static void pack_q6k(const float *xs, const float *L, i64 ld, i64 g0, const float *scale, uint8_t *out, i64 o)
{
    i64 ls[16];
    int32_t Li[256];
    float amax = 0.0f, mxs = 0.0f;
    for (int j = 0; j < 16; j++) {
        float v = scale[j];
        if (fabsf(v) > amax) {
            amax = fabsf(v);
            mxs = v;
        }
    }
    if (fabsf(mxs) < EPS) {
        memset(out + o, 0, 210);
        return;
    }
    float iscale = -128.0f / mxs;
    float d = f16_round(1.0f / iscale);
    for (int j = 0; j < 16; j++) {
        float v = nearest(scale[j] * iscale);
        ls[j] = to_i64(v > 127.0f ? 127.0f : v);
    }
    for (int j = 0; j < 16; j++)
        requant(xs + 16 * j, 16, d * (float)ls[j], 0.0f, -32.0f, 31.0f, 32.0f, L, ld, g0 + j, Li + 16 * j);
    for (int h = 0; h < 2; h++)
        for (int ln = 0; ln < 32; ln++) {
            i64 e = 128 * h + ln;
            int32_t q1 = Li[e], q2 = Li[e + 32], q3 = Li[e + 64], q4 = Li[e + 96];
            out[o + 64 * h + ln] = ((q1 & 15) | ((q3 & 15) << 4)) & 255;
            out[o + 64 * h + 32 + ln] = ((q2 & 15) | ((q4 & 15) << 4)) & 255;
            uint32_t hi = (uint32_t)(q1 >> 4) | ((uint32_t)(q2 >> 4) << 2) | ((uint32_t)(q3 >> 4) << 4)
                          | ((uint32_t)(q4 >> 4) << 6);
            out[o + 128 + 32 * h + ln] = hi & 255;
        }
    for (int j = 0; j < 16; j++)
        out[o + 192 + j] = ls[j] & 255;
    put_f16(out, o + 208, d);
}

/* Q6_K super-blocks sb0 .. sb1 (210 bytes each), with imatrix qw when has_qw. */
HOT static void enc_q6k(const float *x, i64 n_per_row, const float *qw, int has_qw, uint8_t *out, i64 sb0, i64 sb1)
{
    enum { LD = CHUNK_SB * 16 };
    float xt[16 * LD], wt[16 * LD], L[16 * LD], scale[LD];
    for (i64 c0 = sb0; c0 < sb1; c0 += CHUNK_SB) {
        i64 S = sb1 - c0 < CHUNK_SB ? sb1 - c0 : CHUNK_SB, G = S * 16;
        gather(x, c0 * 256, 16, G, xt, LD);
        if (has_qw)
            for (i64 g = 0; g < G; g++) {
                i64 c = (c0 * 256 + g * 16) % n_per_row;
                for (i64 i = 0; i < 16; i++)
                    wt[i * LD + g] = qw[c + i];
            }
        qx_lanes(xt, wt, has_qw, 16, LD, G, 32, L, scale);
        for (i64 s = 0; s < S; s++)
            pack_q6k(x + (c0 + s) * 256, L, LD, s * 16, scale + s * 16, out, (c0 + s) * 210);
    }
}

/* Four 2-bit codes per byte: Li[e], Li[e + 32], Li[e + 64], Li[e + 96] for the two 128-halves. */
static inline void pack_crumbs(uint8_t *out, i64 pos, const int32_t *Li)
{
    for (int h = 0; h < 2; h++)
        for (int ln = 0; ln < 32; ln++) {
            i64 e = 128 * h + ln;
            uint32_t b = (uint32_t)Li[e] | ((uint32_t)Li[e + 32] << 2) | ((uint32_t)Li[e + 64] << 4)
                         | ((uint32_t)Li[e + 96] << 6);
            out[pos + 32 * h + ln] = b & 255;
        }
}

/* Re-quantize the chunk's weights xc and write Q3_K super-blocks c0 .. c0 + S: ls 6-bit scales stored +32, d
 * fp16-rounded. */
HOT static void pack_q3k(const float *xc, const float *L, i64 ld, i64 c0, i64 S, i64 ls[16][CHUNK_SB],
                         const float *d, uint8_t *out)
{
    int32_t Li[256];
    for (i64 s = 0; s < S; s++) {
        i64 o = (c0 + s) * 110;
        for (int j = 0; j < 8; j++)
            out[o + 96 + j] = ((ls[j][s] & 15) | ((ls[j + 8][s] & 15) << 4)) & 255;
        for (int m = 0; m < 4; m++)
            out[o + 104 + m] = (((ls[m][s] >> 4) & 3) | (((ls[4 + m][s] >> 4) & 3) << 2)
                                | (((ls[8 + m][s] >> 4) & 3) << 4) | (((ls[12 + m][s] >> 4) & 3) << 6)) & 255;
        put_f16(out, o + 108, d[s]);
        for (int j = 0; j < 16; j++) {
            float dj = d[s] * (float)((ls[j][s] & 63) - 32);
            requant(xc + s * 256 + j * 16, 16, dj, 0.0f, -4.0f, 3.0f, 4.0f, L, ld, s * 16 + j, Li + 16 * j);
        }
        for (int ln = 0; ln < 32; ln++) {
            uint32_t h = 0;
            for (int k = 0; k < 8; k++)
                h |= ((Li[32 * k + ln] >> 2) & 1) << k;
            out[o + ln] = h & 255;
        }
        for (int e = 0; e < 256; e++)
            Li[e] &= 3;
        pack_crumbs(out, o + 32, Li);
    }
}

/* quantize_row_q3_K_ref for super-blocks sb0 .. sb1 (110 bytes each). */
HOT static void enc_q3k_ref(const float *x, uint8_t *out, i64 sb0, i64 sb1)
{
    enum { LD = CHUNK_SB * 16 };
    float xt[16 * LD], wt[16 * LD], L[16 * LD], scale[LD], d[CHUNK_SB];
    i64 ls[16][CHUNK_SB];
    for (i64 c0 = sb0; c0 < sb1; c0 += CHUNK_SB) {
        i64 S = sb1 - c0 < CHUNK_SB ? sb1 - c0 : CHUNK_SB, G = S * 16;
        gather(x, c0 * 256, 16, G, xt, LD);
        q3_lanes(xt, 16, LD, G, 4, wt, L, scale);
        for (i64 s = 0; s < S; s++) {
            float amax = 0.0f, mxs = 0.0f;
            for (int j = 0; j < 16; j++) {
                float v = scale[s * 16 + j];
                if (fabsf(v) > amax) {
                    amax = fabsf(v);
                    mxs = v;
                }
            }
            if (mxs != 0.0f) {
                float iscale = -32.0f / mxs;
                for (int j = 0; j < 16; j++)
                    ls[j][s] = to_i64(clampf(nearest(scale[s * 16 + j] * iscale), -32.0f, 31.0f)) + 32;
                d[s] = f16_round(1.0f / iscale);
            } else {
                for (int j = 0; j < 16; j++)
                    ls[j][s] = 0;
                d[s] = 0.0f;
            }
        }
        pack_q3k(x + c0 * 256, L, LD, c0, S, ls, d, out);
    }
}

/* quantize_row_q3_K_impl (imatrix qw) for super-blocks sb0 .. sb1. */
HOT static void enc_q3k_imat(const float *x, i64 n_per_row, const float *qw, uint8_t *out, i64 sb0, i64 sb1)
{
    enum { LD = CHUNK_SB * 16 };
    float xt[16 * LD], wt[16 * LD], L[16 * LD], scale[LD], sw[LD], sig[CHUNK_SB];
    float sc_t[16 * CHUNK_SB], sw_t[16 * CHUNK_SB], Ls[16 * CHUNK_SB], d_blk[CHUNK_SB], d[CHUNK_SB];
    i64 ls[16][CHUNK_SB];
    for (i64 c0 = sb0; c0 < sb1; c0 += CHUNK_SB) {
        i64 S = sb1 - c0 < CHUNK_SB ? sb1 - c0 : CHUNK_SB, G = S * 16;
        gather(x, c0 * 256, 16, G, xt, LD);
        block_sumsq(x, c0 * 256, S, 256, sig);
        for (i64 s = 0; s < S; s++)
            sig[s] = (sig[s] * 2.0f) / 256.0f;
        imatrix_weights(xt, qw, G, 16, LD, c0 * 256, n_per_row, sig, 16, wt);
        qx_lanes(xt, wt, 1, 16, LD, G, 4, L, scale);
        lane_sums(wt, 16, LD, G, sw);
        for (i64 s = 0; s < S; s++)
            for (int j = 0; j < 16; j++) {
                sw_t[j * CHUNK_SB + s] = sw[s * 16 + j];
                sc_t[j * CHUNK_SB + s] = scale[s * 16 + j];
            }
        qx_lanes(sc_t, sw_t, 1, 16, CHUNK_SB, S, 32, Ls, d_blk);
        for (i64 s = 0; s < S; s++) {
            for (int j = 0; j < 16; j++)
                ls[j][s] = to_i64(Ls[j * CHUNK_SB + s]);
            d[s] = f16_round(d_blk[s]);
        }
        pack_q3k(x + c0 * 256, L, LD, c0, S, ls, d, out);
    }
}

/* Re-quantize the chunk's weights xc and write Q2_K super-blocks c0 .. c0 + S: byte = scale | min << 4 per
 * sub-block. */
HOT static void pack_q2k(const float *xc, const float *L, i64 ld, i64 c0, i64 S, i64 byte[16][CHUNK_SB],
                         const float *d, const float *dmin, uint8_t *out)
{
    int32_t Li[256];
    for (i64 s = 0; s < S; s++) {
        i64 o = (c0 + s) * 84;
        for (int j = 0; j < 16; j++) {
            out[o + j] = byte[j][s] & 255;
            float dj = d[s] * (float)(byte[j][s] & 15), mj = dmin[s] * (float)(byte[j][s] >> 4);
            requant(xc + s * 256 + j * 16, 16, dj, mj, 0.0f, 3.0f, 0.0f, L, ld, s * 16 + j, Li + 16 * j);
        }
        pack_crumbs(out, o + 16, Li);
        put_f16(out, o + 80, d[s]);
        put_f16(out, o + 82, dmin[s]);
    }
}

/* quantize_row_q2_K_ref for super-blocks sb0 .. sb1 (84 bytes each). */
HOT static void enc_q2k_ref(const float *x, uint8_t *out, i64 sb0, i64 sb1)
{
    static const QkxCfg cfg = {3, -0.5f, 0.1f, 15, 1, 1};
    enum { LD = CHUNK_SB * 16 };
    float xt[16 * LD], wt[16 * LD], L[16 * LD], scale[LD], the_min[LD], d[CHUNK_SB], dmin[CHUNK_SB];
    i64 byte[16][CHUNK_SB];
    for (i64 c0 = sb0; c0 < sb1; c0 += CHUNK_SB) {
        i64 S = sb1 - c0 < CHUNK_SB ? sb1 - c0 : CHUNK_SB, G = S * 16;
        gather(x, c0 * 256, 16, G, xt, LD);
        for (i64 i = 0; i < 16; i++)
            for (i64 g = 0; g < G; g++)
                wt[i * LD + g] = fabsf(xt[i * LD + g]);
        qkx_lanes(xt, wt, 16, LD, G, cfg, L, scale, the_min);
        for (i64 s = 0; s < S; s++) {
            float max_scale = 0.0f, max_min = 0.0f;
            for (int j = 0; j < 16; j++) {
                float v = scale[s * 16 + j];
                max_scale = v > max_scale ? v : max_scale;
                v = the_min[s * 16 + j];
                max_min = v > max_min ? v : max_min;
            }
            float inv_s = max_scale > 0.0f ? 15.0f / max_scale : 1.0f;
            float inv_m = max_min > 0.0f ? 15.0f / max_min : 1.0f;
            for (int j = 0; j < 16; j++) {
                i64 a = max_scale > 0.0f ? to_i64(nearest(scale[s * 16 + j] * inv_s)) : 0;
                i64 b = max_min > 0.0f ? to_i64(nearest(the_min[s * 16 + j] * inv_m)) : 0;
                byte[j][s] = ((u64)a | ((u64)b << 4)) & 255;
            }
            d[s] = f16_round(max_scale / 15.0f);
            dmin[s] = f16_round(max_min / 15.0f);
        }
        pack_q2k(x + c0 * 256, L, LD, c0, S, byte, d, dmin, out);
    }
}

/* quantize_row_q2_K_impl (imatrix qw) for super-blocks sb0 .. sb1. */
HOT static void enc_q2k_imat(const float *x, i64 n_per_row, const float *qw, uint8_t *out, i64 sb0, i64 sb1)
{
    static const QkxCfg cfg = {3, -0.9f, 0.05f, 36, 0, 0};
    enum { LD = CHUNK_SB * 16 };
    float xt[16 * LD], wt[16 * LD], L[16 * LD], scale[LD], the_min[LD], sw[LD], sig[CHUNK_SB];
    float sc_t[16 * CHUNK_SB], mn_t[16 * CHUNK_SB], sw_t[16 * CHUNK_SB], Ls[16 * CHUNK_SB], Lm[16 * CHUNK_SB];
    float d_blk[CHUNK_SB], m_blk[CHUNK_SB], d[CHUNK_SB], dmin[CHUNK_SB];
    i64 byte[16][CHUNK_SB];
    for (i64 c0 = sb0; c0 < sb1; c0 += CHUNK_SB) {
        i64 S = sb1 - c0 < CHUNK_SB ? sb1 - c0 : CHUNK_SB, G = S * 16;
        gather(x, c0 * 256, 16, G, xt, LD);
        block_sumsq(x, c0 * 256, S, 256, sig);
        for (i64 s = 0; s < S; s++)
            sig[s] = sig[s] / 256.0f;
        imatrix_weights(xt, qw, G, 16, LD, c0 * 256, n_per_row, sig, 16, wt);
        qkx_lanes(xt, wt, 16, LD, G, cfg, L, scale, the_min);
        lane_sums(wt, 16, LD, G, sw);
        for (i64 s = 0; s < S; s++)
            for (int j = 0; j < 16; j++) {
                sw_t[j * CHUNK_SB + s] = sw[s * 16 + j];
                sc_t[j * CHUNK_SB + s] = scale[s * 16 + j];
                mn_t[j * CHUNK_SB + s] = the_min[s * 16 + j];
            }
        qp_lanes(sc_t, sw_t, 16, CHUNK_SB, S, 15, Ls, d_blk);
        qp_lanes(mn_t, sw_t, 16, CHUNK_SB, S, 15, Lm, m_blk);
        for (i64 s = 0; s < S; s++) {
            for (int j = 0; j < 16; j++)
                byte[j][s] = ((u64)to_i64(Ls[j * CHUNK_SB + s]) | ((u64)to_i64(Lm[j * CHUNK_SB + s]) << 4)) & 255;
            d[s] = f16_round(d_blk[s]);
            dmin[s] = f16_round(m_blk[s]);
        }
        pack_q2k(x + c0 * 256, L, LD, c0, S, byte, d, dmin, out);
    }
}

/* ----------------------------------------------------------------------------------- legacy / IQ4 encoders */

/* 32 4-bit codes: element j in the low nibble, j + 16 in the high one. */
static inline void put_qs32(uint8_t *out, i64 pos, const int32_t *Li)
{
    for (int j = 0; j < 16; j++)
        out[pos + j] = ((Li[j] & 15) | ((Li[j + 16] & 15) << 4)) & 255;
}

/* Bit 4 of 32 codes as a little-endian u32. */
static inline void put_qh32(uint8_t *out, i64 pos, const int32_t *Li)
{
    uint32_t h = 0;
    for (int j = 0; j < 32; j++)
        h |= (uint32_t)((Li[j] >> 4) & 1) << j;
    for (int b = 0; b < 4; b++)
        out[pos + b] = (h >> (8 * b)) & 255;
}

/* Sequential sum(x^2) / n of row r. */
HOT static float row_sigma2(const float *x, i64 r, i64 n)
{
    float acc = 0.0f;
    for (i64 j = 0; j < n; j++) {
        float v = x[r * n + j];
        acc += v * v;
    }
    return acc / (float)n;
}

/* Codes min(top, trunc((x - shift) * scale + add)) of the 32 weights x -> qs (and qh) of the block at out[o]:
 * first all 32 codes, then the nibbles of the pairs (j, j + 16) that share a byte, then bit 4 of the 5-bit codes
 * as a little-endian u32 (separate loops, so each vectorizes). */
static inline void put_legacy_codes(uint8_t *restrict out, i64 o, i64 qs_col, int bits, const float *restrict x,
                                    float scale, float shift, float add, int32_t top, int clamp)
{
    int32_t q[32];
    for (int j = 0; j < 32; j++) {
        int32_t v = to_i32((x[j] - shift) * scale + add);
        q[j] = (clamp & (v > top)) ? top : v;
    }
    for (int j = 0; j < 16; j++)
        out[o + qs_col + j] = ((q[j] & 15) | ((q[j + 16] & 15) << 4)) & 255;
    if (bits == 5) {
        uint32_t h = 0;
        for (int j = 0; j < 32; j++)
            h |= (uint32_t)((q[j] >> 4) & 1) << j;
        for (int k = 0; k < 4; k++)
            out[o + qs_col - 4 + k] = (h >> (8 * k)) & 255;
    }
}

/* quantize_row_q{4,5}_0_ref for blocks b0 .. b1: d = max / -2^(bits-1) with max the block's first value of
 * largest magnitude (+0.0 for an all-zero block), codes min(top, trunc(x/d + half + 0.5)). The largest magnitude
 * is an integer max over the bit patterns of |x|; the first element with it gives the sign. */
HOT static void enc_legacy0_ref(const float *x, uint8_t *out, i64 b0, i64 b1, int bits)
{
    const i64 ts = bits == 4 ? 18 : 22;
    const int32_t half = 1 << (bits - 1), top = 2 * half - 1;
    const float add = (float)half + 0.5f, neg_half = (float)(-half);
    for (i64 b = b0; b < b1; b++) {
        i64 base = b * 32;
        uint32_t m = 0;
        for (int j = 0; j < 32; j++) {
            uint32_t a = fbits(x[base + j]) & 0x7FFFFFFF;
            m = a > m ? a : m;
        }
        float mx = 0.0f;
        for (int j = 0; j < 32; j++)
            if ((fbits(x[base + j]) & 0x7FFFFFFF) == m) {
                mx = x[base + j];
                break;
            }
        float d = (mx + 0.0f) / neg_half;
        float inv = d != 0.0f ? 1.0f / d : 0.0f;
        put_f16(out, b * ts, d);
        put_legacy_codes(out, b * ts, ts - 16, bits, x + base, inv, 0.0f, add, top, 1);
    }
}

/* Sortable key of a float's bit pattern (float order, -0.0 just below +0.0). */
static inline int32_t order_key(float v)
{
    int32_t k = (int32_t)fbits(v);
    return k ^ ((k >> 31) & 0x7FFFFFFF);
}

/* quantize_row_q{4,5}_1_ref for blocks b0 .. b1: d = (max - min) / (2^bits - 1), m = min, codes
 * trunc((x - min)/d + 0.5) (Q4_1 also clamps to 15). The extremes come from integer reductions over sortable
 * keys; a zero extreme then takes the sign of the block's first zero, as C's strict-compare loops do. */
HOT static void enc_legacy1_ref(const float *x, uint8_t *out, i64 b0, i64 b1, int bits)
{
    const i64 ts = bits == 4 ? 20 : 24;
    const int32_t top = (1 << bits) - 1;
    int32_t keys[32];
    for (i64 b = b0; b < b1; b++) {
        i64 base = b * 32;
        int32_t kmin = INT32_MAX, kmax = INT32_MIN;
        for (int j = 0; j < 32; j++) {
            int32_t k = order_key(x[base + j]);
            keys[j] = k;
            kmin = k < kmin ? k : kmin;
            kmax = k > kmax ? k : kmax;
        }
        float mn = 0.0f, mx = 0.0f;
        for (int j = 0; j < 32; j++)
            if (keys[j] == kmin) {
                mn = x[base + j];
                break;
            }
        for (int j = 0; j < 32; j++)
            if (keys[j] == kmax) {
                mx = x[base + j];
                break;
            }
        if (mn == 0.0f || mx == 0.0f)
            for (int j = 0; j < 32; j++) {
                float v = x[base + j];
                if (v == 0.0f) {
                    mn = mn == 0.0f ? v : mn;
                    mx = mx == 0.0f ? v : mx;
                    break;
                }
            }
        float d = (mx - mn) / (float)top;
        float inv = d != 0.0f ? 1.0f / d : 0.0f;
        put_f16(out, b * ts, d);
        put_f16(out, b * ts + 2, mn);
        put_legacy_codes(out, b * ts, ts - 16, bits, x + base, inv, mn, 0.5f, top, bits == 4);
    }
}

/* The min ggml stores for a Q{4,5}_1 block with an imatrix: +0.0 when zero, except in flat blocks
 * (max <= min), which keep the block's first minimum with its sign (the reference's first_min). */
static inline float legacy1_stored_min(const float *xt, i64 ld, i64 g, float search_min)
{
    float lo = xt[g], hi = xt[g];
    for (int j = 0; j < 32; j++) {
        float v = xt[j * ld + g];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    float lc = lo > 0.0f ? 0.0f : lo;
    return hi <= lc ? lo : (-search_min) + 0.0f;
}

/* quantize_row_q{4,5}_{0,1}_impl (imatrix qw) for rows r0 .. r1. */
HOT static void enc_legacy_imat(const float *x, i64 n_per_row, const float *qw, uint8_t *out, i64 r0, i64 r1, int bits,
                                int has_min)
{
    enum { LD = CHUNK_BLOCKS };
    const i64 nb_row = n_per_row / 32, ts = 2 + 2 * has_min + 4 * (bits == 5) + 16, qs_col = ts - 16;
    const QkxCfg cfg = {(1 << bits) - 1, -0.9f, 0.05f, 36, 0, 0};
    float xt[32 * LD], wt[32 * LD], L[32 * LD], dd[LD], mm[LD], sig[LD], sig_val = 0.0f;
    i64 sig_row = -1;
    int32_t Li[32];
    for (i64 c0 = r0 * nb_row, b1 = r1 * nb_row; c0 < b1; c0 += LD) {
        i64 G = b1 - c0 < LD ? b1 - c0 : LD;
        gather(x, c0 * 32, 32, G, xt, LD);
        for (i64 g = 0; g < G; g++) {
            i64 r = (c0 + g) / nb_row;
            if (r != sig_row) {
                sig_val = row_sigma2(x, r, n_per_row);
                sig_row = r;
            }
            sig[g] = sig_val;
        }
        imatrix_weights(xt, qw, G, 32, LD, c0 * 32, n_per_row, sig, 1, wt);
        if (has_min)
            qkx_lanes(xt, wt, 32, LD, G, cfg, L, dd, mm);
        else
            qx_lanes(xt, wt, 1, 32, LD, G, 1 << (bits - 1), L, dd);
        for (i64 g = 0; g < G; g++) {
            i64 o = (c0 + g) * ts;
            for (int j = 0; j < 32; j++)
                Li[j] = to_i32(L[j * LD + g]);
            put_f16(out, o, dd[g]);
            if (has_min)
                put_f16(out, o + 2, legacy1_stored_min(xt, LD, g, mm[g]));
            if (bits == 5)
                put_qh32(out, o + qs_col - 4, Li);
            put_qs32(out, o + qs_col, Li);
        }
    }
}

/* Q8_0 blocks b0 .. b1 (34 bytes each), as the reference: d = amax / 127, q = roundf(x / d). The largest |x| is
 * the largest bit pattern of |x| (finite weights). */
HOT static void enc_q8_0(const float *restrict x, uint8_t *restrict out, i64 b0, i64 b1)
{
    for (i64 b = b0; b < b1; b++) {
        const float *xb = x + b * 32;
        uint8_t *ob = out + b * 34;
        uint32_t m = 0;
        for (int j = 0; j < 32; j++) {
            uint32_t a = fbits(xb[j]) & 0x7FFFFFFF;
            m = a > m ? a : m;
        }
        float d = bitsf(m) / 127.0f;
        float inv = d == 0.0f ? 0.0f : 1.0f / d;
        put_f16(ob, 0, d);
        for (int j = 0; j < 32; j++) {
            float v = xb[j] * inv, a = fabsf(v);
            /* roundf: a - trunc(a) is exact, so ties are found exactly (a + 0.5f would round 0.49999997 up to
             * 1); a non-finite a (subnormal blocks) stays INT32_MIN, as the reference's conversion gives */
            uint32_t r = (uint32_t)to_i32(a);
            r += (a - (float)(int32_t)r >= 0.5f) & (r != 0x80000000u);
            ob[2 + j] = (v < 0.0f ? 0u - r : r) & 255;
        }
    }
}

/* The reference's nan_to_num_(nan=0.0): NaN -> 0, +-inf -> +-FLT_MAX. */
static inline float nan_to_num(float v)
{
    v = isnan(v) ? 0.0f : v;
    v = v == INFINITY ? FLT_MAX : v;
    return v == -INFINITY ? -FLT_MAX : v;
}

/* The grid indices of the 32 contiguous weights xs scaled by inv -> the 16 qs bytes at out[pos]. */
static inline void put_iq4_codes(uint8_t *restrict out, i64 pos, const float *restrict xs, float inv)
{
    int32_t Li[32];
    for (int j = 0; j < 32; j++)
        Li[j] = iq4_index((xs[j] * inv) * 2.0f);
    put_qs32(out, pos, Li);
}

/* Write one IQ4_XS super-block at out[o] from its 256 weights xs and eight 32-block scales d[0..8] (made finite in
 * place). */
HOT static void pack_iq4_xs(const float *xs, float *d, uint8_t *out, i64 o)
{
    i64 ls[8];
    float amax = 0.0f, mxs = 0.0f;
    for (int k = 0; k < 8; k++) {
        float v = nan_to_num(d[k]);
        d[k] = v;
        if (fabsf(v) > amax) {
            amax = fabsf(v);
            mxs = v;
        }
    }
    float dsb = (-(mxs + 0.0f)) / 32.0f;
    float inv = dsb != 0.0f ? 1.0f / dsb : 0.0f;
    u64 sh = 0;
    for (int k = 0; k < 8; k++) {
        float lv = clampf(nearest(inv * d[k]), -32.0f, 31.0f);
        float dl = dsb * lv;
        float idl = dl != 0.0f ? 1.0f / dl : 0.0f;
        put_iq4_codes(out, o + 8 + 16 * k, xs + 32 * k, idl);
        ls[k] = to_i64(lv) + 32;
        sh |= (u64)(ls[k] >> 4) << (2 * k);
    }
    put_f16(out, o, dsb);
    out[o + 2] = sh & 255;
    out[o + 3] = (sh >> 8) & 255;
    for (int k = 0; k < 4; k++)
        out[o + 4 + k] = ((ls[2 * k] & 15) | ((ls[2 * k + 1] & 15) << 4)) & 255;
}

/* IQ4_NL (xs false, 18-byte blocks) / IQ4_XS (136-byte super-blocks) for rows r0 .. r1, with imatrix qw when
 * has_qw. Returns 1 if an IQ4_NL block scale is not finite (the caller raises), else 0. */
HOT static int enc_iq4(const float *x, i64 n_per_row, const float *qw, int has_qw, uint8_t *out, i64 r0, i64 r1, int xs)
{
    enum { LD = CHUNK_BLOCKS };
    const i64 sb = xs ? 256 : 32, nsub = sb / 32, nb_row = n_per_row / 32;
    float xt[32 * LD], wt[32 * LD], d[LD], sig[LD];
    for (i64 c0 = r0 * nb_row, b1 = r1 * nb_row; c0 < b1; c0 += LD) {
        i64 G = b1 - c0 < LD ? b1 - c0 : LD;
        gather(x, c0 * 32, 32, G, xt, LD);
        if (has_qw) {
            i64 nsb = G / nsub;
            block_sumsq(x, c0 * 32, nsb, sb, sig);
            for (i64 s = 0; s < nsb; s++)
                sig[s] = sig[s] * (2.0f / (float)sb);
            imatrix_weights(xt, qw, G, 32, LD, c0 * 32, n_per_row, sig, nsub, wt);
        } else {
            for (i64 i = 0; i < 32; i++)
                for (i64 g = 0; g < G; g++)
                    wt[i * LD + g] = xt[i * LD + g] * xt[i * LD + g];
        }
        iq4_scales_lanes(xt, wt, 32, LD, G, d);
        if (xs) {
            for (i64 s = 0; s < G / 8; s++)
                pack_iq4_xs(x + (c0 + s * 8) * 32, d + s * 8, out, ((c0 + s * 8) / 8) * 136);
            continue;
        }
        for (i64 g = 0; g < G; g++) {
            float dg = d[g];
            if (!isfinite(dg))
                return 1;
            float inv = dg != 0.0f ? 1.0f / dg : 0.0f;
            i64 o = (c0 + g) * 18;
            put_f16(out, o, dg);
            put_iq4_codes(out, o + 2, x + (c0 + g) * 32, inv);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ entry points */

enum { Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, N_TYPES };

/* Weights per block of each type id (the order of _cpu_fast.TYPES). */
static const i64 BLOCK_SIZE[N_TYPES] = {32, 32, 32, 32, 32, 256, 256, 256, 256, 256, 32, 256};

/* Bumped whenever an entry point's signature or a type id changes; the Python loader checks it. */
int qf_abi_version(void) { return 2; }

/* Quantize rows r0 .. r1 of the C-contiguous float32 matrix x (n_per_row columns) as type type_id into out (the
 * whole tensor's bytes, row-major); qw is the float32 imatrix (n_per_row,) or NULL. Rows are independent, so
 * threads may fill disjoint row ranges of the same out concurrently.
 * Returns 0 on success, 1 when an IQ4_NL block scale is not finite, -1 for an unknown type id. */
int qf_quantize_rows(int type_id, const float *x, i64 n_per_row, const float *qw, uint8_t *out, i64 r0, i64 r1)
{
    if (type_id < 0 || type_id >= N_TYPES)
        return -1;
    const i64 s0 = r0 * (n_per_row / BLOCK_SIZE[type_id]), s1 = r1 * (n_per_row / BLOCK_SIZE[type_id]);
    const int has_qw = qw != NULL;
    switch (type_id) {
    case Q4_K:
    case Q5_K:
        if (has_qw)
            enc_q45k_imat(x, n_per_row, qw, out, s0, s1, type_id == Q5_K);
        else
            enc_q45k_ref(x, out, s0, s1, type_id == Q5_K);
        return 0;
    case Q6_K:
        enc_q6k(x, n_per_row, qw, has_qw, out, s0, s1);
        return 0;
    case Q3_K:
        if (has_qw)
            enc_q3k_imat(x, n_per_row, qw, out, s0, s1);
        else
            enc_q3k_ref(x, out, s0, s1);
        return 0;
    case Q2_K:
        if (has_qw)
            enc_q2k_imat(x, n_per_row, qw, out, s0, s1);
        else
            enc_q2k_ref(x, out, s0, s1);
        return 0;
    case Q8_0:
        enc_q8_0(x, out, s0, s1);
        return 0;
    case IQ4_NL:
    case IQ4_XS:
        return enc_iq4(x, n_per_row, qw, has_qw, out, r0, r1, type_id == IQ4_XS);
    default: {
        int bits = type_id == Q5_0 || type_id == Q5_1 ? 5 : 4, has_min = type_id == Q4_1 || type_id == Q5_1;
        if (has_qw)
            enc_legacy_imat(x, n_per_row, qw, out, r0, r1, bits, has_min);
        else if (has_min)
            enc_legacy1_ref(x, out, s0, s1, bits);
        else
            enc_legacy0_ref(x, out, s0, s1, bits);
        return 0;
    }
    }
}

/* Widen count 16-bit floats (bf16 when is_bf16, else IEEE fp16; both as bit patterns) to float32 in out, exactly,
 * and return how many are NaN or infinite: the exporter's load-convert-check of each row chunk in one pass. */
i64 qf_widen_f32(const uint16_t *src, float *out, i64 count, int is_bf16)
{
    i64 bad = 0;
    if (is_bf16) {
        for (i64 i = 0; i < count; i++) {
            uint32_t u = (uint32_t)src[i] << 16;
            bad += (u & 0x7F800000u) == 0x7F800000u;
            memcpy(&out[i], &u, sizeof u);
        }
    } else {
        for (i64 i = 0; i < count; i++) {
            bad += (src[i] & 0x7C00u) == 0x7C00u;
            out[i] = f16_value(src[i]);
        }
    }
    return bad;
}

/* How many of count float32 values are NaN or infinite. */
i64 qf_count_nonfinite(const float *x, i64 count)
{
    i64 bad = 0;
    for (i64 i = 0; i < count; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        bad += (u & 0x7F800000u) == 0x7F800000u;
    }
    return bad;
}

/* The fp16 bit patterns of count floats (tests check the conversion against NumPy's). */
void qf_f16_bits(const float *x, uint16_t *out, i64 count)
{
    for (i64 i = 0; i < count; i++)
        out[i] = (uint16_t)f16_bits(x[i]);
}

/* The float32 values of count fp16 bit patterns. */
void qf_f16_values(const uint16_t *h, float *out, i64 count)
{
    for (i64 i = 0; i < count; i++)
        out[i] = f16_value(h[i]);
}

/* ------------------------------------------------------ lattice i-quants (IQ1_S/M, IQ2_XXS/XS/S, IQ3_XXS/S)
 * The searches of kernels/_iq_common.py and the codecs iq*.py, one block at a time: each group's float32 sums run
 * left to right in the reference's operation order. Work that is independent in the reference is batched so that
 * the compiler vectorizes across it without reordering any one sum:
 *   - the neighbours of an off-lattice key, IQ_LANES per step (one neighbour per lane); a neighbour's error is the
 *     sum over positions of err_table terms, each term the reference's own weight * diff * diff for that level;
 *   - the scale trials of a block (levels, lattice points, least-squares sums with one trial per lane), followed by
 *     the reference's running best in trial order;
 *   - the (i1, i2) splits of IQ1_S / IQ1_M (one split per lane): a row of splits is walked in order, with the
 *     reference's comparison, only when some split of it beats the running best as it stands before the row.
 * The lattice tables come from Python: coords (2*level+1 per point) and map (point per key or -1) of
 * kernels/_iq_grids.py SearchTables, and the layout of kernels/_cpu_fast.py lane_tables: code (per dense key
 * sum(level_i * base^i): its point, or -(offset + 1) of its neighbour block in lanes) and lanes (16-bit words per
 * block: the neighbour count, then per IQ_LANES neighbours, in the reference's order, their points' level words and
 * their point indices). */

typedef struct {
    const float *coords;
    const i64 *map;
    int dim, bits;
    const int32_t *code;
    const uint16_t *lanes;
    int base;
} IqTables;

enum { IQ_XXS2, IQ_XS2, IQ_XXS3, IQ1S, IQ1M, IQ3S, IQ2S, N_IQ };
enum { IQ_LANES = 16, MAX_TRIALS = 32 };

/* Inlined into the HOT (per-ISA) callers, so that every copy of a search is compiled for the caller's ISA. */
#define INL static inline __attribute__((always_inline))

/* Level values 2*l+1 of the IQ2 / IQ3 lattices (the coordinates of their points). */
static const float ODD[16] = {1.0f,  3.0f,  5.0f,  7.0f,  9.0f,  11.0f, 13.0f, 15.0f,
                               17.0f, 19.0f, 21.0f, 23.0f, 25.0f, 27.0f, 29.0f, 31.0f};

/* err[l * dim + i] = wt[i] * diff * diff with diff = scale * vals[l] - x[i]: the term of position i in the weighted
 * error of a lattice point whose level there is l, for levels 0 .. nlev-1. */
INL void err_table(int dim, int nlev, const float *vals, const float *x, const float *wt, float scale, float *err)
{
    for (int l = 0; l < nlev; l++)
        for (int i = 0; i < dim; i++) {
            float diff = scale * vals[l] - x[i];
            err[l * dim + i] = wt[i] * diff * diff;
        }
}

/* GCC / Clang vectors of IQ_LANES lanes (one machine vector on AVX-512, split by the compiler elsewhere). Every
 * float operation on them is the same IEEE operation per lane; vsel picks bits. */
typedef float vf16 __attribute__((vector_size(4 * IQ_LANES)));
typedef int32_t vi16 __attribute__((vector_size(4 * IQ_LANES)));
typedef uint16_t vu16 __attribute__((vector_size(2 * IQ_LANES)));

#define VZERO ((vf16){0.0f})
/* Lanes of a where mask m is set (all ones), else of b. */
#define VSEL(m, a, b) ((vf16)(((m) & (vi16)(a)) | (~(m) & (vi16)(b))))

/* The IQ_LANES point words of one step of a neighbour list, widened to lanes. */
INL vi16 lane_words(const uint16_t *lw)
{
    vu16 raw;
    memcpy(&raw, lw, sizeof raw);
    return __builtin_convertvector(raw, vi16);
}

/* One list step's lane errors acc (the first m lanes live, their point indices at idx) folded into the running least
 * (best, gi), the first lane on ties; branch-free, as the outcome is data-dependent. */
INL void keep_least(vf16 acc, int32_t m, const uint16_t *idx, float *best, i64 *gi)
{
    float d2[IQ_LANES];
    memcpy(d2, &acc, sizeof d2);
    for (int32_t j = 0; j < m; j++) {
        const int better = d2[j] < *best;
        *best = better ? d2[j] : *best;
        *gi = better ? idx[j] : *gi;
    }
}

/* The neighbour of least error (err as err_table makes it) in the neighbour block blk of an off-lattice key of a
 * dim 8 lattice, the first on ties: the reference's loop over the neighbour list with a strict `<` from +inf (the
 * first neighbour when none is below +inf). Levels are 0..2, at bits 2i and 2i+1 of a point's word; the lists (up to
 * a few hundred) go IQ_LANES neighbours at a time, each lane summing ((0 + e_0) + e_1) + ... in position order. */
INL i64 best_neighbour(const uint16_t *blk, const float *err)
{
    const int32_t cnt = blk[0];
    const uint16_t *lw = blk + 1;
    float best = INFINITY;
    i64 gi = lw[IQ_LANES];
    for (int32_t c = 0; c < cnt; c += IQ_LANES, lw += 2 * IQ_LANES) {
        const int32_t m = cnt - c < IQ_LANES ? cnt - c : IQ_LANES;
        const vi16 w = lane_words(lw);
        vf16 acc = VZERO;
        for (int i = 0; i < 8; i++) {
            const vi16 hi = (w & (2 << (2 * i))) != 0, lo = (w & (1 << (2 * i))) != 0;
            acc += VSEL(hi, VZERO + err[16 + i], VSEL(lo, VZERO + err[8 + i], VZERO + err[i]));
        }
        keep_least(acc, m, lw + IQ_LANES, &best, &gi);
    }
    return gi;
}

/* best_neighbour for a dim 4 lattice (levels 0..7 at bits 3i of a point's word; lists of a few): the terms of the
 * error come from lane tables tab[i] (lane l: the err_table term of level l at position i), one permute each. */
INL i64 best_neighbour4(const uint16_t *blk, const vf16 *tab)
{
    const int32_t cnt = blk[0];
    const uint16_t *lw = blk + 1;
    float best = INFINITY;
    i64 gi = lw[IQ_LANES];
    for (int32_t c = 0; c < cnt; c += IQ_LANES, lw += 2 * IQ_LANES) {
        const int32_t m = cnt - c < IQ_LANES ? cnt - c : IQ_LANES;
        const vi16 w = lane_words(lw);
        vf16 acc = VZERO;
        for (int i = 0; i < 4; i++)
            acc += __builtin_shuffle(tab[i], (w >> (3 * i)) & 7);
        keep_least(acc, m, lw + IQ_LANES, &best, &gi);
    }
    return gi;
}

/* The dense key of levels l_0 .. l_{dim-1} (each below base): sum of l_i * base^i, the index into code. */
INL int32_t dense_key(int dim, int base, const float *lev)
{
    int32_t key = 0;
    for (int i = dim - 1; i >= 0; i--)
        key = key * base + (int32_t)lev[i];
    return key;
}

/* Levels nearest(0.5 * (inv * x - 1)) clamped to 0 .. kmax-1 of n weights (as floats). */
INL void trial_levels(int n, const float *xv, float inv, int kmax, float *lev)
{
    for (int i = 0; i < n; i++)
        lev[i] = clampf(nearest(0.5f * (inv * xv[i] - 1.0f)), 0.0f, (float)(kmax - 1));
}

/* group_point for a group whose code (t->code of its key) was looked up beforehand. */
INL i64 code_point(const IqTables *t, int dim, int nlev, const float *vals, int32_t code, const float *x,
                   const float *wt, float scale, int *on)
{
    *on = code >= 0;
    if (code >= 0)
        return code;
    if (dim == 4) { /* the err_table terms of levels 0..15 per position as lane tables, built in registers */
        vf16 v, tab[4];
        memcpy(&v, vals, sizeof v);
        for (int i = 0; i < 4; i++) {
            const vf16 diff = v * scale - x[i];
            tab[i] = diff * wt[i] * diff;
        }
        return best_neighbour4(t->lanes + (-(i64)code - 1), tab);
    }
    float err[64];
    err_table(dim, nlev, vals, x, wt, scale, err);
    return best_neighbour(t->lanes + (-(i64)code - 1), err);
}

/* The lattice point of one group of dim weights with levels lev: the key's point, or its neighbour of least error
 * at scale (value levels vals, nlev of them, term weights wt); *on tells whether the key was a point. */
INL i64 group_point(const IqTables *t, int dim, int nlev, const float *vals, const float *lev, const float *x,
                    const float *wt, float scale, int *on)
{
    return code_point(t, dim, nlev, vals, t->code[dense_key(dim, t->base, lev)], x, wt, scale, on);
}

/* Re-snap the groups of one block at scale (levels at 1 / scale); only those with redo[k] when redo is not NULL. */
INL void resnap(const IqTables *t, int dim, int n, const float *xv, const float *wa, float scale, int kmax,
                const int *redo, float *q)
{
    float lev[32], inv = 1.0f / scale;
    int on;
    trial_levels(n, xv, inv, kmax, lev);
    for (int k = 0; k < n / dim; k++) {
        if (redo && !redo[k])
            continue;
        i64 gi = group_point(t, dim, dim == 8 ? 3 : 8, ODD, lev + k * dim, xv + k * dim, wa + k * dim, scale, &on);
        for (int i = 0; i < dim; i++)
            q[k * dim + i] = t->coords[gi * dim + i];
    }
}

INL void iq_lsq(int n, const float *w, const float *xv, const float *q, float *sumqx, float *sumq2)
{
    float a = 0.0f, b = 0.0f;
    for (int i = 0; i < n; i++) {
        a += w[i] * xv[i] * q[i];
        b += w[i] * q[i] * q[i];
    }
    *sumqx = a;
    *sumq2 = b;
}

/* The scale trials inv[0 .. ntr-1] of one block of n weights (groups of dim): levels at inv[k], every group on the
 * lattice at scale 1 / inv[k], the least-squares sums of all trials at once (a trial per lane, each sum in weight
 * order), then the reference's running best in trial order (sumq2 > 0 and strictly better). *scale and *best are
 * updated as the reference updates them; q and on get the accepted trial's coordinates and on-lattice flags (left
 * as they are when no trial is accepted). */
INL void scale_trials(const IqTables *t, int dim, int n, const float *xv, const float *w, const float *wa,
                      const float *inv, int ntr, int kmax, float *scale, float *best, float *q, int *on)
{
    float qt[32 * MAX_TRIALS], lev[32], a[MAX_TRIALS], b[MAX_TRIALS];
    int ont[8 * MAX_TRIALS];
    int32_t code[8 * MAX_TRIALS];
    const int ng = n / dim;
    /* The keys of every trial first, and the neighbour blocks they need requested from memory, so that the
     * searches below find them in cache. */
    for (int k = 0; k < ntr; k++) {
        trial_levels(n, xv, inv[k], kmax, lev);
        for (int g = 0; g < ng; g++) {
            const int32_t cd = t->code[dense_key(dim, t->base, lev + g * dim)];
            code[g * MAX_TRIALS + k] = cd;
            if (cd < 0)
                __builtin_prefetch(t->lanes + (-(i64)cd - 1));
        }
    }
    for (int k = 0; k < ntr; k++) {
        const float sc = 1.0f / inv[k];
        for (int g = 0; g < ng; g++) {
            i64 gi = code_point(t, dim, dim == 8 ? 3 : 8, ODD, code[g * MAX_TRIALS + k], xv + g * dim, wa + g * dim,
                                sc, &ont[g * MAX_TRIALS + k]);
            for (int i = 0; i < dim; i++)
                qt[(g * dim + i) * MAX_TRIALS + k] = t->coords[gi * dim + i];
        }
    }
    for (int k = 0; k < ntr; k++)
        a[k] = b[k] = 0.0f;
    for (int i = 0; i < n; i++) {
        const float wx = w[i] * xv[i], wi = w[i], *qi = qt + i * MAX_TRIALS;
        for (int k = 0; k < ntr; k++) {
            a[k] += wx * qi[k];
            b[k] += wi * qi[k] * qi[k];
        }
    }
    int sel = -1;
    for (int k = 0; k < ntr; k++) {
        if (b[k] > 0 && a[k] * a[k] > *best * b[k]) {
            *scale = a[k] / b[k];
            *best = *scale * a[k];
            sel = k;
        }
    }
    if (sel < 0)
        return;
    for (int i = 0; i < n; i++)
        q[i] = qt[i * MAX_TRIALS + sel];
    for (int g = 0; g < ng; g++)
        on[g] = ont[g * MAX_TRIALS + sel];
}

/* |x| per weight and the 7 stored sign bits per group of 8 (an odd count of minus signs flips back the weight of
 * least w * x * x, the first on ties). */
INL void iq_fold(int n, const float *x, const float *w, float *xv, i64 *signs)
{
    for (int k = 0; k < n / 8; k++) {
        int nflip = 0;
        i64 s = 0;
        for (int i = 0; i < 8; i++) {
            float v = x[8 * k + i];
            if (v >= 0) {
                xv[8 * k + i] = v;
            } else {
                xv[8 * k + i] = -v;
                nflip++;
                s |= (i64)1 << i;
            }
        }
        if (nflip % 2) {
            int imin = 0;
            float mn = w[8 * k] * x[8 * k] * x[8 * k];
            for (int i = 1; i < 8; i++) {
                float a = w[8 * k + i] * x[8 * k + i] * x[8 * k + i];
                if (a < mn) {
                    mn = a;
                    imin = i;
                }
            }
            xv[8 * k + imin] = -xv[8 * k + imin];
            s ^= (i64)1 << imin;
        }
        signs[k] = s & 127;
    }
}

/* fminf(hi, v) for a hi that is not NaN, inlined: v when below hi, else hi (also for a NaN v). */
INL float below(float v, float hi) { return v < hi ? v : hi; }

/* make_qp_quants(n, nmax, x, (uint8_t *) L, w): the scale, with the codes stored as uint8 (kernels/_iq_common.py
 * qp_scale). */
INL float iq_qp_scale(int n, int nmax, const float *x, const float *w)
{
    float mx = 0.0f;
    for (int i = 0; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    if (mx < EPS)
        return 0.0f;
    uint8_t L[32];
    float iscale = (float)nmax / mx;
    for (int i = 0; i < n; i++)
        L[i] = (uint8_t)(int32_t)nearest(iscale * x[i]);
    float scale = 1.0f / iscale, best = 0.0f;
    for (int i = 0; i < n; i++) {
        float diff = x[i] - scale * (float)L[i];
        best += w[i] * diff * diff;
    }
    for (int is = -4; is <= 4; is++) {
        if (is == 0)
            continue;
        float isc = ((float)is * TENTH + (float)nmax) / mx, sc = 1.0f / isc, mse = 0.0f;
        for (int i = 0; i < n; i++) {
            float l = below(nearest(isc * x[i]), (float)nmax);
            float diff = x[i] - sc * l;
            mse += w[i] * diff * diff;
        }
        if (mse < best) {
            best = mse;
            iscale = isc;
        }
    }
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; i++) {
        float l = below(nearest(iscale * x[i]), (float)nmax);
        L[i] = (uint8_t)(int32_t)l;
        sumlx += w[i] * x[i] * l;
        suml2 += w[i] * l * l;
    }
    for (int pass = 0; pass < 5; pass++) {
        int changed = 0;
        for (int i = 0; i < n; i++) {
            float li = (float)L[i];
            float slx = sumlx - w[i] * x[i] * li, sl2 = suml2 - w[i] * li * li;
            if (slx > 0 && sl2 > 0) {
                float nl = below(nearest(x[i] * sl2 / slx), (float)nmax);
                if (nl != li) {
                    slx += w[i] * x[i] * nl;
                    sl2 += w[i] * nl * nl;
                    if (slx * slx * suml2 > sumlx * sumlx * sl2) {
                        L[i] = (uint8_t)(int32_t)nl;
                        sumlx = slx;
                        suml2 = sl2;
                        changed++;
                    }
                }
            }
        }
        if (!changed)
            break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}


/* kernels/_iq_common.py trial_search on one block of n weights in groups of dim (IQ2_XS, IQ3_XXS, IQ3_S, IQ2_S);
 * q gets the coordinates. */
INL float iq_trial_search(const IqTables *t, int dim, int n, const float *xv, const float *w, const float *wa,
                          float mx, int top, float step, int ntr, int kmax, int resnap_all, float *q)
{
    const int ng = n / dim;
    float inv[MAX_TRIALS], best = 0.0f, scale = mx / (float)top, sumqx, sumq2;
    int on[8];
    for (int i = 0; i < n; i++)
        q[i] = 1.0f;
    for (int k = 0; k < ng; k++)
        on[k] = !resnap_all;
    for (int is = -ntr; is <= ntr; is++)
        inv[is + ntr] = ((float)is * step + (float)top) / mx;
    scale_trials(t, dim, n, xv, w, wa, inv, 2 * ntr + 1, kmax, &scale, &best, q, on);
    int off = 0, redo[8];
    for (int k = 0; k < ng; k++) {
        off += !on[k];
        redo[k] = !on[k] || resnap_all;
    }
    if (off > 0 && scale > 0) {
        resnap(t, dim, n, xv, wa, scale, kmax, redo, q);
        iq_lsq(n, w, xv, q, &sumqx, &sumq2);
        if (sumq2 > 0)
            scale = sumqx / sumq2;
    }
    return scale;
}

/* The IQ2_XXS search of one 32-weight block (kernels/iq2_xxs.py _encode); returns the scale, q the coordinates,
 * or 0 with *live = 0 for a block ggml skips. */
INL float iq2_xxs_search(const IqTables *t, const float *xv, const float *w, const float *wa, float *q, int *live)
{
    float mx = xv[0], sumqx, sumq2, inv[13];
    int on[4];
    for (int i = 1; i < 32; i++)
        mx = xv[i] > mx ? xv[i] : mx;
    *live = 0;
    if (mx < EPS)
        return 0.0f;
    float scale = iq_qp_scale(32, 4, xv, w), eff_max = scale * 3.0f;
    if (eff_max <= 0)
        return 0.0f;
    *live = 1;
    float best = 0.0f;
    for (int i = 0; i < 32; i++)
        q[i] = 0.0f;
    for (int is = -6; is <= 6; is++)
        inv[is + 6] = (5.0f + (float)is * TENTH) / eff_max;
    scale_trials(t, 8, 32, xv, w, wa, inv, 13, 3, &scale, &best, q, on);
    if (scale > 0) {
        resnap(t, 8, 32, xv, wa, scale, 3, NULL, q);
        iq_lsq(32, w, xv, q, &sumqx, &sumq2);
        if (sumq2 > 0)
            scale = sumqx / sumq2;
    }
    return scale;
}

INL i64 iq_point(const IqTables *t, const float *q)
{
    i64 key = 0;
    for (int i = 0; i < t->dim; i++)
        key |= (i64)((q[i] - 1.0f) * 0.5f) << (t->bits * i);
    return t->map[key];
}

static void put_le(uint8_t *out, u64 v, int nbytes)
{
    for (int i = 0; i < nbytes; i++)
        out[i] = (uint8_t)(v >> (8 * i));
}

/* One super-block of 256 weights of kind (IQ_XXS2, IQ_XS2, IQ_XXS3) into y. */
HOT static void iq_superblock(int kind, const IqTables *t, const float *x, const float *qw, uint8_t *y)
{
    const int bs = kind == IQ_XS2 ? 16 : 32, nb = 256 / bs;
    float sumx2 = 0.0f, w[256], wa[256], xv[256], q[256], scales[16], max_scale = 0.0f;
    i64 signs[32], idx[64];
    int live[16];
    for (int i = 0; i < 256; i++)
        sumx2 += x[i] * x[i];
    float sigma2 = (kind == IQ_XXS3 ? 2.0f * sumx2 : sumx2) / 256.0f;
    for (int i = 0; i < 256; i++) {
        w[i] = qw ? qw[i] * sqrtf(sigma2 + x[i] * x[i]) : x[i] * x[i];
        wa[i] = sqrtf(w[i]);
    }
    for (int ib = 0; ib < nb; ib++) {
        const int o = ib * bs, ng = bs / t->dim;
        float s;
        iq_fold(bs, x + o, w + o, xv + o, signs + ib * (bs / 8));
        if (kind == IQ_XXS2) {
            s = iq2_xxs_search(t, xv + o, w + o, wa + o, q + o, &live[ib]);
        } else {
            float mx = xv[o];
            for (int i = 1; i < bs; i++)
                mx = xv[o + i] > mx ? xv[o + i] : mx;
            live[ib] = !(mx < (kind == IQ_XXS3 ? 1e-8f : EPS));
            if (!live[ib])
                s = 0.0f;
            else if (kind == IQ_XXS3)
                s = iq_trial_search(t, 4, 32, xv + o, w + o, wa + o, mx, 15, 0.2f, 15, 8, 0, q + o);
            else
                s = iq_trial_search(t, 8, 16, xv + o, w + o, wa + o, mx, 5, TENTH, 9, 3, 0, q + o);
        }
        if (!live[ib]) {
            scales[ib] = 0.0f;
            continue;
        }
        if (s < 0) {
            s = -s;
            for (int k = 0; k < bs / 8; k++)
                signs[ib * (bs / 8) + k] = (~signs[ib * (bs / 8) + k]) & 127;
        }
        for (int k = 0; k < ng; k++)
            idx[ib * ng + k] = iq_point(t, q + o + k * t->dim);
        scales[ib] = s;
        max_scale = s > max_scale ? s : max_scale;
    }
    const i64 ts = kind == IQ_XXS2 ? 66 : kind == IQ_XS2 ? 74 : 98;
    memset(y, 0, (size_t)ts);
    if (!(max_scale > 0))
        return;
    float d = max_scale / 31.0f, inv = 1.0f / d;
    put_f16(y, 0, kind == IQ_XXS3 ? d * 1.0125f : d);
    for (int ib = 0; ib < nb; ib++) {
        u64 l = (u64)clampf(nearest(0.5f * (inv * scales[ib] - 1.0f)), 0.0f, 15.0f);
        if (kind == IQ_XS2) {
            y[66 + ib / 2] |= (uint8_t)(l << (4 * (ib % 2)));
            for (int k = 0; k < 2 && live[ib]; k++)
                put_le(y + 2 + 4 * ib + 2 * k, (u64)idx[2 * ib + k] | ((u64)signs[2 * ib + k] << 9), 2);
            continue;
        }
        u64 word = l << 28;
        for (int k = 0; k < 4 && live[ib]; k++)
            word |= (u64)signs[4 * ib + k] << (7 * k);
        if (kind == IQ_XXS2) {
            u64 grid = 0;
            for (int k = 0; k < 4 && live[ib]; k++)
                grid |= (u64)idx[4 * ib + k] << (8 * k);
            put_le(y + 2 + 8 * ib, grid, 4);
            put_le(y + 6 + 8 * ib, word, 4);
        } else {
            for (int k = 0; k < 8 && live[ib]; k++)
                y[2 + 8 * ib + k] = (uint8_t)idx[8 * ib + k];
            put_le(y + 66 + 4 * ib, word, 4);
        }
    }
}


/* IQ1_S (kernels/iq1_s.py): one super-block of 256 weights into the 50 bytes at y. */
HOT static void iq1s_superblock(const IqTables *t, const float *x, const float *qw, uint8_t *y)
{
    static const float XP[3] = {-0.875f, 0.125f, 1.125f}, XM[3] = {-1.125f, -0.125f, 0.875f};
    float sumx2 = 0.0f, scales[8], max_scale = 0.0f;
    int shifts[8];
    u64 qh[8] = {0};
    memset(y, 0, 50);
    for (int i = 0; i < 256; i++)
        sumx2 += x[i] * x[i];
    float sigma2 = 2.0f * sumx2 / 256.0f;
    for (int ib = 0; ib < 8; ib++) {
        const float *xb = x + 32 * ib;
        float w[32], sx[33], sw[33];
        int ord[32], L[32];
        float mx = fabsf(xb[0]);
        for (int i = 0; i < 32; i++)
            w[i] = qw[32 * ib + i] * sqrtf(sigma2 + xb[i] * xb[i]);
        for (int i = 1; i < 32; i++)
            mx = fabsf(xb[i]) > mx ? fabsf(xb[i]) : mx;
        scales[ib] = 0.0f;
        shifts[ib] = 1;
        if (mx < 1e-12f)
            continue;
        for (int j = 0; j < 32; j++) { /* stable insertion sort by value */
            int v = j, k = j;
            while (k > 0 && xb[ord[k - 1]] > xb[v]) {
                ord[k] = ord[k - 1];
                k--;
            }
            ord[k] = v;
        }
        sx[0] = sw[0] = 0.0f;
        for (int j = 0; j < 32; j++) {
            sx[j + 1] = sx[j] + w[ord[j]] * xb[ord[j]];
            sw[j + 1] = sw[j] + w[ord[j]];
        }
        float best = -FLT_MAX, scale = mx;
        int b1 = -1, b2 = -1, bs = 0;
        for (int i1 = 0; i1 <= 32; i1++) {
            float rx[2][33], r2[2][33];
            int hit = 0;
            for (int s = 0; s < 2; s++) {
                const float *p = s == 0 ? XP : XM;
                for (int i2 = i1; i2 <= 32; i2++) {
                    float sqx = (sx[i1] - sx[0]) * p[0] + (sx[i2] - sx[i1]) * p[1] + (sx[32] - sx[i2]) * p[2];
                    float sq2 = (sw[i1] - sw[0]) * p[0] * p[0] + (sw[i2] - sw[i1]) * p[1] * p[1] +
                                (sw[32] - sw[i2]) * p[2] * p[2];
                    rx[s][i2] = sqx;
                    r2[s][i2] = sq2;
                    hit |= (sq2 > 0) & (sqx * sqx > best * sq2);
                }
            }
            if (!hit) /* no split of this row beats best, which only these splits could have changed */
                continue;
            for (int i2 = i1; i2 <= 32; i2++) {
                for (int s = 0; s < 2; s++) {
                    float sqx = rx[s][i2], sq2 = r2[s][i2];
                    if (sq2 > 0 && sqx * sqx > best * sq2) {
                        scale = sqx / sq2;
                        best = scale * sqx;
                        b1 = i1;
                        b2 = i2;
                        bs = s == 0 ? 1 : -1;
                    }
                }
            }
        }
        if (b1 < 0)
            continue;
        for (int j = 0; j < 32; j++)
            L[ord[j]] = j < b1 ? 0 : j < b2 ? 1 : 2;
        if (scale < 0) {
            for (int j = 0; j < 32; j++)
                L[j] = 2 - L[j];
            scale = -scale;
            bs = -bs;
        }
        const float *xx = bs == 1 ? XP : XM;
        i64 index[4];
        int all_on = 1;
        for (int k = 0; k < 4; k++) {
            int32_t key = 0;
            for (int j = 7; j >= 0; j--)
                key = key * 3 + L[8 * k + j];
            i64 gi = t->code[key];
            if (gi < 0) {
                float err[32];
                all_on = 0;
                err_table(8, 3, xx, xb + 8 * k, w + 8 * k, scale, err);
                gi = best_neighbour(t->lanes + (-gi - 1), err);
            }
            index[k] = gi;
        }
        if (!all_on) {
            float sumqx = 0.0f, sumq2 = 0.0f;
            for (int k = 0; k < 4; k++) {
                for (int j = 0; j < 8; j++) {
                    float q = xx[(int)((t->coords[index[k] * 8 + j] - 1.0f) * 0.5f)];
                    sumqx += w[8 * k + j] * q * xb[8 * k + j];
                    sumq2 += w[8 * k + j] * q * q;
                }
            }
            if (sumqx > 0 && sumq2 > 0)
                scale = sumqx / sumq2;
        }
        for (int k = 0; k < 4; k++) {
            y[2 + 4 * ib + k] = (uint8_t)(index[k] & 255);
            qh[ib] |= (u64)(index[k] >> 8) << (3 * k);
        }
        scales[ib] = scale;
        shifts[ib] = bs;
        max_scale = scale > max_scale ? scale : max_scale;
    }
    if (max_scale > 0) {
        float d = max_scale / 15.0f, inv = 1.0f / d;
        put_f16(y, 0, d * 1.125f);
        for (int ib = 0; ib < 8; ib++) {
            u64 l = (u64)clampf(nearest(0.5f * (inv * scales[ib] - 1.0f)), 0.0f, 7.0f);
            qh[ib] |= (l | (shifts[ib] == -1 ? 8u : 0u)) << 12;
        }
    }
    for (int ib = 0; ib < 8; ib++)
        put_le(y + 34 + 2 * ib, qh[ib], 2);
}


/* Move a group of 8 (levels L) onto the IQ1 lattice: its point, or the neighbour of least weighted error with
 * level values xx (ggml iq1_find_best_neighbour2). Sets *on to 0 when the group was off the lattice. */
INL i64 iq1_point(const IqTables *t, const int *L, const float *xb, const float *w, float scale, const float *xx,
                  int *on)
{
    int32_t key = 0;
    for (int j = 7; j >= 0; j--)
        key = key * 3 + L[j];
    i64 gi = t->code[key];
    if (gi >= 0)
        return gi;
    *on = 0;
    float err[32];
    err_table(8, 3, xx, xb, w, scale, err);
    return best_neighbour(t->lanes + (-gi - 1), err);
}

static inline int iq1_level(const IqTables *t, i64 gi, int j) { return (int)((t->coords[gi * 8 + j] - 1.0f) * 0.5f); }

/* IQ1_M (kernels/iq1_m.py): one super-block of 256 weights into the 56 bytes at y; qw may be NULL. */
HOT static void iq1m_superblock(const IqTables *t, const float *x, const float *qw, uint8_t *y)
{
    static const float XP[3] = {-0.875f, 0.125f, 1.125f}, XM[3] = {-1.125f, -0.125f, 0.875f};
    static const uint8_t MASK[4] = {0x00, 0x80, 0x08, 0x88};
    float sumx2 = 0.0f, scales[16], max_scale = 0.0f, w[256];
    int shifts[16];
    i64 index[32] = {0};
    memset(y, 0, 56);
    for (int i = 0; i < 256; i++)
        sumx2 += x[i] * x[i];
    float sigma2 = 2.0f * sumx2 / 256.0f;
    for (int i = 0; i < 256; i++)
        w[i] = qw ? qw[i] * sqrtf(sigma2 + x[i] * x[i]) : x[i] * x[i];
    const float p2 = XP[2], m2 = XM[2];
    const float cp1 = XP[0] * XP[0] - XP[1] * XP[1], cp2 = XP[1] * XP[1] - XP[2] * XP[2];
    const float cm1 = XM[0] * XM[0] - XM[1] * XM[1], cm2 = XM[1] * XM[1] - XM[2] * XM[2];
    for (int ib = 0; ib < 16; ib++) {
        const float *xb = x + 16 * ib, *wb = w + 16 * ib;
        float px[2][17], pw[2][17];
        int ord[16], L[16];
        float mx = fabsf(xb[0]);
        for (int i = 1; i < 16; i++)
            mx = fabsf(xb[i]) > mx ? fabsf(xb[i]) : mx;
        scales[ib] = 0.0f;
        shifts[ib] = 0;
        if (mx < 1e-7f)
            continue;
        for (int j = 0; j < 16; j++) {
            int v = j, k = j;
            while (k > 0 && xb[ord[k - 1]] > xb[v]) {
                ord[k] = ord[k - 1];
                k--;
            }
            ord[k] = v;
        }
        px[0][0] = px[1][0] = pw[0][0] = pw[1][0] = 0.0f;
        for (int j = 0; j < 16; j++) {
            const int i = ord[j], h = i < 8 ? 0 : 1;
            px[h][j + 1] = px[h][j] + wb[i] * xb[i];
            px[1 - h][j + 1] = px[1 - h][j];
            pw[h][j + 1] = pw[h][j] + wb[i];
            pw[1 - h][j + 1] = pw[1 - h][j];
        }
        float best = -FLT_MAX, scale = mx;
        int b1 = -1, b2 = -1, bk = -1;
        for (int i1 = 0; i1 <= 16; i1++) {
            float sqx[4][17], sq2[4][17];
            int hit = 0;
            for (int i2 = i1; i2 <= 16; i2++) {
                float qxp[2], qxm[2], q2p[2], q2m[2];
                for (int h = 0; h < 2; h++) {
                    float sx = px[h][i1] + px[h][i2];
                    qxp[h] = px[h][16] * p2 - sx;
                    qxm[h] = px[h][16] * m2 - sx;
                    q2p[h] = pw[h][16] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
                    q2m[h] = pw[h][16] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
                }
                sqx[0][i2] = qxp[0] + qxp[1];
                sqx[1][i2] = qxp[0] + qxm[1];
                sqx[2][i2] = qxm[0] + qxp[1];
                sqx[3][i2] = qxm[0] + qxm[1];
                sq2[0][i2] = q2p[0] + q2p[1];
                sq2[1][i2] = q2p[0] + q2m[1];
                sq2[2][i2] = q2m[0] + q2p[1];
                sq2[3][i2] = q2m[0] + q2m[1];
                for (int k = 0; k < 4; k++)
                    hit |= (sq2[k][i2] > 0) & (sqx[k][i2] * sqx[k][i2] > best * sq2[k][i2]);
            }
            if (!hit) /* no split of this row beats best, which only these splits could have changed */
                continue;
            for (int i2 = i1; i2 <= 16; i2++) {
                for (int k = 0; k < 4; k++) {
                    if (sq2[k][i2] > 0 && sqx[k][i2] * sqx[k][i2] > best * sq2[k][i2]) {
                        scale = sqx[k][i2] / sq2[k][i2];
                        best = scale * sqx[k][i2];
                        b1 = i1;
                        b2 = i2;
                        bk = k;
                    }
                }
            }
        }
        if (b1 < 0)
            continue;
        for (int j = 0; j < 16; j++)
            L[ord[j]] = j < b1 ? 0 : j < b2 ? 1 : 2;
        if (scale < 0) {
            for (int j = 0; j < 16; j++)
                L[j] = 2 - L[j];
            scale = -scale;
            bk = 3 - bk;
        }
        const float *xx[2] = {bk < 2 ? XP : XM, bk % 2 == 0 ? XP : XM};
        int on = 1;
        for (int k = 0; k < 2; k++)
            index[2 * ib + k] = iq1_point(t, L + 8 * k, xb + 8 * k, wb + 8 * k, scale, xx[k], &on);
        if (!on) {
            float sumqx = 0.0f, sumq2 = 0.0f;
            for (int k = 0; k < 2; k++) {
                for (int j = 0; j < 8; j++) {
                    float q = xx[k][iq1_level(t, index[2 * ib + k], j)];
                    sumqx += wb[8 * k + j] * q * xb[8 * k + j];
                    sumq2 += wb[8 * k + j] * q * q;
                }
            }
            if (sumqx > 0 && sumq2 > 0)
                scale = sumqx / sumq2;
        }
        scales[ib] = scale;
        shifts[ib] = bk;
        max_scale = scale > max_scale ? scale : max_scale;
    }
    u64 qh[16], sc[4] = {0};
    for (int ib = 0; ib < 16; ib++) {
        y[2 * ib] = (uint8_t)(index[2 * ib] & 255);
        y[2 * ib + 1] = (uint8_t)(index[2 * ib + 1] & 255);
        qh[ib] = (u64)(index[2 * ib] >> 8) | ((u64)(index[2 * ib + 1] >> 8) << 4);
    }
    if (max_scale > 0) {
        float d = max_scale / 15.0f, inv = 1.0f / d, sumqx = 0.0f, sumq2 = 0.0f;
        for (int ib = 0; ib < 16; ib++) {
            int l = (int)clampf(nearest(0.5f * (inv * scales[ib] - 1.0f)), 0.0f, 7.0f);
            sc[ib / 4] |= (u64)l << (3 * (ib % 4));
            qh[ib] |= MASK[shifts[ib]];
            for (int k = 0; k < 2; k++) {
                const float *xx = (k == 0 ? shifts[ib] < 2 : shifts[ib] % 2 == 0) ? XP : XM;
                for (int j = 0; j < 8; j++) {
                    const int i = 16 * ib + 8 * k + j;
                    float q = xx[iq1_level(t, index[2 * ib + k], j)] * (float)(2 * l + 1);
                    sumqx += w[i] * q * x[i];
                    sumq2 += w[i] * q * q;
                }
            }
        }
        if (sumq2 > 0)
            d = sumqx / sumq2;
        u64 s = (u64)f16_bits(d * 1.1125f);
        sc[0] |= (s & 0x000F) << 12;
        sc[1] |= (s & 0x00F0) << 8;
        sc[2] |= (s & 0x0F00) << 4;
        sc[3] |= s & 0xF000;
    }
    for (int ib = 0; ib < 16; ib++)
        y[32 + ib] = (uint8_t)qh[ib];
    for (int i = 0; i < 4; i++)
        put_le(y + 48 + 2 * i, sc[i], 2);
}


/* |x| and all 8 sign bits per group of 8 weights (IQ3_S and IQ2_S store every sign, unlike iq_fold's 7); returns
 * the largest |x| of the block (ggml's first-to-last max loop). */
INL float fold_all_signs(int groups, const float *x, float *xv, u64 *signs)
{
    for (int k = 0; k < groups; k++) {
        signs[k] = 0;
        for (int i = 0; i < 8; i++) {
            float v = x[8 * k + i];
            if (v >= 0) {
                xv[8 * k + i] = v;
            } else {
                xv[8 * k + i] = -v;
                signs[k] |= (u64)1 << i;
            }
        }
    }
    float mx = xv[0];
    for (int i = 1; i < 8 * groups; i++)
        mx = xv[i] > mx ? xv[i] : mx;
    return mx;
}

/* IQ3_S (kernels/iq3_s.py): one super-block of 256 weights into the 110 bytes at y; qw may be NULL. An all-zero
 * block does not advance the qs / signs write position (as in ggml). */
HOT static void iq3s_superblock(const IqTables *t, const float *x, const float *qw, uint8_t *y)
{
    float sumx2 = 0.0f, w[256], wa[256], xv[256], q[32], scales[8], max_scale = 0.0f;
    int slot = 0;
    memset(y, 0, 110);
    for (int i = 0; i < 256; i++)
        sumx2 += x[i] * x[i];
    float sigma2 = 2.0f * sumx2 / 256.0f;
    for (int i = 0; i < 256; i++) {
        w[i] = qw ? qw[i] * sqrtf(sigma2 + x[i] * x[i]) : x[i] * x[i];
        wa[i] = sqrtf(w[i]);
    }
    for (int ib = 0; ib < 8; ib++) {
        const int o = 32 * ib;
        u64 signs[4];
        float mx = fold_all_signs(4, x + o, xv + o, signs);
        scales[ib] = 0.0f;
        if (mx == 0)
            continue;
        float s = iq_trial_search(t, 4, 32, xv + o, w + o, wa + o, mx, 15, 0.2f, 9, 8, 1, q);
        if (s < 0) {
            s = -s;
            for (int k = 0; k < 4; k++)
                signs[k] = (~signs[k]) & 255;
        }
        for (int k = 0; k < 8; k++) {
            i64 gi = iq_point(t, q + 4 * k);
            y[2 + 8 * slot + k] = (uint8_t)(gi & 255);
            y[66 + ib] |= (uint8_t)((gi >> 8) << k);
        }
        for (int k = 0; k < 4; k++)
            y[74 + 4 * slot + k] = (uint8_t)signs[k];
        slot++;
        scales[ib] = s;
        max_scale = s > max_scale ? s : max_scale;
    }
    if (!(max_scale > 0))
        return;
    float d = max_scale / 31.0f, inv = 1.0f / d;
    put_f16(y, 0, d * 1.033f);
    for (int ib = 0; ib < 8; ib++) {
        u64 l = (u64)clampf(nearest(0.5f * (inv * scales[ib] - 1.0f)), 0.0f, 15.0f);
        y[106 + ib / 2] |= (uint8_t)(l << (4 * (ib % 2)));
    }
}

/* IQ2_S (kernels/iq2_s.py): one super-block of 256 weights into the 82 bytes at y; qw may be NULL. */
HOT static void iq2s_superblock(const IqTables *t, const float *x, const float *qw, uint8_t *y)
{
    float sumx2 = 0.0f, w[256], wa[256], xv[256], q[16], scales[16], max_scale = 0.0f;
    memset(y, 0, 82);
    for (int i = 0; i < 256; i++)
        sumx2 += x[i] * x[i];
    float sigma2 = 2.0f * sumx2 / 256.0f;
    for (int i = 0; i < 256; i++) {
        w[i] = qw ? qw[i] * sqrtf(sigma2 + x[i] * x[i]) : 0.25f * sigma2 + x[i] * x[i];
        wa[i] = sqrtf(w[i]);
    }
    for (int ib = 0; ib < 16; ib++) {
        const int o = 16 * ib;
        u64 signs[2];
        float mx = fold_all_signs(2, x + o, xv + o, signs);
        scales[ib] = 0.0f;
        if (mx < 1e-8f)
            continue;
        float s = iq_trial_search(t, 8, 16, xv + o, w + o, wa + o, mx, 5, TENTH, 9, 3, 0, q);
        if (s < 0) {
            s = -s;
            for (int k = 0; k < 2; k++)
                signs[k] = (~signs[k]) & 255;
        }
        for (int k = 0; k < 2; k++) {
            const int g = 2 * ib + k;
            i64 gi = iq_point(t, q + 8 * k);
            y[2 + g] = (uint8_t)(gi & 255);
            y[34 + g] = (uint8_t)signs[k];
            y[66 + g / 4] |= (uint8_t)((gi >> 8) << (2 * (g % 4)));
        }
        scales[ib] = s;
        max_scale = s > max_scale ? s : max_scale;
    }
    if (!(max_scale > 0))
        return;
    float d = max_scale / 31.0f, inv = 1.0f / d;
    put_f16(y, 0, d * 0.9875f);
    for (int ib = 0; ib < 16; ib++) {
        u64 l = (u64)clampf(nearest(0.5f * (inv * scales[ib] - 1.0f)), 0.0f, 15.0f);
        y[74 + ib / 2] |= (uint8_t)(l << (4 * (ib % 2)));
    }
}

/* Quantize rows r0 .. r1 of x (n_per_row columns, a multiple of 256) as IQ2_XXS (kind 0), IQ2_XS (1), IQ3_XXS (2)
 * IQ1_S (3), IQ1_M (4), IQ3_S (5) or IQ2_S (6) into out (the whole tensor's bytes); qw is the imatrix
 * (n_per_row,) or NULL (IQ3_XXS, IQ1_M, IQ3_S and IQ2_S only). The lattice tables are those of kernels/_iq_grids.py
 * search_tables with the lanes of kernels/_cpu_fast.py lane_tables. With next NULL the caller's thread does rows
 * r0 .. r1 itself; otherwise every thread calling with the same next (a counter set to r0) takes the next row
 * until none is left, so threads that run slower (a shared machine) do fewer rows. Returns 0, or -1 for a bad
 * kind. */
int qf_iq_encode_rows(int kind, const float *x, i64 n_per_row, const float *qw, uint8_t *out, i64 r0, i64 r1,
                      const float *coords, const i64 *map, const int32_t *code, const uint16_t *lanes, i64 *next)
{
    if (kind < 0 || kind >= N_IQ || ((kind == IQ_XXS2 || kind == IQ_XS2 || kind == IQ1S) && qw == NULL))
        return -1;
    const int iq3 = kind == IQ_XXS3 || kind == IQ3S;
    IqTables t = {coords, map, iq3 ? 4 : 8, iq3 ? 3 : 2, code, lanes, iq3 ? 8 : 3};
    static const i64 TYPE_SIZE[N_IQ] = {66, 74, 98, 50, 56, 110, 82};
    const i64 ts = TYPE_SIZE[kind];
    const i64 nsb = n_per_row / 256;
    for (i64 r = r0; r < r1; r++) {
        if (next) {
            r = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
            if (r >= r1)
                break;
        }
        for (i64 s = 0; s < nsb; s++) {
            const float *xs = x + r * n_per_row + 256 * s, *qs = qw ? qw + 256 * s : NULL;
            if (kind == IQ1S)
                iq1s_superblock(&t, xs, qs, out + (r * nsb + s) * ts);
            else if (kind == IQ1M)
                iq1m_superblock(&t, xs, qs, out + (r * nsb + s) * ts);
            else if (kind == IQ3S)
                iq3s_superblock(&t, xs, qs, out + (r * nsb + s) * ts);
            else if (kind == IQ2S)
                iq2s_superblock(&t, xs, qs, out + (r * nsb + s) * ts);
            else
                iq_superblock(kind, &t, xs, qs, out + (r * nsb + s) * ts);
        }
    }
    return 0;
}

static struct PyModuleDef cquant_module = {
    PyModuleDef_HEAD_INIT, "_cquant",
    "quantforge's C quantizers; loaded through ctypes by quantforge.kernels._cpu_fast (no Python methods).", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cquant(void) { return PyModule_Create(&cquant_module); }
