//! Launch sizes of kernels/attention.cu (causal flash attention, forward and backward), and
//! its tests against the CPU twin `nn::cpu::attention`.
//!
//! Forward: `attention_forward(q, k, v, out, lse, batch, seq, heads, hd)`.
//! Backward, in this order (each overwrites its outputs):
//! `attention_backward_delta(dout, out, delta, batch, seq, heads, hd)`, then
//! `attention_backward_dkdv(q, k, v, dout, lse, delta, dk, dv, batch, seq, heads, hd)` and
//! `attention_backward_dq(q, k, v, dout, lse, delta, dq, batch, seq, heads, hd)`.
//! q, k, v, out and their gradients are [batch * seq, heads * hd]; lse and delta are
//! [batch, heads, seq] f32.

use super::{constant, LaunchDims};
use crate::nn::backend::AttnShape;
use std::sync::LazyLock;

static TILE: LazyLock<u32> = LazyLock::new(|| constant("ATTN_TILE"));
static THREADS: LazyLock<u32> = LazyLock::new(|| constant("ATTN_THREADS"));
static MAX_HEAD_DIM: LazyLock<u32> = LazyLock::new(|| constant("ATTN_MAX_HEAD_DIM"));

/// The largest head dimension the kernels take (each lane keeps its share of a row in
/// registers).
pub fn max_head_dim() -> usize {
    *MAX_HEAD_DIM as usize
}

/// One block per tile of `ATTN_TILE` rows of each (head, batch), and two tiles of the other
/// side in dynamic shared memory. Used by forward, dkdv and dq alike.
fn tiled(s: &AttnShape) -> LaunchDims {
    assert!(
        s.head_dim >= 1 && s.head_dim <= max_head_dim(),
        "attention kernels take head_dim 1..={}, not {}",
        max_head_dim(),
        s.head_dim
    );
    assert!(s.seq >= 1 && s.heads <= 65535 && s.batch <= 65535);
    LaunchDims {
        grid: [
            (s.seq as u32).div_ceil(*TILE),
            s.heads as u32,
            s.batch as u32,
        ],
        block: [*THREADS, 1, 1],
        shared_bytes: 2 * *TILE as usize * s.head_dim * 4,
    }
}

/// `attention_forward`.
pub fn forward_dims(s: &AttnShape) -> LaunchDims {
    tiled(s)
}

/// `attention_backward_delta`: one thread a (batch, head, query) row.
pub fn delta_dims(s: &AttnShape) -> LaunchDims {
    let rows = (s.batch * s.heads * s.seq) as u32;
    LaunchDims {
        grid: [rows.div_ceil(*THREADS).clamp(1, 65535), 1, 1],
        block: [*THREADS, 1, 1],
        shared_bytes: 0,
    }
}

/// `attention_backward_dkdv`.
pub fn dkdv_dims(s: &AttnShape) -> LaunchDims {
    tiled(s)
}

/// `attention_backward_dq`.
pub fn dq_dims(s: &AttnShape) -> LaunchDims {
    tiled(s)
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;
    use crate::nn::cpu::attention::{attention_backward, attention_forward};
    use crate::nn::cuda::emu::Arg;
    use crate::nn::cuda::testing::{go, randn};
    use crate::nn::rng::{fresh_seed, Rng};

    /// Within `tol` of `want`, relative to max(|want|, 1). Both sides are f32 sums of the same
    /// terms in different orders (the twin's gemm blocks and exp against the kernels' tiles,
    /// online rescaling and butterfly sums), so they differ by a few ulps of the largest
    /// partial sums, whose size is about that of the inputs (unit normals): 1 is the scale.
    fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
        for (i, (x, y)) in got.iter().zip(want).enumerate() {
            assert!(
                (x - y).abs() <= tol * y.abs().max(1.0),
                "{what}: element {i}: {x} against {y}"
            );
        }
    }

    /// log-sum-exp of each query's scaled, causal scores, in f64 from the inputs.
    fn lse_f64(s: &AttnShape, q: &[f32], k: &[f32]) -> Vec<f64> {
        let (tn, hn, hd) = (s.seq, s.heads, s.head_dim);
        let d = hn * hd;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0.0; s.batch * hn * tn];
        for b in 0..s.batch {
            for h in 0..hn {
                for i in 0..tn {
                    let at =
                        |x: &[f32], t: usize, c: usize| x[(b * tn + t) * d + h * hd + c] as f64;
                    let scores: Vec<f64> = (0..=i)
                        .map(|j| scale * (0..hd).map(|c| at(q, i, c) * at(k, j, c)).sum::<f64>())
                        .collect();
                    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
                    out[(b * hn + h) * tn + i] = mx + sum.ln();
                }
            }
        }
        out
    }

    /// (batch, heads, head_dim, seq): every batch 1 and 3, heads 1 and 2, head_dim 2, 6 and 64
    /// and seq 1, 5, 33 (two tiles and one row) and 130 (nine tiles, two rows in the last)
    /// appears, in mixes chosen so that the emulator (a thread per GPU thread) stays quick;
    /// the costliest, 64-wide heads over 130 positions, once.
    const CASES: [(usize, usize, usize, usize); 12] = [
        (1, 1, 2, 1),
        (1, 2, 64, 1),
        (3, 1, 6, 1),
        (1, 1, 6, 5),
        (3, 2, 64, 5),
        (3, 2, 2, 33),
        (1, 1, 64, 33),
        (1, 2, 6, 33),
        (1, 1, 64, 130),
        (1, 2, 6, 130),
        (3, 1, 2, 40),
        (3, 2, 6, 17),
    ];

    #[test]
    fn flash_attention_equals_its_cpu_twin() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let mut worst = [0.0f32; 5];
        for (batch, heads, hd, seq) in CASES {
            let s = AttnShape {
                batch,
                seq,
                heads,
                head_dim: hd,
            };
            let case = format!("seed {seed}, batch {batch} heads {heads} hd {hd} seq {seq}");
            let t0 = std::time::Instant::now();
            check(&s, &mut rng, &case, &mut worst);
            eprintln!("{case}: {:?}", t0.elapsed());
        }
        eprintln!("attention: worst error / max(|want|, 1): out, lse, dq, dk, dv = {worst:?}");
    }

    fn check(s: &AttnShape, rng: &mut Rng, case: &str, worst: &mut [f32; 5]) {
        let n = s.batch * s.seq * s.heads * s.head_dim;
        let stats = s.batch * s.heads * s.seq;
        let (q, k, v, dout) = (
            randn(rng, n, 1.0),
            randn(rng, n, 1.0),
            randn(rng, n, 1.0),
            randn(rng, n, 1.0),
        );
        let mut out = vec![0.0f32; n];
        let mut att = vec![0.0f32; s.batch * s.heads * s.seq * s.seq];
        attention_forward(s, &q, &k, &v, &mut out, &mut att);
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
        attention_backward(s, &q, &k, &v, &att, &dout, &mut dq, &mut dk, &mut dv);

        let dims = |x: usize| Arg::I32(x as i32);
        // Outputs start as NaN: every element must be written (overwritten, not accumulated).
        let mut got = vec![f32::NAN; n];
        let mut lse = vec![f32::NAN; stats];
        go(
            "attention_forward",
            forward_dims(s),
            &mut [
                Arg::slice(&q),
                Arg::slice(&k),
                Arg::slice(&v),
                Arg::slice_mut(&mut got),
                Arg::slice_mut(&mut lse),
                dims(s.batch),
                dims(s.seq),
                dims(s.heads),
                dims(s.head_dim),
            ],
        );
        let mut delta = vec![f32::NAN; stats];
        go(
            "attention_backward_delta",
            delta_dims(s),
            &mut [
                Arg::slice(&dout),
                Arg::slice(&got),
                Arg::slice_mut(&mut delta),
                dims(s.batch),
                dims(s.seq),
                dims(s.heads),
                dims(s.head_dim),
            ],
        );
        let (mut gdq, mut gdk, mut gdv) = (vec![f32::NAN; n], vec![f32::NAN; n], vec![f32::NAN; n]);
        go(
            "attention_backward_dkdv",
            dkdv_dims(s),
            &mut [
                Arg::slice(&q),
                Arg::slice(&k),
                Arg::slice(&v),
                Arg::slice(&dout),
                Arg::slice(&lse),
                Arg::slice(&delta),
                Arg::slice_mut(&mut gdk),
                Arg::slice_mut(&mut gdv),
                dims(s.batch),
                dims(s.seq),
                dims(s.heads),
                dims(s.head_dim),
            ],
        );
        go(
            "attention_backward_dq",
            dq_dims(s),
            &mut [
                Arg::slice(&q),
                Arg::slice(&k),
                Arg::slice(&v),
                Arg::slice(&dout),
                Arg::slice(&lse),
                Arg::slice(&delta),
                Arg::slice_mut(&mut gdq),
                dims(s.batch),
                dims(s.seq),
                dims(s.heads),
                dims(s.head_dim),
            ],
        );
        let want_lse: Vec<f32> = lse_f64(s, &q, &k).iter().map(|&x| x as f32).collect();
        let pairs: [(&[f32], &[f32], &str); 5] = [
            (&got, &out, "out"),
            (&lse, &want_lse, "lse"),
            (&gdq, &dq, "dq"),
            (&gdk, &dk, "dk"),
            (&gdv, &dv, "dv"),
        ];
        for (w, (g, want, what)) in worst.iter_mut().zip(pairs) {
            for (x, y) in g.iter().zip(want) {
                *w = w.max((x - y).abs() / y.abs().max(1.0));
            }
            close(g, want, 1e-5, &format!("{what}, {case}"));
        }
    }

    #[test]
    fn launch_sizes_follow_the_shape() {
        let s = AttnShape {
            batch: 3,
            seq: 33,
            heads: 2,
            head_dim: 6,
        };
        let tile = *TILE;
        assert_eq!(forward_dims(&s).grid, [33u32.div_ceil(tile), 2, 3]);
        assert_eq!(forward_dims(&s).shared_bytes, 2 * tile as usize * 6 * 4);
        assert!(delta_dims(&s).grid[0] * delta_dims(&s).block[0] >= 3 * 2 * 33);
        let too_wide = AttnShape {
            head_dim: max_head_dim() + 1,
            ..s
        };
        assert!(std::panic::catch_unwind(|| dq_dims(&too_wide)).is_err());
    }
}
