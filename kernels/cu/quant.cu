// INT8 kernels around the integer GEMMs and convolutions (cuBLASLt / cuDNN, INT32 out):
//
// kiln_quantize: FP32 or FP16 activations to INT8 with one scale, as ONNX QuantizeLinear:
//   q = saturate(round_half_even(x / scale)) in [-128, 127], NaN -> 0. Rows of `c` channels
//   land in rows of `cp` >= c (the integer GEMMs and cuDNN want channel counts that are
//   multiples of 4), the extra lanes zero; n counts destination elements.
// kiln_requant: the accumulators of an INT8 layer (INT32 from cuBLASLt and kiln_dwconv_i8, or
//   FP32 from cuDNN, which converts its INT32 sums with round to nearest like __int2float_rn)
//   to its output, in the order and
//   rounding of the engine's reference (engine/src/quant/int8.rs), so the two agree bit for bit:
//   y = (float)acc * alpha[k]; y = y + bias[k]; y = y + residual[i]; activation;
//   then FP32, FP16 (round to nearest) or INT8 requantised with out_scale (the next INT8
//   layer's input scale: fused requantisation; in an FP16 plan the value is first rounded
//   to FP16, as the next layer would have read it). k = (i / inner) % channels. With q_out,
//   the same value is also written requantised to INT8 (q_scale, q_via_f16) for the INT8
//   layers among the output's readers, while the others read the FP16/FP32 output.
//   __fmul_rn / __fadd_rn keep the compiler from contracting into FMAs, which round once
//   where the reference rounds twice. With inner == 1 (channels last) accumulator rows may
//   be wider than the output's (acc_ld >= channels: output channels padded to a multiple of 4).
// kiln_dwconv_i8: depthwise NHWC INT8 convolution to INT32 accumulators (cuDNN has no INT8
//   grouped convolutions): one thread per output element, filters [C, R, S].
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

extern "C" __global__ void kiln_quantize(const void* src, int src_elem, signed char* dst, long long n, float scale,
                                         int c, int cp) {
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        int lane = (int)(i % cp);
        if (lane >= c) {
            dst[i] = 0;
            continue;
        }
        long long at = (i / cp) * c + lane;
        float x = src_elem == 1 ? to_f32(((const f16*)src)[at]) : ((const float*)src)[at];
        dst[i] = quantize_one(x, scale);
    }
}

extern "C" __global__ void kiln_requant(const void* acc, int acc_elem, long long acc_ld, void* out, int out_elem,
                                        const float* alpha, const float* bias, const void* residual,
                                        int residual_elem, long long n, int channels, long long inner, int act,
                                        float lo, float hi, float out_scale, int via_f16, signed char* q_out,
                                        float q_scale, int q_via_f16) {
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        int k = (int)((i / inner) % channels);
        long long a = inner == 1 ? (i / channels) * acc_ld + k : i;
        float sum = acc_elem == 0 ? ((const float*)acc)[a] : __int2float_rn(((const int*)acc)[a]);
        float y = __fmul_rn(sum, alpha[k]);
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
            float v = via_f16 ? to_f32(from_f32<f16>(y)) : y;
            ((signed char*)out)[i] = quantize_one(v, out_scale);
        }
        if (q_out) {
            float v = q_via_f16 ? to_f32(from_f32<f16>(y)) : y;
            q_out[i] = quantize_one(v, q_scale);
        }
    }
}

extern "C" __global__ void kiln_dwconv_i8(const signed char* x, const signed char* w, int* y, long long n_out, int c,
                                          int h, int wd, int p, int q, int r, int s, int stride_h, int stride_w,
                                          int pad_h, int pad_w, int dil_h, int dil_w) {
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_out; i += step) {
        int ch = (int)(i % c);
        long long pix = i / c;
        int ox = (int)(pix % q);
        int oy = (int)((pix / q) % p);
        long long b = pix / ((long long)p * q);
        int sum = 0;
        for (int ky = 0; ky < r; ++ky) {
            int iy = oy * stride_h + ky * dil_h - pad_h;
            if (iy < 0 || iy >= h) continue;
            for (int kx = 0; kx < s; ++kx) {
                int ix = ox * stride_w + kx * dil_w - pad_w;
                if (ix < 0 || ix >= wd) continue;
                long long at = ((b * h + iy) * wd + ix) * c + ch;
                sum += (int)x[at] * (int)w[((long long)ch * r + ky) * s + kx];
            }
        }
        y[i] = sum;
    }
}
