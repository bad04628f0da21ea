// kiln_layernorm_<x>_<y>: layer normalisation over the last axis of x [rows, cols], one block per
// row (blockDim.x a multiple of 32, <= 1024), as the engine's LayerNormalization
// (engine/src/ops/math/layer_norm.rs) preceded by an optional residual Add:
//   v = x + residual  (rounded to x's type, as the unfused Add node would store it)
//   y = (v - mean(v)) / sqrt(var(v) + eps) * gamma + beta
// `residual`, `sum_out` (receives v: the residual stream) and `beta` may be null. x, residual
// and sum_out share x's type; y has its own; gamma and beta are F32 (elem 0) or F16 (elem 1)
// each. Two-pass statistics in FP32; the row is re-read from L1/L2 for each pass (from sum_out
// when there is one). Each element is read and written by one thread only, so y may alias x and
// sum_out may alias x or residual (in-place residual stream); hence no __restrict__.
//
// f16, to_f32/from_f32, NEG_INF and warp_sum come from common.cuh (prepended by sources.rs).

__device__ __forceinline__ float load_param(const void* p, int elem, int i) {
    return elem == 1 ? to_f32(((const f16*)p)[i]) : ((const float*)p)[i];
}

// Sum of v over the block; every thread gets it. `buf` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* buf) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) buf[warp] = v;
    __syncthreads();
    float t = lane < (int)(blockDim.x >> 5) ? buf[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    __syncthreads();  // buf is reused by the next call
    return t;
}

// v of element i after pass 1 (which stored it in sum_out when given).
template <typename TX>
__device__ __forceinline__ float row_value(const TX* x, const TX* residual, const TX* sum_out, long long i) {
    if (sum_out) return to_f32(sum_out[i]);
    float v = to_f32(x[i]);
    return residual ? to_f32(from_f32<TX>(v + to_f32(residual[i]))) : v;
}

template <typename TX, typename TY>
__device__ void layernorm(const TX* x, const TX* residual, TX* sum_out, const void* __restrict__ gamma, int gamma_elem,
                          const void* __restrict__ beta, int beta_elem, TY* y, long long rows, int cols, float eps) {
    __shared__ float buf[32];
    const float inv_n = 1.0f / (float)cols;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long base = r * cols;
        float s = 0.0f;
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            float v = to_f32(x[base + j]);
            if (residual) {
                TX t = from_f32<TX>(v + to_f32(residual[base + j]));
                if (sum_out) sum_out[base + j] = t;
                v = to_f32(t);
            } else if (sum_out) {
                sum_out[base + j] = x[base + j];
            }
            s += v;
        }
        const float mean = block_sum(s, buf) * inv_n;
        float q = 0.0f;
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            const float v = row_value(x, residual, sum_out, base + j);
            float d = v - mean;
            q += d * d;
        }
        const float rstd = 1.0f / sqrtf(block_sum(q, buf) * inv_n + eps);
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            const float v = row_value(x, residual, sum_out, base + j);
            float o = (v - mean) * rstd * load_param(gamma, gamma_elem, j);
            if (beta) o += load_param(beta, beta_elem, j);
            y[base + j] = from_f32<TY>(o);
        }
    }
}

#define LAYERNORM(SUFFIX, TX, TY)                                                                           \
    extern "C" __global__ void kiln_layernorm_##SUFFIX(const TX* x, const TX* residual, TX* sum_out,          \
                                                       const void* gamma, int gamma_elem, const void* beta,  \
                                                       int beta_elem, TY* y, long long rows, int cols,       \
                                                       float eps) {                                          \
        layernorm<TX, TY>(x, residual, sum_out, gamma, gamma_elem, beta, beta_elem, y, rows, cols, eps);     \
    }

LAYERNORM(f32_f32, float, float)
LAYERNORM(f32_f16, float, f16)
LAYERNORM(f16_f32, f16, float)
LAYERNORM(f16_f16, f16, f16)
