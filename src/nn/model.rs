//! The transformer: token embedding tied with the output, pre-norm blocks with QK-normed RoPE
//! attention and a configurable feedforward, final RMSNorm. Explicit forward and backward
//! passes; activations are kept in buffers reused across steps.

use super::backend::{AttnShape, Backend, Buf, Storage};
use super::config::ModelConfig;
use super::cpu::CpuBackend;
use super::ffn::{FfnLayer, GateStats, Routing, RoutingOverride};
use super::rng::Rng;
use super::tensor::{Init, ParamId, ParamTable};
use std::borrow::Cow;
use std::sync::Arc;

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
    a: BlockActs,
}

/// A block's activations saved for the backward pass.
struct BlockActs {
    h1: Buf<f32>,
    rstd1: Buf<f32>,
    q_raw: Buf<f32>,
    k_raw: Buf<f32>,
    v: Buf<f32>,
    rstd_q: Buf<f32>,
    rstd_k: Buf<f32>,
    q: Buf<f32>,
    k: Buf<f32>,
    /// What the backend's attention saves (probabilities or log-sum-exps).
    att: Buf<f32>,
    o: Buf<f32>,
    x_mid: Buf<f32>,
    h2: Buf<f32>,
    rstd2: Buf<f32>,
}

impl BlockActs {
    fn new(be: &Arc<dyn Backend>) -> Result<BlockActs, String> {
        let e = || Buf::zeros(be, 0);
        Ok(BlockActs {
            h1: e()?,
            rstd1: e()?,
            q_raw: e()?,
            k_raw: e()?,
            v: e()?,
            rstd_q: e()?,
            rstd_k: e()?,
            q: e()?,
            k: e()?,
            att: e()?,
            o: e()?,
            x_mid: e()?,
            h2: e()?,
            rstd2: e()?,
        })
    }

    fn all(&self) -> [&Buf<f32>; 14] {
        [
            &self.h1,
            &self.rstd1,
            &self.q_raw,
            &self.k_raw,
            &self.v,
            &self.rstd_q,
            &self.rstd_k,
            &self.q,
            &self.k,
            &self.att,
            &self.o,
            &self.x_mid,
            &self.h2,
            &self.rstd2,
        ]
    }
}

/// Scratch shared by all blocks.
struct Scratch {
    tokens: Buf<u32>,
    targets: Buf<u32>,
    resid: Vec<Buf<f32>>,
    hf: Buf<f32>,
    rstdf: Buf<f32>,
    logits: Buf<f32>,
    ffn_out: Buf<f32>,
    dx: Buf<f32>,
    dh: Buf<f32>,
    d_o: Buf<f32>,
    dq: Buf<f32>,
    dk: Buf<f32>,
    dv: Buf<f32>,
    dq_raw: Buf<f32>,
    dk_raw: Buf<f32>,
}

impl Scratch {
    fn new(be: &Arc<dyn Backend>) -> Result<Scratch, String> {
        let e = || Buf::zeros(be, 0);
        Ok(Scratch {
            tokens: Buf::zeros(be, 0)?,
            targets: Buf::zeros(be, 0)?,
            resid: vec![],
            hf: e()?,
            rstdf: e()?,
            logits: e()?,
            ffn_out: e()?,
            dx: e()?,
            dh: e()?,
            d_o: e()?,
            dq: e()?,
            dk: e()?,
            dv: e()?,
            dq_raw: e()?,
            dk_raw: e()?,
        })
    }

    fn bytes(&self) -> usize {
        self.tokens.bytes()
            + self.targets.bytes()
            + self.resid.iter().map(Buf::bytes).sum::<usize>()
            + [
                &self.hf,
                &self.rstdf,
                &self.logits,
                &self.ffn_out,
                &self.dx,
                &self.dh,
                &self.d_o,
                &self.dq,
                &self.dk,
                &self.dv,
                &self.dq_raw,
                &self.dk_raw,
            ]
            .iter()
            .map(|b| b.bytes())
            .sum::<usize>()
    }
}

pub struct Model {
    pub cfg: ModelConfig,
    pub table: ParamTable,
    /// All parameters, one flat buffer laid out by `table`, in the backend's memory.
    pub params: Buf<f32>,
    /// Gradients of the last `forward_backward`, laid out like `params`.
    pub grads: Buf<f32>,
    backend: Arc<dyn Backend>,
    embed: ParamId,
    final_norm: ParamId,
    blocks: Vec<Block>,
    s: Scratch,
    rope_cos: Buf<f32>,
    rope_sin: Buf<f32>,
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

/// A buffer's contents: borrowed from host memory, copied from a device.
pub(crate) fn host_or_copy<T: super::backend::Elem>(b: &Buf<T>) -> Cow<'_, [T]> {
    match b.host() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(b.to_vec()),
    }
}

impl Model {
    /// Builds the model on the CPU backend and initialises it from `seed`.
    pub fn new(cfg: &ModelConfig, seed: u64) -> Result<Model, String> {
        Model::with_backend(cfg, Arc::new(CpuBackend::default()), &mut Rng::new(seed))
    }

    pub fn with_backend(
        cfg: &ModelConfig,
        backend: Arc<dyn Backend>,
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
        let be = &backend;
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
            let ffn = FfnLayer::new(&mut t, &format!("{pre}.ffn"), cfg, be);
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
                a: BlockActs::new(be)?,
            });
        }
        let final_norm = t.add("final_norm.scale", &[d], Init::Ones, false);
        let mut host = super::model::zeros(t.total)?;
        t.initialise(&mut host, rng);
        let params = Buf::from_host(be, &host)?;
        drop(host);
        let grads = Buf::zeros(be, t.total)?;
        let (cos, sin) = super::cpu::rope::rope_tables::<f32>(cfg.seq_len, hd);
        Ok(Model {
            cfg: cfg.clone(),
            table: t,
            params,
            grads,
            embed,
            final_norm,
            blocks,
            s: Scratch::new(be)?,
            rope_cos: Buf::from_host(be, &cos)?,
            rope_sin: Buf::from_host(be, &sin)?,
            backend,
            collect_gate_stats: false,
        })
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// How the expert kernels read the pools (sgatlin, sgatlin-gelu, PEER); bf16 is refused
    /// for kinds without product-key experts.
    pub fn set_expert_storage(&mut self, storage: Storage) -> Result<(), String> {
        for b in &mut self.blocks {
            match b.ffn.slots_mut() {
                Some(s) => s.storage = storage,
                None if storage == Storage::Bf16 => return Err(
                    "bf16 expert storage: only sgatlin, sgatlin-gelu and peer have expert pools"
                        .into(),
                ),
                None => {}
            }
        }
        Ok(())
    }

    /// The parameters (borrowed on the CPU, copied from a device).
    pub fn param_values(&self) -> Cow<'_, [f32]> {
        host_or_copy(&self.params)
    }

    /// The gradients of the last `forward_backward` (borrowed on the CPU, copied from a device).
    pub fn grad_values(&self) -> Cow<'_, [f32]> {
        host_or_copy(&self.grads)
    }

    /// Replaces every parameter (a checkpoint's weights).
    pub fn set_params(&mut self, values: &[f32]) -> Result<(), String> {
        if values.len() != self.params.len() {
            return Err(format!(
                "{} parameter values for a model of {}",
                values.len(),
                self.params.len()
            ));
        }
        self.params.upload(values);
        Ok(())
    }

    /// Bytes held by parameters, gradients and the activation and scratch buffers of the last
    /// batch (optimiser moments excluded).
    pub fn allocated_bytes(&self) -> usize {
        let mut bytes = self.params.bytes() + self.grads.bytes() + self.s.bytes();
        for b in &self.blocks {
            bytes += b.a.all().iter().map(|x| x.bytes()).sum::<usize>();
            bytes += b.ffn.scratch_bytes();
        }
        bytes
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
    pub fn last_routing(&self, layer: usize) -> Option<Routing<'_>> {
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
    pub fn last_activation(&self, layer: usize) -> Option<Cow<'_, [f32]>> {
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
    pub fn logits(&self) -> Cow<'_, [f32]> {
        host_or_copy(&self.s.logits)
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
        self.forward(inputs, batch)?;
        self.backend_error()
    }

    /// The backend's first failure since the last check, as an error naming the device.
    fn backend_error(&self) -> Result<(), String> {
        match self.backend.take_error() {
            Some(e) => Err(format!("{}: {e}", self.backend.name())),
            None => Ok(()),
        }
    }

    /// Mean cross-entropy loss, forward only.
    pub fn loss(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        pad: Option<u32>,
    ) -> Result<BatchLoss, String> {
        let batch = self.check_batch(inputs, Some(targets))?;
        self.forward(inputs, batch)?;
        let loss = self.xent(targets, pad, false)?;
        self.backend_error()?;
        Ok(loss)
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
        self.forward(inputs, batch)?;
        let loss = self.xent(targets, pad, true)?;
        self.backward(inputs, batch)?;
        self.backend_error()?;
        Ok(loss)
    }

    /// The loss of the logits; with `want_grad` they become d(mean loss)/d(logits).
    fn xent(
        &mut self,
        targets: &[u32],
        pad: Option<u32>,
        want_grad: bool,
    ) -> Result<BatchLoss, String> {
        let counted = targets.iter().filter(|&&t| Some(t) != pad).count();
        let s = &mut self.s;
        s.targets.ensure(targets.len())?;
        s.targets.upload(targets);
        let sum = self.backend.softmax_xent(
            s.logits.view_mut(),
            s.targets.view(),
            self.cfg.vocab,
            pad,
            counted,
            want_grad,
        );
        Ok(BatchLoss {
            loss: if counted > 0 {
                sum / counted as f64
            } else {
                0.0
            },
            tokens: counted,
        })
    }

    fn forward(&mut self, inputs: &[u32], batch: usize) -> Result<(), String> {
        let cfg = &self.cfg;
        let (d, tn, v) = (cfg.d_model, cfg.seq_len, cfg.vocab);
        let (hn, hd) = (cfg.n_heads(), cfg.head_dim());
        let n = batch * tn;
        let be = &self.backend;
        let p = &self.params;
        let s = &mut self.s;
        while s.resid.len() < cfg.n_layers + 1 {
            s.resid.push(Buf::zeros(be, 0)?);
        }
        for r in s.resid.iter_mut() {
            r.ensure(n * d)?;
        }
        s.ffn_out.ensure(n * d)?;
        s.tokens.ensure(n)?;
        s.tokens.upload(inputs);
        be.embedding_forward(
            self.embed.view(p),
            s.tokens.view(),
            d,
            s.resid[0].view_mut(),
        );
        let shape = AttnShape {
            batch,
            seq: tn,
            heads: hn,
            head_dim: hd,
        };
        let (cos, sin) = (self.rope_cos.view(), self.rope_sin.view());
        for (l, b) in self.blocks.iter_mut().enumerate() {
            let a = &mut b.a;
            for buf in [
                &mut a.h1,
                &mut a.q_raw,
                &mut a.k_raw,
                &mut a.v,
                &mut a.q,
                &mut a.k,
                &mut a.o,
                &mut a.x_mid,
                &mut a.h2,
            ] {
                buf.ensure(n * d)?;
            }
            a.rstd1.ensure(n)?;
            a.rstd2.ensure(n)?;
            a.rstd_q.ensure(n * hn)?;
            a.rstd_k.ensure(n * hn)?;
            a.att.ensure(be.attention_saved_len(&shape))?;
            let (lo, hi) = s.resid.split_at_mut(l + 1);
            let (x_in, x_out) = (&lo[l], &mut hi[0]);
            be.rmsnorm_forward(
                x_in.view(),
                b.ln1.view(p),
                d,
                a.h1.view_mut(),
                a.rstd1.view_mut(),
            );
            let h1 = a.h1.view();
            be.matmul(
                n,
                d,
                d,
                h1,
                false,
                b.wq.view(p),
                false,
                a.q_raw.view_mut(),
                false,
            );
            be.matmul(
                n,
                d,
                d,
                h1,
                false,
                b.wk.view(p),
                false,
                a.k_raw.view_mut(),
                false,
            );
            be.matmul(
                n,
                d,
                d,
                h1,
                false,
                b.wv.view(p),
                false,
                a.v.view_mut(),
                false,
            );
            be.rmsnorm_forward(
                a.q_raw.view(),
                b.q_norm.view(p),
                hd,
                a.q.view_mut(),
                a.rstd_q.view_mut(),
            );
            be.rmsnorm_forward(
                a.k_raw.view(),
                b.k_norm.view(p),
                hd,
                a.k.view_mut(),
                a.rstd_k.view_mut(),
            );
            be.rope(a.q.view_mut(), cos, sin, tn, hn, hd, false);
            be.rope(a.k.view_mut(), cos, sin, tn, hn, hd, false);
            be.attention_forward(
                &shape,
                a.q.view(),
                a.k.view(),
                a.v.view(),
                a.o.view_mut(),
                a.att.view_mut(),
            );
            a.x_mid.copy_from(x_in.view());
            be.matmul(
                n,
                d,
                d,
                a.o.view(),
                false,
                b.wo.view(p),
                false,
                a.x_mid.view_mut(),
                true,
            );
            be.rmsnorm_forward(
                a.x_mid.view(),
                b.ln2.view(p),
                d,
                a.h2.view_mut(),
                a.rstd2.view_mut(),
            );
            b.ffn.forward(
                be,
                p,
                a.h2.view(),
                n,
                s.ffn_out.view_mut(),
                self.collect_gate_stats,
            )?;
            x_out.copy_from(a.x_mid.view());
            be.add_assign(x_out.view_mut(), s.ffn_out.view());
        }
        s.hf.ensure(n * d)?;
        s.rstdf.ensure(n)?;
        s.logits.ensure(n * v)?;
        be.rmsnorm_forward(
            s.resid[cfg.n_layers].view(),
            self.final_norm.view(p),
            d,
            s.hf.view_mut(),
            s.rstdf.view_mut(),
        );
        be.matmul(
            n,
            v,
            d,
            s.hf.view(),
            false,
            self.embed.view(p),
            true,
            s.logits.view_mut(),
            false,
        );
        Ok(())
    }

    /// Expects `s.logits` to hold d(loss)/d(logits).
    fn backward(&mut self, inputs: &[u32], batch: usize) -> Result<(), String> {
        let cfg = &self.cfg;
        let (d, tn, v) = (cfg.d_model, cfg.seq_len, cfg.vocab);
        let (hn, hd) = (cfg.n_heads(), cfg.head_dim());
        let n = batch * tn;
        let be = &self.backend;
        let p = &self.params;
        let g = &mut self.grads;
        g.fill_zero();
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
            buf.ensure(n * d)?;
        }
        // Unembedding: logits = hf · E^T.
        be.matmul(
            n,
            d,
            v,
            s.logits.view(),
            false,
            self.embed.view(p),
            false,
            s.dh.view_mut(),
            false,
        );
        be.matmul(
            v,
            d,
            n,
            s.logits.view(),
            true,
            s.hf.view(),
            false,
            self.embed.view_mut(g),
            true,
        );
        s.dx.fill_zero();
        be.rmsnorm_backward(
            s.resid[cfg.n_layers].view(),
            self.final_norm.view(p),
            s.rstdf.view(),
            s.dh.view(),
            d,
            s.dx.view_mut(),
            self.final_norm.view_mut(g),
        );
        let shape = AttnShape {
            batch,
            seq: tn,
            heads: hn,
            head_dim: hd,
        };
        let (cos, sin) = (self.rope_cos.view(), self.rope_sin.view());
        for (l, b) in self.blocks.iter_mut().enumerate().rev() {
            let x_in = s.resid[l].view();
            let a = &b.a;
            // x_out = x_mid + ffn(rmsnorm(x_mid))
            b.ffn
                .backward(be, p, g, a.h2.view(), s.dx.view(), n, s.dh.view_mut())?;
            be.rmsnorm_backward(
                a.x_mid.view(),
                b.ln2.view(p),
                a.rstd2.view(),
                s.dh.view(),
                d,
                s.dx.view_mut(),
                b.ln2.view_mut(g),
            );
            // x_mid = x_in + attn(rmsnorm(x_in)) · Wo
            let dx = s.dx.view();
            be.matmul(
                n,
                d,
                d,
                dx,
                false,
                b.wo.view(p),
                true,
                s.d_o.view_mut(),
                false,
            );
            be.matmul(d, d, n, a.o.view(), true, dx, false, b.wo.view_mut(g), true);
            be.attention_backward(
                &shape,
                a.q.view(),
                a.k.view(),
                a.v.view(),
                a.o.view(),
                a.att.view(),
                s.d_o.view(),
                s.dq.view_mut(),
                s.dk.view_mut(),
                s.dv.view_mut(),
            );
            be.rope(s.dq.view_mut(), cos, sin, tn, hn, hd, true);
            be.rope(s.dk.view_mut(), cos, sin, tn, hn, hd, true);
            s.dq_raw.fill_zero();
            s.dk_raw.fill_zero();
            be.rmsnorm_backward(
                a.q_raw.view(),
                b.q_norm.view(p),
                a.rstd_q.view(),
                s.dq.view(),
                hd,
                s.dq_raw.view_mut(),
                b.q_norm.view_mut(g),
            );
            be.rmsnorm_backward(
                a.k_raw.view(),
                b.k_norm.view(p),
                a.rstd_k.view(),
                s.dk.view(),
                hd,
                s.dk_raw.view_mut(),
                b.k_norm.view_mut(g),
            );
            let (h1, dq_raw, dk_raw, dv) =
                (a.h1.view(), s.dq_raw.view(), s.dk_raw.view(), s.dv.view());
            be.matmul(d, d, n, h1, true, dq_raw, false, b.wq.view_mut(g), true);
            be.matmul(d, d, n, h1, true, dk_raw, false, b.wk.view_mut(g), true);
            be.matmul(d, d, n, h1, true, dv, false, b.wv.view_mut(g), true);
            be.matmul(
                n,
                d,
                d,
                dq_raw,
                false,
                b.wq.view(p),
                true,
                s.dh.view_mut(),
                false,
            );
            be.matmul(
                n,
                d,
                d,
                dk_raw,
                false,
                b.wk.view(p),
                true,
                s.dh.view_mut(),
                true,
            );
            be.matmul(
                n,
                d,
                d,
                dv,
                false,
                b.wv.view(p),
                true,
                s.dh.view_mut(),
                true,
            );
            be.rmsnorm_backward(
                x_in,
                b.ln1.view(p),
                a.rstd1.view(),
                s.dh.view(),
                d,
                s.dx.view_mut(),
                b.ln1.view_mut(g),
            );
        }
        // Embedding lookup: scatter rows in token order (deterministic).
        be.embedding_backward(
            s.dx.view(),
            s.tokens.view(),
            inputs,
            d,
            self.embed.view_mut(g),
        );
        Ok(())
    }
}

impl Model {
    /// The L2 norm of all gradients (summed in a fixed order).
    pub fn grad_norm(&self) -> Result<f64, String> {
        let sq = self.backend.sum_squares(self.grads.view());
        self.backend_error()?;
        Ok(sq.sqrt())
    }

    /// Applies one AdamW update from the current gradients.
    pub fn optimizer_step(
        &mut self,
        opt: &mut super::optim::AdamW,
        lr: f32,
        grad_scale: f32,
    ) -> Result<(), String> {
        opt.update(
            &*self.backend,
            &self.table,
            &mut self.params,
            &self.grads,
            lr,
            grad_scale,
        );
        self.backend_error()
    }
}
