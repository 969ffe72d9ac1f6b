//! What a panic looks like to the user: one line on stderr saying it is an internal error of
//! podtrace and how to report it (Rust's own report, with the backtrace, only with
//! `RUST_BACKTRACE` set), then a clean exit with status 2.
//!
//! "Clean" because `main` catches the unwinding panic ([`std::panic::catch_unwind`]) instead
//! of letting the runtime abort the process with status 101: on its way up the panic drops
//! every probe (TCX links and clsact filters are detached by their owners' `Drop`) and every
//! capture writer (whose `Drop` completes the open file, so the files written so far stay
//! valid). A panic on another thread reaches the user the same way: either its thread's
//! owner turns it into an error (namespace workers) or carries it over with
//! `resume_unwind` (the CRI client's thread); the line is printed once, where it happened,
//! and the error that follows is not printed again.
//!
//! A closed stdout (`podtrace follow --json | head -1`) makes Rust's `println!` panic; that
//! is not a bug, and says so in its one line.

use std::any::Any;
use std::panic;
use std::sync::atomic::{AtomicBool, Ordering};

static PANICKED: AtomicBool = AtomicBool::new(false);

/// Installs the hook (once, first thing in `main`).
pub fn install_hook() {
    let rust_report = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        PANICKED.store(true, Ordering::SeqCst);
        let msg = payload_text(info.payload());
        let thread = std::thread::current();
        let location = info.location().map(|l| (l.file(), l.line()));
        eprintln!("{}", line(&msg, location, thread.name()));
        if backtrace_wanted() {
            rust_report(info);
        }
    }));
}

/// Whether a panic happened (and was reported) anywhere in the process.
pub fn panicked() -> bool {
    PANICKED.load(Ordering::SeqCst)
}

fn backtrace_wanted() -> bool {
    std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0")
}

fn payload_text(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

/// The line the user sees.
pub fn line(msg: &str, location: Option<(&str, u32)>, thread: Option<&str>) -> String {
    // One line whatever the message holds.
    let msg: String = msg
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if msg.starts_with("failed printing to stdout") {
        return "podtrace: stdout was closed; stopping".to_string();
    }
    let at = location
        .map(|(file, line)| format!(" at {file}:{line}"))
        .unwrap_or_default();
    let thread = match thread {
        Some("main") => String::new(),
        Some(name) => format!(" (thread {name})"),
        None => " (a worker thread)".to_string(),
    };
    format!(
        "podtrace: internal error (a bug in podtrace): {msg}{at}{thread}; please report it \
         with the command you ran and what the same command prints with RUST_BACKTRACE=1"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_with_where_and_how_to_report() {
        let l = line(
            "index out of bounds:\nthe len is 3",
            Some(("podtrace/src/x.rs", 7)),
            Some("main"),
        );
        assert!(!l.contains('\n'), "{l}");
        assert!(
            l.starts_with("podtrace: internal error (a bug in podtrace): index out of bounds: the len is 3 at podtrace/src/x.rs:7; "),
            "{l}"
        );
        assert!(l.contains("RUST_BACKTRACE=1"), "{l}");
        let l = line("boom", None, Some("netns-worker"));
        assert!(
            l.contains("boom (thread netns-worker); please report"),
            "{l}"
        );
    }

    #[test]
    fn a_closed_stdout_is_not_a_bug() {
        assert_eq!(
            line(
                "failed printing to stdout: Broken pipe (os error 32)",
                Some(("library/std/src/io/stdio.rs", 1)),
                None
            ),
            "podtrace: stdout was closed; stopping"
        );
    }
}
