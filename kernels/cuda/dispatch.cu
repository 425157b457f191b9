// Dispatch and combine kernels of the Switchyard MoE layer (CUDA C, compiled at run time by NVRTC).
//
// Mirrors kernels/src/dispatch.rs. The grouped buffer holds the kept assignments of expert 0, then
// expert 1, ... (no padding): expert e owns rows offsets[e]..offsets[e+1], and the assignment at
// position p of expert e is row offsets[e] + p. assignment_row[t*k + j] is that row, or -1 when
// the assignment was dropped.
//
// Determinism: no atomics. combine_forward and gather_backward give each token to one thread
// block, which sums the token's k contributions in choice order; the dot products of
// combine_backward_weights use a fixed reduction tree.
//
// Conventions: see gate.cu (sizes as unsigned int, size_t offsets, every index read from memory
// is bounds-checked before use).

#define REDUCE_BLOCK 256

// Token <-> row maps, one thread per assignment a = t*k + j (grid-stride):
//   assignment_row[a] = offsets[e] + position[a] (or -1), and for that row row_token = t,
//   row_assignment = a, row_expert = e. Rows that no assignment maps to are left unwritten (the
//   positions of a routing cover rows 0..N exactly).
extern "C" __global__ void build_rows(
    const unsigned int* __restrict__ expert_index, const int* __restrict__ position,
    const unsigned int* __restrict__ offsets, unsigned int tokens, unsigned int top_k,
    unsigned int experts, unsigned int rows, int* __restrict__ assignment_row,
    unsigned int* __restrict__ row_token, unsigned int* __restrict__ row_assignment,
    unsigned int* __restrict__ row_expert)
{
    const size_t total = (size_t)tokens * top_k;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t a = (size_t)blockIdx.x * blockDim.x + threadIdx.x; a < total; a += stride) {
        const int p = position[a];
        const unsigned int e = expert_index[a];
        int row = -1;
        if (p >= 0 && e < experts) {
            const size_t r = (size_t)offsets[e] + (size_t)p;
            if (r < rows && r < offsets[e + 1]) row = (int)r;
        }
        assignment_row[a] = row;
        if (row >= 0) {
            row_token[row] = (unsigned int)(a / top_k);
            row_assignment[row] = (unsigned int)a;
            row_expert[row] = e;
        }
    }
}

// buf[row] = x[row_token[row]]: one block per row (block-stride), threads over the d columns.
//   x [T, d], row_token [N], buf [N, d].
extern "C" __global__ void dispatch_gather(
    const float* __restrict__ x, const unsigned int* __restrict__ row_token, unsigned int tokens,
    unsigned int rows, unsigned int d, float* __restrict__ buf)
{
    for (size_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t t = row_token[row];
        float* dst = buf + row * d;
        if (t < tokens) {
            const float* src = x + t * d;
            for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
        } else {
            for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = 0.0f;
        }
    }
}

// out[t] = sum_j weight[t, j] * y[assignment_row[t, j]] over the kept assignments (zeros when all
// were dropped): one block per token (block-stride), threads over the columns, j in order.
//   assignment_row [T, k], weight [T, k], y [N, d], out [T, d].
extern "C" __global__ void combine_forward(
    const int* __restrict__ assignment_row, const float* __restrict__ weight,
    const float* __restrict__ y, unsigned int tokens, unsigned int top_k, unsigned int rows,
    unsigned int d, float* __restrict__ out)
{
    for (size_t t = blockIdx.x; t < tokens; t += gridDim.x) {
        const int* ar = assignment_row + t * top_k;
        const float* w = weight + t * top_k;
        for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) {
            float acc = 0.0f;
            for (unsigned int j = 0; j < top_k; ++j) {
                const int r = ar[j];
                if (r >= 0 && (unsigned int)r < rows) acc += w[j] * y[(size_t)r * d + i];
            }
            out[t * d + i] = acc;
        }
    }
}

// Backward of combine for the expert outputs: d_y[row] = weight[a] * d_out[t] with
// a = row_assignment[row], t = a / k. One block per row (block-stride).
//   row_assignment [N], weight [T, k], d_out [T, d], d_y [N, d].
extern "C" __global__ void combine_backward_rows(
    const unsigned int* __restrict__ row_assignment, const float* __restrict__ weight,
    const float* __restrict__ d_out, unsigned int tokens, unsigned int top_k, unsigned int rows,
    unsigned int d, float* __restrict__ d_y)
{
    const size_t total = (size_t)tokens * top_k;
    for (size_t row = blockIdx.x; row < rows; row += gridDim.x) {
        const size_t a = row_assignment[row];
        float* dst = d_y + row * d;
        if (a < total) {
            const float w = weight[a];
            const float* g = d_out + (a / top_k) * d;
            for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = w * g[i];
        } else {
            for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = 0.0f;
        }
    }
}

// Backward of combine for the weights: d_weight[t, j] = d_out[t] . y[row(t, j)] (0 when dropped).
// One block of REDUCE_BLOCK threads per token (block-stride); each dot product is reduced in a
// fixed tree.   assignment_row [T, k], y [N, d], d_out [T, d], d_weight [T, k].
extern "C" __global__ void combine_backward_weights(
    const int* __restrict__ assignment_row, const float* __restrict__ y,
    const float* __restrict__ d_out, unsigned int tokens, unsigned int top_k, unsigned int rows,
    unsigned int d, float* __restrict__ d_weight)
{
    __shared__ float red[REDUCE_BLOCK];
    const unsigned int tid = threadIdx.x;
    for (size_t t = blockIdx.x; t < tokens; t += gridDim.x) {
        const float* g = d_out + t * d;
        for (unsigned int j = 0; j < top_k; ++j) {
            const int r = assignment_row[t * top_k + j];
            const int kept = r >= 0 && (unsigned int)r < rows;
            float acc = 0.0f;
            if (kept) {
                const float* yr = y + (size_t)r * d;
                for (unsigned int i = tid; i < d; i += REDUCE_BLOCK) acc += g[i] * yr[i];
            }
            red[tid] = acc;
            __syncthreads();
            for (unsigned int half = REDUCE_BLOCK / 2; half > 0; half >>= 1) {
                if (tid < half) red[tid] += red[tid + half];
                __syncthreads();
            }
            if (tid == 0) d_weight[t * top_k + j] = kept ? red[0] : 0.0f;
            __syncthreads();
        }
    }
}

// Backward of the gather: d_x[t] (= or +=) sum_j d_buf[row(t, j)] over the kept assignments.
// One block per token (block-stride), j in order.   assignment_row [T, k], d_buf [N, d], d_x [T, d].
extern "C" __global__ void gather_backward(
    const int* __restrict__ assignment_row, const float* __restrict__ d_buf, unsigned int tokens,
    unsigned int top_k, unsigned int rows, unsigned int d, int accumulate, float* __restrict__ d_x)
{
    for (size_t t = blockIdx.x; t < tokens; t += gridDim.x) {
        const int* ar = assignment_row + t * top_k;
        for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) {
            float acc = accumulate ? d_x[t * d + i] : 0.0f;
            for (unsigned int j = 0; j < top_k; ++j) {
                const int r = ar[j];
                if (r >= 0 && (unsigned int)r < rows) acc += d_buf[(size_t)r * d + i];
            }
            d_x[t * d + i] = acc;
        }
    }
}
