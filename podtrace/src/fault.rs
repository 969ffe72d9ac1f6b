//! Fault injection for the reliability tests (`tests/tests/reliability.rs`):
//! `PODTRACE_FAULT=POINT[:N]` makes the N-th pass (default: the first) through the named
//! point panic, so a test can check what a panic does to a live run: one line on stderr,
//! exit status 2, probes detached, capture files complete.
//!
//! `PODTRACE_STALL=POINT:MS` makes the first pass through the point sleep MS milliseconds
//! instead, so a test can hold up a consumer (the capture's writer) while the kernel goes on
//! producing.
//!
//! Unset, which they always are in normal use, a point costs a look at two once-initialised
//! statics. The points:
//!
//! | point | where | thread |
//! |---|---|---|
//! | `capture-packet` | `capture`, after a packet is written | main |
//! | `capture-attached` | `capture`, after every probe is attached ("probes live") | a thread of its own, its panic carried to the main thread |
//! | `netns-worker` | any namespace worker ([`crate::netns::run_in`]) | the worker |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable naming the fault.
pub const ENV: &str = "PODTRACE_FAULT";
/// The environment variable naming a stall: `POINT:MS`.
pub const STALL_ENV: &str = "PODTRACE_STALL";

struct Spec {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

fn spec() -> Option<&'static Spec> {
    static SPEC: OnceLock<Option<Spec>> = OnceLock::new();
    SPEC.get_or_init(|| parse(&std::env::var(ENV).ok()?))
        .as_ref()
}

fn parse(s: &str) -> Option<Spec> {
    let (point, nth) = match s.split_once(':') {
        Some((p, n)) => (p, n.parse().ok().filter(|n| *n > 0)?),
        None => (s, 1),
    };
    (!point.is_empty()).then(|| Spec {
        point: point.to_string(),
        nth,
        seen: AtomicU64::new(0),
    })
}

/// `PODTRACE_STALL`: the point and how many milliseconds (in `nth`).
fn stall_spec() -> Option<&'static Spec> {
    static SPEC: OnceLock<Option<Spec>> = OnceLock::new();
    SPEC.get_or_init(|| {
        let s = std::env::var(STALL_ENV).ok()?;
        s.contains(':').then(|| parse(&s)).flatten()
    })
    .as_ref()
}

/// A point where a test may make podtrace panic, or stall once.
pub fn point(name: &str) {
    if let Some(s) = spec().filter(|s| s.point == name) {
        if s.seen.fetch_add(1, Ordering::SeqCst) + 1 == s.nth {
            panic!("injected fault at {name} ({ENV})");
        }
    }
    if let Some(s) = stall_spec().filter(|s| s.point == name) {
        if s.seen.fetch_add(1, Ordering::SeqCst) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(s.nth));
        }
    }
}

/// [`point`], passed on a thread of its own: a panic there is carried back to the caller
/// with `resume_unwind`, as podtrace's own worker threads do (the CRI client's).
pub fn point_on_thread(name: &'static str) {
    if spec().is_some_and(|s| s.point == name) {
        let worker = std::thread::Builder::new()
            .name(format!("fault-{name}"))
            .spawn(move || point(name))
            .expect("spawning a thread");
        if let Err(p) = worker.join() {
            std::panic::resume_unwind(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = parse("capture-packet:5").unwrap();
        assert_eq!((s.point.as_str(), s.nth), ("capture-packet", 5));
        assert_eq!(parse("netns-worker").unwrap().nth, 1);
        assert!(parse("x:0").is_none());
        assert!(parse("x:y").is_none());
        assert!(parse("").is_none());
    }
}
