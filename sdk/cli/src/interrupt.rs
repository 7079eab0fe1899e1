//! Ctrl-C for the long-running commands (`train`, `batch`), and a closed output pipe.

use edgetune::train::CancelToken;

/// From now on, Ctrl-C (or SIGTERM) cancels `token`: a running trainer stops after its current
/// step and writes its checkpoint. A second Ctrl-C exits at once.
#[cfg(unix)]
pub fn cancel_on_interrupt(token: CancelToken) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static INTERRUPTED: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        // A second Ctrl-C does not wait for the step to end.
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) };
        }
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    std::thread::spawn(move || {
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        token.cancel();
    });
}

#[cfg(not(unix))]
pub fn cancel_on_interrupt(_token: CancelToken) {}

/// A reader that closes the output early (`edgetune gpu | head -1`) ends the process quietly,
/// as it ends other Unix tools, instead of a panic in `println!` (Rust ignores SIGPIPE, so a
/// write to a closed pipe is an error that `println!` panics on).
#[cfg(unix)]
pub fn exit_quietly_on_closed_pipe() {
    // SAFETY: restoring the default disposition of a signal is async-signal-safe and touches
    // no Rust state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
pub fn exit_quietly_on_closed_pipe() {}
