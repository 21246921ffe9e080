//! `repro bench kernels`: each CPU kernel on every instruction set this CPU supports, at the
//! shapes of a ladder model's training step, timed in alternating rounds in one process so
//! that the ratios between paths are side by side. `--device cuda-emu` and `--device cuda`
//! measure the product-key layer on the CUDA backend instead (traffic.rs).

use super::train::StepShape;
use crate::nn::backend::{AdamWStep, AttnShape, ExpertMode, ExpertShape};
use crate::nn::cpu::{activations, adamw, attention, experts, matmul, rmsnorm, xent, Isa};
use crate::nn::rng::Rng;
use crate::nn::{FfnKind, ModelConfig};
use anyhow::Result;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct KernelsArgs {
    /// Ladder scale whose shapes are measured (SPEC §6).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    #[command(flatten)]
    pub shape: StepShape,
    /// Rounds; each round times every path once, in turn (--device cuda: timed runs of each op).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Only kernels whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
    #[command(flatten)]
    pub device: super::traffic::DeviceArgs,
}

/// A kernel with its inputs allocated, ready to run again and again.
struct Case {
    name: String,
    run: Box<dyn FnMut()>,
}

fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

fn cases(a: &KernelsArgs) -> Vec<Case> {
    let cfg = ModelConfig::ladder(FfnKind::Mlp, a.scale, a.shape.vocab, a.shape.seq_len);
    let (t, d, f, v) = (
        a.shape.batch * a.shape.seq_len,
        cfg.d_model,
        cfg.d_ffw,
        a.shape.vocab,
    );
    let mut rng = Rng::new(1);
    let mut out = Vec::new();
    let mut add = |name: String, run: Box<dyn FnMut()>| out.push(Case { name, run });

    // Matmuls of a step: the unembedding (forward and both gradients) and the feedforward.
    for (m, n, k, a_t, b_t, what) in [
        (t, v, d, false, true, "unembed fwd"),
        (t, d, v, false, false, "unembed dx"),
        (v, d, t, true, false, "unembed dW"),
        (t, f, d, false, false, "ffn up fwd"),
        (t, d, f, false, false, "ffn down fwd"),
        (d, f, t, true, false, "ffn up dW"),
    ] {
        let (x, w) = (randn(&mut rng, m * k, 1.0), randn(&mut rng, k * n, 1.0));
        let mut c = vec![0.0f32; m * n];
        add(
            format!("matmul {what} {m}x{n}x{k}"),
            Box::new(move || matmul::matmul(m, n, k, &x, a_t, &w, b_t, &mut c, false)),
        );
    }
    let x = randn(&mut rng, t * f, 1.0);
    let mut y = vec![0.0f32; t * f];
    let dy = randn(&mut rng, t * f, 1.0);
    {
        let (x, mut y) = (x.clone(), y.clone());
        add(
            format!("gelu fwd {t}x{f}"),
            Box::new(move || activations::gelu_forward(&x, &mut y)),
        );
    }
    add(
        format!("gelu bwd {t}x{f}"),
        Box::new(move || activations::gelu_backward(&x, &dy, &mut y)),
    );
    let logits = randn(&mut rng, t * v, 2.0);
    let targets: Vec<u32> = (0..t).map(|i| (i * 7919 % v) as u32).collect();
    let mut work = logits.clone();
    add(
        format!("softmax_xent {t}x{v}"),
        Box::new(move || {
            work.copy_from_slice(&logits);
            xent::softmax_xent(&mut work, &targets, v, None, true);
        }),
    );
    let s = AttnShape {
        batch: a.shape.batch,
        seq: a.shape.seq_len,
        heads: cfg.n_heads(),
        head_dim: cfg.head_dim(),
    };
    let (q, k, vv) = (
        randn(&mut rng, t * d, 1.0),
        randn(&mut rng, t * d, 1.0),
        randn(&mut rng, t * d, 1.0),
    );
    let mut att = vec![0.0f32; a.shape.batch * s.heads * a.shape.seq_len * a.shape.seq_len];
    let mut o = vec![0.0f32; t * d];
    attention::attention_forward(&s, &q, &k, &vv, &mut o, &mut att);
    {
        let (q, k, vv, mut att, mut o) = (q.clone(), k.clone(), vv.clone(), att.clone(), o.clone());
        add(
            format!(
                "attention fwd {}x{}x{}",
                a.shape.batch * s.heads,
                a.shape.seq_len,
                s.head_dim
            ),
            Box::new(move || attention::attention_forward(&s, &q, &k, &vv, &mut o, &mut att)),
        );
    }
    let s = AttnShape {
        batch: a.shape.batch,
        seq: a.shape.seq_len,
        heads: cfg.n_heads(),
        head_dim: cfg.head_dim(),
    };
    let dout = randn(&mut rng, t * d, 1.0);
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; t * d],
        vec![0.0f32; t * d],
        vec![0.0f32; t * d],
    );
    add(
        format!(
            "attention bwd {}x{}x{}",
            a.shape.batch * s.heads,
            a.shape.seq_len,
            s.head_dim
        ),
        Box::new(move || {
            attention::attention_backward(&s, &q, &k, &vv, &att, &dout, &mut dq, &mut dk, &mut dv)
        }),
    );
    let (x, scale) = (randn(&mut rng, t * d, 1.0), randn(&mut rng, d, 1.0));
    let (mut y, mut rstd) = (vec![0.0f32; t * d], vec![0.0f32; t]);
    rmsnorm::rmsnorm_forward(&x, &scale, d, &mut y, &mut rstd);
    {
        let (x, scale, mut y, mut rstd) = (x.clone(), scale.clone(), y.clone(), rstd.clone());
        add(
            format!("rmsnorm fwd {t}x{d}"),
            Box::new(move || rmsnorm::rmsnorm_forward(&x, &scale, d, &mut y, &mut rstd)),
        );
    }
    let dy = randn(&mut rng, t * d, 1.0);
    let (mut dx, mut dscale) = (vec![0.0f32; t * d], vec![0.0f32; d]);
    add(
        format!("rmsnorm bwd {t}x{d}"),
        Box::new(move || {
            rmsnorm::rmsnorm_backward(&x, &scale, &rstd, &dy, d, &mut dx, &mut dscale)
        }),
    );
    let params = cfg.total_params();
    let (mut p, g) = (randn(&mut rng, params, 0.1), randn(&mut rng, params, 0.1));
    let (mut m1, mut m2) = (vec![0.0f32; params], vec![0.0f32; params]);
    let step = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        t: 1,
        grad_scale: 1.0,
    };
    add(
        format!("adamw {params}"),
        Box::new(move || adamw::adamw_update(&mut p, &g, &mut m1, &mut m2, &step)),
    );

    // The sgatlin experts at this scale: gather, dot, scale, scatter.
    let sg = ModelConfig::ladder(FfnKind::Sgatlin, a.scale, a.shape.vocab, a.shape.seq_len);
    let shape = ExpertShape {
        d,
        channels: sg.channels,
        k: sg.topk,
        channel_stride: sg.experts,
        pool_rows: sg.channels * sg.experts,
    };
    let slots = t * sg.channels * sg.topk;
    let x = randn(&mut rng, t * d, 1.0);
    let scores = randn(&mut rng, slots, 1.0);
    let indices: Vec<u32> = (0..slots)
        .map(|_| (rng.next_u64() % sg.experts as u64) as u32)
        .collect();
    let (u, w) = (
        randn(&mut rng, shape.pool_rows * d, 0.1),
        randn(&mut rng, shape.pool_rows * d, 0.1),
    );
    let (mut sa, mut coef, mut sw, mut y) = (
        vec![0.0f32; slots],
        vec![0.0f32; slots],
        vec![0.0f32; slots],
        vec![0.0f32; t * d],
    );
    add(
        format!("experts fwd {t}x{}x{}x{d}", sg.channels, sg.topk),
        Box::new(move || {
            experts::experts_forward(
                shape,
                ExpertMode::GatedLinear,
                &x,
                &scores,
                &indices,
                &u,
                &w,
                &mut sa,
                &mut coef,
                &mut sw,
                &mut y,
            )
        }),
    );
    out
}

pub fn run(a: &KernelsArgs) -> Result<()> {
    match a.device.device.as_str() {
        "cpu" => {}
        "cuda-emu" => {
            return super::traffic::report_emulated(&a.device).map_err(anyhow::Error::msg)
        }
        "cuda" => {
            return super::traffic::report_gpu(&a.device, a.rounds).map_err(anyhow::Error::msg)
        }
        d => anyhow::bail!("bench kernels: unknown device `{d}` (cpu, cuda-emu or cuda)"),
    }
    let paths: Vec<Isa> = Isa::supported_all()
        .into_iter()
        .filter(|&p| p <= Isa::process())
        .collect();
    let mut cases = cases(a);
    cases.retain(|c| a.only.as_ref().is_none_or(|o| c.name.contains(o.as_str())));
    println!(
        "repro bench kernels: scale {}, batch {}x{}, vocab {}, {} rounds, {} threads; paths: {}",
        a.scale,
        a.shape.batch,
        a.shape.seq_len,
        a.shape.vocab,
        a.rounds,
        rayon::current_num_threads(),
        paths
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    print!("{:<42}", "kernel (median ms)");
    for p in &paths {
        print!(" {:>9}", p.name());
    }
    println!("  {:>8}", "best/avx2");
    for case in &mut cases {
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        for &p in &paths {
            p.scoped(|| (case.run)()); // warm-up: pages touched, code loaded
        }
        for _ in 0..a.rounds.max(1) {
            for (i, &p) in paths.iter().enumerate() {
                let t0 = Instant::now();
                p.scoped(|| (case.run)());
                times[i].push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        let med: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        print!("{:<42}", case.name);
        for m in &med {
            print!(" {m:>9.3}");
        }
        let avx2 = paths.iter().position(|&p| p == Isa::Avx2);
        match avx2 {
            Some(i) => println!("  {:>7.2}x", med[i] / med[med.len() - 1]),
            None => println!(),
        }
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
