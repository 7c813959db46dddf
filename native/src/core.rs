//! The native I/O thread: TCP streams and listeners, without the GIL.
//!
//! One OS thread owns every socket of a native I/O server.  It never takes the GIL: what it
//! gets from Python arrives as [`Command`]s through the command queue (a
//! [`WakeQueue`](crate::wakeup::WakeQueue), multi-producer), and what it tells Python leaves
//! as [`Event`]s, one `Vec` per loop per round, through that loop's inbox.  The loop's hub
//! turns a batch into `(port, message)` pairs under the GIL (`py.rs`, `Inbox.take`).
//!
//! Python references cross with the events and come back with them: a port's loop half is
//! a [`Target`] (an `Arc` around a `Py`), cloned into each event; the bytes of a send are a
//! [`HeldBytes`], handed back in an [`Event::Release`] once written.  Every one of them is
//! therefore dropped by a drain, under the GIL - the thread never touches a reference count
//! (except on the failure path, where PyO3's deferred pool takes them).
//!
//! The Python I/O half's rounds (UDP, ZeroMQ, TLS, the daemon's control endpoint...) run on
//! this thread too, under the GIL, when their epoll fd fires or their timer is due: the
//! `run_hosted` hook of each round and `hosted.rs`.  A round without Python work does not
//! take the GIL.
//!
//! Readiness comes from mio (epoll, edge-triggered).  Each socket is registered once, for
//! reading and writing, and the thread keeps what the edges said (`readable`): a port
//! that may not read now (passive, paused by its watermarks, not yet attached) simply is
//! not read, and is put back on the ready list when that changes.  One read of up to
//! [`READ_SIZE`] bytes per port per round, so one fast peer cannot starve the others; a
//! read that filled the buffer keeps the port on the ready list for the next round.
//!
//! Receive flow control is the watermark rule of `ioserver/_flow.py` with its pause
//! handshake, on atomics: the loop half writes `consumed_*` in its [`WindowShared`] and
//! then reads `pause_generation`; this thread bumps `pause_generation` and then re-reads
//! `consumed_*`.  All four are `SeqCst`, so whichever runs second sees the other's write
//! (the argument of `_flow.py`, with the total order of `SeqCst` operations standing for
//! CPython's sequential order).  `send_blocked`/`bytes_out` are the same pattern for
//! WRITABLE.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use pyo3::prelude::*;

use crate::hosted::{Hosted, HOSTED};
use crate::unsafe_io::HeldBytes;
use crate::wakeup::WakeQueue;

/// Bytes read from one socket at a time (as the Python I/O thread's `READ_SIZE`).
pub const READ_SIZE: usize = 65536;
/// Connections accepted per listener per round.
const ACCEPT_BATCH: usize = 64;
/// Buffers gathered into one `writev`.
const IOV_MAX: usize = 64;
/// References held for release (written buffers, closed ports' loop halves) before a
/// batch carries them back on its own.
const RELEASE_BATCH: usize = 256;
/// Bytes of written (or discarded) buffers held for release before a batch carries them
/// back on its own: what a loop that gets no other event keeps pinned is bounded by this
/// (plus the one buffer that passed it), not by the count alone (100 written 1 MiB sends
/// would otherwise stay pinned, 100 MiB, until the loop's next event).
const RELEASE_BYTES: u64 = 1 << 20;
/// How long the thread sleeps, at most, after handing a loop a batch: the loop defers the
/// wakes of its replies to its flush point, and this bounds that deferral when the flush is
/// late (a task blocked in synchronous code).
const FLUSH_WAIT: Duration = Duration::from_millis(2);
/// The token of the command queue's wake-up fd.
const WAKE: Token = Token(usize::MAX);

/// A Python object the thread refers to (a port's loop half, a waiting request), and,
/// for a listener, the function that makes each accepted connection's loop half.
pub struct PyTarget {
    /// The object events are delivered to.
    pub obj: Py<PyAny>,
    /// A listener's `make_port(conn, local, remote)`.
    pub make_port: Option<Py<PyAny>>,
}

/// A shared reference to a [`PyTarget`]; its last clone is dropped by a drain.
pub type Target = Arc<PyTarget>;

/// What waits to go back to one loop with its next batch.
#[derive(Default)]
struct Releases {
    /// Written or discarded buffers.
    bytes: Vec<HeldBytes>,
    /// Their total length, bytes.
    size: u64,
    /// Loop halves of closed ports (and targets the thread no longer needs).
    targets: Vec<Target>,
}

/// The loop half's side of a port's flow-control window (`ioserver._flow.Window`), as
/// atomics the I/O thread reads without the GIL.
#[derive(Default)]
pub struct WindowShared {
    /// Bytes of input the owner took.
    pub consumed_bytes: AtomicU64,
    /// Messages the owner took.
    pub consumed_messages: AtomicU64,
    /// Bytes the owner queued for output, ever.
    pub queued_bytes: AtomicU64,
    /// A sender waits for the output to drain below the low watermark.
    pub send_blocked: AtomicBool,
}

/// A port's watermarks (validated by `ioserver._options`).
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    /// Bytes delivered and not taken past which reading pauses.
    pub high: u64,
    /// ... and at or below which it resumes.
    pub low: u64,
    /// Messages delivered and not taken past which reading pauses.
    pub high_messages: u64,
    /// ... and at or below which it resumes (half the high one).
    pub low_messages: u64,
    /// Output below which a blocked sender is told WRITABLE.
    pub send_low: u64,
}

impl Flow {
    /// No limit (a listener's).
    pub const NONE: Flow = Flow {
        high: u64::MAX / 2,
        low: u64::MAX / 2,
        high_messages: u64::MAX / 2,
        low_messages: u64::MAX / 2,
        send_low: 0,
    };
}

/// A stream port's socket options and flow control, as the loop validated them.
#[derive(Clone, Copy, Debug)]
pub struct StreamOptions {
    /// `TCP_NODELAY`.
    pub nodelay: bool,
    /// `SO_KEEPALIVE`.
    pub keepalive: bool,
    /// `SO_RCVBUF`, bytes.
    pub recbuf: Option<usize>,
    /// `SO_SNDBUF`, bytes.
    pub sndbuf: Option<usize>,
    /// The watermarks.
    pub flow: Flow,
    /// The active credit (-1 unlimited, 0 passive, N) and whether to notify Passive.
    pub active: (i64, bool),
    /// The packet mode and `packet_size` (None: raw); modes whose packets are bytes only
    /// (1, 2, 4, line): the others decode objects in Python and are refused before.
    pub framing: Option<(crate::framing::Mode, usize)>,
}

/// The I/O half of one port, as its loop half reads it (`ioserver._contract.PortIO`):
/// counters only this thread writes.
pub struct ConnShared {
    /// Unique for the server's life (a slot is reused, an id is not).
    pub id: u64,
    /// The port table's slot (the mio token).
    pub slot: usize,
    /// The owning loop's inbox.
    pub inbox: usize,
    /// The watermarks (for `drained`).
    pub flow: Flow,
    /// The window, once the loop half is attached.
    pub window: OnceLock<Arc<WindowShared>>,
    /// Closed on the I/O side.
    pub closed: AtomicBool,
    /// Bytes read from the socket.
    pub bytes_in: AtomicU64,
    /// Bytes written to the socket.
    pub bytes_out: AtomicU64,
    /// Bytes queued and not written.
    pub out_bytes: AtomicU64,
    /// Bytes delivered to the loop half.
    pub delivered_bytes: AtomicU64,
    /// Messages delivered to the loop half.
    pub delivered_messages: AtomicU64,
    /// The current pause (the handshake of `ioserver/_flow.py`).
    pub pause_generation: AtomicU64,
    /// Pauses so far.
    pub pauses: AtomicU64,
    /// The most input ever buffered (delivered, not taken).
    pub peak_buffered: AtomicU64,
    /// Packets refused for exceeding `packet_size`.
    pub packets_too_large: AtomicU64,
    /// Bytes the framer holds (a packet not yet whole) and of packets held past the credit.
    pub framing_bytes: AtomicU64,
}

impl ConnShared {
    fn new(id: u64, slot: usize, inbox: usize, flow: Flow) -> Self {
        ConnShared {
            id,
            slot,
            inbox,
            flow,
            window: OnceLock::new(),
            closed: AtomicBool::new(false),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            out_bytes: AtomicU64::new(0),
            delivered_bytes: AtomicU64::new(0),
            delivered_messages: AtomicU64::new(0),
            pause_generation: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            peak_buffered: AtomicU64::new(0),
            packets_too_large: AtomicU64::new(0),
            framing_bytes: AtomicU64::new(0),
        }
    }

    /// What was delivered and not taken: `(bytes, messages)`.
    fn buffered(&self) -> (u64, u64) {
        match self.window.get() {
            None => (0, 0),
            Some(window) => (
                self.delivered_bytes
                    .load(Ordering::SeqCst)
                    .saturating_sub(window.consumed_bytes.load(Ordering::SeqCst)),
                self.delivered_messages
                    .load(Ordering::SeqCst)
                    .saturating_sub(window.consumed_messages.load(Ordering::SeqCst)),
            ),
        }
    }

    /// The owner took what was delivered down to the low watermarks.
    pub fn drained(&self) -> bool {
        let (bytes, messages) = self.buffered();
        bytes <= self.flow.low && messages <= self.flow.low_messages
    }

    fn over_high(&self) -> bool {
        let (bytes, messages) = self.buffered();
        bytes > self.flow.high || messages > self.flow.high_messages
    }
}

/// What a loop asks of the I/O thread.
pub enum Command {
    /// A loop's inbox (its index is the order of these commands).
    AddInbox(Arc<WakeQueue<Vec<Event>>>),
    /// Queue bytes for writing.
    Send(Arc<ConnShared>, HeldBytes),
    /// Close once the queued output is written.
    Close(Arc<ConnShared>),
    /// Half-close once the queued output is written.
    SendEof(Arc<ConnShared>),
    /// Apply an active mode `(credit, notify_passive)`.
    SetActive(Arc<ConnShared>, i64, bool),
    /// A passive port's receiver waits: one message.
    ReadOnce(Arc<ConnShared>),
    /// The owner took enough after the pause of this generation.
    Resume(Arc<ConnShared>, u64),
    /// An accepted connection's loop half is made: start reading for it.
    Attach(Arc<ConnShared>, Target),
    /// Connect a TCP socket (a numeric address) and answer the request.
    Connect {
        /// The waiting request.
        request: Target,
        /// The port's loop half.
        port: Target,
        /// Its window.
        window: Arc<WindowShared>,
        /// Its loop's inbox.
        inbox: usize,
        /// Where to.
        address: SocketAddr,
        /// Its options.
        options: StreamOptions,
    },
    /// Serve a listening socket Python bound, and answer the request.
    Listen {
        /// The waiting request.
        request: Target,
        /// The listener's loop half, with `make_port`.
        listener: Target,
        /// Its loop's inbox.
        inbox: usize,
        /// The socket, listening.
        socket: std::net::TcpListener,
        /// The options of each accepted connection.
        options: StreamOptions,
    },
    /// A Python function run for this port on the I/O thread (in the hosted half) raised:
    /// its owner gets `Closed(reason, "EIO")`, and the port is closed (the peer sees the end).
    Abort(Arc<ConnShared>, String),
    /// Close every port and end the thread.
    Stop,
    /// Panic in the thread (the tests' way to check that a failure is contained).
    Fail,
}

/// What the I/O thread tells a loop (built into messages by `Inbox.take`).
pub enum Event {
    /// Bytes read: `Data(bytes)`.
    Data(Target, Vec<u8>),
    /// The peer closed: `Closed("eof")`.
    Eof(Target),
    /// The connection broke with this errno: `Closed(name, name)`.
    Broken(Target, i32),
    /// The active count ran out: `Passive()`.
    Passive(Target),
    /// The output drained below the low watermark while a sender waited.
    Writable(Target),
    /// The peer broke the packet mode: `Error(name, errno, message)`, then
    /// `Closed(name, name)` (a [`Event::Broken`] follows).
    FrameError(Target, i32, String),
    /// A listener accepted a connection (its loop half is made in the drain).
    Accepted {
        /// The listener.
        listener: Target,
        /// The new connection's I/O half.
        conn: Arc<ConnShared>,
        /// Its local address.
        local: SocketAddr,
        /// The peer's.
        remote: SocketAddr,
    },
    /// An accept failed: `Error(name, errno, message)`.
    AcceptError(Target, i32),
    /// A connect succeeded: the request gets `(conn, local, remote)`.
    Connected {
        /// The waiting request.
        request: Target,
        /// The connection's I/O half.
        conn: Arc<ConnShared>,
        /// Its local address.
        local: SocketAddr,
        /// The peer's.
        remote: SocketAddr,
    },
    /// A connect failed: the request gets `ConnectError`.
    ConnectFailed(Target, i32, SocketAddr),
    /// A listener is served: the request gets `(conn, local, None)`.
    Listening(Target, Arc<ConnShared>, SocketAddr),
    /// Written buffers and references the thread no longer needs (closed ports), to be
    /// dropped under the GIL.
    Release(Vec<HeldBytes>, Vec<Target>),
    /// A port closed for an error while serving it: `Closed(reason, "EIO")`.
    Aborted(Target, String),
    /// What the hosted half (`hosted.rs`) delivered in a round: `(target, message)` pairs,
    /// built already.
    Hosted(Py<pyo3::types::PyList>),
    /// The thread stopped: the hub's stop notice.
    Stop,
}

/// What the I/O thread and the Python objects share: the command queue and the counters.
pub struct Shared {
    /// Commands from the loops.
    pub commands: WakeQueue<Command>,
    /// Rounds of the poller.
    pub polls: AtomicU64,
    /// Readiness events handled.
    pub events: AtomicU64,
    /// Commands run.
    pub commands_run: AtomicU64,
    /// Bytes read, all sockets.
    pub bytes_in: AtomicU64,
    /// Bytes written, all sockets.
    pub bytes_out: AtomicU64,
    /// Bytes delivered to the loops, all ports (for the memory in use).
    pub delivered_bytes: AtomicU64,
    /// Queued output dropped because its port closed or broke.
    pub bytes_discarded: AtomicU64,
    /// Bytes of written or discarded buffers the thread still holds (pinned until a drain
    /// drops them; part of the memory in use).
    pub bytes_held: AtomicU64,
    /// Sockets open now.
    pub ports_open: AtomicU64,
    /// Errors contained by closing the one port concerned (and the thread's own failure).
    pub internal_errors: AtomicU64,
    /// Why the thread failed, if it did (a panic's message).
    pub failure: Mutex<Option<String>>,
    /// The next `ConnShared.id`.
    pub next_id: AtomicU64,
    /// The thread is running (set before it starts, cleared as it ends).
    pub running: AtomicBool,
    /// The thread's OS id (Linux's `gettid`, as Python's `threading.get_native_id`), 0
    /// until it runs.
    pub thread_id: AtomicU64,
}

impl Shared {
    /// The shared state of a new server.
    pub fn new() -> io::Result<Self> {
        Ok(Shared {
            commands: WakeQueue::new()?,
            polls: AtomicU64::new(0),
            events: AtomicU64::new(0),
            commands_run: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            delivered_bytes: AtomicU64::new(0),
            bytes_discarded: AtomicU64::new(0),
            bytes_held: AtomicU64::new(0),
            ports_open: AtomicU64::new(0),
            internal_errors: AtomicU64::new(0),
            failure: Mutex::new(None),
            next_id: AtomicU64::new(1),
            running: AtomicBool::new(false),
            thread_id: AtomicU64::new(0),
        })
    }
}

struct Stream {
    sock: TcpStream,
    conn: Arc<ConnShared>,
    port: Option<Target>,
    window: Option<Arc<WindowShared>>,
    credit: i64,
    notify: bool,
    outq: VecDeque<HeldBytes>,
    /// Bytes of the first queued buffer already written.
    head: usize,
    out_bytes: u64,
    /// A connect in progress: the request to answer and the address.
    connecting: Option<(Target, SocketAddr)>,
    readable: bool,
    /// An edge said the peer closed or the connection failed: read until it is reported.
    hangup: bool,
    in_ready: bool,
    dirty: bool,
    read_eof: bool,
    write_closed: bool,
    shutdown_pending: bool,
    close_pending: bool,
    paused: bool,
    /// The port's framer (None: raw).
    framer: Option<crate::framing::Framer>,
    /// Packets decoded beyond the active credit, in order, for the next grants (the
    /// socket is not read while any is held: see `ioserver/_flow.py`, the active credit).
    held: VecDeque<Vec<u8>>,
}

struct Listener {
    sock: TcpListener,
    conn: Arc<ConnShared>,
    port: Target,
    options: StreamOptions,
    credit: i64,
    notify: bool,
    readable: bool,
    in_ready: bool,
    /// Out of descriptors: not accepting until a port closes.
    exhausted: bool,
}

enum Entry {
    Stream(Box<Stream>),
    Listener(Box<Listener>),
}

impl Entry {
    fn conn(&self) -> &Arc<ConnShared> {
        match self {
            Entry::Stream(s) => &s.conn,
            Entry::Listener(l) => &l.conn,
        }
    }
}

/// The I/O thread's state; [`IoThread::run`] is the thread.
pub struct IoThread {
    shared: Arc<Shared>,
    poll: Poll,
    table: Vec<Option<Entry>>,
    free: Vec<usize>,
    /// Slots freed this round, reusable from the next: this round's readiness events may
    /// still name them (a mio token is the bare slot, without a generation), and must not
    /// reach a socket that took the slot within the round (a sticky `hangup`, a stale
    /// `readable`).  Epoll forgets a closed socket, so the next round's events cannot.
    freed: Vec<usize>,
    inboxes: Vec<Arc<WakeQueue<Vec<Event>>>>,
    staged: Vec<Vec<Event>>,
    releases: Vec<Releases>,
    buffer: Vec<u8>,
    packets: crate::framing::Packets,
    ready: Vec<usize>,
    dirty: Vec<usize>,
    exhausted_listeners: Vec<usize>,
    stopping: bool,
    /// The Python I/O half this thread runs the rounds of (`hosted.rs`), if any.
    hosted: Option<Hosted>,
}

fn errno_of(error: &io::Error) -> i32 {
    error.raw_os_error().unwrap_or(libc::EIO)
}

fn apply_options(sock: &TcpStream, options: &StreamOptions) -> io::Result<()> {
    let socket = socket2::SockRef::from(sock);
    socket.set_nodelay(options.nodelay)?;
    if options.keepalive {
        socket.set_keepalive(true)?;
    }
    if let Some(size) = options.recbuf {
        socket.set_recv_buffer_size(size)?;
    }
    if let Some(size) = options.sndbuf {
        socket.set_send_buffer_size(size)?;
    }
    Ok(())
}

impl IoThread {
    /// A thread's state with a port table of `table_size` slots (from the fd limit).
    pub fn new(shared: Arc<Shared>, table_size: usize) -> io::Result<Self> {
        let poll = Poll::new()?;
        let fd = shared.commands.signal.fd();
        poll.registry()
            .register(&mut SourceFd(&fd), WAKE, Interest::READABLE)?;
        let size = table_size.clamp(64, 1 << 20);
        let mut table = Vec::with_capacity(size);
        table.resize_with(size, || None);
        Ok(IoThread {
            shared,
            poll,
            table,
            free: (0..size).rev().collect(),
            freed: Vec::new(),
            inboxes: Vec::new(),
            staged: Vec::new(),
            releases: Vec::new(),
            buffer: vec![0; READ_SIZE],
            packets: crate::framing::Packets::new(),
            ready: Vec::new(),
            dirty: Vec::new(),
            exhausted_listeners: Vec::new(),
            stopping: false,
            hosted: None,
        })
    }

    /// Run the rounds of `hosted` on this thread too (before the thread starts).
    pub fn host(&mut self, hosted: Hosted) -> io::Result<()> {
        hosted.register(self.poll.registry())?;
        self.hosted = Some(hosted);
        Ok(())
    }

    /// The thread: rounds until a stop command, then close everything.  A panic in a
    /// round is caught here: the thread records it, tells every port (`Closed("EIO")`)
    /// and every loop (its stop notice), and ends - it never unwinds into Python.
    pub fn run(mut self) {
        self.shared
            .thread_id
            .store(crate::hosted::thread_id(), Ordering::Relaxed);
        if self.hosted.is_some() {
            // Known to Python from start to end (one thread state), holding the GIL only
            // inside the hosted half's rounds and its stop (`hosted.rs`).
            Python::attach(|py| py.detach(|| self.run_and_shut_down()));
        } else {
            self.run_and_shut_down();
        }
        self.shared.running.store(false, Ordering::SeqCst);
    }

    fn run_and_shut_down(&mut self) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.rounds()));
        if let Err(panic) = result {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            if let Ok(mut failure) = self.shared.failure.lock() {
                *failure = Some(format!("the native I/O thread failed: {message}"));
            }
            self.shared.internal_errors.fetch_add(1, Ordering::Relaxed);
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.shutdown(Some(libc::EIO))
            }));
        } else {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.shutdown(None)));
        }
    }

    fn rounds(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut handed = false; // the last round handed a loop a batch
        while !self.stopping {
            // The slots freed last round: no event of a coming poll names them.
            self.free.append(&mut self.freed);
            let mut timeout = if !self.ready.is_empty() || !self.dirty.is_empty() {
                Some(Duration::ZERO)
            } else if self.shared.commands.prepare_to_sleep_for(handed) {
                handed.then_some(FLUSH_WAIT)
            } else {
                Some(Duration::ZERO)
            };
            if let Some(hosted) = &self.hosted {
                timeout = hosted.timeout(timeout);
            }
            if let Err(error) = self.poll.poll(&mut events, timeout) {
                if error.kind() != io::ErrorKind::Interrupted {
                    panic!("epoll_wait failed: {error}");
                }
            }
            self.shared.commands.woke();
            self.shared.polls.fetch_add(1, Ordering::Relaxed);
            self.run_commands();
            let mut count = 0;
            for event in events.iter() {
                count += 1;
                let token = event.token();
                if token == WAKE {
                    self.shared.commands.signal.drain();
                    continue;
                }
                if token == HOSTED {
                    if let Some(hosted) = &mut self.hosted {
                        hosted.fired();
                    }
                    continue;
                }
                let hangup = event.is_read_closed() || event.is_error();
                self.on_event(
                    token.0,
                    event.is_readable() || hangup,
                    event.is_writable() || event.is_error(),
                    hangup,
                );
            }
            self.shared.events.fetch_add(count, Ordering::Relaxed);
            self.read_ready();
            self.run_commands();
            self.run_hosted();
            // The loop gets this round's input before the writes: it works while we write.
            handed = self.publish(false);
            self.flush_dirty();
            handed |= self.publish(false);
        }
    }

    /// A round of the hosted half, if one is due (the only place a round takes the GIL).
    fn run_hosted(&mut self) {
        if let Some(hosted) = &mut self.hosted {
            if hosted.wants_round() {
                let mut failed = 0;
                hosted.run(&mut self.staged, &mut failed);
                if failed > 0 {
                    self.shared
                        .internal_errors
                        .fetch_add(failed, Ordering::Relaxed);
                }
            }
        }
    }

    // -- the table ---------------------------------------------------------------------

    fn allocate(&mut self) -> usize {
        match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.table.push(None);
                self.table.len() - 1
            }
        }
    }

    fn new_conn(&mut self, slot: usize, inbox: usize, flow: Flow) -> Arc<ConnShared> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        Arc::new(ConnShared::new(id, slot, inbox, flow))
    }

    /// Take the entry `conn` names out of the table (to act on it with `&mut self`);
    /// None if it is gone (closed, its slot reused).
    fn take(&mut self, conn: &ConnShared) -> Option<Entry> {
        match self.table.get_mut(conn.slot) {
            Some(slot) if slot.as_ref().is_some_and(|e| e.conn().id == conn.id) => slot.take(),
            _ => None,
        }
    }

    fn put(&mut self, entry: Entry) {
        let slot = entry.conn().slot;
        self.table[slot] = Some(entry);
    }

    fn stage(&mut self, inbox: usize, event: Event) {
        if let Some(staged) = self.staged.get_mut(inbox) {
            staged.push(event);
        }
    }

    /// Hand `target` back to its loop with the next batch (never a wake of its own: a
    /// loop is not woken only to drop references).
    fn release_target(&mut self, inbox: usize, target: Target) {
        if let Some(list) = self.releases.get_mut(inbox) {
            list.targets.push(target);
        }
    }

    /// Hand written `bytes` back to its loop with the next batch (or on their own, once
    /// [`RELEASE_BATCH`] references or [`RELEASE_BYTES`] bytes wait).  Counted in
    /// `Shared::bytes_held` (the memory in use) until a drain drops them.
    fn release_bytes(&mut self, inbox: usize, bytes: HeldBytes) {
        if let Some(list) = self.releases.get_mut(inbox) {
            let size = bytes.len() as u64;
            self.shared.bytes_held.fetch_add(size, Ordering::Relaxed);
            list.size += size;
            list.bytes.push(bytes);
        }
    }

    /// Hand each loop its batch (one push, at most one wake).  Released buffers ride with
    /// the next batch, or go on their own once there are many (or `force`).
    fn publish(&mut self, force: bool) -> bool {
        let mut handed = false;
        for index in 0..self.inboxes.len() {
            let pending = &self.releases[index];
            let releases = pending.bytes.len() + pending.targets.len();
            if self.staged[index].is_empty()
                && releases < RELEASE_BATCH
                && pending.size < RELEASE_BYTES
                && !force
            {
                continue;
            }
            if releases > 0 {
                let pending = std::mem::take(&mut self.releases[index]);
                self.staged[index].push(Event::Release(pending.bytes, pending.targets));
            }
            if !self.staged[index].is_empty() {
                let batch = std::mem::take(&mut self.staged[index]);
                self.inboxes[index].put(batch);
                handed = true;
            }
        }
        handed
    }

    // -- commands ----------------------------------------------------------------------

    fn run_commands(&mut self) {
        let mut count = 0;
        while let Some(command) = self.shared.commands.pop() {
            count += 1;
            self.command(command);
        }
        if count > 0 {
            self.shared.commands_run.fetch_add(count, Ordering::Relaxed);
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::AddInbox(inbox) => {
                self.inboxes.push(inbox);
                self.staged.push(Vec::new());
                self.releases.push(Releases::default());
            }
            Command::Send(conn, bytes) => match self.take(&conn) {
                Some(Entry::Stream(mut s))
                    if !(s.write_closed || s.shutdown_pending || s.close_pending) =>
                {
                    s.out_bytes += bytes.len() as u64;
                    s.conn.out_bytes.store(s.out_bytes, Ordering::Relaxed);
                    s.outq.push_back(bytes);
                    if !s.dirty && s.connecting.is_none() {
                        s.dirty = true;
                        self.dirty.push(s.conn.slot);
                    }
                    self.put(Entry::Stream(s));
                }
                other => {
                    if let Some(entry) = other {
                        self.put(entry);
                    }
                    self.shared
                        .bytes_discarded
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    self.release_bytes(conn.inbox, bytes);
                }
            },
            Command::Close(conn) => match self.take(&conn) {
                Some(Entry::Stream(mut s)) if !s.outq.is_empty() && s.connecting.is_none() => {
                    s.close_pending = true;
                    self.put(Entry::Stream(s));
                }
                Some(entry) => self.close(entry),
                None => {}
            },
            Command::Abort(conn, reason) => {
                if let Some(entry) = self.take(&conn) {
                    let port = match &entry {
                        Entry::Stream(s) => s.port.clone(),
                        Entry::Listener(l) => Some(l.port.clone()),
                    };
                    if let Some(port) = port {
                        self.stage(conn.inbox, Event::Aborted(port, reason));
                    }
                    self.close(entry);
                }
            }
            Command::SendEof(conn) => match self.take(&conn) {
                Some(Entry::Stream(mut s)) => {
                    if !(s.write_closed || s.shutdown_pending) {
                        if s.outq.is_empty() && s.connecting.is_none() {
                            if !self.shutdown_write(&mut s) {
                                return;
                            }
                        } else {
                            s.shutdown_pending = true;
                        }
                    }
                    self.put(Entry::Stream(s));
                }
                Some(entry) => self.put(entry),
                None => {}
            },
            Command::SetActive(conn, credit, notify) => match self.take(&conn) {
                Some(Entry::Stream(mut s)) => {
                    (s.credit, s.notify) = apply_active_mode(s.credit, s.notify, (credit, notify));
                    if s.notify && s.credit == 0 {
                        if let Some(port) = &s.port {
                            let port = port.clone();
                            self.stage(s.conn.inbox, Event::Passive(port));
                        }
                    }
                    if s.credit != 0 && !s.held.is_empty() {
                        self.deliver_held(&mut s);
                    }
                    self.schedule(&mut s);
                    self.put(Entry::Stream(s));
                }
                Some(Entry::Listener(mut l)) => {
                    (l.credit, l.notify) = apply_active_mode(l.credit, l.notify, (credit, notify));
                    if l.notify && l.credit == 0 {
                        let port = l.port.clone();
                        self.stage(l.conn.inbox, Event::Passive(port));
                    }
                    if l.credit != 0 && l.readable && !l.in_ready {
                        l.in_ready = true;
                        self.ready.push(l.conn.slot);
                    }
                    self.put(Entry::Listener(l));
                }
                None => {}
            },
            Command::ReadOnce(conn) => match self.take(&conn) {
                Some(Entry::Stream(mut s)) => {
                    if s.credit == 0 {
                        s.credit = 1;
                        s.notify = false;
                        if !s.held.is_empty() {
                            self.deliver_held(&mut s);
                        }
                        self.schedule(&mut s);
                    }
                    self.put(Entry::Stream(s));
                }
                Some(entry) => self.put(entry),
                None => {}
            },
            Command::Resume(conn, generation) => match self.take(&conn) {
                Some(Entry::Stream(mut s)) => {
                    if s.paused
                        && generation == s.conn.pause_generation.load(Ordering::SeqCst)
                        && s.conn.drained()
                    {
                        s.paused = false;
                        self.schedule(&mut s);
                    }
                    self.put(Entry::Stream(s));
                }
                Some(entry) => self.put(entry),
                None => {}
            },
            Command::Attach(conn, port) => match self.take(&conn) {
                Some(Entry::Stream(mut s)) => {
                    s.window = conn.window.get().cloned();
                    s.port = Some(port);
                    self.schedule(&mut s);
                    self.put(Entry::Stream(s));
                }
                other => {
                    if let Some(entry) = other {
                        self.put(entry);
                    }
                    self.release_target(conn.inbox, port);
                }
            },
            Command::Connect {
                request,
                port,
                window,
                inbox,
                address,
                options,
            } => self.connect(request, port, window, inbox, address, options),
            Command::Listen {
                request,
                listener,
                inbox,
                socket,
                options,
            } => self.listen(request, listener, inbox, socket, options),
            Command::Stop => self.stopping = true,
            Command::Fail => panic!("a failure asked for by a test (Core._fail_for_test)"),
        }
    }

    // -- streams -----------------------------------------------------------------------

    fn may_read(s: &Stream) -> bool {
        s.port.is_some()
            && s.connecting.is_none()
            && !s.read_eof
            && (s.close_pending || (s.credit != 0 && !s.paused && s.held.is_empty()))
    }

    /// Put `s` on the ready list if it may read and its socket said it is readable.
    fn schedule(&mut self, s: &mut Stream) {
        if s.readable && !s.in_ready && Self::may_read(s) {
            s.in_ready = true;
            self.ready.push(s.conn.slot);
        }
    }

    /// A readiness edge.  `hangup`: the peer closed or the connection failed - the read
    /// that reports it (0 bytes, or the errno) may come after a short read of the data that
    /// preceded it, with no edge of its own, so it is remembered (`Stream::hangup`).
    fn on_event(&mut self, slot: usize, readable: bool, writable: bool, hangup: bool) {
        match self.table.get_mut(slot).and_then(|e| e.take()) {
            Some(Entry::Stream(mut s)) => {
                // A connect in progress: answered when its socket is ready; kept while
                // it is still in progress, released (by finish_connect) if it failed.
                if s.connecting.is_some()
                    && (!(readable || writable) || !self.finish_connect(&mut s))
                {
                    if s.connecting.is_some() {
                        self.put(Entry::Stream(s));
                    }
                    return;
                }
                if readable {
                    s.readable = true;
                    s.hangup |= hangup;
                    self.schedule(&mut s);
                }
                if writable && !s.outq.is_empty() && !s.dirty {
                    s.dirty = true;
                    self.dirty.push(slot);
                }
                self.put(Entry::Stream(s));
            }
            Some(Entry::Listener(mut l)) => {
                if readable {
                    l.readable = true;
                    if l.credit != 0 && !l.in_ready && !l.exhausted {
                        l.in_ready = true;
                        self.ready.push(slot);
                    }
                }
                self.put(Entry::Listener(l));
            }
            None => {}
        }
    }

    fn read_ready(&mut self) {
        let ready = std::mem::take(&mut self.ready);
        for slot in ready {
            match self.table.get_mut(slot).and_then(|e| e.take()) {
                Some(Entry::Stream(mut s)) => {
                    s.in_ready = false;
                    // read() returns false when it closed the port: then it is gone.
                    if !(Self::may_read(&s) && s.readable) || self.read(&mut s) {
                        self.put(Entry::Stream(s));
                    }
                }
                Some(Entry::Listener(mut l)) => {
                    l.in_ready = false;
                    self.accept(&mut l);
                    self.put(Entry::Listener(l));
                }
                None => {}
            }
        }
    }

    /// One read; false if the port was closed.
    fn read(&mut self, s: &mut Stream) -> bool {
        let result = (&s.sock).read(&mut self.buffer);
        match result {
            Ok(0) => {
                s.readable = false;
                s.read_eof = true;
                if !s.close_pending {
                    if let Some(port) = &s.port {
                        let port = port.clone();
                        self.stage(s.conn.inbox, Event::Eof(port));
                    }
                }
                // A close pending still flushes what is queued (the peer's half-close
                // ends its sending, not its reading: `_iothread._eof`); write() closes the
                // port once the queue is empty.
                if s.write_closed || (s.close_pending && s.outq.is_empty()) {
                    self.close_stream(s);
                    return false;
                }
                true
            }
            Ok(n) => {
                s.conn.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                self.shared.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                if n == self.buffer.len() || s.hangup {
                    // Maybe more, or the end is still to be read (it has no edge of its
                    // own after this read): read again next round (others first).
                    s.in_ready = true;
                    self.ready.push(s.conn.slot);
                } else {
                    // Drained: the next arrival is a new edge.
                    s.readable = false;
                }
                if s.close_pending {
                    return true; // closing: what arrives is dropped
                }
                let Some(port) = s.port.clone() else {
                    return true;
                };
                if s.framer.is_some() {
                    return self.read_framed(s, port, n);
                }
                self.stage(s.conn.inbox, Event::Data(port, self.buffer[..n].to_vec()));
                // Counted after the event is staged, before the check: the loop's
                // handshake reads them after the consumed counters it wrote.
                s.conn.delivered_bytes.fetch_add(n as u64, Ordering::SeqCst);
                s.conn.delivered_messages.fetch_add(1, Ordering::SeqCst);
                self.shared
                    .delivered_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                if s.credit > 0 {
                    s.credit -= 1;
                    if s.credit == 0 && s.notify {
                        if let Some(port) = &s.port {
                            let port = port.clone();
                            self.stage(s.conn.inbox, Event::Passive(port));
                        }
                    }
                }
                if s.conn.over_high() {
                    self.pause(s);
                }
                true
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                s.readable = false;
                true
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {
                s.in_ready = true;
                self.ready.push(s.conn.slot);
                true
            }
            Err(error) => {
                self.broken(s, errno_of(&error));
                false
            }
        }
    }

    /// Feed a read of `n` bytes to the port's framer and deliver its whole packets as far
    /// as the active credit goes (the rest are held); false if the port was closed for a
    /// framing error (`Error`, then `Closed`, as the Python core does).
    fn read_framed(&mut self, s: &mut Stream, port: Target, n: usize) -> bool {
        let Some(framer) = s.framer.as_mut() else {
            return true;
        };
        self.packets.clear();
        if let Err(error) = framer.feed(&self.buffer[..n], &mut self.packets) {
            let errno = match error {
                crate::framing::FrameError::TooLarge { .. } => {
                    s.conn.packets_too_large.fetch_add(1, Ordering::Relaxed);
                    libc::EMSGSIZE
                }
                crate::framing::FrameError::Malformed(_) => libc::EPROTO,
            };
            self.stage(
                s.conn.inbox,
                Event::FrameError(port, errno, error.to_string()),
            );
            self.broken(s, errno);
            return false;
        }
        let mut payloads = Vec::with_capacity(self.packets.len());
        for packet in self.packets.iter() {
            if let crate::framing::Packet::Bytes(bytes) = packet {
                payloads.push(bytes.to_vec());
            }
        }
        for payload in payloads {
            if s.credit == 0 {
                s.held.push_back(payload);
            } else {
                self.deliver_packet(s, &port, payload);
            }
        }
        self.note_framing(s);
        if s.conn.over_high() {
            self.pause(s);
        }
        true
    }

    /// Deliver one packet and spend a credit.
    fn deliver_packet(&mut self, s: &mut Stream, port: &Target, payload: Vec<u8>) {
        let size = payload.len() as u64;
        self.stage(s.conn.inbox, Event::Data(port.clone(), payload));
        s.conn.delivered_bytes.fetch_add(size, Ordering::SeqCst);
        s.conn.delivered_messages.fetch_add(1, Ordering::SeqCst);
        self.shared
            .delivered_bytes
            .fetch_add(size, Ordering::Relaxed);
        if s.credit > 0 {
            s.credit -= 1;
            if s.credit == 0 && s.notify {
                self.stage(s.conn.inbox, Event::Passive(port.clone()));
            }
        }
    }

    /// A grant came (an active mode, a passive read): held packets first, as far as the
    /// credit goes; the socket is read again only once none is held.
    fn deliver_held(&mut self, s: &mut Stream) {
        let Some(port) = s.port.clone() else { return };
        while s.credit != 0 {
            let Some(payload) = s.held.pop_front() else {
                break;
            };
            self.deliver_packet(s, &port, payload);
        }
        self.note_framing(s);
        if s.conn.over_high() {
            self.pause(s);
        }
    }

    fn note_framing(&mut self, s: &mut Stream) {
        let framer = s.framer.as_ref().map_or(0, |f| f.buffered());
        let held: usize = s.held.iter().map(Vec::len).sum();
        let total = (framer + held) as u64;
        s.conn.framing_bytes.store(total, Ordering::Relaxed);
        s.conn.peak_buffered.fetch_max(total, Ordering::Relaxed);
    }

    /// Step 1 of the pause handshake (`ioserver/_flow.py`): pause, bump the generation,
    /// then re-read the window; resume at once if the owner took enough meanwhile.
    fn pause(&mut self, s: &mut Stream) {
        let (bytes, _) = s.conn.buffered();
        s.conn.peak_buffered.fetch_max(bytes, Ordering::Relaxed);
        if s.paused {
            return;
        }
        s.paused = true;
        s.conn.pauses.fetch_add(1, Ordering::Relaxed);
        s.conn.pause_generation.fetch_add(1, Ordering::SeqCst);
        if s.conn.drained() {
            s.paused = false;
        }
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for slot in dirty {
            match self.table.get_mut(slot).and_then(|e| e.take()) {
                Some(Entry::Stream(mut s)) => {
                    s.dirty = false;
                    if self.write(&mut s) {
                        self.put(Entry::Stream(s));
                    }
                }
                Some(entry) => self.put(entry),
                None => {}
            }
        }
    }

    /// Write the queued output, gathered, until it is all written or the socket is full;
    /// false if the port was closed.
    fn write(&mut self, s: &mut Stream) -> bool {
        let mut total = 0u64;
        while !s.outq.is_empty() {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(s.outq.len().min(IOV_MAX));
            let mut wanted = 0usize;
            for (index, bytes) in s.outq.iter().take(IOV_MAX).enumerate() {
                let slice = if index == 0 {
                    &bytes.as_slice()[s.head..]
                } else {
                    bytes.as_slice()
                };
                wanted += slice.len();
                slices.push(IoSlice::new(slice));
            }
            let result = (&s.sock).write_vectored(&slices);
            drop(slices);
            match result {
                Ok(sent) => {
                    total += sent as u64;
                    self.consume_output(s, sent);
                    if sent < wanted {
                        break; // the socket is full: its writable edge comes later
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    self.broken(s, errno_of(&error));
                    return false;
                }
            }
        }
        if total > 0 {
            // bytes_out before send_blocked: the loop writes send_blocked, then reads
            // bytes_out (the WRITABLE handshake; all SeqCst).
            let out = s.conn.bytes_out.fetch_add(total, Ordering::SeqCst) + total;
            self.shared.bytes_out.fetch_add(total, Ordering::Relaxed);
            s.conn.out_bytes.store(s.out_bytes, Ordering::Relaxed);
            if let (Some(window), Some(port)) = (&s.window, &s.port) {
                if window.send_blocked.load(Ordering::SeqCst)
                    && window
                        .queued_bytes
                        .load(Ordering::SeqCst)
                        .saturating_sub(out)
                        <= s.conn.flow.send_low
                {
                    let port = port.clone();
                    self.stage(s.conn.inbox, Event::Writable(port));
                }
            }
        }
        if s.outq.is_empty() {
            if s.close_pending {
                self.close_stream(s);
                return false;
            }
            if s.shutdown_pending && !self.shutdown_write(s) {
                return false;
            }
        }
        true
    }

    /// Pop what a write of `sent` bytes took from the queue, and every zero-length buffer
    /// at its head (a write of nothing returns 0: such a head must not stall the loop).
    fn consume_output(&mut self, s: &mut Stream, mut sent: usize) {
        s.out_bytes -= sent as u64;
        while let Some(first) = s.outq.front() {
            let left = first.len() - s.head;
            if left == 0 || (sent > 0 && sent >= left) {
                sent -= left;
                s.head = 0;
                if let Some(done) = s.outq.pop_front() {
                    self.release_bytes(s.conn.inbox, done);
                }
            } else {
                s.head += sent;
                break;
            }
        }
    }

    /// Half-close; false if the port was closed (it failed, or both sides are done).
    fn shutdown_write(&mut self, s: &mut Stream) -> bool {
        s.shutdown_pending = false;
        s.write_closed = true;
        if let Err(error) = s.sock.shutdown(Shutdown::Write) {
            self.broken(s, errno_of(&error));
            return false;
        }
        if s.read_eof {
            self.close_stream(s);
            return false;
        }
        true
    }

    /// The connection failed: tell the owner `Closed(name, name)` and release it.
    fn broken(&mut self, s: &mut Stream, errno: i32) {
        if let Some(port) = &s.port {
            if !s.close_pending {
                let port = port.clone();
                self.stage(s.conn.inbox, Event::Broken(port, errno));
            }
        }
        self.close_stream(s);
    }

    /// Release a stream's socket and slot (the caller does not put it back).
    fn close_stream(&mut self, s: &mut Stream) {
        s.conn.closed.store(true, Ordering::SeqCst);
        let _ = self.poll.registry().deregister(&mut s.sock);
        // The socket closes when the entry is dropped; what it holds goes back to Python.
        let inbox = s.conn.inbox;
        self.shared
            .bytes_discarded
            .fetch_add(s.out_bytes, Ordering::Relaxed);
        while let Some(bytes) = s.outq.pop_front() {
            self.release_bytes(inbox, bytes);
        }
        s.out_bytes = 0;
        s.conn.out_bytes.store(0, Ordering::Relaxed);
        s.held.clear();
        s.framer = None;
        s.conn.framing_bytes.store(0, Ordering::Relaxed);
        if let Some(port) = s.port.take() {
            self.release_target(inbox, port);
        }
        if let Some((request, address)) = s.connecting.take() {
            // Closed before it connected (the server stops): the request gets its answer.
            self.stage(
                inbox,
                Event::ConnectFailed(request, libc::ECANCELED, address),
            );
        }
        self.free_slot(s.conn.slot);
    }

    fn free_slot(&mut self, slot: usize) {
        self.freed.push(slot);
        self.shared.ports_open.fetch_sub(1, Ordering::Relaxed);
        // A descriptor was freed: listeners that ran out of them may accept again.
        for slot in std::mem::take(&mut self.exhausted_listeners) {
            if let Some(Some(Entry::Listener(l))) = self.table.get_mut(slot) {
                l.exhausted = false;
                if l.credit != 0 && !l.in_ready {
                    l.in_ready = true;
                    self.ready.push(slot);
                }
            }
        }
    }

    fn close(&mut self, entry: Entry) {
        match entry {
            Entry::Stream(mut s) => self.close_stream(&mut s),
            Entry::Listener(mut l) => {
                l.conn.closed.store(true, Ordering::SeqCst);
                let _ = self.poll.registry().deregister(&mut l.sock);
                let inbox = l.conn.inbox;
                let slot = l.conn.slot;
                self.release_target(inbox, l.port.clone());
                drop(l);
                self.free_slot(slot);
            }
        }
    }

    // -- connect -----------------------------------------------------------------------

    fn connect(
        &mut self,
        request: Target,
        port: Target,
        window: Arc<WindowShared>,
        inbox: usize,
        address: SocketAddr,
        options: StreamOptions,
    ) {
        let made = (|| -> io::Result<(socket2::Socket, bool)> {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(address),
                socket2::Type::STREAM,
                None,
            )?;
            socket.set_nonblocking(true)?;
            socket.set_cloexec(true)?;
            match socket.connect(&address.into()) {
                Ok(()) => Ok((socket, true)),
                Err(error)
                    if error.raw_os_error() == Some(libc::EINPROGRESS)
                        || error.kind() == io::ErrorKind::WouldBlock =>
                {
                    Ok((socket, false))
                }
                Err(error) => Err(error),
            }
        })();
        let (socket, done) = match made {
            Ok(made) => made,
            Err(error) => {
                self.stage(
                    inbox,
                    Event::ConnectFailed(request, errno_of(&error), address),
                );
                self.release_target(inbox, port);
                return;
            }
        };
        let mut sock = TcpStream::from_std(std::net::TcpStream::from(socket));
        if let Err(error) = apply_options(&sock, &options) {
            self.stage(
                inbox,
                Event::ConnectFailed(request, errno_of(&error), address),
            );
            self.release_target(inbox, port);
            return;
        }
        let slot = self.allocate();
        if let Err(error) = self.poll.registry().register(
            &mut sock,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(slot);
            self.stage(
                inbox,
                Event::ConnectFailed(request, errno_of(&error), address),
            );
            self.release_target(inbox, port);
            return;
        }
        self.shared.ports_open.fetch_add(1, Ordering::Relaxed);
        let conn = self.new_conn(slot, inbox, options.flow);
        let _ = conn.window.set(window.clone());
        let mut s = Box::new(Stream {
            sock,
            conn,
            port: Some(port),
            window: Some(window),
            credit: options.active.0,
            notify: options.active.1,
            outq: VecDeque::new(),
            head: 0,
            out_bytes: 0,
            connecting: Some((request, address)),
            readable: false,
            hangup: false,
            in_ready: false,
            dirty: false,
            read_eof: false,
            write_closed: false,
            shutdown_pending: false,
            close_pending: false,
            paused: false,
            framer: options
                .framing
                .and_then(|(mode, size)| crate::framing::Framer::new(mode, size).ok()),
            held: VecDeque::new(),
        });
        if done && !self.finish_connect(&mut s) {
            return;
        }
        self.put(Entry::Stream(s));
    }

    /// A connecting socket became ready: answer its request.  False if the connect failed
    /// (the port is released) or is still in progress (the caller keeps the entry).
    fn finish_connect(&mut self, s: &mut Stream) -> bool {
        let failed = match s.sock.take_error() {
            Ok(Some(error)) => Some(errno_of(&error)),
            Err(error) => Some(errno_of(&error)),
            Ok(None) => match s.sock.peer_addr() {
                Ok(_) => None,
                Err(error) if error.kind() == io::ErrorKind::NotConnected => return false,
                Err(error) => Some(errno_of(&error)),
            },
        };
        let Some((request, address)) = s.connecting.take() else {
            return true;
        };
        let inbox = s.conn.inbox;
        if let Some(errno) = failed {
            self.stage(inbox, Event::ConnectFailed(request, errno, address));
            if let Some(port) = s.port.take() {
                self.release_target(inbox, port);
            }
            self.close_stream(s);
            return false;
        }
        let local = s.sock.local_addr();
        let remote = s.sock.peer_addr();
        match (local, remote) {
            (Ok(local), Ok(remote)) => {
                let conn = s.conn.clone();
                self.stage(
                    inbox,
                    Event::Connected {
                        request,
                        conn,
                        local,
                        remote,
                    },
                );
            }
            (Err(error), _) | (_, Err(error)) => {
                self.stage(
                    inbox,
                    Event::ConnectFailed(request, errno_of(&error), address),
                );
                if let Some(port) = s.port.take() {
                    self.release_target(inbox, port);
                }
                self.close_stream(s);
                return false;
            }
        }
        if !s.outq.is_empty() && !s.dirty {
            s.dirty = true;
            self.dirty.push(s.conn.slot);
        }
        true
    }

    // -- listen and accept -------------------------------------------------------------

    fn listen(
        &mut self,
        request: Target,
        listener: Target,
        inbox: usize,
        socket: std::net::TcpListener,
        options: StreamOptions,
    ) {
        let local = socket.local_addr();
        let mut sock = TcpListener::from_std(socket);
        let slot = self.allocate();
        let registered = self
            .poll
            .registry()
            .register(&mut sock, Token(slot), Interest::READABLE);
        let local = match (registered, local) {
            (Ok(()), Ok(local)) => local,
            (Err(error), _) | (_, Err(error)) => {
                self.free.push(slot);
                let address = SocketAddr::from(([0, 0, 0, 0], 0));
                self.stage(
                    inbox,
                    Event::ConnectFailed(request, errno_of(&error), address),
                );
                self.release_target(inbox, listener);
                return;
            }
        };
        self.shared.ports_open.fetch_add(1, Ordering::Relaxed);
        let conn = self.new_conn(slot, inbox, Flow::NONE);
        self.stage(inbox, Event::Listening(request, conn.clone(), local));
        self.put(Entry::Listener(Box::new(Listener {
            sock,
            conn,
            port: listener,
            options,
            credit: -1,
            notify: false,
            readable: false,
            in_ready: false,
            exhausted: false,
        })));
    }

    fn accept(&mut self, l: &mut Listener) {
        let inbox = l.conn.inbox;
        for _ in 0..ACCEPT_BATCH {
            if l.credit == 0 || l.exhausted {
                return;
            }
            let (mut sock, remote) = match l.sock.accept() {
                Ok(accepted) => accepted,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    l.readable = false;
                    return;
                }
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::ECONNABORTED | libc::EPROTO | libc::EINTR)
                    ) =>
                {
                    continue
                }
                Err(error) => {
                    let errno = errno_of(&error);
                    self.stage(inbox, Event::AcceptError(l.port.clone(), errno));
                    if matches!(
                        errno,
                        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
                    ) {
                        l.exhausted = true;
                        self.exhausted_listeners.push(l.conn.slot);
                    }
                    return;
                }
            };
            if apply_options(&sock, &l.options).is_err() {
                continue; // the peer is already gone (reset before we looked)
            }
            let Ok(local) = sock.local_addr() else {
                continue;
            };
            let slot = self.allocate();
            if self
                .poll
                .registry()
                .register(
                    &mut sock,
                    Token(slot),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                self.free.push(slot);
                continue;
            }
            self.shared.ports_open.fetch_add(1, Ordering::Relaxed);
            let conn = self.new_conn(slot, inbox, l.options.flow);
            self.stage(
                inbox,
                Event::Accepted {
                    listener: l.port.clone(),
                    conn: conn.clone(),
                    local,
                    remote,
                },
            );
            self.put(Entry::Stream(Box::new(Stream {
                sock,
                conn,
                port: None,
                window: None,
                credit: l.options.active.0,
                notify: l.options.active.1,
                outq: VecDeque::new(),
                head: 0,
                out_bytes: 0,
                connecting: None,
                // Not readable until an edge says so: epoll reports data already there when
                // the socket is registered.  (Assuming it readable would let a read land
                // between the round's commands and a command its owner queued before its
                // peer sent - an active mode set just after the accept would come late.)
                readable: false,
                hangup: false,
                in_ready: false,
                dirty: false,
                read_eof: false,
                write_closed: false,
                shutdown_pending: false,
                close_pending: false,
                paused: false,
                framer: l
                    .options
                    .framing
                    .and_then(|(mode, size)| crate::framing::Framer::new(mode, size).ok()),
                held: VecDeque::new(),
            })));
            if l.credit > 0 {
                l.credit -= 1;
                if l.credit == 0 && l.notify {
                    self.stage(inbox, Event::Passive(l.port.clone()));
                }
            }
        }
        // The batch is spent: accept the rest next round.
        if !l.in_ready {
            l.in_ready = true;
            self.ready.push(l.conn.slot);
        }
    }

    // -- stop --------------------------------------------------------------------------

    /// Close every port (with `Closed(errno)` to each owner when the thread failed), and
    /// give every loop its stop notice.
    fn shutdown(&mut self, errno: Option<i32>) {
        // Commands still queued carry references: hand them back too.
        while let Some(command) = self.shared.commands.pop() {
            self.discard(command);
        }
        // The hosted half first: its ports' Closed, then the native ports', then the notice.
        if let Some(hosted) = &mut self.hosted {
            let mut failed = 0;
            hosted.stop(&mut self.staged, &mut failed);
            if failed > 0 {
                self.shared
                    .internal_errors
                    .fetch_add(failed, Ordering::Relaxed);
            }
        }
        for slot in 0..self.table.len() {
            if let Some(entry) = self.table[slot].take() {
                match entry {
                    Entry::Stream(mut s) => match errno {
                        Some(errno) => self.broken(&mut s, errno),
                        None => self.close_stream(&mut s),
                    },
                    listener => self.close(listener),
                }
            }
        }
        for index in 0..self.inboxes.len() {
            self.staged[index].push(Event::Stop);
        }
        self.publish(true);
    }

    fn discard(&mut self, command: Command) {
        match command {
            Command::AddInbox(inbox) => {
                self.inboxes.push(inbox);
                self.staged.push(Vec::new());
                self.releases.push(Releases::default());
            }
            Command::Send(conn, bytes) => {
                self.shared
                    .bytes_discarded
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                self.release_bytes(conn.inbox, bytes)
            }
            Command::Attach(conn, port) => self.release_target(conn.inbox, port),
            Command::Connect {
                request,
                port,
                inbox,
                address,
                ..
            } => {
                self.stage(
                    inbox,
                    Event::ConnectFailed(request, libc::ECANCELED, address),
                );
                self.release_target(inbox, port);
            }
            Command::Listen {
                request,
                listener,
                inbox,
                ..
            } => {
                let address = SocketAddr::from(([0, 0, 0, 0], 0));
                self.stage(
                    inbox,
                    Event::ConnectFailed(request, libc::ECANCELED, address),
                );
                self.release_target(inbox, listener);
            }
            _ => {}
        }
    }
}

/// Erlang's rule for `inet:setopts(S, [{active, N}])` (as `ioserver._options.
/// apply_active_mode`): N adds to a running count; a count at or below 0 is passive.
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
