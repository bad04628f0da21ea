// Fused scaled-dot-product attention, as the engine's kiln.Attention (engine/src/ops/nn/attention.rs):
//   Y[b,h,i,:] = softmax_j(scale * Q[b,h,i,:]·KT[b,h,:,j] + M[b,h,i,j]) · V[b,h,j,:]
// Q [B,H,S,D], KT [B,H,D,Sk], V [B,H,Sk,Dv], Y [B,H,S,Dv], contiguous, all of type T (FP16 or
// FP32); the optional additive mask M (FP16 or FP32) is read through element strides
// (b, h, i, j), 0 on broadcast axes. D, Dv <= 128 (host-checked); any Sk.
// A row whose scores are all -inf gives zeros with zero_masked_rows, otherwise NaN (as Softmax).
//
// Flash-attention style, SIMT FP32 math (no tensor cores): a block of 4 warps takes 16 queries
// of one (b, h); each warp owns 4 queries. For each tile of 32 keys the block stages KT and V in
// shared memory (as float); lane l computes the 4 scores of key l (dot products over D with q
// broadcast from shared memory), the warp updates each query's running max and sum (online
// softmax), publishes the 4x32 probabilities in shared memory, and lane l accumulates output
// columns l, l+32, l+64, l+96. No score matrix ever reaches global memory.
// Grid (ceil(S / 16), H, B), 128 threads, dynamic shared memory 4 * (16 D + 32 D + 32 Dv + 512)
// bytes (at most 42 KiB for D = Dv = 128, under the 48 KiB default).
//
// f16, to_f32/from_f32, NEG_INF and warp_sum come from common.cuh (prepended by sources.rs).

#define WARPS 4
#define QW 4                // queries per warp
#define QB (WARPS * QW)     // queries per block
#define KT_TILE 32          // keys per tile: one per lane
#define MAX_DV_CHUNKS 4     // Dv <= 128 = 4 * 32

struct AttnArgs {
    int h_count, s, sk, d, dv;
    long long msb, msh, mss, msk;  // mask strides
    float scale;
    int zero_masked_rows;
};

// max that returns NaN when either operand is NaN (PTX max.NaN, sm_80+): a NaN score must make
// the row NaN, as it does in the reference, rather than be skipped by fmaxf.
__device__ __forceinline__ float max_nan(float a, float b) {
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

template <typename T, typename M>
__device__ void attention(const T* __restrict__ q, const T* __restrict__ kt, const T* __restrict__ v,
                          const M* __restrict__ mask, T* __restrict__ y, const AttnArgs& a) {
    extern __shared__ float4 smem4[];  // float4: 16-byte alignment for the float4 reads below
    float* smem = reinterpret_cast<float*>(smem4);
    const int D = a.d, DV = a.dv, S = a.s, SK = a.sk;
    float* q_s = smem;                  // [D][QB]: the 4 queries of a warp are one float4
    float* kt_s = q_s + QB * D;         // [D][32]
    float* v_s = kt_s + KT_TILE * D;    // [32][Dv]
    float* p_s = v_s + KT_TILE * DV;    // [WARPS][32][QW]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * QB;
    const long long bh = (long long)b * a.h_count + h;
    const T* qb = q + bh * S * D;
    const T* kb = kt + bh * D * SK;
    const T* vb = v + bh * SK * DV;

    for (int i = tid; i < QB * D; i += WARPS * 32) {
        const int qi = i / D, d = i - qi * D;
        const int row = q0 + qi;
        q_s[d * QB + qi] = row < S ? to_f32(qb[(long long)row * D + d]) : 0.0f;
    }

    float m[QW], l[QW], acc[QW][MAX_DV_CHUNKS];
#pragma unroll
    for (int t = 0; t < QW; ++t) {
        m[t] = NEG_INF;
        l[t] = 0.0f;
#pragma unroll
        for (int c = 0; c < MAX_DV_CHUNKS; ++c) acc[t][c] = 0.0f;
    }
    const int my_row0 = q0 + warp * QW;
    const M* mrow = mask ? mask + b * a.msb + h * a.msh : nullptr;

    for (int k0 = 0; k0 < SK; k0 += KT_TILE) {
        __syncthreads();  // the previous tile (and, first time round, nothing) is no longer read
        for (int i = tid; i < D * KT_TILE; i += WARPS * 32) {
            const int d = i / KT_TILE, j = i - d * KT_TILE;
            kt_s[i] = k0 + j < SK ? to_f32(kb[(long long)d * SK + k0 + j]) : 0.0f;
        }
        for (int i = tid; i < KT_TILE * DV; i += WARPS * 32) {
            const int j = i / DV, c = i - j * DV;
            v_s[i] = k0 + j < SK ? to_f32(vb[(long long)(k0 + j) * DV + c]) : 0.0f;
        }
        __syncthreads();

        float s[QW] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 4
        for (int d = 0; d < D; ++d) {
            const float k = kt_s[d * KT_TILE + lane];
            const float4 qv = *reinterpret_cast<const float4*>(&q_s[d * QB + warp * QW]);
            s[0] += qv.x * k;
            s[1] += qv.y * k;
            s[2] += qv.z * k;
            s[3] += qv.w * k;
        }
        const int key = k0 + lane;
        float* pw = p_s + warp * (KT_TILE * QW);
#pragma unroll
        for (int t = 0; t < QW; ++t) {
            const int row = my_row0 + t;
            float x = NEG_INF;
            if (key < SK) {
                x = s[t] * a.scale;
                if (mrow && row < S) x += to_f32(mrow[row * a.mss + key * a.msk]);
            }
            // While every score so far is -inf nothing accumulates (exp(-inf - -inf) would be NaN).
            const float m_new = max_nan(m[t], warp_max(x));
            float p = 0.0f, alpha = 1.0f;
            if (m_new != NEG_INF) {
                p = expf(x - m_new);
                alpha = expf(m[t] - m_new);
            }
            l[t] = l[t] * alpha + warp_sum(p);
            m[t] = m_new;
#pragma unroll
            for (int c = 0; c < MAX_DV_CHUNKS; ++c) acc[t][c] *= alpha;
            pw[lane * QW + t] = p;
        }
        __syncwarp();
        const int jn = min(KT_TILE, SK - k0);
        for (int j = 0; j < jn; ++j) {
            const float4 p4 = *reinterpret_cast<const float4*>(&pw[j * QW]);
#pragma unroll
            for (int c = 0; c < MAX_DV_CHUNKS; ++c) {
                const int col = lane + 32 * c;
                if (col < DV) {
                    const float vv = v_s[j * DV + col];
                    acc[0][c] += p4.x * vv;
                    acc[1][c] += p4.y * vv;
                    acc[2][c] += p4.z * vv;
                    acc[3][c] += p4.w * vv;
                }
            }
        }
    }

#pragma unroll
    for (int t = 0; t < QW; ++t) {
        const int row = my_row0 + t;
        if (row >= S) continue;
        const bool empty = m[t] == NEG_INF;
        const float inv = 1.0f / l[t];
        T* out = y + (bh * S + row) * DV;
#pragma unroll
        for (int c = 0; c < MAX_DV_CHUNKS; ++c) {
            const int col = lane + 32 * c;
            if (col >= DV) continue;
            float o;
            if (empty) {
                o = a.zero_masked_rows ? 0.0f : __int_as_float(0x7fc00000);
            } else {
                o = acc[t][c] * inv;
            }
            out[col] = from_f32<T>(o);
        }
    }
}

#define ATTENTION(SUFFIX, T, M)                                                                                     \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                        \
        kiln_attention_##SUFFIX(const T* q, const T* kt, const T* v, const M* mask, T* y, int h_count, int s,      \
                                int sk, int d, int dv, long long msb, long long msh, long long mss, long long msk,  \
                                float scale, int zero_masked_rows) {                                                \
        const AttnArgs a = {h_count, s, sk, d, dv, msb, msh, mss, msk, scale, zero_masked_rows};                    \
        attention<T, M>(q, kt, v, mask, y, a);                                                                      \
    }

ATTENTION(f32_mf32, float, float)
ATTENTION(f32_mf16, float, f16)
ATTENTION(f16_mf32, f16, float)
ATTENTION(f16_mf16, f16, f16)
