//! Where a model trains: `--device` / `device:` picks the backend.

use super::backend::Backend;
use super::cpu::CpuBackend;
use super::cuda::backend::CudaBackend;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// The first GPU, through cudarc.
    Cuda,
    /// The CUDA backend on the host emulator of kernels/*.cu (builds with `--features cuda-emu`).
    CudaEmu,
}

impl Device {
    pub const NAMES: [&'static str; 3] = ["cpu", "cuda", "cuda-emu"];

    pub fn parse(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            "cuda-emu" => Ok(Device::CudaEmu),
            _ => Err(format!(
                "unknown device `{s}` (one of {})",
                Device::NAMES.join(", ")
            )),
        }
    }

    /// The backend, or a one-line reason why this machine or build has none.
    pub fn backend(self) -> Result<Arc<dyn Backend>, String> {
        match self {
            Device::Cpu => Ok(Arc::new(CpuBackend::default())),
            Device::Cuda => {
                let gpu = super::cuda::gpu::Gpu::open(0)?;
                Ok(Arc::new(CudaBackend::new(Arc::new(gpu))))
            }
            Device::CudaEmu => emulator(),
        }
    }
}

#[cfg(feature = "cuda-emu")]
fn emulator() -> Result<Arc<dyn Backend>, String> {
    let dr = super::cuda::emu::EmuDriver::with_mode(false, true);
    Ok(Arc::new(CudaBackend::new(Arc::new(dr))))
}

#[cfg(not(feature = "cuda-emu"))]
fn emulator() -> Result<Arc<dyn Backend>, String> {
    Err("device cuda-emu: this build has no emulator (build with `cargo build --release --features cuda-emu`)".into())
}
