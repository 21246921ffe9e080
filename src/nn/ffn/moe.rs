//! Mixture of clamped-SwiGLU experts (with biases), top-k routing, gate weights = softmax over
//! ALL expert logits (not renormalised over the selected ones), no auxiliary loss.
//! Tokens are grouped per expert (stable counting sort) and each expert runs as dense matmuls
//! over its gathered rows.

use super::swiglu::{swiglu_block_backward, swiglu_block_forward, SwigluWeights};
use super::{ensure, GateStats};
use crate::nn::backend::Backend;
use crate::nn::config::ModelConfig;
use crate::nn::cpu::{vmath, Isa};
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
    /// The routed rows of each token, [tokens, k], in increasing order (so in expert order).
    token_rows: Vec<u32>,
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
        let experts: Vec<SwigluWeights> = (0..e)
            .map(|i| SwigluWeights::new(t, &format!("{prefix}.experts.{i}"), d, f))
            .collect();
        // The backward pass hands each expert one slice of the gradients.
        assert!(experts
            .windows(2)
            .all(|w| w[0].span().0.end == w[1].span().0.start));
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
            token_rows: vec![],
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
        self.token_rows.resize(n * k, 0);
        let mut taken = vec![0usize; n];
        for (r, &(t, _)) in self.routes.iter().enumerate() {
            let t = t as usize;
            self.token_rows[t * k + taken[t]] = r as u32;
            taken[t] += 1;
        }
        let rows = n * k;
        ensure(&mut self.hx, rows * d);
        ensure(&mut self.z, rows * 2 * f);
        ensure(&mut self.y, rows * f);
        ensure(&mut self.o, rows * d);
        let routes = &self.routes;
        self.hx
            .par_chunks_mut(d)
            .zip(routes.par_iter())
            .for_each(|(row, &(t, _))| {
                let t = t as usize;
                row.copy_from_slice(&h[t * d..(t + 1) * d]);
            });
        // The experts side by side, each on its own rows (and on this thread's instruction set:
        // the tasks run on rayon's threads).
        let isa = Isa::current();
        let (hx, starts) = (&self.hx, &self.starts);
        let z = by_expert(&mut self.z, starts, 2 * f);
        let y = by_expert(&mut self.y, starts, f);
        let o = by_expert(&mut self.o, starts, d);
        z.into_par_iter()
            .zip(y)
            .zip(o)
            .zip(self.experts.par_iter())
            .enumerate()
            .for_each(|(e, (((z, y), o), w))| {
                let (a, b) = (starts[e], starts[e + 1]);
                if a < b {
                    isa.scoped(|| {
                        swiglu_block_forward(be, p, w, d, f, &hx[a * d..b * d], b - a, z, y, o)
                    });
                }
            });
        // Combine per token, its rows in expert order, so the sum order is fixed.
        let (probs, o, token_rows) = (&self.probs, &self.o, &self.token_rows);
        out[..n * d]
            .par_chunks_mut(d)
            .enumerate()
            .for_each(|(t, row)| {
                row.fill(0.0);
                for &r in &token_rows[t * k..(t + 1) * k] {
                    let (r, e) = (r as usize, routes[r as usize].1 as usize);
                    let w = probs[t * ne + e];
                    for (x, &v) in row.iter_mut().zip(&o[r * d..(r + 1) * d]) {
                        *x += w * v;
                    }
                }
            });
        if stats {
            for &(t, e) in routes {
                let (t, e) = (t as usize, e as usize);
                self.stats.selected[e] += 1;
                self.stats.mass[e] += self.probs[t * ne + e] as f64;
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
        let (routes, probs, o) = (&self.routes, &self.probs, &self.o);
        let isa = Isa::current();
        // Per routed row: its share of the output gradient and <dy, o>, the gate's gradient.
        let dots: Vec<f32> = self
            .dout
            .par_chunks_mut(d)
            .zip(routes.par_iter())
            .enumerate()
            .map(|(r, (drow, &(t, e)))| {
                let (t, e) = (t as usize, e as usize);
                let w = probs[t * ne + e];
                let dyr = &dy[t * d..(t + 1) * d];
                for (x, &g) in drow.iter_mut().zip(dyr) {
                    *x = w * g;
                }
                let or = &o[r * d..(r + 1) * d];
                isa.run(
                    #[inline(always)]
                    |isa| vmath::dot(isa, dyr, or),
                )
            })
            .collect();
        for (&(t, e), &v) in routes.iter().zip(&dots) {
            self.dprob[t as usize * ne + e as usize] = v;
        }
        // The experts side by side, each on its own rows and its own slice of the gradients
        // (experts' tensors follow one another in the table, all the same size).
        let (span0, _) = self.experts[0].span();
        let per = span0.len();
        let g_experts = &mut g[span0.start..span0.start + ne * per];
        let starts = &self.starts;
        let (hx, z, y, dout) = (&self.hx, &self.z, &self.y, &self.dout);
        let dyb = by_expert(&mut self.dy, starts, f);
        let dzb = by_expert(&mut self.dz, starts, 2 * f);
        let dhxb = by_expert(&mut self.dhx, starts, d);
        g_experts
            .par_chunks_mut(per)
            .zip(dyb)
            .zip(dzb)
            .zip(dhxb)
            .zip(self.experts.par_iter())
            .enumerate()
            .for_each(|(e, ((((ge, dyr), dzr), dhr), w))| {
                let (a, b) = (starts[e], starts[e + 1]);
                if a == b {
                    return;
                }
                let (span, local) = w.span();
                isa.scoped(|| {
                    swiglu_block_backward(
                        be,
                        &p[span],
                        ge,
                        &local,
                        d,
                        f,
                        &hx[a * d..b * d],
                        b - a,
                        &z[a * 2 * f..b * 2 * f],
                        &y[a * f..b * f],
                        &dout[a * d..b * d],
                        dyr,
                        dzr,
                        dhr,
                    )
                });
            });
        // Softmax backward over all experts.
        self.dlogits[..n * ne]
            .par_chunks_mut(ne)
            .zip(probs.par_chunks(ne).zip(self.dprob.par_chunks(ne)))
            .for_each(|(dl, (pr, dp))| {
                let s: f32 = pr.iter().zip(dp).map(|(a, b)| a * b).sum();
                for ((x, &pe), &de) in dl.iter_mut().zip(pr).zip(dp) {
                    *x = pe * (de - s);
                }
            });
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
        // Each token gathers its rows' input gradients, in expert order.
        let (dhx, token_rows) = (&self.dhx, &self.token_rows);
        dh[..n * d]
            .par_chunks_mut(d)
            .enumerate()
            .for_each(|(t, row)| {
                for &r in &token_rows[t * k..(t + 1) * k] {
                    let r = r as usize;
                    for (x, &v) in row.iter_mut().zip(&dhx[r * d..(r + 1) * d]) {
                        *x += v;
                    }
                }
            });
    }
}

/// `buf` cut into the rows of each expert (`starts`), `width` floats a row.
fn by_expert<'a>(buf: &'a mut [f32], starts: &[usize], width: usize) -> Vec<&'a mut [f32]> {
    let mut rest = &mut buf[..starts[starts.len() - 1] * width];
    let mut out = Vec::with_capacity(starts.len() - 1);
    for w in starts.windows(2) {
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut((w[1] - w[0]) * width);
        out.push(piece);
        rest = tail;
    }
    out
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
