//! The real-GPU driver: the CUDA driver API, NVRTC and cuBLAS through cudarc, every library
//! loaded at run time (cudarc's dynamic loading), so that a build needs no CUDA toolkit and runs
//! anywhere, and `Gpu::open` says in one line what is missing. docs/cuda-driver.md says what
//! `--device cuda` needs on a GPU machine.
//!
//! The kernels are the kernels/*.cu of this checkout, embedded in the binary (build.rs lists
//! them), compiled at first launch by NVRTC into one cubin for the GPU's architecture and cached
//! on disk. Kernels are plain C++ `__global__` functions, so their symbols are mangled: NVRTC's
//! name expressions give each one's symbol, and the symbol gives its parameter kinds, which
//! `launch` checks against the arguments.

use super::driver::{DevAddr, Driver, Gemm, KArg};
use super::LaunchDims;
use cudarc::cublas::sys as blas;
use cudarc::driver::{result as cu, sys as cusys, CudaContext, CudaStream};
use cudarc::nvrtc::sys as nv;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
}
/// Each kernels/*.cu and *.cuh as (its name in kernels/, its text).
pub use embedded::KERNEL_SOURCES;

const NEEDS: &str = "--device cuda needs an NVIDIA GPU with its driver (libcuda.so.1), NVRTC \
                     (libnvrtc.so.12) and cuBLAS (libcublas.so.12): see docs/cuda-driver.md";

/// Above this many bytes of dynamic shared memory a kernel must opt in (cuFuncSetAttribute).
const DEFAULT_SHARED_LIMIT: usize = 48 * 1024;

/// The options every kernel compile gets besides the architecture (kernels/nvrtc_check.py uses
/// the same).
const NVRTC_OPTIONS: &[&str] = &["-std=c++17"];

// ---------------------------------------------------------------------------------------------
// Finding the libraries.

/// A CUDA library that cudarc opens by name, and where to look for it before that.
struct Lib {
    what: &'static str,
    /// An environment variable naming the library's path (the files it needs first, such as
    /// cuBLASLt for cuBLAS, are taken from beside it).
    var: &'static str,
    /// The pip wheel's directory under site-packages/nvidia/.
    wheel: &'static str,
    /// The files to open from that directory, what the library needs first.
    files: &'static [&'static str],
    /// Whether cudarc finds the library by name.
    present: unsafe fn() -> bool,
    /// The address of `probe` in the library cudarc opened.
    cudarc_symbol: unsafe fn(&[u8]) -> Option<usize>,
    probe: &'static str,
}

const NVRTC: Lib = Lib {
    what: "NVRTC",
    var: "REPRO_NVRTC",
    wheel: "cuda_nvrtc",
    files: &["libnvrtc.so.12"],
    present: nv::is_culib_present,
    cudarc_symbol: |name| unsafe {
        nv::culib()
            .get::<*const c_void>(name)
            .ok()
            .map(|s| *s as usize)
    },
    probe: "nvrtcVersion",
};

const CUBLAS: Lib = Lib {
    what: "cuBLAS",
    var: "REPRO_CUBLAS",
    wheel: "cublas",
    files: &["libcublasLt.so.12", "libcublas.so.12"],
    present: blas::is_culib_present,
    cudarc_symbol: |name| unsafe {
        blas::culib()
            .get::<*const c_void>(name)
            .ok()
            .map(|s| *s as usize)
    },
    probe: "cublasCreate_v2",
};

/// Opens `path` for the whole process (never closed). cudarc's later open by name
/// (libnvrtc.so.12) then finds it: the dynamic loader matches a loaded library's soname.
fn dlopen(path: &Path) -> Result<usize, String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path; dlerror's message is copied before the next dl call.
    unsafe {
        let handle = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        if handle.is_null() {
            let e = libc::dlerror();
            // dlerror's message names the file.
            return Err(if e.is_null() {
                format!("{}: dlopen failed", path.display())
            } else {
                CStr::from_ptr(e).to_string_lossy().into_owned()
            });
        }
        Ok(handle as usize)
    }
}

/// site-packages/nvidia/`wheel`/lib of the active virtual or conda environment, the user's and
/// the system's Pythons: where pip (or PyTorch's dependencies) put the CUDA libraries.
fn wheel_dirs(wheel: &str) -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from))
        .collect();
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(Path::new(&home).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr"].map(PathBuf::from));
    let mut dirs = Vec::new();
    for prefix in prefixes {
        let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
            })
            .collect();
        pythons.sort();
        for python in pythons.iter().rev() {
            for site in ["site-packages", "dist-packages"] {
                dirs.push(python.join(site).join("nvidia").join(wheel).join("lib"));
            }
        }
    }
    dirs
}

/// Makes `lib` loadable by cudarc: from `$var` when set (and then checks that cudarc opened
/// that very file), else by name as cudarc looks for it, else from a pip wheel.
fn load_once(lib: &Lib) -> Result<(), String> {
    let not_found = || {
        format!(
            "{} not found ({} on the loader path, a pip nvidia-{}-cu12 in the active Python, or \
             {}=its path)",
            lib.what,
            lib.files[lib.files.len() - 1],
            lib.wheel.replace('_', "-"),
            lib.var
        )
    };
    if let Some(path) = std::env::var_os(lib.var).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        let dir = path.parent().unwrap_or(Path::new("."));
        for dep in &lib.files[..lib.files.len() - 1] {
            if dir.join(dep).exists() {
                dlopen(&dir.join(dep))?;
            }
        }
        let handle = dlopen(&path).map_err(|e| format!("{}: {e}", lib.var))?;
        // SAFETY: cudarc's probe opens libraries by name; the symbol lookups read addresses.
        unsafe {
            if !(lib.present)() {
                return Err(format!(
                    "{}={}: cudarc does not find it by name (is it {}?)",
                    lib.var,
                    path.display(),
                    lib.files[lib.files.len() - 1]
                ));
            }
            let probe = CString::new(lib.probe).expect("no NUL");
            let ours = libc::dlsym(handle as *mut c_void, probe.as_ptr()) as usize;
            if (lib.cudarc_symbol)(lib.probe.as_bytes()) != Some(ours) {
                return Err(format!(
                    "{}={}: another {} comes first on the loader path",
                    lib.var,
                    path.display(),
                    lib.what
                ));
            }
        }
        return Ok(());
    }
    // SAFETY: as above.
    if unsafe { (lib.present)() } {
        return Ok(());
    }
    let last = lib.files[lib.files.len() - 1];
    let dir = wheel_dirs(lib.wheel)
        .into_iter()
        .find(|d| d.join(last).exists())
        .ok_or_else(not_found)?;
    for file in lib.files {
        dlopen(&dir.join(file))?;
    }
    // SAFETY: as above.
    if unsafe { (lib.present)() } {
        Ok(())
    } else {
        Err(not_found())
    }
}

/// `load_once`, once a process.
fn load(lib: &'static Lib) -> Result<(), String> {
    static NVRTC_LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    static CUBLAS_LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    let cell = if lib.var == NVRTC.var {
        &NVRTC_LOADED
    } else {
        &CUBLAS_LOADED
    };
    cell.get_or_init(|| load_once(lib)).clone()
}

/// Runs `f`, turning a panic (cudarc panics on a symbol an old library lacks) into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        Err(why.to_string())
    })
}

// ---------------------------------------------------------------------------------------------
// Compiling the kernels.

/// The kernels compiled for one architecture: a cubin, and each kernel's symbol in it.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelImage {
    pub cubin: Vec<u8>,
    /// (kernel name as in `REPRO_KERNEL(name)`, its mangled symbol), sorted by name.
    pub symbols: Vec<(String, String)>,
}

/// What `compile_kernels` did.
#[derive(Debug)]
pub struct Compiled {
    pub image: KernelImage,
    /// Read from the cache rather than compiled.
    pub cache_hit: bool,
    /// The cache file read or written (none when there is no cache directory or it is not
    /// writable).
    pub cache_file: Option<PathBuf>,
}

/// Where compiled kernels are kept: `$REPRO_KERNEL_CACHE`, else `$XDG_CACHE_HOME/repro/kernels`,
/// else `~/.cache/repro/kernels`.
pub fn kernel_cache_dir() -> Option<PathBuf> {
    let var = |v: &str| {
        std::env::var_os(v)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("REPRO_KERNEL_CACHE") {
        return Some(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return Some(dir.join("repro").join("kernels"));
    }
    var("HOME").map(|h| h.join(".cache").join("repro").join("kernels"))
}

/// The kernel names: every `REPRO_KERNEL(name)` of the embedded .cu files, sorted.
pub fn kernel_names() -> Vec<String> {
    let mut names: Vec<String> = KERNEL_SOURCES
        .iter()
        .filter(|(file, _)| file.ends_with(".cu"))
        .flat_map(|(_, text)| text.lines())
        .filter_map(|l| l.trim().strip_prefix("REPRO_KERNEL(")?.strip_suffix(')'))
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// All embedded .cu files as one translation unit: each `#include "x"` of an embedded file is
/// replaced by that file's text the first time (every file is included once, as with
/// `#pragma once`), and `#line` directives keep NVRTC's messages pointing at kernels/ files.
pub fn translation_unit() -> Result<String, String> {
    fn emit(name: &str, out: &mut String, done: &mut Vec<String>) -> Result<(), String> {
        if done.iter().any(|d| d == name) {
            return Ok(());
        }
        done.push(name.to_string());
        let text = KERNEL_SOURCES
            .iter()
            .find(|(file, _)| *file == name)
            .map(|(_, text)| *text)
            .ok_or_else(|| format!("kernels/{name} is not embedded (only kernels/*.cu, *.cuh)"))?;
        *out += &format!("#line 1 \"kernels/{name}\"\n");
        for (i, line) in text.lines().enumerate() {
            let directive = line.trim_start();
            if let Some(target) = directive
                .strip_prefix("#include \"")
                .and_then(|t| t.split('"').next())
            {
                emit(target.trim_start_matches("./"), out, done)
                    .map_err(|e| format!("kernels/{name}:{}: {e}", i + 1))?;
                *out += &format!("#line {} \"kernels/{name}\"\n", i + 2);
            } else if directive.starts_with("#pragma once") {
                out.push('\n');
            } else {
                *out += line;
                out.push('\n');
            }
        }
        Ok(())
    }
    let mut out = String::new();
    let mut done = Vec::new();
    for (file, _) in KERNEL_SOURCES.iter().filter(|(f, _)| f.ends_with(".cu")) {
        emit(file, &mut out, &mut done)?;
    }
    Ok(out)
}

fn nvrtc_error(rc: nv::nvrtcResult) -> String {
    // SAFETY: NVRTC returns a static string for every result code.
    unsafe {
        let s = nv::nvrtcGetErrorString(rc);
        if s.is_null() {
            format!("{rc:?}")
        } else {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        }
    }
}

/// The loaded NVRTC's version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    load(&NVRTC)?;
    guarded(|| {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-parameters.
        unsafe { nv::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| nvrtc_error(e.0))?;
        Ok((major, minor))
    })
}

/// The full option list of a compile for `arch` (`sm_90`).
fn nvrtc_options(arch: &str, extra: &[&str]) -> Vec<String> {
    let mut options = vec![format!("--gpu-architecture={arch}")];
    options.extend(NVRTC_OPTIONS.iter().chain(extra).map(|o| o.to_string()));
    options
}

/// The cache key: blake3 of the embedded sources, the options, the architecture and NVRTC's
/// version.
fn cache_key(options: &[String], arch: &str, version: (i32, i32)) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"repro kernels 1\0");
    for (file, text) in KERNEL_SOURCES {
        h.update(&(file.len() as u64).to_le_bytes())
            .update(file.as_bytes());
        h.update(&(text.len() as u64).to_le_bytes())
            .update(text.as_bytes());
    }
    for option in options {
        h.update(&(option.len() as u64).to_le_bytes())
            .update(option.as_bytes());
    }
    h.update(arch.as_bytes()).update(b"\0");
    h.update(format!("nvrtc {}.{}", version.0, version.1).as_bytes());
    h.finalize().to_hex().to_string()
}

const CACHE_HEADER: &str = "repro kernel image 1\n";

/// The cache file: a header, `name symbol` lines, an empty line, the cubin.
fn encode_image(image: &KernelImage) -> Vec<u8> {
    let mut bytes = CACHE_HEADER.as_bytes().to_vec();
    for (name, symbol) in &image.symbols {
        bytes.extend_from_slice(format!("{name} {symbol}\n").as_bytes());
    }
    bytes.push(b'\n');
    bytes.extend_from_slice(&image.cubin);
    bytes
}

fn decode_image(bytes: &[u8]) -> Option<KernelImage> {
    let mut rest = bytes.strip_prefix(CACHE_HEADER.as_bytes())?;
    let mut symbols = Vec::new();
    loop {
        let end = rest.iter().position(|&b| b == b'\n')?;
        let line = std::str::from_utf8(&rest[..end]).ok()?;
        rest = &rest[end + 1..];
        if line.is_empty() {
            break;
        }
        let (name, symbol) = line.split_once(' ')?;
        symbols.push((name.to_string(), symbol.to_string()));
    }
    rest.starts_with(b"\x7fELF").then(|| KernelImage {
        cubin: rest.to_vec(),
        symbols,
    })
}

/// Writes `bytes` to `file` whole or not at all: a temporary file beside it, then a rename.
fn write_atomic(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, file))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

/// Compiles every embedded kernel for `arch` (`sm_90`) into one cubin with NVRTC (options
/// `-std=c++17` and `extra`), or reads it from `cache` (a directory; written when compiled).
/// The GPU driver calls this with `kernel_cache_dir()` and no extras. Needs NVRTC, not a GPU.
pub fn compile_kernels(
    arch: &str,
    extra: &[&str],
    cache: Option<&Path>,
) -> Result<Compiled, String> {
    let version = nvrtc_version()?;
    let options = nvrtc_options(arch, extra);
    let file = cache.map(|dir| dir.join(format!("{}.cubin", cache_key(&options, arch, version))));
    if let Some(image) = file
        .as_ref()
        .and_then(|f| decode_image(&std::fs::read(f).ok()?))
    {
        return Ok(Compiled {
            image,
            cache_hit: true,
            cache_file: file,
        });
    }
    let image = guarded(|| nvrtc_compile(arch, &options))?;
    let stored = file.filter(|f| write_atomic(f, &encode_image(&image)).is_ok());
    Ok(Compiled {
        image,
        cache_hit: false,
        cache_file: stored,
    })
}

/// Destroys an NVRTC program when dropped.
struct Program(nv::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed once, here.
        unsafe {
            nv::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn nvrtc_compile(arch: &str, options: &[String]) -> Result<KernelImage, String> {
    let source = CString::new(translation_unit()?).map_err(|_| "a NUL in kernels/".to_string())?;
    let names = kernel_names();
    let expressions: Vec<CString> = names
        .iter()
        .map(|n| CString::new(format!("&{n}")).map_err(|_| format!("bad kernel name {n:?}")))
        .collect::<Result<_, _>>()?;
    let options: Vec<CString> = options
        .iter()
        .map(|o| CString::new(o.as_str()).map_err(|_| format!("bad option {o:?}")))
        .collect::<Result<_, _>>()?;
    let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    let check = |rc: nv::nvrtcResult, what: &str| {
        rc.result()
            .map_err(|e| format!("NVRTC {what} for {arch}: {}", nvrtc_error(e.0)))
    };
    // SAFETY: every pointer is a live NUL-terminated string or a sized buffer for the call; the
    // program is destroyed by `Program` after its outputs are copied.
    unsafe {
        let mut raw = std::ptr::null_mut();
        check(
            nv::nvrtcCreateProgram(
                &mut raw,
                source.as_ptr(),
                c"repro_kernels.cu".as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            ),
            "nvrtcCreateProgram",
        )?;
        let program = Program(raw);
        for e in &expressions {
            check(
                nv::nvrtcAddNameExpression(program.0, e.as_ptr()),
                "nvrtcAddNameExpression",
            )?;
        }
        let rc = nv::nvrtcCompileProgram(program.0, option_ptrs.len() as i32, option_ptrs.as_ptr());
        if rc != nv::nvrtcResult::NVRTC_SUCCESS {
            let mut size = 0;
            nv::nvrtcGetProgramLogSize(program.0, &mut size);
            let mut log = vec![0u8; size.max(1)];
            nv::nvrtcGetProgramLog(program.0, log.as_mut_ptr().cast());
            let log = CStr::from_bytes_until_nul(&log)
                .map(|l| l.to_string_lossy())
                .unwrap_or_default();
            return Err(format!(
                "NVRTC cannot compile kernels/ for {arch} ({}):\n{log}",
                nvrtc_error(rc)
            ));
        }
        let mut size = 0;
        check(
            nv::nvrtcGetCUBINSize(program.0, &mut size),
            "nvrtcGetCUBINSize",
        )?;
        let mut cubin = vec![0u8; size];
        check(
            nv::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast()),
            "nvrtcGetCUBIN",
        )?;
        let mut symbols = Vec::new();
        for (name, e) in names.iter().zip(&expressions) {
            let mut lowered: *const c_char = std::ptr::null();
            check(
                nv::nvrtcGetLoweredName(program.0, e.as_ptr(), &mut lowered),
                "nvrtcGetLoweredName",
            )?;
            symbols.push((
                name.clone(),
                CStr::from_ptr(lowered).to_string_lossy().into_owned(),
            ));
        }
        if cubin.is_empty() {
            return Err(format!(
                "NVRTC gave no cubin for {arch} (is {arch} a real architecture?)"
            ));
        }
        Ok(KernelImage { cubin, symbols })
    }
}

/// A kernel parameter's kind read from its mangled symbol: `p` a pointer, else the Itanium code
/// of a builtin type (`i` int, `j` unsigned, `f` float, `l` long ...). None when the symbol is
/// not a plain function of pointers and builtins (then `launch` cannot check the arguments).
pub fn parameter_kinds(symbol: &str) -> Option<Vec<char>> {
    fn ty(s: &mut &[u8], subs: &mut Vec<char>) -> Option<char> {
        let (&c, tail) = s.split_first()?;
        *s = tail;
        match c {
            b'P' => {
                ty(s, subs)?;
                subs.push('p');
                Some('p')
            }
            b'K' | b'V' | b'r' => {
                let kind = ty(s, subs)?;
                subs.push(kind);
                Some(kind)
            }
            // A substitution: S_ is the first substitutable type seen, S<base 36>_ the n+2nd.
            b'S' => {
                let end = s.iter().position(|&b| b == b'_')?;
                let digits = std::str::from_utf8(&s[..end]).ok()?;
                if !digits
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
                {
                    return None;
                }
                let index = if digits.is_empty() {
                    0
                } else {
                    usize::from_str_radix(digits, 36).ok()? + 1
                };
                *s = &s[end + 1..];
                subs.get(index).copied()
            }
            b'a' | b'b' | b'c' | b'h' | b's' | b't' | b'i' | b'j' | b'l' | b'm' | b'x' | b'y'
            | b'f' | b'd' => Some(c as char),
            _ => None,
        }
    }
    let s = symbol.strip_prefix("_Z")?;
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let length: usize = s[..digits].parse().ok()?;
    let mut rest = s.as_bytes().get(digits + length..)?;
    if rest == b"v" {
        return Some(Vec::new());
    }
    let mut subs = Vec::new();
    let mut kinds = Vec::new();
    while !rest.is_empty() {
        kinds.push(ty(&mut rest, &mut subs)?);
    }
    Some(kinds)
}

fn check_arguments(name: &str, kinds: &[char], args: &[KArg]) -> Result<(), String> {
    let fits = |kind: char, arg: &KArg| {
        matches!(
            (kind, arg),
            ('p', KArg::Buf(..)) | ('i', KArg::I32(_)) | ('j', KArg::U32(_)) | ('f', KArg::F32(_))
        )
    };
    if kinds.len() != args.len() || !kinds.iter().zip(args).all(|(&k, a)| fits(k, a)) {
        return Err(format!(
            "kernel {name} takes ({}), launched with {args:?}",
            kinds
                .iter()
                .map(|k| if *k == 'p' {
                    "pointer".to_string()
                } else {
                    k.to_string()
                })
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The driver.

/// The module loaded on the GPU and the functions looked up so far.
struct Loaded {
    module: cusys::CUmodule,
    symbols: HashMap<String, String>,
    functions: HashMap<String, Function>,
}

#[derive(Clone)]
struct Function {
    handle: cusys::CUfunction,
    /// Parameter kinds from the symbol, when it could be read.
    kinds: Option<Arc<[char]>>,
    /// The dynamic shared memory the function has been allowed so far.
    shared_allowed: usize,
}

/// What the lock guards: the raw CUDA handles, used only with the context bound.
struct Inner {
    blas: blas::cublasHandle_t,
    loaded: Option<Loaded>,
}

// SAFETY: the raw handles are only used under `Gpu::inner`'s lock, after binding the context to
// the calling thread; the CUDA driver API and cuBLAS allow handles to move between threads.
unsafe impl Send for Inner {}

/// A CUDA GPU: one context, one stream, one cuBLAS handle; kernels compiled at first launch.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    inner: Mutex<Inner>,
    async_alloc: bool,
    arch: String,
    description: String,
}

fn cu_error(e: cu::DriverError) -> String {
    e.error_string()
        .map(|s| format!("{:?}: {}", e.0, s.to_string_lossy()))
        .unwrap_or_else(|_| format!("{:?}", e.0))
}

impl Gpu {
    /// Opens GPU `ordinal`, or says in one line what is missing (no driver, no GPU, no NVRTC or
    /// cuBLAS) and what `--device cuda` needs. Never panics.
    pub fn open(ordinal: usize) -> Result<Gpu, String> {
        guarded(|| Self::open_inner(ordinal))
            .map_err(|why| format!("no CUDA device {ordinal}: {why}; {NEEDS}").replace('\n', " "))
    }

    fn open_inner(ordinal: usize) -> Result<Gpu, String> {
        // SAFETY: cudarc's probe opens libcuda by name.
        if !unsafe { cusys::is_culib_present() } {
            return Err("the NVIDIA driver's libcuda.so.1 is not installed".into());
        }
        match cu::init() {
            Err(e) if e.0 == cusys::CUresult::CUDA_ERROR_NO_DEVICE => {
                return Err("the NVIDIA driver sees no GPU".into())
            }
            r => r.map_err(|e| format!("the CUDA driver does not start ({})", cu_error(e)))?,
        }
        let count = cu::device::get_count().map_err(cu_error)?;
        if ordinal >= count.max(0) as usize {
            return Err(format!("the NVIDIA driver sees {count} GPU(s)"));
        }
        load(&NVRTC)?;
        load(&CUBLAS)?;
        let version = nvrtc_version()?;
        let ctx = CudaContext::new(ordinal).map_err(cu_error)?;
        let (major, minor) = ctx.compute_capability().map_err(cu_error)?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name().map_err(cu_error)?;
        let memory = ctx.total_mem().map_err(cu_error)?;
        let stream = ctx.new_stream().map_err(cu_error)?;
        let handle =
            cudarc::cublas::result::create_handle().map_err(|e| format!("cuBLAS: {e:?}"))?;
        // SAFETY: a fresh handle and a live stream of the bound context.
        unsafe {
            cudarc::cublas::result::set_stream(handle, stream.cu_stream() as blas::cudaStream_t)
                .and_then(|()| {
                    // Plain f32 products; TF32 tensor cores only when asked (docs/cuda-driver.md).
                    let math = if std::env::var("REPRO_CUDA_TF32").is_ok_and(|v| v == "1") {
                        blas::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
                    } else {
                        blas::cublasMath_t::CUBLAS_DEFAULT_MATH
                    };
                    blas::cublasSetMathMode(handle, math).result()
                })
                .map_err(|e| format!("cuBLAS: {e:?}"))?;
        }
        Ok(Gpu {
            async_alloc: ctx.has_async_alloc(),
            description: format!(
                "cuda: {name} ({arch}, {} GiB), NVRTC {}.{}",
                memory >> 30,
                version.0,
                version.1
            ),
            arch,
            stream,
            inner: Mutex::new(Inner {
                blas: handle,
                loaded: None,
            }),
            ctx,
        })
    }

    /// The architecture the kernels are compiled for (`sm_90`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    fn stream(&self) -> cusys::CUstream {
        self.stream.cu_stream()
    }

    /// Locks the handles and binds the context to this thread.
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, String> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.ctx.bind_to_thread().map_err(cu_error)?;
        Ok(inner)
    }

    /// The function of kernel `name`: compiles and loads the module first if need be.
    fn function(&self, inner: &mut Inner, name: &str) -> Result<Function, String> {
        if inner.loaded.is_none() {
            let compiled = compile_kernels(&self.arch, &[], kernel_cache_dir().as_deref())?;
            // SAFETY: a cubin NVRTC made for this GPU's architecture.
            let module = unsafe { cu::module::load_data(compiled.image.cubin.as_ptr().cast()) }
                .map_err(|e| {
                    format!(
                        "loading the kernels' cubin ({}): {}",
                        self.arch,
                        cu_error(e)
                    )
                })?;
            inner.loaded = Some(Loaded {
                module,
                symbols: compiled.image.symbols.into_iter().collect(),
                functions: HashMap::new(),
            });
        }
        let loaded = inner.loaded.as_mut().expect("loaded above");
        if let Some(f) = loaded.functions.get(name) {
            return Ok(f.clone());
        }
        let symbol = loaded
            .symbols
            .get(name)
            .ok_or_else(|| format!("no kernel {name} in kernels/*.cu"))?;
        let c = CString::new(symbol.as_str()).map_err(|_| format!("bad symbol {symbol:?}"))?;
        // SAFETY: the module is loaded and holds `symbol`.
        let handle = unsafe { cu::module::get_function(loaded.module, c) }
            .map_err(|e| format!("kernel {name} ({symbol}): {}", cu_error(e)))?;
        let kinds = parameter_kinds(symbol).map(Arc::from);
        let f = Function {
            handle,
            kinds,
            shared_allowed: DEFAULT_SHARED_LIMIT,
        };
        loaded.functions.insert(name.to_string(), f.clone());
        Ok(f)
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        let _ = self.stream.synchronize();
        // SAFETY: the handle and module were made by this Gpu and are released once, here.
        unsafe {
            let _ = cudarc::cublas::result::destroy_handle(inner.blas);
            if let Some(loaded) = inner.loaded.take() {
                let _ = cu::module::unload(loaded.module);
            }
        }
    }
}

fn as_i32(what: &str, v: usize) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("gemm: {what} = {v} is past cuBLAS's 32-bit sizes"))
}

impl Driver for Gpu {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn alloc(&self, bytes: usize) -> Result<DevAddr, String> {
        let _inner = self.lock()?;
        // A zero-byte request still gets a distinct address that `free` accepts.
        let n = bytes.max(1);
        // SAFETY: a fresh allocation, zeroed in stream order before any later use.
        unsafe {
            let addr = if self.async_alloc {
                cu::malloc_async(self.stream(), n)
            } else {
                cu::malloc_sync(n)
            }
            .map_err(|e| format!("cannot allocate {bytes} bytes on the GPU: {}", cu_error(e)))?;
            cu::memset_d8_async(addr, 0, n, self.stream()).map_err(cu_error)?;
            Ok(addr)
        }
    }

    fn free(&self, addr: DevAddr) {
        let Ok(_inner) = self.lock() else { return };
        // SAFETY: `addr` came from `alloc`; freed after the work queued before (stream order,
        // or a synchronize without the stream-ordered allocator).
        unsafe {
            if self.async_alloc {
                let _ = cu::free_async(addr, self.stream());
            } else {
                let _ = self.stream.synchronize();
                let _ = cu::free_sync(addr);
            }
        }
    }

    fn upload(&self, dst: DevAddr, src: &[u8]) -> Result<(), String> {
        if src.is_empty() {
            return Ok(());
        }
        let _inner = self.lock()?;
        // SAFETY: from pageable memory the call returns once `src` has been read.
        unsafe { cu::memcpy_htod_async(dst, src, self.stream()) }.map_err(cu_error)
    }

    fn download(&self, src: DevAddr, dst: &mut [u8]) -> Result<(), String> {
        if dst.is_empty() {
            return Ok(());
        }
        let _inner = self.lock()?;
        // SAFETY: `dst` is borrowed until the stream has finished the copy.
        unsafe { cu::memcpy_dtoh_async(dst, src, self.stream()) }.map_err(cu_error)?;
        self.stream.synchronize().map_err(cu_error)
    }

    fn copy(&self, dst: DevAddr, src: DevAddr, bytes: usize) -> Result<(), String> {
        if bytes == 0 {
            return Ok(());
        }
        let _inner = self.lock()?;
        // SAFETY: device addresses the caller allocated.
        unsafe { cu::memcpy_dtod_async(dst, src, bytes, self.stream()) }.map_err(cu_error)
    }

    fn zero(&self, dst: DevAddr, bytes: usize) -> Result<(), String> {
        if bytes == 0 {
            return Ok(());
        }
        let _inner = self.lock()?;
        // SAFETY: a device address the caller allocated.
        unsafe { cu::memset_d8_async(dst, 0, bytes, self.stream()) }.map_err(cu_error)
    }

    fn launch(&self, name: &str, dims: LaunchDims, args: &[KArg]) -> Result<(), String> {
        let mut inner = self.lock()?;
        let f = self.function(&mut inner, name)?;
        if let Some(kinds) = &f.kinds {
            check_arguments(name, kinds, args)?;
        }
        let shared = u32::try_from(dims.shared_bytes).map_err(|_| {
            format!(
                "kernel {name}: {} bytes of shared memory",
                dims.shared_bytes
            )
        })?;
        if dims.shared_bytes > f.shared_allowed {
            // SAFETY: a live function; the driver refuses a size past the GPU's limit.
            unsafe {
                cu::function::set_function_attribute(
                    f.handle,
                    cusys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared as i32,
                )
            }
            .map_err(|e| format!("kernel {name}: {} shared bytes: {}", dims.shared_bytes, cu_error(e)))?;
            let loaded = inner.loaded.as_mut().expect("loaded by function()");
            loaded
                .functions
                .get_mut(name)
                .expect("looked up")
                .shared_allowed = dims.shared_bytes;
        }
        // Each argument's bytes in its own 8-byte slot; the driver reads each parameter's size.
        let mut slots: Vec<[u8; 8]> = args
            .iter()
            .map(|a| match *a {
                KArg::Buf(addr, _) => addr.to_ne_bytes(),
                KArg::I32(v) => (v as i64).to_ne_bytes(),
                KArg::U32(v) => (v as u64).to_ne_bytes(),
                KArg::F32(v) => {
                    let mut s = [0u8; 8];
                    s[..4].copy_from_slice(&v.to_ne_bytes());
                    s
                }
            })
            .collect();
        let mut params: Vec<*mut c_void> =
            slots.iter_mut().map(|s| s.as_mut_ptr().cast()).collect();
        let [gx, gy, gz] = dims.grid;
        let [bx, by, bz] = dims.block;
        // SAFETY: the parameters match the kernel's (checked above when its symbol could be
        // read) and live through the call, which copies them.
        unsafe {
            cu::launch_kernel(
                f.handle,
                (gx, gy, gz),
                (bx, by, bz),
                shared,
                self.stream(),
                &mut params,
            )
        }
        .map_err(|e| format!("launching {name} {dims:?}: {}", cu_error(e)))
    }

    fn gemm(&self, g: &Gemm) -> Result<(), String> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        let inner = self.lock()?;
        // Row-major c = op(a)·op(b) is column-major cᵀ = op(b)ᵀ·op(a)ᵀ, and a row-major matrix
        // read column-major is its transpose: so cuBLAS gets b first, then a, untransposed
        // unless the row-major operand is stored transposed.
        let op = |t: bool| {
            if t {
                blas::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (m, n, k) = (as_i32("n", g.n)?, as_i32("m", g.m)?, as_i32("k", g.k)?);
        let (lda, ldb, ldc) = (
            as_i32("ldb", g.ldb)?,
            as_i32("lda", g.lda)?,
            as_i32("ldc", g.ldc)?,
        );
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0 });
        let (a, b, c) = (g.b as *const f32, g.a as *const f32, g.c as *mut f32);
        // SAFETY: device addresses of the sizes `Gemm` describes; alpha and beta are host
        // scalars (cuBLAS's default pointer mode) read during the call.
        unsafe {
            if g.batch == 1 {
                cudarc::cublas::result::sgemm(
                    inner.blas,
                    op(g.b_t),
                    op(g.a_t),
                    m,
                    n,
                    k,
                    &alpha,
                    a,
                    lda,
                    b,
                    ldb,
                    &beta,
                    c,
                    ldc,
                )
            } else {
                let stride = |what: &str, s: usize| {
                    i64::try_from(s).map_err(|_| format!("gemm: {what} = {s} is too large"))
                };
                cudarc::cublas::result::sgemm_strided_batched(
                    inner.blas,
                    op(g.b_t),
                    op(g.a_t),
                    m,
                    n,
                    k,
                    &alpha,
                    a,
                    lda,
                    stride("stride_b", g.stride_b)?,
                    b,
                    ldb,
                    stride("stride_a", g.stride_a)?,
                    &beta,
                    c,
                    ldc,
                    stride("stride_c", g.stride_c)?,
                    as_i32("batch", g.batch)?,
                )
            }
        }
        .map_err(|e| format!("cuBLAS sgemm {g:?}: {e:?}"))
    }

    fn synchronize(&self) -> Result<(), String> {
        let _inner = self.lock()?;
        self.stream.synchronize().map_err(cu_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_line(e: &str) {
        assert!(!e.is_empty() && !e.contains('\n'), "not one line: {e:?}");
        assert!(
            e.contains("--device cuda needs"),
            "does not say what is needed: {e}"
        );
    }

    /// Without a driver or a GPU (here and in CI) `open` fails at once, in one line, without a
    /// panic; on a GPU machine it opens, and an ordinal past the GPUs fails the same way.
    #[test]
    fn open_says_in_one_line_what_is_missing() {
        match Gpu::open(0) {
            Err(e) => {
                println!("Gpu::open(0): {e}");
                one_line(&e);
            }
            Ok(gpu) => println!("Gpu::open(0): {}", gpu.describe()),
        }
        let e = Gpu::open(1 << 20).err().expect("no machine has 2^20 GPUs");
        one_line(&e);
    }

    #[test]
    fn kernels_are_embedded_as_one_translation_unit() {
        let names = kernel_names();
        assert!(names.iter().any(|n| n == "add_row_vector"), "{names:?}");
        assert!(
            !names.iter().any(|n| n == "sum_rows_no_barrier"),
            "testing/ is not embedded"
        );
        let unit = translation_unit().unwrap();
        assert!(!unit.contains("#include"), "every include is expanded");
        assert_eq!(
            unit.matches("#define ROW_BLOCK").count(),
            1,
            "common.cuh once"
        );
        for name in &names {
            assert!(
                unit.contains(&format!("void {name}(")),
                "{name} is in the unit"
            );
        }
        assert!(unit.contains("#line 1 \"kernels/rowops.cu\""));
    }

    #[test]
    fn parameter_kinds_read_mangled_symbols() {
        let kinds = |s: &str| parameter_kinds(s).map(|k| k.into_iter().collect::<String>());
        assert_eq!(kinds("_Z14add_row_vectorPfPKfii").as_deref(), Some("ppii"));
        assert_eq!(kinds("_Z3fooPfS_jf").as_deref(), Some("ppjf"));
        // PKf makes two substitutions, Kf (S_) and PKf (S0_).
        assert_eq!(kinds("_Z3barPKfS0_l").as_deref(), Some("ppl"));
        assert_eq!(kinds("_Z3bazv").as_deref(), Some(""));
        assert_eq!(kinds("_ZN2ns3fooEv"), None, "not a plain global function");
        assert_eq!(kinds("add_row_vector"), None);
        let ok = [KArg::Buf(0, 4), KArg::Buf(0, 4), KArg::I32(1), KArg::I32(1)];
        assert!(check_arguments("k", &['p', 'p', 'i', 'i'], &ok).is_ok());
        assert!(check_arguments("k", &['p', 'p', 'i', 'i'], &ok[..3]).is_err());
        let swapped = [KArg::Buf(0, 4), KArg::I32(1), KArg::Buf(0, 4), KArg::I32(1)];
        assert!(check_arguments("k", &['p', 'p', 'i', 'i'], &swapped).is_err());
        let unsigned = [KArg::Buf(0, 4), KArg::Buf(0, 4), KArg::U32(1), KArg::I32(1)];
        assert!(check_arguments("k", &['p', 'p', 'i', 'i'], &unsigned).is_err());
    }

    /// Whether NVRTC can be loaded from `$REPRO_NVRTC`; says why not (the test is then skipped).
    fn nvrtc_here(test: &str) -> bool {
        if std::env::var_os("REPRO_NVRTC").is_none_or(|p| p.is_empty()) {
            println!("{test}: skipped: REPRO_NVRTC (the path of libnvrtc.so.12) is not set");
            return false;
        }
        match nvrtc_version() {
            Ok((major, minor)) => {
                println!("{test}: NVRTC {major}.{minor}");
                true
            }
            Err(e) => {
                println!("{test}: skipped: {e}");
                false
            }
        }
    }

    /// Every kernel compiles for sm_80 and sm_90 through `compile_kernels` (what the driver
    /// calls); the cubin lands in the cache, a second compile reads it back, another option
    /// compiles anew, and a damaged cache file is replaced rather than trusted.
    #[test]
    fn kernels_compile_with_nvrtc_and_are_cached() {
        if !nvrtc_here("kernels_compile_with_nvrtc_and_are_cached") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let names = kernel_names();
        for arch in ["sm_80", "sm_90"] {
            let first =
                compile_kernels(arch, &[], Some(dir.path())).unwrap_or_else(|e| panic!("{e}"));
            assert!(!first.cache_hit, "{arch}: an empty cache");
            let file = first.cache_file.clone().expect("the cache is written");
            assert!(file.is_file(), "{}", file.display());
            assert!(first.image.cubin.starts_with(b"\x7fELF"));
            let listed: Vec<&String> = first.image.symbols.iter().map(|(n, _)| n).collect();
            assert_eq!(listed, names.iter().collect::<Vec<_>>());
            for (name, symbol) in &first.image.symbols {
                assert!(symbol.contains(name.as_str()), "{name}: {symbol}");
                assert!(
                    parameter_kinds(symbol).is_some(),
                    "{name}: {symbol} is readable"
                );
            }
            let symbol = &first
                .image
                .symbols
                .iter()
                .find(|(n, _)| n == "add_row_vector")
                .unwrap()
                .1;
            assert_eq!(
                parameter_kinds(symbol),
                Some(vec!['p', 'p', 'i', 'i']),
                "{symbol}"
            );

            let second = compile_kernels(arch, &[], Some(dir.path())).unwrap();
            assert!(
                second.cache_hit,
                "{arch}: the second compile reads the cache"
            );
            assert_eq!(
                (&second.image, &second.cache_file),
                (&first.image, &first.cache_file)
            );

            let other = compile_kernels(arch, &["-lineinfo"], Some(dir.path())).unwrap();
            assert!(!other.cache_hit, "{arch}: another option is another key");
            assert_ne!(other.cache_file, first.cache_file);

            std::fs::write(
                &file,
                b"repro kernel image 1\nadd_row_vector x\n\nnot a cubin",
            )
            .unwrap();
            let again = compile_kernels(arch, &[], Some(dir.path())).unwrap();
            assert!(!again.cache_hit, "{arch}: a damaged file is not trusted");
            assert_eq!(again.image, first.image);
            assert!(
                compile_kernels(arch, &[], Some(dir.path()))
                    .unwrap()
                    .cache_hit
            );
        }
        let mut files: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files.len(),
            4,
            "two architectures, two option sets, no temporaries: {files:?}"
        );
        assert!(
            files
                .iter()
                .all(|f| f.ends_with(".cubin") && f.len() == 64 + 6),
            "{files:?}"
        );
        let bad = compile_kernels("sm_90", &["--no-such-option"], None).unwrap_err();
        assert!(bad.contains("sm_90"), "{bad}");
    }

    /// On a GPU only: memory, a kernel and the four transpose cases of gemm (batched and
    /// accumulating) against the CPU. Skipped where `Gpu::open(0)` fails.
    #[test]
    fn on_a_gpu_kernels_and_gemm_match_the_cpu() {
        let gpu = match Gpu::open(0) {
            Ok(gpu) => gpu,
            Err(e) => return println!("on_a_gpu_kernels_and_gemm_match_the_cpu: skipped: {e}"),
        };
        println!("{}", gpu.describe());
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        let floats = |b: &[u8]| {
            b.chunks_exact(4)
                .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
                .collect::<Vec<f32>>()
        };
        let put = |v: &[f32]| {
            let addr = gpu.alloc(v.len() * 4).unwrap();
            gpu.upload(addr, &bytes(v)).unwrap();
            addr
        };
        let get = |addr: DevAddr, n: usize| {
            let mut b = vec![0u8; n * 4];
            gpu.download(addr, &mut b).unwrap();
            floats(&b)
        };

        let zeros = gpu.alloc(12).unwrap();
        assert_eq!(get(zeros, 3), vec![0.0; 3], "alloc zeroes");
        let (rows, d) = (37, 129);
        let x: Vec<f32> = (0..rows * d).map(|_| rand()).collect();
        let b: Vec<f32> = (0..d).map(|_| rand()).collect();
        let (xa, ba) = (put(&x), put(&b));
        let block = crate::nn::cuda::kernel_constant("ROW_BLOCK").unwrap();
        let dims = LaunchDims {
            grid: [7, 1, 1],
            block: [block, 1, 1],
            shared_bytes: 0,
        };
        let args = [
            KArg::Buf(xa, x.len() * 4),
            KArg::Buf(ba, d * 4),
            KArg::I32(rows as i32),
            KArg::I32(d as i32),
        ];
        gpu.launch("add_row_vector", dims, &args).unwrap();
        let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + b[i % d]).collect();
        assert_eq!(get(xa, x.len()), want);
        assert!(
            gpu.launch("add_row_vector", dims, &args[..3]).is_err(),
            "arguments are checked"
        );
        assert!(gpu.launch("no_such_kernel", dims, &args).is_err());
        let copy = gpu.alloc(x.len() * 4).unwrap();
        gpu.copy(copy, xa, x.len() * 4).unwrap();
        assert_eq!(get(copy, x.len()), want);
        gpu.zero(copy, 8).unwrap();
        assert_eq!(&get(copy, 3)[..], &[0.0, 0.0, want[2]]);

        let (m, n, k, batch) = (5, 7, 33, 3);
        for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
            let (lda, ldb, ldc) = (
                if a_t { m + 1 } else { k + 2 },
                if b_t { k + 3 } else { n },
                n + 1,
            );
            let (sa, sb, sc) = (
                lda * if a_t { k } else { m },
                ldb * if b_t { n } else { k },
                ldc * m,
            );
            let a: Vec<f32> = (0..sa * batch).map(|_| rand()).collect();
            let bm: Vec<f32> = (0..sb * batch).map(|_| rand()).collect();
            let c0: Vec<f32> = (0..sc * batch).map(|_| rand()).collect();
            let (aa, bb, cc) = (put(&a), put(&bm), put(&c0));
            for accumulate in [false, true] {
                gpu.upload(cc, &bytes(&c0)).unwrap();
                let g = Gemm {
                    m,
                    n,
                    k,
                    a: aa,
                    lda,
                    a_t,
                    stride_a: sa,
                    b: bb,
                    ldb,
                    b_t,
                    stride_b: sb,
                    c: cc,
                    ldc,
                    stride_c: sc,
                    batch,
                    accumulate,
                };
                gpu.gemm(&g).unwrap();
                let got = get(cc, sc * batch);
                for q in 0..batch {
                    for i in 0..m {
                        for j in 0..n {
                            let mut s = if accumulate {
                                c0[q * sc + i * ldc + j] as f64
                            } else {
                                0.0
                            };
                            for p in 0..k {
                                let av = if a_t {
                                    a[q * sa + p * lda + i]
                                } else {
                                    a[q * sa + i * lda + p]
                                };
                                let bv = if b_t {
                                    bm[q * sb + j * ldb + p]
                                } else {
                                    bm[q * sb + p * ldb + j]
                                };
                                s += av as f64 * bv as f64;
                            }
                            let g = got[q * sc + i * ldc + j] as f64;
                            // f32 sums of 33 products of numbers below 1/2 in size.
                            assert!(
                                (g - s).abs() <= 1e-5 * (1.0 + s.abs()),
                                "{a_t} {b_t} {accumulate}: {g} vs {s}"
                            );
                        }
                    }
                }
            }
            for addr in [aa, bb, cc] {
                gpu.free(addr);
            }
        }
        for addr in [zeros, xa, ba, copy] {
            gpu.free(addr);
        }
        gpu.synchronize().unwrap();
    }
}
