//! How well circuits cluster by a label (their input token, or its semantic class): the mean
//! fraction of each circuit's nearest neighbours that share its label, against the same with
//! the labels shuffled, which is what the label frequencies alone would give.

use crate::nn::rng::Rng;
use rayon::prelude::*;

/// The mean, over items with at least one neighbour, of the fraction of `neighbours[i]` whose
/// label equals `labels[i]`; `None` if no item has a neighbour.
pub fn agreement(neighbours: &[Vec<usize>], labels: &[u32]) -> Option<f64> {
    let fractions: Vec<f64> = neighbours
        .iter()
        .enumerate()
        .filter(|(_, n)| !n.is_empty())
        .map(|(i, n)| {
            let same = n.iter().filter(|&&j| labels[j] == labels[i]).count();
            same as f64 / n.len() as f64
        })
        .collect();
    (!fractions.is_empty()).then(|| fractions.iter().sum::<f64>() / fractions.len() as f64)
}

/// `agreement` with the labels shuffled (Fisher–Yates, seeded), averaged over `rounds`
/// shuffles: the baseline a clustering must beat.
pub fn shuffled_agreement(
    neighbours: &[Vec<usize>],
    labels: &[u32],
    seed: u64,
    rounds: usize,
) -> Option<f64> {
    let mut rng = Rng::new(seed);
    let mut shuffled = labels.to_vec();
    let mut sum = 0.0;
    for _ in 0..rounds.max(1) {
        for i in (1..shuffled.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            shuffled.swap(i, j);
        }
        sum += agreement(neighbours, &shuffled)?;
    }
    Some(sum / rounds.max(1) as f64)
}

/// The `k` nearest other points of each 2-D point (Euclidean, ties to the lower index).
pub fn nearest_2d(points: &[[f32; 2]], k: usize) -> Vec<Vec<usize>> {
    (0..points.len())
        .into_par_iter()
        .map(|i| {
            let [x, y] = points[i];
            let mut d: Vec<(f32, usize)> = points
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(j, p)| ((p[0] - x).powi(2) + (p[1] - y).powi(2), j))
                .collect();
            let order =
                |a: &(f32, usize), b: &(f32, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
            if d.len() > k && k > 0 {
                d.select_nth_unstable_by(k - 1, order);
            }
            d.truncate(k);
            d.sort_unstable_by(order);
            d.into_iter().map(|(_, j)| j).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::neighbours::InvertedIndex;
    use crate::interp::testing::{fresh_seed, planted};

    #[test]
    fn planted_clusters_agree_far_above_the_shuffled_baseline() {
        // Five groups of 40 circuits; each group draws its 4 experts from its own 8.
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let groups = 5;
        let (circuits, labels) = planted(&mut rng, groups, 40, 4, 8);
        let index = InvertedIndex::new(&circuits, groups * 8).unwrap();
        let found: Vec<Vec<usize>> = index
            .nearest(&circuits, 10, Some)
            .into_iter()
            .map(|n| n.into_iter().map(|x| x.index).collect())
            .collect();
        let real = agreement(&found, &labels).unwrap();
        let chance = shuffled_agreement(&found, &labels, seed, 5).unwrap();
        assert_eq!(real, 1.0, "seed {seed}: groups share no expert");
        assert!((chance - 0.2).abs() < 0.08, "seed {seed}: chance {chance}");

        // The same groups as 2-D blobs, far apart, and as one mixed blob.
        let blob = |g: usize, rng: &mut Rng| {
            let c = g as f32 * 10.0;
            [c + rng.uniform() as f32, c + rng.uniform() as f32]
        };
        let points: Vec<[f32; 2]> = labels.iter().map(|&g| blob(g as usize, &mut rng)).collect();
        assert_eq!(agreement(&nearest_2d(&points, 10), &labels), Some(1.0));
        let mixed: Vec<[f32; 2]> = labels.iter().map(|_| blob(0, &mut rng)).collect();
        let mixed = agreement(&nearest_2d(&mixed, 10), &labels).unwrap();
        assert!(mixed < 0.4, "seed {seed}: unclustered points agree {mixed}");
    }

    #[test]
    fn agreement_counts_what_it_says() {
        let neighbours = vec![vec![1, 2], vec![0], vec![], vec![0, 1, 2]];
        let labels = [7, 7, 8, 8];
        // Item 0: 1 of 2; item 1: 1 of 1; item 2 has none; item 3: 1 of 3.
        let want = (0.5 + 1.0 + 1.0 / 3.0) / 3.0;
        assert!((agreement(&neighbours, &labels).unwrap() - want).abs() < 1e-12);
        assert_eq!(agreement(&[vec![], vec![]], &[1, 2]), None);
        let pts = [[0.0, 0.0], [3.0, 0.0], [1.0, 0.0], [1.0, 1.0]];
        assert_eq!(nearest_2d(&pts, 2)[0], [2, 3]);
        assert_eq!(nearest_2d(&pts, 5)[1], [2, 3, 0]);
    }
}
