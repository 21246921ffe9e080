//! `repro bench kernels --device cuda-emu|cuda`: the product-key layer (sgatlin, PEER) at ladder
//! shapes on the CUDA backend, driven only through the `Backend` ops in the order
//! nn/ffn/slots.rs calls them (top-k forward, experts forward; experts backward, top-k
//! backward), so whatever kernels those ops launch appear here by themselves.
//! * cuda-emu: each op's global-memory traffic as the emulator counts it, per kernel, against
//!   the floor of `floor.rs`, with the time both would take at the peak bandwidth.
//! * cuda: each op timed (median of synchronized repetitions), the GB/s its floor bytes mean
//!   at that time, and bench/pk_reference.py (the same layer in ordinary PyTorch) beside it.

use super::floor::{floor, seconds, Floor, FloorBytes, FloorShape, PassFloor};
use super::script::Script;
use crate::nn::backend::{
    zero, Backend, Bf16, Buf, ExpertMode, ExpertShape, ExpertsGrads, ExpertsSaved, ExpertsSavedRef,
    Pool, ProductKeyShape, Storage,
};
use crate::nn::rng::Rng;
use crate::nn::{FfnKind, ModelConfig};
use std::collections::BTreeSet;
use std::sync::Arc;

/// One product-key layer of the ladder.
#[derive(Clone, Copy, Debug)]
pub struct LayerCase {
    pub kind: FfnKind,
    pub scale: f64,
    pub router: ProductKeyShape,
    pub experts: ExpertShape,
    pub mode: ExpertMode,
    /// How the expert kernels read the pools (`with.expert_storage`).
    pub storage: Storage,
}

impl LayerCase {
    /// The shapes of ModelConfig::ladder (as nn/ffn/sgatlin.rs and peer.rs build them).
    pub fn ladder(kind: FfnKind, scale: f64) -> Result<LayerCase, String> {
        let cfg = ModelConfig::ladder(kind, scale, 256, 64);
        let (c, n) = (cfg.channels, cfg.experts);
        let (channel_stride, pool_rows, mode) = match kind {
            FfnKind::Sgatlin => (n, c * n, ExpertMode::GatedLinear),
            FfnKind::SgatlinGelu => (n, c * n, ExpertMode::GatedGelu),
            FfnKind::Peer => (0, n, ExpertMode::PeerSoftmaxGelu),
            _ => {
                return Err(format!(
                    "{}: not a product-key layer (sgatlin, sgatlin-gelu, peer)",
                    kind.as_str()
                ))
            }
        };
        Ok(LayerCase {
            kind,
            scale,
            router: ProductKeyShape {
                channels: c,
                sqrt_n: cfg.sqrt_experts(),
                k: cfg.topk,
            },
            experts: ExpertShape {
                d: cfg.d_model,
                channels: c,
                k: cfg.topk,
                channel_stride,
                pool_rows,
            },
            mode,
            storage: Storage::F32,
        })
    }

    pub fn label(&self) -> String {
        format!("{} s={}", self.kind.as_str(), self.scale)
    }

    /// Bytes of a pool element.
    fn pool_bytes(&self) -> u64 {
        match self.storage {
            Storage::F32 => 4,
            Storage::Bf16 => 2,
        }
    }

    /// The floor at `tokens` with `rows_touched` pool rows used: repro's layer (f32
    /// activations) with its pools in `storage`.
    pub fn floor(&self, tokens: usize, rows_touched: u64) -> Floor {
        let e = self.experts;
        floor(
            &FloorShape {
                tokens: tokens as u64,
                channels: e.channels as u64,
                k: e.k as u64,
                d: e.d as u64,
                rows_touched,
                logits_per_token: self.router.logits_per_token() as u64,
            },
            &FloorBytes::repro(self.pool_bytes()),
        )
    }

    /// The floor of a whole step (65,536 tokens, every row touched), in ms at `gbs` GB/s:
    /// repro's layer and KERNELS.md's bf16 one.
    fn full_step(&self, gbs: f64) -> String {
        let tokens = 65536;
        let ours = self.floor(tokens, self.experts.pool_rows as u64);
        let e = self.experts;
        let bf16 = floor(
            &FloorShape {
                tokens: tokens as u64,
                channels: e.channels as u64,
                k: e.k as u64,
                d: e.d as u64,
                rows_touched: e.pool_rows as u64,
                logits_per_token: 0,
            },
            &FloorBytes::kernels_md(2),
        );
        let ms = |b: u64| seconds(b, gbs) * 1e3;
        format!(
            "full step floor ({tokens} tokens): layer, {} pools, fwd {:.2} ms, bwd {:.2} ms; \
             experts bf16 (KERNELS.md) fwd {:.2} ms, bwd {:.2} ms",
            storage_name(self.storage),
            ms(ours.fwd.layer()),
            ms(ours.bwd.layer()),
            ms(bf16.fwd.total()),
            ms(bf16.bwd.total())
        )
    }

    fn describe(&self, tokens: usize) -> String {
        let (e, r) = (self.experts, self.router);
        format!(
            "{}: d {}, C {}, k {}, sqrt_N {}, {} pool rows{}, {tokens} tokens, f32 activations, {} pools",
            self.label(),
            e.d,
            e.channels,
            e.k,
            r.sqrt_n,
            e.pool_rows,
            if e.channel_stride == 0 {
                " (one shared pool)"
            } else {
                ""
            },
            storage_name(self.storage),
        )
    }
}

/// The four ops of a layer's step, in the order slots.rs calls them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    TopkForward,
    ExpertsForward,
    ExpertsBackward,
    TopkBackward,
}

impl Op {
    pub const ALL: [Op; 4] = [
        Op::TopkForward,
        Op::ExpertsForward,
        Op::ExpertsBackward,
        Op::TopkBackward,
    ];
    pub fn pass(self) -> &'static str {
        match self {
            Op::TopkForward | Op::ExpertsForward => "fwd",
            _ => "bwd",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Op::TopkForward | Op::TopkBackward => "topk",
            _ => "experts",
        }
    }
    /// Its floor: the router's part or the experts' streaming total of its pass.
    pub fn floor(self, f: &Floor) -> u64 {
        match self {
            Op::TopkForward => f.fwd.router,
            Op::ExpertsForward => f.fwd.total(),
            Op::ExpertsBackward => f.bwd.total(),
            Op::TopkBackward => f.bwd.router,
        }
    }
}

/// A layer's inputs, outputs and saved tensors on one backend (random normal inputs).
pub struct Layer {
    pub case: LayerCase,
    logits: Buf<f32>,
    x: Buf<f32>,
    u: Buf<f32>,
    v: Buf<f32>,
    dy: Buf<f32>,
    scores: Buf<f32>,
    indices: Buf<u32>,
    a: Buf<f32>,
    coef: Buf<f32>,
    w: Buf<f32>,
    y: Buf<f32>,
    dscores: Buf<f32>,
    da: Buf<f32>,
    dx: Buf<f32>,
    du: Buf<f32>,
    dv: Buf<f32>,
    dlogits: Buf<f32>,
    /// With bf16 storage: u and v rounded, as the model's copy.
    u16: Buf<Bf16>,
    v16: Buf<Bf16>,
}

/// The pools as the expert ops read them.
fn pool<'a>(
    storage: Storage,
    u: &'a Buf<f32>,
    v: &'a Buf<f32>,
    u16: &'a Buf<Bf16>,
    v16: &'a Buf<Bf16>,
) -> Pool<'a> {
    match storage {
        Storage::F32 => Pool::F32 {
            u: u.view(),
            v: v.view(),
        },
        Storage::Bf16 => Pool::Bf16 {
            u: u16.view(),
            v: v16.view(),
        },
    }
}

fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

impl Layer {
    pub fn new(
        be: &Arc<dyn Backend>,
        case: LayerCase,
        tokens: usize,
        seed: u64,
    ) -> Result<Layer, String> {
        let (e, r) = (case.experts, case.router);
        let mut rng = Rng::new(seed);
        let slots = tokens * r.slots_per_token();
        let pool = e.pool_rows * e.d;
        let mut init = |n: usize, std: f64| Buf::from_host(be, &randn(&mut rng, n, std));
        let logits = init(tokens * r.logits_per_token(), 1.0)?;
        let x = init(tokens * e.d, 1.0)?;
        let u = init(pool, 1.0 / (e.d as f64).sqrt())?;
        let v = init(pool, 1.0 / (e.d as f64).sqrt())?;
        let dy = init(tokens * e.d, 1.0)?;
        let z = |n: usize| Buf::<f32>::zeros(be, n);
        let (mut u16, mut v16) = (Buf::<Bf16>::empty(be), Buf::<Bf16>::empty(be));
        if case.storage == Storage::Bf16 {
            for (f, h) in [(&u, &mut u16), (&v, &mut v16)] {
                h.ensure(pool)?;
                be.round_bf16(f.view(), h.view_mut());
            }
        }
        Ok(Layer {
            case,
            logits,
            x,
            u,
            v,
            dy,
            scores: z(slots)?,
            indices: Buf::zeros(be, slots)?,
            a: z(slots)?,
            coef: z(slots)?,
            w: z(slots)?,
            y: z(tokens * e.d)?,
            dscores: z(slots)?,
            da: z(slots)?,
            dx: z(tokens * e.d)?,
            du: z(pool)?,
            dv: z(pool)?,
            dlogits: z(tokens * r.logits_per_token())?,
            u16,
            v16,
        })
    }

    /// Runs one op on `be` (the backend the buffers live on), as slots.rs does.
    pub fn run(&mut self, be: &dyn Backend, op: Op) {
        let (e, r, mode) = (self.case.experts, self.case.router, self.case.mode);
        let storage = self.case.storage;
        match op {
            Op::TopkForward => be.product_key_topk_forward(
                r,
                self.logits.view(),
                self.scores.view_mut(),
                self.indices.view_mut(),
            ),
            Op::ExpertsForward => be.experts_forward(
                e,
                mode,
                self.x.view(),
                self.scores.view(),
                self.indices.view(),
                pool(storage, &self.u, &self.v, &self.u16, &self.v16),
                ExpertsSaved {
                    a: self.a.view_mut(),
                    coef: self.coef.view_mut(),
                    w: self.w.view_mut(),
                },
                self.y.view_mut(),
            ),
            Op::ExpertsBackward => {
                zero(be, self.dx.view_mut());
                be.experts_backward(
                    e,
                    mode,
                    self.x.view(),
                    self.scores.view(),
                    self.indices.view(),
                    pool(storage, &self.u, &self.v, &self.u16, &self.v16),
                    ExpertsSavedRef {
                        a: self.a.view(),
                        coef: self.coef.view(),
                        w: self.w.view(),
                    },
                    self.dy.view(),
                    self.dscores.view_mut(),
                    self.da.view_mut(),
                    ExpertsGrads {
                        dx: self.dx.view_mut(),
                        du: self.du.view_mut(),
                        dv: self.dv.view_mut(),
                    },
                )
            }
            Op::TopkBackward => be.product_key_topk_backward(
                r,
                self.indices.view(),
                self.dscores.view(),
                self.dlogits.view_mut(),
            ),
        }
    }

    /// Distinct pool rows the last top-k chose (row = c · channel_stride + index).
    pub fn rows_touched(&self) -> u64 {
        let e = self.case.experts;
        let per_token = e.channels * e.k;
        let rows: BTreeSet<usize> = self
            .indices
            .to_vec()
            .iter()
            .enumerate()
            .map(|(slot, &ix)| (slot % per_token) / e.k * e.channel_stride + ix as usize)
            .collect();
        rows.len() as u64
    }
}

/// What one op moved, per kernel: (name, launches, bytes read, bytes written).
#[derive(Clone, Debug)]
pub struct OpTraffic {
    pub op: Op,
    pub kernels: Vec<(String, u64, u64, u64)>,
}

impl OpTraffic {
    pub fn bytes(&self) -> u64 {
        self.kernels.iter().map(|k| k.2 + k.3).sum()
    }
}

/// One layer's counted traffic and floor.
#[derive(Clone, Debug)]
pub struct CaseTraffic {
    pub case: LayerCase,
    pub tokens: usize,
    pub rows_touched: u64,
    pub floor: Floor,
    pub ops: Vec<OpTraffic>,
}

/// One line of the summary: a part of a pass, its counted bytes and its floor.
#[derive(Clone, Debug)]
pub struct Part {
    pub pass: &'static str,
    pub part: &'static str,
    pub counted: u64,
    pub floor: u64,
    pub compulsory: u64,
}

impl CaseTraffic {
    pub fn parts(&self) -> Vec<Part> {
        let mut out = Vec::new();
        for (pass, f) in [("fwd", &self.floor.fwd), ("bwd", &self.floor.bwd)] {
            let of = |name: &str| -> u64 {
                self.ops
                    .iter()
                    .filter(|o| o.op.pass() == pass && o.op.name() == name)
                    .map(OpTraffic::bytes)
                    .sum()
            };
            let f: &PassFloor = f;
            let (router, experts) = (of("topk"), of("experts"));
            out.push(Part {
                pass,
                part: "router top-k",
                counted: router,
                floor: f.router,
                compulsory: f.router,
            });
            out.push(Part {
                pass,
                part: "experts",
                counted: experts,
                floor: f.total(),
                compulsory: f.compulsory,
            });
            out.push(Part {
                pass,
                part: "layer",
                counted: router + experts,
                floor: f.layer(),
                compulsory: f.compulsory + f.router,
            });
        }
        out
    }

    /// The table: per kernel, then per part of each pass against the floor; MB = 10^6 bytes,
    /// µs at `gbs` GB/s.
    pub fn render(&self, gbs: f64) -> String {
        use std::fmt::Write;
        let mb = |b: u64| b as f64 / 1e6;
        let us = |b: u64| seconds(b, gbs) * 1e6;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "== {}, {} of {} pool rows touched",
            self.case.describe(self.tokens),
            self.rows_touched,
            self.case.experts.pool_rows
        );
        let _ = writeln!(s, "  {}", self.case.full_step(gbs));
        let _ = writeln!(
            s,
            "  {:<4} {:<8} {:<34} {:>8} {:>12} {:>12}",
            "pass", "op", "kernel", "launches", "read MB", "written MB"
        );
        for o in &self.ops {
            for (name, launches, read, written) in &o.kernels {
                let _ = writeln!(
                    s,
                    "  {:<4} {:<8} {:<34} {:>8} {:>12.3} {:>12.3}",
                    o.op.pass(),
                    o.op.name(),
                    name,
                    launches,
                    mb(*read),
                    mb(*written)
                );
            }
        }
        let _ = writeln!(
            s,
            "  {:<4} {:<13} {:>12} {:>12} {:>7} {:>11} {:>11} {:>14}",
            "pass",
            "part",
            "counted MB",
            "floor MB",
            "ratio",
            "counted µs",
            "floor µs",
            "compulsory MB"
        );
        for p in self.parts() {
            let ratio = if p.floor > 0 {
                format!("{:.3}", p.counted as f64 / p.floor as f64)
            } else {
                "-".into()
            };
            let _ = writeln!(
                s,
                "  {:<4} {:<13} {:>12.3} {:>12.3} {:>7} {:>11.2} {:>11.2} {:>14.3}",
                p.pass,
                p.part,
                mb(p.counted),
                mb(p.floor),
                ratio,
                us(p.counted),
                us(p.floor),
                mb(p.compulsory)
            );
        }
        s
    }
}

/// The layer on the emulator (fibers, race check off), each op's traffic taken from the
/// driver's table.
#[cfg(feature = "cuda-emu")]
pub fn emulate(case: LayerCase, tokens: usize, seed: u64) -> Result<CaseTraffic, String> {
    use crate::nn::cuda::backend::CudaBackend;
    use crate::nn::cuda::emu::EmuDriver;
    let dr = Arc::new(EmuDriver::with_mode(false, true));
    let be: Arc<dyn Backend> = Arc::new(CudaBackend::new(dr.clone()));
    let mut layer = Layer::new(&be, case, tokens, seed)?;
    let mut rows_touched = 0;
    let mut ops = Vec::new();
    for op in Op::ALL {
        dr.take_traffic();
        layer.run(be.as_ref(), op);
        if let Some(e) = be.take_error() {
            return Err(format!("{} {} {}: {e}", case.label(), op.pass(), op.name()));
        }
        let kernels = dr
            .take_traffic()
            .into_iter()
            .map(|(name, (n, t))| (name, n, t.read_bytes, t.written_bytes))
            .collect();
        ops.push(OpTraffic { op, kernels });
        if op == Op::TopkForward {
            rows_touched = layer.rows_touched();
        }
    }
    Ok(CaseTraffic {
        case,
        tokens,
        rows_touched,
        floor: case.floor(tokens, rows_touched),
        ops,
    })
}

const NO_EMULATOR: &str = "device cuda-emu: this build has no emulator (build with `cargo build --release --features cuda-emu`)";

#[cfg(not(feature = "cuda-emu"))]
pub fn emulate(_: LayerCase, _: usize, _: u64) -> Result<CaseTraffic, String> {
    Err(NO_EMULATOR.into())
}

/// One op timed on a GPU.
pub struct OpTime {
    pub op: Op,
    pub ms: f64,
    pub floor: u64,
}

/// Each op on the first GPU: one warm-up, then `reps` runs, each followed by a synchronize;
/// the median.
pub fn time_on_gpu(case: LayerCase, tokens: usize, reps: usize) -> Result<Vec<OpTime>, String> {
    use crate::nn::cuda::backend::CudaBackend;
    use crate::nn::cuda::driver::Driver;
    use crate::nn::cuda::gpu::Gpu;
    use std::time::Instant;
    let gpu = Arc::new(Gpu::open(0)?);
    let be: Arc<dyn Backend> = Arc::new(CudaBackend::new(gpu.clone()));
    let mut layer = Layer::new(&be, case, tokens, 1)?;
    let mut times = vec![Vec::new(); Op::ALL.len()];
    for rep in 0..=reps.max(1) {
        for (i, op) in Op::ALL.into_iter().enumerate() {
            let t0 = Instant::now();
            layer.run(be.as_ref(), op);
            gpu.synchronize()?;
            if rep > 0 {
                times[i].push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        if let Some(e) = be.take_error() {
            return Err(format!("{}: {e}", case.label()));
        }
    }
    let f = case.floor(tokens, layer.rows_touched());
    Ok(Op::ALL
        .into_iter()
        .zip(times)
        .map(|(op, t)| OpTime {
            op,
            ms: super::train::median(&t),
            floor: op.floor(&f),
        })
        .collect())
}

/// The options of `repro bench kernels` for `--device cuda-emu` and `--device cuda`.
#[derive(clap::Args, Debug)]
pub struct DeviceArgs {
    /// cpu: each CPU kernel per instruction set; cuda-emu: the product-key layer's counted
    /// traffic against its floor (a build with `--features cuda-emu`); cuda: its kernels timed
    /// on the first GPU, PyTorch beside them.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Ladder scales of the product-key layers (cuda-emu, cuda).
    #[arg(long, value_delimiter = ',', default_value = "2,4,6")]
    pub scales: Vec<f64>,
    /// Product-key kinds (cuda-emu, cuda).
    #[arg(long, value_delimiter = ',', default_value = "sgatlin,peer")]
    pub kinds: Vec<String>,
    /// How the expert kernels read the pools: f32, or bf16 (`with.expert_storage`).
    #[arg(long, default_value = "f32", value_parser = parse_storage)]
    pub storage: Storage,
    /// Tokens a step (default: 512 on cuda-emu, about a minute in all; 65536 on cuda).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// The bandwidth the floors are timed at, GB/s (an H100 SXM's HBM).
    #[arg(long, default_value_t = super::floor::H100_GBS)]
    pub peak_gbs: f64,
    /// The Python that runs bench/pk_reference.py (--device cuda) when it has torch and CUDA.
    #[arg(long, default_value = "python3")]
    pub python: String,
}

impl DeviceArgs {
    fn cases(&self) -> Result<Vec<LayerCase>, String> {
        let mut out = Vec::new();
        for &s in &self.scales {
            for k in &self.kinds {
                let mut case = LayerCase::ladder(k.parse()?, s)?;
                case.storage = self.storage;
                out.push(case);
            }
        }
        Ok(out)
    }
}

fn storage_name(s: Storage) -> &'static str {
    match s {
        Storage::F32 => "f32",
        Storage::Bf16 => "bf16",
    }
}

fn parse_storage(s: &str) -> Result<Storage, String> {
    match s {
        "f32" => Ok(Storage::F32),
        "bf16" => Ok(Storage::Bf16),
        _ => Err(format!("`{s}`: the pools are f32 or bf16")),
    }
}

/// `--device cuda-emu`: the traffic table of every case.
pub fn report_emulated(a: &DeviceArgs) -> Result<(), String> {
    if cfg!(not(feature = "cuda-emu")) {
        return Err(NO_EMULATOR.into());
    }
    let tokens = a.tokens.unwrap_or(512);
    let cases = a.cases()?;
    println!(
        "repro bench kernels --device cuda-emu: global bytes counted by the emulator against the \
         floor (f32 activations, {} pools; µs at {} GB/s)",
        storage_name(a.storage),
        a.peak_gbs
    );
    for case in cases {
        let t0 = std::time::Instant::now();
        let r = emulate(case, tokens, 1)?;
        print!("{}", r.render(a.peak_gbs));
        println!("  ({:.1} s on the emulator)", t0.elapsed().as_secs_f64());
    }
    Ok(())
}

/// `--device cuda`: every case timed per op, and the PyTorch reference when it can run.
pub fn report_gpu(a: &DeviceArgs, reps: usize) -> Result<(), String> {
    let tokens = a.tokens.unwrap_or(65536);
    let cases = a.cases()?;
    // Fails here, with the driver's own message, on a machine without a GPU.
    drop(crate::nn::cuda::gpu::Gpu::open(0)?);
    let torch = torch_reference_available(&a.python);
    println!(
        "repro bench kernels --device cuda: {tokens} tokens, median of {reps} synchronized runs; \
         GB/s = floor bytes / time, % of {} GB/s{}",
        a.peak_gbs,
        if torch {
            ""
        } else {
            "; no PyTorch with CUDA: no reference"
        }
    );
    for case in cases {
        let times = time_on_gpu(case, tokens, reps)?;
        // The reference's fwd and bwd ms for `tokens` (scaled up where it ran on fewer).
        let reference = if torch {
            match torch_reference(&a.python, case, tokens, reps) {
                Ok(r) => Some(r),
                Err(e) => {
                    println!("  pytorch reference failed: {e}");
                    None
                }
            }
        } else {
            None
        };
        println!("== {}", case.describe(tokens));
        println!(
            "  {:<4} {:<8} {:>10} {:>12} {:>8} {:>7} {:>12} {:>8}",
            "pass", "op", "ms", "floor MB", "GB/s", "% peak", "pytorch ms", "speedup"
        );
        for (p, pass) in ["fwd", "bwd"].into_iter().enumerate() {
            let mut total = (0.0, 0u64);
            for t in times.iter().filter(|t| t.op.pass() == pass) {
                let gbs = t.floor as f64 / (t.ms * 1e-3) / 1e9;
                println!(
                    "  {:<4} {:<8} {:>10.3} {:>12.1} {:>8.0} {:>6.1}%",
                    pass,
                    t.op.name(),
                    t.ms,
                    t.floor as f64 / 1e6,
                    gbs,
                    100.0 * gbs / a.peak_gbs
                );
                total = (total.0 + t.ms, total.1 + t.floor);
            }
            let gbs = total.1 as f64 / (total.0 * 1e-3) / 1e9;
            let theirs = reference.as_ref().map_or(String::new(), |r| {
                let ms = r.ms[p] * r.scale;
                format!(" {:>12.3} {:>7.2}x", ms, ms / total.0)
            });
            println!(
                "  {:<4} {:<8} {:>10.3} {:>12.1} {:>8.0} {:>6.1}%{theirs}   (floor alone {:.3} ms)",
                pass,
                "layer",
                total.0,
                total.1 as f64 / 1e6,
                gbs,
                100.0 * gbs / a.peak_gbs,
                seconds(total.1, a.peak_gbs) * 1e3
            );
        }
        if let Some(r) = reference.filter(|r| r.scale != 1.0) {
            println!(
                "  (pytorch ran {} tokens, the gathers of more did not fit; its times x{})",
                r.tokens, r.scale
            );
        }
    }
    Ok(())
}

/// What bench/pk_reference.py printed.
struct Reference {
    /// Forward and backward ms (medians).
    ms: [f64; 2],
    tokens: usize,
    scale: f64,
}

const PK_REFERENCE: &str = include_str!("../../bench/pk_reference.py");

fn torch_reference_available(python: &str) -> bool {
    std::process::Command::new(python)
        .args([
            "-c",
            "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// bench/pk_reference.py on the GPU at the case's shape.
fn torch_reference(
    python: &str,
    case: LayerCase,
    tokens: usize,
    reps: usize,
) -> Result<Reference, String> {
    let script = Script::write("pk_reference.py", PK_REFERENCE).map_err(|e| e.to_string())?;
    let (e, r) = (case.experts, case.router);
    let out = std::process::Command::new(python)
        .arg(script.path())
        .args(["--kind", case.kind.as_str(), "--device", "cuda"])
        .args(["--tokens", &tokens.to_string(), "--d", &e.d.to_string()])
        .args([
            "--channels",
            &e.channels.to_string(),
            "--k",
            &e.k.to_string(),
        ])
        .args([
            "--sqrt-n",
            &r.sqrt_n.to_string(),
            "--reps",
            &reps.to_string(),
        ])
        .output();
    let out = out.map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| -> Result<f64, String> {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            .ok_or_else(|| format!("no {key} in its output {text:?}"))
    };
    Ok(Reference {
        ms: [field("fwd_ms")?, field("bwd_ms")?],
        tokens: field("tokens")? as usize,
        scale: field("scale")?,
    })
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;

    /// Every figure after the kernel rows: (pass, part, counted, floor, ratio, counted µs,
    /// floor µs, compulsory) as printed.
    fn printed_parts(text: &str) -> Vec<(String, Vec<String>)> {
        text.lines()
            .skip_while(|l| !l.trim_start().starts_with("pass part"))
            .skip(1)
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                // The part's name may hold a space ("router top-k").
                let figures = w[w.len() - 6..].iter().map(|s| s.to_string()).collect();
                (w[..w.len() - 6].join(" "), figures)
            })
            .collect()
    }

    #[test]
    fn the_report_at_a_tiny_shape_counts_at_least_the_floor() {
        for kind in [FfnKind::Sgatlin, FfnKind::SgatlinGelu, FfnKind::Peer] {
            let case = LayerCase::ladder(kind, 0.5).unwrap();
            let tokens = 24;
            let r = emulate(case, tokens, 7).unwrap();
            let label = case.label();
            assert!(r.rows_touched > 0 && r.rows_touched <= case.experts.pool_rows as u64);
            // Every op launched something, and each part moved at least its floor.
            assert!(r.ops.iter().all(|o| !o.kernels.is_empty()), "{label}");
            for p in r.parts() {
                assert!(
                    p.counted >= p.floor && p.floor > 0,
                    "{label} {} {}: counted {} below the floor {}",
                    p.pass,
                    p.part,
                    p.counted,
                    p.floor
                );
                assert!(p.compulsory <= p.floor);
            }
            // The printed ratios are the quotients of the printed figures (to their rounding:
            // half a unit of the last digit of each), and the µs follow the MB.
            let text = r.render(3350.0);
            let parts = printed_parts(&text);
            assert_eq!(parts.len(), 6, "{text}");
            for (name, f) in parts {
                let num = |i: usize| f[i].parse::<f64>().unwrap();
                let (c, fl, ratio) = (num(0), num(1), num(2));
                let q = c / fl;
                let slack = 0.0005 + q * (0.0005 / c + 0.0005 / fl);
                assert!(
                    (ratio - q).abs() <= slack,
                    "{label} {name}: {ratio} vs {c}/{fl}"
                );
                let us = |mb: f64| mb * 1e6 / 3350e9 * 1e6;
                assert!(
                    (num(3) - us(c)).abs() <= 0.005 + us(0.0005),
                    "{label} {name}"
                );
                assert!(
                    (num(4) - us(fl)).abs() <= 0.005 + us(0.0005),
                    "{label} {name}"
                );
            }
        }
    }

    /// The product-key kernels move close to the floor: the experts forward within 1.25x of
    /// it and the backward within 1.5x, at ladder s = 2 (`repro bench kernels` shows s = 4, 6).
    #[test]
    fn the_experts_move_close_to_the_floor() {
        for kind in [FfnKind::Sgatlin, FfnKind::Peer] {
            let mut forward = Vec::new();
            for storage in [Storage::F32, Storage::Bf16] {
                let mut case = LayerCase::ladder(kind, 2.0).unwrap();
                case.storage = storage;
                let r = emulate(case, 128, 5).unwrap();
                let parts = r.parts();
                let experts: Vec<&Part> = parts.iter().filter(|p| p.part == "experts").collect();
                assert_eq!(experts.len(), 2, "a forward and a backward");
                for p in experts {
                    let ratio = p.counted as f64 / p.floor as f64;
                    let bound = if p.pass == "fwd" { 1.25 } else { 1.5 };
                    assert!(
                        ratio <= bound,
                        "{} {storage:?} {}: {ratio:.3}x the floor",
                        case.label(),
                        p.pass
                    );
                    if p.pass == "fwd" {
                        forward.push(p.counted);
                    }
                }
            }
            // bf16 rows halve the gathered bytes, most of the forward's traffic.
            assert!(
                (forward[1] as f64) < 0.75 * forward[0] as f64,
                "{kind:?}: bf16 forward {} B against f32 {} B",
                forward[1],
                forward[0]
            );
        }
    }

    #[test]
    fn traffic_is_repeatable_and_follows_the_shape() {
        let case = LayerCase::ladder(FfnKind::Sgatlin, 0.5).unwrap();
        let a = emulate(case, 9, 3).unwrap();
        let b = emulate(case, 9, 3).unwrap();
        let bytes = |r: &CaseTraffic| r.ops.iter().map(OpTraffic::bytes).collect::<Vec<_>>();
        assert_eq!(bytes(&a), bytes(&b));
        assert_eq!(a.floor, case.floor(9, a.rows_touched));
    }
}
