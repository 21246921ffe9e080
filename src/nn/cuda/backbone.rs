//! Launch sizes of the backbone kernels (kernels/{rmsnorm,rope,activations,xent,adamw,
//! embedding,rowops}.cu) and the host-side helpers their launches need. Every grid is capped
//! (the kernels loop over what a capped grid leaves: grid-stride), so any shape is a valid
//! launch. Used by both drivers, so nothing here depends on the emulator.

use super::{constant, dims, elementwise_dims, per_row, LaunchDims};
use std::sync::LazyLock;

static ROW_BLOCK: LazyLock<u32> = LazyLock::new(|| constant("ROW_BLOCK"));
static RMS_ROWS_PER_PARTIAL: LazyLock<u32> = LazyLock::new(|| constant("RMS_ROWS_PER_PARTIAL"));
static XENT_BLOCK: LazyLock<u32> = LazyLock::new(|| constant("XENT_BLOCK"));
static SUM_BLOCK: LazyLock<u32> = LazyLock::new(|| constant("SUM_BLOCK"));
static SQ_CHUNK: LazyLock<u32> = LazyLock::new(|| constant("SQ_CHUNK"));

/// `rmsnorm_forward(x, scale, y, rstd, rows, d)`.
pub fn rmsnorm_forward_dims(rows: usize) -> LaunchDims {
    per_row(rows, *ROW_BLOCK, 0)
}

/// Rows of the scale-gradient partials `rmsnorm_backward` writes: the partial buffer is
/// `[rmsnorm_partials(rows), d]` floats.
pub fn rmsnorm_partials(rows: usize) -> usize {
    rows.div_ceil(*RMS_ROWS_PER_PARTIAL as usize)
}

/// `rmsnorm_backward(x, scale, rstd, dy, dx, dscale_partial, rows, d)`: one block a partial.
pub fn rmsnorm_backward_dims(rows: usize) -> LaunchDims {
    per_row(rmsnorm_partials(rows), *ROW_BLOCK, 0)
}

/// `sum_rows(x, out, rows, d)`: out += the column sums of x, one block a column (the bias
/// gradients, and rmsnorm's dscale from its partials).
pub fn column_sums_dims(d: usize) -> LaunchDims {
    dims(d, i32::MAX as u32, *ROW_BLOCK, 0)
}

/// `rope(x, cos, sin, rows, seq, heads, hd, inverse)`: one thread a rotated pair.
pub fn rope_dims(rows: usize, heads: usize, head_dim: usize) -> LaunchDims {
    elementwise_dims(rows * heads * (head_dim / 2))
}

/// `gelu_forward(x, y, n)` and `gelu_backward(x, dy, dx, n)`.
pub fn gelu_dims(n: usize) -> LaunchDims {
    elementwise_dims(n)
}

/// `swiglu_forward(z, y, rows, f)` and `swiglu_backward(z, dy, dz, rows, f)`.
pub fn swiglu_dims(rows: usize, f: usize) -> LaunchDims {
    elementwise_dims(rows * f)
}

/// `softmax_xent(logits, targets, loss, rows, vocab, pad, want_grad, inv_count)`.
pub fn xent_dims(rows: usize) -> LaunchDims {
    per_row(rows, *XENT_BLOCK, 0)
}

/// The `inv_count` of `softmax_xent` for `counted` targets that are not padding, as the twin
/// scales the gradient (0 when every target is padding).
pub fn xent_inv_count(counted: usize) -> f32 {
    if counted > 0 {
        (1.0 / counted as f64) as f32
    } else {
        0.0
    }
}

/// `pad` as `softmax_xent` takes it.
pub fn xent_pad(pad: Option<u32>) -> i32 {
    pad.map_or(-1, |p| i32::try_from(p).expect("a pad token below 2^31"))
}

/// `sum_f64(x, out, n)`: one block.
pub fn sum_f64_dims() -> LaunchDims {
    dims(1, 1, *SUM_BLOCK, 0)
}

/// `adamw_update(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, inv_bc1, inv_sqrt_bc2,
/// grad_scale)`.
pub fn adamw_dims(n: usize) -> LaunchDims {
    elementwise_dims(n)
}

/// `(inv_bc1, inv_sqrt_bc2)` of step `t` (1-based), in f64 exactly as the twin
/// (src/nn/cpu/adamw.rs) computes them.
pub fn adamw_bias_corrections(beta1: f32, beta2: f32, t: u64) -> (f32, f32) {
    let bc1 = 1.0 - (beta1 as f64).powi(t as i32);
    let bc2 = 1.0 - (beta2 as f64).powi(t as i32);
    ((1.0 / bc1) as f32, (1.0 / bc2.sqrt()) as f32)
}

/// Doubles `sum_squares_partial` writes for `n` elements (then `sum_f64` over them).
pub fn sum_squares_partials(n: usize) -> usize {
    n.div_ceil(*SQ_CHUNK as usize)
}

/// `sum_squares_partial(x, n, partial)`: one block a chunk.
pub fn sum_squares_dims(n: usize) -> LaunchDims {
    per_row(sum_squares_partials(n), *SUM_BLOCK, 0)
}

/// `embedding_forward(table, tokens, out, n, d)`.
pub fn embedding_forward_dims(n: usize, d: usize) -> LaunchDims {
    elementwise_dims(n * d)
}

/// `embedding_backward(dx, order, starts, seg_tokens, dtable, segments, d)`: one block a
/// segment.
pub fn embedding_backward_dims(segments: usize) -> LaunchDims {
    per_row(segments, *ROW_BLOCK, 0)
}

/// The segments of `embedding_backward`: `order` lists the positions of `tokens` grouped by
/// token (tokens ascending), each group in increasing position; segment `s` is
/// `order[starts[s]..starts[s + 1]]`, all positions of token `seg_tokens[s]`.
pub fn embedding_segments(tokens: &[u32]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..tokens.len() as u32).collect();
    // Stable: equal tokens keep their positions' order.
    order.sort_by_key(|&j| tokens[j as usize]);
    let (mut starts, mut seg_tokens) = (Vec::new(), Vec::new());
    for (j, &pos) in order.iter().enumerate() {
        let tok = tokens[pos as usize];
        if seg_tokens.last() != Some(&tok) {
            starts.push(j as u32);
            seg_tokens.push(tok);
        }
    }
    starts.push(order.len() as u32);
    (order, starts, seg_tokens)
}

/// `add_assign(y, x, n)`.
pub fn add_assign_dims(n: usize) -> LaunchDims {
    elementwise_dims(n)
}

#[cfg(all(test, feature = "cuda-emu"))]
mod tests {
    use super::*;
    use crate::nn::backend::Bf16;
    use crate::nn::cpu::{activations, adamw, rmsnorm, rope, rowops, xent};
    use crate::nn::cuda::emu::Arg;
    use crate::nn::cuda::testing::{below, bits, close, go, grids, randn};
    use crate::nn::rng::{fresh_seed, Rng};

    #[test]
    fn rmsnorm_equals_its_twin_and_is_deterministic() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let shapes = [
            (1, 1),
            (1, 130),
            (5, 7),
            (5, 33),
            (33, 1),
            (33, 33),
            (129, 130),
        ];
        for (rows, d) in shapes {
            let case = format!("seed {seed}, {rows}x{d}");
            let x = randn(&mut rng, rows * d, 1.0);
            let scale = randn(&mut rng, d, 1.0);
            let (mut y_w, mut rstd_w) = (vec![0.0; rows * d], vec![0.0; rows]);
            rmsnorm::rmsnorm_forward(&x, &scale, d, &mut y_w, &mut rstd_w);
            // Two launches, on two grids: the same bits.
            let mut runs = Vec::new();
            for dims in grids(rmsnorm_forward_dims(rows)) {
                let (mut y, mut rstd) = (vec![f32::NAN; rows * d], vec![f32::NAN; rows]);
                go(
                    "rmsnorm_forward",
                    dims,
                    &mut [
                        Arg::slice(&x),
                        Arg::slice(&scale),
                        Arg::slice_mut(&mut y),
                        Arg::slice_mut(&mut rstd),
                        Arg::I32(rows as i32),
                        Arg::I32(d as i32),
                    ],
                );
                close(&y, &y_w, &vec![0.0; y.len()], &format!("y {case}"));
                close(&rstd, &rstd_w, &vec![0.0; rows], &format!("rstd {case}"));
                runs.push((bits(&y), bits(&rstd)));
            }
            assert_eq!(runs[0], runs[1], "forward twice {case}");

            // The backward from the twin's rstd, adding into nonzero dx and dscale.
            let dy = randn(&mut rng, rows * d, 1.0);
            let (dx0, dscale0) = (randn(&mut rng, rows * d, 1.0), randn(&mut rng, d, 1.0));
            let (mut dx_w, mut dscale_w) = (dx0.clone(), dscale0.clone());
            rmsnorm::rmsnorm_backward(&x, &scale, &rstd_w, &dy, d, &mut dx_w, &mut dscale_w);
            // Bounds: the magnitudes of the terms each result sums.
            let mut dx_scale = vec![0.0f32; rows * d];
            let mut dscale_scale: Vec<f32> = dscale0.iter().map(|v| v.abs()).collect();
            for (r, &inv) in rstd_w.iter().enumerate() {
                let o = r * d;
                let gx: f32 = (0..d)
                    .map(|i| (dy[o + i] * scale[i] * x[o + i]).abs())
                    .sum();
                let m = gx * inv / d as f32;
                for i in 0..d {
                    let g = (dy[o + i] * scale[i]).abs();
                    dx_scale[o + i] = dx0[o + i].abs() + inv * (g + x[o + i].abs() * inv * m);
                    dscale_scale[i] += (dy[o + i] * x[o + i] * inv).abs();
                }
            }
            let partials = rmsnorm_partials(rows);
            let mut runs = Vec::new();
            for dims in grids(rmsnorm_backward_dims(rows)) {
                let (mut dx, mut dscale) = (dx0.clone(), dscale0.clone());
                let mut partial = vec![f32::NAN; partials * d];
                go(
                    "rmsnorm_backward",
                    dims,
                    &mut [
                        Arg::slice(&x),
                        Arg::slice(&scale),
                        Arg::slice(&rstd_w),
                        Arg::slice(&dy),
                        Arg::slice_mut(&mut dx),
                        Arg::slice_mut(&mut partial),
                        Arg::I32(rows as i32),
                        Arg::I32(d as i32),
                    ],
                );
                go(
                    "sum_rows",
                    column_sums_dims(d),
                    &mut [
                        Arg::slice(&partial),
                        Arg::slice_mut(&mut dscale),
                        Arg::I32(partials as i32),
                        Arg::I32(d as i32),
                    ],
                );
                close(&dx, &dx_w, &dx_scale, &format!("dx {case}"));
                close(&dscale, &dscale_w, &dscale_scale, &format!("dscale {case}"));
                runs.push((bits(&dx), bits(&dscale)));
            }
            assert_eq!(runs[0], runs[1], "backward twice {case}");
        }
    }

    #[test]
    fn rope_equals_its_twin_both_ways() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        // (rows, seq, heads, head_dim); rows need not be a multiple of seq (t = row % seq).
        let shapes = [
            (1, 1, 1, 2),
            (5, 5, 3, 6),
            (5, 1, 2, 2),
            (33, 5, 2, 6),
            (129, 5, 4, 2),
            (129, 1, 1, 6),
            (10, 5, 2, 7),
        ];
        for (rows, seq, heads, hd) in shapes {
            let (cos, sin) = rope::rope_tables::<f32>(seq, hd);
            let x = randn(&mut rng, rows * heads * hd, 1.0);
            // Each output is x1·c ∓ x2·s: bounded by |x1| + |x2| of its pair.
            let half = hd / 2;
            let scale: Vec<f32> = (0..x.len())
                .map(|i| match i % hd {
                    j if j < half => x[i].abs() + x[i + half].abs(),
                    j if j < 2 * half => x[i].abs() + x[i - half].abs(),
                    _ => 0.0,
                })
                .collect();
            for inverse in [false, true] {
                let case = format!("seed {seed}, {rows}x{seq}x{heads}x{hd} inverse {inverse}");
                let mut want = x.clone();
                rope::rope_apply(&mut want, &cos, &sin, seq, heads, hd, inverse);
                for dims in grids(rope_dims(rows, heads, hd)) {
                    let mut got = x.clone();
                    go(
                        "rope",
                        dims,
                        &mut [
                            Arg::slice_mut(&mut got),
                            Arg::slice(&cos),
                            Arg::slice(&sin),
                            Arg::I32(rows as i32),
                            Arg::I32(seq as i32),
                            Arg::I32(heads as i32),
                            Arg::I32(hd as i32),
                            Arg::I32(inverse as i32),
                        ],
                    );
                    close(&got, &want, &scale, &case);
                }
            }
        }
    }

    #[test]
    fn activations_equal_their_twins() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        const C: f32 = 0.044_715;
        for n in [1, 7, 33, 1000, 4099] {
            let case = format!("seed {seed}, n {n}");
            let x = randn(&mut rng, n, 4.0);
            let dy = randn(&mut rng, n, 1.0);
            let mut y_w = vec![0.0; n];
            activations::gelu_forward(&x, &mut y_w);
            let mut dx_w = vec![0.0; n];
            activations::gelu_backward(&x, &dy, &mut dx_w);
            // tanh within a few ulp of 1 where it saturates, times the factors around it.
            let y_scale: Vec<f32> = x.iter().map(|v| 1.0 + v.abs()).collect();
            let dx_scale: Vec<f32> = x
                .iter()
                .zip(&dy)
                .map(|(v, g)| g.abs() * (1.0 + v.abs() * (1.0 + 3.0 * C * v * v)))
                .collect();
            for dims in grids(gelu_dims(n)) {
                let mut y = vec![f32::NAN; n];
                go(
                    "gelu_forward",
                    dims,
                    &mut [Arg::slice(&x), Arg::slice_mut(&mut y), Arg::I32(n as i32)],
                );
                close(&y, &y_w, &y_scale, &format!("gelu {case}"));
                // dx starts as garbage: the backward overwrites it, as the twin.
                let mut dx = vec![1e30; n];
                go(
                    "gelu_backward",
                    dims,
                    &mut [
                        Arg::slice(&x),
                        Arg::slice(&dy),
                        Arg::slice_mut(&mut dx),
                        Arg::I32(n as i32),
                    ],
                );
                close(&dx, &dx_w, &dx_scale, &format!("gelu' {case}"));
            }
        }
        for (rows, f) in [(1, 1), (5, 7), (33, 33), (129, 130)] {
            let case = format!("seed {seed}, swiglu {rows}x{f}");
            let mut z = randn(&mut rng, rows * 2 * f, 5.0);
            // The clamp's edges exactly, and beyond them.
            let len = z.len();
            for (i, v) in [7.0, -7.0, 7.5, -7.5, 6.99].into_iter().enumerate() {
                z[(i * 7919) % len] = v;
            }
            let dy = randn(&mut rng, rows * f, 1.0);
            let mut y_w = vec![0.0; rows * f];
            activations::swiglu_forward(&z, f, &mut y_w);
            let mut dz_w = vec![0.0; rows * 2 * f];
            activations::swiglu_backward(&z, &dy, f, &mut dz_w);
            // y = g·σ(αg)·(l + 1): l + 1 cancels; dz: 1 - σ cancels, times |g|α.
            let (mut y_scale, mut dz_scale) = (vec![0.0; rows * f], vec![0.0; rows * 2 * f]);
            for r in 0..rows {
                for j in 0..f {
                    let (g, l) = (
                        z[r * 2 * f + j].min(7.0),
                        z[r * 2 * f + f + j].clamp(-7.0, 7.0),
                    );
                    let d = dy[r * f + j].abs();
                    y_scale[r * f + j] = g.abs() * (l.abs() + 1.0);
                    dz_scale[r * 2 * f + j] = d * (l.abs() + 1.0) * (1.0 + g.abs() * 1.702);
                    dz_scale[r * 2 * f + f + j] = d * g.abs();
                }
            }
            for dims in grids(swiglu_dims(rows, f)) {
                let mut y = vec![f32::NAN; rows * f];
                go(
                    "swiglu_forward",
                    dims,
                    &mut [
                        Arg::slice(&z),
                        Arg::slice_mut(&mut y),
                        Arg::I32(rows as i32),
                        Arg::I32(f as i32),
                    ],
                );
                close(&y, &y_w, &y_scale, &case);
                let mut dz = vec![1e30; rows * 2 * f];
                go(
                    "swiglu_backward",
                    dims,
                    &mut [
                        Arg::slice(&z),
                        Arg::slice(&dy),
                        Arg::slice_mut(&mut dz),
                        Arg::I32(rows as i32),
                        Arg::I32(f as i32),
                    ],
                );
                close(&dz, &dz_w, &dz_scale, &format!("{case} backward"));
                // Where a clamp is active the gradient is exactly zero.
                for (i, &v) in z.iter().enumerate() {
                    let gate = i % (2 * f) < f;
                    if (gate && v > 7.0) || (!gate && v.abs() > 7.0) {
                        assert_eq!(dz[i], 0.0, "{case}: clamped element {i}");
                    }
                }
            }
        }
    }

    /// sum_f64 into out[0]; returns it.
    fn sum_f64(x: &[f64], dims: LaunchDims) -> f64 {
        let mut out = [f64::NAN];
        go(
            "sum_f64",
            dims,
            &mut [
                Arg::slice(x),
                Arg::slice_mut(&mut out),
                Arg::I32(x.len() as i32),
            ],
        );
        out[0]
    }

    #[test]
    fn sum_f64_is_the_sum_in_any_grid_and_deterministic() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        for n in [1, 7, 255, 256, 257, 1000, 70001] {
            let x: Vec<f64> = (0..n).map(|_| rng.normal() * 1e3).collect();
            let want: f64 = x.iter().sum();
            let bound: f64 = x.iter().map(|v| v.abs()).sum::<f64>() * 1e-13;
            let first = sum_f64(&x, sum_f64_dims());
            assert!(
                (first - want).abs() <= bound,
                "seed {seed}, n {n}: {first} against {want}"
            );
            // A larger grid changes nothing: the other blocks return.
            let mut wide = sum_f64_dims();
            wide.grid[0] = 3;
            assert_eq!(first.to_bits(), sum_f64(&x, sum_f64_dims()).to_bits());
            assert_eq!(first.to_bits(), sum_f64(&x, wide).to_bits());
        }
    }

    #[test]
    fn softmax_xent_equals_its_twin() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        for (rows, vocab) in [(1, 3), (5, 3), (5, 1000), (33, 1000), (129, 3)] {
            let logits = randn(&mut rng, rows * vocab, 3.0);
            let free: Vec<u32> = (0..rows).map(|_| below(&mut rng, vocab)).collect();
            let p = below(&mut rng, vocab);
            // About a third of the rows padded; and a batch all padding.
            let mut some_pad = free.clone();
            for t in some_pad.iter_mut() {
                if rng.uniform() < 0.33 {
                    *t = p;
                }
            }
            let cases = [
                (free.clone(), None),
                (some_pad, Some(p)),
                (vec![p; rows], Some(p)),
            ];
            for (targets, pad) in cases {
                let counted = targets.iter().filter(|&&t| Some(t) != pad).count();
                let inv = xent_inv_count(counted);
                for want_grad in [false, true] {
                    let case =
                        format!("seed {seed}, {rows}x{vocab}, pad {pad:?}, want_grad {want_grad}");
                    let mut grad_w = logits.clone();
                    let (total_w, _) =
                        xent::softmax_xent(&mut grad_w, &targets, vocab, pad, want_grad);
                    // Each row's loss, from the twin on that row alone.
                    let mut row_w = vec![0.0f64; rows];
                    let mut row_scale = vec![0.0f64; rows];
                    for r in 0..rows {
                        let mut one = logits[r * vocab..(r + 1) * vocab].to_vec();
                        let t = targets[r];
                        (row_w[r], _) = xent::softmax_xent(&mut one, &[t], vocab, pad, false);
                        // loss = lse - x_t, with |lse| <= loss + |x_t|.
                        let xt = logits[r * vocab + t as usize].abs() as f64;
                        row_scale[r] = row_w[r].abs() + 2.0 * xt + 1.0;
                    }
                    // The emulator starts a thread per GPU thread, so each block costs: one
                    // block a row only up to 5 rows; a 2-block grid (looping over rows) always.
                    let [full, small] = grids(xent_dims(rows));
                    let launches = if rows <= 5 {
                        vec![full, small]
                    } else {
                        vec![small]
                    };
                    let mut runs = Vec::new();
                    for dims in launches {
                        let mut grad = logits.clone();
                        let mut loss = vec![f64::NAN; rows];
                        go(
                            "softmax_xent",
                            dims,
                            &mut [
                                Arg::slice_mut(&mut grad),
                                Arg::slice(&targets),
                                Arg::slice_mut(&mut loss),
                                Arg::I32(rows as i32),
                                Arg::I32(vocab as i32),
                                Arg::I32(xent_pad(pad)),
                                Arg::I32(want_grad as i32),
                                Arg::F32(inv),
                            ],
                        );
                        for r in 0..rows {
                            let err = (loss[r] - row_w[r]).abs();
                            assert!(
                                err <= 1e-5 * row_scale[r],
                                "{case}: row {r}: loss {} against {}",
                                loss[r],
                                row_w[r]
                            );
                            if pad == Some(targets[r]) {
                                assert_eq!(loss[r], 0.0, "{case}: pad row {r}");
                            }
                        }
                        if want_grad {
                            // p·inv, and (p - 1)·inv at the target: within ulps of inv.
                            close(&grad, &grad_w, &vec![inv; grad.len()], &case);
                        } else {
                            assert_eq!(bits(&grad), bits(&logits), "{case}: logits kept");
                        }
                        runs.push((bits(&grad), loss));
                    }
                    // Each row's result does not depend on the grid.
                    assert!(runs.iter().all(|r| *r == runs[0]), "{case}: grids differ");
                    let total = sum_f64(&runs[0].1, sum_f64_dims());
                    let bound: f64 = row_scale.iter().sum::<f64>() * 1e-5;
                    assert!(
                        (total - total_w).abs() <= bound,
                        "{case}: total {total} against {total_w}"
                    );
                }
            }
        }
    }

    #[test]
    fn adamw_and_the_global_norm_equal_their_twins() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        for n in [1, 7, 1000, 8193] {
            for t in [1u64, 1000] {
                let case = format!("seed {seed}, n {n}, step {t}");
                let s = crate::nn::backend::AdamWStep {
                    lr: 1e-3,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.1,
                    t,
                    grad_scale: 0.7,
                };
                let p0 = randn(&mut rng, n, 1.0);
                let g = randn(&mut rng, n, 1.0);
                let m0 = randn(&mut rng, n, 0.1);
                let v0: Vec<f32> = randn(&mut rng, n, 0.1).iter().map(|x| x * x).collect();
                let (mut p_w, mut m_w, mut v_w) = (p0.clone(), m0.clone(), v0.clone());
                adamw::adamw_update(&mut p_w, &g, &mut m_w, &mut v_w, &s);
                let (inv_bc1, inv_sqrt_bc2) = adamw_bias_corrections(s.beta1, s.beta2, t);
                // m sums two terms that may cancel; p moves by lr·(mhat/denom + wd·p).
                let m_scale: Vec<f32> = (0..n)
                    .map(|i| (s.beta1 * m0[i]).abs() + (0.1 * g[i] * s.grad_scale).abs())
                    .collect();
                let p_scale: Vec<f32> = (0..n)
                    .map(|i| {
                        let denom = v_w[i].sqrt() * inv_sqrt_bc2 + s.eps;
                        let step = (m_w[i] * inv_bc1 / denom).abs() + s.weight_decay * p0[i].abs();
                        p0[i].abs() + s.lr * step
                    })
                    .collect();
                for dims in grids(adamw_dims(n)) {
                    let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
                    go(
                        "adamw_update",
                        dims,
                        &mut [
                            Arg::slice_mut(&mut p),
                            Arg::slice(&g),
                            Arg::slice_mut(&mut m),
                            Arg::slice_mut(&mut v),
                            Arg::I32(n as i32),
                            Arg::F32(s.lr),
                            Arg::F32(s.beta1),
                            Arg::F32(s.beta2),
                            Arg::F32(s.eps),
                            Arg::F32(s.weight_decay),
                            Arg::F32(inv_bc1),
                            Arg::F32(inv_sqrt_bc2),
                            Arg::F32(s.grad_scale),
                        ],
                    );
                    close(&m, &m_w, &m_scale, &format!("m {case}"));
                    close(&v, &v_w, &vec![0.0; n], &format!("v {case}"));
                    close(&p, &p_w, &p_scale, &format!("p {case}"));
                }
            }
        }
        for n in [1, 7, 16384, 16385, 50001] {
            let case = format!("seed {seed}, norm of {n}");
            let x = randn(&mut rng, n, 1.0);
            let want = crate::nn::cpu::rowops::sum_squares(&x).sqrt();
            let mut norms = Vec::new();
            for dims in grids(sum_squares_dims(n)) {
                for _ in 0..2 {
                    let mut partial = vec![f64::NAN; sum_squares_partials(n)];
                    go(
                        "sum_squares_partial",
                        dims,
                        &mut [
                            Arg::slice(&x),
                            Arg::I32(n as i32),
                            Arg::slice_mut(&mut partial),
                        ],
                    );
                    let norm = sum_f64(&partial, sum_f64_dims()).sqrt();
                    assert!(
                        (norm - want).abs() <= 1e-12 * want,
                        "{case}: {norm} against {want}"
                    );
                    norms.push(norm.to_bits());
                }
            }
            // The same bits twice and whatever the grid.
            assert!(norms.iter().all(|&b| b == norms[0]), "{case}: {norms:?}");
        }
    }

    #[test]
    fn embedding_segments_group_positions_by_token_in_order() {
        let (order, starts, seg_tokens) = embedding_segments(&[3, 1, 3, 0, 1, 3]);
        assert_eq!(order, [3, 1, 4, 0, 2, 5]);
        assert_eq!(starts, [0, 1, 3, 6]);
        assert_eq!(seg_tokens, [0, 1, 3]);
        assert_eq!(embedding_segments(&[]), (vec![], vec![0], vec![]));
    }

    #[test]
    fn embedding_equals_the_models_lookup_and_scatter() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        for (n, d, vocab) in [
            (1, 1, 3),
            (5, 7, 3),
            (33, 33, 50),
            (129, 130, 50),
            (129, 1, 3),
        ] {
            let case = format!("seed {seed}, {n} tokens, d {d}, vocab {vocab}");
            let table = randn(&mut rng, vocab * d, 1.0);
            let tokens: Vec<u32> = (0..n).map(|_| below(&mut rng, vocab)).collect();
            let want: Vec<f32> = tokens
                .iter()
                .flat_map(|&t| table[t as usize * d..(t as usize + 1) * d].to_vec())
                .collect();
            // The backward as Model::backward's closing loop: rows added in token order.
            let dx = randn(&mut rng, n * d, 1.0);
            let mut dtable_w = randn(&mut rng, vocab * d, 1.0);
            let dtable0 = dtable_w.clone();
            for (t, &tok) in tokens.iter().enumerate() {
                let tok = tok as usize;
                for i in 0..d {
                    dtable_w[tok * d + i] += dx[t * d + i];
                }
            }
            let (order, starts, seg_tokens) = embedding_segments(&tokens);
            for dims in grids(embedding_forward_dims(n, d)) {
                let mut out = vec![f32::NAN; n * d];
                go(
                    "embedding_forward",
                    dims,
                    &mut [
                        Arg::slice(&table),
                        Arg::slice(&tokens),
                        Arg::slice_mut(&mut out),
                        Arg::I32(n as i32),
                        Arg::I32(d as i32),
                    ],
                );
                assert_eq!(bits(&out), bits(&want), "forward {case}");
            }
            for dims in grids(embedding_backward_dims(seg_tokens.len())) {
                let mut dtable = dtable0.clone();
                go(
                    "embedding_backward",
                    dims,
                    &mut [
                        Arg::slice(&dx),
                        Arg::slice(&order),
                        Arg::slice(&starts),
                        Arg::slice(&seg_tokens),
                        Arg::slice_mut(&mut dtable),
                        Arg::I32(seg_tokens.len() as i32),
                        Arg::I32(d as i32),
                    ],
                );
                // The same additions in the same order: the same bits.
                assert_eq!(bits(&dtable), bits(&dtable_w), "backward {case}");
            }
        }
    }

    #[test]
    fn add_assign_equals_its_twin() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        for n in [1, 7, 1000, 4099] {
            let (y0, x) = (randn(&mut rng, n, 1.0), randn(&mut rng, n, 1.0));
            let mut want = y0.clone();
            rowops::add_assign(&mut want, &x);
            for dims in grids(add_assign_dims(n)) {
                let mut y = y0.clone();
                go(
                    "add_assign",
                    dims,
                    &mut [Arg::slice_mut(&mut y), Arg::slice(&x), Arg::I32(n as i32)],
                );
                assert_eq!(bits(&y), bits(&want), "seed {seed}, n {n}");
            }
        }
    }

    /// The nearest bf16 by search: of the two bf16 around x (truncation and the next one up in
    /// magnitude), the closer in f64, the even one on a tie.
    fn nearest_bf16(x: f32) -> u16 {
        let lo = (x.to_bits() >> 16) as u16;
        if x.is_infinite() {
            return lo;
        }
        let hi = lo + 1;
        let widen = |h: u16| f64::from(f32::from_bits(u32::from(h) << 16));
        if hi & 0x7f80 == 0x7f80 && hi & 0x7f == 0 && widen(lo).is_finite() {
            // lo is the largest finite; past it the next one up is infinity.
            let gap = widen(lo) - widen(lo - 1);
            let half_up = widen(lo).abs() + gap / 2.0;
            return if f64::from(x).abs() >= half_up {
                hi
            } else {
                lo
            };
        }
        let (dl, dh) = (
            (f64::from(x) - widen(lo)).abs(),
            (widen(hi) - f64::from(x)).abs(),
        );
        if dl < dh || (dl == dh && lo.is_multiple_of(2)) {
            lo
        } else {
            hi
        }
    }

    #[test]
    fn round_bf16_equals_its_twin_and_rounds_to_nearest_even() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let mut x = randn(&mut rng, 3000, 10.0);
        // Ties (exactly half a bf16 step) both ways, subnormals, the largest finite f32 and
        // bf16 neighbours, infinities, zeros and NaN.
        x.extend(
            [
                0x3f80_8000u32,
                0x3f81_8000,
                0xbf80_8000,
                0x0000_0001,
                0x0001_8000,
                0x7f7f_ffff,
                0x7f7f_7fff,
                0x7f7f_8000,
                0xff7f_ffff,
                0x7f80_0000,
                0xff80_0000,
                0,
                0x8000_0000,
            ]
            .map(f32::from_bits),
        );
        x.extend((0..500).map(|_| f32::from_bits(rng.next_u64() as u32)));
        let mut want = vec![Bf16::default(); x.len()];
        rowops::round_bf16(&x, &mut want);
        for (&v, w) in x.iter().zip(&want) {
            if v.is_nan() {
                assert!(w.to_f32().is_nan(), "seed {seed}: NaN {:#x}", v.to_bits());
            } else {
                assert_eq!(
                    w.0,
                    nearest_bf16(v),
                    "seed {seed}: {v:e} ({:#x})",
                    v.to_bits()
                );
            }
        }
        let n = x.len();
        for dims in grids(elementwise_dims(n)) {
            let mut got = vec![Bf16(0xdead); n];
            go(
                "round_bf16",
                dims,
                &mut [Arg::slice(&x), Arg::slice_mut(&mut got), Arg::I32(n as i32)],
            );
            assert_eq!(got, want, "seed {seed}");
        }
    }

    #[test]
    fn grids_stay_valid_for_large_shapes() {
        let big = [
            rmsnorm_forward_dims(1 << 26),
            rmsnorm_backward_dims(1 << 31),
            column_sums_dims(1 << 20),
            rope_dims(1 << 24, 64, 128),
            gelu_dims(i32::MAX as usize),
            swiglu_dims(1 << 20, 1 << 14),
            xent_dims(1 << 26),
            sum_f64_dims(),
            adamw_dims(i32::MAX as usize),
            sum_squares_dims(i32::MAX as usize),
            embedding_forward_dims(1 << 20, 4096),
            embedding_backward_dims(1 << 20),
            add_assign_dims(i32::MAX as usize),
            gelu_dims(0),
            xent_dims(0),
        ];
        for d in big {
            assert!((1..=i32::MAX as u32).contains(&d.grid[0]), "{d:?}");
            assert!(d.grid[1] == 1 && d.grid[2] == 1, "{d:?}");
            assert!(d.block[0].is_power_of_two() && d.block[0] <= 1024, "{d:?}");
        }
        // The reduction trees assume power-of-two blocks within their shared arrays.
        assert!(xent_dims(1).block[0] <= constant("XENT_BLOCK"));
        assert_eq!(rmsnorm_partials(129), 3);
        assert_eq!(sum_squares_partials(16385), 2);
    }
}
