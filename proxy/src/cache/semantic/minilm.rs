//! The embedding model's forward pass: the BERT encoder of all-MiniLM-L6-v2 (6 layers, 384
//! wide, 12 heads), the same arithmetic as candle-transformers' `BertModel` (which its tests
//! compare it with), arranged for what a lookup brings: one sentence of 10 to 30 tokens.
//! The matrix products are most of the time (two thirds of a sentence's CPU time in a
//! profile); around them:
//! - each layer's query, key and value weights are one matrix, read by one product instead
//!   of three;
//! - GELU is computed in a form the compiler vectorises (candle's calls the C library's
//!   `erff` once per element: about a twentieth of a sentence's CPU time in a profile);
//! - attention (12 heads of a dozen tokens: a few hundred thousand multiplications) is
//!   computed here over plain slices: as candle products it is two calls a layer that each
//!   read `/proc/cpuinfo` (candle asks for the core count at every product) and split into
//!   a dozen tiny products, for less work than the calls cost; padding is skipped, not
//!   masked.

use super::embed::cosine as dot;
use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{Config, HiddenAct};

/// A dense layer: `x · wᵀ + b`, `w` stored as (outputs, inputs) as in the file, multiplied
/// through a transposed view as candle's `Linear` does (a copy transposed to (inputs,
/// outputs) took about a tenth more CPU in its products, in one profile on a busy machine).
#[derive(Debug)]
struct Dense {
    w: Tensor,
    b: Tensor,
}

impl Dense {
    /// The layers `names` under `vb` (each `weight` (outputs, inputs) and `bias`), as one
    /// layer whose outputs are theirs side by side.
    fn load(
        vb: &VarBuilder,
        names: &[&str],
        inputs: usize,
        outputs: usize,
    ) -> candle_core::Result<Self> {
        let (mut ws, mut bs) = (Vec::new(), Vec::new());
        for name in names {
            let vb = vb.pp(*name);
            ws.push(vb.get((outputs, inputs), "weight")?);
            bs.push(vb.get(outputs, "bias")?);
        }
        Ok(Self {
            w: Tensor::cat(&ws, 0)?,
            b: Tensor::cat(&bs, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.w.t()?)?.broadcast_add(&self.b)
    }
}

/// Layer normalisation over the last dimension.
#[derive(Debug)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Norm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// One encoder layer.
#[derive(Debug)]
struct Layer {
    qkv: Dense,
    out: Dense,
    norm1: Norm,
    up: Dense,
    down: Dense,
    norm2: Norm,
}

impl Layer {
    fn load(vb: VarBuilder, c: &Config) -> candle_core::Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let attention = vb.pp("attention");
        Ok(Self {
            qkv: Dense::load(&attention.pp("self"), &["query", "key", "value"], h, h)?,
            out: Dense::load(&attention.pp("output"), &["dense"], h, h)?,
            norm1: Norm::load(attention.pp("output").pp("LayerNorm"), h, c.layer_norm_eps)?,
            up: Dense::load(&vb.pp("intermediate"), &["dense"], h, i)?,
            down: Dense::load(&vb.pp("output"), &["dense"], i, h)?,
            norm2: Norm::load(vb.pp("output").pp("LayerNorm"), h, c.layer_norm_eps)?,
        })
    }
}

/// The encoder, loaded.
#[derive(Debug)]
pub struct Encoder {
    words: Tensor,
    positions: Tensor,
    /// The token type embedding of type 0 (every token's here).
    token_type: Tensor,
    norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
}

impl Encoder {
    /// Loads the weights under `vb` (with or without a `bert.` prefix) for `c`, a BERT with
    /// GELU (erf) activations.
    pub fn load(vb: VarBuilder, c: &Config) -> candle_core::Result<Self> {
        if c.hidden_act != HiddenAct::Gelu {
            candle_core::bail!("activation {:?} where gelu is expected", c.hidden_act);
        }
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            candle_core::bail!(
                "{} heads do not divide hidden size {}",
                c.num_attention_heads,
                c.hidden_size
            );
        }
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let h = c.hidden_size;
        let e = vb.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::load(vb.pp("encoder").pp("layer").pp(i.to_string()), c))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            words: e.get((c.vocab_size, h), "word_embeddings.weight")?,
            positions: e.get((c.max_position_embeddings, h), "position_embeddings.weight")?,
            token_type: e
                .get((c.type_vocab_size, h), "token_type_embeddings.weight")?
                .get(0)?,
            norm: Norm::load(e.pp("LayerNorm"), h, c.layer_norm_eps)?,
            layers,
            heads: c.num_attention_heads,
        })
    }

    /// The last hidden states (n, len, hidden) of the token ids `ids` (n, len); `mask` (n,
    /// len, 1 for a token, 0 for padding) when the batch is padded.
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (n, len) = ids.dims2()?;
        let h = self.token_type.dim(0)?;
        let rows = n * len;
        // Embeddings: the word's, plus its type's, plus its position's; normalised.
        let x = self
            .words
            .index_select(&ids.flatten_all()?, 0)?
            .broadcast_add(&self.token_type)?
            .reshape((n, len, h))?
            .broadcast_add(&self.positions.narrow(0, 0, len)?)?
            .reshape((rows, h))?;
        let mut x = self.norm.forward(&x)?;
        // Each text's real tokens (the rest is padding, at the end).
        let lengths: Vec<usize> = match mask {
            Some(mask) => mask
                .to_dtype(DType::F32)?
                .sum(1)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(|l| l as usize)
                .collect(),
            None => vec![len; n],
        };
        let shape = Attention {
            n,
            len,
            heads: self.heads,
            size: h / self.heads,
        };
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let context = Tensor::from_vec(shape.context(&qkv, &lengths), (rows, h), x.device())?;
            x = layer.norm1.forward(&(layer.out.forward(&context)? + &x)?)?;
            let up = layer.up.forward(&x)?.apply_op1_no_bwd(&Gelu)?;
            x = layer.norm2.forward(&(layer.down.forward(&up)? + &x)?)?;
        }
        x.reshape((n, len, h))
    }
}

/// The attention of a batch: `n` texts of `len` tokens (padded), `heads` heads of `size`.
struct Attention {
    n: usize,
    len: usize,
    heads: usize,
    size: usize,
}

impl Attention {
    /// The context vectors (rows, heads * size) of the rows of queries, keys and values
    /// `qkv` (rows, [q k v] * heads * size), each text attending to its first `lengths`
    /// tokens: softmax(q · k / sqrt(size)) · v, as BERT's self-attention.
    fn context(&self, qkv: &[f32], lengths: &[usize]) -> Vec<f32> {
        let Attention {
            n,
            len,
            heads,
            size,
        } = *self;
        let h = heads * size;
        let scale = 1.0 / (size as f64).sqrt();
        let scale = scale as f32;
        let mut out = vec![0f32; n * len * h];
        let mut scores = vec![0f32; len];
        for (t, &real) in lengths.iter().enumerate().take(n) {
            let row = |i: usize| &qkv[(t * len + i) * 3 * h..(t * len + i + 1) * 3 * h];
            for head in 0..heads {
                let part = |i: usize, which: usize| {
                    &row(i)[which * h + head * size..which * h + (head + 1) * size]
                };
                for i in 0..len {
                    let q = part(i, 0);
                    for (j, score) in scores.iter_mut().enumerate().take(real) {
                        let k = part(j, 1);
                        // A dot product summed in lanes (vectorised).
                        *score = dot(q, k) * scale;
                    }
                    let scores = &mut scores[..real];
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let at = (t * len + i) * h + head * size;
                    let context = &mut out[at..at + size];
                    for (j, s) in scores.iter().enumerate() {
                        let p = s / sum;
                        for (c, v) in context.iter_mut().zip(part(j, 2)) {
                            *c += p * v;
                        }
                    }
                }
            }
        }
        out
    }
}

/// GELU with the error function, elementwise.
struct Gelu;

impl candle_core::CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf-vectorised"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(all), Some((from, to))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("gelu: a contiguous f32 tensor is expected");
        };
        let out = all[from..to].iter().map(|&x| gelu(x)).collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `x * (1 + erf(x / sqrt 2)) / 2`, erf by Abramowitz and Stegun 7.1.26 (absolute error
/// under 1.5e-7, below the precision of the activations it is applied to): no branch and no
/// library call, so a loop over a slice is vectorised.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152,
        1.061_405_4,
    ];
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let erf = (1.0 - poly * exp(-a * a)).copysign(z);
    0.5 * x * (1.0 + erf)
}

/// `e^x` for x in [-87, 0] (clamped below; used for `e^(-z²)` alone): Cephes' `expf`
/// (relative error about 1e-7), its rounding done by adding and taking away 1.5 * 2^23 so
/// that it vectorises without SSE4.1.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    f32::from_bits(((n as i32 + 127) as u32) << 23) * e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_is_the_error_functions_to_float_precision() {
        let mut worst = 0f32;
        for i in -20_000..=20_000 {
            let x = i as f32 / 2_000.0;
            let exact =
                0.5 * f64::from(x) * (1.0 + erf_reference(f64::from(x) / std::f64::consts::SQRT_2));
            worst = worst.max((f64::from(gelu(x)) - exact).abs() as f32 / x.abs().max(1.0));
        }
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(gelu(-200.0), 0.0);
        assert_eq!(gelu(200.0), 200.0);
    }

    #[test]
    fn exp_holds_its_range() {
        for i in 0..=8_700 {
            let x = -(i as f32) / 100.0;
            let exact = f64::from(x).exp();
            let rel = ((f64::from(exp(x)) - exact) / exact).abs();
            assert!(rel < 3e-7, "{x}: {rel}");
        }
    }

    /// erf in f64 by its series and continued fraction (a reference independent of the
    /// approximation tested).
    fn erf_reference(x: f64) -> f64 {
        let a = x.abs();
        let v = if a < 3.0 {
            // Maclaurin series: converges fast below 3.
            let (mut term, mut sum, mut k) = (a, a, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                k += 1.0;
                term *= -a * a / k;
                sum += term / (2.0 * k + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // 1 - erfc, erfc by Lentz's continued fraction.
            let mut f = a;
            for k in (1..60).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
        };
        v.copysign(x)
    }
}
