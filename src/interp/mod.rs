//! Interpretability analyses of trained models, free of stage plumbing: nearest neighbours
//! between feedforward circuits, their 2-D map and how well they cluster, and the measures of
//! recall under gating patching.

pub mod cluster;
pub mod gating;
pub mod neighbours;
pub mod patching;
pub mod recall;
pub mod umap;

/// Inputs with known structure, for the analyses' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::neighbours::{random_circuits, Circuits};
    use crate::nn::rng::Rng;

    /// A seed from the clock: each test run draws fresh inputs (and names the seed on failure).
    pub fn fresh_seed() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    /// `groups` × `per` circuits of `k` experts; group g draws them from its own `pool`
    /// experts (g·pool onwards), so that circuits of different groups share none. Returns the
    /// circuits and each one's group.
    pub fn planted(
        rng: &mut Rng,
        groups: usize,
        per: usize,
        k: usize,
        pool: usize,
    ) -> (Circuits, Vec<u32>) {
        let mut all = Circuits {
            k,
            experts: Vec::new(),
            scores: Vec::new(),
        };
        for g in 0..groups {
            let group = random_circuits(rng, per, k, pool);
            all.experts
                .extend(group.experts.iter().map(|e| e + (g * pool) as u32));
            all.scores.extend(group.scores);
        }
        let labels = (0..groups * per).map(|i| (i / per) as u32).collect();
        (all, labels)
    }
}
