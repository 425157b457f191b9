// AdamW step (CUDA C, compiled at run time by NVRTC).
//
// The formula (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"; torch.optim.AdamW's
// order), for step t = 1, 2, ... with gradient g, the same as the runtime's CPU AdamW
// (runtime/src/optim.rs):
//
//   p <- p * (1 - lr * weight_decay)              (decoupled weight decay)
//   m <- beta1 * m + (1 - beta1) * g
//   v <- beta2 * v + (1 - beta2) * g * g
//   p <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
//
// computed as the runtime computes it: the host passes decay = 1 - lr * weight_decay,
// step_size = lr / (1 - beta1^t) and inv_sqrt_c2 = 1 / sqrt(1 - beta2^t) (bias corrections in
// double), and p <- p * decay - step_size * m / (sqrt(v) * inv_sqrt_c2 + eps).
// One thread per element, grid-stride; in place on p, m, v.
extern "C" __global__ void adamw_step(
    float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
    unsigned long long n, float beta1, float beta2, float eps, float decay, float step_size,
    float inv_sqrt_c2)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float gi = g[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_c2 + eps);
    }
}
