//! The instruction set the CPU kernels run on, chosen at run time so that one binary serves
//! every x86-64: AVX-512 where the CPU has it, else AVX2 with FMA, else scalar code.
//!
//! A kernel reads `Isa::current()` on the calling thread and runs its inner loops through
//! `Isa::run`, which compiles one generic body three times, each under its own target
//! features; LLVM vectorises each copy for its width. `REPRO_ISA=avx2` (or `scalar`) caps the
//! choice for a whole process, to measure or test a narrower path on a wider CPU;
//! `Isa::scoped` sets it for one thread, which is how the tests run every path side by side.

use std::cell::Cell;
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust, no target features beyond the x86-64 baseline (or any other CPU).
    Scalar,
    /// AVX2 and FMA (x86-64-v3).
    Avx2,
    /// AVX-512 F/BW/DQ/VL (x86-64-v4).
    Avx512,
}

/// The variable that caps the instruction set for a process.
pub const ISA_ENV: &str = "REPRO_ISA";

thread_local! {
    static SCOPED: Cell<Option<Isa>> = const { Cell::new(None) };
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == s.trim())
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                Isa::Avx2.supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest path this CPU supports.
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|i| i.supported())
            .unwrap_or(Isa::Scalar)
    }

    /// The paths this CPU supports, narrowest first.
    pub fn supported_all() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.supported()).collect()
    }

    /// The process-wide choice: the best path, capped by `REPRO_ISA` when it is set. An
    /// unknown value is ignored with a warning (a benchmark knob must not stop a training run).
    pub fn process() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = Isa::best();
            match std::env::var(ISA_ENV) {
                Ok(v) => match Isa::parse(&v) {
                    Some(cap) => cap.min(best),
                    None => {
                        eprintln!(
                            "warning: {ISA_ENV}={v:?} is not one of scalar, avx2, avx512; using {}",
                            best.name()
                        );
                        best
                    }
                },
                Err(_) => best,
            }
        })
    }

    /// The path kernels called from this thread take.
    pub fn current() -> Isa {
        SCOPED.with(|s| s.get()).unwrap_or_else(Isa::process)
    }

    /// Runs `f` with this thread's kernels on `self` (which must be supported), restoring the
    /// previous choice afterwards, even on panic.
    pub fn scoped<R>(self, f: impl FnOnce() -> R) -> R {
        assert!(self.supported(), "{} is not supported here", self.name());
        struct Restore(Option<Isa>);
        impl Drop for Restore {
            fn drop(&mut self) {
                SCOPED.with(|s| s.set(self.0));
            }
        }
        let _restore = Restore(SCOPED.with(|s| s.replace(Some(self))));
        f()
    }

    /// Runs `body` compiled for this instruction set. `body` must be `#[inline(always)]` (and so
    /// must what it calls in its hot loop) so that it is inlined into, and vectorised for, the
    /// target-feature function; it receives the ISA so that it can pick FMA (`madd`).
    #[inline(always)]
    pub fn run<R>(self, body: impl FnOnce(Isa) -> R) -> R {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: an Isa other than Scalar is only chosen when `supported()` said so.
            Isa::Avx512 => unsafe { x86::avx512(body) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::avx2(body) },
            _ => body(Isa::Scalar),
        }
    }

    /// a * b + c, fused where the path has FMA (then the same bits on AVX2 and AVX-512).
    #[inline(always)]
    pub fn madd<T: super::real::Real>(self, a: T, b: T, c: T) -> T {
        if self >= Isa::Avx2 {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Isa;

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub unsafe fn avx512<R>(body: impl FnOnce(Isa) -> R) -> R {
        body(Isa::Avx512)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2<R>(body: impl FnOnce(Isa) -> R) -> R {
        body(Isa::Avx2)
    }
}
