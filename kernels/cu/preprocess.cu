// kiln_preprocess: uint8 HWC images (RGB/BGR/RGBA, any size, row pitch) -> resize (bilinear,
// half-pixel centres; or antialiasing triangle filter on downscaled axes) -> centre crop or
// letterbox -> channel order / luma -> x*scale + offset -> NCHW or NHWC -> FP32 or FP16,
// written into slot (first_slot + image) of the batch tensor. One launch covers a whole batch
// of differently sized images: grid = (ceil(out_h*out_w / (2*blockDim.x)), n_images), two
// consecutive output pixels per thread, all channels.
//
// This is the same math as kernels/src/preprocess/cpu.rs, operation for operation: every
// float op is an explicit round-to-nearest intrinsic (__fadd_rn, __fmul_rn, ...), which
// NVRTC never contracts into an FMA, so the GPU output equals the CPU reference to the bit.
//
// No includes at all: NVRTC has no host headers, and cuda_fp16.h needs an include path, so
// the FP16 conversion is one PTX instruction (cvt.rn = round to nearest even, as
// half::f16::from_f32 on the CPU).
__device__ __forceinline__ unsigned short f32_to_f16_bits(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// Per-image descriptor: DESC_WORDS u32 words, floats stored as their bits (see gpu.rs).
#define DESC_WORDS 16
#define D_OFF_LO 0
#define D_OFF_HI 1
#define D_W 2
#define D_H 3
#define D_PITCH 4
#define D_FMT 5
#define D_RW 6
#define D_RH 7
#define D_START_X 8
#define D_START_Y 9
#define D_RATIO_X 10
#define D_RATIO_Y 11
#define D_INV_X 12
#define D_INV_Y 13
#define D_AA_X 14
#define D_AA_Y 15

#define FMT_BGR 1
#define FMT_RGBA 2
#define CH_BGR 1
#define CH_GRAY 2
#define LAYOUT_NHWC 1

#define TAP_LERP 0
#define TAP_TRI 1
#define TAP_PAD 2

// How one output index of one axis reads the source (cpu.rs: Taps).
struct Taps {
    int mode;
    int lo;      // first source index
    int hi;      // LERP: second index; TRI: one past the last index
    float frac;  // LERP: weight of hi
    float center;  // TRI: filter centre in source coordinates
    float inv;     // TRI: 1 / ratio
    float sum;     // TRI: sum of the weights, accumulated in index order
};

__device__ __forceinline__ float tri_weight(int j, float center, float inv) {
    float t = __fmul_rn(__fsub_rn(__fadd_rn((float)j, 0.5f), center), inv);
    return fmaxf(__fsub_rn(1.0f, fabsf(t)), 0.0f);
}

__device__ Taps axis_taps(int o, int src, int resized, int start, float ratio, float inv, int aa,
                          int letterbox) {
    Taps t;
    int r = o + start;
    int last = src - 1;
    t.frac = 0.0f;
    t.center = 0.0f;
    t.inv = inv;
    t.sum = 0.0f;
    if (letterbox && (r < 0 || r >= resized)) {
        t.mode = TAP_PAD;
        t.lo = 0;
        t.hi = 0;
        return t;
    }
    if (aa) {
        // Repeat the edge where a centre-cropped output overhangs the resized image.
        r = min(max(r, 0), resized - 1);
        float center = __fmul_rn(__fadd_rn((float)r, 0.5f), ratio);
        int lo = (int)floorf(__fadd_rn(__fsub_rn(center, ratio), 0.5f));
        int hi = (int)floorf(__fadd_rn(__fadd_rn(center, ratio), 0.5f));
        lo = max(lo, 0);
        hi = min(hi, src);
        float sum = 0.0f;
        for (int j = lo; j < hi; ++j) sum = __fadd_rn(sum, tri_weight(j, center, inv));
        t.mode = TAP_TRI;
        t.lo = lo;
        t.hi = hi;
        t.center = center;
        t.sum = sum;
    } else {
        float pos = __fsub_rn(__fmul_rn(__fadd_rn((float)r, 0.5f), ratio), 0.5f);
        pos = fminf(fmaxf(pos, 0.0f), (float)last);
        float lof = floorf(pos);
        t.mode = TAP_LERP;
        t.lo = (int)lof;
        t.hi = min(t.lo + 1, last);
        t.frac = __fsub_rn(pos, lof);
    }
    return t;
}

struct Src {
    const unsigned char* base;
    unsigned long long pitch;
    int bpp;
    int ro, go, bo;
};

__device__ __forceinline__ void load_px(const Src& s, int y, int x, float p[3]) {
    const unsigned char* q = s.base + (unsigned long long)y * s.pitch + (unsigned long long)x * s.bpp;
    p[0] = (float)q[s.ro];
    p[1] = (float)q[s.go];
    p[2] = (float)q[s.bo];
}

// Source row y resampled along x (cpu.rs: row).
__device__ void resample_row(const Src& s, int y, const Taps& xt, float out[3]) {
    if (xt.mode == TAP_LERP) {
        float a[3], b[3];
        load_px(s, y, xt.lo, a);
        load_px(s, y, xt.hi, b);
        for (int c = 0; c < 3; ++c) out[c] = __fadd_rn(a[c], __fmul_rn(__fsub_rn(b[c], a[c]), xt.frac));
    } else {
        float acc[3] = {0.0f, 0.0f, 0.0f};
        for (int j = xt.lo; j < xt.hi; ++j) {
            float w = tri_weight(j, xt.center, xt.inv);
            float p[3];
            load_px(s, y, j, p);
            for (int c = 0; c < 3; ++c) acc[c] = __fadd_rn(acc[c], __fmul_rn(w, p[c]));
        }
        for (int c = 0; c < 3; ++c) out[c] = __fdiv_rn(acc[c], xt.sum);
    }
}

// The resampled RGB value of output pixel (oy, ox) of the image `d` describes.
__device__ void sample_pixel(const unsigned int* d, const Src& s, int oy, int ox, int letterbox, float pad_r,
                             float pad_g, float pad_b, float v[3]) {
    const Taps yt = axis_taps(oy, (int)d[D_H], (int)d[D_RH], (int)d[D_START_Y], __uint_as_float(d[D_RATIO_Y]),
                              __uint_as_float(d[D_INV_Y]), (int)d[D_AA_Y], letterbox);
    const Taps xt = axis_taps(ox, (int)d[D_W], (int)d[D_RW], (int)d[D_START_X], __uint_as_float(d[D_RATIO_X]),
                              __uint_as_float(d[D_INV_X]), (int)d[D_AA_X], letterbox);

    if (yt.mode == TAP_PAD || xt.mode == TAP_PAD) {
        v[0] = pad_r;
        v[1] = pad_g;
        v[2] = pad_b;
    } else if (yt.mode == TAP_LERP) {
        float t[3], b[3];
        resample_row(s, yt.lo, xt, t);
        resample_row(s, yt.hi, xt, b);
        for (int c = 0; c < 3; ++c) v[c] = __fadd_rn(t[c], __fmul_rn(__fsub_rn(b[c], t[c]), yt.frac));
    } else {
        float acc[3] = {0.0f, 0.0f, 0.0f};
        for (int j = yt.lo; j < yt.hi; ++j) {
            float w = tri_weight(j, yt.center, yt.inv);
            float r[3];
            resample_row(s, j, xt, r);
            for (int c = 0; c < 3; ++c) acc[c] = __fadd_rn(acc[c], __fmul_rn(w, r[c]));
        }
        for (int c = 0; c < 3; ++c) v[c] = __fdiv_rn(acc[c], yt.sum);
    }
}

// Channel order / luma: `ch` gets the output channels, the count is returned.
__device__ __forceinline__ int map_channels(int channels, const float v[3], float ch[3]) {
    int n = 3;
    if (channels == CH_GRAY) {
        n = 1;
        ch[0] = __fadd_rn(__fadd_rn(__fmul_rn(0.299f, v[0]), __fmul_rn(0.587f, v[1])), __fmul_rn(0.114f, v[2]));
    } else if (channels == CH_BGR) {
        ch[0] = v[2];
        ch[1] = v[1];
        ch[2] = v[0];
    } else {
        ch[0] = v[0];
        ch[1] = v[1];
        ch[2] = v[2];
    }
    return n;
}

__device__ __forceinline__ float normalise(float x, int c, const float scale[3], const float offset[3]) {
    return __fadd_rn(__fmul_rn(x, scale[c]), offset[c]);
}

extern "C" __global__ void kiln_preprocess(
    const unsigned char* __restrict__ src, const unsigned int* __restrict__ desc, void* __restrict__ out,
    unsigned long long first_slot, int out_h, int out_w, int channels, int layout, int letterbox, int f16,
    float pad_r, float pad_g, float pad_b, float scale0, float scale1, float scale2, float offset0,
    float offset1, float offset2) {
    // Two consecutive output pixels per thread: the descriptor and source set-up are shared,
    // and an FP16 NCHW pair goes out as one aligned 32-bit store.
    const int plane = out_h * out_w;
    const int p0 = (blockIdx.x * blockDim.x + threadIdx.x) * 2;
    if (p0 >= plane) return;
    const bool two = p0 + 1 < plane;
    const int img = blockIdx.y;
    const unsigned int* d = desc + (unsigned long long)img * DESC_WORDS;

    Src s;
    s.base = src + (((unsigned long long)d[D_OFF_HI] << 32) | d[D_OFF_LO]);
    s.pitch = d[D_PITCH];
    const int fmt = (int)d[D_FMT];
    s.bpp = fmt == FMT_RGBA ? 4 : 3;
    s.ro = fmt == FMT_BGR ? 2 : 0;
    s.go = 1;
    s.bo = fmt == FMT_BGR ? 0 : 2;

    float va[3], vb[3] = {0.0f, 0.0f, 0.0f};
    int oy = p0 / out_w;
    int ox = p0 - oy * out_w;
    sample_pixel(d, s, oy, ox, letterbox, pad_r, pad_g, pad_b, va);
    if (two) {
        if (++ox == out_w) {
            ox = 0;
            ++oy;
        }
        sample_pixel(d, s, oy, ox, letterbox, pad_r, pad_g, pad_b, vb);
    }
    float ca[3], cb[3];
    const int n = map_channels(channels, va, ca);
    map_channels(channels, vb, cb);

    const float scale[3] = {scale0, scale1, scale2};
    const float offset[3] = {offset0, offset1, offset2};
    const unsigned long long base = (first_slot + (unsigned long long)img) * (unsigned long long)(plane * n);
    for (int c = 0; c < n; ++c) {
        const float ya = normalise(ca[c], c, scale, offset);
        const float yb = normalise(cb[c], c, scale, offset);
        if (layout == LAYOUT_NHWC) {
            const unsigned long long ia = base + (unsigned long long)p0 * n + c;
            if (f16) {
                ((unsigned short*)out)[ia] = f32_to_f16_bits(ya);
                if (two) ((unsigned short*)out)[ia + n] = f32_to_f16_bits(yb);
            } else {
                ((float*)out)[ia] = ya;
                if (two) ((float*)out)[ia + n] = yb;
            }
        } else {
            const unsigned long long ia = base + (unsigned long long)c * plane + p0;
            if (f16) {
                const unsigned short ha = f32_to_f16_bits(ya);
                if (two && (ia & 1ull) == 0) {
                    ((unsigned int*)out)[ia >> 1] = (unsigned int)ha | ((unsigned int)f32_to_f16_bits(yb) << 16);
                } else {
                    ((unsigned short*)out)[ia] = ha;
                    if (two) ((unsigned short*)out)[ia + 1] = f32_to_f16_bits(yb);
                }
            } else {
                ((float*)out)[ia] = ya;
                if (two) ((float*)out)[ia + 1] = yb;
            }
        }
    }
}
