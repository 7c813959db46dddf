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
//! Once *busy* rounds (each asked for the next at once) have held the GIL for
//! [`HAND_OVER_AFTER`] in a row, and a loop is at work, the next waits for a hand-over gap
//! ([`HAND_OVER_GAP`]), so that the loop thread, waiting for the GIL, gets it
//! ([`Hosted::run`] says why CPython would not give it otherwise).
//!
//! A round where none of these holds does not touch Python: the echo of native ports costs
//! what it cost without a hosted half (one `Option`, a flag or two and, while the hosted
//! half has a timer, one clock read per round).
//!
//! Deliveries: a hosted port delivers with its hub's `deliver`, which on the native core is
//! the `append` of a Python list of the hub's inbox (`Inbox.stage`).  After each hosted round
//! the pairs staged there move, as one [`Event::Hosted`], to the end of that loop's batch of
//! this round: a port is native or hosted, never both, so each port's messages keep their
//! order, and the stop notice, staged after the hosted half stopped, comes last.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};
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
    /// No round before this: the end of the hand-over gap after a busy stretch
    /// ([`Hosted::run`]).
    not_before: Option<Instant>,
    /// The time under the GIL of the busy rounds since the last gap (or the last round
    /// that was not busy).
    busy: Duration,
    /// The gap of `not_before` was kept ([`Hosted::settle_gap`]).
    gap_kept: bool,
    /// The thread handed a loop a batch since the last gap was settled.
    fed: bool,
    /// A test hook (``Core._panic_hosted_for_test``): the next this many collections of
    /// a loop's pairs panic after copying them, before cutting them from the list, as
    /// PyO3 panics where CPython cannot allocate.  Relaxed: a count, read once a list
    /// with pairs.
    panics: Arc<AtomicU32>,
}

impl Hosted {
    /// The hosted half whose rounds are `round` (``IOThread.run_round``), stopped by
    /// `stop`, polling with the epoll fd `fd`; `lists` are the loops' delivery lists.
    /// `panics` is the test hook's count (``Core._panic_hosted_for_test``).
    pub fn new(
        round: Py<PyAny>,
        stop: Py<PyAny>,
        fd: i32,
        lists: HostedLists,
        panics: Arc<AtomicU32>,
    ) -> Self {
        Hosted {
            round,
            stop,
            fd,
            lists,
            fired: false,
            // Its first round runs at once: it reports its first timeout.
            due: Some(Instant::now()),
            stopped: false,
            not_before: None,
            busy: Duration::ZERO,
            gap_kept: false,
            fed: false,
            panics,
        }
    }

    /// Watch the hosted half's poller fd.
    pub fn register(&self, registry: &Registry) -> std::io::Result<()> {
        registry.register(&mut SourceFd(&self.fd), HOSTED, Interest::READABLE)
    }

    /// Show the garbage collector the Python objects this half holds, for
    /// `Core.__traverse__` (while the core is not started, it holds this half):
    /// ``IOThread.run_round`` and ``stop_hosted``, bound methods of the ``NativeIOThread``
    /// that holds the ``Core``.  Only visits (see `Core.__traverse__`): no lock, no Python
    /// call, no panic.
    pub fn traverse(&self, visit: &pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.round)?;
        visit.call(&self.stop)
    }

    /// Its poller fd fired.
    pub fn fired(&mut self) {
        self.fired = true;
    }

    /// The poll timeout: `timeout` (the native thread's), or less if the hosted half wants
    /// its round sooner (never before its hand-over gap ends).
    pub fn timeout(&self, timeout: Option<Duration>) -> Option<Duration> {
        if self.stopped {
            return timeout;
        }
        // Fired (during a gap, or it would have had its round): due when the gap ends.
        let due = if self.fired {
            Some(Instant::now())
        } else {
            self.due
        };
        match due.map(|due| {
            self.not_before
                .map_or(due, |not_before| not_before.max(due))
        }) {
            Some(due) => {
                let wait = due.saturating_duration_since(Instant::now());
                Some(timeout.map_or(wait, |t| t.min(wait)))
            }
            None => timeout,
        }
    }

    /// The thread handed a loop a batch (its input, what it holds for it to drop...).
    pub fn note_handed(&mut self) {
        self.fed = true;
    }

    /// Settle a hand-over gap that has just begun (after the round's batches went to the
    /// loops): kept if a loop was handed a batch since the last gap (that loop is at work,
    /// or waits for the GIL to be) or has input it has not taken (`loops_have_input`),
    /// else dropped at no cost to the hosted half.  A gap once kept lasts its whole
    /// [`HAND_OVER_GAP`]: what the loop does with its input (a send...) needs this thread
    /// free to carry it, not waiting for the GIL.
    pub fn settle_gap(&mut self, loops_have_input: impl FnOnce() -> bool) {
        if self.not_before.is_some() && !self.gap_kept {
            if std::mem::take(&mut self.fed) || loops_have_input() {
                self.gap_kept = true;
                self.busy = Duration::ZERO;
            } else {
                self.not_before = None;
            }
        }
    }

    /// Whether a round of the hosted half is due now (its fd fired or its timer is due,
    /// and its hand-over gap, if any, is over).
    pub fn wants_round(&self) -> bool {
        if self.stopped || !(self.fired || self.due.is_some()) {
            return false;
        }
        let now = Instant::now();
        !self.not_before.is_some_and(|not_before| not_before > now)
            && (self.fired || self.due.is_some_and(|due| due <= now))
    }

    /// Run one round (under the GIL) and stage what it delivered, by loop, in `staged`.
    /// An exception out of the round (a bug of the hosted half itself: each port's errors
    /// are contained in it) stops the hosted half, closing its ports; `failed` counts it.
    ///
    /// A round that left work (it wants the next one at once) is *busy*; once busy rounds
    /// in a row have held the GIL for [`HAND_OVER_AFTER`], the next round waits for the
    /// hand-over gap, [`HAND_OVER_GAP`], if a loop is at work ([`Hosted::settle_gap`]: a
    /// busy hosted half next to idle loops loses nothing).  A request and its answer (a
    /// round or two of some microseconds) never wait for it.
    ///
    /// Without the gap, a busy hosted half released the GIL and took it back within
    /// microseconds, every round, and a loop thread waiting for the GIL (woken by each
    /// release, too late to take it) was kept out: CPython 3.11 forces a switch only once
    /// a waiter's `switch_interval` (5 ms) passes with no release, and each release
    /// restarts that wait.  The native ports keep moving during the gap (this thread
    /// polls, reads and writes without the GIL).
    pub fn run(&mut self, staged: &mut [Vec<Event>], failed: &mut u64) {
        self.fired = false;
        let mut held = Duration::ZERO;
        // `try_attach`: not once the interpreter is finalizing (a thread that takes the GIL
        // then is ended mid-frame, or aborts the process).  `_native_core` stops the thread
        // at exit before that; should it still come here, the hosted half is over.
        let attached = Python::try_attach(|py| {
            let start = Instant::now();
            // The round's boundary: a panic in it (PyO3's, where CPython cannot allocate)
            // is contained here, as the hosted half contains each port's errors, instead
            // of ending this thread and every port with it.
            let round = catch_unwind(AssertUnwindSafe(|| {
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
            }));
            if let Err(panic) = round {
                self.contained(py, panic, failed);
            }
            held = start.elapsed();
        });
        if attached.is_none() {
            self.stopped = true;
            self.due = None;
        }
        let now = Instant::now();
        self.not_before = None;
        self.gap_kept = false;
        if self.due.is_some_and(|due| due <= now) {
            self.busy += held;
            if self.busy >= HAND_OVER_AFTER {
                self.not_before = Some(now + HAND_OVER_GAP);
            }
        } else {
            // Not busy: the next busy stretch starts afresh (and a batch handed before it
            // says nothing of the loops then).
            self.busy = Duration::ZERO;
            self.fed = false;
        }
    }

    /// Stop the hosted half (its last round, then its ports closed), stage what that
    /// delivered; idempotent.
    pub fn stop(&mut self, staged: &mut [Vec<Event>], failed: &mut u64) {
        if self.stopped {
            return;
        }
        let attached = Python::try_attach(|py| {
            let stopped = catch_unwind(AssertUnwindSafe(|| {
                self.stop_under_gil(py, failed);
                self.collect(py, staged);
            }));
            if let Err(panic) = stopped {
                self.contained(py, panic, failed);
                // What a collection left (its pairs stay in their list until cut): once
                // more; a second panic leaves them, the thread ending anyway.
                let _ = catch_unwind(AssertUnwindSafe(|| self.collect(py, staged)));
            }
        });
        // The interpreter is finalizing: its objects are not ours to touch any more.
        self.stopped |= attached.is_none();
    }

    /// A panic caught at a round's boundary: counted in `failed` (`internal_errors`) and
    /// reported; the hosted half goes on, and its next round comes at once, to move what
    /// the interrupted collection left in the loops' lists (a list's pairs are cut only
    /// once copied out, so none is lost or moved twice).
    fn contained(
        &mut self,
        py: Python<'_>,
        panic: Box<dyn std::any::Any + Send>,
        failed: &mut u64,
    ) {
        *failed += 1;
        if !self.stopped {
            self.due = Some(Instant::now());
        }
        let text = crate::core::panic_message(panic.as_ref());
        let _ = catch_unwind(AssertUnwindSafe(|| {
            let error = pyo3::exceptions::PyRuntimeError::new_err(format!(
                "a panic in a round of the hosted half: {text}"
            ));
            error.write_unraisable(py, Some(self.round.bind(py)));
        }));
    }

    /// The test hook's fault (``Core._panic_hosted_for_test``): a panic while it lasts.
    fn panic_fault(&self) {
        let left = self.panics.load(Ordering::Relaxed);
        if left > 0 {
            self.panics.store(left - 1, Ordering::Relaxed);
            panic!("Python API call failed (a test's)");
        }
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
        // Whatever became of the lock: a panic while a collection held it (contained at
        // the round's boundary) leaves the lists whole (one push each, a move), so they
        // are taken as they are; before, every later collection returned here, and no
        // hosted port's message reached a loop again.
        let lists = self
            .lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (index, list) in lists.iter().enumerate() {
            let list = list.bind(py);
            let count = list.len();
            if count == 0 {
                continue;
            }
            let Some(batch) = staged.get_mut(index) else {
                continue;
            };
            // Copied out, then cut: should either fail (a `MemoryError`), nothing moved and
            // the pairs wait in the list for the next round.  (`PyList::get_slice` panics
            // when its copy cannot be made, and a panic ends this thread: every port.)
            let Ok(pairs) = list.as_sequence().get_slice(0, count) else {
                continue;
            };
            let Ok(pairs) = pairs.cast_into::<PyList>() else {
                continue;
            };
            self.panic_fault();
            if list.del_slice(0, count).is_ok() {
                batch.push(Event::Hosted(pairs.unbind()));
            }
        }
    }
}

/// How long busy rounds in a row may hold the GIL before a hand-over gap.  A loop at work
/// that waits for the GIL gets it after this (and the round then running) at most.
pub const HAND_OVER_AFTER: Duration = Duration::from_millis(2);

/// The hand-over gap: the time the next busy round waits when a loop is at work, so a
/// busy hosted half then holds the GIL at most two thirds of the time.  Long enough for a
/// loop thread that the last release of the GIL woke (a futex wake-up: tens of
/// microseconds on an idle CPU) to take it; and the thread's poll counts in whole
/// milliseconds (mio rounds its timeout up), so a shorter gap would last this long anyway
/// whenever nothing else wakes the thread.
pub const HAND_OVER_GAP: Duration = Duration::from_millis(1);

/// This thread's OS id, as Python's `threading.get_native_id()` gives it (Linux: the
/// `gettid` read from `/proc/thread-self`, a link to `PID/task/TID`); 0 where unknown.
pub fn thread_id() -> u64 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|path| path.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}
