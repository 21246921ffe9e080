//! The one narrow seam below the CUDA backend: memory, copies, kernel launches by name, and
//! matrix products. Two drivers implement it: cudarc on a real GPU, and the host emulator
//! (`cuda-emu`), which runs the same kernels/*.cu on CPU threads. Everything above it (buffers,
//! launch sizes, argument order, the order of launches in a step) is one code path for both.

use super::LaunchDims;

/// A device address: a `CUdeviceptr` on a GPU, a host address in the emulator.
pub type DevAddr = u64;

/// One kernel argument: a device buffer (its address and the bytes the kernel may touch from
/// there: the emulator refuses accesses outside them) or a scalar.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KArg {
    Buf(DevAddr, usize),
    I32(i32),
    U32(u32),
    F32(f32),
}

/// A batch of row-major products `c = op(a) · op(b)` (`+=` when `accumulate`), f32.
/// `a` is [m, k] (stored [k, m] when `a_t`), `b` is [k, n] (stored [n, k] when `b_t`), `c` is
/// [m, n]; `ld*` are row strides in elements and `stride_*` the step between products.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: DevAddr,
    pub lda: usize,
    pub a_t: bool,
    pub stride_a: usize,
    pub b: DevAddr,
    pub ldb: usize,
    pub b_t: bool,
    pub stride_b: usize,
    pub c: DevAddr,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
    pub accumulate: bool,
}

pub trait Driver: Send + Sync {
    /// `cuda` or `cuda-emu`, and what it runs on (the GPU's name and architecture).
    fn describe(&self) -> String;
    /// `bytes` of zeroed device memory.
    fn alloc(&self, bytes: usize) -> Result<DevAddr, String>;
    /// Frees what `alloc` returned.
    fn free(&self, addr: DevAddr);
    fn upload(&self, dst: DevAddr, src: &[u8]) -> Result<(), String>;
    fn download(&self, src: DevAddr, dst: &mut [u8]) -> Result<(), String>;
    /// Device-to-device copy.
    fn copy(&self, dst: DevAddr, src: DevAddr, bytes: usize) -> Result<(), String>;
    fn zero(&self, dst: DevAddr, bytes: usize) -> Result<(), String>;
    /// Runs kernel `name` of kernels/*.cu; in order after everything launched before.
    fn launch(&self, name: &str, dims: LaunchDims, args: &[KArg]) -> Result<(), String>;
    fn gemm(&self, g: &Gemm) -> Result<(), String>;
    /// Waits for everything launched so far.
    fn synchronize(&self) -> Result<(), String>;
}
