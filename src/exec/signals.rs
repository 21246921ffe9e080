//! Ctrl-C, SIGTERM and SIGHUP become a counter the scheduler polls: the first asks for an orderly
//! stop (stages are killed, nothing is recorded for them, state is saved); the handler itself
//! does nothing but count, which is all a signal handler may safely do.

use std::sync::atomic::{AtomicUsize, Ordering};

static RECEIVED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    RECEIVED.fetch_add(1, Ordering::SeqCst);
}

pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only touches an atomic.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// How many stop signals have arrived.
pub fn received() -> usize {
    RECEIVED.load(Ordering::SeqCst)
}
