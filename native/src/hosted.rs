//! The hosted half: Python handlers run on the native I/O thread, under the GIL.
//!
//! What the native core does not carry itself - UDP, Unix streams, programs, ZeroMQ
//! (through pyzmq), TUN/TAP, TLS, the msgpack and resp packet modes, the daemon's control
//! endpoint, any function `submit`ted to the I/O thread - is served by the Python I/O half
//! (`ioserver._iothread.IOThread`) in its *hosted* mode: it has no thread of its own, and
//! this thread runs its rounds (`IOThread.run_round`).  So there is still exactly one I/O
//! thread.
//!
//! When a round of the hosted half runs (and only then is the GIL taken):
//!
//! * its poller's fd fired: the hosted half's poller is an epoll fd, itself pollable, and
//!   registered here (mio, edge-triggered).  It becomes readable when one of the hosted
//!   half's descriptors is ready, its command queue's wake-up fd included, so a command
//!   queued for a hosted port wakes this thread through it;
//! * the hosted half asked for it: `run_round` returns the seconds until it wants the next
//!   round (0 while it found work: its level-triggered descriptors that are still ready do
//!   not fire the edge-triggered fd again, so it runs again until a round finds nothing),
//!   or None (not until its fd fires);
//! * the thread stops: the hosted half is stopped first (one last round, then its ports
//!   closed, each owner getting its `Closed`), then the native ports, then the stop notice.
//!
//! A round where none of these holds does not touch Python: the echo of native ports costs
//! what it cost without a hosted half (one `Option` and, while the hosted half has a timer,
//! one clock read per round).
//!
//! Deliveries: a hosted port delivers with its hub's `deliver`, which on the native core is
//! the `append` of a Python list of the hub's inbox (`Inbox.stage`).  After each hosted round
//! the pairs staged there move, as one [`Event::Hosted`], to the end of that loop's batch of
//! this round: a port is native or hosted, never both, so each port's messages keep their
//! order, and the stop notice, staged after the hosted half stopped, comes last.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::core::Event;

/// The token of the hosted half's poller fd.
pub const HOSTED: Token = Token(usize::MAX - 1);

/// Each loop's list of hosted deliveries, by inbox number (`Inbox.stage` appends to it).
pub type HostedLists = Arc<Mutex<Vec<Py<PyList>>>>;

/// The hosted half, as the native thread drives it.
pub struct Hosted {
    /// `IOThread.run_round`.
    round: Py<PyAny>,
    /// `IOThread.stop_hosted`.
    stop: Py<PyAny>,
    /// The hosted half's poller fd.
    fd: std::os::fd::RawFd,
    lists: HostedLists,
    /// Its fd fired since its last round.
    fired: bool,
    /// When it wants its next round (None: when its fd fires).
    due: Option<Instant>,
    /// Stopped (or failed): no more rounds.
    stopped: bool,
}

impl Hosted {
    /// The hosted half whose rounds are `round` (``IOThread.run_round``), stopped by
    /// `stop`, polling with the epoll fd `fd`; `lists` are the loops' delivery lists.
    pub fn new(round: Py<PyAny>, stop: Py<PyAny>, fd: i32, lists: HostedLists) -> Self {
        Hosted {
            round,
            stop,
            fd,
            lists,
            fired: false,
            // Its first round runs at once: it reports its first timeout.
            due: Some(Instant::now()),
            stopped: false,
        }
    }

    /// Watch the hosted half's poller fd.
    pub fn register(&self, registry: &Registry) -> std::io::Result<()> {
        registry.register(&mut SourceFd(&self.fd), HOSTED, Interest::READABLE)
    }

    /// Its poller fd fired.
    pub fn fired(&mut self) {
        self.fired = true;
    }

    /// The poll timeout: `timeout` (the native thread's), or less if the hosted half wants
    /// its round sooner.
    pub fn timeout(&self, timeout: Option<Duration>) -> Option<Duration> {
        match self.due {
            Some(due) if !self.stopped => {
                let wait = due.saturating_duration_since(Instant::now());
                Some(timeout.map_or(wait, |t| t.min(wait)))
            }
            _ => timeout,
        }
    }

    /// Whether a round of the hosted half is due now.
    pub fn wants_round(&self) -> bool {
        !self.stopped && (self.fired || self.due.is_some_and(|due| due <= Instant::now()))
    }

    /// Run one round (under the GIL) and stage what it delivered, by loop, in `staged`.
    /// An exception out of the round (a bug of the hosted half itself: each port's errors
    /// are contained in it) stops the hosted half, closing its ports; `failed` counts it.
    pub fn run(&mut self, staged: &mut [Vec<Event>], failed: &mut u64) {
        self.fired = false;
        // `try_attach`: not once the interpreter is finalizing (a thread that takes the GIL
        // then is ended mid-frame, or aborts the process).  `_native_core` stops the thread
        // at exit before that; should it still come here, the hosted half is over.
        let attached = Python::try_attach(|py| {
            match self.round.call0(py) {
                Ok(next) => {
                    self.due = match next.extract::<Option<f64>>(py) {
                        Ok(Some(seconds)) if seconds.is_finite() && seconds >= 0.0 => {
                            Some(Instant::now() + Duration::from_secs_f64(seconds.min(3600.0)))
                        }
                        _ => None,
                    };
                }
                Err(error) => {
                    error.write_unraisable(py, Some(self.round.bind(py)));
                    *failed += 1;
                    self.stop_under_gil(py, failed);
                }
            }
            self.collect(py, staged);
        });
        if attached.is_none() {
            self.stopped = true;
            self.due = None;
        }
    }

    /// Stop the hosted half (its last round, then its ports closed), stage what that
    /// delivered; idempotent.
    pub fn stop(&mut self, staged: &mut [Vec<Event>], failed: &mut u64) {
        if self.stopped {
            return;
        }
        let attached = Python::try_attach(|py| {
            self.stop_under_gil(py, failed);
            self.collect(py, staged);
        });
        // The interpreter is finalizing: its objects are not ours to touch any more.
        self.stopped |= attached.is_none();
    }

    fn stop_under_gil(&mut self, py: Python<'_>, failed: &mut u64) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.due = None;
        if let Err(error) = self.stop.call0(py) {
            error.write_unraisable(py, Some(self.stop.bind(py)));
            *failed += 1;
        }
    }

    /// Move each loop's hosted deliveries to the end of its staged batch.  A list whose
    /// loop the thread does not know yet (its inbox command not run) keeps its pairs for
    /// the next round.
    fn collect(&self, py: Python<'_>, staged: &mut [Vec<Event>]) {
        let Ok(lists) = self.lists.lock() else {
            return;
        };
        for (index, list) in lists.iter().enumerate() {
            let list = list.bind(py);
            let count = list.len();
            if count == 0 {
                continue;
            }
            let Some(batch) = staged.get_mut(index) else {
                continue;
            };
            let pairs = list.get_slice(0, count);
            if list.del_slice(0, count).is_ok() {
                batch.push(Event::Hosted(pairs.unbind()));
            }
        }
    }
}

/// This thread's OS id, as Python's `threading.get_native_id()` gives it (Linux: the
/// `gettid` read from `/proc/thread-self`, a link to `PID/task/TID`); 0 where unknown.
pub fn thread_id() -> u64 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|path| path.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}
