//! The CUDA backend (`backend.rs`: every op as launches of kernels/*.cu) over one narrow
//! `Driver` seam with two drivers: cudarc on a GPU (`gpu.rs`) and the host emulator
//! (`emu.rs`, cargo feature `cuda-emu`), which runs the same kernels on CPU threads.

pub mod attention;
pub mod backbone;
pub mod backend;
pub mod driver;
#[cfg(feature = "cuda-emu")]
pub mod emu;
pub mod experts;
pub mod experts_backward;
pub mod gpu;
pub mod moe;
pub mod router;
pub mod sort;
#[cfg(all(test, feature = "cuda-emu"))]
mod testing;
#[cfg(all(test, feature = "cuda-emu"))]
mod tests;

use std::sync::LazyLock;

/// How a kernel is launched: grid and block sizes and dynamic shared-memory bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: usize,
}

/// A size of kernels/common.cuh that the launch sizes need (its absence is a build defect).
pub(crate) fn constant(name: &str) -> u32 {
    kernel_constant(name).unwrap_or_else(|| panic!("{name} is not in kernels/common.cuh"))
}

static ROW_GRID_MAX: LazyLock<u32> = LazyLock::new(|| constant("ROW_GRID_MAX"));
static ELEM_BLOCK: LazyLock<u32> = LazyLock::new(|| constant("ELEM_BLOCK"));
static ELEM_GRID_MAX: LazyLock<u32> = LazyLock::new(|| constant("ELEM_GRID_MAX"));

/// `blocks` blocks of `block` threads: at least one block, at most `cap` (the kernels loop over
/// what a capped grid leaves, grid-stride, so any shape is a valid launch).
pub(crate) fn dims(blocks: usize, cap: u32, block: u32, shared_bytes: usize) -> LaunchDims {
    LaunchDims {
        grid: [blocks.clamp(1, cap as usize) as u32, 1, 1],
        block: [block, 1, 1],
        shared_bytes,
    }
}

/// One thread an element over `n` elements (grid-stride kernels).
pub fn elementwise_dims(n: usize) -> LaunchDims {
    dims(
        n.div_ceil(*ELEM_BLOCK as usize),
        *ELEM_GRID_MAX,
        *ELEM_BLOCK,
        0,
    )
}

/// One block of `block` threads a row (or a column, a token...), `rows` of them.
pub(crate) fn per_row(rows: usize, block: u32, shared_bytes: usize) -> LaunchDims {
    dims(rows, *ROW_GRID_MAX, block, shared_bytes)
}

/// A size the kernels and the Rust side share, read from kernels/common.cuh.
pub fn kernel_constant(name: &str) -> Option<u32> {
    include_str!("../../../kernels/common.cuh")
        .lines()
        .find_map(|l| {
            l.strip_prefix("#define ")?
                .strip_prefix(name)?
                .trim()
                .parse()
                .ok()
        })
}
