// Softmax over the last axis of x [rows, cols], FP32 math, input and output each FP16 or FP32
// (kiln_softmax_{warp,block}_<in>_<out>), as the engine's Softmax (engine/src/ops/math/softmax.rs):
// y = exp(x - max) / sum(exp(x - max)). A row of only -inf (or with a NaN) gives NaN, as there.
//   warp:  one warp per row (blockDim.x / 32 rows per block): for cols <= 1024.
//   block: one block per row (blockDim.x a multiple of 32, <= 1024): any cols.
// Pass 1 keeps a running (max, sum of exp(x - max)) per thread and merges them; pass 2 re-reads
// the row (from L1/L2) and writes it.
//
// f16, to_f32/from_f32, NEG_INF and warp_sum come from common.cuh (prepended by sources.rs).

// Adds v to the running (m, s). -inf adds nothing (and must not make exp(-inf - -inf) = NaN);
// NaN never becomes the max and makes s NaN.
__device__ __forceinline__ void online_add(float& m, float& s, float v) {
    if (v == NEG_INF) return;
    if (v > m) {
        s = s * expf(m - v) + 1.0f;
        m = v;
    } else {
        s += expf(v - m);
    }
}

__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == NEG_INF) {
        s = s + s2;  // both empty: 0, or NaN that must survive
    } else {
        s = s * expf(m - mm) + s2 * expf(m2 - mm);
    }
    m = mm;
}

__device__ __forceinline__ void warp_merge(float& m, float& s) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o);
        float s2 = __shfl_xor_sync(0xffffffffu, s, o);
        online_merge(m, s, m2, s2);
    }
}

template <typename TI, typename TO>
__device__ void softmax_warp(const TI* __restrict__ x, TO* __restrict__ y, long long rows, int cols) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
        const TI* xr = x + r * cols;
        float m = NEG_INF, s = 0.0f;
        for (int j = lane; j < cols; j += 32) online_add(m, s, to_f32(xr[j]));
        warp_merge(m, s);
        const float inv = 1.0f / s;
        TO* yr = y + r * cols;
        for (int j = lane; j < cols; j += 32) yr[j] = from_f32<TO>(expf(to_f32(xr[j]) - m) * inv);
    }
}

template <typename TI, typename TO>
__device__ void softmax_block(const TI* __restrict__ x, TO* __restrict__ y, long long rows, int cols) {
    __shared__ float sm[32], ss[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const TI* xr = x + r * cols;
        float m = NEG_INF, s = 0.0f;
        for (int j = threadIdx.x; j < cols; j += blockDim.x) online_add(m, s, to_f32(xr[j]));
        warp_merge(m, s);
        if (lane == 0) {
            sm[warp] = m;
            ss[warp] = s;
        }
        __syncthreads();
        if (warp == 0) {
            m = lane < nwarps ? sm[lane] : NEG_INF;
            s = lane < nwarps ? ss[lane] : 0.0f;
            warp_merge(m, s);
            if (lane == 0) {
                sm[0] = m;
                ss[0] = s;
            }
        }
        __syncthreads();
        m = sm[0];
        const float inv = 1.0f / ss[0];
        __syncthreads();  // sm/ss are rewritten by the next row
        TO* yr = y + r * cols;
        for (int j = threadIdx.x; j < cols; j += blockDim.x) yr[j] = from_f32<TO>(expf(to_f32(xr[j]) - m) * inv);
    }
}

#define SOFTMAX(SUFFIX, TI, TO)                                                                          \
    extern "C" __global__ void kiln_softmax_warp_##SUFFIX(const TI* x, TO* y, long long rows, int cols) {  \
        softmax_warp<TI, TO>(x, y, rows, cols);                                                          \
    }                                                                                                    \
    extern "C" __global__ void kiln_softmax_block_##SUFFIX(const TI* x, TO* y, long long rows, int cols) { \
        softmax_block<TI, TO>(x, y, rows, cols);                                                         \
    }

SOFTMAX(f32_f32, float, float)
SOFTMAX(f32_f16, float, f16)
SOFTMAX(f16_f32, f16, float)
SOFTMAX(f16_f16, f16, f16)
