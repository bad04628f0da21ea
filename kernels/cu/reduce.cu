// Reduction of one contiguous axis range: x viewed as [outer, len, inner] -> y [outer, inner],
// kind 0 sum, 1 mean, 2 max, 3 min; FP32 accumulation, input and output FP16 or FP32 each.
// Max/min propagate NaN (ONNX Runtime's ReduceMax/Min do). `len` >= 1 (checked by the host).
//   kiln_reduce_rows_<in>_<out>: inner == 1. Groups of `group` threads (32: a warp, or
//     blockDim.x: the whole block) reduce one row each; blockDim.x / group rows per block.
//   kiln_reduce_cols_<in>_<out>: inner > 1. One thread per output element walks the len axis;
//     neighbouring threads read neighbouring inner elements (coalesced).
//
// f16, to_f32/from_f32, NEG_INF and warp_sum come from common.cuh (prepended by sources.rs).

#define K_SUM 0
#define K_MEAN 1
#define K_MAX 2
#define K_MIN 3

__device__ __forceinline__ float identity(int kind) {
    return kind == K_MAX ? __int_as_float(0xff800000) : (kind == K_MIN ? __int_as_float(0x7f800000) : 0.0f);
}

// Once acc is NaN it stays NaN (no comparison with NaN is true).
__device__ __forceinline__ float combine(int kind, float acc, float v) {
    if (kind == K_MAX) return (v > acc || v != v) ? v : acc;
    if (kind == K_MIN) return (v < acc || v != v) ? v : acc;
    return acc + v;
}

__device__ __forceinline__ float finish(int kind, float acc, long long len) {
    return kind == K_MEAN ? acc / (float)len : acc;
}

template <typename TI, typename TO>
__device__ void reduce_rows(const TI* __restrict__ x, TO* __restrict__ y, long long outer, long long len, int kind,
                            int group) {
    __shared__ float buf[32];
    const int lane = threadIdx.x & 31;
    const int per_block = blockDim.x / group;
    const int g = threadIdx.x / group, t = threadIdx.x % group;
    // Every thread runs the same number of iterations: the block-wide path has barriers.
    for (long long base = (long long)blockIdx.x * per_block; base < outer; base += (long long)gridDim.x * per_block) {
        const long long r = base + g;
        float acc = identity(kind);
        if (r < outer) {
            const TI* xr = x + r * len;
            for (long long j = t; j < len; j += group) acc = combine(kind, acc, to_f32(xr[j]));
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc = combine(kind, acc, __shfl_xor_sync(0xffffffffu, acc, o));
        if (group > 32) {
            if (lane == 0) buf[threadIdx.x >> 5] = acc;
            __syncthreads();
            acc = lane < (int)(blockDim.x >> 5) ? buf[lane] : identity(kind);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc = combine(kind, acc, __shfl_xor_sync(0xffffffffu, acc, o));
            __syncthreads();
        }
        if (t == 0 && r < outer) y[r] = from_f32<TO>(finish(kind, acc, len));
    }
}

template <typename TI, typename TO>
__device__ void reduce_cols(const TI* __restrict__ x, TO* __restrict__ y, long long outer, long long len,
                            long long inner, int kind) {
    const long long total = outer * inner, step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const long long o = i / inner, k = i - o * inner;
        const TI* src = x + o * len * inner + k;
        float acc = identity(kind);
        for (long long j = 0; j < len; ++j) acc = combine(kind, acc, to_f32(src[j * inner]));
        y[i] = from_f32<TO>(finish(kind, acc, len));
    }
}

#define REDUCE(SUFFIX, TI, TO)                                                                                   \
    extern "C" __global__ void kiln_reduce_rows_##SUFFIX(const TI* x, TO* y, long long outer, long long len,      \
                                                         int kind, int group) {                                   \
        reduce_rows<TI, TO>(x, y, outer, len, kind, group);                                                       \
    }                                                                                                             \
    extern "C" __global__ void kiln_reduce_cols_##SUFFIX(const TI* x, TO* y, long long outer, long long len,      \
                                                         long long inner, int kind) {                             \
        reduce_cols<TI, TO>(x, y, outer, len, inner, kind);                                                       \
    }

REDUCE(f32_f32, float, float)
REDUCE(f32_f16, float, f16)
REDUCE(f16_f32, f16, float)
REDUCE(f16_f16, f16, f16)
