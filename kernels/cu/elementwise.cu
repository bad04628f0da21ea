// kiln_elementwise: a fused elementwise program (EwProgram in cuda/src/kernels/elementwise.rs,
// byte for byte the struct below) over an output shape of rank <= 6. Each output element
// reads up to 4 inputs through per-axis element strides (0 = broadcast), converts them to float
// (registers r0..r3), runs up to 16 ops (op i writes register r(4+i)), converts the last
// register (r0 without ops) to the output type and stores it. All math is FP32.
//
// The program lives in device memory (uploaded once per batch size) and is copied into shared
// memory per block; the register file is shared memory too (column per thread), since a
// per-thread array indexed at run time would sit in local memory.
// The opcodes and their formulas are EwOp's and eval_cpu's in elementwise.rs — change both.
//
// No includes: NVRTC has no include path here, so FP16 is its bits and one PTX cvt each way.

#define EW_INPUTS 4
#define EW_RANK 6
#define EW_OPS 16
#define EW_REGS (EW_INPUTS + EW_OPS)
#define EW_BLOCK 256

#define E_F32 0
#define E_F16 1
#define E_I64 2
#define E_I32 3
#define E_U8 4

struct EwInput {
    unsigned long long ptr;
    int elem;
    int pad;
    long long strides[EW_RANK];
};

struct EwOp {
    int opcode;
    int a, b, c;
    float imm0, imm1;
};

struct EwProgram {
    long long shape[EW_RANK];  // outermost first; only the first `rank` are used
    EwInput in[EW_INPUTS];
    unsigned long long out;
    int out_elem;
    int rank;
    int n_inputs;
    int n_ops;
    EwOp ops[EW_OPS];
};

static_assert(sizeof(EwInput) == 64, "EwInput layout");
static_assert(sizeof(EwOp) == 24, "EwOp layout");
static_assert(sizeof(EwProgram) == 712, "EwProgram layout");
static_assert(sizeof(EwProgram) % 4 == 0, "copied as u32 words");

enum {
    OP_ADD = 0, OP_SUB, OP_MUL, OP_DIV, OP_MAX, OP_MIN, OP_POW, OP_NEG, OP_ABS, OP_EXP,
    OP_LOG = 10, OP_SQRT, OP_RECIP, OP_TANH, OP_SIGMOID, OP_RELU, OP_ERF, OP_GELU, OP_GELU_TANH, OP_SILU,
    OP_CLIP = 20, OP_CONST, OP_WHERE, OP_EQUAL, OP_LESS, OP_GREATER, OP_NOT, OP_FLOOR, OP_LESS_EQ, OP_GREATER_EQ,
    OP_AND = 30, OP_OR, OP_XOR, OP_ISNAN, OP_LEAKY_RELU, OP_HARD_SIGMOID, OP_HARD_SWISH, OP_CEIL, OP_ROUND, OP_AFFINE,
};

__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short f2h(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

// Saturating truncation, NaN -> 0 (Rust's `as i64`).
__device__ __forceinline__ long long f2ll(float x) {
    long long r;
    asm("cvt.rzi.s64.f32 %0, %1;" : "=l"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float load_elem(unsigned long long p, int elem, long long i) {
    switch (elem) {
        case E_F32: return ((const float*)p)[i];
        case E_F16: return h2f(((const unsigned short*)p)[i]);
        case E_I64: return (float)((const long long*)p)[i];
        case E_I32: return (float)((const int*)p)[i];
        default: return (float)((const unsigned char*)p)[i];
    }
}

__device__ __forceinline__ void store_elem(unsigned long long p, int elem, long long i, float v) {
    switch (elem) {
        case E_F32: ((float*)p)[i] = v; break;
        case E_F16: ((unsigned short*)p)[i] = f2h(v); break;
        case E_I64: ((long long*)p)[i] = f2ll(v); break;
        case E_I32: ((int*)p)[i] = (int)f2ll(v); break;
        default: ((unsigned char*)p)[i] = (unsigned char)f2ll(v); break;
    }
}

__device__ __forceinline__ float sigmoid(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

// x clamped to [lo, hi] with NaN passing through (as the engine's Clip and Rust's clamp).
__device__ __forceinline__ float clamp_nan(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

__device__ __forceinline__ float apply(const EwOp& op, float a, float b, float c) {
    switch (op.opcode) {
        case OP_ADD: return a + b;
        case OP_SUB: return a - b;
        case OP_MUL: return a * b;
        case OP_DIV: return a / b;
        case OP_MAX: return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b);
        case OP_MIN: return (a != a || b != b) ? __int_as_float(0x7fc00000) : fminf(a, b);
        case OP_POW: return b == 2.0f ? a * a : powf(a, b);
        case OP_NEG: return -a;
        case OP_ABS: return fabsf(a);
        case OP_EXP: return expf(a);
        case OP_LOG: return logf(a);
        case OP_SQRT: return sqrtf(a);
        case OP_RECIP: return 1.0f / a;
        case OP_TANH: return tanhf(a);
        case OP_SIGMOID: return sigmoid(a);
        case OP_RELU: return a < 0.0f ? 0.0f : a;
        case OP_ERF: return erff(a);
        case OP_GELU: return 0.5f * a * (1.0f + erff(a * 0.70710678118654752f));
        case OP_GELU_TANH: return 0.5f * a * (1.0f + tanhf(0.79788456080286536f * (a + 0.044715f * a * a * a)));
        case OP_SILU: return a * sigmoid(a);
        case OP_CLIP: return clamp_nan(a, op.imm0, op.imm1);
        case OP_CONST: return op.imm0;
        case OP_WHERE: return a != 0.0f ? b : c;
        case OP_EQUAL: return a == b ? 1.0f : 0.0f;
        case OP_LESS: return a < b ? 1.0f : 0.0f;
        case OP_GREATER: return a > b ? 1.0f : 0.0f;
        case OP_NOT: return a == 0.0f ? 1.0f : 0.0f;
        case OP_FLOOR: return floorf(a);
        case OP_LESS_EQ: return a <= b ? 1.0f : 0.0f;
        case OP_GREATER_EQ: return a >= b ? 1.0f : 0.0f;
        case OP_AND: return (a != 0.0f && b != 0.0f) ? 1.0f : 0.0f;
        case OP_OR: return (a != 0.0f || b != 0.0f) ? 1.0f : 0.0f;
        case OP_XOR: return ((a != 0.0f) != (b != 0.0f)) ? 1.0f : 0.0f;
        case OP_ISNAN: return a != a ? 1.0f : 0.0f;
        case OP_LEAKY_RELU: return a < 0.0f ? op.imm0 * a : a;
        case OP_HARD_SIGMOID: return clamp_nan(op.imm0 * a + op.imm1, 0.0f, 1.0f);
        case OP_HARD_SWISH: return a * clamp_nan(a * (1.0f / 6.0f) + 0.5f, 0.0f, 1.0f);
        case OP_CEIL: return ceilf(a);
        case OP_ROUND: return rintf(a);
        case OP_AFFINE: return a * op.imm0 + op.imm1;
        default: return __int_as_float(0x7fc00000);
    }
}

template <typename I>
__device__ void ew_loop(const EwProgram& p, float* regs, long long n) {
    float* r = regs + threadIdx.x;  // register k of this thread: r[k * EW_BLOCK]
    const int rank = p.rank, n_in = p.n_inputs, n_ops = p.n_ops;
    const int last = n_ops > 0 ? EW_INPUTS + n_ops - 1 : 0;
    I step = (I)gridDim.x * (I)blockDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (I)n; i += step) {
        long long off[EW_INPUTS] = {0, 0, 0, 0};
        I rem = i;
#pragma unroll
        for (int d = EW_RANK - 1; d >= 0; --d) {
            if (d < rank) {
                I len = (I)p.shape[d];
                I q = rem / len;
                long long id = (long long)(rem - q * len);
                rem = q;
#pragma unroll
                for (int k = 0; k < EW_INPUTS; ++k) off[k] += id * p.in[k].strides[d];
            }
        }
#pragma unroll
        for (int k = 0; k < EW_INPUTS; ++k) {
            if (k < n_in) r[k * EW_BLOCK] = load_elem(p.in[k].ptr, p.in[k].elem, off[k]);
        }
        for (int o = 0; o < n_ops; ++o) {
            const EwOp& op = p.ops[o];
            float v = apply(op, r[op.a * EW_BLOCK], r[op.b * EW_BLOCK], r[op.c * EW_BLOCK]);
            r[(EW_INPUTS + o) * EW_BLOCK] = v;
        }
        store_elem(p.out, p.out_elem, (long long)i, r[last * EW_BLOCK]);
    }
}

// Launch with EW_BLOCK threads per block; `prog` is the device copy of a program validated by
// EwBuilder::finish (register indices, counts, rank), n its number of output elements.
extern "C" __global__ void __launch_bounds__(EW_BLOCK) kiln_elementwise(const EwProgram* __restrict__ prog,
                                                                        long long n) {
    __shared__ EwProgram p;
    __shared__ float regs[EW_REGS * EW_BLOCK];
    const unsigned int* src = (const unsigned int*)prog;
    unsigned int* dst = (unsigned int*)&p;
    for (int w = threadIdx.x; w < (int)(sizeof(EwProgram) / 4); w += blockDim.x) dst[w] = src[w];
    __syncthreads();
    // A stale or mismatched n must not index past the program's shape.
    long long total = 1;
    for (int d = 0; d < p.rank; ++d) total *= p.shape[d];
    if (n > total) n = total;
    if (n < 0x7fffffffLL) {
        ew_loop<unsigned int>(p, regs, n);
    } else {
        ew_loop<unsigned long long>(p, regs, n);
    }
}
