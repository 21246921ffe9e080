//! A 2-D UMAP layout from a precomputed nearest-neighbour graph, seeded and single-threaded so
//! that a seed gives the same map every time (docs/umap-crates.md says why not a crate).
//!
//! As umap-learn does it: each point's neighbour distances become membership strengths (smooth
//! kNN distances, local connectivity 1), the directed graph is symmetrised by fuzzy union, and
//! the layout is fitted by SGD over the edges, each sampled in proportion to its weight, with
//! negative sampling for repulsion; the curve 1 / (1 + a·d^2b) is fitted to `min_dist`.

use crate::nn::rng::Rng;

#[derive(Debug, Clone)]
pub struct Params {
    /// Epochs; by default 500 up to 10,000 points, 200 above (umap-learn's rule).
    pub epochs: Option<usize>,
    pub min_dist: f32,
    pub spread: f32,
    pub learning_rate: f32,
    /// Negative samples per positive edge sample.
    pub negative_rate: usize,
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            epochs: None,
            min_dist: 0.1,
            spread: 1.0,
            learning_rate: 1.0,
            negative_rate: 5,
            seed: 0,
        }
    }
}

/// `a` and `b` of the curve 1 / (1 + a·d^2b) closest (least squares, Gauss–Newton) to 1 below
/// `min_dist` and exp(−(d − min_dist) / spread) above it.
pub fn curve(spread: f32, min_dist: f32) -> (f32, f32) {
    let (spread, min_dist) = (spread as f64, min_dist as f64);
    let xs: Vec<f64> = (1..300).map(|i| 3.0 * spread * i as f64 / 299.0).collect();
    let target = |x: f64| match x < min_dist {
        true => 1.0,
        false => (-(x - min_dist) / spread).exp(),
    };
    let (mut a, mut b) = (1.0f64, 1.0f64);
    for _ in 0..200 {
        let (mut jtj, mut jtr) = ([[0.0f64; 2]; 2], [0.0f64; 2]);
        for &x in &xs {
            let x2b = x.powf(2.0 * b);
            let f = 1.0 / (1.0 + a * x2b);
            let r = f - target(x);
            let g = [-x2b * f * f, -a * x2b * 2.0 * x.ln() * f * f];
            for p in 0..2 {
                jtr[p] += g[p] * r;
                for q in 0..2 {
                    jtj[p][q] += g[p] * g[q];
                }
            }
        }
        let det = jtj[0][0] * jtj[1][1] - jtj[0][1] * jtj[1][0];
        if det.abs() < 1e-300 {
            break;
        }
        let da = (jtj[1][1] * jtr[0] - jtj[0][1] * jtr[1]) / det;
        let db = (jtj[0][0] * jtr[1] - jtj[1][0] * jtr[0]) / det;
        a -= da;
        b -= db;
        if da.abs() < 1e-12 && db.abs() < 1e-12 {
            break;
        }
    }
    (a as f32, b as f32)
}

/// Membership strengths of each point's `k` neighbours from their distances (row-major n×k,
/// nearest first): exp(−(d − ρ) / σ), ρ the nearest non-zero distance, σ chosen by bisection so
/// that the strengths sum to log2(k).
fn memberships(k: usize, dist: &[f32]) -> Vec<f32> {
    let target = (k as f64).log2();
    let mean_all = dist.iter().map(|&d| d as f64).sum::<f64>() / dist.len().max(1) as f64;
    let mut w = vec![0f32; dist.len()];
    for (row, out) in dist.chunks(k).zip(w.chunks_mut(k)) {
        let rho = row.iter().copied().find(|&x| x > 0.0).unwrap_or(0.0) as f64;
        let sum = |sigma: f64| -> f64 {
            row.iter()
                .map(|&x| (-(x as f64 - rho).max(0.0) / sigma).exp())
                .sum()
        };
        let (mut lo, mut hi, mut sigma) = (0.0f64, f64::INFINITY, 1.0f64);
        for _ in 0..64 {
            let s = sum(sigma);
            if (s - target).abs() < 1e-5 {
                break;
            }
            if s > target {
                hi = sigma;
                sigma = (lo + hi) / 2.0;
            } else {
                lo = sigma;
                sigma = if hi.is_infinite() {
                    sigma * 2.0
                } else {
                    (lo + hi) / 2.0
                };
            }
        }
        let mean_row = row.iter().map(|&x| x as f64).sum::<f64>() / k as f64;
        let sigma = sigma.max(1e-3 * if rho > 0.0 { mean_row } else { mean_all });
        for (o, &x) in out.iter_mut().zip(row) {
            *o = (-(x as f64 - rho).max(0.0) / sigma).exp() as f32;
        }
    }
    w
}

/// The symmetric graph: w_ij + w_ji − w_ij·w_ji for every pair that is a neighbour either way,
/// as (i, j, weight) edges in a fixed order.
fn fuzzy_union(n: usize, k: usize, neighbours: &[u32], w: &[f32]) -> Vec<(u32, u32, f32)> {
    // Each directed strength twice: as its own edge (forward) and as its transpose (backward).
    let mut directed: Vec<(u32, u32, f32, bool)> = Vec::with_capacity(2 * neighbours.len());
    for i in 0..n {
        for t in 0..k {
            let (j, s) = (neighbours[i * k + t], w[i * k + t]);
            if j as usize != i && s > 0.0 {
                directed.push((i as u32, j, s, true));
                directed.push((j, i as u32, s, false));
            }
        }
    }
    directed.sort_unstable_by_key(|e| (e.0, e.1, e.3));
    let mut edges = Vec::new();
    for pair in directed.chunk_by(|x, y| (x.0, x.1) == (y.0, y.1)) {
        let strongest = |forward: bool| {
            pair.iter()
                .filter(|e| e.3 == forward)
                .fold(0f32, |m, e| m.max(e.2))
        };
        let (f, b) = (strongest(true), strongest(false));
        edges.push((pair[0].0, pair[0].1, f + b - f * b));
    }
    edges
}

/// The 2-D layout of `n` points from their `k` nearest neighbours (row-major n×k indices and
/// distances, nearest first, each point's own index left out).
pub fn embed(n: usize, k: usize, neighbours: &[u32], dist: &[f32], p: &Params) -> Vec<[f32; 2]> {
    assert_eq!(neighbours.len(), n * k, "n × k neighbours");
    assert_eq!(dist.len(), n * k, "n × k distances");
    let mut rng = Rng::new(p.seed);
    let uniform = |rng: &mut Rng| rng.uniform() as f32;
    let mut y: Vec<[f32; 2]> = (0..n)
        .map(|_| {
            [
                uniform(&mut rng) * 20.0 - 10.0,
                uniform(&mut rng) * 20.0 - 10.0,
            ]
        })
        .collect();
    if n < 2 || k == 0 {
        return y;
    }
    let mut edges = fuzzy_union(n, k, neighbours, &memberships(k, dist));
    let epochs = p.epochs.unwrap_or(if n <= 10_000 { 500 } else { 200 });
    let strongest = edges.iter().fold(0f32, |m, e| m.max(e.2));
    // An edge is sampled once every strongest/weight epochs: too weak to be sampled at all, out.
    edges.retain(|e| e.2 >= strongest / epochs as f32);
    let every: Vec<f64> = edges.iter().map(|e| (strongest / e.2) as f64).collect();
    let every_negative: Vec<f64> = every.iter().map(|&e| e / p.negative_rate as f64).collect();
    let mut next = every.clone();
    let mut next_negative = every_negative.clone();
    let (a, b) = curve(p.spread, p.min_dist);
    let clip = |g: f32| g.clamp(-4.0, 4.0);
    for epoch in 0..epochs {
        let alpha = p.learning_rate * (1.0 - epoch as f32 / epochs as f32);
        let now = epoch as f64;
        for (e, &(i, j, _)) in edges.iter().enumerate() {
            if next[e] > now {
                continue;
            }
            let (i, j) = (i as usize, j as usize);
            let (dx, dy) = (y[i][0] - y[j][0], y[i][1] - y[j][1]);
            let d2 = dx * dx + dy * dy;
            if d2 > 0.0 {
                let pw = d2.powf(b);
                let attract = -2.0 * a * b * pw / d2 / (a * pw + 1.0);
                let (gx, gy) = (clip(attract * dx) * alpha, clip(attract * dy) * alpha);
                y[i][0] += gx;
                y[i][1] += gy;
                y[j][0] -= gx;
                y[j][1] -= gy;
            }
            next[e] += every[e];
            let negatives = ((now - next_negative[e]) / every_negative[e]).max(0.0) as usize;
            for _ in 0..negatives {
                let q = (rng.next_u64() % n as u64) as usize;
                if q == i {
                    continue;
                }
                let (dx, dy) = (y[i][0] - y[q][0], y[i][1] - y[q][1]);
                let d2 = dx * dx + dy * dy;
                if d2 > 0.0 {
                    let repel = 2.0 * b / ((0.001 + d2) * (a * d2.powf(b) + 1.0));
                    y[i][0] += clip(repel * dx) * alpha;
                    y[i][1] += clip(repel * dy) * alpha;
                }
            }
            next_negative[e] += negatives as f64 * every_negative[e];
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::cluster::{agreement, nearest_2d};
    use crate::interp::neighbours::InvertedIndex;
    use crate::interp::testing;

    #[test]
    fn the_curve_is_umap_learns() {
        // umap-learn's find_ab_params(1.0, 0.1) gives a = 1.577, b = 0.895.
        let (a, b) = curve(1.0, 0.1);
        assert!(
            (a - 1.577).abs() < 0.01 && (b - 0.895).abs() < 0.01,
            "{a} {b}"
        );
    }

    /// `groups` clusters of `per` circuits, each drawing 8 of 1024 experts from its own 64,
    /// and their 15 nearest neighbours by cosine.
    fn planted(seed: u64, groups: usize, per: usize) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
        let (circuits, labels) = testing::planted(&mut Rng::new(seed), groups, per, 8, 64);
        let found = InvertedIndex::new(&circuits, 1024)
            .unwrap()
            .nearest(&circuits, 15, Some);
        let (mut idx, mut dist) = (Vec::new(), Vec::new());
        for f in found {
            assert_eq!(f.len(), 15);
            idx.extend(f.iter().map(|x| x.index as u32));
            dist.extend(f.iter().map(|x| 1.0 - x.cosine));
        }
        (labels, idx, dist)
    }

    #[test]
    fn planted_clusters_stay_apart_and_a_seed_gives_the_same_map() {
        let seed = testing::fresh_seed();
        let (labels, idx, dist) = planted(seed, 5, 120);
        let n = labels.len();
        let p = Params {
            seed,
            epochs: Some(200),
            ..Params::default()
        };
        let map = embed(n, 15, &idx, &dist, &p);
        let kept = agreement(&nearest_2d(&map, 15), &labels).unwrap();
        assert!(
            kept > 0.95,
            "seed {seed}: 2-D neighbours share a cluster {kept}"
        );
        assert!(map.iter().flatten().all(|v| v.is_finite()));
        let again = embed(n, 15, &idx, &dist, &p);
        assert!(map == again, "seed {seed}: the same seed, another map");
        let other = embed(
            n,
            15,
            &idx,
            &dist,
            &Params {
                seed: seed ^ 1,
                ..p
            },
        );
        assert!(map != other, "the seed is used");
    }
}
