//! Naive f64 references of the dense ops (what the f32 code must compute) and test helpers.

use crate::dense::{BatchShape, GptDense};
use switchyard_kernels::{Compute, Engine};

/// A 2-thread engine (exercises the threaded paths).
pub(crate) fn engine() -> Engine {
    Engine::new(Compute::new(2)).expect("engine")
}

pub(crate) fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Panics (test failure) unless `max |got - want| <= tol * (max |want| + 1e-6)`.
pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs())) + 1e-6;
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs();
        if e > worst {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= tol * scale,
        "{what}: max error {worst:.3e} at {at} (got {}, want {}) exceeds {tol:.1e} x scale {scale:.3e}",
        got[at],
        want[at]
    );
}

/// Central finite differences of `f` at `p` (f32 parameters, f64 function): the step is the
/// actual f32 difference, so the rounding of `p +- h` does not bias the quotient.
pub(crate) fn fd_grad(p: &[f32], mut f: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    let mut q = p.to_vec();
    (0..p.len())
        .map(|i| {
            let h = 1e-3f32 * p[i].abs().max(1.0);
            q[i] = p[i] + h;
            let plus_x = q[i];
            let plus = f(&q);
            q[i] = p[i] - h;
            let minus_x = q[i];
            let minus = f(&q);
            q[i] = p[i];
            (plus - minus) / (plus_x as f64 - minus_x as f64)
        })
        .collect()
}

pub(crate) fn linear(x: &[f64], rows: usize, w: &[f64], b: Option<&[f64]>, i: usize, o: usize) -> Vec<f64> {
    let mut y = vec![0.0; rows * o];
    for r in 0..rows {
        for c in 0..o {
            let mut s = b.map_or(0.0, |b| b[c]);
            for k in 0..i {
                s += x[r * i + k] * w[k * o + c];
            }
            y[r * o + c] = s;
        }
    }
    y
}

pub(crate) fn layer_norm(x: &[f64], rows: usize, d: usize, gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; rows * d];
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let mean = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for j in 0..d {
            y[r * d + j] = (row[j] - mean) * rstd * gamma[j] + beta[j];
        }
    }
    y
}

/// Multi-head causal self-attention with projections (biases optional as in [`linear`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    x: &[f64],
    shape: BatchShape,
    d: usize,
    heads: usize,
    w_qkv: &[f64],
    b_qkv: Option<&[f64]>,
    w_proj: &[f64],
    b_proj: Option<&[f64]>,
) -> Vec<f64> {
    let (bsz, seq) = (shape.batch, shape.seq);
    let t = bsz * seq;
    let dh = d / heads;
    let qkv = linear(x, t, w_qkv, b_qkv, d, 3 * d);
    let mut y = vec![0.0; t * d];
    let scale = 1.0 / (dh as f64).sqrt();
    for b in 0..bsz {
        for h in 0..heads {
            for i in 0..seq {
                let qi = &qkv[(b * seq + i) * 3 * d + h * dh..][..dh];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let kj = &qkv[(b * seq + j) * 3 * d + d + h * dh..][..dh];
                        dot(qi, kj) * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let p = (s - m).exp() / z;
                    let vj = &qkv[(b * seq + j) * 3 * d + 2 * d + h * dh..][..dh];
                    for c in 0..dh {
                        y[(b * seq + i) * d + h * dh + c] += p * vj[c];
                    }
                }
            }
        }
    }
    linear(&y, t, w_proj, b_proj, d, d)
}

pub(crate) fn embedding(tokens: &[u32], shape: BatchShape, d: usize, table: &[f64], pos: &[f64]) -> Vec<f64> {
    let mut x = vec![0.0; shape.tokens() * d];
    for (r, &tok) in tokens.iter().enumerate() {
        let s = r % shape.seq;
        for j in 0..d {
            x[r * d + j] = table[tok as usize * d + j] + pos[s * d + j];
        }
    }
    x
}

/// Sum over rows of `-log softmax(logits)[target]`.
pub(crate) fn cross_entropy_sum(logits: &[f64], vocab: usize, targets: &[u32]) -> f64 {
    targets
        .iter()
        .enumerate()
        .map(|(r, &t)| {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
            lse - row[t as usize]
        })
        .sum()
}

/// `ffn(layer, u, rows) -> m`: a stand-in for the MoE FFN in [`gpt_loss`].
pub(crate) type RefFfn<'a> = dyn Fn(usize, &[f64], usize) -> Vec<f64> + 'a;

/// The mean loss of the whole model in f64, with `ffn(u, rows)` in place of each MoE layer
/// (block output `x + ffn(ln2(x))`, the same function for every layer index given).
pub(crate) fn gpt_loss(model: &GptDense, tokens: &[u32], targets: &[u32], shape: BatchShape, ffn: &RefFfn) -> f64 {
    let c = model.config;
    let (d, t) = (c.d_model, shape.tokens());
    let e = &model.embedding;
    let mut x = embedding(tokens, shape, d, &to64(&e.token), &to64(&e.position));
    for (l, layer) in model.layers.iter().enumerate() {
        let ln =
            |n: &crate::dense::LayerNorm, x: &[f64]| layer_norm(x, t, d, &to64(&n.gamma), &to64(&n.beta), n.eps as f64);
        let a_in = ln(&layer.ln1, &x);
        let a = &layer.attn;
        let a_out = attention(
            &a_in,
            shape,
            d,
            c.n_heads,
            &to64(&a.qkv.weight),
            a.qkv.bias.as_deref().map(to64).as_deref(),
            &to64(&a.proj.weight),
            a.proj.bias.as_deref().map(to64).as_deref(),
        );
        for (xi, ai) in x.iter_mut().zip(&a_out) {
            *xi += ai;
        }
        let u = ln(&layer.ln2, &x);
        let m = ffn(l, &u, t);
        for (xi, mi) in x.iter_mut().zip(&m) {
            *xi += mi;
        }
    }
    let f = &model.ln_f;
    let h = layer_norm(&x, t, d, &to64(&f.gamma), &to64(&f.beta), f.eps as f64);
    let logits = linear(&h, t, &to64(&model.head.weight), None, d, c.vocab);
    cross_entropy_sum(&logits, c.vocab, targets) / t as f64
}
