//! Token embedding plus learned absolute positions: `x[b, s] = token[tokens[b, s]] + position[s]`.

use super::model::BatchShape;
use super::{push_named, push_named_mut};
use crate::error::{Result, RuntimeError, check_len};
use serde::{Deserialize, Serialize};
use switchyard_kernels::random::{SeededRng, normal_vec};

/// A token table `[vocab, d_model]` and a position table `[ctx, d_model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// Number of token ids.
    pub vocab: usize,
    /// Width of an embedding.
    pub d_model: usize,
    /// Longest sequence (rows of the position table).
    pub ctx: usize,
    /// `[vocab, d_model]`, row-major.
    pub token: Vec<f32>,
    /// `[ctx, d_model]`, row-major.
    pub position: Vec<f32>,
}

impl Embedding {
    /// Tables drawn from `N(0, token_std^2)` and `N(0, position_std^2)`.
    pub fn random(
        vocab: usize,
        d_model: usize,
        ctx: usize,
        token_std: f32,
        position_std: f32,
        rng: &mut SeededRng,
    ) -> Self {
        let token = normal_vec(rng, vocab * d_model, token_std);
        let position = normal_vec(rng, ctx * d_model, position_std);
        Self { vocab, d_model, ctx, token, position }
    }

    /// Tables of the same shape, all zero (gradient storage).
    pub fn zeros_like(&self) -> Self {
        Self { token: vec![0.0; self.token.len()], position: vec![0.0; self.position.len()], ..*self }
    }

    /// Checks the table lengths.
    pub fn check(&self) -> Result<()> {
        let (v, d, c) = (self.vocab, self.d_model, self.ctx);
        check_len("token embedding", &format!("[{v}, {d}]"), v * d, self.token.len())?;
        check_len("position embedding", &format!("[{c}, {d}]"), c * d, self.position.len())
    }

    /// An error unless `tokens` fits `shape`, `shape.seq <= ctx` and every id is `< vocab`.
    pub fn check_tokens(&self, tokens: &[u32], shape: BatchShape) -> Result<()> {
        check_len("tokens", &format!("[batch, seq] = [{}, {}]", shape.batch, shape.seq), shape.tokens(), tokens.len())?;
        if shape.seq > self.ctx {
            return Err(RuntimeError::invalid(
                "sequence length",
                format!("seq {} exceeds the context {} of the position table", shape.seq, self.ctx),
            ));
        }
        if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= self.vocab) {
            return Err(RuntimeError::invalid("tokens", format!("token {t} at index {i} is >= vocab {}", self.vocab)));
        }
        Ok(())
    }

    /// Writes `x: [batch * seq, d_model]` (overwritten).
    pub fn forward(&self, tokens: &[u32], shape: BatchShape, x: &mut [f32]) -> Result<()> {
        self.check()?;
        self.check_tokens(tokens, shape)?;
        let d = self.d_model;
        check_len("embedding output", &format!("[{}, {d}]", shape.tokens()), shape.tokens() * d, x.len())?;
        for (r, (&tok, row)) in tokens.iter().zip(x.chunks_exact_mut(d.max(1))).enumerate() {
            let s = r % shape.seq;
            let t = &self.token[tok as usize * d..][..d];
            let p = &self.position[s * d..][..d];
            for j in 0..d {
                row[j] = t[j] + p[j];
            }
        }
        Ok(())
    }

    /// Backward of [`Embedding::forward`]: overwrites `grads` with the scatter-add of `d_x`
    /// (rows added in token order, so the result is deterministic).
    pub fn backward(&self, tokens: &[u32], shape: BatchShape, d_x: &[f32], grads: &mut Embedding) -> Result<()> {
        self.check()?;
        self.check_tokens(tokens, shape)?;
        let d = self.d_model;
        check_len("embedding d_output", &format!("[{}, {d}]", shape.tokens()), shape.tokens() * d, d_x.len())?;
        grads.check()?;
        if (grads.vocab, grads.d_model, grads.ctx) != (self.vocab, d, self.ctx) {
            return Err(RuntimeError::invalid(
                "embedding gradient storage",
                "shape differs from the embedding's; build it with zeros_like".to_string(),
            ));
        }
        grads.token.fill(0.0);
        grads.position.fill(0.0);
        for (r, (&tok, g)) in tokens.iter().zip(d_x.chunks_exact(d.max(1))).enumerate() {
            let s = r % shape.seq;
            for (acc, &v) in grads.token[tok as usize * d..][..d].iter_mut().zip(g) {
                *acc += v;
            }
            for (acc, &v) in grads.position[s * d..][..d].iter_mut().zip(g) {
                *acc += v;
            }
        }
        Ok(())
    }

    /// Appends `prefix.token`, `prefix.position` to a parameter list.
    pub(crate) fn tensors<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a [f32])>) {
        push_named(out, prefix, "token", &self.token);
        push_named(out, prefix, "position", &self.position);
    }

    /// Mutable form of [`Embedding::tensors`].
    pub(crate) fn tensors_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut [f32])>) {
        push_named_mut(out, prefix, "token", &mut self.token);
        push_named_mut(out, prefix, "position", &mut self.position);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::reference::{self as r, assert_close, fd_grad, to64};
    use switchyard_kernels::random::seeded_rng;

    #[test]
    fn forward_and_backward_match_reference() {
        let mut rng = seeded_rng(20);
        let e = Embedding::random(7, 4, 6, 1.0, 1.0, &mut rng);
        let shape = BatchShape { batch: 3, seq: 5 };
        // Repeated ids exercise the scatter-add.
        let tokens: Vec<u32> = (0..15).map(|i| (i * 3 % 7) as u32 % 4).collect();
        let mut x = vec![0.0; 15 * 4];
        e.forward(&tokens, shape, &mut x).unwrap();
        assert_close("x", &x, &r::embedding(&tokens, shape, 4, &to64(&e.token), &to64(&e.position)), 1e-6);

        let w_out = normal_vec(&mut rng, 15 * 4, 1.0);
        let mut grads = e.zeros_like();
        e.backward(&tokens, shape, &w_out, &mut grads).unwrap();
        let loss = |t: &[f32], p: &[f32]| r::dot(&r::embedding(&tokens, shape, 4, &to64(t), &to64(p)), &to64(&w_out));
        assert_close("d_token", &grads.token, &fd_grad(&e.token, |p| loss(p, &e.position)), 1e-4);
        assert_close("d_position", &grads.position, &fd_grad(&e.position, |p| loss(&e.token, p)), 1e-4);
    }

    #[test]
    fn bad_tokens_are_errors() {
        let e = Embedding::random(5, 2, 3, 1.0, 1.0, &mut seeded_rng(21));
        let mut x = vec![0.0; 8];
        let err = e.forward(&[0, 1, 5, 2], BatchShape { batch: 2, seq: 2 }, &mut x).unwrap_err();
        assert!(err.to_string().contains("token 5 at index 2"), "{err}");
        assert!(e.forward(&[0, 1, 2, 3], BatchShape { batch: 1, seq: 4 }, &mut x).is_err()); // seq > ctx
        assert!(e.forward(&[0, 1, 2], BatchShape { batch: 2, seq: 2 }, &mut x).is_err());
        let mut wrong = Embedding::random(4, 2, 3, 1.0, 1.0, &mut seeded_rng(22));
        assert!(e.backward(&[0, 1], BatchShape { batch: 1, seq: 2 }, &[0.0; 4], &mut wrong).is_err());
    }
}
