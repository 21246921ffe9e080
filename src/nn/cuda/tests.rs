//! The CUDA backend on the host emulator against the CPU backend: whole training steps.

use crate::interp::testing::fresh_seed;
use crate::nn::backend::{Backend, Storage};
use crate::nn::cuda::backend::CudaBackend;
use crate::nn::cuda::emu::EmuDriver;
use crate::nn::rng::Rng;
use crate::nn::train::tests::{pattern_batch, tiny, train_cfg};
use crate::nn::{BatchLoss, FfnKind, Model, Trainer};
use std::sync::Arc;

/// The emulator with the shared-memory race check on, every thread of a block a real thread.
fn emu() -> Arc<dyn Backend> {
    Arc::new(CudaBackend::new(Arc::new(EmuDriver::new(true))))
}

/// The emulator as `--device cuda-emu` trains: threads of a block as fibers, no race check.
fn emu_fibers() -> Arc<dyn Backend> {
    Arc::new(CudaBackend::new(Arc::new(EmuDriver::with_mode(
        false, true,
    ))))
}

fn cpu() -> Arc<dyn Backend> {
    Arc::new(crate::nn::cpu::CpuBackend::default())
}

const KINDS: [FfnKind; 6] = FfnKind::ALL;

/// The two backends sum in different orders (gemm blocking, tree reductions, online softmax),
/// each step in f32: losses agree to a few ulps of their ~4.2 magnitude, gradients to 1e-4 of
/// each tensor's largest entry.
const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f32 = 1e-4;

#[test]
fn one_step_gives_the_cpu_loss_and_gradients() {
    let seed = fresh_seed();
    for kind in KINDS {
        let cfg = tiny(kind);
        let mut rng = Rng::new(seed);
        let batch = pattern_batch(seed as usize % 5, 3, cfg.seq_len);
        let (inputs, targets): (Vec<u32>, Vec<u32>) = batch
            .chunks(cfg.seq_len + 1)
            .flat_map(|r| r[..cfg.seq_len].iter().zip(&r[1..]).map(|(&a, &b)| (a, b)))
            .unzip();
        let on = |be: Arc<dyn Backend>| {
            let mut m = Model::with_backend(&cfg, be, &mut rng.clone()).unwrap();
            let loss = m.forward_backward(&inputs, &targets, Some(3)).unwrap();
            (loss, m.grad_values().to_vec(), m)
        };
        let (want, want_g, m) = on(cpu());
        let (got, got_g, _) = on(emu());
        // Fibers run the same kernels to the same bits.
        let (fib, fib_g, _) = on(emu_fibers());
        assert_eq!(fib.loss.to_bits(), got.loss.to_bits(), "{}", kind.as_str());
        assert!(fib_g
            .iter()
            .zip(&got_g)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let case = format!("{} seed {seed}", kind.as_str());
        assert_close(&m, (&got, &got_g), (&want, &want_g), &case);
        rng.next_u64();
    }
}

/// The loss within LOSS_TOL and every gradient within GRAD_TOL of its tensor's largest.
fn assert_close(m: &Model, got: (&BatchLoss, &[f32]), want: (&BatchLoss, &[f32]), case: &str) {
    let ((got, got_g), (want, want_g)) = (got, want);
    assert_eq!(got.tokens, want.tokens, "{case}");
    assert!(
        (got.loss - want.loss).abs() <= LOSS_TOL * want.loss,
        "{case}: loss {} against {}",
        got.loss,
        want.loss
    );
    for info in &m.table.infos {
        let r = info.offset..info.offset + info.len;
        let scale = want_g[r.clone()].iter().fold(0f32, |a, x| a.max(x.abs()));
        for (i, (x, y)) in got_g[r.clone()].iter().zip(&want_g[r]).enumerate() {
            assert!(
                (x - y).abs() <= GRAD_TOL * scale.max(1e-6),
                "{case}: {}[{i}] gradient {x} against {y}",
                info.name
            );
        }
    }
}

/// With bf16 pools both backends compute with the same rounded rows (the kernels widen bf16
/// exactly): a step gives the CPU loss and gradients as in f32, and differs from the f32 step.
#[test]
fn bf16_pools_give_the_cpu_loss_and_gradients() {
    let seed = fresh_seed();
    for kind in [FfnKind::Sgatlin, FfnKind::SgatlinGelu, FfnKind::Peer] {
        let cfg = tiny(kind);
        let batch = pattern_batch(seed as usize % 5, 3, cfg.seq_len);
        let (inputs, targets): (Vec<u32>, Vec<u32>) = batch
            .chunks(cfg.seq_len + 1)
            .flat_map(|r| r[..cfg.seq_len].iter().zip(&r[1..]).map(|(&a, &b)| (a, b)))
            .unzip();
        let on = |be: Arc<dyn Backend>, storage: Storage| {
            let mut m = Model::with_backend(&cfg, be, &mut Rng::new(seed)).unwrap();
            m.set_expert_storage(storage).unwrap();
            let loss = m.forward_backward(&inputs, &targets, Some(3)).unwrap();
            (loss, m.grad_values().to_vec(), m)
        };
        let (want, want_g, m) = on(cpu(), Storage::Bf16);
        let (got, got_g, _) = on(emu_fibers(), Storage::Bf16);
        let case = format!("{} bf16 seed {seed}", kind.as_str());
        assert_close(&m, (&got, &got_g), (&want, &want_g), &case);
        let (f32_loss, _, _) = on(emu_fibers(), Storage::F32);
        assert_ne!(f32_loss.loss, got.loss, "{case}: bf16 made no difference");
    }
}

#[test]
fn three_steps_match_and_a_resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    for kind in KINDS {
        let cfg = tiny(kind);
        let run = |be: Arc<dyn Backend>, steps: std::ops::Range<usize>, tr: Option<Trainer>| {
            let mut tr =
                tr.unwrap_or_else(|| Trainer::with_backend(&cfg, train_cfg(6), be).unwrap());
            let losses: Vec<f64> = steps
                .map(|s| tr.step(&pattern_batch(s, 2, cfg.seq_len)).unwrap().loss)
                .collect();
            (tr, losses)
        };
        let (_, want) = run(cpu(), 0..3, None);
        let (full, got) = run(emu_fibers(), 0..3, None);
        for (s, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * w,
                "{} step {s}: loss {g} on cuda-emu, {w} on cpu",
                kind.as_str()
            );
        }
        // Stop after 2 steps, resume from the checkpoint on the emulator, take the third.
        let (half, _) = run(emu_fibers(), 0..2, None);
        let path = dir.path().join(format!("{}.safetensors", kind.as_str()));
        half.save_checkpoint(&path).unwrap();
        drop(half);
        let resumed = Trainer::load_checkpoint_on(&path, emu_fibers()).unwrap();
        let (resumed, last) = run(emu_fibers(), 2..3, Some(resumed));
        assert_eq!(
            last[0].to_bits(),
            got[2].to_bits(),
            "{}: resumed loss",
            kind.as_str()
        );
        assert!(
            resumed.model.param_values()[..]
                .iter()
                .zip(full.model.param_values().iter())
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}: resumed weights differ from the uninterrupted run",
            kind.as_str()
        );
    }
}

#[test]
fn a_failed_launch_is_an_error_naming_the_device_not_a_panic() {
    // More experts than the routing kernels hold.
    let cfg = crate::nn::ModelConfig {
        experts: super::moe::max_experts() + 1,
        d_ffw: 4,
        ..tiny(FfnKind::Moe)
    };
    let mut m = Model::with_backend(&cfg, emu(), &mut Rng::new(1)).unwrap();
    let err = m.forward_logits(&[1; 8]).unwrap_err();
    assert!(err.starts_with("cuda: moe: at most"), "{err}");
    // The error is reported once; the next pass that fails reports again.
    assert!(m.backend().take_error().is_none());
    assert!(m.forward_logits(&[1; 8]).is_err());
}
