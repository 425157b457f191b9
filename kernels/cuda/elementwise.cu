// Elementwise kernels of the Switchyard expert FFNs (CUDA C, compiled at run time by NVRTC).
//
// Mirrors kernels/src/activation.rs and the bias handling of kernels/src/experts.rs:
//   * GELU is the exact (erf) form, as on the CPU: gelu(x) = 0.5 x (1 + erf(x / sqrt 2)),
//     written 0.5 x erfc(-x / sqrt 2) so that negative x does not cancel;
//     gelu'(x) = 0.5 (1 + erf(x / sqrt 2)) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
//   * SwiGLU: rows of the first projection are [gate (h) | up (h)]; a = silu(gate) * up,
//     silu(g) = g sigmoid(g), silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g).
//   * Biases are per expert: row r of the grouped buffer belongs to expert row_expert[r].
//   * bias_grad: per-expert column sums in row order (one thread per column and expert).
//
// Conventions: see gate.cu. All loops are grid-stride, so any launch size covers the data.

#define SQRT1_2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

__device__ __forceinline__ float gelu_f(float x) { return 0.5f * x * erfcf(-x * SQRT1_2); }

__device__ __forceinline__ float gelu_grad_f(float x)
{
    return 0.5f * erfcf(-x * SQRT1_2) + x * INV_SQRT_2PI * expf(-0.5f * x * x);
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

// h[r, c] += bias[row_expert[r], c] (when has_bias); a[r, c] = gelu(h[r, c]).
//   h [rows, cols] (updated in place: the saved pre-activation), a [rows, cols], bias [E, cols].
extern "C" __global__ void bias_gelu_forward(
    float* __restrict__ h, float* __restrict__ a, const float* __restrict__ bias,
    const unsigned int* __restrict__ row_expert, unsigned int rows, unsigned int cols,
    unsigned int experts, int has_bias)
{
    const size_t n = (size_t)rows * cols;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float x = h[i];
        if (has_bias) {
            const unsigned int e = row_expert[i / cols];
            if (e < experts) x += bias[(size_t)e * cols + i % cols];
            h[i] = x;
        }
        a[i] = gelu_f(x);
    }
}

// g[i] *= gelu'(h[i]).   h, g [rows, cols].
extern "C" __global__ void gelu_backward(
    const float* __restrict__ h, float* __restrict__ g, unsigned int rows, unsigned int cols)
{
    const size_t n = (size_t)rows * cols;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        g[i] *= gelu_grad_f(h[i]);
    }
}

// a[r, c] = silu(gu[r, c]) * gu[r, cols + c].   gu [rows, 2 cols], a [rows, cols].
extern "C" __global__ void swiglu_forward(
    const float* __restrict__ gu, float* __restrict__ a, unsigned int rows, unsigned int cols)
{
    const size_t n = (size_t)rows * cols;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const size_t r = i / cols;
        const size_t c = i % cols;
        const float g = gu[r * 2 * cols + c];
        const float u = gu[r * 2 * cols + cols + c];
        a[i] = g * sigmoid_f(g) * u;
    }
}

// dgu[r] = [da * up * silu'(gate) | da * silu(gate)].   gu, dgu [rows, 2 cols], da [rows, cols].
extern "C" __global__ void swiglu_backward(
    const float* __restrict__ gu, const float* __restrict__ da, float* __restrict__ dgu,
    unsigned int rows, unsigned int cols)
{
    const size_t n = (size_t)rows * cols;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const size_t r = i / cols;
        const size_t c = i % cols;
        const float g = gu[r * 2 * cols + c];
        const float u = gu[r * 2 * cols + cols + c];
        const float s = sigmoid_f(g);
        const float silu = g * s;
        dgu[r * 2 * cols + c] = da[i] * u * (s * (1.0f + g * (1.0f - s)));
        dgu[r * 2 * cols + cols + c] = da[i] * silu;
    }
}

// y[r, c] = bias[row_expert[r], c] (0 for an out-of-range expert): the output bias, written before
// the second GEMM accumulates onto it.   y [rows, cols], bias [E, cols].
extern "C" __global__ void bias_fill_rows(
    float* __restrict__ y, const float* __restrict__ bias, const unsigned int* __restrict__ row_expert,
    unsigned int rows, unsigned int cols, unsigned int experts)
{
    const size_t n = (size_t)rows * cols;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const unsigned int e = row_expert[i / cols];
        y[i] = e < experts ? bias[(size_t)e * cols + i % cols] : 0.0f;
    }
}

// out[e, c] = sum over rows offsets[e]..offsets[e+1] of g[r, c], in row order (deterministic).
// grid = (ceil(cols / blockDim.x), E): one thread per (column, expert); consecutive threads read
// consecutive columns (coalesced).   g [rows, cols], offsets [E + 1], out [E, cols].
extern "C" __global__ void bias_grad(
    const float* __restrict__ g, const unsigned int* __restrict__ offsets, unsigned int experts,
    unsigned int rows, unsigned int cols, float* __restrict__ out)
{
    const unsigned int e = blockIdx.y;
    const size_t c = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= experts || c >= cols) return;
    const unsigned int r0 = min(offsets[e], rows);
    const unsigned int r1 = min(max(offsets[e + 1], r0), rows);
    float acc = 0.0f;
    for (size_t r = r0; r < r1; ++r) acc += g[r * cols + c];
    out[(size_t)e * cols + c] = acc;
}

// x[i] += y[i] (e.g. the router noise, drawn on the host with the CPU path's generator).
extern "C" __global__ void add_inplace(float* __restrict__ x, const float* __restrict__ y, unsigned long long n)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) x[i] += y[i];
}

// status[0] |= 1 when any x[i] is NaN or infinite.
extern "C" __global__ void flag_nonfinite(const float* __restrict__ x, unsigned long long n, unsigned int* __restrict__ status)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    int bad = 0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        if (!isfinite(x[i])) bad = 1;
    }
    if (bad) atomicOr(status, 1u);
}
