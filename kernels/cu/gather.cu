// kiln_gather: embedding lookup out[i, :] = table[idx[i], :] for a table [rows, row_len] and
// n_idx indices (INT64 or INT32), as the engine's Gather on axis 0. Negative indices count from
// the end (ONNX); an index outside [-rows, rows) writes a zero row and, when `err` is not null,
// stores 1 into *err (the caller zeroes it beforehand and reads it after the stream syncs).
// Rows move in `unit`-byte words (1, 2, 4, 8 or 16: the host picks the widest that divides the
// row size and both pointers' alignment), so one kernel gathers every element type.
// Grid-stride over output rows (blockIdx.x), threads over the words of a row.

struct alignas(16) u128 {
    unsigned long long lo, hi;
};

template <typename U, typename I>
__device__ void gather_rows(U* __restrict__ out, const U* __restrict__ table, const I* __restrict__ idx,
                            long long n_idx, long long rows, long long row_units, int* err) {
    for (long long i = blockIdx.x; i < n_idx; i += gridDim.x) {
        long long j = (long long)idx[i];
        if (j < 0) j += rows;
        U* dst = out + i * row_units;
        if (j < 0 || j >= rows) {
            U zero;
            for (int b = 0; b < (int)sizeof(U); ++b) ((unsigned char*)&zero)[b] = 0;
            for (long long k = threadIdx.x; k < row_units; k += blockDim.x) dst[k] = zero;
            if (err && threadIdx.x == 0) atomicExch(err, 1);
            continue;
        }
        const U* src = table + j * row_units;
        for (long long k = threadIdx.x; k < row_units; k += blockDim.x) dst[k] = src[k];
    }
}

#define GATHER_UNIT(N, U)                                                                        \
    case N:                                                                                       \
        gather_rows<U, I>((U*)out, (const U*)table, idx, n_idx, rows, row_units, err);            \
        break;

template <typename I>
__device__ void gather_unit(void* out, const void* table, const I* idx, int unit, long long n_idx, long long rows,
                            long long row_units, int* err) {
    switch (unit) {
        GATHER_UNIT(1, unsigned char)
        GATHER_UNIT(2, unsigned short)
        GATHER_UNIT(4, unsigned int)
        GATHER_UNIT(8, unsigned long long)
        GATHER_UNIT(16, u128)
        default: break;
    }
}

// idx_i64: 1 when idx holds INT64, 0 for INT32. row_units = row bytes / unit.
extern "C" __global__ void kiln_gather(void* out, const void* table, const void* idx, int idx_i64, int unit,
                                       long long n_idx, long long rows, long long row_units, int* err) {
    if (idx_i64) {
        gather_unit<long long>(out, table, (const long long*)idx, unit, n_idx, rows, row_units, err);
    } else {
        gather_unit<int>(out, table, (const int*)idx, unit, n_idx, rows, row_units, err);
    }
}
