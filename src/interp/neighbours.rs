//! Exact cosine nearest neighbours between feedforward circuits.
//!
//! A circuit is a token's sparse gating vector in one layer and channel: k (expert, score)
//! pairs out of N experts, zero elsewhere. Two circuits that share no expert have cosine 0, so
//! only circuits sharing an expert can be neighbours, and an inverted index (expert → the
//! circuits that selected it, with their scores) finds them all while reading about k·k·M/N
//! postings per query instead of M dense N-wide dot products.
//!
//! Neighbours are the circuits sharing at least one expert with the query, ranked by cosine
//! (highest first, ties to the lower index); the query itself can be left out.

use rayon::prelude::*;

/// M circuits of k (expert, score) pairs each, flat.
#[derive(Debug, Clone, PartialEq)]
pub struct Circuits {
    pub k: usize,
    pub experts: Vec<u32>,
    pub scores: Vec<f32>,
}

impl Circuits {
    pub fn len(&self) -> usize {
        self.experts.len().checked_div(self.k).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Circuit `i`: its experts and scores.
    pub fn get(&self, i: usize) -> (&[u32], &[f32]) {
        let r = i * self.k..(i + 1) * self.k;
        (&self.experts[r.clone()], &self.scores[r])
    }

    fn norm(&self, i: usize) -> f32 {
        self.get(i).1.iter().map(|s| s * s).sum::<f32>().sqrt()
    }
}

/// A neighbour: the circuit's index and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbour {
    pub index: usize,
    pub cosine: f32,
}

/// The reference circuits by expert.
pub struct InvertedIndex<'a> {
    refs: &'a Circuits,
    norms: Vec<f32>,
    /// Postings of expert e: `postings[starts[e]..starts[e + 1]]`, as (circuit, score).
    starts: Vec<usize>,
    postings: Vec<(u32, f32)>,
}

impl<'a> InvertedIndex<'a> {
    /// Indexes `refs`, whose experts are below `n_experts`; fails on one that is not, or on more
    /// circuits than a u32 counts.
    pub fn new(refs: &'a Circuits, n_experts: usize) -> Result<InvertedIndex<'a>, String> {
        if refs.len() > u32::MAX as usize {
            return Err(format!("{} circuits are too many to index", refs.len()));
        }
        if let Some(&e) = refs.experts.iter().find(|&&e| e as usize >= n_experts) {
            return Err(format!(
                "expert {e} is out of range for {n_experts} experts"
            ));
        }
        // A counting sort by expert: circuits stay in order within each list.
        let mut starts = vec![0usize; n_experts + 1];
        for &e in &refs.experts {
            starts[e as usize + 1] += 1;
        }
        for e in 0..n_experts {
            starts[e + 1] += starts[e];
        }
        let mut fill = starts.clone();
        let mut postings = vec![(0u32, 0f32); refs.experts.len()];
        for (slot, (&e, &s)) in refs.experts.iter().zip(&refs.scores).enumerate() {
            postings[fill[e as usize]] = ((slot / refs.k) as u32, s);
            fill[e as usize] += 1;
        }
        let norms = (0..refs.len()).map(|i| refs.norm(i)).collect();
        Ok(InvertedIndex {
            refs,
            norms,
            starts,
            postings,
        })
    }

    /// The `top` nearest reference circuits to each query circuit, leaving out the reference
    /// `skip(q)` returns for query q (the query itself, when queries are references).
    pub fn nearest(
        &self,
        queries: &Circuits,
        top: usize,
        skip: impl Fn(usize) -> Option<usize> + Sync,
    ) -> Vec<Vec<Neighbour>> {
        (0..queries.len())
            .into_par_iter()
            .map_init(
                || (vec![0f32; self.refs.len()], vec![false; self.refs.len()]),
                |(dot, hit), q| self.nearest_one(queries, q, top, skip(q), dot, hit),
            )
            .collect()
    }

    fn nearest_one(
        &self,
        queries: &Circuits,
        q: usize,
        top: usize,
        skip: Option<usize>,
        dot: &mut [f32],
        hit: &mut [bool],
    ) -> Vec<Neighbour> {
        let (experts, scores) = queries.get(q);
        let mut touched: Vec<u32> = Vec::new();
        for (&e, &s) in experts.iter().zip(scores) {
            let Some(list) = self.starts.get(e as usize..e as usize + 2) else {
                continue; // an expert no reference has
            };
            for &(c, rs) in &self.postings[list[0]..list[1]] {
                if !hit[c as usize] {
                    hit[c as usize] = true;
                    touched.push(c);
                }
                dot[c as usize] += s * rs;
            }
        }
        let qn = queries.norm(q);
        let mut found: Vec<Neighbour> = touched
            .iter()
            .filter(|&&c| Some(c as usize) != skip)
            .map(|&c| Neighbour {
                index: c as usize,
                cosine: cosine(dot[c as usize], qn, self.norms[c as usize]),
            })
            .collect();
        for &c in &touched {
            dot[c as usize] = 0.0;
            hit[c as usize] = false;
        }
        best(&mut found, top);
        found
    }
}

fn cosine(dot: f32, a: f32, b: f32) -> f32 {
    if a == 0.0 || b == 0.0 {
        0.0
    } else {
        dot / (a * b)
    }
}

/// Keeps the `top` best of `found`, best first: highest cosine, ties to the lower index.
fn best(found: &mut Vec<Neighbour>, top: usize) {
    let order = |a: &Neighbour, b: &Neighbour| {
        b.cosine
            .total_cmp(&a.cosine)
            .then_with(|| a.index.cmp(&b.index))
    };
    if found.len() > top && top > 0 {
        found.select_nth_unstable_by(top - 1, order);
    }
    found.truncate(top);
    found.sort_unstable_by(order);
}

/// The same answer by brute force: every query against every reference, each as a dense N-wide
/// vector. The reference the index is tested against, and the baseline it is measured against.
pub fn nearest_dense(
    refs: &Circuits,
    queries: &Circuits,
    n_experts: usize,
    top: usize,
    skip: impl Fn(usize) -> Option<usize> + Sync,
) -> Vec<Vec<Neighbour>> {
    let dense = |c: &Circuits, i: usize| {
        let mut v = vec![0f32; n_experts];
        let (experts, scores) = c.get(i);
        for (&e, &s) in experts.iter().zip(scores) {
            v[e as usize] += s;
        }
        v
    };
    let refs_dense: Vec<Vec<f32>> = (0..refs.len()).map(|i| dense(refs, i)).collect();
    (0..queries.len())
        .into_par_iter()
        .map(|q| {
            let qv = dense(queries, q);
            let (qe, _) = queries.get(q);
            let qn = queries.norm(q);
            let mut found: Vec<Neighbour> = refs_dense
                .iter()
                .enumerate()
                .filter(|&(c, _)| Some(c) != skip(q))
                // Sharing an expert, as the definition says, not merely a non-zero product.
                .filter(|&(c, _)| refs.get(c).0.iter().any(|e| qe.contains(e)))
                .map(|(c, rv)| Neighbour {
                    index: c,
                    cosine: cosine(
                        qv.iter().zip(rv).map(|(a, b)| a * b).sum(),
                        qn,
                        refs.norm(c),
                    ),
                })
                .collect();
            best(&mut found, top);
            found
        })
        .collect()
}

/// `m` random circuits of `k` distinct experts out of `n`, with scores in [-0.5, 1.5): for
/// tests and benchmarks.
pub fn random_circuits(rng: &mut crate::nn::rng::Rng, m: usize, k: usize, n: usize) -> Circuits {
    let mut experts = Vec::with_capacity(m * k);
    let mut scores = Vec::with_capacity(m * k);
    for _ in 0..m {
        let start = experts.len();
        while experts.len() - start < k {
            let e = (rng.next_u64() % n as u64) as u32;
            if !experts[start..].contains(&e) {
                experts.push(e);
            }
        }
        scores.extend((0..k).map(|_| (rng.uniform() * 2.0 - 0.5) as f32));
    }
    Circuits { k, experts, scores }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::rng::Rng;

    /// Every neighbour of query `q`, by brute force.
    fn want_all(refs: &Circuits, queries: &Circuits, n: usize, q: usize) -> Vec<Neighbour> {
        let one = Circuits {
            k: queries.k,
            experts: queries.get(q).0.to_vec(),
            scores: queries.get(q).1.to_vec(),
        };
        nearest_dense(refs, &one, n, usize::MAX, |_| None).remove(0)
    }

    #[test]
    fn the_index_finds_exactly_what_brute_force_finds() {
        let seed = crate::interp::testing::fresh_seed();
        let mut rng = Rng::new(seed);
        for (m, k, n, top) in [(500, 4, 64, 20), (300, 8, 1024, 20), (200, 2, 16, 50)] {
            let refs = random_circuits(&mut rng, m, k, n);
            let queries = random_circuits(&mut rng, 40, k, n);
            let index = InvertedIndex::new(&refs, n).unwrap();
            let got = index.nearest(&queries, top, |_| None);
            let want = nearest_dense(&refs, &queries, n, top, |_| None);
            assert_eq!(got.len(), want.len());
            // The same list, but for circuits whose cosines differ by less than rounding, which
            // the two sums (in different orders) may rank either way.
            for (q, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.len(), w.len(), "seed {seed}, query {q}");
                for (pos, (a, b)) in g.iter().zip(w).enumerate() {
                    let same = a.index == b.index
                        || w.iter()
                            .chain(&want_all(&refs, &queries, n, q))
                            .any(|x| x.index == a.index && (x.cosine - b.cosine).abs() < 1e-5);
                    assert!(same, "seed {seed}, query {q}, place {pos}: {a:?} for {b:?}");
                    assert!(
                        (a.cosine - b.cosine).abs() < 1e-5,
                        "seed {seed}: {a:?} {b:?}"
                    );
                }
            }
            // Queries drawn from the references find themselves first, unless left out.
            let own = index.nearest(&refs, 1, |_| None);
            for (q, found) in own.iter().enumerate() {
                assert!(
                    (found[0].cosine - 1.0).abs() < 1e-5,
                    "seed {seed}, query {q}"
                );
            }
            let others = index.nearest(&refs, top, Some);
            assert!(others
                .iter()
                .enumerate()
                .all(|(q, f)| f.iter().all(|x| x.index != q)));
        }
    }

    #[test]
    fn planted_neighbours_are_found_in_order() {
        // Circuit 0 shares 3, 2 and 1 of its 4 experts with circuits 1, 2 and 3; 4 shares none.
        let refs = Circuits {
            k: 4,
            experts: [
                [0, 1, 2, 3],
                [0, 1, 2, 9],
                [0, 1, 8, 9],
                [0, 7, 8, 9],
                [4, 5, 6, 7],
            ]
            .concat(),
            scores: vec![1.0; 20],
        };
        let index = InvertedIndex::new(&refs, 10).unwrap();
        let found = index.nearest(&refs, 10, Some);
        let order: Vec<usize> = found[0].iter().map(|n| n.index).collect();
        assert_eq!(order, [1, 2, 3], "4 shares no expert: no neighbour");
        let cos: Vec<f32> = found[0].iter().map(|n| n.cosine).collect();
        assert_eq!(cos, [0.75, 0.5, 0.25]);
        assert!(InvertedIndex::new(&refs, 9).is_err(), "expert 9 of 9");
    }
}
