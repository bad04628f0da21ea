// kiln_cast: n elements of one element type to another, with the conversions of the engine's
// reference Cast (engine/src/ops/shape/cast.rs):
//   float -> int   truncates toward zero and saturates to the 64-bit range (NaN -> 0), then wraps
//                  to i32 / u8 like `(x as i64) as i32`;
//   int -> float   rounds to nearest; int -> f16 goes through f32 (the engine rounds the same way);
//   int -> int     sign/zero-extends or wraps, never through a float;
//   `boolean` with a U8 destination writes x != 0 (ONNX BOOL) instead of wrapping.
// Element codes (Elem in cuda/src/kernels/mod.rs): F32=0 F16=1 I64=2 I32=3 U8=4.
// One launch = one type pair: the switch on the codes sits outside the grid-stride loop.
//
// f16, to_f32/from_f32, NEG_INF and warp_sum come from common.cuh (prepended by sources.rs).

// cvt to an integer type saturates and maps NaN to 0 — exactly Rust's `f32 as i64`.
__device__ __forceinline__ long long f2ll(float x) {
    long long r;
    asm("cvt.rzi.s64.f32 %0, %1;" : "=l"(r) : "f"(x));
    return r;
}

template <typename D> __device__ __forceinline__ D from_float(float x, int boolean);
template <> __device__ __forceinline__ float from_float<float>(float x, int) { return x; }
template <> __device__ __forceinline__ f16 from_float<f16>(float x, int) { return from_f32<f16>(x); }
template <> __device__ __forceinline__ long long from_float<long long>(float x, int) { return f2ll(x); }
template <> __device__ __forceinline__ int from_float<int>(float x, int) { return (int)f2ll(x); }
template <> __device__ __forceinline__ unsigned char from_float<unsigned char>(float x, int boolean) {
    return boolean ? (unsigned char)(x != 0.0f) : (unsigned char)f2ll(x);
}

template <typename D> __device__ __forceinline__ D from_int(long long x, int boolean);
template <> __device__ __forceinline__ float from_int<float>(long long x, int) { return (float)x; }
template <> __device__ __forceinline__ f16 from_int<f16>(long long x, int) { return from_f32<f16>((float)x); }
template <> __device__ __forceinline__ long long from_int<long long>(long long x, int) { return x; }
template <> __device__ __forceinline__ int from_int<int>(long long x, int) { return (int)x; }
template <> __device__ __forceinline__ unsigned char from_int<unsigned char>(long long x, int boolean) {
    return boolean ? (unsigned char)(x != 0) : (unsigned char)x;
}

template <typename D> __device__ __forceinline__ D convert(float x, int b) { return from_float<D>(x, b); }
template <typename D> __device__ __forceinline__ D convert(f16 x, int b) { return from_float<D>(to_f32(x), b); }
template <typename D> __device__ __forceinline__ D convert(long long x, int b) { return from_int<D>(x, b); }
template <typename D> __device__ __forceinline__ D convert(int x, int b) { return from_int<D>((long long)x, b); }
template <typename D> __device__ __forceinline__ D convert(unsigned char x, int b) {
    return from_int<D>((long long)x, b);
}

template <typename S, typename D>
__device__ void cast_loop(const void* src, void* dst, long long n, int boolean) {
    const S* __restrict__ s = (const S*)src;
    D* __restrict__ d = (D*)dst;
    long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        d[i] = convert<D>(s[i], boolean);
    }
}

#define CAST_ROW(SC, S)                                       \
    case SC * 5 + 0: cast_loop<S, float>(src, dst, n, boolean); break;         \
    case SC * 5 + 1: cast_loop<S, f16>(src, dst, n, boolean); break;           \
    case SC * 5 + 2: cast_loop<S, long long>(src, dst, n, boolean); break;     \
    case SC * 5 + 3: cast_loop<S, int>(src, dst, n, boolean); break;           \
    case SC * 5 + 4: cast_loop<S, unsigned char>(src, dst, n, boolean); break;

extern "C" __global__ void kiln_cast(const void* src, int src_elem, void* dst, int dst_elem, long long n,
                                     int boolean) {
    switch (src_elem * 5 + dst_elem) {
        CAST_ROW(0, float)
        CAST_ROW(1, f16)
        CAST_ROW(2, long long)
        CAST_ROW(3, int)
        CAST_ROW(4, unsigned char)
        default: break;
    }
}
