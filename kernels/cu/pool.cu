// 2-D pooling, FP16 or FP32, NCHW or NHWC (kiln's FP16 layout), as the engine's MaxPool /
// AveragePool / GlobalAveragePool (engine/src/ops/nn/pool.rs):
//   kiln_pool2d_<t>: one thread per output element, kernel/stride/dilation/pads per axis.
//     Max ignores NaN (`v > acc`) and gives -inf where no tap is inside the image; average
//     divides by the taps inside the image, or with count_include_pad by the taps before the
//     end padding (ONNX counts the begin padding and the declared end padding, not the ceil_mode
//     overhang), at least 1.
//   kiln_global_avg_pool_nchw_<t>: one warp per (n, c) plane.
//   kiln_global_avg_pool_nhwc_<t>: blocks of 32 channels x 8 pixel rows, the 8 partial sums of a
//     channel added in shared memory; grid (ceil(C / 32), N).
// Sums are FP32 in the reference's order within a window; global pools reduce in a tree.
//
// f16, to_f32/from_f32, NEG_INF and warp_sum come from common.cuh (prepended by sources.rs).

struct PoolDims {
    int n, c, h, w, oh, ow;
    int kh, kw, sh, sw, dh, dw;
    int pt, pl, pb, pr;
};

template <typename T, typename I>
__device__ void pool2d_loop(const T* __restrict__ x, T* __restrict__ y, const PoolDims& g, int is_max,
                            int include_pad, int nhwc, long long total) {
    I step = (I)gridDim.x * (I)blockDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (I)total; i += step) {
        I rem = i;
        int b, ch, oy, ox;
        if (nhwc) {
            ch = (int)(rem % (I)g.c); rem /= (I)g.c;
            ox = (int)(rem % (I)g.ow); rem /= (I)g.ow;
            oy = (int)(rem % (I)g.oh); rem /= (I)g.oh;
            b = (int)rem;
        } else {
            ox = (int)(rem % (I)g.ow); rem /= (I)g.ow;
            oy = (int)(rem % (I)g.oh); rem /= (I)g.oh;
            ch = (int)(rem % (I)g.c); rem /= (I)g.c;
            b = (int)rem;
        }
        // Element (iy, ix) of this (b, ch) plane is at base + iy * ystep + ix * xstep.
        long long base, ystep, xstep;
        if (nhwc) {
            base = (long long)b * g.h * g.w * g.c + ch;
            xstep = g.c;
            ystep = (long long)g.w * g.c;
        } else {
            base = ((long long)b * g.c + ch) * g.h * g.w;
            xstep = 1;
            ystep = g.w;
        }
        float acc = is_max ? __int_as_float(0xff800000) : 0.0f;
        int rows_in = 0, rows_padded = 0, cols_in = 0, cols_padded = 0;
        for (int kx = 0; kx < g.kw; ++kx) {
            int ix = ox * g.sw + kx * g.dw - g.pl;
            cols_padded += ix < g.w + g.pr;
            cols_in += ix >= 0 && ix < g.w;
        }
        for (int ky = 0; ky < g.kh; ++ky) {
            int iy = oy * g.sh + ky * g.dh - g.pt;
            rows_padded += iy < g.h + g.pb;
            if (iy < 0 || iy >= g.h) continue;
            ++rows_in;
            const T* row = x + base + (long long)iy * ystep;
            for (int kx = 0; kx < g.kw; ++kx) {
                int ix = ox * g.sw + kx * g.dw - g.pl;
                if (ix < 0 || ix >= g.w) continue;
                float v = to_f32(row[(long long)ix * xstep]);
                if (is_max) {
                    if (v > acc) acc = v;
                } else {
                    acc += v;
                }
            }
        }
        if (!is_max) {
            int count = include_pad ? rows_padded * cols_padded : rows_in * cols_in;
            acc = acc / (float)(count > 1 ? count : 1);
        }
        y[i] = from_f32<T>(acc);
    }
}

template <typename T>
__device__ void pool2d(const T* x, T* y, const PoolDims& g, int is_max, int include_pad, int nhwc) {
    long long total = (long long)g.n * g.c * g.oh * g.ow;
    if (total < 0x7fffffffLL) {
        pool2d_loop<T, unsigned int>(x, y, g, is_max, include_pad, nhwc, total);
    } else {
        pool2d_loop<T, unsigned long long>(x, y, g, is_max, include_pad, nhwc, total);
    }
}

#define POOL2D(NAME, T)                                                                                            \
    extern "C" __global__ void NAME(const T* x, T* y, int n, int c, int h, int w, int oh, int ow, int kh, int kw,  \
                                    int sh, int sw, int dh, int dw, int pt, int pl, int pb, int pr, int is_max,    \
                                    int include_pad, int nhwc) {                                                   \
        const PoolDims g = {n, c, h, w, oh, ow, kh, kw, sh, sw, dh, dw, pt, pl, pb, pr};                           \
        pool2d<T>(x, y, g, is_max, include_pad, nhwc);                                                             \
    }

POOL2D(kiln_pool2d_f32, float)
POOL2D(kiln_pool2d_f16, f16)

// x [planes, len] -> y [planes]: one warp per plane, blockDim.x a multiple of 32.
template <typename T>
__device__ void gap_nchw(const T* __restrict__ x, T* __restrict__ y, long long planes, int len) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    const float inv = 1.0f / (float)len;
    for (long long p = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); p < planes; p += warps) {
        const T* src = x + p * len;
        float s = 0.0f;
        for (int j = lane; j < len; j += 32) s += to_f32(src[j]);
        s = warp_sum(s);
        if (lane == 0) y[p] = from_f32<T>(s * inv);
    }
}

// x [n, len, c] -> y [n, c]; block (32, 8), grid (ceil(c / 32), n).
template <typename T>
__device__ void gap_nhwc(const T* __restrict__ x, T* __restrict__ y, int len, int c) {
    __shared__ float part[8][33];
    const int ch = blockIdx.x * 32 + threadIdx.x;
    const long long b = blockIdx.y;
    float s = 0.0f;
    if (ch < c) {
        const T* src = x + b * len * (long long)c + ch;
        for (int p = threadIdx.y; p < len; p += 8) s += to_f32(src[(long long)p * c]);
    }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && ch < c) {
        float t = 0.0f;
#pragma unroll
        for (int r = 0; r < 8; ++r) t += part[r][threadIdx.x];
        y[b * c + ch] = from_f32<T>(t * (1.0f / (float)len));
    }
}

extern "C" __global__ void kiln_global_avg_pool_nchw_f32(const float* x, float* y, long long planes, int len) {
    gap_nchw<float>(x, y, planes, len);
}
extern "C" __global__ void kiln_global_avg_pool_nchw_f16(const f16* x, f16* y, long long planes, int len) {
    gap_nchw<f16>(x, y, planes, len);
}
extern "C" __global__ void kiln_global_avg_pool_nhwc_f32(const float* x, float* y, int len, int c) {
    gap_nhwc<float>(x, y, len, c);
}
extern "C" __global__ void kiln_global_avg_pool_nhwc_f16(const f16* x, f16* y, int len, int c) {
    gap_nhwc<f16>(x, y, len, c);
}
