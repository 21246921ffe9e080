//! Mixture of clamped-SwiGLU experts (with biases), top-k routing, gate weights = softmax over
//! ALL expert logits (not renormalised over the selected ones), no auxiliary loss.
//! Tokens are grouped per expert (stable counting sort, a backend op) and each expert runs as
//! dense matmuls over its gathered rows. Only the expert boundaries (`starts`, E + 1 numbers)
//! come to the host, to size those matmuls.

use super::swiglu::{swiglu_block_backward, swiglu_block_forward, SwigluWeights};
use super::GateStats;
use crate::nn::backend::{Backend, Buf, View, ViewMut};
use crate::nn::config::ModelConfig;
use crate::nn::cpu::Isa;
use crate::nn::model::host_or_copy;
use crate::nn::tensor::{Init, ParamId, ParamTable};
use rayon::prelude::*;
use std::sync::Arc;

pub struct Moe {
    d: usize,
    f: usize,
    n_experts: usize,
    k: usize,
    gate: ParamId,
    experts: Vec<SwigluWeights>,
    probs: Buf<f32>,
    /// Selected experts per token, [tokens, k].
    chosen: Buf<u32>,
    /// Routed rows grouped by expert: (token, expert) pairs, [rows, 2].
    routes: Buf<u32>,
    /// Rows of expert e are starts[e]..starts[e + 1].
    starts: Buf<u32>,
    /// The same on the host.
    host_starts: Vec<usize>,
    /// The routed rows of each token, [tokens, k], in increasing order (so in expert order).
    token_rows: Buf<u32>,
    hx: Buf<f32>,
    z: Buf<f32>,
    y: Buf<f32>,
    o: Buf<f32>,
    dprob: Buf<f32>,
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
            chosen: Buf::empty(be),
            routes: Buf::empty(be),
            starts: Buf::empty(be),
            host_starts: vec![],
            token_rows: Buf::empty(be),
            hx: Buf::empty(be),
            z: Buf::empty(be),
            y: Buf::empty(be),
            o: Buf::empty(be),
            dprob: Buf::empty(be),
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
        p: &Buf<f32>,
        h: View<f32>,
        n: usize,
        out: ViewMut<f32>,
        stats: bool,
    ) -> Result<(), String> {
        let (d, f, ne, k) = (self.d, self.f, self.n_experts, self.k);
        let rows = n * k;
        self.dlogits.ensure(n * ne)?;
        self.probs.ensure(n * ne)?;
        self.chosen.ensure(rows)?;
        self.routes.ensure(2 * rows)?;
        self.starts.ensure(ne + 1)?;
        self.token_rows.ensure(rows)?;
        // The gate logits go to the dlogits scratch; probs are their softmax.
        let logits = &mut self.dlogits;
        be.matmul(
            n,
            ne,
            d,
            h,
            false,
            self.gate.view(p),
            false,
            logits.view_mut(),
            false,
        );
        be.moe_route(
            logits.view(),
            ne,
            k,
            self.probs.view_mut(),
            self.chosen.view_mut(),
            self.routes.view_mut(),
            self.starts.view_mut(),
            self.token_rows.view_mut(),
        );
        self.host_starts = host_or_copy(&self.starts)
            .iter()
            .map(|&s| s as usize)
            .collect();
        for b in [&mut self.hx, &mut self.o] {
            b.ensure(rows * d)?;
        }
        self.z.ensure(rows * 2 * f)?;
        self.y.ensure(rows * f)?;
        be.moe_gather(h, self.routes.view(), d, self.hx.view_mut());
        let starts = &self.host_starts;
        let pieces: Vec<_> = by_expert(self.z.view_mut(), starts, 2 * f)
            .into_iter()
            .zip(by_expert(self.y.view_mut(), starts, f))
            .zip(by_expert(self.o.view_mut(), starts, d))
            .collect();
        let (hx, pv) = (self.hx.view(), p.view());
        let experts = &self.experts;
        each_expert(&**be, starts, pieces, |e, a, b, ((z, y), o)| {
            let w = &experts[e];
            swiglu_block_forward(&**be, pv, w, d, f, hx.range(a * d..b * d), b - a, z, y, o)
        });
        be.moe_combine(
            self.o.view(),
            self.probs.view(),
            self.routes.view(),
            self.token_rows.view(),
            ne,
            k,
            d,
            out,
        );
        if stats {
            let (routes, probs) = (host_or_copy(&self.routes), host_or_copy(&self.probs));
            for pair in routes.chunks(2) {
                let (t, e) = (pair[0] as usize, pair[1] as usize);
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
        p: &Buf<f32>,
        g: &mut Buf<f32>,
        h: View<f32>,
        dy: View<f32>,
        n: usize,
        mut dh: ViewMut<f32>,
    ) -> Result<(), String> {
        let (d, f, ne, k) = (self.d, self.f, self.n_experts, self.k);
        let rows = n * k;
        self.dprob.ensure(n * ne)?;
        self.dout.ensure(rows * d)?;
        self.dhx.ensure(rows * d)?;
        self.dy.ensure(rows * f)?;
        self.dz.ensure(rows * 2 * f)?;
        // Per routed row: its share of the output gradient, and <dy, o>, the gate's gradient.
        be.moe_combine_backward(
            dy,
            self.o.view(),
            self.probs.view(),
            self.routes.view(),
            self.token_rows.view(),
            ne,
            k,
            d,
            self.dout.view_mut(),
            self.dprob.view_mut(),
        );
        // The experts, each on its own rows and its own slice of the gradients (experts'
        // tensors follow one another in the table, all the same size).
        let (span0, _) = self.experts[0].span();
        let per = span0.len();
        let g_experts = g.range_mut(span0.start..span0.start + ne * per);
        let starts = &self.host_starts;
        let every = (0..=ne).collect::<Vec<_>>();
        let pieces: Vec<_> = by_expert(g_experts, &every, per)
            .into_iter()
            .zip(by_expert(self.dy.view_mut(), starts, f))
            .zip(by_expert(self.dz.view_mut(), starts, 2 * f))
            .zip(by_expert(self.dhx.view_mut(), starts, d))
            .collect();
        let (hx, z, y, dout, pv) = (
            self.hx.view(),
            self.z.view(),
            self.y.view(),
            self.dout.view(),
            p.view(),
        );
        let experts = &self.experts;
        each_expert(&**be, starts, pieces, |e, a, b, (((ge, dyr), dzr), dhr)| {
            let (span, local) = experts[e].span();
            swiglu_block_backward(
                &**be,
                pv.range(span),
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
        // Softmax backward over all experts, then the gate.
        be.softmax_backward(
            self.probs.view(),
            self.dprob.view(),
            ne,
            self.dlogits.view_mut(),
        );
        let dlogits = self.dlogits.view();
        be.matmul(
            d,
            ne,
            n,
            h,
            true,
            dlogits,
            false,
            self.gate.view_mut(g),
            true,
        );
        be.matmul(
            n,
            d,
            ne,
            dlogits,
            false,
            self.gate.view(p),
            true,
            dh.rb(),
            false,
        );
        // Each token gathers its rows' input gradients, in expert order.
        be.moe_scatter_add(self.dhx.view(), self.token_rows.view(), k, d, dh);
        Ok(())
    }
}

/// Runs `job(e, rows a..b)` for every expert with rows: side by side on rayon's threads on
/// the CPU (each on this thread's instruction set), one after another on a device.
fn each_expert<T: Send>(
    be: &dyn Backend,
    starts: &[usize],
    pieces: Vec<T>,
    job: impl Fn(usize, usize, usize, T) + Sync,
) {
    let run = |(e, piece): (usize, T)| {
        let (a, b) = (starts[e], starts[e + 1]);
        if a < b {
            job(e, a, b, piece)
        }
    };
    if be.host_memory() {
        let isa = Isa::current();
        pieces
            .into_par_iter()
            .enumerate()
            .for_each(|x| isa.scoped(|| run(x)));
    } else {
        pieces.into_iter().enumerate().for_each(run);
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
        [&self.chosen, &self.routes, &self.starts, &self.token_rows]
            .iter()
            .map(|b| b.bytes())
            .sum::<usize>()
            + [
                &self.probs,
                &self.hx,
                &self.z,
                &self.y,
                &self.o,
                &self.dprob,
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
