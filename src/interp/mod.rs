//! Interpretability analyses of trained models, free of stage plumbing: nearest neighbours
//! between feedforward circuits (and, to come, their 2-D map, gating patching and ablation).

pub mod cluster;
pub mod neighbours;
