//! Starting a stage's process without fork(), the way glibc's posix_spawn does: clone with
//! CLONE_VM | CLONE_VFORK, so the child borrows repro's memory until it execs instead of copying
//! its page tables. std's `Command` falls back to fork() as soon as it has a `pre_exec` closure,
//! and fork's cost grows with repro's memory (spawning `true` measured 0.7 ms at any size
//! without pre_exec, 5 ms at 100 MB and 20 ms at 500 MB with it); here it does not. What
//! posix_spawn cannot do, and why this exists: the child sets PR_SET_PDEATHSIG before it execs.
//!
//! Everything the child needs is built by `prepare` in the parent; between clone and execve the
//! child only makes raw system calls on memory prepared for it: no allocation, no locks, no
//! panics.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};

/// The child's stack: it runs a dozen system calls, nothing deep.
const STACK_SIZE: usize = 64 * 1024;

/// A process ready to start: its program, arguments, environment and working directory as C
/// strings, and the descriptors it gets as stdin (/dev/null) and stdout/stderr.
pub struct Prepared {
    path: CString,
    /// The pointers point into these strings, whose buffers do not move with them.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    cwd: CString,
    /// Descriptors above 2, so that moving them onto 0, 1 and 2 in the child cannot overwrite
    /// one with another; close-on-exec, so that the child keeps only the copies on 0, 1 and 2.
    stdin: OwnedFd,
    out: OwnedFd,
}

/// Prepares `argv` to run in `cwd` with the current environment plus `env` (which overrides it,
/// as `Command::envs` does), stdin from /dev/null and stdout and stderr to `out`. A program
/// without a slash is looked up in the PATH the child will have.
pub fn prepare<S, K, V>(
    argv: &[S],
    env: &[(K, V)],
    cwd: &Path,
    out: BorrowedFd<'_>,
) -> io::Result<Prepared>
where
    S: AsRef<OsStr>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let Some(program) = argv.first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    };
    let mut vars: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (k, v) in env {
        vars.insert(k.as_ref().to_owned(), v.as_ref().to_owned());
    }
    let path = resolve(
        Path::new(program.as_ref()),
        vars.get(OsStr::new("PATH")).map(|p| p.as_os_str()),
        cwd,
    )?;
    let argv: Vec<CString> = argv
        .iter()
        .map(|a| c_string(a.as_ref().as_bytes().to_vec()))
        .collect::<io::Result<_>>()?;
    let envp: Vec<CString> = vars
        .iter()
        .map(|(k, v)| {
            let mut kv = Vec::with_capacity(k.len() + 1 + v.len());
            kv.extend_from_slice(k.as_bytes());
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            c_string(kv)
        })
        .collect::<io::Result<_>>()?;
    let null_terminated = |strings: &[CString]| {
        let mut ptrs: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        ptrs
    };
    Ok(Prepared {
        path: c_string(path.into_os_string().into_vec())?,
        argv_ptrs: null_terminated(&argv),
        _argv: argv,
        envp_ptrs: null_terminated(&envp),
        _envp: envp,
        cwd: c_string(cwd.as_os_str().as_bytes().to_vec())?,
        stdin: above_stdio(File::open("/dev/null")?.as_fd())?,
        out: above_stdio(out)?,
    })
}

/// `prepare` then `Prepared::spawn`.
pub fn spawn<S, K, V>(
    argv: &[S],
    env: &[(K, V)],
    cwd: &Path,
    out: BorrowedFd<'_>,
) -> io::Result<libc::pid_t>
where
    S: AsRef<OsStr>,
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    prepare(argv, env, cwd, out)?.spawn()
}

/// What the child reads, and where it reports why it could not exec.
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdin: libc::c_int,
    out: libc::c_int,
    parent: libc::pid_t,
    last_signal: libc::c_int,
    errno: AtomicI32,
}

impl Prepared {
    /// Starts the process as the leader of a new process group, to be killed with SIGKILL when
    /// the calling thread exits. Returns its pid, which `wait` must reap. An error (such as
    /// NotFound for a missing program or working directory) means no process is left.
    pub fn spawn(&self) -> io::Result<libc::pid_t> {
        let mut stack: Vec<u8> = Vec::with_capacity(STACK_SIZE);
        // The stack grows down from its 16-byte aligned top.
        let top = (stack.as_mut_ptr() as usize + STACK_SIZE) & !15;
        let args = ChildArgs {
            path: self.path.as_ptr(),
            argv: self.argv_ptrs.as_ptr(),
            envp: self.envp_ptrs.as_ptr(),
            cwd: self.cwd.as_ptr(),
            stdin: self.stdin.as_raw_fd(),
            out: self.out.as_raw_fd(),
            // SAFETY: getpid and SIGRTMAX have no preconditions.
            parent: unsafe { libc::getpid() },
            last_signal: libc::SIGRTMAX(),
            errno: AtomicI32::new(0),
        };
        // Blocking every signal in this thread keeps repro's handlers from running in the
        // child, which shares this memory, before it has reset them; the old mask is restored
        // once clone returns.
        // SAFETY: sigset_t is plain data, for which all zeroes is a valid (empty) value;
        // sigfillset and pthread_sigmask only write to the sets they are given.
        let old = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            old
        };
        // SAFETY: the child runs `child` on its own stack (`top`, owned by `stack`, which
        // outlives the call) and only reads `args` and the strings and arrays it points into,
        // all alive until this function returns. CLONE_VFORK suspends this thread until the
        // child has called execve or exited, so nothing here is freed or changed while the
        // child uses it. Other threads never see these allocations. The child gets its own
        // copies of the descriptor table, signal dispositions and working directory (no
        // CLONE_FILES, CLONE_SIGHAND or CLONE_FS), so what it changes there is its own.
        let pid = unsafe {
            libc::clone(
                child,
                top as *mut libc::c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                &args as *const ChildArgs as *mut libc::c_void,
            )
        };
        let clone_error = io::Error::last_os_error();
        // SAFETY: restoring the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        drop(stack);
        if pid < 0 {
            return Err(clone_error);
        }
        let errno = args.errno.load(Ordering::SeqCst);
        if errno != 0 {
            // The child exited without exec: reap it, so no zombie is left.
            wait(pid)?;
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok(pid)
    }
}

/// The child between clone and execve. It shares the parent's memory, runs on its own small
/// stack and uses the parent thread's TLS, so it only makes async-signal-safe system calls on
/// memory prepared for it; it never allocates, locks, panics or returns.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the `ChildArgs` of `Prepared::spawn`, alive and unchanged while
    // the parent thread is suspended by CLONE_VFORK; its pointers are valid NUL-terminated
    // strings and NULL-terminated arrays. Every call below is async-signal-safe and is given
    // valid pointers or plain integers.
    unsafe {
        let args = &*(arg as *const ChildArgs);
        let fail = || -> ! {
            args.errno
                .store(*libc::__errno_location(), Ordering::SeqCst);
            libc::_exit(127)
        };
        // Handlers installed by repro must not run here (they would touch repro's memory) nor
        // survive as anything but the default: reset every handled signal. SIGPIPE, which
        // Rust ignores, goes back to the default as std's Command does; signals repro was told
        // to ignore stay ignored. sigaction fails for glibc's internal signals: they are left.
        for sig in 1..=args.last_signal {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut current) != 0 {
                continue;
            }
            let handled =
                current.sa_sigaction != libc::SIG_DFL && current.sa_sigaction != libc::SIG_IGN;
            if handled || (sig == libc::SIGPIPE && current.sa_sigaction != libc::SIG_DFL) {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                if libc::sigaction(sig, &default, std::ptr::null_mut()) != 0 {
                    fail();
                }
            }
        }
        // Its own process group, so that a stage can be stopped with everything it started.
        if libc::setpgid(0, 0) != 0 {
            fail();
        }
        // SIGKILL when the spawning thread exits, so that `kill -9 repro` takes the stage with
        // it. If repro died before this line, the child was already reparented: exit instead.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
            fail();
        }
        if libc::getppid() != args.parent {
            libc::_exit(127);
        }
        if libc::dup2(args.stdin, 0) < 0
            || libc::dup2(args.out, 1) < 0
            || libc::dup2(args.out, 2) < 0
        {
            fail();
        }
        if libc::chdir(args.cwd) != 0 {
            fail();
        }
        // Stages start with no signal blocked, as with std's Command.
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) != 0 {
            fail();
        }
        libc::execve(args.path, args.argv, args.envp);
        fail()
    }
}

/// Waits for `pid` to exit and reaps it.
pub fn wait(pid: libc::pid_t) -> io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes only to `status`.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            return Ok(ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The file to execute for `program`: itself if it has a slash (relative to `cwd`, where the
/// child execs), else the first executable `program` in the directories of `path` (execvp's
/// default without one).
fn resolve(program: &Path, path: Option<&OsStr>, cwd: &Path) -> io::Result<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(program.to_path_buf());
    }
    let path = path.unwrap_or(OsStr::new("/bin:/usr/bin"));
    let mut denied = false;
    for dir in path.as_bytes().split(|&b| b == b':') {
        // An empty entry is the working directory, the child's.
        let file = cwd.join(OsStr::from_bytes(dir)).join(program);
        match std::fs::metadata(&file) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(file),
            Ok(_) => denied = true,
            Err(_) => {}
        }
    }
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
}

fn c_string(bytes: Vec<u8>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in a program's argument, environment or directory",
        )
    })
}

/// A close-on-exec copy of `fd` numbered 3 or above.
fn above_stdio(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a valid descriptor returns a new descriptor that we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Runs `sh -c script` with `env` in `dir`, waits, and returns its pid, status and log.
    fn sh(script: &str, env: &[(&str, &str)], dir: &Path) -> (libc::pid_t, ExitStatus, String) {
        let log_path = dir.join("log");
        let log = File::create(&log_path).unwrap();
        let pid = spawn(&["sh", "-c", script], env, dir, log.as_fd()).unwrap();
        let status = wait(pid).unwrap();
        (pid, status, std::fs::read_to_string(&log_path).unwrap())
    }

    #[test]
    fn environment_directory_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        std::env::var_os("PATH").expect("the tests run with a PATH");
        let (_, status, log) = sh(
            r#"echo "job=$JOB home=$HOME path=${PATH:+set}"; pwd; echo to-stderr >&2"#,
            &[("JOB", "a b"), ("HOME", "/overridden")],
            &dir,
        );
        assert!(status.success(), "{status:?}: {log}");
        assert_eq!(
            log,
            format!(
                "job=a b home=/overridden path=set\n{}\nto-stderr\n",
                dir.display()
            ),
            "the job's variables over the inherited ones, its directory, stdout and stderr \
             to the log"
        );
    }

    #[test]
    fn descriptors_are_stdio_and_what_was_inherited() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let out = File::create(&log).unwrap();
        let none: &[(&str, &str)] = &[];
        let pid = spawn(
            &["ls", "-l", "/proc/self/fd/"],
            none,
            dir.path(),
            out.as_fd(),
        )
        .unwrap();
        assert!(wait(pid).unwrap().success());
        // Lines like `l-wx------ 1 root root 64 Nov 29 17:52 1 -> /tmp/x/log`.
        let listing = std::fs::read_to_string(&log).unwrap();
        let fds: BTreeMap<i32, String> = listing
            .lines()
            .filter_map(|l| {
                let (head, target) = l.split_once(" -> ")?;
                Some((head.rsplit(' ').next()?.parse().ok()?, target.to_string()))
            })
            .collect();
        let log = log.display().to_string();
        assert_eq!(
            [&fds[&0], &fds[&1], &fds[&2]],
            ["/dev/null", &log, &log],
            "{listing}"
        );
        // Beyond 0, 1 and 2, only what this process was given without close-on-exec (a test
        // harness may pass some) passes on, as with std's Command; and ls's own directory,
        // opened on the lowest free descriptor.
        let mut expected: Vec<i32> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            // SAFETY: F_GETFD only reads a descriptor's flags.
            .filter(|&fd| fd > 2 && unsafe { libc::fcntl(fd, libc::F_GETFD) } == 0)
            .chain([0, 1, 2])
            .collect();
        let lowest_free = (0..).find(|fd| !expected.contains(fd)).unwrap();
        expected.push(lowest_free);
        expected.sort();
        assert_eq!(
            fds.keys().copied().collect::<Vec<_>>(),
            expected,
            "{listing}"
        );
    }

    #[test]
    fn stdio_is_the_log_and_not_this_processs_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let log = File::create(dir.path().join("log")).unwrap();
        let none: &[(&str, &str)] = &[];
        let pid = spawn(&["sleep", "10"], none, dir.path(), log.as_fd()).unwrap();
        // kcmp tells whether two descriptors share an open file description.
        // SAFETY: kcmp only compares; getpid has no preconditions.
        let same = |ours: i32, theirs: i32| unsafe {
            let (a, b) = (libc::getpid() as libc::c_long, pid as libc::c_long);
            // KCMP_FILE is 0; the descriptors are unsigned longs.
            libc::syscall(
                libc::SYS_kcmp,
                a,
                b,
                0 as libc::c_long,
                ours as libc::c_ulong,
                theirs as libc::c_ulong,
            )
        };
        let found = [
            same(log.as_raw_fd(), 1),
            same(log.as_raw_fd(), 2),
            same(0, 0),
        ];
        // SAFETY: stopping and reaping our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait(pid).unwrap();
        // Where kcmp is not available (-1), `descriptors_are_stdio_and_what_was_inherited`
        // still checks the paths; it cannot tell our /dev/null from an inherited one.
        if found != [-1; 3] {
            assert_eq!(found[..2], [0, 0], "stdout and stderr are the log");
            assert_ne!(found[2], 0, "stdin is not this process's");
        }
    }

    #[test]
    fn exit_codes_and_signals() {
        let dir = tempfile::tempdir().unwrap();
        let (_, status, _) = sh("true", &[], dir.path());
        assert!(status.success());
        let (_, status, _) = sh("exit 3", &[], dir.path());
        assert_eq!(status.code(), Some(3));
        let (_, status, _) = sh("kill -TERM $$", &[], dir.path());
        assert_eq!(
            (status.code(), status.signal()),
            (None, Some(libc::SIGTERM))
        );
    }

    #[test]
    fn leads_its_own_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let (pid, status, log) = sh("cut -d' ' -f5 /proc/$$/stat", &[], dir.path());
        assert!(status.success(), "{log}");
        assert_eq!(log.trim(), pid.to_string(), "pgid is the pid");
        // SAFETY: getpgrp has no preconditions.
        assert_ne!(pid, unsafe { libc::getpgrp() });
    }

    #[test]
    fn starts_unmasked_with_default_sigpipe() {
        // Rust ignores SIGPIPE; a stage must not inherit that.
        // SAFETY: querying a disposition into a zeroed struct.
        let sigpipe = unsafe {
            let mut current: libc::sigaction = std::mem::zeroed();
            libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut current);
            current.sa_sigaction
        };
        assert_eq!(sigpipe, libc::SIG_IGN, "positive control");
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: blocking SIGUSR1 in this thread only.
                unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, libc::SIGUSR1);
                    libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                }
                let out = File::create(&log).unwrap();
                let argv = [
                    "sed",
                    "-n",
                    "s/^Sig\\(Blk\\|Ign\\):\\t//p",
                    "/proc/self/status",
                ];
                let pid = spawn(&argv, &[] as &[(&str, &str)], dir.path(), out.as_fd()).unwrap();
                assert!(wait(pid).unwrap().success());
            });
        });
        let masks: Vec<u64> = std::fs::read_to_string(&log)
            .unwrap()
            .lines()
            .map(|l| u64::from_str_radix(l, 16).unwrap() & 0x7fff_ffff)
            .collect();
        // Signals 1 to 31; glibc's internal 32 and 33 are out of reach of sigaction. What
        // this test inherited ignored (SIGHUP under nohup, SIGINT in a background job) stays
        // ignored, as it does for any program; SIGPIPE, ignored by Rust, must not.
        let inherited = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:\t"))
            .map(|m| u64::from_str_radix(m, 16).unwrap() & 0x7fff_ffff)
            .unwrap();
        let pipe = 1 << (libc::SIGPIPE - 1);
        assert_ne!(inherited & pipe, 0, "positive control");
        assert_eq!(
            masks,
            [0, inherited & !pipe],
            "blocked, then ignored, as bit masks"
        );
    }

    #[test]
    fn program_found_in_the_jobs_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("hello"), "#!/bin/sh\necho hello from \"$0\"\n").unwrap();
        std::fs::set_permissions(bin.join("hello"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let out = File::create(dir.path().join("log")).unwrap();
        let path = bin.to_str().unwrap();
        let pid = spawn(&["hello"], &[("PATH", path)], dir.path(), out.as_fd()).unwrap();
        assert!(wait(pid).unwrap().success());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("log")).unwrap(),
            format!("hello from {path}/hello\n")
        );
    }

    /// Zombie children of this process named `comm`.
    fn zombies(comm: &str) -> Vec<libc::pid_t> {
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() }.to_string();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((head, tail)) = stat.rsplit_once(") ") else {
                continue;
            };
            let fields: Vec<&str> = tail.split(' ').collect();
            if head.ends_with(&format!("({comm}")) && fields[0] == "Z" && fields[1] == me {
                found.push(entry.file_name().to_string_lossy().parse().unwrap());
            }
        }
        found
    }

    #[test]
    fn failures_to_start_are_errors_and_leave_no_zombie() {
        let dir = tempfile::tempdir().unwrap();
        let out = File::create(dir.path().join("log")).unwrap();
        let none: &[(&str, &str)] = &[];
        // Positive control for the zombie scan: an exited child not yet reaped.
        let pid = spawn(&["true"], none, dir.path(), out.as_fd()).unwrap();
        let t0 = Instant::now();
        while !zombies("true").contains(&pid) {
            assert!(t0.elapsed() < Duration::from_secs(10), "no zombie seen");
            std::thread::sleep(Duration::from_millis(10));
        }
        wait(pid).unwrap();

        std::fs::write(dir.path().join("plain"), "").unwrap();
        // A child that cannot exec keeps the name of the thread that cloned it.
        std::thread::Builder::new()
            .name("spawn-failure".into())
            .spawn(move || {
                let missing = dir.path().join("missing");
                let cases: [(&[&OsStr], &Path, io::ErrorKind); 4] = [
                    (
                        &[OsStr::new("no-such-program")],
                        dir.path(),
                        io::ErrorKind::NotFound,
                    ),
                    (&[missing.as_os_str()], dir.path(), io::ErrorKind::NotFound),
                    (&[OsStr::new("true")], &missing, io::ErrorKind::NotFound),
                    (
                        &[OsStr::new("./plain")],
                        dir.path(),
                        io::ErrorKind::PermissionDenied,
                    ),
                ];
                for (argv, cwd, kind) in cases {
                    let e = spawn(argv, none, cwd, out.as_fd()).unwrap_err();
                    assert_eq!(e.kind(), kind, "{argv:?} in {cwd:?}: {e}");
                }
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(zombies("spawn-failure"), Vec::<libc::pid_t>::new());
    }

    #[test]
    fn killed_when_the_spawning_thread_exits() {
        let dir = tempfile::tempdir().unwrap();
        let out = File::create(dir.path().join("log")).unwrap();
        let pid = std::thread::scope(|s| {
            s.spawn(|| {
                let none: &[(&str, &str)] = &[];
                spawn(&["sleep", "30"], none, dir.path(), out.as_fd()).unwrap()
            })
            .join()
            .unwrap()
        });
        let t0 = Instant::now();
        let mut status = 0;
        // SAFETY: waitpid on our own child, writing only to `status`.
        while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
            if t0.elapsed() > Duration::from_secs(10) {
                // SAFETY: killing our own child, then reaping it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                wait(pid).unwrap();
                panic!("the child outlived the thread that spawned it");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(ExitStatus::from_raw(status).signal(), Some(libc::SIGKILL));
    }
}
