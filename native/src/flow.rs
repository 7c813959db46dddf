//! Receive flow control and the memory budget: one port's window, its active mode, the
//! pause handshake with the loop half, and the budget of all ports together.
//!
//! The Rust twin of `ioserver/_flow.py` and of the budget in `ioserver/_iothread.py`
//! (`_memory_check`, `_budget_blocks`, `_packet_read_size`, `cmd_want`...), as pure state
//! machines: no I/O, no Python, no lock.  The I/O thread owns every [`ReceiveFlow`] and
//! the [`Budget`]; each port's [`Window`] is shared (`Arc`) with the port's loop half,
//! which calls its loop-side methods ([`Window::took`], [`Window::set_waiting`]) under
//! the GIL, while the I/O thread reads it without the GIL.
//!
//! # Theory of operation
//!
//! Input flows from a socket, read by the I/O thread, to the task that owns the port, in
//! an event loop.  Between the two it is *buffered*: delivered to the loop and not yet
//! taken by the owner.  Three things bound what is buffered, each on its own; a stream's
//! socket is read only while all three allow it ([`ReceiveFlow::may_read`]).
//!
//! ## The active credit
//!
//! Erlang's `{active, ...}`: -1 reads freely (`true`), 0 not at all (`false`), N > 0 lets
//! N more **packets** through (`once` is 1), by [`apply_active_mode`], the rule both halves
//! apply so that they agree without asking each other.  A framed read can complete several
//! packets; those beyond the credit ([`ReceiveFlow::admit`]) are *held* by the I/O half
//! (their payloads by the I/O thread, their count and charge here: [`ReceiveFlow::hold`],
//! charged to the budget as framing bytes) and the socket is not read while any is held.
//! A grant - [`ReceiveFlow::set_active`] or a passive `receive`
//! ([`ReceiveFlow::read_once`]) - delivers held packets first, as far as its credit goes
//! ([`ReceiveFlow::grant_held`], [`ReceiveFlow::unhold`]), and only then reads again; so
//! an EOF or error read later comes after them, as in Erlang.
//!
//! ## The window: the port's watermarks
//!
//! The I/O half counts what it delivered (`delivered_bytes`, `delivered_messages`); the
//! loop half counts in the window what its owner took (`consumed_bytes`,
//! `consumed_messages`).  Each side writes only its own counters; each counter only grows.
//! The difference is what is buffered.
//!
//! A message is charged its size in bytes: a payload of bytes its length, a decoded
//! object its share of the wire bytes it was decoded from, plus [`PACKET_OVERHEAD`] for a
//! framed port of this process, and for such a port what its decoded object holds beyond
//! that (a msgpack object by kind of item, `framing::msgpack::CHARGE_INT`..., `framing::RESP_ARGUMENT_CHARGE` a
//! RESP argument; see `framing::Framer::charges`).  **The charge travels
//! with the message**: the I/O thread computes it and hands it to the loop half with the
//! message, which passes it back in [`Window::took`] when the owner takes it - for a port
//! owned by a mailbox, when its entry leaves the mailbox (a receive, selective or not, a
//! select, the mailbox's close): until then it stays charged, and the mailbox keeps the
//! charge beside the entry (`ports._mailbox`), as a selective receive takes entries out
//! of order.  (The Python
//! core keeps a deque of sizes in the window that both threads touch; with the charge in
//! the message, nothing but counters is shared.)
//!
//! Delivered and not taken above a high watermark (`high_msgq_watermark` bytes, or
//! `high_msgq_messages`) stops reading this socket alone - TCP then pushes back on this
//! peer - until the owner has taken it down to the low watermarks (`low_msgq_watermark`,
//! half the messages).  So that the hot path compares one counter with one number, the
//! I/O half looks at the window only when its counters pass a *check point*
//! ([`ReceiveFlow::deliver`]: what was taken at the last look, plus the high watermark).
//!
//! ## The pause handshake
//!
//! The two halves run in two threads and never lock; the pause generation is the fence.
//!
//! 1. The I/O half pauses ([`ReceiveFlow::pause`]): it sets `msgq_paused`, **then** bumps
//!    `pause_generation`, **then** re-reads the window's `consumed_*`
//!    ([`ReceiveFlow::recheck`]); if the owner took enough meanwhile, it resumes at once.
//! 2. The loop half, each time its owner takes a message ([`Window::took`]), adds to
//!    `consumed_*` **then** compares `pause_generation` with the last generation it asked
//!    to resume; when they differ and the counters are at or below the low watermarks, it
//!    asks the I/O half to resume *that* generation (`cmd_resume`).
//! 3. The I/O half resumes only if the generation asked is still the current one and the
//!    counters still say drained ([`ReceiveFlow::may_resume`]).  If they do not (packets
//!    held past the credit were delivered by a grant after the owner looked), it **pauses
//!    again under a new generation** and re-reads, as in step 1, so that the owner's next
//!    take asks again.  A late resume of an older pause is ignored.
//!
//! Whichever of 1 and 2 runs second sees the other's write: either the I/O half's re-read
//! sees the owner's take, or the owner's check sees the new generation.  This is a
//! store-then-load on each side of two variables (Dekker's pattern), so all four accesses
//! are `SeqCst`: release/acquire does not order a store before a later load of another
//! variable.  No pause is left without a resume.
//!
//! (Step 3's new generation was found missing in `_flow.py` while porting it, whose
//! `may_resume` only declined: the owner, having asked for that generation already, never
//! asked again, and the port stayed paused however much its owner took.  Both rules have
//! it now; see the test `a_declined_resume_pauses_again_so_the_owner_asks_again`.)
//!
//! ## The memory budget
//!
//! `memory_limit` (`L`) bounds the input of all ports together, charged from the moment
//! the I/O thread reads it until an owner takes it, with framing buffers and queued output
//! ([`Budget::in_use`]).  Once a round, [`Budget::begin_round`] computes the headroom
//! `L - in_use` (and lets paused ports go); [`Budget::after_poll`] takes it again after
//! the round's poll, which may have slept while owners queued output.  It is split in
//! two.  An ordinary read needs a whole read
//! ([`READ_SIZE`]) of headroom **plus the reserve** (`L / 4`): so ordinary input stops at
//! three quarters of the budget and the ports it paused resume together at one half.  The
//! reserve is for the ports whose owner **waits** - a task parked in `receive`/`select`
//! on the port, having taken everything delivered to it ([`ReceiveFlow::owner_waits`]) -
//! which may read while a whole read fits under `L`.  Such a read is taken at once by the
//! waiting task, so it frees itself (unless a selective receive on a mailbox leaves it
//! unmatched: it stays charged there, and its port no longer counts as waiting until it
//! is taken); a port is never starved by the others' input filling
//! the budget, whatever order an actor reads its ports in.  When a waiting port finds no
//! room even in the reserve, it is a *reserve waiter* and is let in first as soon as a
//! read fits (before the others resume at one half).  Owners free memory without telling
//! the thread, so while any port is paused by the budget the thread runs a round at least
//! every [`BUDGET_RECHECK`] ([`Budget::has_paused`]): that is what lets a reserve waiter
//! in.  An owner that starts waiting on a port already paused by the budget tells the
//! thread (`cmd_want`, [`Budget::want`]): the port writes its waiter before it reads
//! `global_paused` ([`Window::set_waiting`]), the thread writes `global_paused` before it
//! reads the waiter (`Budget::admit_read`), so one of them sees the other (Dekker's
//! pattern again: `SeqCst`); the one that sees the other lets the port read (the thread at
//! once, or as a reserve waiter at a round; the owner by `cmd_want`).  (A loop half marks
//! `waiting` as a task parks on the port and clears it as the port is handed its next
//! message, [`Window::task_woken`]: the native core's loop half cannot be asked, as
//! `_flow.py`'s `task_waits` is.  A task that stops waiting without a message - a
//! timeout, a `select` another port answered - leaves the mark until that message: the
//! port may then read once into the reserve with nobody to take it at once; the bound
//! holds, the read is charged like any.)
//!
//! A port a mailbox owns waits through its owner: a task parked on the mailbox
//! (`receive`, selective or not, or `select` over it) waits for every port the mailbox
//! owns.  The mailbox does not mark each port - an actor owning 10,000 ports would pay
//! 10,000 marks a park - but its [`OwnerCell`], one per mailbox, which the budget knows
//! for each owned port (`cmd_owner`, [`Budget::set_owner`]) and in which it counts the
//! owner's ports it paused.  The same pair as above, on the cell: the park stores the
//! cell's `waiting`, then loads its count ([`OwnerCell::park`]; if any port is paused it
//! sends `cmd_want_owner`, [`Budget::paused_of`], and those ports - only those - try the
//! reserve); the thread adds a pause to the count, then loads `waiting`.  So a park costs
//! O(1) while nothing of the mailbox is paused (the common case) and O(its paused ports)
//! on the thread when some are; and a port handed, paused, to a mailbox a task already
//! waits on is let go by the `cmd_owner` that hands it.  The mailbox clears the mark as
//! its last waiter leaves (woken, cancelled, or a `select` answered elsewhere).
//!
//! The bound stays firm: no read is made that could take the memory charged for input
//! past `L`; the reserve is inside it, not on top.  A port of packets charges each one
//! [`PACKET_OVERHEAD`] more than its bytes, so when the budget is short it reads only what
//! it could pay for were every byte a packet ([`ReadGrant`]).  Within a round the headroom
//! goes down by **what each read was charged** (its packets, the bytes its framer or its
//! held packets took); the Python core takes off a framed read's bytes only (unless the
//! read was shortened), so two framed ports of one-byte packets read in one round near the
//! budget could pass it by up to a read's overhead.  (A message larger than the reserve
//! cannot be completed by reserve reads alone: it waits for the budget to free, or fails
//! if what is unfinished stalls the budget (below, "Progress"); one
//! charged more than `memory_limit` less a read, which no read could ever complete, fails
//! its port with `EMSGSIZE`: [`Budget::message_cap`].)
//!
//! ## Progress: a stall on unfinished packets
//!
//! What a framer holds of a packet not yet whole is charged as it arrives, and freed only
//! by the reads that complete the packet (or by the port's close).  Peers that each send
//! most of a large packet - a `packet=4` one with a large `packet_size`, a msgpack object,
//! each far under one message's cap - and stop can together hold the budget with such
//! bytes; then no port reads again: not theirs (their completion needs budget), and not
//! one whose owner waits (no room even in the reserve), and nothing an owner does frees
//! them.  So the I/O half breaks the stall itself.  The budget keeps the ports holding
//! unfinished bytes and how many (`Budget::unfinished`, updated by
//! [`Budget::framer_holds`] only when a framer's count changes: a hash update per read
//! that starts, grows or ends a packet, nothing for a read of whole packets).  At each
//! round ([`Budget::stall_victim`], after [`Budget::begin_round`]), the budget is
//! **stalled on unfinished packets** when
//!
//! 1. a port whose owner waits cannot read, even into the reserve: a reserve waiter is
//!    paused and less than a read of headroom is left, and
//! 2. the unfinished bytes by themselves leave no room for a read: `L - unfinished <
//!    READ_SIZE`.  Were every other charge freed - input delivered and not taken, held
//!    packets, queued output, what another budget of the server charges - still no port
//!    could read, so no owner and no peer can end it.
//!
//! Then the port holding the **most unfinished bytes** (the lowest token among equals)
//! fails as a port over the message cap does: its owner gets `Error("ENOBUFS",
//! "memory_limit=L spent on unfinished packets: ...")` and `Closed("ENOBUFS")`
//! ([`Stalled`]; the I/O thread's `fail_for_progress`), and its close releases its bytes.
//! The round runs [`Budget::begin_round`] again and repeats while both still hold; once
//! a read fits, the reserve waiters read first.  Counted in [`Budget::failed_ports`]
//! (`statistics().budget_failed_ports`).  Condition 1 costs O(1) a round (the count of
//! live reserve waiters, the headroom); only when it holds are the unfinished bytes
//! compared, and only when both hold is the victim chosen: O(ports holding unfinished
//! bytes), never a scan of every port.
//!
//! Condition 2 is what keeps slow owners and slow peers backpressure, not a deadlock: a
//! budget full of delivered input not yet taken, held packets or queued output, with some
//! unfinished bytes besides, fails no port - it waits, as before, for owners to take and
//! peers to read.  Its trade-off, that of Linux's OOM killer picking the largest process:
//! the victim is the largest *unfinished* packet, which can be a legitimate large upload
//! (two uploads that interleave and together need more than the budget: one fails, the
//! other then completes; without the rule neither ever would).  A service expecting large
//! packets sets `memory_limit` well above what its concurrent uploads hold, or bounds
//! them with `packet_size`/`port_buffer_limit`.  (Each budget applies the rule to its own
//! ports: on the native core, unfinished bytes of its hosted Python half's ports and a
//! waiter of its thread's - or the reverse - are not counted together.)
//!
//! Ports paused by the budget are let go in the order they paused (at one half), reserve
//! waiters in the order they came (first).  The bookkeeping costs O(1) amortised per
//! pause, release, `cmd_want` and close however many ports are paused (a spent budget can
//! pause tens of thousands in one round, and the thread serves nobody meanwhile): the
//! paused ports are a map by token, the two orders lists whose entries a port let go
//! alone leaves behind, to be dropped by the next full release or a compaction (`Pauses`).
//!
//! ## Driving it from the I/O thread
//!
//! ```
//! use std::sync::Arc;
//! use _native::flow::*;
//! use _native::framing::{Framer, Mode, Packets};
//!
//! // Once: the budget, and each event loop's counters.
//! let counters = Arc::new(LoopCounters::new());
//! let mut budget = Budget::new(Some(1 << 20), Some(1 << 16), READ_SIZE);
//! budget.add_loop(Arc::clone(&counters));
//! // A port: its window (shared with its loop half), its flow and its framer.
//! let marks = Watermarks::new(256 << 10, 128 << 10, 4096);
//! let window = Arc::new(Window::new(marks, counters));
//! let active_once = (1, false);
//! let overhead = PACKET_OVERHEAD as u64; // a framed port of this process
//! let mut flow = ReceiveFlow::new(Arc::clone(&window), 7, active_once, overhead);
//! let mut framer = Framer::new(Mode::Line(b'\n'), 1 << 16).unwrap();
//!
//! // Each round, before reading: ports the budget let go read again.
//! let mut resumed = Vec::new();
//! budget.begin_round(&mut resumed); // re-register their interest
//! // The port is readable, and flow.may_read(close_pending) says it may be read.
//! let grant = budget.admit_read(&mut flow).expect("the budget did not pause it");
//! let input = b"one\ntwo\n"; // a recv of at most grant.max bytes
//! let (mut packets, mut charges) = (Packets::new(), Vec::new());
//! let read = framed_read(&mut budget, &mut flow, &mut framer, input, &mut packets, &mut charges)
//!     .expect("else: Error and Closed to the owner, close the port");
//! // Deliver packets[..read.deliver], each with its charge; hold the rest.
//! assert_eq!((read.count, read.deliver), (2, 1));
//! assert!(read.delivered.turned_passive); // stop reading (Passive if send_passive)
//! // (read.delivered.over_high: flow.pause(), re-register, then flow.recheck().)
//!
//! // The loop half, when the owner takes the message (a Some is a cmd_resume to send):
//! assert_eq!(window.took(charges[0]), None);
//! // cmd_read_once: a grant delivers held packets first.
//! assert!(flow.read_once());
//! assert_eq!(flow.grant_held(), 1);
//! flow.unhold(&mut budget, &charges[1..2]);
//! flow.deliver(&mut budget, &charges[1..2]);
//! assert!(!flow.may_read(false)); // passive again
//! ```
//!
//! ## Who writes what
//!
//! | field                                    | written by   | read by                            |
//! |------------------------------------------|--------------|------------------------------------|
//! | `Window::consumed_*`                     | loop half    | I/O half (check, pause, resume)    |
//! | `Window::waiting`                        | loop half    | I/O half (the budget's reserve)    |
//! | `Window`'s watermarks and loop (once)    | loop half, before the handoff | both      |
//! | `Window::resume_generation`              | loop half    | loop half only                     |
//! | `Window::delivered_*`                    | I/O half     | loop half (resume check, statistics) |
//! | `Window::pause_generation`               | I/O half     | loop half (step 2)                 |
//! | `Window::global_paused`                  | I/O half     | loop half (`cmd_want`)             |
//! | `OwnerCell::waiting`                     | loop half    | I/O half (the budget's reserve)    |
//! | `OwnerCell::paused`                      | I/O half     | loop half (`cmd_want_owner`)       |
//! | `Window::queued_bytes`, `send_blocked`   | loop half    | I/O half (WRITABLE, in `core.rs`)  |
//! | `LoopCounters::queued_bytes`, `consumed_bytes` | loop half | I/O half (the budget)           |
//! | `Charges` (but `pinned`)                 | I/O half     | I/O half, `statistics()`           |
//! | `Charges::pinned`                        | both (I/O adds, loop takes off) | both            |
//! | `ReceiveFlow`, `Budget`                  | I/O half     | I/O half only                      |

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

pub use crate::framing::PACKET_OVERHEAD;
use crate::framing::{FrameError, Framer, Packets};

mod python;
#[cfg(test)]
mod tests;

pub use python::PyFlowModel;

/// A watermark or check point that is never reached (`_flow.NO_LIMIT`).
pub const NO_LIMIT: u64 = 1 << 62;

/// Bytes of one read (`_iothread.READ_SIZE`): the largest raw message, and the unit of the
/// budget's floors.
pub const READ_SIZE: usize = 65536;

/// The headroom when there is no `memory_limit` (`_iothread.UNLIMITED`).
pub const UNLIMITED: i64 = 1 << 62;

/// While ports are paused by the budget, the I/O thread runs [`Budget::begin_round`] at
/// least this often, even with nothing to do (`_iothread.BUDGET_RECHECK`): owners release
/// memory without telling it, and a reserve waiter is let in only by a round.
pub const BUDGET_RECHECK: std::time::Duration = std::time::Duration::from_millis(5);

/// The port's identity for the [`Budget`] (the I/O thread's port table slot, say).
pub type Token = usize;

/// The receive watermarks of a port, in bytes and messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermarks {
    /// Pause reading when more than this many bytes are delivered and not taken.
    pub high_bytes: u64,
    /// Resume once at most this many are.
    pub low_bytes: u64,
    /// Pause reading when more than this many messages are delivered and not taken
    /// (resume once at most [`Watermarks::low_messages`] are).
    pub high_messages: u64,
}

impl Watermarks {
    /// A port's watermarks from its options (`high_msgq_watermark`, `low_msgq_watermark`,
    /// `high_msgq_messages`); the low message watermark is half the high one.
    pub fn new(high_bytes: u64, low_bytes: u64, high_messages: u64) -> Watermarks {
        Watermarks {
            high_bytes,
            low_bytes,
            high_messages,
        }
    }

    /// Resume once at most this many messages are delivered and not taken: half the high
    /// watermark, as `configure_flow` (computed, not stored: every port's window holds
    /// its watermarks, and 8 bytes less keeps it in a smaller allocation).  For
    /// [`Watermarks::NONE`], `NO_LIMIT / 2`: as unreachable as `NO_LIMIT`.
    pub fn low_messages(&self) -> u64 {
        self.high_messages / 2
    }

    /// No watermark (a port not configured yet: a listener's, say).
    pub const NONE: Watermarks = Watermarks {
        high_bytes: NO_LIMIT,
        low_bytes: NO_LIMIT,
        high_messages: NO_LIMIT,
    };
}

// -- what the loop half writes -----------------------------------------------------------

/// One event loop's counters for the budget (the Python hub's `queued_bytes` and
/// `consumed_bytes`): written by that loop, read by the I/O thread.
///
/// Ordering: each is written by its loop (`Release`; one `LoopCounters` may serve every
/// loop of an I/O thread, as the native core's does: its writes are read-modify-writes)
/// and read by the I/O thread (`Acquire`).  A stale `consumed_bytes` only makes the budget think more is in use (it
/// pauses a little early, never late).  `queued_bytes` must be added to **before** the
/// loop submits the send it counts: the command queue's release/acquire then makes the
/// addition visible to the I/O thread before it can write (and subtract) those bytes.
#[derive(Debug, Default)]
pub struct LoopCounters {
    queued_bytes: AtomicU64,
    consumed_bytes: AtomicU64,
}

impl LoopCounters {
    /// No byte queued or taken yet.
    pub fn new() -> LoopCounters {
        LoopCounters::default()
    }

    /// The loop queued `bytes` of output (before it submits the send).
    pub fn queued(&self, bytes: u64) {
        self.queued_bytes.fetch_add(bytes, Ordering::Release);
    }

    /// Bytes queued and taken, ever: `(queued_bytes, consumed_bytes)`.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.queued_bytes.load(Ordering::Acquire),
            self.consumed_bytes.load(Ordering::Acquire),
        )
    }
}

/// The I/O half's charges to the budget, in bytes, ever: input delivered to the loops,
/// framing buffers and held packets (now), output written, dropped with its port or handed
/// to a daemon's client, and buffers held for the loops to drop.  Atomics, so that another
/// thread can read [`Charges::in_use`] (`statistics()`) while the I/O thread runs.
///
/// Ordering: every field but `pinned` is written by the I/O thread alone, as a load and a
/// store (`Relaxed`: it reads back its own writes; a reader on another thread gets a
/// value at most a moment old, and needs nothing else ordered with it).  `pinned` is added
/// to by the I/O thread and taken from by the loop that drops the buffers (read-modify-
/// writes, `Relaxed`: a count, ordered with nothing).
#[derive(Debug, Default)]
pub struct Charges {
    delivered_total: AtomicU64,
    framing_bytes: AtomicU64,
    bytes_out: AtomicU64,
    bytes_discarded: AtomicU64,
    bytes_forwarded: AtomicU64,
    pinned: AtomicU64,
    /// Bytes another budget of the same server charges (the native core's hosted Python
    /// half: its ports' input and output), written by that half after each of its rounds,
    /// so that one `memory_limit` bounds both.  `Relaxed`: a count read on its own.
    external: AtomicU64,
    /// Ports the budget pauses now ([`Budget::paused_ports`]), stored by the I/O thread as
    /// each pause begins or ends (a pause, `cmd_want`, a close, the releases of
    /// [`Budget::begin_round`]: never per message), so that a status reads it exact; it
    /// was a snapshot taken once a round, which read paused ports for a round after the
    /// last one closed (and for good if no round followed).  `Relaxed`: a count read on
    /// its own.
    paused_ports: AtomicU64,
}

/// Add to a counter only the I/O thread writes (no read-modify-write needed).
fn bump(counter: &AtomicU64, bytes: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(bytes),
        Ordering::Relaxed,
    );
}

impl Charges {
    /// Nothing charged yet.
    pub fn new() -> Charges {
        Charges::default()
    }

    /// Bytes charged to the budget now, with the loops' counters `loops`: input delivered
    /// and not yet taken by an owner, framing buffers and held packets, output queued by
    /// owners and not yet written, and buffers the I/O thread holds until a loop drops
    /// them.  The one formula of the memory in use (the budget's and `statistics()`).
    pub fn in_use(&self, loops: &[Arc<LoopCounters>]) -> i64 {
        self.own_in_use(loops) + self.external.load(Ordering::Relaxed) as i64
    }

    /// What another budget of the same server charges now (see [`Charges::set_external`]).
    pub fn external(&self) -> u64 {
        self.external.load(Ordering::Relaxed)
    }

    /// Another budget of the same server (the hosted Python half's) charges `bytes` now:
    /// counted in [`Charges::in_use`], so that this budget leaves room for it.
    pub fn set_external(&self, bytes: u64) {
        self.external.store(bytes, Ordering::Relaxed);
    }

    /// [`Charges::in_use`] without what another budget charges: this budget's own ports.
    pub fn own_in_use(&self, loops: &[Arc<LoopCounters>]) -> i64 {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed) as i128;
        let mut used = load(&self.delivered_total) + load(&self.framing_bytes)
            - load(&self.bytes_out)
            - load(&self.bytes_discarded)
            - load(&self.bytes_forwarded)
            + load(&self.pinned);
        for counters in loops {
            let (queued, consumed) = counters.totals();
            used += queued as i128 - consumed as i128;
        }
        used as i64
    }

    /// Ports the budget pauses now (see the field).
    pub fn paused_ports(&self) -> u64 {
        self.paused_ports.load(Ordering::Relaxed)
    }

    /// Input delivered to the loops, ever (charged bytes).
    pub fn delivered_total(&self) -> u64 {
        self.delivered_total.load(Ordering::Relaxed)
    }

    /// Queued output written, ever.
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }

    /// Queued output dropped with its port, ever.
    pub fn bytes_discarded(&self) -> u64 {
        self.bytes_discarded.load(Ordering::Relaxed)
    }

    /// Bytes of written or dropped buffers the I/O thread holds until a loop drops them.
    pub fn pinned(&self) -> u64 {
        self.pinned.load(Ordering::Relaxed)
    }

    /// **I/O half.**  It holds a written or dropped buffer of `bytes` for its loop to drop.
    pub fn pin(&self, bytes: u64) {
        self.pinned.fetch_add(bytes, Ordering::Relaxed);
    }

    /// **Loop half.**  It dropped buffers of `bytes` the I/O half held.
    pub fn unpin(&self, bytes: u64) {
        self.pinned.fetch_sub(bytes, Ordering::Relaxed);
    }

    fn set_framing(&self, bytes: u64) {
        self.framing_bytes.store(bytes, Ordering::Relaxed);
    }

    fn framing(&self) -> u64 {
        self.framing_bytes.load(Ordering::Relaxed)
    }
}

/// One port's flow-control window: the one object both halves of the port touch, each
/// field written by one side only (see the module's table).  Made with the port, shared
/// (`Arc`) by its loop half and the I/O thread's [`ReceiveFlow`].
#[derive(Debug)]
pub struct Window {
    /// The watermarks and the loop's counters, set once: at construction, or by the loop
    /// half before it hands the window to the I/O half ([`Window::configure`]; a port's
    /// window is made before its options reach it).
    config: OnceLock<(Watermarks, Arc<LoopCounters>)>,
    // -- written by the loop half --
    /// Bytes and messages the owner took (received, handed to a mailbox, dropped).
    /// `SeqCst`: step 2 of the handshake stores them, then loads `pause_generation`.
    consumed_bytes: AtomicU64,
    consumed_messages: AtomicU64,
    /// A task is parked on this port for its next message.  `SeqCst`: stored before the
    /// loop half loads `global_paused`, loaded after the I/O half stores it.
    waiting: AtomicBool,
    /// The last pause generation the loop half asked to end (the loop half's alone).
    resume_generation: AtomicU64,
    // -- written by the I/O half --
    /// What the I/O half delivered.  `Release` stores, sequenced before the `SeqCst`
    /// store of `pause_generation`; the loop half loads them (`Acquire`) after it loaded
    /// the generation, so it sees them at least as new as at that pause.
    delivered_bytes: AtomicU64,
    delivered_messages: AtomicU64,
    /// Bumped at each pause (step 1).  `SeqCst`: stored, then `consumed_*` loaded.
    pause_generation: AtomicU64,
    /// Reading is paused by the budget.  `SeqCst`: stored before the I/O half loads
    /// `waiting`, loaded after the loop half stores it.
    global_paused: AtomicBool,
    // -- the send side, written by the loop half (here, not in an allocation of its own:
    // one `Arc` per port less) --
    /// A sender waits for the output to drain below the send low watermark.  `SeqCst`:
    /// the WRITABLE handshake (Dekker's, as `core.rs` describes it): the loop half stores
    /// it, then loads the port's `bytes_out`; the I/O thread stores `bytes_out`, then
    /// loads it - one of the two sees the other.
    send_blocked: AtomicBool,
    /// Bytes the owner queued for output, ever.  `SeqCst`: stored before the send is
    /// submitted; the I/O thread loads it after its `bytes_out` store (the handshake
    /// above), so the backlog it computes is never less than what was queued by then.
    queued_bytes: AtomicU64,
    // -- the loop's drain's (here, in the padding beside the flags above: the drain's
    // `PyTarget` is then 24 bytes, a 48-byte allocation, not 40 and 64) --
    /// A msgpack packet of this port failed to decode in its loop's drain: the drain told
    /// the owner (`Error`, then `Closed`) and drops what comes for the port after it.
    /// `Relaxed`: written and read by that one loop's drains only.
    decode_failed: AtomicBool,
}

impl Window {
    /// The window of a port with these watermarks, whose owner runs in the loop counting
    /// `counters`.
    pub fn new(watermarks: Watermarks, counters: Arc<LoopCounters>) -> Window {
        let window = Window::unconfigured();
        window.configure(watermarks, counters);
        window
    }

    /// A window whose watermarks and loop are not known yet: no watermark, no loop
    /// counted ([`Window::configure`] sets them).
    pub fn unconfigured() -> Window {
        Window {
            config: OnceLock::new(),
            consumed_bytes: AtomicU64::new(0),
            consumed_messages: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            resume_generation: AtomicU64::new(0),
            delivered_bytes: AtomicU64::new(0),
            delivered_messages: AtomicU64::new(0),
            pause_generation: AtomicU64::new(0),
            global_paused: AtomicBool::new(false),
            send_blocked: AtomicBool::new(false),
            queued_bytes: AtomicU64::new(0),
            decode_failed: AtomicBool::new(false),
        }
    }

    /// **Loop half**, once, before the window is handed to the I/O half (the handoff -
    /// a command through the I/O thread's queue - orders this before the I/O half's
    /// reads): the port's watermarks and its loop's counters.  False (nothing changed) if
    /// the window was configured already.
    pub fn configure(&self, watermarks: Watermarks, counters: Arc<LoopCounters>) -> bool {
        self.config.set((watermarks, counters)).is_ok()
    }

    /// The watermarks it was configured with ([`Watermarks::NONE`] before).
    pub fn watermarks(&self) -> Watermarks {
        self.config
            .get()
            .map_or(Watermarks::NONE, |config| config.0)
    }

    fn counters(&self) -> Option<&LoopCounters> {
        self.config.get().map(|config| &*config.1)
    }

    /// **Loop half.**  The owner's `consumed_bytes` counter is now `value` (it only grows:
    /// a Python loop half assigns `window.consumed_bytes += charge`); the growth is taken
    /// by the loop's counters too, for the budget.  `SeqCst`: step 2 of the handshake
    /// stores it, then loads `pause_generation`.
    pub fn set_consumed_bytes(&self, value: u64) {
        // The loop half is the only writer: the swap returns its own last store.
        let before = self.consumed_bytes.swap(value, Ordering::SeqCst);
        if let Some(counters) = self.counters() {
            counters
                .consumed_bytes
                .fetch_add(value.wrapping_sub(before), Ordering::Release);
        }
    }

    /// **Loop half.**  The owner queued `bytes` of output (before it submits the send):
    /// counted by its loop's counters, for the budget.
    pub fn queued_output(&self, bytes: u64) {
        if let Some(counters) = self.counters() {
            counters.queued(bytes);
        }
    }

    /// **Either half.**  Bytes the owner queued for output, ever (`SeqCst`: see the
    /// field).
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes.load(Ordering::SeqCst)
    }

    /// **Loop half.**  The owner's `queued_bytes` counter is now `value` (it only grows:
    /// a Python loop half assigns the sum before it submits the send); the growth is
    /// counted by the loop's counters, for the budget, before the send can be written
    /// and subtracted.
    pub fn set_queued_bytes(&self, value: u64) {
        // The loop half is the only writer: the swap returns its own last store.
        let before = self.queued_bytes.swap(value, Ordering::SeqCst);
        self.queued_output(value.wrapping_sub(before));
    }

    /// **Loop half.**  The owner queues `bytes` more output (before it submits the
    /// send), counted for the budget as [`Window::set_queued_bytes`] does.
    pub fn add_queued_bytes(&self, bytes: u64) {
        self.queued_bytes.fetch_add(bytes, Ordering::SeqCst);
        self.queued_output(bytes);
    }

    /// **Either half.**  A sender waits for the output to drain (`SeqCst`: the WRITABLE
    /// handshake, see the field).
    pub fn send_blocked(&self) -> bool {
        self.send_blocked.load(Ordering::SeqCst)
    }

    /// **Loop half.**  A sender waits for the output to drain, or no longer does
    /// (`SeqCst`: stored before the loop half loads `bytes_out`).
    pub fn set_send_blocked(&self, blocked: bool) {
        self.send_blocked.store(blocked, Ordering::SeqCst);
    }

    /// **Loop half.**  The owner's `consumed_messages` counter is now `value`.
    pub fn set_consumed_messages(&self, value: u64) {
        self.consumed_messages.store(value, Ordering::SeqCst);
    }

    /// **Loop half.**  A message reached the port (the loop's drain handed it over): the
    /// task parked on it, if any, is woken, so it no longer waits (the next park marks it
    /// again, [`Window::set_waiting`]).  For a loop half that cannot say when its task
    /// stops waiting (a parked task woken by a message is the common case).
    pub fn task_woken(&self) {
        if self.waiting.load(Ordering::Relaxed) {
            self.waiting.store(false, Ordering::SeqCst);
        }
    }

    /// **The loop's drain.**  A msgpack packet of this port failed to decode: the drain
    /// drops the port's later events (see [`Window::decode_failed`]).
    pub fn mark_decode_failed(&self) {
        self.decode_failed.store(true, Ordering::Relaxed);
    }

    /// **The loop's drain.**  Whether a packet of this port failed to decode.
    pub fn decode_failed(&self) -> bool {
        self.decode_failed.load(Ordering::Relaxed)
    }

    /// **Either half.**  Whether a task is marked parked on this port.
    pub fn waiting(&self) -> bool {
        self.waiting.load(Ordering::SeqCst)
    }

    /// **Loop half.**  The owner took one message charged `charge` bytes (as the I/O half
    /// computed it and delivered it with the message).  Returns the pause generation to
    /// ask the I/O half to end (`cmd_resume`), if it paused and the owner has now taken
    /// enough (step 2 of the handshake); `None` otherwise.
    pub fn took(&self, charge: u64) -> Option<u64> {
        if let Some(counters) = self.counters() {
            counters.consumed_bytes.fetch_add(charge, Ordering::Release);
        }
        self.consumed_bytes.fetch_add(charge, Ordering::SeqCst);
        self.consumed_messages.fetch_add(1, Ordering::SeqCst);
        // Loaded after the counters were stored (the handshake's fence).
        let generation = self.pause_generation.load(Ordering::SeqCst);
        if generation == self.resume_generation.load(Ordering::Relaxed) {
            return None;
        }
        if self.drained() {
            self.resume_generation.store(generation, Ordering::Relaxed);
            return Some(generation);
        }
        None
    }

    /// **Loop half.**  Whether a task is parked on this port waiting for its next message
    /// (`receive`, `select`; a task waiting on the mailbox that owns the port marks the
    /// mailbox's [`OwnerCell`] instead).  Returns true when the caller must
    /// tell the I/O thread (`cmd_want`: the port is paused by the budget and a read into
    /// its reserve may now be allowed).
    pub fn set_waiting(&self, waiting: bool) -> bool {
        self.waiting.store(waiting, Ordering::SeqCst);
        waiting && self.global_paused.load(Ordering::SeqCst)
    }

    /// **Either half.**  Reading is paused by the budget.
    pub fn global_paused(&self) -> bool {
        self.global_paused.load(Ordering::SeqCst)
    }

    /// **Either half.**  What was delivered and not yet taken, in bytes and messages.
    pub fn buffered(&self) -> (u64, u64) {
        let delivered = (
            self.delivered_bytes.load(Ordering::Acquire),
            self.delivered_messages.load(Ordering::Acquire),
        );
        let consumed = (
            self.consumed_bytes.load(Ordering::SeqCst),
            self.consumed_messages.load(Ordering::SeqCst),
        );
        (
            delivered.0.saturating_sub(consumed.0),
            delivered.1.saturating_sub(consumed.1),
        )
    }

    /// **Either half.**  The owner took what was delivered down to the low watermarks.
    pub fn drained(&self) -> bool {
        let (bytes, messages) = self.buffered();
        let marks = self.watermarks();
        bytes <= marks.low_bytes && messages <= marks.low_messages()
    }

    /// **Either half.**  The pause generation (statistics, the loop half's checks).
    pub fn pause_generation(&self) -> u64 {
        self.pause_generation.load(Ordering::SeqCst)
    }

    /// **Loop half.**  The last pause generation the loop half asked to end.  `Relaxed`:
    /// only the loop half's thread reads and writes it (under the GIL).
    pub fn resume_generation(&self) -> u64 {
        self.resume_generation.load(Ordering::Relaxed)
    }

    /// **Loop half.**  The loop half asked to end pause `generation` (`Window.resume_due`
    /// in Python; [`Window::took`] sets it itself).  `Relaxed`: the loop half's alone.
    pub fn set_resume_generation(&self, generation: u64) {
        self.resume_generation.store(generation, Ordering::Relaxed);
    }

    /// **Either half.**  Bytes and messages delivered, ever.
    pub fn delivered(&self) -> (u64, u64) {
        (
            self.delivered_bytes.load(Ordering::Acquire),
            self.delivered_messages.load(Ordering::Acquire),
        )
    }

    /// **Either half.**  Bytes and messages the owner took, ever.
    pub fn consumed(&self) -> (u64, u64) {
        (
            self.consumed_bytes.load(Ordering::SeqCst),
            self.consumed_messages.load(Ordering::SeqCst),
        )
    }
}

// -- the active mode -----------------------------------------------------------------------

/// The `(credit, notify_passive)` of a port after the active mode `mode` is applied to its
/// current `(credit, notify)` (`_options.apply_active_mode`).
///
/// Erlang's rule for `inet:setopts(S, [{active, N}])`: N adds to a running count, and a
/// count that reaches 0 or less makes the port passive (credit 0; with `notify`, the
/// owner is told with `Passive`).  `mode` is `(-1, false)` for `true`, `(0, false)` for
/// `false`, `(1, false)` for `once`, `(n, true)` for N.
pub fn apply_active_mode(credit: i64, notify: bool, mode: (i64, bool)) -> (i64, bool) {
    let (mut new_credit, new_notify) = mode;
    if new_notify && notify && credit > 0 {
        new_credit += credit;
    }
    if new_notify && new_credit <= 0 {
        new_credit = 0;
    }
    (new_credit, new_notify)
}

/// What [`ReceiveFlow::deliver`] asks the I/O thread to do after delivering packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    /// The credit ran out: the port turned passive (re-check whether to read).
    pub turned_passive: bool,
    /// ... and the owner asked to be told: deliver `Passive` after the packets.
    pub send_passive: bool,
    /// A check point passed and the owner is behind by more than a high watermark: call
    /// [`ReceiveFlow::pause`] (the I/O thread may tell a daemon's client in between),
    /// then [`ReceiveFlow::recheck`].
    pub over_high: bool,
}

// -- the I/O half --------------------------------------------------------------------------

/// The I/O half's side of a port's receive flow control: what it delivered, its check
/// points, its active credit and held packets, and the pause (see the module's docs).
/// Owned by the I/O thread.
#[derive(Debug)]
pub struct ReceiveFlow {
    /// The port's window; its watermarks were configured before this was made, and are
    /// read from it at each check point (not copied here: 32 bytes a port).
    window: Arc<Window>,
    /// The port's token, in 32 bits (a port table slot: the table is sized from the fd
    /// limit), and the next field too: the two pack with the flags below, 8 bytes less
    /// a port (issue 14, memory per idle connection).
    token: u32,
    /// Bytes charged per packet beyond its own ([`PACKET_OVERHEAD`] for a framed port of
    /// this process, 0 for a raw one or a daemon's).
    packet_overhead: u32,
    // The I/O thread's own copies of what it publishes in the window.
    delivered_bytes: u64,
    delivered_messages: u64,
    pause_generation: u64,
    check_bytes: u64,
    check_messages: u64,
    msgq_paused: bool,
    credit: i64,
    notify_passive: bool,
    /// Packets held past the credit: at most one read's packets (the socket is not read
    /// while any is held), so `u32` (it packs with the flags: 8 bytes less a port).
    held_count: u32,
    held_bytes: u64,
    /// Receive pauses, for statistics (the watermarks' and the budget's).
    pub pauses: u64,
    /// The most bytes buffered at once (delivered and not taken, or held), for statistics.
    pub peak_buffered: u64,
}

impl ReceiveFlow {
    /// The I/O half of the port `token` whose window is `window`, in active mode
    /// `(credit, notify_passive)`, charging `packet_overhead` bytes per packet beyond its
    /// own.
    pub fn new(
        window: Arc<Window>,
        token: Token,
        active: (i64, bool),
        packet_overhead: u64,
    ) -> ReceiveFlow {
        let watermarks = window.watermarks();
        ReceiveFlow {
            window,
            token: u32::try_from(token).expect("a port table slot fits in 32 bits"),
            packet_overhead: u32::try_from(packet_overhead)
                .expect("a packet's overhead fits in 32 bits"),
            delivered_bytes: 0,
            delivered_messages: 0,
            pause_generation: 0,
            check_bytes: watermarks.high_bytes,
            check_messages: watermarks.high_messages,
            msgq_paused: false,
            credit: active.0,
            notify_passive: active.1,
            held_count: 0,
            held_bytes: 0,
            pauses: 0,
            peak_buffered: 0,
        }
    }

    /// The port's window.
    pub fn window(&self) -> &Arc<Window> {
        &self.window
    }

    /// The port's token.
    pub fn token(&self) -> Token {
        self.token as Token
    }

    /// Bytes charged per packet beyond its own.
    pub fn packet_overhead(&self) -> u64 {
        u64::from(self.packet_overhead)
    }

    /// Whether the socket may be read: credit left, no packet held, and paused neither by
    /// the watermarks nor by the budget - or `close_pending`: a port closed while it
    /// flushes reads on whatever its mode, its held packets and its pauses, so that a peer
    /// blocked writing to us can drain what we flush to it (what it reads is dropped,
    /// never delivered nor charged: no bound needs it paused).  (The I/O thread adds its
    /// own: not at EOF...)
    pub fn may_read(&self, close_pending: bool) -> bool {
        close_pending
            || (self.credit != 0
                && self.held_count == 0
                && !self.msgq_paused
                && !self.global_paused())
    }

    /// The active credit: -1 unlimited, 0 passive, N > 0 packets.
    pub fn credit(&self) -> i64 {
        self.credit
    }

    /// The active mode now: `(credit, notify_passive)` (to carry it to a new flow).
    pub fn active_mode(&self) -> (i64, bool) {
        (self.credit, self.notify_passive)
    }

    /// Paused by the watermarks.
    pub fn msgq_paused(&self) -> bool {
        self.msgq_paused
    }

    /// Paused by the budget.  (The I/O half alone writes the window's flag, so it reads
    /// back its own last write.)
    pub fn global_paused(&self) -> bool {
        self.window.global_paused.load(Ordering::Relaxed)
    }

    /// Packets held past the credit, and their charge in bytes.
    pub fn held(&self) -> (usize, u64) {
        (self.held_count as usize, self.held_bytes)
    }

    /// Bytes and messages delivered, ever.
    pub fn delivered(&self) -> (u64, u64) {
        (self.delivered_bytes, self.delivered_messages)
    }

    /// The current pause generation.
    pub fn pause_generation(&self) -> u64 {
        self.pause_generation
    }

    // -- the active credit --

    /// `cmd_set_active`: apply an active mode (see [`apply_active_mode`]).  Returns true
    /// when the owner is to be told `Passive` now (a count that reached 0 with notify).
    /// If the port now has credit and holds packets, deliver them first
    /// ([`ReceiveFlow::grant_held`]).
    pub fn set_active(&mut self, mode: (i64, bool)) -> bool {
        let (credit, notify) = apply_active_mode(self.credit, self.notify_passive, mode);
        self.credit = credit;
        self.notify_passive = notify;
        notify && credit == 0
    }

    /// `cmd_read_once`: a passive port's receiver waits; let one packet through
    /// (`gen_tcp:recv`).  Returns false (nothing changed) unless the port was passive.
    pub fn read_once(&mut self) -> bool {
        if self.credit != 0 {
            return false;
        }
        self.credit = 1;
        self.notify_passive = false;
        true
    }

    /// Of `count` packets a read completed, how many the credit lets through now; the
    /// rest are to be held ([`ReceiveFlow::hold`]), in order.
    pub fn admit(&self, count: usize) -> usize {
        match usize::try_from(self.credit) {
            Ok(credit) if credit < count => credit,
            _ => count,
        }
    }

    /// Hold packets charged `charges` (beyond the credit): charged to the budget as
    /// framing bytes until a grant delivers them.
    pub fn hold(&mut self, budget: &mut Budget, charges: &[u64]) {
        let size: u64 = charges.iter().sum();
        self.held_count += charges.len() as u32;
        self.held_bytes += size;
        let charges_ = &budget.charges;
        charges_.set_framing(charges_.framing() + size);
        budget.headroom -= size as i64;
        self.peak_buffered = self.peak_buffered.max(self.held_bytes);
    }

    /// After a grant: how many held packets to deliver now (all with an unlimited credit,
    /// else as many as the credit), in order.  The I/O thread takes them off its queue,
    /// calls [`ReceiveFlow::unhold`] with their charges, then delivers them.
    pub fn grant_held(&self) -> usize {
        if self.credit < 0 {
            self.held_count as usize
        } else {
            (self.held_count as usize).min(self.credit as usize)
        }
    }

    /// Held packets charged `charges` leave the hold (to be delivered at once).
    pub fn unhold(&mut self, budget: &mut Budget, charges: &[u64]) {
        let size: u64 = charges.iter().sum();
        // (Saturating: a caller's slip must not panic the I/O thread.)
        self.held_count = self.held_count.saturating_sub(charges.len() as u32);
        self.held_bytes = self.held_bytes.saturating_sub(size);
        let charges_ = &budget.charges;
        charges_.set_framing(charges_.framing().saturating_sub(size));
        budget.headroom += size as i64; // charged again as they are delivered
    }

    // -- delivery and the watermarks --

    /// The I/O thread delivered packets charged `charges` (after it put them in the loop's
    /// inbox): count them, charge them to the budget, spend the credit, and look at the
    /// window if a check point passed.
    pub fn deliver(&mut self, budget: &mut Budget, charges: &[u64]) -> Delivered {
        let size: u64 = charges.iter().sum();
        let count = charges.len() as u64;
        self.delivered_messages += count;
        self.delivered_bytes += size;
        self.window
            .delivered_messages
            .store(self.delivered_messages, Ordering::Release);
        self.window
            .delivered_bytes
            .store(self.delivered_bytes, Ordering::Release);
        bump(&budget.charges.delivered_total, size);
        budget.headroom -= size as i64;
        let mut delivered = Delivered::default();
        if self.credit > 0 {
            self.credit = (self.credit - count as i64).max(0);
            if self.credit == 0 {
                delivered.turned_passive = true;
                delivered.send_passive = self.notify_passive;
            }
        }
        if self.delivered_bytes > self.check_bytes || self.delivered_messages > self.check_messages
        {
            delivered.over_high = self.check();
        }
        delivered
    }

    /// More delivered and not taken than a high watermark allows.
    pub fn over_high(&self) -> bool {
        let (taken_bytes, taken_messages) = self.window.consumed();
        let marks = self.window.watermarks();
        self.delivered_bytes.saturating_sub(taken_bytes) > marks.high_bytes
            || self.delivered_messages.saturating_sub(taken_messages) > marks.high_messages
    }

    /// The delivered counters passed the check point: true if reading must pause; else
    /// move the check point to what was taken plus the high watermarks.
    fn check(&mut self) -> bool {
        let (taken_bytes, taken_messages) = self.window.consumed();
        let marks = self.window.watermarks();
        if self.delivered_bytes.saturating_sub(taken_bytes) > marks.high_bytes
            || self.delivered_messages.saturating_sub(taken_messages) > marks.high_messages
        {
            return true;
        }
        self.check_bytes = taken_bytes.saturating_add(marks.high_bytes);
        self.check_messages = taken_messages.saturating_add(marks.high_messages);
        false
    }

    /// Keep the peak of what was buffered (delivered, not taken), for statistics.
    pub fn note_buffered(&mut self) {
        let (bytes, _) = self.window.buffered();
        self.peak_buffered = self.peak_buffered.max(bytes);
    }

    /// Step 1 of the handshake: stop reading until the owner has taken enough.  True if
    /// this started a pause: the caller stops reading (and tells a daemon's client),
    /// **then** calls [`ReceiveFlow::recheck`], which ends the pause at once if the owner
    /// took enough meanwhile.
    pub fn pause(&mut self) -> bool {
        self.note_buffered();
        if self.msgq_paused {
            return false;
        }
        self.msgq_paused = true;
        self.pauses += 1;
        self.bump_generation();
        true
    }

    fn bump_generation(&mut self) {
        self.pause_generation += 1;
        // Stored before `recheck` loads `consumed_*` (the handshake's fence).
        self.window
            .pause_generation
            .store(self.pause_generation, Ordering::SeqCst);
    }

    /// Step 1's re-read, after [`ReceiveFlow::pause`]: true if the owner already took
    /// enough, and reading resumes.
    pub fn recheck(&mut self) -> bool {
        if self.msgq_paused && self.window.drained() {
            self.msgq_paused = false;
            return true;
        }
        false
    }

    /// Step 3 (`cmd_resume`): the owner asked to end pause `generation`.  True if reading
    /// resumes (it is the current pause and the counters say drained).  If it is the
    /// current pause but the counters no longer say drained, the pause goes on under a new
    /// generation, so that the owner asks again once it has taken enough.
    pub fn may_resume(&mut self, generation: u64) -> bool {
        if !self.msgq_paused || generation != self.pause_generation {
            return false;
        }
        if !self.window.drained() {
            self.bump_generation();
        }
        self.recheck()
    }

    /// Whether a task waits for this port's next message and has taken every message
    /// delivered to it: input for it would be taken at once (the budget's reserve).
    pub fn owner_waits(&self) -> bool {
        // `waiting` first: the takes the owner made before it parked are then visible.
        self.window.waiting.load(Ordering::SeqCst) && self.took_all()
    }

    /// Whether the owner took every message delivered to it (loaded after the mark that
    /// says it waits: see [`ReceiveFlow::owner_waits`]).
    fn took_all(&self) -> bool {
        self.delivered_messages == self.window.consumed_messages.load(Ordering::SeqCst)
    }

    /// The I/O thread closes the port: release what it holds from the budget (the
    /// framer's `buffered` bytes and the held packets) and forget a budget pause.
    pub fn close(&mut self, budget: &mut Budget, framer_buffered: usize) {
        let charges = &budget.charges;
        charges.set_framing(
            charges
                .framing()
                .saturating_sub(framer_buffered as u64 + self.held_bytes),
        );
        self.held_bytes = 0;
        self.held_count = 0;
        budget.unfinished_gone(self.token());
        if self.global_paused() {
            budget.forget(self.token());
            self.set_global_paused(false);
        }
        budget.disown(self.token());
    }

    /// Store `global_paused`; returns what it was.
    fn set_global_paused(&mut self, paused: bool) -> bool {
        self.window.global_paused.swap(paused, Ordering::SeqCst)
    }
}

// -- the budget ----------------------------------------------------------------------------

/// How much a port may read now (see [`Budget::admit_read`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadGrant {
    /// Read at most this many bytes.
    pub max: usize,
    /// The read was shortened because the budget is short (a framed port reads only what
    /// it could pay for were each byte a packet).
    pub short: bool,
}

/// Why a framed read closes its port: its framer holds more than `port_buffer_limit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferLimitExceeded {
    /// The limit, in bytes.
    pub limit: u64,
    /// What the framer holds, in bytes.
    pub size: u64,
}

impl std::fmt::Display for BufferLimitExceeded {
    /// The text of the owner's `Error("ENOBUFS", ...)`, as the Python core writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "port_buffer_limit={} exceeded: {} bytes buffered",
            self.limit, self.size
        )
    }
}

/// Why a stall of the budget fails a port ([`Budget::stall_victim`]): the owner's
/// `Error("ENOBUFS", ...)`, then `Closed("ENOBUFS")`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stalled {
    /// `memory_limit`, in bytes.
    pub limit: u64,
    /// What the port's framer held of a packet not yet whole, in bytes.
    pub size: u64,
}

impl std::fmt::Display for Stalled {
    /// The text of the owner's `Error("ENOBUFS", ...)`, as the Python core writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "memory_limit={} spent on unfinished packets: this port held the most, {} bytes",
            self.limit, self.size
        )
    }
}

/// A mailbox's cell in the native I/O half (`_native.OwnerCell`, made by the loop half
/// when a port of this core is first given to the mailbox as its owner, under a memory
/// budget): whether a task waits on the mailbox, and how many of the ports it owns the
/// budget paused.  Shared (`Arc`) by the mailbox and the [`Budget`], which knows each
/// owned port's cell (`cmd_owner`, [`Budget::set_owner`]).
///
/// So that a task parking on a mailbox that owns many ports costs O(1), not a visit to
/// each port: the park stores `waiting`, then loads `paused` ([`OwnerCell::park`]); only
/// if a port is paused does it ask the thread (`cmd_want_owner`, [`Budget::paused_of`]),
/// which lets those ports - and only those - try the reserve.  The budget, pausing an
/// owned port, adds it to `paused` **then** loads `waiting` ([`Budget::admit_read`]):
/// one of the two sees the other (Dekker's), so a parked owner is never left behind a
/// pause it did not hear of.
#[derive(Debug, Default)]
pub struct OwnerCell {
    /// A task is parked on the mailbox (its waiter list is not empty).  `SeqCst`: the loop
    /// half stores it before it loads `paused`; the I/O half loads it after it stored
    /// `paused` (the pair above).  A stale true (stored false a moment later) lets a port
    /// read once into the reserve with nobody to take it at once: the bound stays firm.
    waiting: AtomicBool,
    /// Ports of this owner whose `global_paused` is set (the I/O half's count: it alone
    /// writes it).  `SeqCst`: the I/O half adds to it before it loads `waiting`; the loop
    /// half loads it after it stored `waiting`.
    paused: AtomicUsize,
}

impl OwnerCell {
    /// A cell: nobody waits, nothing is paused.
    pub fn new() -> OwnerCell {
        OwnerCell::default()
    }

    /// **Loop half.**  A task parks on the mailbox (its waiter is in the list): mark it
    /// waiting, then true if a port of this owner is paused by the budget (the caller
    /// sends `cmd_want_owner`).  `SeqCst`, both: see the fields.
    pub fn park(&self) -> bool {
        self.waiting.store(true, Ordering::SeqCst);
        self.paused.load(Ordering::SeqCst) != 0
    }

    /// **Loop half.**  No task waits on the mailbox any more.  (`SeqCst`, as the stores
    /// of [`OwnerCell::park`]: one total order of the mark's stores.)
    pub fn unpark(&self) {
        self.waiting.store(false, Ordering::SeqCst);
    }

    /// **Either half.**  Whether a task waits on the mailbox (`SeqCst`: see the field).
    pub fn waiting(&self) -> bool {
        self.waiting.load(Ordering::SeqCst)
    }

    /// **Either half.**  How many of the owner's ports the budget paused now (`SeqCst`:
    /// see the field).
    pub fn paused(&self) -> usize {
        self.paused.load(Ordering::SeqCst)
    }

    /// The address that names this cell in [`Budget`]'s map of paused ports by owner
    /// (the budget holds an `Arc` of the cell while it has an entry there).
    fn key(cell: &Arc<OwnerCell>) -> usize {
        Arc::as_ptr(cell) as usize
    }
}

/// The memory budget of all ports together (`memory_limit`), and the per-port cap on a
/// framer's buffer (`port_buffer_limit`).  Owned by the I/O thread (see the module's docs).
#[derive(Debug)]
pub struct Budget {
    limit: Option<u64>,
    reserve: u64,
    read_size: u64,
    read_floor: i64,
    packet_floor: i64,
    port_buffer_limit: Option<u64>,
    /// What the I/O half charged (shared: `statistics()` reads the memory in use).
    charges: Arc<Charges>,
    loops: Vec<Arc<LoopCounters>>,
    /// The pauses of the budget: which ports are paused, in which order they paused and
    /// which of them are reserve waiters, each step O(1) amortised ([`Pauses`]).
    pauses: Pauses,
    /// The owner mailbox's cell of each port a mailbox owns (`cmd_owner`: sent only
    /// under a memory budget; forgotten as the port closes).
    owners: HashMap<Token, Arc<OwnerCell>>,
    /// The paused ports of each owner (by [`OwnerCell::key`]): what `cmd_want_owner`
    /// lets try the reserve.  A token is here exactly while its port's `global_paused`
    /// is set and it has an owner; a set is removed when it empties.
    owner_paused: HashMap<usize, HashSet<Token>>,
    /// The bytes each framed port's framer holds of a packet not yet whole, for the ports
    /// holding any (kept by [`Budget::framer_holds`] only when it changes, and only under a
    /// `memory_limit`): where a stall's victim is chosen ([`Budget::stall_victim`]).
    unfinished: HashMap<Token, u64>,
    /// Their sum.
    unfinished_total: u64,
    /// This round's headroom, less what its reads were charged.
    headroom: i64,
    /// What another budget charged ([`Charges::external`]) when the headroom was last
    /// computed or adjusted ([`Budget::note_external`]).
    external_seen: u64,
    /// Reads made into the reserve, ever.
    pub reserve_reads: u64,
    /// Ports paused by the budget, ever.
    pub global_pauses: u64,
    /// Ports failed because the budget stalled on unfinished packets
    /// ([`Budget::stall_victim`]), ever.
    pub failed_ports: u64,
    /// The most bytes in use at the start of a round.
    pub peak_memory: i64,
}

impl Budget {
    /// The budget for `memory_limit` bytes (`None`: no limit) and `port_buffer_limit`
    /// bytes per framer (`None`: no limit), for reads of `read_size` bytes
    /// ([`READ_SIZE`]; more than [`PACKET_OVERHEAD`], so that a shortened read of one
    /// byte fits any room a whole read would).
    pub fn new(
        memory_limit: Option<u64>,
        port_buffer_limit: Option<u64>,
        read_size: usize,
    ) -> Budget {
        debug_assert!(read_size > PACKET_OVERHEAD);
        let reserve = memory_limit.map_or(0, |limit| limit / 4);
        let read_size = read_size as u64;
        Budget {
            limit: memory_limit,
            reserve,
            read_size,
            // Headroom a read needs when the owner does not wait: a whole read, plus the
            // reserve.
            read_floor: (read_size + reserve) as i64,
            // Below this headroom a read of packets could be charged more than is left
            // (each packet PACKET_OVERHEAD on top of its bytes): such reads are shortened.
            packet_floor: (read_size * (1 + PACKET_OVERHEAD as u64) + reserve) as i64,
            port_buffer_limit,
            charges: Arc::new(Charges::new()),
            loops: Vec::new(),
            pauses: Pauses::default(),
            owners: HashMap::new(),
            owner_paused: HashMap::new(),
            unfinished: HashMap::new(),
            unfinished_total: 0,
            headroom: UNLIMITED,
            external_seen: 0,
            reserve_reads: 0,
            global_pauses: 0,
            failed_ports: 0,
            peak_memory: 0,
        }
    }

    /// `memory_limit`, if any.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// The reserve for waiting owners: `memory_limit / 4`.
    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    /// The most one message may be charged (`None`: no `memory_limit`): `memory_limit`
    /// less a read.  A port reads only while a whole read fits under `memory_limit`
    /// (a waiting owner's; the others leave the reserve too), so a packet still arriving
    /// that is charged more than this by itself is never read further: its port would
    /// wait for it for ever.  [`framed_read`] fails such a port (`EMSGSIZE`), and one
    /// whose whole message is charged more (the same message, had it arrived over more
    /// reads), whatever the other ports hold.
    pub fn message_cap(&self) -> Option<u64> {
        self.limit.map(|limit| limit.saturating_sub(self.read_size))
    }

    /// Count the output queued and the input taken by this loop's owners.
    pub fn add_loop(&mut self, counters: Arc<LoopCounters>) {
        self.loops.push(counters);
    }

    /// Forget a loop that ended (its ports are closed, its counters settled).
    pub fn remove_loop(&mut self, counters: &Arc<LoopCounters>) {
        self.loops.retain(|other| !Arc::ptr_eq(other, counters));
    }

    /// `bytes` of queued output were written.
    pub fn wrote(&mut self, bytes: u64) {
        bump(&self.charges.bytes_out, bytes);
    }

    /// `bytes` of queued output were dropped (a port closed with output queued).
    pub fn discarded(&mut self, bytes: u64) {
        bump(&self.charges.bytes_discarded, bytes);
    }

    /// `bytes` were handed on to a daemon's client (no longer charged here).
    pub fn forwarded(&mut self, bytes: u64) {
        bump(&self.charges.bytes_forwarded, bytes);
    }

    /// The charges, to read the memory in use from another thread
    /// ([`Charges::in_use`], with the loops' counters).
    pub fn charges(&self) -> &Arc<Charges> {
        &self.charges
    }

    /// Bytes charged to the budget now ([`Charges::in_use`]): input delivered to the loops
    /// and not yet taken by an owner, framing buffers and held packets, output queued by
    /// owners and not yet written, and buffers held for the loops to drop.
    pub fn in_use(&self) -> i64 {
        self.charges.in_use(&self.loops)
    }

    /// Whether a port is paused by the budget: then the I/O thread must not sleep longer
    /// than [`BUDGET_RECHECK`] before its next round.
    pub fn has_paused(&self) -> bool {
        !self.pauses.ports.is_empty()
    }

    /// How many ports the budget has paused now (the daemon's status: `paused_ports`).
    pub fn paused_ports(&self) -> usize {
        self.pauses.ports.len()
    }

    /// Entries of the pause lists visited, ever: the cost of the budget's pause
    /// bookkeeping, O(1) amortised per pause, release, `cmd_want` and close (for the
    /// tests that check it stays so at tens of thousands of ports).
    pub fn pause_steps(&self) -> u64 {
        self.pauses.steps
    }

    /// Bytes held by framers and in held packets, now.
    pub fn framing_bytes(&self) -> u64 {
        self.charges.framing()
    }

    /// This round's headroom, less what its reads were charged so far.
    pub fn headroom(&self) -> i64 {
        self.headroom
    }

    /// Once a round, before reading: compute the headroom (bytes that may still be read
    /// before the budget is used up; ordinary reads also leave the reserve).  Ports paused
    /// by the budget read again once the total is back at one half of it, reserve waiters
    /// as soon as one read fits: their tokens are pushed to `resumed` (the I/O thread
    /// re-registers their interest; their `global_paused` is already cleared).
    pub fn begin_round(&mut self, resumed: &mut Vec<Token>) -> i64 {
        let Some(limit) = self.limit else {
            self.headroom = UNLIMITED;
            return UNLIMITED;
        };
        let used = self.in_use();
        self.peak_memory = self.peak_memory.max(used);
        let headroom = limit as i64 - used;
        if !self.pauses.ports.is_empty() {
            let first = resumed.len();
            if used <= (limit / 2) as i64 {
                self.pauses.release_all(resumed);
            } else if self.pauses.live_waiters > 0 && headroom >= self.read_size as i64 {
                // The reserve has room again: the ports whose owner waits try first.
                self.pauses.release_waiters(resumed);
            }
            if !self.owner_paused.is_empty() {
                for &token in &resumed[first..] {
                    self.owner_unpaused(token);
                }
            }
            self.publish_pauses();
        }
        self.headroom = headroom;
        self.external_seen = self.charges.external();
        headroom
    }

    /// After the round's poll, before its reads: take the headroom again from what is in
    /// use now.  [`Budget::begin_round`] measured it before the poll, which can sleep; in
    /// the meantime owners may have queued output (and taken input), and a read admitted
    /// against the older figure could pass the budget or skip a pause the budget owes.
    /// Releases and pauses stay [`Budget::begin_round`]'s, once a round.
    pub fn after_poll(&mut self) {
        let Some(limit) = self.limit else {
            return;
        };
        let used = self.in_use();
        self.peak_memory = self.peak_memory.max(used);
        self.headroom = limit as i64 - used;
        self.external_seen = self.charges.external();
    }

    /// Another budget of the server (the hosted half's) ran within this round and charges
    /// what [`Charges::external`] says now: take its growth off this round's headroom (or
    /// give back what it freed), so that the reads this round still admits see it.
    pub fn note_external(&mut self) {
        if self.limit.is_none() {
            return;
        }
        let now = self.charges.external();
        self.headroom -= now as i64 - self.external_seen as i64;
        self.external_seen = now;
    }

    /// A port is ready to read: `None` if the budget pauses it (reading stops until
    /// [`Budget::begin_round`] or [`Budget::want`] resumes it), else how much it may read.
    ///
    /// Below a whole read plus the reserve of headroom, a port reads into the reserve only
    /// if its owner waits, and only while a whole read fits; a framed port reads less when
    /// the headroom is short of what a read of one-byte packets would be charged.
    pub fn admit_read(&mut self, flow: &mut ReceiveFlow) -> Option<ReadGrant> {
        let headroom = self.headroom;
        if headroom < self.read_floor && self.blocks(flow, headroom) {
            return None;
        }
        if headroom < self.packet_floor && flow.packet_overhead > 0 {
            return Some(ReadGrant {
                max: self.packet_read_size(flow, headroom),
                short: true,
            });
        }
        Some(ReadGrant {
            max: self.read_size as usize,
            short: false,
        })
    }

    /// For a backend that admits a round's reads before it makes them (io_uring): whether
    /// `flow` may read a whole read now, as [`Budget::admit_read`] would admit it with
    /// neither a pause nor a shortened read (the headroom above the floor its kind
    /// needs).  Such a backend admits a second read of a round only then, and leaves the
    /// others to the next round, whose headroom counts what the reads were charged: so
    /// no read is paused or shortened for input another read of its round may not bring.
    pub fn fits(&self, flow: &ReceiveFlow) -> bool {
        let floor = if flow.packet_overhead > 0 {
            self.packet_floor
        } else {
            self.read_floor
        };
        self.headroom >= floor
    }

    /// A read of up to `max` bytes was admitted but is not made yet (see
    /// [`Budget::fits`]): hold the most it may be charged - `max`, and for a framed port
    /// `PACKET_OVERHEAD` more per byte, were every byte a packet - off the round's
    /// headroom, so the reads admitted after it see the headroom as if it had been
    /// charged in full.  Returns the bytes held, which [`Budget::release_hold`] gives back
    /// just before the read's input is charged.
    pub fn hold(&mut self, flow: &ReceiveFlow, max: usize) -> u64 {
        if self.limit.is_none() {
            return 0;
        }
        let held = if flow.packet_overhead > 0 {
            max as u64 * (1 + PACKET_OVERHEAD as u64)
        } else {
            max as u64
        };
        self.headroom -= held as i64;
        held
    }

    /// The read [`Budget::hold`] held `held` bytes for was made (or dropped): give them
    /// back (its input is charged next, as it is delivered).
    pub fn release_hold(&mut self, held: u64) {
        self.headroom += held as i64;
    }

    /// Bytes a port of packets may read when the budget is short: so many that, were each
    /// byte a packet charged `PACKET_OVERHEAD` more, the read still fits what is left for
    /// it (all of the headroom for a waiting owner, else what the reserve leaves).
    fn packet_read_size(&self, flow: &ReceiveFlow, headroom: i64) -> usize {
        let room = if self.owner_waits(flow) {
            headroom
        } else {
            headroom - self.reserve as i64
        };
        let size = (room / (1 + PACKET_OVERHEAD as i64)).min(self.read_size as i64);
        size.max(1) as usize
    }

    /// A read is due but the headroom is below a whole read plus the reserve: read into the
    /// reserve if the port's owner waits for input (false), else pause (true).
    ///
    /// `global_paused` is stored before the owner's `waiting` is loaded; the loop half
    /// stores `waiting` before it loads `global_paused` ([`Window::set_waiting`]): one of
    /// the two sees the other, so a waiting owner is never left behind a pause it did not
    /// hear of.  For a port a mailbox owns, the port is counted in the owner's cell
    /// ([`OwnerCell`]'s `paused`) before the owner's `waiting` is loaded; a task parking
    /// on the mailbox stores `waiting` before it loads `paused` ([`OwnerCell::park`]):
    /// the same argument.
    fn blocks(&mut self, flow: &mut ReceiveFlow, headroom: i64) -> bool {
        if !flow.set_global_paused(true) {
            self.owner_paused(flow.token());
        }
        let waits = self.owner_waits(flow);
        if waits && headroom >= self.read_size as i64 {
            flow.set_global_paused(false);
            self.owner_unpaused(flow.token());
            self.reserve_reads += 1;
            return false;
        }
        if self.pauses.pause(flow.token(), &flow.window) {
            flow.pauses += 1;
            self.global_pauses += 1;
            self.publish_pauses();
        }
        if waits {
            self.pauses.wait(flow.token());
        }
        true
    }

    /// `cmd_want`: the owner of a port paused by the budget waits for input.  True if the
    /// port is let out of the pause (the I/O thread re-registers its interest; its next
    /// read tries the reserve, and pauses again as a reserve waiter if there is no room).
    pub fn want(&mut self, flow: &mut ReceiveFlow) -> bool {
        if !flow.global_paused() {
            return false;
        }
        self.forget(flow.token());
        flow.set_global_paused(false);
        true
    }

    fn forget(&mut self, token: Token) {
        self.pauses.forget(token);
        self.owner_unpaused(token);
        self.publish_pauses();
    }

    /// Whether a task waits for `flow`'s next message - on the port itself (its window's
    /// mark) or on the mailbox that owns it (its [`OwnerCell`]) - and has taken every
    /// message delivered to it: input for it would be taken at once (the reserve).
    fn owner_waits(&self, flow: &ReceiveFlow) -> bool {
        match self.owners.get(&flow.token()) {
            // The cell's `waiting` first, as the window's: the takes the owner made
            // before it parked are then visible.
            Some(cell) if cell.waiting() => flow.took_all(),
            _ => flow.owner_waits(),
        }
    }

    /// A port of an owner was paused (its `global_paused` set): count it in the owner's
    /// cell (`SeqCst`, before the owner's `waiting` is loaded: see [`OwnerCell`]).
    fn owner_paused(&mut self, token: Token) {
        if let Some(cell) = self.owners.get(&token) {
            cell.paused.fetch_add(1, Ordering::SeqCst);
            self.owner_paused
                .entry(OwnerCell::key(cell))
                .or_default()
                .insert(token);
        }
    }

    /// A port of an owner is no longer paused (its `global_paused` cleared, or about to
    /// be): take it out of the owner's cell.  (A count a task reads stale only makes it
    /// send a `cmd_want_owner` that finds nothing to do.)
    fn owner_unpaused(&mut self, token: Token) {
        let Some(cell) = self.owners.get(&token) else {
            return;
        };
        let key = OwnerCell::key(cell);
        if let Some(tokens) = self.owner_paused.get_mut(&key) {
            if tokens.remove(&token) {
                cell.paused.fetch_sub(1, Ordering::SeqCst);
                if tokens.is_empty() {
                    self.owner_paused.remove(&key);
                }
            }
        }
    }

    /// `cmd_owner`: the port of `flow` is now owned by the mailbox whose cell is `owner`
    /// (`None`: by no mailbox).  A paused port moves to the new owner's cell - counted
    /// there before the new owner's `waiting` is loaded - and is let out of the pause
    /// (true, as [`Budget::want`]) if a task already waits on the new owner: it parked
    /// before this command, so it may not have seen the port paused.
    pub fn set_owner(&mut self, flow: &mut ReceiveFlow, owner: Option<Arc<OwnerCell>>) -> bool {
        let token = flow.token();
        let paused = flow.global_paused();
        if paused {
            self.owner_unpaused(token);
        }
        match owner {
            Some(cell) => self.owners.insert(token, cell),
            None => self.owners.remove(&token),
        };
        if !paused {
            return false;
        }
        self.owner_paused(token);
        if self.owner_waits(flow) {
            return self.want(flow);
        }
        false
    }

    /// `cmd_want_owner`: a task parked on the mailbox whose cell is `owner` while ports
    /// of it are paused: their tokens, each to be let try the reserve ([`Budget::want`]),
    /// but the reserve waiters'.  O(the owner's paused ports), whatever the number of
    /// ports it owns.
    pub fn paused_of(&mut self, owner: &Arc<OwnerCell>) -> Vec<Token> {
        let Some(tokens) = self.owner_paused.get(&OwnerCell::key(owner)) else {
            return Vec::new();
        };
        self.pauses.steps += tokens.len() as u64;
        // Not the reserve waiters: they are let in first as soon as a read fits (each
        // round checks), and letting one try again now would only pause it again, behind
        // the waiters that came after it.
        let ports = &self.pauses.ports;
        tokens
            .iter()
            .copied()
            .filter(|token| !ports.get(token).is_some_and(|port| port.waiter))
            .collect()
    }

    /// The port `token` closed: it has no owner any more.
    fn disown(&mut self, token: Token) {
        if !self.owners.is_empty() {
            self.owner_unpaused(token);
            self.owners.remove(&token);
        }
    }

    /// How many ports have an owner mailbox known to the budget (for the tests).
    pub fn owned_ports(&self) -> usize {
        self.owners.len()
    }

    /// Store the count of paused ports where a status reads it ([`Charges::paused_ports`]).
    fn publish_pauses(&self) {
        let paused = self.pauses.ports.len() as u64;
        self.charges.paused_ports.store(paused, Ordering::Relaxed);
    }

    /// A framed port's framer went from holding `before` to `after` bytes over one read
    /// (`after` is 0 after a framing error).  Charged as framing bytes; an error if the
    /// framer now holds more than `port_buffer_limit` (the I/O thread then tells the owner
    /// `ENOBUFS` and closes the port, which releases the bytes).
    pub fn framer_holds(
        &mut self,
        flow: &mut ReceiveFlow,
        before: usize,
        after: usize,
    ) -> Result<(), BufferLimitExceeded> {
        let (before, after) = (before as u64, after as u64);
        let charges = &self.charges;
        charges.set_framing((charges.framing() + after).saturating_sub(before));
        self.headroom -= after as i64 - before as i64;
        if before != after && self.limit.is_some() {
            // A packet started, grew, or ended: a hash update per such read, none for a
            // read of whole packets (the common case of small ones).
            let token = flow.token();
            self.unfinished_total = (self.unfinished_total + after).saturating_sub(before);
            if after == 0 {
                self.unfinished.remove(&token);
            } else {
                self.unfinished.insert(token, after);
            }
        }
        flow.peak_buffered = flow.peak_buffered.max(after);
        match self.port_buffer_limit {
            Some(limit) if after > limit => Err(BufferLimitExceeded { limit, size: after }),
            _ => Ok(()),
        }
    }

    /// After [`Budget::begin_round`]: the port to fail so that the budget makes progress
    /// again, with the unfinished bytes it holds, if the budget is stalled on unfinished
    /// packets ("Progress" in the module's docs).  That is: a port whose owner waits
    /// cannot read, even into the reserve (a reserve waiter is paused, and less than a
    /// read of headroom is left), and the bytes framers hold of packets not yet whole
    /// leave no room for a read by themselves - were every other charge freed, no read
    /// would fit, so nothing an owner or a peer does can end the stall.  The victim is the
    /// port holding the most of them (the lowest token among equals).  O(1) when there
    /// is no stall (every round that pauses ports); O(ports holding unfinished bytes) at
    /// a stall.  The caller fails the port ([`Budget::failed_for_progress`], then its
    /// close), runs [`Budget::begin_round`] again, and asks again.
    pub fn stall_victim(&self) -> Option<(Token, Stalled)> {
        let limit = self.limit?;
        let read = self.read_size as i64;
        if self.pauses.live_waiters == 0
            || self.headroom >= read
            || limit as i64 - self.unfinished_total as i64 >= read
        {
            return None;
        }
        let (&token, &size) = self
            .unfinished
            .iter()
            .max_by_key(|&(&token, &size)| (size, std::cmp::Reverse(token)))?;
        Some((token, Stalled { limit, size }))
    }

    /// The port `token`, a stall's victim ([`Budget::stall_victim`]), is failed: counted,
    /// and no longer a candidate (its close releases its bytes).
    pub fn failed_for_progress(&mut self, token: Token) {
        self.failed_ports += 1;
        self.unfinished_gone(token);
    }

    /// Bytes framers hold of packets not yet whole, now (all ports).
    pub fn unfinished_bytes(&self) -> u64 {
        self.unfinished_total
    }

    /// The port `token` no longer holds an unfinished packet (it closed).
    fn unfinished_gone(&mut self, token: Token) {
        if let Some(size) = self.unfinished.remove(&token) {
            self.unfinished_total = self.unfinished_total.saturating_sub(size);
        }
    }

    /// For handlers that read on their own (UDP): the bytes of input `flow` may read now.
    /// The streams' rule: ordinary reads leave the reserve untouched, reads for a waiting
    /// owner may use it, and no read may take the input charged past `memory_limit`.
    pub fn read_allowance(&self, flow: &ReceiveFlow) -> i64 {
        let Some(limit) = self.limit else {
            return UNLIMITED;
        };
        let headroom = limit as i64 - self.in_use();
        if self.owner_waits(flow) {
            headroom
        } else {
            headroom - self.reserve as i64
        }
    }

    /// For handlers paused by the budget: whether `flow` may read again - once the total
    /// is back at one half of the limit, or at once for a waiting owner when a read of
    /// `size` bytes fits in the reserve.
    pub fn budget_resumes(&self, flow: &ReceiveFlow, size: u64) -> bool {
        let Some(limit) = self.limit else {
            return true;
        };
        let used = self.in_use();
        used <= (limit / 2) as i64 || (limit as i64 - used >= size as i64 && self.owner_waits(flow))
    }
}

/// One port paused by the budget ([`Pauses::ports`]).
#[derive(Debug)]
struct PausedPort {
    /// The number of this pause: its entries in [`Pauses::order`] and
    /// [`Pauses::waiters`] carry it, and those of an earlier pause of the port (let go
    /// since) do not match it.
    pause: u64,
    window: Arc<Window>,
    /// Its owner waits: it is a reserve waiter (it has a live entry in `waiters`).
    waiter: bool,
}

/// The budget's pauses (the I/O thread's alone), each operation O(1) amortised however
/// many ports are paused: the set of paused ports is a map by token, and the two orders
/// that matter - the order ports paused in (they are let go in it at one half), and the
/// order reserve waiters came in (they are let in first, in it) - are lists whose
/// entries are left in place when their port is let go singly (`cmd_want`, a close, a
/// reserve waiter let in): an entry counts only while its pause number is the port's
/// current one.  Entries that no longer count are dropped by the pass that lets every
/// port go, or by a compaction once they outnumber those that count (so the lists stay
/// within twice the paused ports, plus a constant).  (The lists it replaced were
/// searched, and shifted, for each pause, `cmd_want` and close: O(n) each, O(n^2) for a
/// round pausing n ports.)
#[derive(Debug, Default)]
struct Pauses {
    ports: HashMap<Token, PausedPort>,
    /// `(token, pause number)` in the order the ports paused.
    order: Vec<(Token, u64)>,
    /// `(token, pause number)` of the reserve waiters, in the order they came.
    waiters: Vec<(Token, u64)>,
    /// Entries of `waiters` that count (ports paused as reserve waiters).
    live_waiters: usize,
    /// The last pause number given.
    last: u64,
    /// Entries of the lists visited, ever (see [`Budget::pause_steps`]).
    steps: u64,
}

/// Entries that do not count which a list may hold before it is compacted, whatever the
/// number that do.
const PAUSES_SLACK: usize = 64;

impl Pauses {
    /// Whether this entry counts: its port is paused, by this pause.
    fn counts(ports: &HashMap<Token, PausedPort>, (token, pause): (Token, u64)) -> bool {
        ports.get(&token).is_some_and(|port| port.pause == pause)
    }

    /// Pause `token` (its window `window`); false if it is paused already.
    fn pause(&mut self, token: Token, window: &Arc<Window>) -> bool {
        if self.ports.contains_key(&token) {
            return false;
        }
        self.last += 1;
        let pause = self.last;
        self.ports.insert(
            token,
            PausedPort {
                pause,
                window: Arc::clone(window),
                waiter: false,
            },
        );
        self.order.push((token, pause));
        self.steps += 1;
        true
    }

    /// The paused port `token`'s owner waits: a reserve waiter (once per pause).
    fn wait(&mut self, token: Token) {
        if let Some(port) = self.ports.get_mut(&token) {
            if !port.waiter {
                port.waiter = true;
                self.live_waiters += 1;
                self.waiters.push((token, port.pause));
                self.steps += 1;
            }
        }
    }

    /// Let `token` go alone (`cmd_want`, a close): its entries stop counting.
    fn forget(&mut self, token: Token) -> Option<PausedPort> {
        let port = self.ports.remove(&token)?;
        if port.waiter {
            self.live_waiters -= 1;
        }
        self.compact();
        Some(port)
    }

    /// One half: every paused port goes, in the order they paused.
    fn release_all(&mut self, resumed: &mut Vec<Token>) {
        self.steps += self.order.len() as u64;
        for (token, pause) in self.order.drain(..) {
            if Self::counts(&self.ports, (token, pause)) {
                if let Some(port) = self.ports.remove(&token) {
                    port.window.global_paused.store(false, Ordering::SeqCst);
                    resumed.push(token);
                }
            }
        }
        debug_assert!(self.ports.is_empty());
        self.ports.clear();
        self.waiters.clear();
        self.live_waiters = 0;
    }

    /// A read fits: the reserve waiters go, in the order they came.
    fn release_waiters(&mut self, resumed: &mut Vec<Token>) {
        let waiters = std::mem::take(&mut self.waiters);
        self.steps += waiters.len() as u64;
        for entry in waiters {
            if Self::counts(&self.ports, entry) {
                if let Some(port) = self.forget(entry.0) {
                    port.window.global_paused.store(false, Ordering::SeqCst);
                    resumed.push(entry.0);
                }
            }
        }
        self.live_waiters = 0;
    }

    /// Drop the entries that no longer count once they outnumber those that do: each
    /// compaction visits at most twice the entries it drops, and each entry is dropped
    /// once, so the cost is O(1) amortised per pause.
    fn compact(&mut self) {
        let ports = &self.ports;
        if self.order.len() > 2 * ports.len() + PAUSES_SLACK {
            self.steps += self.order.len() as u64;
            self.order.retain(|entry| Self::counts(ports, *entry));
        }
        if self.waiters.len() > 2 * self.live_waiters + PAUSES_SLACK {
            self.steps += self.waiters.len() as u64;
            self.waiters.retain(|entry| Self::counts(ports, *entry));
        }
    }
}

// -- one read of a framed port, end to end ---------------------------------------------------

/// What one read of a framed port comes to (see [`framed_read`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FramedRead {
    /// The read's messages: the packets the framer pushed (from the `first` index given),
    /// then [`FramedRead::error`] if there is one.
    pub count: usize,
    /// The first `deliver` of them go to the owner now, in order, each with its charge;
    /// the rest are held, with theirs, until a grant ([`ReceiveFlow::grant_held`]).
    /// When `deliver < count` the port holds packets and must stop reading
    /// ([`ReceiveFlow::may_read`] is now false), even if nothing was delivered.
    pub deliver: usize,
    /// A `Resp` protocol error: the read's last message, delivered (or held) as a
    /// packet, after which the framer ignores its input.
    pub error: Option<FrameError>,
    /// What to do after delivering (see [`ReceiveFlow::deliver`]); nothing if none was.
    pub delivered: Delivered,
}

/// Why a read closes its port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadFault {
    /// The peer broke the packet mode: the owner gets `Error(errno_name, ...)` with the
    /// error's text, then `Closed(errno_name)`; no packet of the read is delivered.
    Frame(FrameError),
    /// The framer holds more than `port_buffer_limit`: `Error("ENOBUFS", ...)`, then
    /// `Closed("ENOBUFS")`; no packet of the read is delivered.
    BufferLimit(BufferLimitExceeded),
}

/// The peer's end of file on a framed port: what its framer's unfinished bytes still
/// make ([`Framer::finish`]: a line port's last line, unterminated) is delivered as
/// [`framed_read`] delivers a read's packets, its bytes moving from the framer's charge to
/// the delivered one.  The socket is read only while the credit lets a packet through and
/// none is held, so it is delivered, not held (Python's `IOThread._deliver_rest`).
pub fn framed_eof(
    budget: &mut Budget,
    flow: &mut ReceiveFlow,
    framer: &mut Framer,
    packets: &mut Packets,
    charges: &mut Vec<u64>,
) -> FramedRead {
    let before = framer.buffered();
    let first = packets.len();
    framer.finish(packets);
    let after = framer.buffered();
    // Fewer bytes held: no limit can be passed.
    let _ = budget.framer_holds(flow, before, after);
    let count = packets.len() - first;
    if count == 0 {
        return FramedRead::default();
    }
    let start = charges.len();
    framer.charges(
        packets,
        first,
        false,
        before - after,
        flow.packet_overhead(),
        charges,
    );
    debug_assert_eq!(charges.len() - start, count); // one charge a message
    admit_and_deliver(budget, flow, &charges[start..], None)
}

/// The end of a framed read (or EOF) that produced messages charged `charges`, the last
/// one `error` if the framer failed: the credit decides how many are delivered now
/// ([`ReceiveFlow::admit`]), the rest are held, and the delivered are counted.
fn admit_and_deliver(
    budget: &mut Budget,
    flow: &mut ReceiveFlow,
    charges: &[u64],
    error: Option<FrameError>,
) -> FramedRead {
    let count = charges.len();
    let deliver = flow.admit(count);
    flow.hold(budget, &charges[deliver..]);
    let delivered = if deliver > 0 {
        flow.deliver(budget, &charges[..deliver])
    } else {
        Delivered::default()
    };
    FramedRead {
        count,
        deliver,
        error,
        delivered,
    }
}

/// One read of a framed port, as `IOThread._deliver_framed` does it: feed `input` to the
/// port's `framer` (its packets pushed to `packets`), charge what it holds, compute each
/// message's charge (pushed to `charges`, one per message), and let the active credit
/// decide what is delivered now and what is held.
///
/// On `Err`, the port is to be closed ([`ReceiveFlow::close`] releases what it holds);
/// the packets this call pushed are not to be delivered.  On `Ok`, the I/O thread
/// delivers the first [`FramedRead::deliver`] messages (after it put them in the loop's
/// inbox it has nothing more to count: this call counted them), holds the rest, then
/// acts on [`FramedRead::delivered`] (`Passive` after them, a pause).
pub fn framed_read(
    budget: &mut Budget,
    flow: &mut ReceiveFlow,
    framer: &mut Framer,
    input: &[u8],
    packets: &mut Packets,
    charges: &mut Vec<u64>,
) -> Result<FramedRead, ReadFault> {
    let before = framer.buffered();
    let first = packets.len();
    let error = match framer.feed(input, packets) {
        Ok(()) => None,
        Err(error) if framer.delivers_errors() => Some(error),
        Err(error) => {
            // A failed framer emptied itself: release what it held.
            let _ = budget.framer_holds(flow, before, framer.buffered());
            return Err(ReadFault::Frame(error));
        }
    };
    let after = framer.buffered();
    budget
        .framer_holds(flow, before, after)
        .map_err(ReadFault::BufferLimit)?;
    // A packet still arriving that could never be granted fails its port: its bytes and
    // the items walked so far already pass what the budget can give one message.  (Only
    // its bytes are charged to the budget while it arrives: its items are charged when
    // it is whole.  Charging them as they came let a few unfinished objects hold the
    // budget that their own completion needed, and every port of the server stopped
    // reading for good.)
    let cap = budget.message_cap();
    if let Some(cap) = cap {
        let pending = after as u64 + framer.pending_charge(flow.packet_overhead());
        if pending > cap {
            let error = FrameError::OverBudget {
                limit: cap,
                size: pending,
            };
            return Err(ReadFault::Frame(error));
        }
    }
    let count = packets.len() - first + usize::from(error.is_some());
    if count == 0 {
        return Ok(FramedRead::default());
    }
    let start = charges.len();
    let consumed = input.len() + before - after;
    framer.charges(
        packets,
        first,
        error.is_some(),
        consumed,
        flow.packet_overhead(),
        charges,
    );
    // And so does a message charged more than that (the same message, arrived in fewer
    // reads): none of the read's messages is delivered, as for a framing error.
    if let Some(cap) = cap {
        if let Some(&size) = charges[start..].iter().find(|&&charge| charge > cap) {
            charges.truncate(start);
            return Err(ReadFault::Frame(FrameError::OverBudget {
                limit: cap,
                size,
            }));
        }
    }
    debug_assert_eq!(charges.len() - start, count); // one charge a message
    Ok(admit_and_deliver(budget, flow, &charges[start..], error))
}
