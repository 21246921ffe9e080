//! AdamW (SPEC §4), global-norm clipping and the warmup-stable-sqrt-decay schedule.

use super::backend::{AdamWStep, Backend, Buf};
use super::tensor::ParamTable;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// lambda of the decoupled decay theta <- theta - lr * lambda * theta (not on norm scales).
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// Optimiser state: first and second moments mirroring the flat parameter buffer, in the
/// backend's memory.
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub m: Buf<f32>,
    pub v: Buf<f32>,
    /// Updates applied so far (bias correction uses t + 1 for the next one).
    pub t: u64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, be: &Arc<dyn Backend>, n_params: usize) -> Result<AdamW, String> {
        Ok(AdamW {
            cfg,
            m: Buf::zeros(be, n_params)?,
            v: Buf::zeros(be, n_params)?,
            t: 0,
        })
    }

    /// One update of every tensor; `grad_scale` multiplies the gradients first (clipping).
    pub fn update(
        &mut self,
        be: &dyn Backend,
        table: &ParamTable,
        params: &mut Buf<f32>,
        grads: &Buf<f32>,
        lr: f32,
        grad_scale: f32,
    ) {
        self.t += 1;
        // One call per run of neighbouring tensors with the same weight decay (most of the
        // model), not one per tensor: the kernel splits its work across threads itself.
        let mut i = 0;
        while i < table.infos.len() {
            let decay = table.infos[i].decay;
            let start = table.infos[i].offset;
            let mut end = start + table.infos[i].len;
            i += 1;
            while i < table.infos.len()
                && table.infos[i].decay == decay
                && table.infos[i].offset == end
            {
                end += table.infos[i].len;
                i += 1;
            }
            let step = AdamWStep {
                lr,
                beta1: self.cfg.beta1,
                beta2: self.cfg.beta2,
                eps: self.cfg.eps,
                weight_decay: if decay { self.cfg.weight_decay } else { 0.0 },
                t: self.t,
                grad_scale,
            };
            let r = start..end;
            be.adamw_update(
                params.range_mut(r.clone()),
                grads.range(r.clone()),
                self.m.range_mut(r.clone()),
                self.v.range_mut(r),
                &step,
            );
        }
    }
}

/// The factor that brings the global norm down to `max_norm` (1 when already below).
pub fn clip_scale(norm: f64, max_norm: f64) -> f32 {
    if max_norm > 0.0 && norm > max_norm {
        (max_norm / norm) as f32
    } else {
        1.0
    }
}

/// Warmup-stable-sqrt-decay: linear warmup, constant, then lr * (1 - sqrt(t / T_decay)) over
/// the last 20% of the steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak_lr: f64,
    pub total_steps: u64,
    /// Effective warmup after clamping (see `new`).
    pub warmup_steps: u64,
    pub decay_start: u64,
}

impl Schedule {
    /// Clamps the warmup so that short runs still spend most of their steps at the peak: it
    /// takes at most a quarter of the run (the spec's 1000 warmup steps apply unchanged from
    /// 4000 steps on).
    pub fn new(peak_lr: f64, total_steps: u64, warmup_steps: u64) -> Schedule {
        let total = total_steps.max(1);
        let decay_steps = ((total as f64) * 0.2).round() as u64;
        let decay_start = total - decay_steps.min(total);
        let warmup = warmup_steps.min(total / 4).min(decay_start);
        Schedule {
            peak_lr,
            total_steps: total,
            warmup_steps: warmup,
            decay_start,
        }
    }

    /// Learning rate of 0-based step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if step < self.decay_start {
            return self.peak_lr;
        }
        let t_decay = (self.total_steps - self.decay_start).max(1) as f64;
        let t = ((step - self.decay_start) as f64).min(t_decay);
        self.peak_lr * (1.0 - (t / t_decay).sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_holds_and_decays() {
        let s = Schedule::new(1e-3, 1000, 100);
        assert_eq!(s.warmup_steps, 100);
        assert_eq!(s.decay_start, 800);
        assert!((s.lr(0) - 1e-5).abs() < 1e-12);
        assert!((s.lr(99) - 1e-3).abs() < 1e-12);
        assert_eq!(s.lr(500), 1e-3);
        assert_eq!(s.lr(800), 1e-3);
        assert!((s.lr(850) - 1e-3 * (1.0 - (0.25f64).sqrt())).abs() < 1e-12);
        assert!(s.lr(999) > 0.0 && s.lr(999) < 1e-4);
        // A short run clamps a long warmup.
        let s = Schedule::new(1e-3, 50, 1000);
        assert_eq!(s.warmup_steps, 12);
        assert!(s.lr(10) < 1e-3);
        assert_eq!(s.lr(12), 1e-3);
        assert_eq!(Schedule::new(1e-3, 4000, 1000).warmup_steps, 1000);
    }

    #[test]
    fn clip_scale_only_shrinks() {
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert!((clip_scale(4.0, 1.0) - 0.25).abs() < 1e-7);
    }
}
