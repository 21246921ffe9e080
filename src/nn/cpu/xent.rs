//! Fused softmax cross-entropy: turns logits into their gradient in place.

use super::isa::Isa;
use super::real::Real;
use super::vmath;
use rayon::prelude::*;

/// logits: [rows, vocab], overwritten with d(mean loss)/d(logits). Rows whose target equals
/// `pad` are masked (zero gradient, not counted). Returns (sum of losses, counted rows); the
/// sum is accumulated in f64 in row order, so the result is deterministic.
pub fn softmax_xent<T: Real>(
    logits: &mut [T],
    targets: &[u32],
    vocab: usize,
    pad: Option<u32>,
    want_grad: bool,
) -> (f64, usize) {
    let counted = targets.iter().filter(|&&t| Some(t) != pad).count();
    let inv = if counted > 0 {
        1.0 / counted as f64
    } else {
        0.0
    };
    let isa = Isa::current();
    let losses: Vec<f64> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &tgt)| {
            if Some(tgt) == pad {
                if want_grad {
                    row.fill(T::ZERO);
                }
                return 0.0;
            }
            isa.run(
                #[inline(always)]
                |_| {
                    let mx = vmath::max(row);
                    let sum = vmath::sum_map(row, |x| (x - mx).vexp());
                    let lse = mx + sum.ln();
                    let loss = (lse - row[tgt as usize]).to_f64();
                    if want_grad {
                        let scale = T::from_f64(inv);
                        let k = scale / sum;
                        for x in row.iter_mut() {
                            *x = (*x - mx).vexp() * k;
                        }
                        row[tgt as usize] -= scale;
                    }
                    loss
                },
            )
        })
        .collect();
    (losses.iter().sum(), counted)
}
