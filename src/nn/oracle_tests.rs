//! Whole-model check: the loss and every parameter gradient of a tiny model of each
//! feedforward kind against an independent reverse-mode autograd (a scalar tape in f64, written
//! here from the spec, sharing no code with the model).

use super::config::{FfnKind, ModelConfig};
use super::model::Model;
use super::rng::{fresh_seed, Rng};
use super::tensor::ParamInfo;

type Var = usize;

/// A scalar tape: each node has a value and up to two parents with local derivatives.
struct Tape {
    val: Vec<f64>,
    par: Vec<[(Var, f64); 2]>,
}

const NONE: Var = usize::MAX;

impl Tape {
    fn leaf(&mut self, v: f64) -> Var {
        self.val.push(v);
        self.par.push([(NONE, 0.0), (NONE, 0.0)]);
        self.val.len() - 1
    }
    fn node(&mut self, v: f64, a: (Var, f64), b: (Var, f64)) -> Var {
        self.val.push(v);
        self.par.push([a, b]);
        self.val.len() - 1
    }
    fn v(&self, x: Var) -> f64 {
        self.val[x]
    }
    fn add(&mut self, a: Var, b: Var) -> Var {
        self.node(self.val[a] + self.val[b], (a, 1.0), (b, 1.0))
    }
    fn sub(&mut self, a: Var, b: Var) -> Var {
        self.node(self.val[a] - self.val[b], (a, 1.0), (b, -1.0))
    }
    fn mul(&mut self, a: Var, b: Var) -> Var {
        let (x, y) = (self.val[a], self.val[b]);
        self.node(x * y, (a, y), (b, x))
    }
    fn scale(&mut self, a: Var, c: f64) -> Var {
        self.node(self.val[a] * c, (a, c), (NONE, 0.0))
    }
    fn add_const(&mut self, a: Var, c: f64) -> Var {
        self.node(self.val[a] + c, (a, 1.0), (NONE, 0.0))
    }
    fn exp(&mut self, a: Var) -> Var {
        let e = self.val[a].exp();
        self.node(e, (a, e), (NONE, 0.0))
    }
    fn ln(&mut self, a: Var) -> Var {
        let x = self.val[a];
        self.node(x.ln(), (a, 1.0 / x), (NONE, 0.0))
    }
    fn recip(&mut self, a: Var) -> Var {
        let x = self.val[a];
        self.node(1.0 / x, (a, -1.0 / (x * x)), (NONE, 0.0))
    }
    fn rsqrt(&mut self, a: Var) -> Var {
        let x = self.val[a];
        self.node(1.0 / x.sqrt(), (a, -0.5 * x.powf(-1.5)), (NONE, 0.0))
    }
    fn tanh(&mut self, a: Var) -> Var {
        let t = self.val[a].tanh();
        self.node(t, (a, 1.0 - t * t), (NONE, 0.0))
    }
    fn clamp(&mut self, a: Var, lo: f64, hi: f64) -> Var {
        let x = self.val[a];
        let inside = x > lo && x < hi;
        self.node(
            x.clamp(lo, hi),
            (a, if inside { 1.0 } else { 0.0 }),
            (NONE, 0.0),
        )
    }
    fn sum(&mut self, xs: &[Var]) -> Var {
        let mut acc = xs[0];
        for &x in &xs[1..] {
            acc = self.add(acc, x);
        }
        acc
    }
    fn dot(&mut self, a: &[Var], b: &[Var]) -> Var {
        let prods: Vec<Var> = a.iter().zip(b).map(|(&x, &y)| self.mul(x, y)).collect();
        self.sum(&prods)
    }
    /// x[in] · W[in, out] where W's elements are the vars w0 + i * out + j.
    fn matvec(&mut self, x: &[Var], w0: Var, out: usize) -> Vec<Var> {
        (0..out)
            .map(|j| {
                let col: Vec<Var> = (0..x.len()).map(|i| w0 + i * out + j).collect();
                self.dot(x, &col)
            })
            .collect()
    }
    fn add_vec(&mut self, a: &[Var], b: &[Var]) -> Vec<Var> {
        a.iter().zip(b).map(|(&x, &y)| self.add(x, y)).collect()
    }
    fn sigmoid(&mut self, a: Var) -> Var {
        let n = self.scale(a, -1.0);
        let e = self.exp(n);
        let d = self.add_const(e, 1.0);
        self.recip(d)
    }
    fn gelu(&mut self, x: Var) -> Var {
        let x3 = {
            let x2 = self.mul(x, x);
            self.mul(x2, x)
        };
        let c = self.scale(x3, 0.044715);
        let inner = self.add(x, c);
        let inner = self.scale(inner, (2.0 / std::f64::consts::PI).sqrt());
        let t = self.tanh(inner);
        let one_t = self.add_const(t, 1.0);
        let half_x = self.scale(x, 0.5);
        self.mul(half_x, one_t)
    }
    fn rmsnorm(&mut self, x: &[Var], scale0: Var) -> Vec<Var> {
        let sq: Vec<Var> = x.iter().map(|&v| self.mul(v, v)).collect();
        let s = self.sum(&sq);
        let ms = self.scale(s, 1.0 / x.len() as f64);
        let ms = self.add_const(ms, 1e-6);
        let r = self.rsqrt(ms);
        (0..x.len())
            .map(|i| {
                let y = self.mul(x[i], r);
                self.mul(y, scale0 + i)
            })
            .collect()
    }
    /// Softmax with the max subtracted as a constant.
    fn softmax(&mut self, xs: &[Var]) -> Vec<Var> {
        let m = xs
            .iter()
            .map(|&x| self.val[x])
            .fold(f64::NEG_INFINITY, f64::max);
        let es: Vec<Var> = xs
            .iter()
            .map(|&x| {
                let s = self.add_const(x, -m);
                self.exp(s)
            })
            .collect();
        let total = self.sum(&es);
        let inv = self.recip(total);
        es.iter().map(|&e| self.mul(e, inv)).collect()
    }
    fn backward(&self, out: Var) -> Vec<f64> {
        let mut g = vec![0.0; self.val.len()];
        g[out] = 1.0;
        for i in (0..=out).rev() {
            if g[i] == 0.0 {
                continue;
            }
            for &(p, d) in &self.par[i] {
                if p != NONE {
                    g[p] += g[i] * d;
                }
            }
        }
        g
    }
}

/// Indices of the k largest values, ties to the lower index (as jax.lax.top_k).
fn topk(vals: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..vals.len()).collect();
    idx.sort_by(|&a, &b| vals[b].partial_cmp(&vals[a]).unwrap().then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

struct Oracle<'a> {
    tp: Tape,
    cfg: &'a ModelConfig,
    model: &'a Model,
}

impl Oracle<'_> {
    fn p(&self, name: &str) -> Var {
        self.model
            .table
            .find(name)
            .unwrap_or_else(|| panic!("no tensor {name}"))
            .offset
    }

    fn swiglu_expert(&mut self, h: &[Var], pre: &str) -> Vec<Var> {
        let (d, f) = (self.cfg.d_model, self.cfg.d_ffw);
        let (w1, b1, w2, b2) = (
            self.p(&format!("{pre}.w1")),
            self.p(&format!("{pre}.b1")),
            self.p(&format!("{pre}.w2")),
            self.p(&format!("{pre}.b2")),
        );
        let tp = &mut self.tp;
        let z = tp.matvec(h, w1, 2 * f);
        let z: Vec<Var> = z
            .iter()
            .enumerate()
            .map(|(i, &x)| tp.add(x, b1 + i))
            .collect();
        let y: Vec<Var> = (0..f)
            .map(|i| {
                let g = tp.clamp(z[i], f64::NEG_INFINITY, 7.0);
                let l = tp.clamp(z[f + i], -7.0, 7.0);
                let ag = tp.scale(g, 1.702);
                let s = tp.sigmoid(ag);
                let glu = tp.mul(g, s);
                let l1 = tp.add_const(l, 1.0);
                tp.mul(glu, l1)
            })
            .collect();
        let o = tp.matvec(&y, w2, d);
        o.iter()
            .enumerate()
            .map(|(i, &x)| tp.add(x, b2 + i))
            .collect()
    }

    /// Product-key selection: per channel, (score var, expert index) of the final top-k.
    fn product_key(&mut self, logits: &[Var], c: usize) -> Vec<(Var, usize)> {
        let (s, k, ch) = (self.cfg.sqrt_experts(), self.cfg.topk, self.cfg.channels);
        let h1: Vec<Var> = logits[c * s..(c + 1) * s].to_vec();
        let h2: Vec<Var> = logits[(ch + c) * s..(ch + c + 1) * s].to_vec();
        let v1: Vec<f64> = h1.iter().map(|&x| self.tp.v(x)).collect();
        let v2: Vec<f64> = h2.iter().map(|&x| self.tp.v(x)).collect();
        let (t1, t2) = (topk(&v1, k), topk(&v2, k));
        let mut cand = Vec::new();
        for &a in &t1 {
            for &b in &t2 {
                cand.push((v1[a] + v2[b], a, b));
            }
        }
        let cv: Vec<f64> = cand.iter().map(|c| c.0).collect();
        topk(&cv, k)
            .into_iter()
            .map(|ci| {
                let (_, a, b) = cand[ci];
                (self.tp.add(h1[a], h2[b]), a * s + b)
            })
            .collect()
    }

    fn ffn(&mut self, h: &[Var], pre: &str) -> Vec<Var> {
        let cfg = self.cfg;
        let d = cfg.d_model;
        match cfg.ffn {
            FfnKind::Mlp => {
                let (w1, w2) = (self.p(&format!("{pre}.w1")), self.p(&format!("{pre}.w2")));
                let a = self.tp.matvec(h, w1, cfg.d_ffw);
                let g: Vec<Var> = a.iter().map(|&x| self.tp.gelu(x)).collect();
                self.tp.matvec(&g, w2, d)
            }
            FfnKind::Swiglu => self.swiglu_expert(h, pre),
            FfnKind::Moe => {
                let wg = self.p(&format!("{pre}.gate"));
                let logits = self.tp.matvec(h, wg, cfg.experts);
                let lv: Vec<f64> = logits.iter().map(|&x| self.tp.v(x)).collect();
                let probs = self.tp.softmax(&logits);
                let mut out: Option<Vec<Var>> = None;
                for e in topk(&lv, cfg.topk) {
                    let o = self.swiglu_expert(h, &format!("{pre}.experts.{e}"));
                    let w: Vec<Var> = o.iter().map(|&x| self.tp.mul(x, probs[e])).collect();
                    out = Some(match out {
                        None => w,
                        Some(acc) => self.tp.add_vec(&acc, &w),
                    });
                }
                out.unwrap()
            }
            FfnKind::Sgatlin | FfnKind::SgatlinGelu => {
                let (s, ch, dk, n) = (cfg.sqrt_experts(), cfg.channels, cfg.d_key, cfg.experts);
                let (wk, ws) = (
                    self.p(&format!("{pre}.router.w_key")),
                    self.p(&format!("{pre}.router.w_sub")),
                );
                let (u, v) = (
                    self.p(&format!("{pre}.experts.u")),
                    self.p(&format!("{pre}.experts.v")),
                );
                let hk = self.tp.matvec(h, wk, dk);
                let logits = self.tp.matvec(&hk, ws, 2 * ch * s);
                let mut y: Vec<Var> = Vec::new();
                for c in 0..ch {
                    for (g, idx) in self.product_key(&logits, c) {
                        let row = c * n + idx;
                        let urow: Vec<Var> = (0..d).map(|i| u + row * d + i).collect();
                        let a = self.tp.dot(&urow, h);
                        let mut z = self.tp.mul(g, a);
                        if cfg.ffn == FfnKind::SgatlinGelu {
                            z = self.tp.gelu(z);
                        }
                        let contrib: Vec<Var> =
                            (0..d).map(|i| self.tp.mul(z, v + row * d + i)).collect();
                        y = if y.is_empty() {
                            contrib
                        } else {
                            self.tp.add_vec(&y, &contrib)
                        };
                    }
                }
                y
            }
            FfnKind::Peer => {
                let (s, ch, dk) = (cfg.sqrt_experts(), cfg.channels, cfg.d_key);
                let (wq, keys) = (
                    self.p(&format!("{pre}.router.w_query")),
                    self.p(&format!("{pre}.router.keys")),
                );
                let (u, v) = (
                    self.p(&format!("{pre}.experts.u")),
                    self.p(&format!("{pre}.experts.v")),
                );
                let q = self.tp.matvec(h, wq, 2 * ch * dk);
                let scale = 1.0 / (2.0 * dk as f64).sqrt();
                let mut logits = Vec::new();
                for pc in 0..2 * ch {
                    for j in 0..s {
                        let key: Vec<Var> = (0..dk).map(|i| keys + (pc * s + j) * dk + i).collect();
                        let sim = self.tp.dot(&q[pc * dk..(pc + 1) * dk], &key);
                        logits.push(self.tp.scale(sim, scale));
                    }
                }
                let mut y: Vec<Var> = Vec::new();
                for c in 0..ch {
                    let sel = self.product_key(&logits, c);
                    let scores: Vec<Var> = sel.iter().map(|x| x.0).collect();
                    let w = self.tp.softmax(&scores);
                    for (i, &(_, idx)) in sel.iter().enumerate() {
                        let urow: Vec<Var> = (0..d).map(|j| u + idx * d + j).collect();
                        let a = self.tp.dot(&urow, h);
                        let ga = self.tp.gelu(a);
                        let z = self.tp.mul(ga, w[i]);
                        let contrib: Vec<Var> =
                            (0..d).map(|j| self.tp.mul(z, v + idx * d + j)).collect();
                        y = if y.is_empty() {
                            contrib
                        } else {
                            self.tp.add_vec(&y, &contrib)
                        };
                    }
                }
                y
            }
        }
    }

    fn rope(&mut self, x: &[Var], pos: usize) -> Vec<Var> {
        let hd = x.len();
        let half = hd / 2;
        let mut out = x.to_vec();
        for i in 0..half {
            let ang = pos as f64 * 10000f64.powf(-(2.0 * i as f64) / hd as f64);
            let (c, s) = (ang.cos(), ang.sin());
            let a = self.tp.scale(x[i], c);
            let b = self.tp.scale(x[i + half], -s);
            out[i] = self.tp.add(a, b);
            let a = self.tp.scale(x[i], s);
            let b = self.tp.scale(x[i + half], c);
            out[i + half] = self.tp.add(a, b);
        }
        out
    }

    fn loss(&mut self, inputs: &[u32], targets: &[u32]) -> Var {
        let cfg = self.cfg;
        let (d, tn, hn, hd) = (cfg.d_model, cfg.seq_len, cfg.n_heads(), cfg.head_dim());
        let n = inputs.len();
        let emb = self.p("embed");
        let mut x: Vec<Vec<Var>> = inputs
            .iter()
            .map(|&t| (0..d).map(|i| emb + t as usize * d + i).collect())
            .collect();
        for l in 0..cfg.n_layers {
            let pre = format!("blocks.{l}");
            let q = |o: &Self, s: &str| o.p(&format!("{pre}.{s}"));
            let (ln1, wq, wk, wv, wo, qn, kn, ln2) = (
                q(self, "attn_norm.scale"),
                q(self, "attn.wq"),
                q(self, "attn.wk"),
                q(self, "attn.wv"),
                q(self, "attn.wo"),
                q(self, "attn.q_norm.scale"),
                q(self, "attn.k_norm.scale"),
                q(self, "ffn_norm.scale"),
            );
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (t, xt) in x.iter().enumerate() {
                let h = self.tp.rmsnorm(xt, ln1);
                let (qq, kk, vv) = (
                    self.tp.matvec(&h, wq, d),
                    self.tp.matvec(&h, wk, d),
                    self.tp.matvec(&h, wv, d),
                );
                let mut qr = Vec::new();
                let mut kr = Vec::new();
                for hh in 0..hn {
                    let qh = self.tp.rmsnorm(&qq[hh * hd..(hh + 1) * hd], qn);
                    let kh = self.tp.rmsnorm(&kk[hh * hd..(hh + 1) * hd], kn);
                    qr.extend(self.rope(&qh, t % tn));
                    kr.extend(self.rope(&kh, t % tn));
                }
                qs.push(qr);
                ks.push(kr);
                vs.push(vv);
            }
            for t in 0..n {
                let b0 = (t / tn) * tn;
                let mut o = Vec::new();
                for hh in 0..hn {
                    let r = hh * hd..(hh + 1) * hd;
                    let sc: Vec<Var> = (b0..=t)
                        .map(|u| {
                            let s = self.tp.dot(&qs[t][r.clone()], &ks[u][r.clone()]);
                            self.tp.scale(s, 1.0 / (hd as f64).sqrt())
                        })
                        .collect();
                    let a = self.tp.softmax(&sc);
                    for j in r.clone() {
                        let terms: Vec<Var> =
                            (b0..=t).map(|u| self.tp.mul(a[u - b0], vs[u][j])).collect();
                        o.push(self.tp.sum(&terms));
                    }
                }
                let proj = self.tp.matvec(&o, wo, d);
                x[t] = self.tp.add_vec(&x[t], &proj);
            }
            for xt in x.iter_mut() {
                let h = self.tp.rmsnorm(xt, ln2);
                let f = self.ffn(&h, &format!("{pre}.ffn"));
                *xt = self.tp.add_vec(xt, &f);
            }
        }
        let fnorm = self.p("final_norm.scale");
        let mut losses = Vec::new();
        for t in 0..n {
            let h = self.tp.rmsnorm(&x[t], fnorm);
            let logits: Vec<Var> = (0..cfg.vocab)
                .map(|v| (0..d).map(|i| emb + v * d + i).collect::<Vec<_>>())
                .map(|row| self.tp.dot(&h, &row))
                .collect();
            let m = logits
                .iter()
                .map(|&z| self.tp.v(z))
                .fold(f64::NEG_INFINITY, f64::max);
            let es: Vec<Var> = logits
                .iter()
                .map(|&z| {
                    let s = self.tp.add_const(z, -m);
                    self.tp.exp(s)
                })
                .collect();
            let s = self.tp.sum(&es);
            let lse = self.tp.ln(s);
            let lse = self.tp.add_const(lse, m);
            losses.push(self.tp.sub(lse, logits[targets[t] as usize]));
        }
        let total = self.tp.sum(&losses);
        self.tp.scale(total, 1.0 / n as f64)
    }
}

fn check_kind(cfg: &ModelConfig, seed: u64) {
    let mut model = Model::new(cfg, seed).unwrap();
    // Give the norm scales and biases non-trivial values so their gradients are exercised.
    let mut rng = Rng::new(seed ^ 0xABCD);
    for info in model.table.infos.clone() {
        if !info.decay || info.name.ends_with(".b1") || info.name.ends_with(".b2") {
            for x in &mut model.params.host_mut().unwrap()[info.offset..info.offset + info.len] {
                *x += (0.2 * rng.normal()) as f32;
            }
        }
    }
    let batch = 2;
    let n = batch * cfg.seq_len;
    let inputs: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % cfg.vocab as u64) as u32)
        .collect();
    let targets: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % cfg.vocab as u64) as u32)
        .collect();
    let got = model.forward_backward(&inputs, &targets, None).unwrap();

    let mut tp = Tape {
        val: Vec::new(),
        par: Vec::new(),
    };
    for &p in model.param_values().iter() {
        tp.leaf(p as f64);
    }
    let mut o = Oracle {
        tp,
        cfg,
        model: &model,
    };
    let loss = o.loss(&inputs, &targets);
    let want = o.tp.v(loss);
    let grads = o.tp.backward(loss);
    let label = format!("{} seed {seed}", cfg.ffn.as_str());
    assert_matches_oracle(&label, &model, got.loss, want, &|info| {
        grads[info.offset..info.offset + info.len].to_vec()
    });
}

/// Our loss and every parameter gradient against an oracle's: the loss within 1e-4 relative,
/// each gradient tensor within 1e-4 of the oracle's norm. `label` names the kind and the seed,
/// so a failure can be replayed.
pub(crate) fn assert_matches_oracle(
    label: &str,
    model: &Model,
    loss: f64,
    oracle_loss: f64,
    oracle_grad: &dyn Fn(&ParamInfo) -> Vec<f64>,
) {
    assert!(
        (loss - oracle_loss).abs() <= 1e-4 * oracle_loss.abs(),
        "{label}: loss {loss} vs oracle {oracle_loss}"
    );
    for info in &model.table.infos {
        let want = oracle_grad(info);
        let grads = model.grad_values();
        let ours = &grads[info.offset..info.offset + info.len];
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for (a, b) in ours.iter().zip(&want) {
            diff += (*a as f64 - b).powi(2);
            norm += b * b;
        }
        let (diff, norm) = (diff.sqrt(), norm.sqrt());
        assert!(
            diff <= 1e-4 * norm + 1e-7,
            "{label}: gradient of {} differs: |diff| {diff:e}, |oracle| {norm:e}",
            info.name
        );
    }
}

fn tiny(ffn: FfnKind) -> ModelConfig {
    super::train::tests::tiny(ffn)
}

#[test]
fn mlp_model_matches_the_autograd_oracle() {
    check_kind(&tiny(FfnKind::Mlp), fresh_seed() ^ 1);
}

#[test]
fn swiglu_model_matches_the_autograd_oracle() {
    check_kind(&tiny(FfnKind::Swiglu), fresh_seed() ^ 2);
}

#[test]
fn moe_model_matches_the_autograd_oracle() {
    check_kind(&tiny(FfnKind::Moe), fresh_seed() ^ 3);
}

#[test]
fn peer_model_matches_the_autograd_oracle() {
    check_kind(&tiny(FfnKind::Peer), fresh_seed() ^ 4);
}

#[test]
fn sgatlin_model_matches_the_autograd_oracle() {
    check_kind(&tiny(FfnKind::Sgatlin), fresh_seed() ^ 5);
}

#[test]
fn sgatlin_gelu_model_matches_the_autograd_oracle() {
    check_kind(&tiny(FfnKind::SgatlinGelu), fresh_seed() ^ 6);
}

#[test]
fn multi_head_model_matches_the_autograd_oracle() {
    // d_model 128: two heads of 64.
    let cfg = ModelConfig {
        d_model: 128,
        n_layers: 1,
        seq_len: 6,
        ..tiny(FfnKind::Sgatlin)
    };
    check_kind(&cfg, fresh_seed() ^ 8);
}
