//! Whole-model check against dfdx: the same tiny model written with dfdx tensor ops (f64),
//! its loss and every parameter gradient compared with ours. Top-k selection is not
//! differentiable, so it is computed on the host from dfdx's own logits and the selected
//! entries are gathered with dfdx ops.
//!
//! dfdx tapes are move-only, so every intermediate is split: its original (with the tape of
//! the ops that produced it) goes into a zero-weighted sink that joins the loss, and callers use
//! tape-less copies that share its id. Gradients are accumulated by tensor id, so this yields
//! exactly the gradients of the loss.

use super::config::{FfnKind, ModelConfig};
use super::model::Model;
use super::oracle_tests::assert_matches_oracle;
use super::rng::{fresh_seed, Rng};
use dfdx::prelude::*;
use std::collections::HashMap;

type Tp = OwnedTape<f64, Cpu>;
type M = Tensor<(usize, usize), f64, Cpu, Tp>;
type V = Tensor<(usize,), f64, Cpu, Tp>;
type Leaf = Tensor<(usize, usize), f64, Cpu>;

struct Graph<'a> {
    dev: Cpu,
    cfg: &'a ModelConfig,
    params: HashMap<String, Leaf>,
    sink: Option<Tensor<(), f64, Cpu, Tp>>,
}

impl Graph<'_> {
    fn keep_m(&mut self, x: M) -> M {
        let ret = x.with_empty_tape();
        let s = x.sum::<(), _>() * 0.0;
        self.sink = Some(match self.sink.take() {
            None => s,
            Some(acc) => acc + s,
        });
        ret
    }
    fn keep_v(&mut self, x: V) -> V {
        let ret = x.with_empty_tape();
        let s = x.sum::<(), _>() * 0.0;
        self.sink = Some(match self.sink.take() {
            None => s,
            Some(acc) => acc + s,
        });
        ret
    }
    /// A parameter as a traced (rows, cols) tensor; vectors are (1, len).
    fn p(&self, name: &str) -> M {
        self.params
            .get(name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
            .leaky_trace()
    }
    /// A vector parameter as (len,).
    fn pv(&self, name: &str) -> V {
        let t = self.p(name);
        let n = t.shape().1;
        t.reshape_like(&(n,))
    }
    fn idx(&self, v: Vec<usize>) -> Tensor<(usize,), usize, Cpu> {
        let n = v.len();
        self.dev.tensor_from_vec(v, (n,))
    }
    fn konst(&self, v: Vec<f64>, shape: (usize, usize)) -> Tensor<(usize, usize), f64, Cpu> {
        self.dev.tensor_from_vec(v, shape)
    }

    fn matmul(&mut self, x: &M, w: &str) -> M {
        let y = x.with_empty_tape().matmul(self.p(w));
        self.keep_m(y)
    }

    fn rmsnorm(&mut self, x: &M, scale: &str) -> M {
        let shape = *x.shape();
        let ms = x.with_empty_tape().square().mean::<(usize,), Axis<1>>();
        let r = (ms + 1e-6).sqrt().recip();
        let y = x.with_empty_tape() * r.broadcast_like::<_, Axis<1>>(&shape);
        let y = y * self.pv(scale).broadcast_like::<_, Axis<0>>(&shape);
        self.keep_m(y)
    }

    fn gelu(&mut self, x: &M) -> M {
        let y = x.with_empty_tape().fast_gelu();
        self.keep_m(y)
    }

    /// RoPE on rows laid out [token][head] of width hd: y = x * cos + rotate_half(x) * sin.
    fn rope(&mut self, x: &M, tokens: usize) -> M {
        let (rows, hd) = *x.shape();
        let heads = rows / tokens;
        let half = hd / 2;
        let (mut c, mut s) = (vec![0.0; rows * hd], vec![0.0; rows * hd]);
        for r in 0..rows {
            let pos = (r / heads) % self.cfg.seq_len;
            for i in 0..half {
                let ang = pos as f64 * 10000f64.powf(-(2.0 * i as f64) / hd as f64);
                c[r * hd + i] = ang.cos();
                c[r * hd + i + half] = ang.cos();
                s[r * hd + i] = ang.sin();
                s[r * hd + i + half] = ang.sin();
            }
        }
        // rotate_half(x) = x · R with R[i + half, i] = -1 and R[i, i + half] = 1.
        let mut rot = vec![0.0; hd * hd];
        for i in 0..half {
            rot[(i + half) * hd + i] = -1.0;
            rot[i * hd + i + half] = 1.0;
        }
        let rot = self.konst(rot, (hd, hd));
        let a = x.with_empty_tape() * self.konst(c, (rows, hd));
        let b = x.with_empty_tape().matmul(rot) * self.konst(s, (rows, hd));
        let y = a + b;
        self.keep_m(y)
    }

    fn attention(&mut self, x: &M, l: usize, batch: usize) -> M {
        let cfg = self.cfg;
        let (d, tn, hn, hd) = (cfg.d_model, cfg.seq_len, cfg.n_heads(), cfg.head_dim());
        let n = batch * tn;
        let pre = format!("blocks.{l}.attn");
        let qkv: Vec<M> = ["wq", "wk", "wv"]
            .iter()
            .map(|w| self.matmul(x, &format!("{pre}.{w}")))
            .collect();
        let mut normed = Vec::new();
        for (which, t) in ["q_norm", "k_norm"].iter().zip(&qkv) {
            let rows = t.with_empty_tape().reshape_like(&(n * hn, hd));
            let rows = self.keep_m(rows);
            let nrm = self.rmsnorm(&rows, &format!("{pre}.{which}.scale"));
            let rot = self.rope(&nrm, n);
            let back = rot.reshape_like(&(n, d));
            normed.push(self.keep_m(back));
        }
        let (q, k, v) = (&normed[0], &normed[1], &qkv[2]);
        let mut mask = vec![0.0; tn * tn];
        for t in 0..tn {
            for u in t + 1..tn {
                mask[t * tn + u] = -1e30;
            }
        }
        let mut rows_out: Option<M> = None;
        for b in 0..batch {
            let mut heads_out: Option<M> = None;
            for h in 0..hn {
                let sl = |t: &M| {
                    t.with_empty_tape()
                        .slice((b * tn..(b + 1) * tn, h * hd..(h + 1) * hd))
                };
                let (qs, ks, vs) = (sl(q), sl(k), sl(v));
                let scores = qs.matmul(ks.permute::<(usize, usize), Axes2<1, 0>>())
                    * (1.0 / (hd as f64).sqrt());
                let scores = scores + self.konst(mask.clone(), (tn, tn));
                let att = scores.softmax::<Axis<1>>();
                let o = att.matmul(vs);
                let o = self.keep_m(o);
                heads_out = Some(match heads_out {
                    None => o,
                    Some(acc) => {
                        let c = (acc, o).concat_along(Axis::<1>);
                        self.keep_m(c)
                    }
                });
            }
            let ho = heads_out.unwrap();
            rows_out = Some(match rows_out {
                None => ho,
                Some(acc) => {
                    let c = (acc, ho).concat_along(Axis::<0>);
                    self.keep_m(c)
                }
            });
        }
        let o = rows_out.unwrap();
        self.matmul(&o, &format!("{pre}.wo"))
    }

    fn add(&mut self, a: &M, b: &M) -> M {
        let y = a.with_empty_tape() + b.with_empty_tape();
        self.keep_m(y)
    }

    fn add_bias(&mut self, x: &M, b: &str) -> M {
        let shape = *x.shape();
        let y = x.with_empty_tape() + self.pv(b).broadcast_like::<_, Axis<0>>(&shape);
        self.keep_m(y)
    }

    fn swiglu_block(&mut self, h: &M, pre: &str) -> M {
        let f = self.cfg.d_ffw;
        let z = self.matmul(h, &format!("{pre}.w1"));
        let z = self.add_bias(&z, &format!("{pre}.b1"));
        let rows = z.shape().0;
        let gate = z.with_empty_tape().slice((0..rows, 0..f));
        let lin = z.with_empty_tape().slice((0..rows, f..2 * f));
        // Clamp as min/max against constants so the gradient is zero outside the range.
        let gate = gate.minimum(self.konst(vec![7.0; rows * f], (rows, f)));
        let gate = self.keep_m(gate);
        let lin = lin.clamp(-7.0, 7.0);
        let glu = gate.with_empty_tape() * (gate.with_empty_tape() * 1.702).sigmoid();
        let y = glu * (lin + 1.0);
        let y = self.keep_m(y);
        let o = self.matmul(&y, &format!("{pre}.w2"));
        self.add_bias(&o, &format!("{pre}.b2"))
    }

    /// Product-key selection on the host: (flat index of the half-1 logit, of the half-2 logit,
    /// expert index) per (token, channel, slot).
    fn select(&self, logits: &[f64], n: usize) -> Vec<(usize, usize, usize)> {
        let (s, k, ch) = (self.cfg.sqrt_experts(), self.cfg.topk, self.cfg.channels);
        let w = 2 * ch * s;
        let topk = |v: &[f64], k: usize| {
            let mut i: Vec<usize> = (0..v.len()).collect();
            i.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap().then(a.cmp(&b)));
            i.truncate(k);
            i
        };
        let mut out = Vec::new();
        for t in 0..n {
            for c in 0..ch {
                let o1 = t * w + c * s;
                let o2 = t * w + (ch + c) * s;
                let (t1, t2) = (topk(&logits[o1..o1 + s], k), topk(&logits[o2..o2 + s], k));
                let mut cand = Vec::new();
                for &a in &t1 {
                    for &b in &t2 {
                        cand.push((logits[o1 + a] + logits[o2 + b], a, b));
                    }
                }
                let cv: Vec<f64> = cand.iter().map(|c| c.0).collect();
                for ci in topk(&cv, k) {
                    let (_, a, b) = cand[ci];
                    out.push((o1 + a, o2 + b, a * s + b));
                }
            }
        }
        out
    }

    fn ffn(&mut self, h: &M, pre: &str) -> M {
        let cfg = self.cfg;
        let (n, d) = *h.shape();
        match cfg.ffn {
            FfnKind::Mlp => {
                let a = self.matmul(h, &format!("{pre}.w1"));
                let g = self.gelu(&a);
                self.matmul(&g, &format!("{pre}.w2"))
            }
            FfnKind::Swiglu => self.swiglu_block(h, pre),
            FfnKind::Moe => {
                let e = cfg.experts;
                let logits = self.matmul(h, &format!("{pre}.gate"));
                let lv = logits.as_vec();
                let probs = logits.with_empty_tape().softmax::<Axis<1>>();
                let probs = self.keep_m(probs);
                let mut out: Option<M> = None;
                for ex in 0..e {
                    // Per-token weight: the softmax probability where ex is in the top-k, else 0.
                    let mut chosen = vec![0.0; n];
                    for (t, c) in chosen.iter_mut().enumerate() {
                        let row = &lv[t * e..(t + 1) * e];
                        let mut i: Vec<usize> = (0..e).collect();
                        i.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
                        if i[..cfg.topk].contains(&ex) {
                            *c = 1.0;
                        }
                    }
                    let w = probs
                        .with_empty_tape()
                        .slice((0..n, ex..ex + 1))
                        .reshape_like(&(n,));
                    let w = w * self.dev.tensor_from_vec(chosen, (n,));
                    let o = self.swiglu_block(h, &format!("{pre}.experts.{ex}"));
                    let y = o * w.broadcast_like::<_, Axis<1>>(&(n, d));
                    let y = self.keep_m(y);
                    out = Some(match out {
                        None => y,
                        Some(acc) => self.add(&acc, &y),
                    });
                }
                out.unwrap()
            }
            FfnKind::Sgatlin | FfnKind::SgatlinGelu | FfnKind::Peer => {
                let (s, ch, dk, k) = (cfg.sqrt_experts(), cfg.channels, cfg.d_key, cfg.topk);
                let logits = if cfg.ffn == FfnKind::Peer {
                    let q = self.matmul(h, &format!("{pre}.router.w_query"));
                    let keys = self.p(&format!("{pre}.router.keys"));
                    let keys = self.keep_m(keys);
                    let mut cols: Option<M> = None;
                    for pc in 0..2 * ch {
                        let qs = q.with_empty_tape().slice((0..n, pc * dk..(pc + 1) * dk));
                        let ks = keys.with_empty_tape().slice((pc * s..(pc + 1) * s, 0..dk));
                        let sim = qs.matmul(ks.permute::<(usize, usize), Axes2<1, 0>>())
                            * (1.0 / (2.0 * dk as f64).sqrt());
                        let sim = self.keep_m(sim);
                        cols = Some(match cols {
                            None => sim,
                            Some(acc) => {
                                let c = (acc, sim).concat_along(Axis::<1>);
                                self.keep_m(c)
                            }
                        });
                    }
                    cols.unwrap()
                } else {
                    let hk = self.matmul(h, &format!("{pre}.router.w_key"));
                    self.matmul(&hk, &format!("{pre}.router.w_sub"))
                };
                let sel = self.select(&logits.as_vec(), n);
                let m = sel.len();
                let flat = logits.with_empty_tape().reshape_like(&(n * 2 * ch * s,));
                let flat = self.keep_v(flat);
                let g1 = flat
                    .with_empty_tape()
                    .gather(self.idx(sel.iter().map(|x| x.0).collect()));
                let g2 = flat
                    .with_empty_tape()
                    .gather(self.idx(sel.iter().map(|x| x.1).collect()));
                let g = self.keep_v(g1 + g2);
                let n_pool = cfg.experts;
                let rows: Vec<usize> = sel
                    .iter()
                    .enumerate()
                    .map(|(j, x)| {
                        if cfg.ffn == FfnKind::Peer {
                            x.2
                        } else {
                            ((j / k) % ch) * n_pool + x.2
                        }
                    })
                    .collect();
                let flat_rows =
                    |len: usize, name: &str, me: &Self| me.p(name).reshape_like(&(len, d));
                let pool = if cfg.ffn == FfnKind::Peer {
                    n_pool
                } else {
                    ch * n_pool
                };
                let u = flat_rows(pool, &format!("{pre}.experts.u"), self)
                    .gather(self.idx(rows.clone()));
                let v = flat_rows(pool, &format!("{pre}.experts.v"), self).gather(self.idx(rows));
                let hrep = h
                    .with_empty_tape()
                    .gather(self.idx((0..m).map(|j| j / (ch * k)).collect()));
                let a = (u * hrep).sum::<(usize,), Axis<1>>();
                let coef = match cfg.ffn {
                    FfnKind::Sgatlin => g * a,
                    FfnKind::SgatlinGelu => (g * a).fast_gelu(),
                    _ => {
                        let w = g
                            .reshape_like(&(n * ch, k))
                            .softmax::<Axis<1>>()
                            .reshape_like(&(m,));
                        a.fast_gelu() * w
                    }
                };
                let y = v * coef.broadcast_like::<_, Axis<1>>(&(m, d));
                let y = y
                    .reshape_like(&(n, ch * k, d))
                    .sum::<(usize, usize), Axis<1>>();
                self.keep_m(y)
            }
        }
    }

    fn loss(&mut self, inputs: &[u32], targets: &[u32]) -> Tensor<(), f64, Cpu, Tp> {
        let cfg = self.cfg;
        let n = inputs.len();
        let batch = n / cfg.seq_len;
        let x = self
            .p("embed")
            .gather(self.idx(inputs.iter().map(|&t| t as usize).collect()));
        let mut x = self.keep_m(x);
        for l in 0..cfg.n_layers {
            let h = self.rmsnorm(&x, &format!("blocks.{l}.attn_norm.scale"));
            let a = self.attention(&h, l, batch);
            x = self.add(&x, &a);
            let h = self.rmsnorm(&x, &format!("blocks.{l}.ffn_norm.scale"));
            let f = self.ffn(&h, &format!("blocks.{l}.ffn"));
            x = self.add(&x, &f);
        }
        let hf = self.rmsnorm(&x, "final_norm.scale");
        let logits = hf
            .with_empty_tape()
            .matmul(self.p("embed").permute::<(usize, usize), Axes2<1, 0>>());
        let logp = logits.log_softmax::<Axis<1>>();
        let picked = logp.select(self.idx(targets.iter().map(|&t| t as usize).collect()));
        let loss = picked.mean::<(), _>() * -1.0;
        let sink = self.sink.take().expect("sink");
        loss + sink
    }
}

fn check_kind(cfg: &ModelConfig, seed: u64) {
    let mut model = Model::new(cfg, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0xD1D1);
    for info in model.table.infos.clone() {
        if !info.decay || info.name.ends_with(".b1") || info.name.ends_with(".b2") {
            for x in &mut model.params.host_mut().unwrap()[info.offset..info.offset + info.len] {
                *x += (0.2 * rng.normal()) as f32;
            }
        }
    }
    let n = 2 * cfg.seq_len;
    let inputs: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % cfg.vocab as u64) as u32)
        .collect();
    let targets: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % cfg.vocab as u64) as u32)
        .collect();
    let got = model.forward_backward(&inputs, &targets, None).unwrap();

    let dev = Cpu::default();
    let mut params = HashMap::new();
    for info in &model.table.infos {
        let vals: Vec<f64> = model.param_values()[info.offset..info.offset + info.len]
            .iter()
            .map(|&x| x as f64)
            .collect();
        let (r, c) = if info.shape.len() == 1 {
            (1, info.len)
        } else {
            (
                info.len / info.shape[info.shape.len() - 1],
                info.shape[info.shape.len() - 1],
            )
        };
        params.insert(info.name.clone(), dev.tensor_from_vec(vals, (r, c)));
    }
    let mut g = Graph {
        dev,
        cfg,
        params,
        sink: None,
    };
    let loss = g.loss(&inputs, &targets);
    let want = loss.array();
    let grads = loss.backward();
    let label = format!("{} seed {seed} (dfdx)", cfg.ffn.as_str());
    assert_matches_oracle(&label, &model, got.loss, want, &|info| {
        grads.get(&g.params[&info.name]).as_vec()
    });
}

fn tiny(ffn: FfnKind) -> ModelConfig {
    super::train::tests::tiny(ffn)
}

#[test]
fn dfdx_oracle_mlp() {
    check_kind(&tiny(FfnKind::Mlp), fresh_seed() ^ 11);
}

#[test]
fn dfdx_oracle_swiglu() {
    check_kind(&tiny(FfnKind::Swiglu), fresh_seed() ^ 12);
}

#[test]
fn dfdx_oracle_moe() {
    check_kind(&tiny(FfnKind::Moe), fresh_seed() ^ 13);
}

#[test]
fn dfdx_oracle_peer() {
    check_kind(&tiny(FfnKind::Peer), fresh_seed() ^ 14);
}

#[test]
fn dfdx_oracle_sgatlin() {
    check_kind(&tiny(FfnKind::Sgatlin), fresh_seed() ^ 15);
}

#[test]
fn dfdx_oracle_sgatlin_gelu() {
    check_kind(&tiny(FfnKind::SgatlinGelu), fresh_seed() ^ 16);
}

#[test]
fn dfdx_oracle_two_heads() {
    let cfg = ModelConfig {
        d_model: 128,
        n_layers: 1,
        seq_len: 6,
        ..tiny(FfnKind::Mlp)
    };
    check_kind(&cfg, fresh_seed() ^ 17);
}

/// dfdx 0.13 built without its `cpu` feature multiplies matrices wrongly (its fallback kernel
/// keeps only the last term of each dot product); guard the oracle against that build.
#[test]
fn dfdx_oracle_matmul_is_sound() {
    let dev = Cpu::default();
    let a: Tensor<(usize, usize), f64, Cpu> =
        dev.tensor_from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3));
    let b: Tensor<(usize, usize), f64, Cpu> =
        dev.tensor_from_vec(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (3, 2));
    assert_eq!(a.matmul(b).as_vec(), vec![22.0, 28.0, 49.0, 64.0]);
}
