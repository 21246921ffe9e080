//! The CUDA backend's drivers. For now the host emulator (`cuda-emu` feature), which runs the
//! kernels of kernels/*.cu on CPU threads; the cudarc driver and the backend above both
//! drivers come next (issue 11).

pub mod backbone;
pub mod driver;
#[cfg(feature = "cuda-emu")]
pub mod emu;
pub mod experts;
pub mod gpu;

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
