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
pub mod gpu;
pub mod moe;
#[cfg(all(test, feature = "cuda-emu"))]
mod tests;

/// How a kernel is launched: grid and block sizes and dynamic shared-memory bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: usize,
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
