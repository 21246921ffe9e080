//! Mixture of clamped-SwiGLU experts (with biases), top-k routing, gate weights = softmax over
//! ALL expert logits (not renormalised over the selected ones), no auxiliary loss.
//! Tokens are grouped per expert (stable counting sort) and each expert runs as dense matmuls
//! over its gathered rows.

use super::swiglu::{swiglu_block_backward, swiglu_block_forward, SwigluWeights};
use super::{ensure, GateStats};
use crate::nn::backend::Backend;
use crate::nn::config::ModelConfig;
use crate::nn::tensor::{Init, ParamId, ParamTable};
use rayon::prelude::*;

pub struct Moe {
    d: usize,
    f: usize,
    n_experts: usize,
    k: usize,
    gate: ParamId,
    experts: Vec<SwigluWeights>,
    probs: Vec<f32>,
    /// Selected experts per token, [tokens, k].
    chosen: Vec<u32>,
    /// Routed rows grouped by expert: (token, expert); rows of expert e are starts[e]..starts[e+1].
    routes: Vec<(u32, u32)>,
    starts: Vec<usize>,
    hx: Vec<f32>,
    z: Vec<f32>,
    y: Vec<f32>,
    o: Vec<f32>,
    dprob: Vec<f32>,
    dlogits: Vec<f32>,
    dout: Vec<f32>,
    dy: Vec<f32>,
    dz: Vec<f32>,
    dhx: Vec<f32>,
    pub stats: GateStats,
}

impl Moe {
    pub fn new(t: &mut ParamTable, prefix: &str, cfg: &ModelConfig) -> Moe {
        let (d, f, e) = (cfg.d_model, cfg.d_ffw, cfg.experts);
        let gate = t.add(
            format!("{prefix}.gate"),
            &[d, e],
            Init::TruncatedNormal(1.0 / (d as f64).sqrt()),
            true,
        );
        let experts = (0..e)
            .map(|i| SwigluWeights::new(t, &format!("{prefix}.experts.{i}"), d, f))
            .collect();
        Moe {
            d,
            f,
            n_experts: e,
            k: cfg.topk,
            gate,
            experts,
            probs: vec![],
            chosen: vec![],
            routes: vec![],
            starts: vec![],
            hx: vec![],
            z: vec![],
            y: vec![],
            o: vec![],
            dprob: vec![],
            dlogits: vec![],
            dout: vec![],
            dy: vec![],
            dz: vec![],
            dhx: vec![],
            stats: GateStats::new(e),
        }
    }

    pub fn forward(
        &mut self,
        be: &dyn Backend,
        p: &[f32],
        h: &[f32],
        n: usize,
        out: &mut [f32],
        stats: bool,
    ) {
        let (d, f, ne, k) = (self.d, self.f, self.n_experts, self.k);
        ensure(&mut self.probs, n * ne);
        be.matmul(
            n,
            ne,
            d,
            h,
            false,
            self.gate.of(p),
            false,
            &mut self.probs,
            false,
        );
        // Top-k on the logits (ties: lower index first), then softmax over all experts.
        self.chosen.resize(n * k, 0);
        let chosen = &mut self.chosen;
        self.probs
            .par_chunks_mut(ne)
            .zip(chosen.par_chunks_mut(k))
            .for_each(|(row, pick)| {
                // Top-k by repeated arg-max (k is 2); ties go to the lower index, as in
                // jax.lax.top_k.
                for slot in 0..k {
                    let mut best: Option<usize> = None;
                    for (e, &x) in row.iter().enumerate() {
                        if pick[..slot].contains(&(e as u32)) {
                            continue;
                        }
                        if best.is_none_or(|b| x > row[b]) {
                            best = Some(e);
                        }
                    }
                    pick[slot] = best.unwrap_or(0) as u32;
                }
                let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for x in row.iter_mut() {
                    *x = (*x - mx).exp();
                    sum += *x;
                }
                for x in row.iter_mut() {
                    *x /= sum;
                }
            });
        self.starts.clear();
        self.starts.resize(ne + 1, 0);
        for &e in self.chosen.iter() {
            self.starts[e as usize + 1] += 1;
        }
        for e in 0..ne {
            self.starts[e + 1] += self.starts[e];
        }
        let mut fill = self.starts.clone();
        self.routes.clear();
        self.routes.resize(n * k, (0, 0));
        for (j, &e) in self.chosen.iter().enumerate() {
            self.routes[fill[e as usize]] = ((j / k) as u32, e);
            fill[e as usize] += 1;
        }
        let rows = n * k;
        ensure(&mut self.hx, rows * d);
        ensure(&mut self.z, rows * 2 * f);
        ensure(&mut self.y, rows * f);
        ensure(&mut self.o, rows * d);
        for (r, &(t, _)) in self.routes.iter().enumerate() {
            let t = t as usize;
            self.hx[r * d..(r + 1) * d].copy_from_slice(&h[t * d..(t + 1) * d]);
        }
        for e in 0..ne {
            let (a, b) = (self.starts[e], self.starts[e + 1]);
            if a == b {
                continue;
            }
            swiglu_block_forward(
                be,
                p,
                &self.experts[e],
                d,
                f,
                &self.hx[a * d..b * d],
                b - a,
                &mut self.z[a * 2 * f..b * 2 * f],
                &mut self.y[a * f..b * f],
                &mut self.o[a * d..b * d],
            );
        }
        out[..n * d].fill(0.0);
        // Combine in expert order so the sum order is fixed.
        for (r, &(t, e)) in self.routes.iter().enumerate() {
            let (t, e) = (t as usize, e as usize);
            let w = self.probs[t * ne + e];
            for i in 0..d {
                out[t * d + i] += w * self.o[r * d + i];
            }
            if stats {
                self.stats.selected[e] += 1;
                self.stats.mass[e] += w as f64;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &dyn Backend,
        p: &[f32],
        g: &mut [f32],
        h: &[f32],
        dy: &[f32],
        n: usize,
        dh: &mut [f32],
    ) {
        let (d, f, ne, k) = (self.d, self.f, self.n_experts, self.k);
        let rows = n * k;
        ensure(&mut self.dprob, n * ne);
        ensure(&mut self.dlogits, n * ne);
        ensure(&mut self.dout, rows * d);
        ensure(&mut self.dy, rows * f);
        ensure(&mut self.dz, rows * 2 * f);
        ensure(&mut self.dhx, rows * d);
        self.dprob.fill(0.0);
        for (r, &(t, e)) in self.routes.iter().enumerate() {
            let (t, e) = (t as usize, e as usize);
            let w = self.probs[t * ne + e];
            let dyr = &dy[t * d..(t + 1) * d];
            let orow = &self.o[r * d..(r + 1) * d];
            self.dprob[t * ne + e] = crate::nn::cpu::real::dot(dyr, orow);
            for (o, &g) in self.dout[r * d..(r + 1) * d].iter_mut().zip(dyr) {
                *o = w * g;
            }
        }
        for e in 0..ne {
            let (a, b) = (self.starts[e], self.starts[e + 1]);
            if a == b {
                continue;
            }
            swiglu_block_backward(
                be,
                p,
                g,
                &self.experts[e],
                d,
                f,
                &self.hx[a * d..b * d],
                b - a,
                &self.z[a * 2 * f..b * 2 * f],
                &self.y[a * f..b * f],
                &self.dout[a * d..b * d],
                &mut self.dy[a * f..b * f],
                &mut self.dz[a * 2 * f..b * 2 * f],
                &mut self.dhx[a * d..b * d],
            );
        }
        // Softmax backward over all experts.
        for t in 0..n {
            let pr = &self.probs[t * ne..(t + 1) * ne];
            let dp = &self.dprob[t * ne..(t + 1) * ne];
            let s: f32 = pr.iter().zip(dp).map(|(a, b)| a * b).sum();
            for e in 0..ne {
                self.dlogits[t * ne + e] = pr[e] * (dp[e] - s);
            }
        }
        be.matmul(
            d,
            ne,
            n,
            h,
            true,
            &self.dlogits,
            false,
            self.gate.of_mut(g),
            true,
        );
        be.matmul(
            n,
            d,
            ne,
            &self.dlogits,
            false,
            self.gate.of(p),
            true,
            dh,
            false,
        );
        for (r, &(t, _)) in self.routes.iter().enumerate() {
            let t = t as usize;
            for i in 0..d {
                dh[t * d + i] += self.dhx[r * d + i];
            }
        }
    }
}

impl Moe {
    /// Bytes held by the saved activations and scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        4 * (self.chosen.capacity()
            + self.probs.capacity()
            + self.hx.capacity()
            + self.z.capacity()
            + self.y.capacity()
            + self.o.capacity()
            + self.dprob.capacity()
            + self.dlogits.capacity()
            + self.dout.capacity()
            + self.dy.capacity()
            + self.dz.capacity()
            + self.dhx.capacity())
    }
}
