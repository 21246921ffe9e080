//! Interpretability analyses of trained models, free of stage plumbing: nearest neighbours
//! between feedforward circuits, their 2-D map and how well they cluster (gating patching and
//! ablation to come).

pub mod cluster;
pub mod neighbours;
pub mod umap;
