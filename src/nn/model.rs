//! The transformer: token embedding tied with the output, pre-norm blocks with QK-normed RoPE
//! attention and a configurable feedforward, final RMSNorm. Explicit forward and backward
//! passes; activations are kept in buffers reused across steps.

use super::backend::Backend;
use super::config::ModelConfig;
use super::cpu::{AttnShape, CpuBackend};
use super::ffn::{ensure, FfnLayer, GateStats, RoutingOverride};
use super::rng::Rng;
use super::tensor::{Init, ParamId, ParamTable};

struct Block {
    ln1: ParamId,
    wq: ParamId,
    wk: ParamId,
    wv: ParamId,
    wo: ParamId,
    q_norm: ParamId,
    k_norm: ParamId,
    ln2: ParamId,
    ffn: FfnLayer,
    h1: Vec<f32>,
    rstd1: Vec<f32>,
    q_raw: Vec<f32>,
    k_raw: Vec<f32>,
    v: Vec<f32>,
    rstd_q: Vec<f32>,
    rstd_k: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    x_mid: Vec<f32>,
    h2: Vec<f32>,
    rstd2: Vec<f32>,
}

/// Scratch shared by all blocks.
#[derive(Default)]
struct Scratch {
    resid: Vec<Vec<f32>>,
    hf: Vec<f32>,
    rstdf: Vec<f32>,
    logits: Vec<f32>,
    ffn_out: Vec<f32>,
    dx: Vec<f32>,
    dh: Vec<f32>,
    d_o: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dq_raw: Vec<f32>,
    dk_raw: Vec<f32>,
}

pub struct Model {
    pub cfg: ModelConfig,
    pub table: ParamTable,
    pub params: Vec<f32>,
    pub grads: Vec<f32>,
    backend: Box<dyn Backend>,
    embed: ParamId,
    final_norm: ParamId,
    blocks: Vec<Block>,
    s: Scratch,
    rope_cos: Vec<f32>,
    rope_sin: Vec<f32>,
    /// Accumulate per-layer gate statistics during forward passes.
    pub collect_gate_stats: bool,
}

/// Loss of one batch: mean token cross-entropy over the counted (unmasked) targets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchLoss {
    pub loss: f64,
    pub tokens: usize,
}

/// `n` zeros, or an error (not an abort) when the memory cannot be had.
pub(crate) fn zeros(n: usize) -> Result<Vec<f32>, String> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        format!(
            "cannot allocate {} for {n} parameters",
            super::memory::gib(n as f64 * 4.0)
        )
    })?;
    v.resize(n, 0.0);
    Ok(v)
}

impl Model {
    /// Builds the model on the CPU backend and initialises it from `seed`.
    pub fn new(cfg: &ModelConfig, seed: u64) -> Result<Model, String> {
        Model::with_backend(cfg, Box::new(CpuBackend), &mut Rng::new(seed))
    }

    pub fn with_backend(
        cfg: &ModelConfig,
        backend: Box<dyn Backend>,
        rng: &mut Rng,
    ) -> Result<Model, String> {
        cfg.validate()?;
        // Sizes too large to address are refused here, so that no tensor's element count
        // overflows below and the flat buffers are allocated fallibly.
        let count = super::memory::param_count(cfg);
        let rope = cfg.seq_len as f64 * cfg.head_dim() as f64;
        if count * 16.0 >= isize::MAX as f64 || rope * 8.0 >= isize::MAX as f64 {
            return Err(format!(
                "model config: {count:.3e} parameters at seq_len {} are more than a machine can address",
                cfg.seq_len
            ));
        }
        let d = cfg.d_model;
        let hd = cfg.head_dim();
        let mut t = ParamTable::default();
        // flax nn.Embed default: normal with std 1/sqrt(d_model).
        let embed = t.add(
            "embed",
            &[cfg.vocab, d],
            Init::Normal(1.0 / (d as f64).sqrt()),
            true,
        );
        let lecun = Init::TruncatedNormal(1.0 / (d as f64).sqrt());
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let pre = format!("blocks.{l}");
            let ln1 = t.add(format!("{pre}.attn_norm.scale"), &[d], Init::Ones, false);
            let wq = t.add(format!("{pre}.attn.wq"), &[d, d], lecun.clone(), true);
            let wk = t.add(format!("{pre}.attn.wk"), &[d, d], lecun.clone(), true);
            let wv = t.add(format!("{pre}.attn.wv"), &[d, d], lecun.clone(), true);
            let wo = t.add(format!("{pre}.attn.wo"), &[d, d], lecun.clone(), true);
            let q_norm = t.add(format!("{pre}.attn.q_norm.scale"), &[hd], Init::Ones, false);
            let k_norm = t.add(format!("{pre}.attn.k_norm.scale"), &[hd], Init::Ones, false);
            let ln2 = t.add(format!("{pre}.ffn_norm.scale"), &[d], Init::Ones, false);
            let ffn = FfnLayer::new(&mut t, &format!("{pre}.ffn"), cfg);
            blocks.push(Block {
                ln1,
                wq,
                wk,
                wv,
                wo,
                q_norm,
                k_norm,
                ln2,
                ffn,
                h1: vec![],
                rstd1: vec![],
                q_raw: vec![],
                k_raw: vec![],
                v: vec![],
                rstd_q: vec![],
                rstd_k: vec![],
                q: vec![],
                k: vec![],
                att: vec![],
                o: vec![],
                x_mid: vec![],
                h2: vec![],
                rstd2: vec![],
            });
        }
        let final_norm = t.add("final_norm.scale", &[d], Init::Ones, false);
        let mut params = zeros(t.total)?;
        t.initialise(&mut params, rng);
        let grads = zeros(t.total)?;
        let (rope_cos, rope_sin) = super::cpu::rope::rope_tables(cfg.seq_len, hd);
        Ok(Model {
            cfg: cfg.clone(),
            table: t,
            params,
            grads,
            backend,
            embed,
            final_norm,
            blocks,
            s: Scratch::default(),
            rope_cos,
            rope_sin,
            collect_gate_stats: false,
        })
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// Bytes held by parameters, gradients and the activation and scratch buffers of the last
    /// batch (optimiser moments excluded).
    pub fn allocated_bytes(&self) -> usize {
        let mut floats = self.params.len() + self.grads.len();
        for b in &self.blocks {
            for v in [
                &b.h1, &b.rstd1, &b.q_raw, &b.k_raw, &b.v, &b.rstd_q, &b.rstd_k, &b.q, &b.k,
                &b.att, &b.o, &b.x_mid, &b.h2, &b.rstd2,
            ] {
                floats += v.capacity();
            }
        }
        let s = &self.s;
        floats += s.resid.iter().map(|r| r.capacity()).sum::<usize>();
        for v in [
            &s.hf, &s.rstdf, &s.logits, &s.ffn_out, &s.dx, &s.dh, &s.d_o, &s.dq, &s.dk, &s.dv,
            &s.dq_raw, &s.dk_raw,
        ] {
            floats += v.capacity();
        }
        floats * 4
            + self
                .blocks
                .iter()
                .map(|b| b.ffn.scratch_bytes())
                .sum::<usize>()
    }

    /// Per-layer gate statistics (None for dense kinds).
    pub fn gate_stats(&self) -> Vec<Option<&GateStats>> {
        self.blocks.iter().map(|b| b.ffn.gate_stats()).collect()
    }

    pub fn reset_gate_stats(&mut self) {
        self.blocks
            .iter_mut()
            .for_each(|b| b.ffn.reset_gate_stats());
    }

    /// Router outputs (scores, indices), each [tokens, C, k], of layer `layer` from the last
    /// forward pass, for product-key kinds.
    pub fn last_routing(&self, layer: usize) -> Option<(&[f32], &[u32])> {
        self.blocks.get(layer).and_then(|b| b.ffn.last_routing())
    }

    /// Replaces the router outputs (scores and indices of all channels, each [C * k]) of the
    /// given token positions in `layer` on the following forward passes (gating patching,
    /// SPEC §7); an empty list clears it. Errors for dense kinds or wrong sizes.
    pub fn set_routing_override(
        &mut self,
        layer: usize,
        overrides: Vec<RoutingOverride>,
    ) -> Result<(), String> {
        let slots = self.cfg.channels * self.cfg.topk;
        for o in &overrides {
            if o.scores.len() != slots || o.indices.len() != slots {
                return Err(format!(
                    "routing override needs {slots} scores and indices (channels x topk)"
                ));
            }
            if let Some(&bad) = o.indices.iter().find(|&&i| i as usize >= self.cfg.experts) {
                return Err(format!(
                    "routing override index {bad} is outside the {} experts",
                    self.cfg.experts
                ));
            }
        }
        let n = self.blocks.len();
        let b = self
            .blocks
            .get_mut(layer)
            .ok_or_else(|| format!("layer {layer} does not exist ({n} layers)"))?;
        b.ffn.set_routing_override(overrides)
    }

    /// The dense MLP's hidden activations [tokens, d_ffw] of layer `layer` from the last
    /// forward pass (`mlp` kind only).
    pub fn last_activation(&self, layer: usize) -> Option<&[f32]> {
        self.blocks.get(layer).and_then(|b| b.ffn.last_activation())
    }

    /// Replaces the MLP hidden activations of the given positions in `layer` on the following
    /// forward passes (activation patching, the dense analogue of gating patching).
    pub fn set_activation_override(
        &mut self,
        layer: usize,
        overrides: Vec<crate::nn::ffn::ActivationOverride>,
    ) -> Result<(), String> {
        let n = self.blocks.len();
        self.blocks
            .get_mut(layer)
            .ok_or_else(|| format!("layer {layer} does not exist ({n} layers)"))?
            .ffn
            .set_activation_override(overrides)
    }

    /// Logits [batch * seq, vocab] of the last forward pass (before they are turned into
    /// gradients; valid after `forward_logits`).
    pub fn logits(&self) -> &[f32] {
        &self.s.logits
    }

    fn check_batch(&self, inputs: &[u32], targets: Option<&[u32]>) -> Result<usize, String> {
        let t = self.cfg.seq_len;
        if inputs.is_empty() || !inputs.len().is_multiple_of(t) {
            return Err(format!(
                "batch of {} tokens is not a positive multiple of seq_len {t}",
                inputs.len()
            ));
        }
        if let Some(tg) = targets {
            if tg.len() != inputs.len() {
                return Err(format!("{} targets for {} inputs", tg.len(), inputs.len()));
            }
            if let Some(&bad) = tg.iter().find(|&&x| x as usize >= self.cfg.vocab) {
                return Err(format!(
                    "target id {bad} is outside the vocabulary of {}",
                    self.cfg.vocab
                ));
            }
        }
        if let Some(&bad) = inputs.iter().find(|&&x| x as usize >= self.cfg.vocab) {
            return Err(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab
            ));
        }
        Ok(inputs.len() / t)
    }

    /// Forward pass to logits (kept in `logits()`).
    pub fn forward_logits(&mut self, inputs: &[u32]) -> Result<(), String> {
        let batch = self.check_batch(inputs, None)?;
        self.forward(inputs, batch);
        Ok(())
    }

    /// Mean cross-entropy loss, forward only.
    pub fn loss(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        pad: Option<u32>,
    ) -> Result<BatchLoss, String> {
        let batch = self.check_batch(inputs, Some(targets))?;
        self.forward(inputs, batch);
        let (sum, count) =
            self.backend
                .softmax_xent(&mut self.s.logits, targets, self.cfg.vocab, pad, false);
        Ok(BatchLoss {
            loss: if count > 0 { sum / count as f64 } else { 0.0 },
            tokens: count,
        })
    }

    /// Forward and backward; gradients of the mean loss are written (not accumulated) to
    /// `self.grads`.
    pub fn forward_backward(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        pad: Option<u32>,
    ) -> Result<BatchLoss, String> {
        let batch = self.check_batch(inputs, Some(targets))?;
        self.forward(inputs, batch);
        let (sum, count) =
            self.backend
                .softmax_xent(&mut self.s.logits, targets, self.cfg.vocab, pad, true);
        self.backward(inputs, batch);
        Ok(BatchLoss {
            loss: if count > 0 { sum / count as f64 } else { 0.0 },
            tokens: count,
        })
    }

    fn forward(&mut self, inputs: &[u32], batch: usize) {
        let cfg = &self.cfg;
        let (d, tn, v) = (cfg.d_model, cfg.seq_len, cfg.vocab);
        let (hn, hd) = (cfg.n_heads(), cfg.head_dim());
        let n = batch * tn;
        let be = &*self.backend;
        let p = &self.params;
        let s = &mut self.s;
        s.resid.resize_with(cfg.n_layers + 1, Vec::new);
        for r in s.resid.iter_mut() {
            ensure(r, n * d);
        }
        ensure(&mut s.ffn_out, n * d);
        let emb = self.embed.of(p);
        for (t, &tok) in inputs.iter().enumerate() {
            let tok = tok as usize;
            s.resid[0][t * d..(t + 1) * d].copy_from_slice(&emb[tok * d..(tok + 1) * d]);
        }
        let shape = AttnShape {
            batch,
            seq: tn,
            heads: hn,
            head_dim: hd,
        };
        for (l, b) in self.blocks.iter_mut().enumerate() {
            for buf in [
                &mut b.h1,
                &mut b.q_raw,
                &mut b.k_raw,
                &mut b.v,
                &mut b.q,
                &mut b.k,
                &mut b.o,
                &mut b.x_mid,
                &mut b.h2,
            ] {
                ensure(buf, n * d);
            }
            ensure(&mut b.rstd1, n);
            ensure(&mut b.rstd2, n);
            ensure(&mut b.rstd_q, n * hn);
            ensure(&mut b.rstd_k, n * hn);
            ensure(&mut b.att, batch * hn * tn * tn);
            let (lo, hi) = s.resid.split_at_mut(l + 1);
            let (x_in, x_out) = (&lo[l], &mut hi[0]);
            be.rmsnorm_forward(x_in, b.ln1.of(p), d, &mut b.h1, &mut b.rstd1);
            be.matmul(
                n,
                d,
                d,
                &b.h1,
                false,
                b.wq.of(p),
                false,
                &mut b.q_raw,
                false,
            );
            be.matmul(
                n,
                d,
                d,
                &b.h1,
                false,
                b.wk.of(p),
                false,
                &mut b.k_raw,
                false,
            );
            be.matmul(n, d, d, &b.h1, false, b.wv.of(p), false, &mut b.v, false);
            be.rmsnorm_forward(&b.q_raw, b.q_norm.of(p), hd, &mut b.q, &mut b.rstd_q);
            be.rmsnorm_forward(&b.k_raw, b.k_norm.of(p), hd, &mut b.k, &mut b.rstd_k);
            be.rope(&mut b.q, &self.rope_cos, &self.rope_sin, tn, hn, hd, false);
            be.rope(&mut b.k, &self.rope_cos, &self.rope_sin, tn, hn, hd, false);
            be.attention_forward(&shape, &b.q, &b.k, &b.v, &mut b.o, &mut b.att);
            b.x_mid.copy_from_slice(x_in);
            be.matmul(n, d, d, &b.o, false, b.wo.of(p), false, &mut b.x_mid, true);
            be.rmsnorm_forward(&b.x_mid, b.ln2.of(p), d, &mut b.h2, &mut b.rstd2);
            b.ffn
                .forward(be, p, &b.h2, n, &mut s.ffn_out, self.collect_gate_stats);
            x_out.copy_from_slice(&b.x_mid);
            be.add_assign(x_out, &s.ffn_out);
        }
        ensure(&mut s.hf, n * d);
        ensure(&mut s.rstdf, n);
        ensure(&mut s.logits, n * v);
        be.rmsnorm_forward(
            &s.resid[cfg.n_layers],
            self.final_norm.of(p),
            d,
            &mut s.hf,
            &mut s.rstdf,
        );
        be.matmul(n, v, d, &s.hf, false, emb, true, &mut s.logits, false);
    }

    /// Expects `s.logits` to hold d(loss)/d(logits).
    fn backward(&mut self, inputs: &[u32], batch: usize) {
        let cfg = &self.cfg;
        let (d, tn, v) = (cfg.d_model, cfg.seq_len, cfg.vocab);
        let (hn, hd) = (cfg.n_heads(), cfg.head_dim());
        let n = batch * tn;
        let be = &*self.backend;
        let p = &self.params;
        let g = &mut self.grads;
        g.fill(0.0);
        let s = &mut self.s;
        for buf in [
            &mut s.dx,
            &mut s.dh,
            &mut s.d_o,
            &mut s.dq,
            &mut s.dk,
            &mut s.dv,
            &mut s.dq_raw,
            &mut s.dk_raw,
        ] {
            ensure(buf, n * d);
        }
        // Unembedding: logits = hf · E^T.
        be.matmul(
            n,
            d,
            v,
            &s.logits,
            false,
            self.embed.of(p),
            false,
            &mut s.dh,
            false,
        );
        be.matmul(
            v,
            d,
            n,
            &s.logits,
            true,
            &s.hf,
            false,
            self.embed.of_mut(g),
            true,
        );
        s.dx.fill(0.0);
        be.rmsnorm_backward(
            &s.resid[cfg.n_layers],
            self.final_norm.of(p),
            &s.rstdf,
            &s.dh,
            d,
            &mut s.dx,
            self.final_norm.of_mut(g),
        );
        let shape = AttnShape {
            batch,
            seq: tn,
            heads: hn,
            head_dim: hd,
        };
        for (l, b) in self.blocks.iter_mut().enumerate().rev() {
            let x_in = &s.resid[l];
            // x_out = x_mid + ffn(rmsnorm(x_mid))
            b.ffn.backward(be, p, g, &b.h2, &s.dx, n, &mut s.dh);
            be.rmsnorm_backward(
                &b.x_mid,
                b.ln2.of(p),
                &b.rstd2,
                &s.dh,
                d,
                &mut s.dx,
                b.ln2.of_mut(g),
            );
            // x_mid = x_in + attn(rmsnorm(x_in)) · Wo
            be.matmul(n, d, d, &s.dx, false, b.wo.of(p), true, &mut s.d_o, false);
            be.matmul(d, d, n, &b.o, true, &s.dx, false, b.wo.of_mut(g), true);
            be.attention_backward(
                &shape, &b.q, &b.k, &b.v, &b.att, &s.d_o, &mut s.dq, &mut s.dk, &mut s.dv,
            );
            be.rope(&mut s.dq, &self.rope_cos, &self.rope_sin, tn, hn, hd, true);
            be.rope(&mut s.dk, &self.rope_cos, &self.rope_sin, tn, hn, hd, true);
            s.dq_raw.fill(0.0);
            s.dk_raw.fill(0.0);
            be.rmsnorm_backward(
                &b.q_raw,
                b.q_norm.of(p),
                &b.rstd_q,
                &s.dq,
                hd,
                &mut s.dq_raw,
                b.q_norm.of_mut(g),
            );
            be.rmsnorm_backward(
                &b.k_raw,
                b.k_norm.of(p),
                &b.rstd_k,
                &s.dk,
                hd,
                &mut s.dk_raw,
                b.k_norm.of_mut(g),
            );
            be.matmul(d, d, n, &b.h1, true, &s.dq_raw, false, b.wq.of_mut(g), true);
            be.matmul(d, d, n, &b.h1, true, &s.dk_raw, false, b.wk.of_mut(g), true);
            be.matmul(d, d, n, &b.h1, true, &s.dv, false, b.wv.of_mut(g), true);
            be.matmul(
                n,
                d,
                d,
                &s.dq_raw,
                false,
                b.wq.of(p),
                true,
                &mut s.dh,
                false,
            );
            be.matmul(n, d, d, &s.dk_raw, false, b.wk.of(p), true, &mut s.dh, true);
            be.matmul(n, d, d, &s.dv, false, b.wv.of(p), true, &mut s.dh, true);
            be.rmsnorm_backward(
                x_in,
                b.ln1.of(p),
                &b.rstd1,
                &s.dh,
                d,
                &mut s.dx,
                b.ln1.of_mut(g),
            );
        }
        // Embedding lookup: scatter rows in token order (deterministic).
        let ge = self.embed.of_mut(g);
        for (t, &tok) in inputs.iter().enumerate() {
            let tok = tok as usize;
            for i in 0..d {
                ge[tok * d + i] += s.dx[t * d + i];
            }
        }
    }
}

impl Model {
    /// Applies one AdamW update from the current gradients.
    pub fn optimizer_step(&mut self, opt: &mut super::optim::AdamW, lr: f32, grad_scale: f32) {
        opt.update(
            &*self.backend,
            &self.table,
            &mut self.params,
            &self.grads,
            lr,
            grad_scale,
        );
    }
}
