// INT8 kernels around the integer GEMMs and convolutions (cuBLASLt / cuDNN, INT32 out):
//
// kiln_quantize: FP32 or FP16 activations to INT8 with one scale, as ONNX QuantizeLinear:
//   q = saturate(round_half_even(x / scale)) in [-128, 127], NaN -> 0.
// kiln_requant: the INT32 accumulators of an INT8 layer to its output, in the order and
//   rounding of the engine's reference (engine/src/quant/int8.rs), so the two agree bit for bit:
//   y = (float)acc * alpha[k]; y = y + bias[k]; y = y + residual[i]; activation;
//   then FP32, FP16 (round to nearest) or INT8 requantised with out_scale (the next INT8
//   layer's input scale: fused requantisation; in an FP16 plan the value is first rounded
//   to FP16, as the next layer would have read it). k = (i / inner) % channels.
//   __fmul_rn / __fadd_rn keep the compiler from contracting into FMAs, which round once
//   where the reference rounds twice.
// Element codes: 0 FP32, 1 FP16, 5 INT8. Activations: 0 none, 1 relu, 2 clip(lo, hi).
//
// f16, to_f32/from_f32 come from common.cuh (prepended by sources.rs).

__device__ __forceinline__ signed char saturate_i8(float q) {
    if (q != q) return 0;
    return (signed char)fminf(fmaxf(q, -128.0f), 127.0f);
}

__device__ __forceinline__ signed char quantize_one(float x, float scale) {
    return saturate_i8(rintf(__fdiv_rn(x, scale)));
}

extern "C" __global__ void kiln_quantize(const void* src, int src_elem, signed char* dst, long long n, float scale) {
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        float x = src_elem == 1 ? to_f32(((const f16*)src)[i]) : ((const float*)src)[i];
        dst[i] = quantize_one(x, scale);
    }
}

extern "C" __global__ void kiln_requant(const int* acc, void* out, int out_elem, const float* alpha,
                                        const float* bias, const void* residual, int residual_elem, long long n,
                                        int channels, long long inner, int act, float lo, float hi,
                                        float out_scale, int via_f16) {
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        int k = (int)((i / inner) % channels);
        float y = __fmul_rn(__int2float_rn(acc[i]), alpha[k]);
        if (bias) y = __fadd_rn(y, bias[k]);
        if (residual) {
            float z = residual_elem == 1 ? to_f32(((const f16*)residual)[i]) : ((const float*)residual)[i];
            y = __fadd_rn(y, z);
        }
        // Comparisons, not fmaxf/fminf, so NaN passes through as in the reference.
        if (act == 1) {
            y = y < 0.0f ? 0.0f : y;
        } else if (act == 2) {
            y = y < lo ? lo : (y > hi ? hi : y);
        }
        if (out_elem == 0) {
            ((float*)out)[i] = y;
        } else if (out_elem == 1) {
            ((f16*)out)[i] = from_f32<f16>(y);
        } else {
            if (via_f16) y = to_f32(from_f32<f16>(y));
            ((signed char*)out)[i] = quantize_one(y, out_scale);
        }
    }
}
