//! Mixture of clamped-SwiGLU experts (with biases), top-k routing, gate weights = softmax over
//! ALL expert logits (not renormalised over the selected ones), no auxiliary loss.
//! Tokens are grouped per expert (stable counting sort) and each expert runs as dense matmuls
//! over its gathered rows.

use super::swiglu::{swiglu_block_backward, swiglu_block_forward, SwigluWeights};
use super::GateStats;
use crate::nn::backend::{Backend, Buf, View, ViewMut};
use crate::nn::config::ModelConfig;
use crate::nn::cpu::{vmath, Isa};
use crate::nn::tensor::{Init, ParamId, ParamTable};
use rayon::prelude::*;
use std::sync::Arc;

const HOST_ONLY: &str = "moe routes tokens on the host for now: train it with --device cpu";

pub struct Moe {
    d: usize,
    f: usize,
    n_experts: usize,
    k: usize,
    gate: ParamId,
    experts: Vec<SwigluWeights>,
    probs: Buf<f32>,
    /// Selected experts per token, [tokens, k].
    chosen: Vec<u32>,
    /// Routed rows grouped by expert: (token, expert); rows of expert e are starts[e]..starts[e+1].
    routes: Vec<(u32, u32)>,
    starts: Vec<usize>,
    /// The routed rows of each token, [tokens, k], in increasing order (so in expert order).
    token_rows: Vec<u32>,
    hx: Buf<f32>,
    z: Buf<f32>,
    y: Buf<f32>,
    o: Buf<f32>,
    dprob: Vec<f32>,
    dlogits: Buf<f32>,
    dout: Buf<f32>,
    dy: Buf<f32>,
    dz: Buf<f32>,
    dhx: Buf<f32>,
    pub stats: GateStats,
}

impl Moe {
    pub fn new(t: &mut ParamTable, prefix: &str, cfg: &ModelConfig, be: &Arc<dyn Backend>) -> Moe {
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
            probs: Buf::empty(be),
            chosen: vec![],
            routes: vec![],
            starts: vec![],
            token_rows: vec![],
            hx: Buf::empty(be),
            z: Buf::empty(be),
            y: Buf::empty(be),
            o: Buf::empty(be),
            dprob: vec![],
            dlogits: Buf::empty(be),
            dout: Buf::empty(be),
            dy: Buf::empty(be),
            dz: Buf::empty(be),
            dhx: Buf::empty(be),
            stats: GateStats::new(e),
        }
    }

    pub fn forward(
        &mut self,
        be: &Arc<dyn Backend>,
        pb: &Buf<f32>,
        hv: View<f32>,
        n: usize,
        out: ViewMut<f32>,
        stats: bool,
    ) -> Result<(), String> {
        let (d, f, ne, k) = (self.d, self.f, self.n_experts, self.k);
        self.probs.ensure(n * ne)?;
        be.matmul(
            n,
            ne,
            d,
            hv,
            false,
            self.gate.view(pb),
            false,
            self.probs.view_mut(),
            false,
        );
        let (h, out) = (
            hv.host().ok_or(HOST_ONLY)?,
            out.into_host().ok_or(HOST_ONLY)?,
        );
        // Top-k on the logits (ties: lower index first), then softmax over all experts.
        self.chosen.resize(n * k, 0);
        let chosen = &mut self.chosen;
        self.probs
            .host_mut()
            .ok_or(HOST_ONLY)?
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
        self.hx.ensure(rows * d)?;
        self.z.ensure(rows * 2 * f)?;
        self.y.ensure(rows * f)?;
        self.o.ensure(rows * d)?;
        let routes = &self.routes;
        self.hx
            .host_mut()
            .ok_or(HOST_ONLY)?
            .par_chunks_mut(d)
            .zip(routes.par_iter())
            .for_each(|(row, &(t, _))| {
                let t = t as usize;
                row.copy_from_slice(&h[t * d..(t + 1) * d]);
            });
        // The experts side by side, each on its own rows (and on this thread's instruction set:
        // the tasks run on rayon's threads).
        let isa = Isa::current();
        let (hx, starts, p) = (self.hx.view(), &self.starts, pb.view());
        let z = by_expert(self.z.view_mut(), starts, 2 * f);
        let y = by_expert(self.y.view_mut(), starts, f);
        let o = by_expert(self.o.view_mut(), starts, d);
        z.into_par_iter()
            .zip(y)
            .zip(o)
            .zip(self.experts.par_iter())
            .enumerate()
            .for_each(|(e, (((z, y), o), w))| {
                let (a, b) = (starts[e], starts[e + 1]);
                if a < b {
                    isa.scoped(|| {
                        swiglu_block_forward(
                            &**be,
                            p,
                            w,
                            d,
                            f,
                            hx.range(a * d..b * d),
                            b - a,
                            z,
                            y,
                            o,
                        )
                    });
                }
            });
        // Combine per token, its rows in expert order, so the sum order is fixed.
        let (probs, o, token_rows) = (
            self.probs.host().ok_or(HOST_ONLY)?,
            self.o.host().ok_or(HOST_ONLY)?,
            &self.token_rows,
        );
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
                self.stats.mass[e] += probs[t * ne + e] as f64;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        be: &Arc<dyn Backend>,
        pb: &Buf<f32>,
        gb: &mut Buf<f32>,
        hv: View<f32>,
        dyv: View<f32>,
        n: usize,
        mut dhv: ViewMut<f32>,
    ) -> Result<(), String> {
        let (d, f, ne, k) = (self.d, self.f, self.n_experts, self.k);
        let rows = n * k;
        self.dprob.clear();
        self.dprob.resize(n * ne, 0.0);
        self.dlogits.ensure(n * ne)?;
        self.dout.ensure(rows * d)?;
        self.dy.ensure(rows * f)?;
        self.dz.ensure(rows * 2 * f)?;
        self.dhx.ensure(rows * d)?;
        let dy = dyv.host().ok_or(HOST_ONLY)?;
        let (routes, probs, o) = (
            &self.routes,
            self.probs.host().ok_or(HOST_ONLY)?,
            self.o.host().ok_or(HOST_ONLY)?,
        );
        let isa = Isa::current();
        // Per routed row: its share of the output gradient and <dy, o>, the gate's gradient.
        let dots: Vec<f32> = self
            .dout
            .host_mut()
            .ok_or(HOST_ONLY)?
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
        let g_experts = gb.range_mut(span0.start..span0.start + ne * per);
        let starts = &self.starts;
        let (hx, z, y, dout) = (
            self.hx.view(),
            self.z.view(),
            self.y.view(),
            self.dout.view(),
        );
        let dyb = by_expert(self.dy.view_mut(), starts, f);
        let dzb = by_expert(self.dz.view_mut(), starts, 2 * f);
        let dhxb = by_expert(self.dhx.view_mut(), starts, d);
        let p = pb.view();
        by_expert(g_experts, &(0..=ne).collect::<Vec<_>>(), per)
            .into_par_iter()
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
                        &**be,
                        p.range(span),
                        ge,
                        &local,
                        d,
                        f,
                        hx.range(a * d..b * d),
                        b - a,
                        z.range(a * 2 * f..b * 2 * f),
                        y.range(a * f..b * f),
                        dout.range(a * d..b * d),
                        dyr,
                        dzr,
                        dhr,
                    )
                });
            });
        // Softmax backward over all experts.
        self.dlogits
            .host_mut()
            .ok_or(HOST_ONLY)?
            .par_chunks_mut(ne)
            .zip(probs.par_chunks(ne).zip(self.dprob.par_chunks(ne)))
            .for_each(|(dl, (pr, dp))| {
                let s: f32 = pr.iter().zip(dp).map(|(a, b)| a * b).sum();
                for ((x, &pe), &de) in dl.iter_mut().zip(pr).zip(dp) {
                    *x = pe * (de - s);
                }
            });
        let dlogits = self.dlogits.view();
        be.matmul(
            d,
            ne,
            n,
            hv,
            true,
            dlogits,
            false,
            self.gate.view_mut(gb),
            true,
        );
        be.matmul(
            n,
            d,
            ne,
            dlogits,
            false,
            self.gate.view(pb),
            true,
            dhv.rb(),
            false,
        );
        // Each token gathers its rows' input gradients, in expert order.
        let (dhx, token_rows) = (self.dhx.host().ok_or(HOST_ONLY)?, &self.token_rows);
        dhv.into_host()
            .ok_or(HOST_ONLY)?
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
        Ok(())
    }
}

/// `buf` cut into the rows of each expert (`starts`), `width` floats a row.
fn by_expert<'a>(buf: ViewMut<'a, f32>, starts: &[usize], width: usize) -> Vec<ViewMut<'a, f32>> {
    let mut rest = buf.range(0..starts[starts.len() - 1] * width);
    let mut out = Vec::with_capacity(starts.len() - 1);
    for w in starts.windows(2) {
        let (piece, tail) = rest.split_at((w[1] - w[0]) * width);
        out.push(piece);
        rest = tail;
    }
    out
}

impl Moe {
    /// Bytes held by the saved activations and scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        4 * (self.chosen.capacity() + self.dprob.capacity())
            + [
                &self.probs,
                &self.hx,
                &self.z,
                &self.y,
                &self.o,
                &self.dlogits,
                &self.dout,
                &self.dy,
                &self.dz,
                &self.dhx,
            ]
            .iter()
            .map(|b| b.bytes())
            .sum::<usize>()
    }
}
