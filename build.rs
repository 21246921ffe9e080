//! In every build: the list of kernels/*.cu and *.cuh that the GPU driver embeds and compiles
//! with NVRTC (src/nn/cuda/gpu.rs). With the `cuda-emu` feature: compiles kernels/*.cu as C++
//! for the host emulator (kernels/emu), one translation unit, so that every kernel's
//! registration is linked in.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    gpu_sources();
    #[cfg(feature = "cuda-emu")]
    emulator();
}

/// kernels/ of the checkout being built, read when the script runs (not `env!` when it is
/// compiled: a target directory copied from another checkout would keep that checkout's path).
fn kernels_dir() -> std::path::PathBuf {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    std::path::Path::new(&manifest).join("kernels")
}

/// `$OUT_DIR/kernel_sources.rs`: `KERNEL_SOURCES`, each top-level kernels/ source (not the
/// emulator in emu/ nor the planted bugs in testing/) as (its name in kernels/, its text).
fn gpu_sources() {
    use std::path::PathBuf;
    let root = kernels_dir();
    println!("cargo:rerun-if-changed={}", root.display());
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("kernels/ is readable")
        .map(|e| e.expect("kernels/ is readable").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
        .collect();
    sources.sort();
    let mut list = String::from("pub const KERNEL_SOURCES: &[(&str, &str)] = &[\n");
    for path in &sources {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path.file_name().expect("a file").to_string_lossy();
        list += &format!(
            "    ({name:?}, include_str!({:?})),\n",
            path.display().to_string()
        );
    }
    list += "];\n";
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("kernel_sources.rs"), list).expect("OUT_DIR is writable");
}

#[cfg(feature = "cuda-emu")]
fn emulator() {
    use std::path::PathBuf;
    let root = kernels_dir();
    println!("cargo:rerun-if-changed={}", root.display());
    let mut sources: Vec<PathBuf> = Vec::new();
    for dir in [root.clone(), root.join("testing")] {
        let entries = std::fs::read_dir(&dir).expect("kernels/ is readable");
        for entry in entries {
            let path = entry.expect("kernels/ is readable").path();
            if path.extension().is_some_and(|e| e == "cu") {
                println!("cargo:rerun-if-changed={}", path.display());
                sources.push(path);
            }
        }
    }
    sources.sort();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let list: String = sources
        .iter()
        .map(|p| format!("#include \"{}\"\n", p.display()))
        .collect();
    std::fs::write(out.join("kernels.inc"), list).expect("OUT_DIR is writable");
    for header in ["emu/cuda_emu.h", "emu/runtime.cpp", "common.cuh"] {
        println!("cargo:rerun-if-changed={}", root.join(header).display());
    }
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .define("REPRO_EMU", None)
        .include(root.join("emu"))
        .include(&out)
        .opt_level(2)
        .flag("-pthread")
        // `#pragma unroll` is for nvcc and NVRTC.
        .flag("-Wno-unknown-pragmas")
        .warnings(true)
        .file(root.join("emu/runtime.cpp"))
        .compile("repro_cuda_emu");
}
