//! `repro bench neighbours`: nearest-neighbour search between feedforward circuits through the
//! inverted index, against the dense scan it replaces, on the same random circuits in alternate
//! rounds.

use crate::interp::neighbours::{nearest_dense, random_circuits, Circuits, InvertedIndex};
use crate::nn::rng::Rng;
use anyhow::{ensure, Result};
use std::time::Instant;

#[derive(clap::Args)]
pub struct NeighboursArgs {
    /// Reference circuits.
    #[arg(long, default_value_t = 100_000)]
    circuits: usize,
    /// Experts per channel (N).
    #[arg(long, default_value_t = 1024)]
    experts: usize,
    /// Experts per circuit (k).
    #[arg(long, default_value_t = 8)]
    k: usize,
    /// Query circuits (the dense scan, about 4,000 times slower, gets a tenth of them).
    #[arg(long, default_value_t = 2000)]
    queries: usize,
    /// Neighbours per query.
    #[arg(long, default_value_t = 20)]
    top: usize,
    /// Alternate rounds; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(a: &NeighboursArgs) -> Result<()> {
    ensure!(a.k > 0 && a.k <= a.experts, "need 0 < k <= experts");
    ensure!(
        a.queries >= 10 && a.rounds > 0,
        "need at least 10 queries and 1 round"
    );
    let mut rng = Rng::new(1);
    let refs = random_circuits(&mut rng, a.circuits, a.k, a.experts);
    let queries = random_circuits(&mut rng, a.queries, a.k, a.experts);
    let few = Circuits {
        k: a.k,
        experts: queries.experts[..a.queries / 10 * a.k].to_vec(),
        scores: queries.scores[..a.queries / 10 * a.k].to_vec(),
    };
    println!(
        "repro bench neighbours: {} circuits, N = {}, k = {}, top {}, {} threads",
        a.circuits,
        a.experts,
        a.k,
        a.top,
        rayon::current_num_threads()
    );
    let (mut index_ms, mut dense_ms) = (Vec::new(), Vec::new());
    let mut build_ms = Vec::new();
    for _ in 0..a.rounds {
        let t = Instant::now();
        let index = InvertedIndex::new(&refs, a.experts).map_err(anyhow::Error::msg)?;
        build_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let found = index.nearest(&queries, a.top, |_| None);
        index_ms.push(t.elapsed().as_secs_f64() * 1e3 / a.queries as f64);
        let t = Instant::now();
        let want = nearest_dense(&refs, &few, a.experts, a.top, |_| None);
        dense_ms.push(t.elapsed().as_secs_f64() * 1e3 / few.len() as f64);
        for (g, w) in found.iter().zip(&want) {
            let agree = g.len() == w.len()
                && g.iter()
                    .zip(w)
                    .all(|(x, y)| (x.cosine - y.cosine).abs() < 1e-5);
            ensure!(agree, "the index and the dense scan disagree");
        }
    }
    let (index, dense) = (median(index_ms), median(dense_ms));
    println!("index built in {:.1} ms", median(build_ms));
    println!("inverted index  {index:>9.4} ms a query");
    println!("dense scan      {dense:>9.4} ms a query");
    println!("speed-up        {:>9.1}x (same answers)", dense / index);
    Ok(())
}
