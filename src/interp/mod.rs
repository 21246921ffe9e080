//! Interpretability analyses of trained models, free of stage plumbing: nearest neighbours
//! between feedforward circuits, their 2-D map and how well they cluster, and the measures of
//! recall under gating patching.

pub mod cluster;
pub mod neighbours;
pub mod patching;
pub mod umap;

/// Inputs with known structure, for the analyses' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::neighbours::Circuits;
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
        let (mut experts, mut labels) = (Vec::new(), Vec::new());
        for g in 0..groups {
            for _ in 0..per {
                let start = experts.len();
                while experts.len() - start < k {
                    let e = (g * pool) as u32 + (rng.next_u64() % pool as u64) as u32;
                    if !experts[start..].contains(&e) {
                        experts.push(e);
                    }
                }
                labels.push(g as u32);
            }
        }
        let scores = (0..experts.len())
            .map(|_| 0.5 + rng.uniform() as f32)
            .collect();
        (Circuits { k, experts, scores }, labels)
    }
}
