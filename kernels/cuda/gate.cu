// Router kernels of the Switchyard MoE layer (CUDA C, compiled at run time by NVRTC).
//
// Mirrors kernels/src/gate.rs (the CPU reference):
//   * gate_softmax_topk: stable softmax per token, top-k on `probs + bias` (ties to the lower expert
//     index, the k choices in descending score), combine weights (optionally renormalised over the
//     k selected), the top-1 probability (for batch-prioritised drop order) and the demand per expert.
//   * gate_positions: capacity positions, choice rank first, then token order (arrival order, or a
//     given order of tokens); assignments beyond the capacity are dropped (position -1).
//   * gate_loss_stats: column sums of the probabilities and the sum of logsumexp^2, in double, for
//     the load-balancing loss and the router z-loss (computed on the host from these sums).
//   * gate_backward: d loss / d logits from the gradient of the combine weights plus the
//     aux-loss and z-loss terms (the GEMMs around it run on cuBLAS).
//
// Conventions (all kernels of this crate): row-major float buffers; sizes as unsigned int (the host
// checks that they fit), flat offsets in size_t; indices read from memory are bounds-checked before
// use, so a bad index array cannot make a kernel touch memory outside its buffers. No atomics on
// floats: every float result is computed in a fixed order, so results are deterministic.

#define REDUCE_BLOCK 256
// -infinity without the CUDA headers (NVRTC compiles these files stand-alone).
#define NEG_INF __int_as_float(0xff800000)

// One thread per token (grid-stride loop).
//   logits [T, E], bias [E] (read only when has_bias), probs [T, E], logsumexp [T],
//   expert_index [T, k], weight [T, k], top1 [T], demand [E] (zeroed by the caller; integer atomics,
//   so the counts do not depend on the order), status [1] (bit 0 set when a logit is not finite).
extern "C" __global__ void gate_softmax_topk(
    const float* __restrict__ logits, const float* __restrict__ bias,
    unsigned int tokens, unsigned int experts, unsigned int top_k, int has_bias, int renormalize,
    float* __restrict__ probs, float* __restrict__ logsumexp, unsigned int* __restrict__ expert_index,
    float* __restrict__ weight, float* __restrict__ top1, unsigned int* __restrict__ demand,
    unsigned int* __restrict__ status)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < tokens; t += stride) {
        const float* l = logits + t * experts;
        float* p = probs + t * experts;
        float m = NEG_INF;
        int finite = 1;
        for (unsigned int e = 0; e < experts; ++e) {
            const float v = l[e];
            if (!isfinite(v)) finite = 0;
            m = fmaxf(m, v);
        }
        if (!finite) atomicOr(status, 1u);
        float s = 0.0f;
        for (unsigned int e = 0; e < experts; ++e) {
            const float q = expf(l[e] - m);
            p[e] = q;
            s += q;
        }
        const float inv = 1.0f / s;
        for (unsigned int e = 0; e < experts; ++e) p[e] *= inv;
        logsumexp[t] = m + logf(s);

        // Top-k by k selection passes in the order (score descending, index ascending): pass j
        // takes the best candidate strictly after the previous choice in that order. O(k E), no
        // per-thread arrays, any k <= E.
        unsigned int* idx = expert_index + t * top_k;
        float* w = weight + t * top_k;
        float prev_s = 0.0f;
        unsigned int prev_e = 0;
        float sum = 0.0f;
        for (unsigned int j = 0; j < top_k; ++j) {
            float best_s = 0.0f;
            int best_e = -1;
            for (unsigned int e = 0; e < experts; ++e) {
                const float sc = p[e] + (has_bias ? bias[e] : 0.0f);
                const int after = j == 0 || sc < prev_s || (sc == prev_s && e > prev_e);
                if (after && (best_e < 0 || sc > best_s)) {
                    best_s = sc;
                    best_e = (int)e;
                }
            }
            // Only NaN scores (non-finite logits, reported through `status`) leave no candidate.
            if (best_e < 0) best_e = 0;
            idx[j] = (unsigned int)best_e;
            const float wj = p[best_e];
            w[j] = wj;
            sum += wj;
            atomicAdd(&demand[best_e], 1u);
            prev_s = best_s;
            prev_e = (unsigned int)best_e;
        }
        top1[t] = top_k > 0 ? w[0] : 0.0f;
        if (renormalize && sum > 0.0f) {
            for (unsigned int j = 0; j < top_k; ++j) w[j] /= sum;
        }
    }
}

// Capacity positions. One block per expert (grid.x = E), REDUCE_BLOCK threads. The block walks
// the T*k assignments in the order (choice rank j, then token order) in chunks of REDUCE_BLOCK,
// counting its expert's assignments with a block-wide inclusive scan; the i-th assignment of the
// expert (from 0) gets position i when i < capacity, else -1 (dropped). Each assignment belongs to
// exactly one expert, so each position is written by exactly one block.
//   expert_index [T, k], order [T] (token order, read only when has_order; else 0..T), position [T, k].
extern "C" __global__ void gate_positions(
    const unsigned int* __restrict__ expert_index, const unsigned int* __restrict__ order,
    unsigned int tokens, unsigned int top_k, unsigned int capacity, int has_order,
    int* __restrict__ position)
{
    __shared__ unsigned int scan[REDUCE_BLOCK];
    const unsigned int e = blockIdx.x;
    const unsigned int tid = threadIdx.x;
    const size_t total = (size_t)tokens * top_k;
    unsigned int base = 0;
    for (size_t start = 0; start < total; start += REDUCE_BLOCK) {
        const size_t i = start + tid;
        size_t a = 0;
        unsigned int flag = 0;
        if (i < total) {
            const size_t j = i / tokens;
            const size_t r = i % tokens;
            const size_t t = has_order ? (size_t)order[r] : r;
            if (t < tokens) {
                a = t * top_k + j;
                flag = expert_index[a] == e ? 1u : 0u;
            }
        }
        scan[tid] = flag;
        __syncthreads();
        for (unsigned int off = 1; off < REDUCE_BLOCK; off <<= 1) {
            const unsigned int v = tid >= off ? scan[tid - off] : 0u;
            __syncthreads();
            scan[tid] += v;
            __syncthreads();
        }
        if (flag) {
            const unsigned int pos = base + scan[tid] - 1u;
            position[a] = pos < capacity ? (int)pos : -1;
        }
        const unsigned int chunk = scan[REDUCE_BLOCK - 1];
        __syncthreads();
        base += chunk;
    }
}

// Sums for the auxiliary losses. Blocks 0..E-1: sum over tokens of probs[:, e]; block E: sum over
// tokens of logsumexp^2. Accumulated in double, reduced in a fixed tree (deterministic).
// REDUCE_BLOCK threads per block. out [E + 1].
extern "C" __global__ void gate_loss_stats(
    const float* __restrict__ probs, const float* __restrict__ logsumexp,
    unsigned int tokens, unsigned int experts, double* __restrict__ out)
{
    __shared__ double red[REDUCE_BLOCK];
    const unsigned int b = blockIdx.x;
    const unsigned int tid = threadIdx.x;
    double acc = 0.0;
    for (size_t t = tid; t < tokens; t += REDUCE_BLOCK) {
        if (b < experts) {
            acc += (double)probs[t * experts + b];
        } else {
            const double v = (double)logsumexp[t];
            acc += v * v;
        }
    }
    red[tid] = acc;
    __syncthreads();
    for (unsigned int half = REDUCE_BLOCK / 2; half > 0; half >>= 1) {
        if (tid < half) red[tid] += red[tid + half];
        __syncthreads();
    }
    if (tid == 0 && b <= experts) out[b] = red[0];
}

// Backward of the router up to the logits, one thread per token:
//   dl = aux_coef (d aux / d probs, per expert), plus the combine-weight gradient
//        (through the renormalisation when on: dp_j = (dw_j - sum_i dw_i w_i) / S);
//   then the softmax backward dl_e = p_e (dl_e - sum dl p) and the z-loss term z_coef * lse * p_e.
//   probs [T, E], expert_index [T, k], d_weight [T, k], logsumexp [T], aux_coef [E], d_logits [T, E].
extern "C" __global__ void gate_backward(
    const float* __restrict__ probs, const unsigned int* __restrict__ expert_index,
    const float* __restrict__ d_weight, const float* __restrict__ logsumexp,
    const float* __restrict__ aux_coef, unsigned int tokens, unsigned int experts, unsigned int top_k,
    int renormalize, float z_coef, float* __restrict__ d_logits)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < tokens; t += stride) {
        const float* p = probs + t * experts;
        const unsigned int* idx = expert_index + t * top_k;
        const float* dw = d_weight + t * top_k;
        float* dl = d_logits + t * experts;
        for (unsigned int e = 0; e < experts; ++e) dl[e] = aux_coef[e];
        float sum_sel = 0.0f;
        for (unsigned int j = 0; j < top_k; ++j) {
            if (idx[j] < experts) sum_sel += p[idx[j]];
        }
        if (renormalize && sum_sel > 0.0f) {
            float dot = 0.0f;
            for (unsigned int j = 0; j < top_k; ++j) {
                if (idx[j] < experts) dot += dw[j] * p[idx[j]] / sum_sel;
            }
            for (unsigned int j = 0; j < top_k; ++j) {
                if (idx[j] < experts) dl[idx[j]] += (dw[j] - dot) / sum_sel;
            }
        } else {
            for (unsigned int j = 0; j < top_k; ++j) {
                if (idx[j] < experts) dl[idx[j]] += dw[j];
            }
        }
        float dot = 0.0f;
        for (unsigned int e = 0; e < experts; ++e) dot += dl[e] * p[e];
        const float lse = logsumexp[t];
        for (unsigned int e = 0; e < experts; ++e) dl[e] = p[e] * (dl[e] - dot) + z_coef * lse * p[e];
    }
}
