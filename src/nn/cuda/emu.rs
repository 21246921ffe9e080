//! The host emulator of kernels/*.cu: launch a kernel by name with a grid, a block, dynamic
//! shared memory and arguments, as the CUDA driver does. Blocks run in turn, the threads of a
//! block as real threads (kernels/emu/runtime.cpp), or, in fibers mode, as fibers on the
//! launching thread (the same barriers, checks and errors, far faster); each launch reports the
//! global-memory bytes its threads read and wrote, and, with the race check on, fails on a
//! shared-memory race.

use super::driver::{DevAddr, Driver, Gemm, KArg};
use super::LaunchDims;
use crate::nn::cpu::matmul::gemm_strided;
use crate::nn::cpu::MatRef;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Mutex;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub read_bytes: u64,
    pub written_bytes: u64,
}

extern "C" {
    fn repro_emu_set_race_check(on: c_int);
    fn repro_emu_set_fibers(on: c_int);
    fn repro_emu_last_error() -> *const c_char;
    fn repro_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        shared_bytes: usize,
        args: *mut *mut c_void,
        nargs: usize,
        ranges: *const u64,
        nranges: usize,
        stats: *mut Traffic,
    ) -> c_int;
}

/// One kernel argument, as CUDA takes them: its value's bytes (a device pointer, which is a
/// host address here, or a scalar). A buffer also gives its size: the kernel may touch only
/// the launch's buffers, and an access outside them fails the launch.
pub enum Arg {
    Buffer(*mut c_void, usize),
    I32(i32),
    U32(u32),
    F32(f32),
}

impl Arg {
    pub fn slice<T>(s: &[T]) -> Arg {
        Arg::Buffer(s.as_ptr() as *mut c_void, std::mem::size_of_val(s))
    }

    pub fn slice_mut<T>(s: &mut [T]) -> Arg {
        Arg::Buffer(s.as_mut_ptr() as *mut c_void, std::mem::size_of_val(s))
    }

    fn value_ptr(&mut self) -> *mut c_void {
        match self {
            Arg::Buffer(p, _) => p as *mut *mut c_void as *mut c_void,
            Arg::I32(v) => v as *mut i32 as *mut c_void,
            Arg::U32(v) => v as *mut u32 as *mut c_void,
            Arg::F32(v) => v as *mut f32 as *mut c_void,
        }
    }
}

/// Launches are serialised: the runtime's launch state is global.
static LAUNCH: Mutex<()> = Mutex::new(());

/// Runs kernel `name` over `grid` blocks of `block` threads, each thread a real thread. The
/// caller vouches that the pointer arguments address buffers the kernel may read and write at
/// these sizes, as on a GPU.
pub fn launch(
    name: &str,
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: usize,
    args: &mut [Arg],
    race_check: bool,
) -> Result<Traffic, String> {
    launch_as(name, grid, block, shared_bytes, args, race_check, false)
}

/// `launch`, with the threads of each block as fibers on the calling thread when `fibers`:
/// each runs until it waits at a barrier or finishes, in a fixed round-robin order.
pub fn launch_as(
    name: &str,
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: usize,
    args: &mut [Arg],
    race_check: bool,
    fibers: bool,
) -> Result<Traffic, String> {
    let c_name = CString::new(name).map_err(|_| format!("bad kernel name {name:?}"))?;
    let ranges: Vec<u64> = args
        .iter()
        .filter_map(|a| match *a {
            Arg::Buffer(p, bytes) => Some([p as u64, p as u64 + bytes as u64]),
            _ => None,
        })
        .flatten()
        .collect();
    let mut values: Vec<*mut c_void> = args.iter_mut().map(Arg::value_ptr).collect();
    let mut traffic = Traffic::default();
    let _one_at_a_time = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: the names, sizes and argument pointers are valid for the call; the kernel's own
    // accesses are the caller's promise above.
    let rc = unsafe {
        repro_emu_set_race_check(race_check as c_int);
        repro_emu_set_fibers(fibers as c_int);
        repro_emu_launch(
            c_name.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            shared_bytes,
            values.as_mut_ptr(),
            values.len(),
            ranges.as_ptr(),
            ranges.len() / 2,
            &mut traffic,
        )
    };
    if rc == 0 {
        Ok(traffic)
    } else {
        // SAFETY: the runtime returns a NUL-terminated string it owns until the next launch,
        // and launches are serialised by the lock held here.
        Err(unsafe { CStr::from_ptr(repro_emu_last_error()) }
            .to_string_lossy()
            .into_owned())
    }
}

/// The emulator as a `Driver`: device memory is host memory (64-byte aligned, zeroed), kernels
/// run through `launch`, matrix products on the CPU's gemm. It also sums each kernel's global
/// traffic over its launches.
pub struct EmuDriver {
    race_check: bool,
    fibers: bool,
    allocations: Mutex<HashMap<DevAddr, usize>>,
    traffic: Mutex<BTreeMap<String, (u64, Traffic)>>,
}

impl EmuDriver {
    /// `race_check`: every launch checks shared memory for races (slower; on in tests). The
    /// threads of a block are real threads.
    pub fn new(race_check: bool) -> EmuDriver {
        EmuDriver::with_mode(race_check, false)
    }

    /// `fibers`: the threads of a block are fibers on the launching thread (see `launch_as`).
    pub fn with_mode(race_check: bool, fibers: bool) -> EmuDriver {
        EmuDriver {
            race_check,
            fibers,
            allocations: Mutex::default(),
            traffic: Mutex::default(),
        }
    }

    /// Per kernel: launches, and the global bytes they read and wrote. Device-side zeroing and
    /// copies count too, as `(memset)` and `(memcpy)`: a GPU moves those bytes as well.
    pub fn traffic(&self) -> BTreeMap<String, (u64, Traffic)> {
        self.traffic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// `traffic()`, and the count starts again from zero (what one op moved: take before, take
    /// after).
    pub fn take_traffic(&self) -> BTreeMap<String, (u64, Traffic)> {
        std::mem::take(&mut *self.traffic.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn count(&self, name: &str, t: Traffic) {
        let mut table = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        let e = table.entry(name.to_string()).or_default();
        e.0 += 1;
        e.1.read_bytes += t.read_bytes;
        e.1.written_bytes += t.written_bytes;
    }
}

const ALIGN: usize = 64;

/// `len` floats at `addr` with row stride `ld`, transposed when `t`: the strided view gemm
/// takes, over exactly the elements it may touch.
///
/// # Safety
/// `addr` is memory of this driver holding the matrix.
unsafe fn host_mat<'a>(
    addr: DevAddr,
    rows: usize,
    cols: usize,
    ld: usize,
    t: bool,
) -> MatRef<'a, f32> {
    // Stored [rows, cols] (or [cols, rows] when transposed) with row stride ld.
    let (sr, sc) = if t { (cols, rows) } else { (rows, cols) };
    let len = if sr == 0 || sc == 0 {
        0
    } else {
        (sr - 1) * ld + sc
    };
    let data = unsafe { std::slice::from_raw_parts(addr as *const f32, len) };
    let m = MatRef {
        data,
        rs: ld,
        cs: 1,
    };
    if t {
        m.t()
    } else {
        m
    }
}

impl Driver for EmuDriver {
    fn describe(&self) -> String {
        let threads = if self.fibers {
            "fibers"
        } else {
            "real threads"
        };
        format!("cuda-emu: kernels/*.cu on the host emulator ({threads}, counted traffic)")
    }
    fn alloc(&self, bytes: usize) -> Result<DevAddr, String> {
        let layout = Layout::from_size_align(bytes.max(1), ALIGN)
            .map_err(|_| format!("cannot allocate {bytes} bytes"))?;
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        if p.is_null() {
            return Err(format!("cuda-emu: out of memory allocating {bytes} bytes"));
        }
        self.allocations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p as DevAddr, bytes.max(1));
        Ok(p as DevAddr)
    }
    fn free(&self, addr: DevAddr) {
        let bytes = self
            .allocations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&addr);
        if let Some(bytes) = bytes {
            // SAFETY: allocated by `alloc` with this layout.
            unsafe {
                dealloc(
                    addr as *mut u8,
                    Layout::from_size_align_unchecked(bytes, ALIGN),
                )
            }
        }
    }
    fn upload(&self, dst: DevAddr, src: &[u8]) -> Result<(), String> {
        // SAFETY: the caller's buffer of at least src.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }
    fn download(&self, src: DevAddr, dst: &mut [u8]) -> Result<(), String> {
        // SAFETY: as upload.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    fn copy(&self, dst: DevAddr, src: DevAddr, bytes: usize) -> Result<(), String> {
        // SAFETY: two buffers of this driver of at least `bytes`.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        let b = bytes as u64;
        self.count(
            "(memcpy)",
            Traffic {
                read_bytes: b,
                written_bytes: b,
            },
        );
        Ok(())
    }
    fn zero(&self, dst: DevAddr, bytes: usize) -> Result<(), String> {
        // SAFETY: a buffer of this driver of at least `bytes`.
        unsafe { std::ptr::write_bytes(dst as *mut u8, 0, bytes) };
        self.count(
            "(memset)",
            Traffic {
                read_bytes: 0,
                written_bytes: bytes as u64,
            },
        );
        Ok(())
    }
    fn launch(&self, name: &str, dims: LaunchDims, args: &[KArg]) -> Result<(), String> {
        let mut args: Vec<Arg> = args
            .iter()
            .map(|a| match *a {
                KArg::Buf(addr, bytes) => Arg::Buffer(addr as *mut c_void, bytes),
                KArg::I32(v) => Arg::I32(v),
                KArg::U32(v) => Arg::U32(v),
                KArg::F32(v) => Arg::F32(v),
            })
            .collect();
        let t = launch_as(
            name,
            dims.grid,
            dims.block,
            dims.shared_bytes,
            &mut args,
            self.race_check,
            self.fibers,
        )?;
        self.count(name, t);
        Ok(())
    }
    fn gemm(&self, g: &Gemm) -> Result<(), String> {
        for i in 0..g.batch {
            let at = |base: DevAddr, stride: usize| base + (i * stride * 4) as DevAddr;
            // SAFETY: the operands are this driver's buffers at the sizes `g` describes.
            unsafe {
                let a = host_mat(at(g.a, g.stride_a), g.m, g.k, g.lda, g.a_t);
                let b = host_mat(at(g.b, g.stride_b), g.k, g.n, g.ldb, g.b_t);
                let c_len = if g.m == 0 || g.n == 0 {
                    0
                } else {
                    (g.m - 1) * g.ldc + g.n
                };
                let c = std::slice::from_raw_parts_mut(at(g.c, g.stride_c) as *mut f32, c_len);
                gemm_strided(g.m, g.n, g.k, a, b, c, g.ldc, 1, g.accumulate);
            }
        }
        Ok(())
    }
    fn synchronize(&self) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::testing::fresh_seed;
    use crate::nn::cpu::rowops;
    use crate::nn::cuda::kernel_constant;
    use crate::nn::cuda::testing::randn;
    use crate::nn::rng::Rng;

    fn close(a: &[f32], b: &[f32], case: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "{case}: element {i}: {x} against {y}"
            );
        }
    }

    /// Awkward shapes: a single row, fewer rows than a warp, not multiples of the block.
    const SHAPES: [(usize, usize); 5] = [(1, 1), (1, 7), (5, 33), (129, 3), (300, 17)];

    /// Both ways of running a block's threads: real threads, then fibers.
    const MODES: [bool; 2] = [false, true];

    fn mode(fibers: bool) -> &'static str {
        if fibers {
            "fibers"
        } else {
            "threads"
        }
    }

    /// The row kernels on the case's inputs in one mode, checked against their CPU twins; their
    /// outputs and traffic, for comparing the modes.
    fn row_kernels(
        rows: usize,
        d: usize,
        x: &[f32],
        b: &[f32],
        start: &[f32],
        case: &str,
        fibers: bool,
    ) -> Vec<(Vec<f32>, Traffic)> {
        let block = kernel_constant("ROW_BLOCK").expect("ROW_BLOCK in common.cuh");
        let case = format!("{case}, {}", mode(fibers));
        let mut outputs = Vec::new();
        let mut want = x.to_vec();
        rowops::add_row_vector(&mut want, b);
        let mut got = x.to_vec();
        let grid = ((rows * d) as u32).div_ceil(block).min(7);
        let t = launch_as(
            "add_row_vector",
            [grid, 1, 1],
            [block, 1, 1],
            0,
            &mut [
                Arg::slice_mut(&mut got),
                Arg::slice(b),
                Arg::I32(rows as i32),
                Arg::I32(d as i32),
            ],
            true,
            fibers,
        )
        .unwrap();
        close(&got, &want, &case);
        let n = (rows * d) as u64;
        assert_eq!(
            t,
            Traffic {
                read_bytes: 8 * n,
                written_bytes: 4 * n
            },
            "{case}"
        );
        outputs.push((got, t));

        let mut want = start.to_vec();
        rowops::sum_rows_into(x, &mut want);
        // sum_rows_warp keeps one float a warp in dynamic shared memory.
        for (kernel, shared) in [("sum_rows", 0), ("sum_rows_warp", block as usize / 32 * 4)] {
            let mut got = start.to_vec();
            let t = launch_as(
                kernel,
                [d as u32, 1, 1],
                [block, 1, 1],
                shared,
                &mut [
                    Arg::slice(x),
                    Arg::slice_mut(&mut got),
                    Arg::I32(rows as i32),
                    Arg::I32(d as i32),
                ],
                true,
                fibers,
            )
            .unwrap_or_else(|e| panic!("{kernel} {case}: {e}"));
            close(&got, &want, &format!("{kernel} {case}"));
            outputs.push((got, t));
        }
        outputs
    }

    /// Each row kernel equals its CPU twin in both modes, and the modes agree bit for bit (the
    /// kernels' reductions have a fixed order) and in traffic.
    #[test]
    fn row_kernels_equal_their_cpu_twins() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        for (rows, d) in SHAPES {
            let case = format!("seed {seed}, {rows}x{d}");
            let (x, b) = (randn(&mut rng, rows * d, 1.0), randn(&mut rng, d, 1.0));
            let start = randn(&mut rng, d, 1.0);
            let [threads, fibers] =
                MODES.map(|fibers| row_kernels(rows, d, &x, &b, &start, &case, fibers));
            for (i, ((a, ta), (f, tf))) in threads.iter().zip(&fibers).enumerate() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(a),
                    bits(f),
                    "{case}: kernel {i}, threads against fibers"
                );
                assert_eq!(ta, tf, "{case}: kernel {i}, traffic");
            }
        }
    }

    #[test]
    fn a_missing_barrier_is_a_race_and_bad_launches_are_refused() {
        for fibers in MODES {
            let m = mode(fibers);
            let (rows, d) = (300, 3);
            let x = vec![1.0f32; rows * d];
            let mut out = vec![0.0f32; d];
            let block = kernel_constant("ROW_BLOCK").unwrap();
            let mut args = [
                Arg::slice(&x),
                Arg::slice_mut(&mut out),
                Arg::I32(rows as i32),
                Arg::I32(d as i32),
            ];
            let err = launch_as(
                "sum_rows_no_barrier",
                [d as u32, 1, 1],
                [block, 1, 1],
                0,
                &mut args,
                true,
                fibers,
            )
            .unwrap_err();
            assert!(
                err.contains("sum_rows_no_barrier") && err.contains("race"),
                "{m}: {err}"
            );
            let mut one = vec![0.0f32];
            let err = launch_as(
                "all_write_one",
                [1, 1, 1],
                [64, 1, 1],
                0,
                &mut [Arg::slice_mut(&mut one)],
                true,
                fibers,
            )
            .unwrap_err();
            assert!(err.contains("written by two threads"), "{m}: {err}");
            // The same launch without the check runs (and its answer is some thread's index).
            launch_as(
                "all_write_one",
                [1, 1, 1],
                [64, 1, 1],
                0,
                &mut [Arg::slice_mut(&mut one)],
                false,
                fibers,
            )
            .unwrap();
            assert!((0.0..64.0).contains(&one[0]), "{m}");
            assert!(
                launch_as(
                    "no_such_kernel",
                    [1, 1, 1],
                    [1, 1, 1],
                    0,
                    &mut [],
                    false,
                    fibers
                )
                .unwrap_err()
                .contains("no kernel named no_such_kernel"),
                "{m}"
            );
            assert!(
                launch_as(
                    "all_write_one",
                    [1, 1, 1],
                    [1, 1, 1],
                    0,
                    &mut [],
                    false,
                    fibers
                )
                .unwrap_err()
                .contains("takes 1 arguments, given 0"),
                "{m}"
            );
            assert!(
                launch_as(
                    "all_write_one",
                    [1, 1, 1],
                    [2048, 1, 1],
                    0,
                    &mut [Arg::slice_mut(&mut one)],
                    false,
                    fibers
                )
                .is_err(),
                "{m}"
            );
        }
    }

    /// In fibers mode a missing barrier gives a wrong answer, and the same wrong answer each
    /// time: a fiber runs on until a barrier, so it reads the partial sums of the threads after
    /// it before they are written, that is, the previous block's. The first block reads the
    /// previous launch's (a static shared array keeps its values, as uninitialised shared memory
    /// may on a GPU), so only the other columns are compared.
    #[test]
    fn a_missing_barrier_is_a_deterministic_wrong_answer_in_fibers_mode() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let (rows, d) = (300, 5);
        let x = randn(&mut rng, rows * d, 1.0);
        let mut want = vec![0.0f32; d];
        rowops::sum_rows_into(&x, &mut want);
        let block = kernel_constant("ROW_BLOCK").unwrap();
        let run = || {
            let mut out = vec![0.0f32; d];
            launch_as(
                "sum_rows_no_barrier",
                [d as u32, 1, 1],
                [block, 1, 1],
                0,
                &mut [
                    Arg::slice(&x),
                    Arg::slice_mut(&mut out),
                    Arg::I32(rows as i32),
                    Arg::I32(d as i32),
                ],
                false,
                true,
            )
            .unwrap();
            out
        };
        let first = run();
        assert_eq!(first[1..], run()[1..], "seed {seed}");
        assert!(
            first[1..]
                .iter()
                .zip(&want[1..])
                .any(|(a, b)| (a - b).abs() > 1e-3 * b.abs().max(1.0)),
            "seed {seed}: {first:?} is the right answer {want:?}"
        );
    }

    /// An access outside the launch's buffers fails the launch in both modes, naming the kernel
    /// and the block; the accesses inside them happen.
    #[test]
    fn out_of_bounds_fails_in_both_modes() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let (n, d) = (98, 7);
        let (x, b) = (randn(&mut rng, n, 1.0), randn(&mut rng, d, 1.0));
        let mut want = x.clone();
        rowops::add_row_vector(&mut want, &b);
        for fibers in MODES {
            let mut got = x.clone();
            let err = launch_as(
                "add_row_vector_unguarded",
                [1, 1, 1],
                [128, 1, 1],
                0,
                &mut [
                    Arg::slice_mut(&mut got),
                    Arg::slice(&b),
                    Arg::I32((n / d) as i32),
                    Arg::I32(d as i32),
                ],
                false,
                fibers,
            )
            .unwrap_err();
            let m = mode(fibers);
            assert!(
                err.starts_with(
                    "out-of-bounds read in kernel add_row_vector_unguarded, block (0,0,0), thread "
                ),
                "{m}: {err}"
            );
            close(&got, &want, &format!("seed {seed}, {m}"));
        }
    }

    /// `EmuDriver::with_mode(_, true)` launches through the Driver seam in fibers mode.
    #[test]
    fn the_driver_runs_fibers() {
        let dr = EmuDriver::with_mode(true, true);
        assert!(dr.describe().contains("fibers"));
        let block = kernel_constant("ROW_BLOCK").unwrap();
        let (rows, d) = (3, 50);
        let x: Vec<f32> = (0..rows * d).map(|i| i as f32).collect();
        let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        let (xa, oa) = (dr.alloc(4 * rows * d).unwrap(), dr.alloc(4 * d).unwrap());
        dr.upload(xa, &bytes(&x)).unwrap();
        let dims = LaunchDims {
            grid: [d as u32, 1, 1],
            block: [block, 1, 1],
            shared_bytes: 0,
        };
        let args = [
            KArg::Buf(xa, 4 * rows * d),
            KArg::Buf(oa, 4 * d),
            KArg::I32(rows as i32),
            KArg::I32(d as i32),
        ];
        dr.launch("sum_rows", dims, &args).unwrap();
        let mut out = vec![0u8; 4 * d];
        dr.download(oa, &mut out).unwrap();
        let mut want = vec![0.0f32; d];
        rowops::sum_rows_into(&x, &mut want);
        assert_eq!(out, bytes(&want));
        let sum_rows = dr.traffic()["sum_rows"];
        assert_eq!(sum_rows.0, 1);
        // Zeroing and copies count; taking the table starts it again.
        dr.zero(oa, 4 * d).unwrap();
        dr.copy(oa, xa, 8).unwrap();
        let t = dr.take_traffic();
        assert_eq!(t["sum_rows"], sum_rows);
        assert_eq!(
            t["(memset)"],
            (
                1,
                Traffic {
                    read_bytes: 0,
                    written_bytes: 4 * d as u64
                }
            )
        );
        assert_eq!(t["(memcpy)"].1.read_bytes, 8);
        assert!(dr.traffic().is_empty());
        dr.free(xa);
        dr.free(oa);
    }

    /// The emulator's cost a block, for sizing training runs under it: `add_row_vector` over
    /// 1000 blocks of ROW_BLOCK threads and `sum_rows` over 300, with and without the race
    /// check, in both modes. Run with `cargo test --release --features cuda-emu --lib
    /// emulator_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn emulator_speed() {
        let block = kernel_constant("ROW_BLOCK").unwrap();
        let mut rng = Rng::new(fresh_seed());
        let (rows, d) = (1000, block as usize);
        let mut x = randn(&mut rng, rows * d, 1.0);
        let b = randn(&mut rng, d, 1.0);
        let per_block = |kernel: &str, grid: u32, args: &mut [Arg], race_check, fibers| {
            let runs = 5;
            let start = std::time::Instant::now();
            for _ in 0..runs {
                launch_as(
                    kernel,
                    [grid, 1, 1],
                    [block, 1, 1],
                    0,
                    args,
                    race_check,
                    fibers,
                )
                .unwrap();
            }
            let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(runs * grid);
            println!(
                "{kernel}, {grid} blocks of {block}, {}, race check {race_check}: {us:.1} us a block",
                mode(fibers)
            );
        };
        for fibers in MODES {
            for race_check in [false, true] {
                per_block(
                    "add_row_vector",
                    1000,
                    &mut [
                        Arg::slice_mut(&mut x),
                        Arg::slice(&b),
                        Arg::I32(rows as i32),
                        Arg::I32(d as i32),
                    ],
                    race_check,
                    fibers,
                );
                let (rows, d) = (512, 300);
                let x = randn(&mut rng, rows * d, 1.0);
                let mut out = vec![0.0f32; d];
                per_block(
                    "sum_rows",
                    d as u32,
                    &mut [
                        Arg::slice(&x),
                        Arg::slice_mut(&mut out),
                        Arg::I32(rows as i32),
                        Arg::I32(d as i32),
                    ],
                    race_check,
                    fibers,
                );
            }
        }
    }
}
