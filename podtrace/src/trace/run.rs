//! The loop most consumers of the engine run: events to the consumer as they come, a tick
//! every 100 ms, and an end on SIGINT/SIGTERM (at once: [`crate::signals`]), a duration, the pod's namespace going away, or
//! the consumer's say-so. Whatever ends it, the rest of the stream is handed over and the
//! engine finished (every probe detached) before it returns.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{Counters, Engine, Events, TraceEvent};

/// What ended a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The consumer had what it wanted (`-c COUNT`, `--stop-on` …).
    Count,
    Duration,
    Signal(&'static str),
    /// The pod's namespace went away.
    PodGone(PathBuf),
}

/// A running session: a local [`Engine`], or the per-node sessions of a run through agents
/// ([`crate::remote`]).
pub trait Session {
    /// Asks for the end: what is still in flight is handed over, then the stream ends.
    fn stop(&self);
    /// After the stream ended: everything detached; the final counters.
    fn finish(self: Box<Self>) -> Result<Counters>;
    /// What the session could not observe (nodes whose agent was lost mid-run).
    fn unobserved(&self) -> Vec<String> {
        Vec::new()
    }
}

impl Session for Engine {
    fn stop(&self) {
        Engine::stop(self)
    }

    fn finish(self: Box<Self>) -> Result<Counters> {
        Engine::finish(*self)
    }
}

/// Takes the events of a run.
pub trait Consumer {
    /// A batch of events, in the kernel's order. `Some` ends the run.
    fn on_events(&mut self, batch: Vec<TraceEvent>) -> Result<Option<Stop>>;
    /// Every 100 ms. `Some` ends the run.
    fn on_tick(&mut self) -> Result<Option<Stop>> {
        Ok(None)
    }
}

/// When a run ends on its own.
#[derive(Debug, Clone, Default)]
pub struct Until {
    pub duration: Option<Duration>,
    /// Namespaces whose disappearance ends the run (the pod's).
    pub watch: Vec<PathBuf>,
}

/// How a run ended: why (or the consumer's error), the final counters, and what could not be
/// observed.
pub struct Outcome {
    pub stop: Result<Stop>,
    pub counters: Counters,
    pub unobserved: Vec<String>,
}

const TICK: Duration = Duration::from_millis(100);

/// Runs a session's stream into `consumer` until something ends it; then drains the stream
/// into the consumer (an error already ended it: then the rest is dropped) and finishes the
/// session.
pub fn drive(
    engine: Box<dyn Session>,
    mut events: Events,
    until: &Until,
    consumer: &mut dyn Consumer,
) -> Result<Outcome> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the event loop")?;
    let stop = rt.block_on(async {
        let deadline = until.duration.map(|d| Instant::now() + d);
        let mut tick = tokio::time::interval(TICK);
        // SIGINT/SIGTERM end the loop at once, not at the next tick.
        let signalled = crate::signals::wake_fd().and_then(|fd| {
            // SAFETY: the signal pipe is never closed (`signals::wake_fd`), so the fd stays
            // valid and the same for the AsyncFd's whole life.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }
            .ok()
        });
        let stop: Result<Stop> = loop {
            tokio::select! {
                _ = async {
                    match &signalled {
                        Some(fd) => drop(fd.readable().await),
                        None => std::future::pending::<()>().await,
                    }
                } => {
                    if let Some(sig) = crate::signals::pending() {
                        break Ok(Stop::Signal(sig));
                    }
                }
                batch = events.recv() => match batch {
                    Some(batch) => match consumer.on_events(batch) {
                        Ok(Some(s)) => break Ok(s),
                        Ok(None) => {}
                        Err(e) => break Err(e),
                    },
                    None => break Err(anyhow::anyhow!("the event reader stopped")),
                },
                _ = tick.tick() => {
                    if let Some(sig) = crate::signals::pending() {
                        break Ok(Stop::Signal(sig));
                    }
                    if let Some(gone) = until.watch.iter().find(|ns| !ns.exists()) {
                        break Ok(Stop::PodGone(gone.clone()));
                    }
                    match consumer.on_tick() {
                        Ok(Some(s)) => break Ok(s),
                        Ok(None) => {}
                        Err(e) => break Err(e),
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break Ok(Stop::Duration);
                    }
                }
            }
        };
        // What the kernel still holds belongs to the run.
        engine.stop();
        let mut stop = stop;
        while let Some(batch) = events.recv().await {
            if stop.is_ok() {
                if let Err(e) = consumer.on_events(batch) {
                    stop = Err(e);
                }
            }
        }
        anyhow::Ok(stop)
    })?;
    let unobserved = engine.unobserved();
    let counters = engine.finish()?;
    Ok(Outcome {
        stop,
        counters,
        unobserved,
    })
}

pub use crate::probes::monotonic_ns;
