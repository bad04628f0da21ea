// kiln_copy_strided: dst[sum(i_d * dst_stride_d)] = src[sum(i_d * src_stride_d)] for every index
// i of an output shape of rank <= 6. Strides are in elements and may be 0 (broadcast: Expand) or
// negative (Slice with negative steps; the caller offsets `src` to the first element). Transpose
// permutes the source strides, Slice offsets the pointer and multiplies strides by the steps,
// and one input of a Concat is a copy whose dst pointer is offset into the output and whose
// dst strides are the output's.
//
// The shape and strides arrive right-aligned in 6 slots (slot 5 is the innermost axis; only the
// last `rank` slots are read). The element type is only its size (1, 2, 4, 8 or 16 bytes — the
// host widens contiguous runs to 16-byte units), so one kernel moves every dtype.
// Index math is 32-bit when the element count allows (one uniform branch), offsets 64-bit.

// 16-byte aligned so that a unit moves as one vector load and store.
struct alignas(16) u128 {
    unsigned long long lo, hi;
};

template <typename T, typename I>
__device__ void copy_loop(T* __restrict__ dst, const T* __restrict__ src, int rank, long long n, const long long* shape,
                          const long long* ss, const long long* ds) {
    I step = (I)gridDim.x * (I)blockDim.x;
    for (I i = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; i < (I)n; i += step) {
        I rem = i;
        long long so = 0, dof = 0;
#pragma unroll
        for (int d = 5; d >= 0; --d) {
            if (d >= 6 - rank) {
                I len = (I)shape[d];
                I q = rem / len;
                I id = rem - q * len;
                rem = q;
                so += (long long)id * ss[d];
                dof += (long long)id * ds[d];
            }
        }
        dst[dof] = src[so];
    }
}

template <typename T>
__device__ void copy_typed(void* dst, const void* src, int rank, long long n, const long long* shape,
                           const long long* ss, const long long* ds) {
    // 32-bit indices when i + step cannot wrap: i < 2^31 and step <= 2^31.
    if (n < 0x7fffffffLL) {
        copy_loop<T, unsigned int>((T*)dst, (const T*)src, rank, n, shape, ss, ds);
    } else {
        copy_loop<T, unsigned long long>((T*)dst, (const T*)src, rank, n, shape, ss, ds);
    }
}

extern "C" __global__ void kiln_copy_strided(void* dst, const void* src, int elem_size, int rank, long long n,
                                             long long n0, long long n1, long long n2, long long n3, long long n4,
                                             long long n5, long long s0, long long s1, long long s2, long long s3,
                                             long long s4, long long s5, long long d0, long long d1, long long d2,
                                             long long d3, long long d4, long long d5) {
    const long long shape[6] = {n0, n1, n2, n3, n4, n5};
    const long long ss[6] = {s0, s1, s2, s3, s4, s5};
    const long long ds[6] = {d0, d1, d2, d3, d4, d5};
    switch (elem_size) {
        case 1: copy_typed<unsigned char>(dst, src, rank, n, shape, ss, ds); break;
        case 2: copy_typed<unsigned short>(dst, src, rank, n, shape, ss, ds); break;
        case 4: copy_typed<unsigned int>(dst, src, rank, n, shape, ss, ds); break;
        case 8: copy_typed<unsigned long long>(dst, src, rank, n, shape, ss, ds); break;
        case 16: copy_typed<u128>(dst, src, rank, n, shape, ss, ds); break;
        default: break;
    }
}
