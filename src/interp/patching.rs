//! The measures of factual recall under gating patching (SPEC §7): a fact's answer may be
//! spelt by several tokens (" slow", "slow", " Slow"), so each side of a comparison is a set of
//! token ids and its logit is their logsumexp.

/// logsumexp of `logits` at `ids` (−∞ for no ids).
pub fn logsumexp(logits: &[f32], ids: &[u32]) -> f64 {
    log_sum_exp(ids.iter().map(|&i| logits[i as usize]))
}

/// log Σ exp(x) over `values`, stable for large ones (−∞ for none).
pub fn log_sum_exp(values: impl Iterator<Item = f32> + Clone) -> f64 {
    let max = values
        .clone()
        .map(f64::from)
        .fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + values.map(|x| (x as f64 - max).exp()).sum::<f64>().ln()
}

/// LD = logsumexp(logits[clean answers]) − logsumexp(logits[counterfactual answers]).
pub fn logit_difference(logits: &[f32], clean: &[u32], counterfactual: &[u32]) -> f64 {
    logsumexp(logits, clean) - logsumexp(logits, counterfactual)
}

/// The share of the clean-to-counterfactual change in LD that patching brings about:
/// (LD_clean − LD_patched) / (LD_clean − LD_cf); 1 when the patched run answers as the
/// counterfactual one, 0 when patching changed nothing. `None` when the two runs do not differ.
pub fn recovered_effect(ld_clean: f64, ld_counterfactual: f64, ld_patched: f64) -> Option<f64> {
    let span = ld_clean - ld_counterfactual;
    (span.abs() > 1e-9).then(|| (ld_clean - ld_patched) / span)
}

/// Whether the counterfactual answer outranks the clean one: its best-scoring spelling above
/// every spelling of the clean answer.
pub fn rank_flip(logits: &[f32], clean: &[u32], counterfactual: &[u32]) -> bool {
    let best = |ids: &[u32]| {
        ids.iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max)
    };
    best(counterfactual) > best(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_as_the_spec_defines_them() {
        let logits = [0.0f32, 2.0, 1.0, (3.0f32).ln(), -1.0];
        // Clean answer spelt by tokens 1 and 2, counterfactual by 3 alone.
        let want = (2f64.exp() + 1f64.exp()).ln() - 3f64.ln();
        assert!((logit_difference(&logits, &[1, 2], &[3]) - want).abs() < 1e-6);
        assert!(!rank_flip(&logits, &[1, 2], &[3]));
        assert!(rank_flip(&logits, &[4], &[3]));
        assert_eq!(
            recovered_effect(4.0, -2.0, 4.0),
            Some(0.0),
            "nothing changed"
        );
        assert_eq!(recovered_effect(4.0, -2.0, -2.0), Some(1.0), "all of it");
        assert_eq!(recovered_effect(4.0, -2.0, 1.0), Some(0.5));
        assert_eq!(recovered_effect(1.0, 1.0, 0.0), None);
        // A large logit does not overflow.
        let big = [1000.0f32, 999.0];
        assert!((logit_difference(&big, &[0, 1], &[1]) - (1.0 + 1f64.exp()).ln()).abs() < 1e-6);
    }
}
