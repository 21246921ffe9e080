//! repro: declarative, content-addressed pipelines for reproducing ML papers.
//!
//! Two halves meet at one seam: the pipeline engine (`pipeline`, `cache`, `exec`) knows nothing
//! about machine learning, and the stage kinds (`stages`, built on `nn` and `data`) know nothing
//! about scheduling or caching. `atomic` (whole-file writes) is shared by both.

pub mod atomic;
pub mod bench;
pub mod cache;
pub mod cli;
pub mod data;
pub mod exec;
pub mod interp;
pub mod nn;
pub mod pipeline;
pub mod stages;
pub mod workspace;
