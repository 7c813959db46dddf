//! The native I/O thread: TCP and Unix streams and listeners, without the GIL.
//!
//! A stream's socket is either kind (`sock.rs`): what follows is the same for both.
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
//! The reads and writes themselves are made by one of two backends, chosen when the core
//! is made (`ioserver.open(io_backend=...)`): `epoll`, a `read`/`writev` syscall each, or
//! `io_uring`, all of a round's in one `io_uring_enter` (`uring.rs`).  Both run the same
//! code after the syscall ([`IoThread::after_read`], [`IoThread::after_write`]).
//!
//! Every receive flow-control decision is `flow.rs`'s (its module docs are the theory of
//! operation): each stream's [`ReceiveFlow`] (active credit, held packets, watermarks and
//! the pause handshake with the loop half, on the atomics of its [`flow::Window`]), and
//! the thread's [`Budget`] (`memory_limit`: the headroom once a round, the reserve for
//! waiting owners, the read size of framed ports, `cmd_want`, the unpause at one half;
//! `port_buffer_limit`).  This module only does what they say: it reads, delivers, holds,
//! stops and starts reading.  `send_blocked`/`bytes_out` are the handshake's pattern
//! (Dekker's, `SeqCst`) for WRITABLE: the loop writes `send_blocked` then reads
//! `bytes_out`; this thread writes `bytes_out` then reads `send_blocked`.
//!
//! `linger`: a closed stream whose queued output is not written within its `linger`
//! seconds is reset (`SO_LINGER {1, 0}`: an RST) and freed.  The deadlines are a list the
//! round checks; the poll sleeps no longer than the nearest.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, UnixListener};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use pyo3::prelude::*;

use crate::flow::{self, Budget, Charges, Delivered, LoopCounters, ReadFault, ReceiveFlow};
use crate::hosted::{Hosted, HOSTED};
use crate::sock::{Address, Destination, ListenSock, ListenSocket, Sock};
use crate::unsafe_io::HeldBytes;
use crate::wakeup::WakeQueue;

// The io_uring backend: a child module, so that it reaches the port table as this one does.
#[path = "uring.rs"]
pub mod uring;

/// Bytes read from one socket at a time (as the Python I/O thread's `READ_SIZE`).
pub const READ_SIZE: usize = flow::READ_SIZE;
/// Connections accepted per listener per round.
const ACCEPT_BATCH: usize = 64;
/// While a listener is out of descriptors (its accept failed with `EMFILE`, `ENFILE`,
/// `ENOBUFS` or `ENOMEM`), its accept is tried again this often, and whenever one of this
/// thread's ports closes: descriptors freed elsewhere in the process (the hosted half's
/// ports, the application's files, other threads) tell this thread nothing.  Ranch's
/// acceptors wait 100 ms after `{error, emfile}`; nginx retries after `accept_mutex_delay`
/// (500 ms).  One accept a listener per retry: no busy loop.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Buffers gathered into one `writev`.
const IOV_MAX: usize = 64;
/// References held for release (written buffers, closed ports' loop halves) before a
/// batch carries them back on its own.
const RELEASE_BATCH: usize = 256;
/// Bytes of written (or discarded) buffers held for release before a batch carries them
/// back on its own: what a loop that gets no other event keeps pinned is bounded by this
/// (plus the one buffer that passed it), not by the count alone (100 written 1 MiB sends
/// would otherwise stay pinned, 100 MiB, until the loop's next event).  64 KiB, a socket
/// read's worth: a loop woken to drop them once per 64 KiB written costs little beside the
/// writes, and a server streaming large chunks to a peer that stopped reading keeps no
/// more than that (and the last chunk) pinned beyond its send watermarks, as the Python
/// core, which drops each buffer once written, keeps none.
const RELEASE_BYTES: u64 = 64 << 10;
/// How long held buffers (and closed ports' loop halves) may wait for a batch to carry
/// them once the thread has nothing else to do: after this much idle time they go back
/// on their own, so that an idle server holds nothing for its loops and its
/// `memory_in_use` returns to what its ports hold (as on the Python core).  A busy thread
/// never waits this long, so it costs no wake while there is traffic.
const RELEASE_IDLE: Duration = Duration::from_millis(10);
/// How long the thread sleeps, at most, after handing a loop a batch: the loop defers the
/// wakes of its replies to its flush point, and this bounds that deferral when the flush is
/// late (a task blocked in synchronous code).
const FLUSH_WAIT: Duration = Duration::from_millis(2);
/// The next port id, for every server of the process: a `Conn` names its port by slot
/// and id, and ids unique across servers mean a `Conn` handed to another server's `Core`
/// names none of its ports (it is ignored as a closed port's).  `Relaxed`: a counter whose
/// only promise is that no two ports get the same value.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The token of the command queue's wake-up fd.
const WAKE: Token = Token(usize::MAX);

/// A Python object the thread refers to (a port's loop half, a waiting request), and,
/// for a listener, the function that makes each accepted connection's loop half.
pub struct PyTarget {
    /// The object events are delivered to.
    pub obj: Py<PyAny>,
    /// A port's flow-control window: the drain that hands the port a message marks its
    /// parked task woken ([`flow::Window::task_woken`]); and a port whose msgpack packet
    /// failed to decode is marked there ([`flow::Window::decode_failed`]).
    pub window: Option<Arc<flow::Window>>,
    /// What only a listener or a framed port has (boxed: every port has a target, and 24
    /// bytes make a 48-byte allocation with the `Arc`'s counts, where 40 made 64).
    pub extra: Option<Box<TargetExtra>>,
}

/// The part of a [`PyTarget`] that only some targets have.
pub enum TargetExtra {
    /// A listener's: how each accepted connection's loop half is made.
    Listener(MakePort),
    /// A framed port's `window.sizes.append`: the charge of each packet goes there before
    /// the packet (the port pops it as its owner takes the packet).
    Sizes(Py<PyAny>),
}

impl PyTarget {
    /// A listener's recipe for its accepted connections.
    pub fn make_port(&self) -> Option<&MakePort> {
        match self.extra.as_deref() {
            Some(TargetExtra::Listener(make_port)) => Some(make_port),
            _ => None,
        }
    }

    /// A framed port's `window.sizes.append`.
    pub fn sizes(&self) -> Option<&Py<PyAny>> {
        match self.extra.as_deref() {
            Some(TargetExtra::Sizes(sizes)) => Some(sizes),
            _ => None,
        }
    }

    /// A msgpack packet of this port failed to decode in its loop's drain: the drain told
    /// the owner (`Error`, then `Closed`) and drops what comes for the port after it.
    pub fn failed(&self) -> bool {
        self.window
            .as_ref()
            .is_some_and(|window| window.decode_failed())
    }
}

/// A listener's recipe for the loop half of each connection it accepts.
pub struct MakePort {
    /// `make_port(conn, local, remote)`.
    pub make: Py<PyAny>,
    /// The listener's receive watermarks: each accepted port's window is configured with
    /// them (by the drain, before the port's owner can use it).
    pub watermarks: flow::Watermarks,
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

impl Releases {
    /// Something waits to go back.
    fn is_pending(&self) -> bool {
        !self.bytes.is_empty() || !self.targets.is_empty()
    }
}

/// A port's watermarks (validated by `ioserver._options`).
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    /// The receive watermarks (`flow.rs` applies them).
    pub watermarks: flow::Watermarks,
    /// Output below which a blocked sender is told WRITABLE.
    pub send_low: u64,
}

impl Flow {
    /// No limit (a listener's).
    pub const NONE: Flow = Flow {
        watermarks: flow::Watermarks::NONE,
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
    /// The packet mode and `packet_size` (None: raw).  Every mode is framed here; a
    /// msgpack object's bytes are decoded by the drain, in Python ([`Payload::Msgpack`]).
    pub framing: Option<(crate::framing::Mode, usize)>,
    /// Seconds a close may take to write the queued output before the socket is reset
    /// (`linger`; None: no bound).
    pub linger: Option<Duration>,
}

/// The I/O half of one port, as its loop half reads it (`ioserver._contract.PortIO`):
/// counters only this thread writes.
///
/// Ordering: `bytes_out` is `SeqCst` (the WRITABLE handshake, see `write`), `closed` too
/// (a flag the loop reads; it needs no more than release/acquire);
/// the statistics (`pauses`, `msgq_paused`, `peak_buffered`, `framing_bytes`...) are
/// `Relaxed`: read for statistics and tests only, ordered with nothing else.  The flow
/// control's own atomics are in the port's window (`flow::Window`, with their arguments).
pub struct ConnShared {
    /// Unique for the server's life (a slot is reused, an id is not).
    pub id: u64,
    /// The port table's slot (the mio token).
    pub slot: usize,
    /// The owning loop's inbox (its index; `u32` to pack with the flags: 8 bytes less a
    /// port).
    inbox: u32,
    /// Output below which a blocked sender is told WRITABLE, bytes (`Flow::send_low`;
    /// the receive watermarks are the window's).
    pub send_low: u64,
    /// The window (`ioserver._flow.Window`: its receive and send sides), once the loop
    /// half is attached.
    pub window: OnceLock<Arc<flow::Window>>,
    /// Closed on the I/O side.
    pub closed: AtomicBool,
    /// Bytes read from the socket.
    pub bytes_in: AtomicU64,
    /// Bytes written to the socket.
    pub bytes_out: AtomicU64,
    /// Bytes queued and not written.
    pub out_bytes: AtomicU64,
    /// Pauses so far (the watermarks' and the budget's: `ReceiveFlow::pauses`).
    pub pauses: AtomicU64,
    /// Paused by the watermarks now (`ReceiveFlow::msgq_paused`, for statistics and tests).
    pub msgq_paused: AtomicBool,
    /// The most input ever buffered (delivered, not taken).
    pub peak_buffered: AtomicU64,
    /// Packets refused for exceeding `packet_size`.
    pub packets_too_large: AtomicU64,
    /// Bytes the framer holds (a packet not yet whole) and of packets held past the credit.
    pub framing_bytes: AtomicU64,
}

impl ConnShared {
    fn new(id: u64, slot: usize, inbox: usize, send_low: u64) -> Self {
        ConnShared {
            id,
            slot,
            // (An inbox is a loop of this process: far fewer than 2^32.)
            inbox: inbox as u32,
            send_low,
            window: OnceLock::new(),
            closed: AtomicBool::new(false),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            out_bytes: AtomicU64::new(0),
            pauses: AtomicU64::new(0),
            msgq_paused: AtomicBool::new(false),
            peak_buffered: AtomicU64::new(0),
            packets_too_large: AtomicU64::new(0),
            framing_bytes: AtomicU64::new(0),
        }
    }

    /// The owning loop's inbox.
    pub fn inbox(&self) -> usize {
        self.inbox as usize
    }

    /// The receive window, once the loop half is attached.
    pub fn receive(&self) -> Option<&flow::Window> {
        self.window.get().map(|window| &**window)
    }

    /// Publish what the port's flow counted for statistics (its own, not shared), and
    /// count a change of its watermark pause in `shared.msgq_paused_streams`.
    fn publish(&self, flow: &ReceiveFlow, shared: &Shared) {
        self.pauses.store(flow.pauses, Ordering::Relaxed);
        self.peak_buffered
            .store(flow.peak_buffered, Ordering::Relaxed);
        let paused = flow.msgq_paused();
        if self.msgq_paused.load(Ordering::Relaxed) != paused {
            self.msgq_paused.store(paused, Ordering::Relaxed);
            if paused {
                shared.msgq_paused_streams.fetch_add(1, Ordering::Relaxed);
            } else {
                shared.msgq_paused_streams.fetch_sub(1, Ordering::Relaxed);
            }
        }
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
    /// The owner of a port the budget paused waits for input (`cmd_want`).
    Want(Arc<ConnShared>),
    /// The port's owner is now the mailbox of this cell, or none (`cmd_owner`).
    Owner(Arc<ConnShared>, Option<Arc<flow::OwnerCell>>),
    /// A task parked on the mailbox of this cell while ports of it are paused by the
    /// budget (`cmd_want_owner`): each may try a read into the reserve.
    WantOwner(Arc<flow::OwnerCell>),
    /// An accepted connection's loop half is made: start reading for it, charging each
    /// packet this many bytes beyond its own.
    Attach(Arc<ConnShared>, Target, u64),
    /// Connect a stream socket (TCP to a numeric address, or Unix) and answer the request.
    Connect {
        /// The waiting request.
        request: Target,
        /// The port's loop half.
        port: Target,
        /// Its window.
        window: Arc<flow::Window>,
        /// Its loop's inbox.
        inbox: usize,
        /// Where to.
        address: Destination,
        /// Its options.
        options: StreamOptions,
        /// Bytes charged per packet beyond its own (a framed port of this process).
        overhead: u64,
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
        socket: ListenSocket,
        /// The options of each accepted connection.
        options: StreamOptions,
    },
    /// A Python function run for this port on the I/O thread (in the hosted half) raised:
    /// its owner gets `Closed(reason, "EIO")`, and the port is closed (the peer sees the end).
    Abort(Arc<ConnShared>, String),
    /// A packet of this port did not decode in its loop's drain (a msgpack object the
    /// decoder refused), which told the owner: close the port at once, without an event
    /// (the Python core's `_frame_error` closes it as it tells the owner).  The target, its
    /// loop's inbox and its stream's slot in the port table (the packet's, see
    /// [`Event::Object`]): the drain has the port, not necessarily its `Conn` yet.  The
    /// slot makes it O(1): a scan of the table per refused object made a flood of bad
    /// msgpack from many peers O(ports) each.
    DecodeFailed(Target, usize, usize),
    /// Close every port and end the thread.
    Stop,
    /// Panic in the thread (the tests' way to check that a failure is contained).
    Fail,
    /// Tell the first channel, then block the thread until the second one's sender is
    /// dropped (the tests' way to make one round see what they queued meanwhile:
    /// `Core._hold_for_test`).
    Hold(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>),
}

/// What the I/O thread tells a loop (built into messages by `Inbox.take`).
pub enum Event {
    /// Bytes read (or a packet charged its length): `Data(bytes)`.  The last field is the
    /// stream's slot, as [`Event::Object`]'s: a message that cannot be built fails the
    /// port ([`Command::DecodeFailed`]).
    Data(Target, Vec<u8>, usize),
    /// A packet charged more than its length: its charge goes to the port's
    /// `window.sizes` (see [`TargetExtra::Sizes`]), then `Data(bytes)`.  The last field is the
    /// stream's slot, as [`Event::Object`]'s.
    Packet(Target, Vec<u8>, u64, usize),
    /// A packet of a mode whose messages are objects (msgpack, resp), with its charge:
    /// the drain builds the object (decodes the msgpack bytes, makes the command's
    /// `list[bytes]`, the error's exception), puts the charge in `window.sizes`, then
    /// delivers `Data(object)`.  The last field is the stream's slot in the port table,
    /// for a [`Command::DecodeFailed`].
    Object(Target, Payload, u64, usize),
    /// The peer closed: `Closed("eof")`.
    Eof(Target),
    /// The server stops with the port open: `Closed("ioserver closed", "ESHUTDOWN")`, as
    /// the Python core's `_shutdown` tells every owner (sends fail with ESHUTDOWN then).
    Shutdown(Target),
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
        local: Address,
        /// The peer's.
        remote: Address,
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
        local: Address,
        /// The peer's.
        remote: Address,
    },
    /// A connect failed: the request gets `ConnectError`.
    ConnectFailed(Target, i32, Address),
    /// A listener is served: the request gets `(conn, local, None)`.
    Listening(Target, Arc<ConnShared>, Address),
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

/// A packet as the I/O thread keeps it until a drain builds its message (an
/// [`Event::Object`], or held past the active credit).
pub enum Payload {
    /// Bytes (1, 2, 4, line): `Data(bytes)`.
    Bytes(Vec<u8>),
    /// The wire bytes of one whole msgpack object: the drain decodes it (with the Python
    /// framer's options, `raw=False, strict_map_key=False`: see `py.rs`'s `Inbox`).
    Msgpack(Vec<u8>),
    /// A RESP command: its arguments back to back, and where each one ends.
    Command(Vec<u8>, Vec<usize>),
    /// A RESP protocol error, delivered as the port's last message (an exception object
    /// as `Data`, as the Python framer returns it).
    Error(crate::framing::FrameError),
}

impl Payload {
    /// A framer's packet, copied out of the framer's arena.
    fn of(packet: crate::framing::Packet<'_>, mode: crate::framing::Mode) -> Payload {
        use crate::framing::{Mode, Packet};
        match packet {
            Packet::Bytes(bytes) if mode == Mode::Msgpack => Payload::Msgpack(bytes.to_vec()),
            Packet::Bytes(bytes) => Payload::Bytes(bytes.to_vec()),
            Packet::Command(command) => {
                let mut data = Vec::with_capacity(command.iter().map(<[u8]>::len).sum());
                let mut ends = Vec::with_capacity(command.len());
                for argument in command.iter() {
                    data.extend_from_slice(argument);
                    ends.push(data.len());
                }
                Payload::Command(data, ends)
            }
        }
    }
}

/// What the I/O thread and the Python objects share: the command queue and the counters.
///
/// Ordering: the counters are `Relaxed` (statistics, each written by the I/O thread
/// alone, ordered with nothing else); `running` is `SeqCst`.
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
    /// The budget's statistics, published once a round (`Budget::peak_memory`...).
    pub peak_memory: AtomicU64,
    /// Reads paused by the budget, ever (`Budget::global_pauses`).
    pub global_pauses: AtomicU64,
    /// Reads into the budget's reserve, ever (`Budget::reserve_reads`).
    pub reserve_reads: AtomicU64,
    /// Ports failed because the budget stalled on unfinished packets, ever
    /// (`Budget::failed_ports`).  Relaxed: a count read on its own.
    pub budget_failed_ports: AtomicU64,
    /// Closed streams reset because their output was not written within `linger`.
    pub linger_timeouts: AtomicU64,
    /// Sockets open now.
    pub ports_open: AtomicU64,
    /// Listeners open now (of `ports_open`; for the daemon's status).  Relaxed, as
    /// `ports_open`: a count read on its own.
    pub listeners_open: AtomicU64,
    /// Of those, Unix ones; and the Unix streams open now (Unix connections and programs'
    /// stdio), of `ports_open`.  For the daemon's status (`ports_by_kind`), Relaxed as
    /// `ports_open`.
    pub unix_listeners_open: AtomicU64,
    /// See `unix_listeners_open`.
    pub unix_streams: AtomicU64,
    /// TCP listeners open now, of `listeners_open`: counted on its own, as `tcp_streams`.
    pub tcp_listeners_open: AtomicU64,
    /// TCP streams open now (connecting ones included), of `ports_open`: counted on its
    /// own, as a stream opens and closes, so that a status reads it with one load.  It was
    /// `ports_open - listeners_open - unix_streams`, three Relaxed loads the thread may
    /// change between (a listener counted open before `ports_open` was read grown read
    /// as -1 TCP stream).  Relaxed: a count read on its own.
    pub tcp_streams: AtomicU64,
    /// Streams with more output queued than their low watermark now (the daemon's status:
    /// `busy_ports`), counted as `Stream::set_out_bytes` crosses it.  Relaxed: a count.
    pub busy_streams: AtomicU64,
    /// Streams paused by their watermarks now (the daemon's status: `paused_ports`),
    /// counted as `ConnShared::publish` sees the pause change.  Relaxed: a count.
    pub msgq_paused_streams: AtomicU64,
    /// Errors contained by closing the one port concerned (and the thread's own failure).
    pub internal_errors: AtomicU64,
    /// Why the thread failed, if it did (a panic's message).
    pub failure: Mutex<Option<String>>,
    /// The next `ConnShared.id`.
    pub next_id: &'static AtomicU64,
    /// The thread is running (set before it starts, cleared as it ends).
    pub running: AtomicBool,
    /// The rounds' reads and writes go through io_uring (`uring.rs`), not one syscall each.
    /// Relaxed, as the two counters below: statistics read on their own, through which
    /// nothing else is published.
    pub io_uring: AtomicBool,
    /// `io_uring_enter` calls made.
    pub uring_enters: AtomicU64,
    /// Operations (receives and sends) submitted through them.
    pub uring_submissions: AtomicU64,
    /// Why io_uring is not used where it was wanted: the kernel refused it (the default
    /// fell back to epoll), or a round's `io_uring_enter` failed (the thread went on with
    /// epoll).
    pub uring_failure: Mutex<Option<String>>,
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
            peak_memory: AtomicU64::new(0),
            global_pauses: AtomicU64::new(0),
            reserve_reads: AtomicU64::new(0),
            budget_failed_ports: AtomicU64::new(0),
            linger_timeouts: AtomicU64::new(0),
            ports_open: AtomicU64::new(0),
            listeners_open: AtomicU64::new(0),
            unix_listeners_open: AtomicU64::new(0),
            unix_streams: AtomicU64::new(0),
            tcp_streams: AtomicU64::new(0),
            tcp_listeners_open: AtomicU64::new(0),
            busy_streams: AtomicU64::new(0),
            msgq_paused_streams: AtomicU64::new(0),
            internal_errors: AtomicU64::new(0),
            failure: Mutex::new(None),
            next_id: &NEXT_ID,
            running: AtomicBool::new(false),
            io_uring: AtomicBool::new(false),
            uring_enters: AtomicU64::new(0),
            uring_submissions: AtomicU64::new(0),
            uring_failure: Mutex::new(None),
            thread_id: AtomicU64::new(0),
        })
    }
}

struct Stream {
    sock: Sock,
    conn: Arc<ConnShared>,
    port: Option<Target>,
    /// Its receive flow control (`flow.rs`): the active credit, held packets' count and
    /// charge, the watermarks' pause, the budget's.  Until the loop half is attached, a
    /// flow over an unconfigured window, with the listener's active mode.
    flow: ReceiveFlow,
    outq: VecDeque<HeldBytes>,
    /// Bytes of the first queued buffer already written.
    head: usize,
    /// A connect in progress: the request to answer and the address (boxed: 40 bytes
    /// inline in every stream, against 8, for what only a connecting one has).
    connecting: Option<Box<(Target, Address)>>,
    readable: bool,
    /// An edge said the peer closed or the connection failed: read until it is reported.
    hangup: bool,
    in_ready: bool,
    dirty: bool,
    read_eof: bool,
    write_closed: bool,
    shutdown_pending: bool,
    close_pending: bool,
    /// `linger`: how long a close may wait for the queued output.
    linger: Linger,
    /// The port's framer (None: raw), boxed: 144 bytes inline in every stream, raw or
    /// not, against 8.
    framer: Option<Box<crate::framing::Framer>>,
    /// What only some streams need (a linger deadline, packets held), boxed when first
    /// needed: 48 bytes inline in every stream against 8.
    rare: Option<Box<StreamRare>>,
}

/// A stream's `linger` in 8 bytes, where an `Option<Duration>` takes 16 (with the
/// [`flow::ReceiveFlow`]'s 8 bytes less, a `Stream` is a 208-byte allocation, not 224):
/// nanoseconds, `u64::MAX` for None (no bound).  `_options` bounds a linger to
/// `2**31 - 1` seconds, about 2.1e18 ns, well below; a longer one would saturate to
/// `u64::MAX - 1` ns, 584 years.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Linger(u64);

impl Linger {
    fn new(linger: Option<Duration>) -> Linger {
        match linger {
            None => Linger(u64::MAX),
            Some(linger) => Linger(
                u64::try_from(linger.as_nanos()).map_or(u64::MAX - 1, |n| n.min(u64::MAX - 1)),
            ),
        }
    }

    fn get(self) -> Option<Duration> {
        (self.0 != u64::MAX).then(|| Duration::from_nanos(self.0))
    }
}

/// The part of a [`Stream`] that only some streams use.
#[derive(Default)]
struct StreamRare {
    /// A close waits for the output until then (its entry in `IoThread::lingering`).
    linger_deadline: Option<Instant>,
    /// Packets decoded beyond the active credit, in order, with their charges, for the
    /// next grants (the socket is not read while any is held: `flow.rs`, the active credit).
    held: VecDeque<(Payload, u64)>,
}

impl Stream {
    /// Its rare part, made if it has none yet.
    fn rare(&mut self) -> &mut StreamRare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// Bytes queued and not written: the port's `out_bytes`, kept there only (this
    /// thread is its one writer, so a `Relaxed` load reads back its own last store).
    fn out_bytes(&self) -> u64 {
        self.conn.out_bytes.load(Ordering::Relaxed)
    }

    /// Set the bytes queued and not written (`Relaxed`: read for statistics by the loop,
    /// ordered with nothing else, as the other counters of [`ConnShared`]), and count the
    /// port in `shared.busy_streams` while they are over its low watermark.
    fn set_out_bytes(&self, bytes: u64, shared: &Shared) {
        let before = self.conn.out_bytes.load(Ordering::Relaxed);
        self.conn.out_bytes.store(bytes, Ordering::Relaxed);
        let low = self.conn.send_low;
        match (before > low, bytes > low) {
            (false, true) => shared.busy_streams.fetch_add(1, Ordering::Relaxed),
            (true, false) => shared.busy_streams.fetch_sub(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// Its linger deadline, if a close waits for the output.
    fn linger_deadline(&self) -> Option<Instant> {
        self.rare.as_ref().and_then(|rare| rare.linger_deadline)
    }
}

struct Listener {
    sock: ListenSock,
    conn: Arc<ConnShared>,
    port: Target,
    /// A Unix listener's path as its owner gave it: each accepted port's local address.
    local: Option<Target>,
    options: StreamOptions,
    credit: i64,
    notify: bool,
    readable: bool,
    in_ready: bool,
    /// Out of descriptors: not accepting until a port closes or [`ACCEPT_RETRY`] passes.
    exhausted: bool,
    /// Its owner was told it ran out of descriptors (an `AcceptError`), and no connection
    /// was accepted since: the retries of one episode are not told again (ten a second
    /// for as long as the descriptors are out); the next `Accepted` ends the episode.
    told_exhausted: bool,
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
    /// The charges of a framed read's packets (scratch).
    charges: Vec<u64>,
    ready: Vec<usize>,
    dirty: Vec<usize>,
    exhausted_listeners: Vec<usize>,
    /// When `exhausted_listeners` try to accept again, if not before ([`ACCEPT_RETRY`]).
    accept_retry: Option<Instant>,
    stopping: bool,
    /// The io_uring backend's ring (None: the epoll backend).
    uring: Option<uring::Uring>,
    /// The memory budget and the per-port caps (`flow.rs`).
    budget: Budget,
    /// Ports the budget let go this round (scratch).
    resumed: Vec<usize>,
    /// The window of streams whose loop half is not attached yet (nobody writes it).
    unattached: Arc<flow::Window>,
    /// Closed streams waiting for their output, with their `linger` deadline:
    /// `(deadline, slot, id)`.
    lingering: Vec<(Instant, usize, u64)>,
    /// Bytes of held buffers that go back to a loop on their own: [`RELEASE_BYTES`], or
    /// an eighth of `memory_limit` if less (they are charged to the budget until the loop
    /// drops them: a small budget must not be spent holding written output).
    release_bytes: u64,
    /// The Python I/O half this thread runs the rounds of (`hosted.rs`), if any.
    hosted: Option<Hosted>,
}

fn errno_of(error: &io::Error) -> i32 {
    error.raw_os_error().unwrap_or(libc::EIO)
}

impl IoThread {
    /// A thread's state with a port table of `table_size` slots (from the fd limit), a
    /// memory budget of `memory_limit` bytes and a cap of `port_buffer_limit` bytes on a
    /// framer's buffer (None: no limit), its loops counting in `counters`.
    pub fn new(
        shared: Arc<Shared>,
        table_size: usize,
        memory_limit: Option<u64>,
        port_buffer_limit: Option<u64>,
        counters: Arc<LoopCounters>,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let fd = shared.commands.signal.fd();
        poll.registry()
            .register(&mut SourceFd(&fd), WAKE, Interest::READABLE)?;
        let size = table_size.clamp(64, 1 << 20);
        let mut table = Vec::with_capacity(size);
        table.resize_with(size, || None);
        let mut budget = Budget::new(memory_limit, port_buffer_limit, READ_SIZE);
        budget.add_loop(counters);
        let release_bytes =
            memory_limit.map_or(RELEASE_BYTES, |limit| (limit / 8).min(RELEASE_BYTES));
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
            charges: Vec::new(),
            ready: Vec::new(),
            dirty: Vec::new(),
            exhausted_listeners: Vec::new(),
            accept_retry: None,
            stopping: false,
            uring: None,
            budget,
            resumed: Vec::new(),
            unattached: Arc::new(flow::Window::unconfigured()),
            lingering: Vec::new(),
            release_bytes,
            hosted: None,
        })
    }

    /// The hosted half this thread runs, if any (`Core.__traverse__` shows its Python
    /// objects to the garbage collector until the thread starts).
    pub fn hosted(&self) -> Option<&Hosted> {
        self.hosted.as_ref()
    }

    /// Run the rounds of `hosted` on this thread too (before the thread starts).
    pub fn host(&mut self, hosted: Hosted) -> io::Result<()> {
        hosted.register(self.poll.registry())?;
        self.hosted = Some(hosted);
        Ok(())
    }

    /// What the budget charges, to read the memory in use from another thread.
    pub fn charges(&self) -> Arc<Charges> {
        Arc::clone(self.budget.charges())
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
            let message = panic_message(panic.as_ref());
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
            self.begin_round();
            // Held releases, nothing handed: the sleep ends within RELEASE_IDLE, and if
            // nothing came by then they go back on their own (the publish below).
            let holding = !handed && self.releases.iter().any(Releases::is_pending);
            let mut idle_release = false;
            let mut timeout = if !self.ready.is_empty() || !self.dirty.is_empty() {
                Some(Duration::ZERO)
            } else if self.shared.commands.prepare_to_sleep_for(handed) {
                idle_release = holding;
                self.bound_sleep(
                    handed
                        .then_some(FLUSH_WAIT)
                        .or(holding.then_some(RELEASE_IDLE)),
                )
            } else {
                Some(Duration::ZERO)
            };
            if let Some(hosted) = &mut self.hosted {
                // A hand-over gap is for a loop at work (`hosted.rs`).
                let inboxes = &self.inboxes;
                hosted.settle_gap(|| inboxes.iter().any(|inbox| !inbox.is_empty()));
                timeout = hosted.timeout(timeout);
            }
            if let Err(error) = self.poll.poll(&mut events, timeout) {
                if error.kind() != io::ErrorKind::Interrupted {
                    panic!("epoll_wait failed: {error}");
                }
            }
            self.shared.commands.woke();
            self.shared.polls.fetch_add(1, Ordering::Relaxed);
            // The poll may have slept while owners queued output: this round's reads
            // are admitted against what is in use now.
            self.budget.after_poll();
            // The idle sleep ran out (or another timer ended it) with nothing to do.
            idle_release &= events.is_empty() && self.shared.commands.is_empty();
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
            if self.uring.is_none() {
                self.read_ready();
            }
            self.run_commands();
            self.run_hosted();
            // The loop gets this round's input before the writes: it works while we write.
            handed = self.publish(false);
            if self.uring.is_some() {
                // io_uring: the round's reads and writes in one io_uring_enter (uring.rs);
                // the input it read goes to the loops with the publish below.
                self.uring_round();
            } else {
                self.flush_dirty();
            }
            // While the budget pauses ports, what this thread holds for the loops to drop
            // (charged to the budget) goes back each round, not only with their input;
            // and after RELEASE_IDLE of idleness, whatever it still holds.
            handed |= self.publish(self.budget.has_paused() || idle_release);
            if handed {
                if let Some(hosted) = &mut self.hosted {
                    hosted.note_handed();
                }
            }
        }
    }

    /// The top of a round: the budget's headroom (ports it let go read again) and the
    /// `linger` deadlines that passed.
    fn begin_round(&mut self) {
        if self.budget.limit().is_some() {
            self.budget.begin_round(&mut self.resumed);
            // Stalled on unfinished packets (checked only when a reserve waiter is paused
            // and no read fits): fail the port holding the most, until a read fits.
            while let Some((slot, stalled)) = self.budget.stall_victim() {
                self.budget.failed_for_progress(slot);
                self.fail_for_progress(slot, stalled);
                self.budget.begin_round(&mut self.resumed);
            }
            self.shared
                .budget_failed_ports
                .store(self.budget.failed_ports, Ordering::Relaxed);
            for slot in std::mem::take(&mut self.resumed) {
                if let Some(Entry::Stream(mut s)) = self.table.get_mut(slot).and_then(|e| e.take())
                {
                    self.schedule(&mut s);
                    self.put(Entry::Stream(s));
                }
            }
            let shared = &self.shared;
            let peak = self.budget.peak_memory.max(0) as u64;
            shared.peak_memory.store(peak, Ordering::Relaxed);
            let pauses = self.budget.global_pauses;
            shared.global_pauses.store(pauses, Ordering::Relaxed);
            let reserve_reads = self.budget.reserve_reads;
            shared.reserve_reads.store(reserve_reads, Ordering::Relaxed);
        }
        if !self.lingering.is_empty() {
            self.expire_lingers();
        }
        if self
            .accept_retry
            .is_some_and(|retry| retry <= Instant::now())
        {
            self.retry_listeners();
        }
    }

    /// The budget stalled on unfinished packets and the stream at `slot` holds the most
    /// (`Budget::stall_victim`): its owner gets `Error("ENOBUFS", ...)` and
    /// `Closed("ENOBUFS")`, as for a packet over the budget's cap (`read_framed`), and
    /// the stream closes, which releases what its framer held.
    fn fail_for_progress(&mut self, slot: usize, stalled: flow::Stalled) {
        if !matches!(self.table.get(slot), Some(Some(Entry::Stream(_)))) {
            return;
        }
        let Some(Entry::Stream(mut s)) = self.table[slot].take() else {
            return;
        };
        if let (Some(port), false) = (s.port.clone(), s.close_pending) {
            let text = stalled.to_string();
            self.stage(s.conn.inbox(), Event::FrameError(port, libc::ENOBUFS, text));
        }
        self.broken(&mut s, libc::ENOBUFS);
    }

    /// How long the poll may sleep, at most: `timeout` (None: for ever), no longer than
    /// the budget's recheck while it pauses ports (owners free memory without telling
    /// this thread), nor than the nearest `linger` deadline.
    fn bound_sleep(&self, timeout: Option<Duration>) -> Option<Duration> {
        let mut timeout = timeout;
        let mut bound = |limit: Duration| {
            timeout = Some(timeout.map_or(limit, |t| t.min(limit)));
        };
        if self.budget.has_paused() {
            bound(flow::BUDGET_RECHECK);
        }
        if let Some(retry) = self.accept_retry {
            // Rounded up as the linger deadlines below are.
            let left = retry.saturating_duration_since(Instant::now());
            bound(left + Duration::from_millis(1));
        }
        if let Some(nearest) = self.lingering.iter().map(|(deadline, ..)| *deadline).min() {
            // Rounded up to the next millisecond: epoll's resolution; a wake just before
            // the deadline would find nothing due and sleep again.
            let left = nearest.saturating_duration_since(Instant::now());
            bound(left + Duration::from_millis(1));
        }
        timeout
    }

    /// A round of the hosted half, if one is due (the only place a round takes the GIL).
    fn run_hosted(&mut self) {
        if let Some(hosted) = &mut self.hosted {
            if hosted.wants_round() {
                let mut failed = 0;
                hosted.run(&mut self.staged, &mut failed);
                // What the hosted half read this round counts against the reads this
                // round still admits (io_uring's are made after it).
                self.budget.note_external();
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
        Arc::new(ConnShared::new(id, slot, inbox, flow.send_low))
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
    /// [`RELEASE_BATCH`] references or `release_bytes` bytes wait).  Counted in
    /// `Shared::bytes_held` (the memory in use) until a drain drops them.
    fn release_bytes(&mut self, inbox: usize, bytes: HeldBytes) {
        if let Some(list) = self.releases.get_mut(inbox) {
            let size = bytes.len() as u64;
            self.budget.charges().pin(size);
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
                && pending.size < self.release_bytes
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
                    s.set_out_bytes(s.out_bytes() + bytes.len() as u64, &self.shared);
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
                    self.budget.discarded(bytes.len() as u64);
                    self.release_bytes(conn.inbox(), bytes);
                }
            },
            Command::Close(conn) => match self.take(&conn) {
                Some(Entry::Stream(s)) if s.connecting.is_none() => self.close_linger(s),
                Some(entry) => self.close(entry),
                None => {}
            },
            Command::DecodeFailed(port, inbox, slot) => {
                // Found by its loop half, at the slot its packet came from: closed there if
                // that slot still holds this port's stream (it may have closed since, and
                // the slot been reused by another port).
                let here = match self.table.get(slot) {
                    Some(Some(Entry::Stream(s))) => {
                        s.port.as_ref().is_some_and(|p| Arc::ptr_eq(p, &port))
                    }
                    _ => false,
                };
                if here {
                    if let Some(Entry::Stream(mut s)) = self.table[slot].take() {
                        self.close_stream(&mut s);
                    }
                }
                self.release_target(inbox, port);
            }
            Command::Abort(conn, reason) => {
                if let Some(entry) = self.take(&conn) {
                    let port = match &entry {
                        Entry::Stream(s) => s.port.clone(),
                        Entry::Listener(l) => Some(l.port.clone()),
                    };
                    if let Some(port) = port {
                        self.stage(conn.inbox(), Event::Aborted(port, reason));
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
                    if s.flow.set_active((credit, notify)) {
                        if let Some(port) = &s.port {
                            let port = port.clone();
                            self.stage(s.conn.inbox(), Event::Passive(port));
                        }
                    }
                    self.deliver_held(&mut s);
                    self.schedule(&mut s);
                    self.put(Entry::Stream(s));
                }
                Some(Entry::Listener(mut l)) => {
                    (l.credit, l.notify) =
                        flow::apply_active_mode(l.credit, l.notify, (credit, notify));
                    if l.notify && l.credit == 0 {
                        let port = l.port.clone();
                        self.stage(l.conn.inbox(), Event::Passive(port));
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
                    if s.flow.read_once() {
                        self.deliver_held(&mut s);
                        self.schedule(&mut s);
                    }
                    self.put(Entry::Stream(s));
                }
                Some(entry) => self.put(entry),
                None => {}
            },
            Command::Resume(conn, generation) => match self.take(&conn) {
                Some(Entry::Stream(mut s)) => {
                    if s.flow.may_resume(generation) {
                        self.schedule(&mut s);
                    }
                    s.conn.publish(&s.flow, &self.shared);
                    self.put(Entry::Stream(s));
                }
                Some(entry) => self.put(entry),
                None => {}
            },
            Command::Want(conn) => match self.take(&conn) {
                Some(Entry::Stream(mut s)) => {
                    if self.budget.want(&mut s.flow) {
                        self.schedule(&mut s);
                    }
                    self.put(Entry::Stream(s));
                }
                Some(entry) => self.put(entry),
                None => {}
            },
            Command::Owner(conn, owner) => match self.take(&conn) {
                Some(Entry::Stream(mut s)) => {
                    if self.budget.set_owner(&mut s.flow, owner) {
                        self.schedule(&mut s);
                    }
                    self.put(Entry::Stream(s));
                }
                Some(entry) => self.put(entry),
                None => {}
            },
            Command::WantOwner(owner) => {
                // O(the owner's paused ports): the budget keeps them by owner.
                for token in self.budget.paused_of(&owner) {
                    if let Some(Some(Entry::Stream(_))) = self.table.get(token) {
                        if let Some(Entry::Stream(mut s)) = self.table[token].take() {
                            if self.budget.want(&mut s.flow) {
                                self.schedule(&mut s);
                            }
                            self.put(Entry::Stream(s));
                        }
                    }
                }
            }
            Command::Attach(conn, port, overhead) => match self.take(&conn) {
                Some(Entry::Stream(mut s)) => {
                    if let Some(window) = conn.window.get() {
                        let active = s.flow.active_mode();
                        let receive = Arc::clone(window);
                        s.flow = ReceiveFlow::new(receive, conn.slot, active, overhead);
                    }
                    s.port = Some(port);
                    self.schedule(&mut s);
                    self.put(Entry::Stream(s));
                }
                other => {
                    if let Some(entry) = other {
                        self.put(entry);
                    }
                    self.release_target(conn.inbox(), port);
                }
            },
            Command::Connect {
                request,
                port,
                window,
                inbox,
                address,
                options,
                overhead,
            } => self.connect(request, port, window, inbox, address, (options, overhead)),
            Command::Listen {
                request,
                listener,
                inbox,
                socket,
                options,
            } => self.listen(request, listener, inbox, socket, options),
            Command::Stop => self.stopping = true,
            Command::Fail => panic!("a failure asked for by a test (Core._fail_for_test)"),
            Command::Hold(reached, released) => {
                let _ = reached.send(());
                let _ = released.recv();
            }
        }
    }

    // -- streams -----------------------------------------------------------------------

    fn may_read(s: &Stream) -> bool {
        s.port.is_some()
            && s.connecting.is_none()
            && !s.read_eof
            && s.flow.may_read(s.close_pending)
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
                    if !(Self::may_read(&s) && s.readable) {
                        self.put(Entry::Stream(s));
                        continue;
                    }
                    // The budget: None pauses the port (its next round that lets it go,
                    // or its owner's cmd_want, schedules it again: it stays readable).  A
                    // closing port's reads are dropped, not charged: not the budget's.
                    let max = if s.close_pending {
                        self.buffer.len()
                    } else if let Some(grant) = self.budget.admit_read(&mut s.flow) {
                        grant.max
                    } else {
                        s.conn.publish(&s.flow, &self.shared);
                        self.put(Entry::Stream(s));
                        continue;
                    };
                    // read() returns false when it closed the port: then it is gone.
                    if self.read(&mut s, max) {
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

    /// One read of at most `max` bytes (the budget's grant); false if the port was closed.
    fn read(&mut self, s: &mut Stream, max: usize) -> bool {
        let max = max.min(self.buffer.len());
        let result = (&s.sock).read(&mut self.buffer[..max]);
        self.after_read(s, result, max)
    }

    /// What follows a read of at most `max` bytes of the socket into `self.buffer`
    /// (either backend's): `result` is the bytes read or the error.  False if the port
    /// was closed.
    fn after_read(&mut self, s: &mut Stream, result: io::Result<usize>, max: usize) -> bool {
        match result {
            Ok(0) => {
                s.readable = false;
                s.read_eof = true;
                if !s.close_pending {
                    if let Some(port) = &s.port {
                        let port = port.clone();
                        self.eof_rest(s, &port);
                        self.stage(s.conn.inbox(), Event::Eof(port));
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
                if n == max || s.hangup {
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
                let slot = s.conn.slot;
                self.stage(
                    s.conn.inbox(),
                    Event::Data(port, self.buffer[..n].to_vec(), slot),
                );
                // Counted after the event is staged: the loop's handshake reads the
                // delivered counters after the consumed counters it wrote.
                let delivered = s.flow.deliver(&mut self.budget, &[n as u64]);
                self.delivered(s, delivered);
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

    /// Feed a read of `n` bytes to the port's framer (`flow::framed_read`): deliver its
    /// whole packets as far as the active credit goes, hold the rest; false if the port
    /// was closed - the peer broke the packet mode, or the framer holds more than
    /// `port_buffer_limit` (`Error`, then `Closed`, as the Python core does).
    fn read_framed(&mut self, s: &mut Stream, port: Target, n: usize) -> bool {
        let Some(framer) = s.framer.as_mut() else {
            return true;
        };
        self.packets.clear();
        self.charges.clear();
        let result = flow::framed_read(
            &mut self.budget,
            &mut s.flow,
            framer,
            &self.buffer[..n],
            &mut self.packets,
            &mut self.charges,
        );
        let read = match result {
            Err(ReadFault::Frame(error)) => {
                let errno = match error {
                    crate::framing::FrameError::TooLarge { .. }
                    | crate::framing::FrameError::TooManyItems { .. }
                    | crate::framing::FrameError::OverBudget { .. } => {
                        s.conn.packets_too_large.fetch_add(1, Ordering::Relaxed);
                        libc::EMSGSIZE
                    }
                    crate::framing::FrameError::Malformed(_) => libc::EPROTO,
                };
                let text = error.to_string();
                self.stage(s.conn.inbox(), Event::FrameError(port, errno, text));
                self.broken(s, errno);
                return false;
            }
            Err(ReadFault::BufferLimit(exceeded)) => {
                let text = exceeded.to_string();
                self.stage(s.conn.inbox(), Event::FrameError(port, libc::ENOBUFS, text));
                self.broken(s, libc::ENOBUFS);
                return false;
            }
            Ok(read) => read,
        };
        let overhead = s.flow.packet_overhead();
        let inbox = s.conn.inbox();
        let mode = framer.mode();
        // The read's messages: its packets, then a resp protocol error (the port's last).
        let packets = self.packets.iter().map(|packet| Payload::of(packet, mode));
        let messages = packets.chain(read.error.map(Payload::Error));
        for (index, payload) in messages.enumerate() {
            let charge = self.charges[index];
            if index >= read.deliver {
                s.rare().held.push_back((payload, charge));
            } else if let Some(staged) = self.staged.get_mut(inbox) {
                staged.push(packet_event(&port, payload, charge, overhead, s.conn.slot));
            }
        }
        self.note_framing(s);
        self.delivered(s, read.delivered);
        true
    }

    /// The peer's end of file on a framed port: deliver what its framer's unfinished
    /// bytes still make (`flow::framed_eof`: a line port's last line, unterminated),
    /// before the `Closed("eof")` the caller stages (Python's `IOThread._deliver_rest`).
    fn eof_rest(&mut self, s: &mut Stream, port: &Target) {
        let Some(framer) = s.framer.as_mut() else {
            return;
        };
        if framer.buffered() == 0 {
            return;
        }
        self.packets.clear();
        self.charges.clear();
        let read = flow::framed_eof(
            &mut self.budget,
            &mut s.flow,
            framer,
            &mut self.packets,
            &mut self.charges,
        );
        let overhead = s.flow.packet_overhead();
        let inbox = s.conn.inbox();
        let mode = framer.mode();
        for (index, packet) in self.packets.iter().enumerate() {
            let payload = Payload::of(packet, mode);
            let charge = self.charges[index];
            if index >= read.deliver {
                s.rare().held.push_back((payload, charge));
            } else if let Some(staged) = self.staged.get_mut(inbox) {
                staged.push(packet_event(port, payload, charge, overhead, s.conn.slot));
            }
        }
        self.note_framing(s);
        self.delivered(s, read.delivered);
    }

    /// After packets were delivered: `Passive` if the credit ran out and the owner asked,
    /// and the pause if the owner is behind by more than a high watermark.
    fn delivered(&mut self, s: &mut Stream, delivered: Delivered) {
        if delivered.send_passive {
            if let Some(port) = &s.port {
                let port = port.clone();
                self.stage(s.conn.inbox(), Event::Passive(port));
            }
        }
        if delivered.over_high {
            self.pause(s);
        }
    }

    /// A grant came (an active mode, a passive read): held packets first, as far as the
    /// credit goes (`ReceiveFlow::grant_held`); the socket is read again only once none is
    /// held.
    fn deliver_held(&mut self, s: &mut Stream) {
        let Some(rare) = s.rare.as_mut() else { return };
        let count = s.flow.grant_held().min(rare.held.len());
        let Some(port) = s.port.clone() else { return };
        if count == 0 {
            return;
        }
        self.charges.clear();
        let overhead = s.flow.packet_overhead();
        for (payload, charge) in rare.held.drain(..count) {
            self.charges.push(charge);
            if let Some(staged) = self.staged.get_mut(s.conn.inbox()) {
                staged.push(packet_event(&port, payload, charge, overhead, s.conn.slot));
            }
        }
        s.flow.unhold(&mut self.budget, &self.charges);
        let delivered = s.flow.deliver(&mut self.budget, &self.charges);
        self.note_framing(s);
        self.delivered(s, delivered);
    }

    /// Publish what the framer and the held packets hold (the port's `held_bytes`).
    fn note_framing(&mut self, s: &mut Stream) {
        let framer = s.framer.as_ref().map_or(0, |f| f.buffered()) as u64;
        let (_, held) = s.flow.held();
        s.conn.framing_bytes.store(framer + held, Ordering::Relaxed);
        s.conn.publish(&s.flow, &self.shared);
    }

    /// Step 1 of the pause handshake (`flow.rs`): pause, then re-read the window; resume
    /// at once if the owner took enough meanwhile.
    fn pause(&mut self, s: &mut Stream) {
        if s.flow.pause() && s.flow.recheck() {
            self.schedule(s);
        }
        s.conn.publish(&s.flow, &self.shared);
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
            let slices: Vec<IoSlice<'_>> = gathered(s).map(IoSlice::new).collect();
            let wanted = slices.iter().map(|slice| slice.len()).sum();
            let result = (&s.sock).write_vectored(&slices);
            drop(slices);
            match self.after_write(s, result, wanted, &mut total) {
                Written::Again => continue,
                Written::Full => break,
                Written::Closed => return false,
            }
        }
        self.finish_write(s, total)
    }

    /// What follows one gathered write of `wanted` bytes (either backend's): `result` is
    /// the bytes written or the error; `total` adds them up over the round.
    fn after_write(
        &mut self,
        s: &mut Stream,
        result: io::Result<usize>,
        wanted: usize,
        total: &mut u64,
    ) -> Written {
        match result {
            Ok(sent) => {
                *total += sent as u64;
                self.consume_output(s, sent);
                if sent < wanted {
                    Written::Full // the socket is full: its writable edge comes later
                } else {
                    Written::Again
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => Written::Full,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => Written::Again,
            Err(error) => {
                self.broken(s, errno_of(&error));
                Written::Closed
            }
        }
    }

    /// What follows a round's writes of `s` (`total` bytes): the counters, WRITABLE to a
    /// blocked sender, and the close or half-close that waited for the queue to empty.
    /// False if the port was closed.
    fn finish_write(&mut self, s: &mut Stream, total: u64) -> bool {
        if total > 0 {
            // bytes_out before send_blocked: the loop writes send_blocked, then reads
            // bytes_out (the WRITABLE handshake; all SeqCst).
            let out = s.conn.bytes_out.fetch_add(total, Ordering::SeqCst) + total;
            self.budget.wrote(total);
            // (The window is set before the port's `Attach` or `Connect` reaches here.)
            if let (Some(window), Some(port)) = (s.conn.window.get(), &s.port) {
                if window.send_blocked()
                    && window.queued_bytes().saturating_sub(out) <= s.conn.send_low
                {
                    let port = port.clone();
                    self.stage(s.conn.inbox(), Event::Writable(port));
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
        s.set_out_bytes(s.out_bytes() - sent as u64, &self.shared);
        while let Some(first) = s.outq.front() {
            let left = first.len() - s.head;
            if left == 0 || (sent > 0 && sent >= left) {
                sent -= left;
                s.head = 0;
                if let Some(done) = s.outq.pop_front() {
                    self.release_bytes(s.conn.inbox(), done);
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

    /// `cmd_close` of a stream (connected): close once the queued output is written,
    /// within the port's `linger` - at once, with a reset, for `linger=0` (Erlang's
    /// `{linger, {true, 0}}`); `IoThread::expire_lingers` resets it when the time is up.
    /// The stream goes back to the table if it stays open.
    fn close_linger(&mut self, mut s: Box<Stream>) {
        if s.linger.get() == Some(Duration::ZERO) {
            self.reset(&mut s);
            return;
        }
        if s.outq.is_empty() {
            self.close_stream(&mut s);
            return;
        }
        s.close_pending = true;
        // A linger past the clock's range is no deadline (`_options` bounds it far below).
        if let (Some(deadline), None) = (
            s.linger
                .get()
                .and_then(|linger| Instant::now().checked_add(linger)),
            s.linger_deadline(),
        ) {
            s.rare().linger_deadline = Some(deadline);
            self.lingering.push((deadline, s.conn.slot, s.conn.id));
        }
        // Closing reads on whatever its active mode (what arrives is dropped), so that a
        // peer blocked writing to us can drain what we flush to it.
        self.schedule(&mut s);
        self.put(Entry::Stream(s));
    }

    /// The `linger` deadlines that passed: reset those ports (their output was not
    /// written in time).
    fn expire_lingers(&mut self) {
        let now = Instant::now();
        let mut index = 0;
        while index < self.lingering.len() {
            let (deadline, slot, id) = self.lingering[index];
            if deadline > now {
                index += 1;
                continue;
            }
            self.lingering.swap_remove(index);
            match self.table.get_mut(slot).and_then(|e| e.take()) {
                Some(Entry::Stream(mut s)) if s.conn.id == id => {
                    if let Some(rare) = s.rare.as_mut() {
                        rare.linger_deadline = None;
                    }
                    self.reset(&mut s);
                }
                Some(entry) => self.put(entry),
                None => {}
            }
        }
    }

    /// Close `s` with `SO_LINGER {1, 0}`: the kernel drops what it holds and sends an RST
    /// (the peer gets `ECONNRESET`), freeing the socket at once; the queued output is
    /// dropped.  Counted in `linger_timeouts`.
    fn reset(&mut self, s: &mut Stream) {
        self.shared.linger_timeouts.fetch_add(1, Ordering::Relaxed);
        // A socket that fails this is broken already: closing it is all there is to do.
        let _ = socket2::SockRef::from(&s.sock).set_linger(Some(Duration::ZERO));
        self.close_stream(s);
    }

    /// The connection failed: tell the owner `Closed(name, name)` and release it.
    fn broken(&mut self, s: &mut Stream, errno: i32) {
        if let Some(port) = &s.port {
            if !s.close_pending {
                let port = port.clone();
                self.stage(s.conn.inbox(), Event::Broken(port, errno));
            }
        }
        self.close_stream(s);
    }

    /// Release a stream's socket and slot (the caller does not put it back).
    fn close_stream(&mut self, s: &mut Stream) {
        s.conn.closed.store(true, Ordering::SeqCst);
        let _ = self.poll.registry().deregister(&mut s.sock);
        // The socket closes when the entry is dropped; what it holds goes back to Python.
        let inbox = s.conn.inbox();
        self.budget.discarded(s.out_bytes());
        while let Some(bytes) = s.outq.pop_front() {
            self.release_bytes(inbox, bytes);
        }
        s.set_out_bytes(0, &self.shared);
        if s.conn.msgq_paused.load(Ordering::Relaxed) {
            self.shared
                .msgq_paused_streams
                .fetch_sub(1, Ordering::Relaxed);
        }
        if s.sock.is_unix() {
            self.shared.unix_streams.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.shared.tcp_streams.fetch_sub(1, Ordering::Relaxed);
        }
        // What the framer and the held packets hold leaves the budget, and so does a pause.
        let framer = s.framer.take().map_or(0, |f| f.buffered());
        s.flow.close(&mut self.budget, framer);
        // (The held packets go with the rare part.)
        let rare = s.rare.take();
        s.conn.framing_bytes.store(0, Ordering::Relaxed);
        if rare.is_some_and(|rare| rare.linger_deadline.is_some()) {
            let id = s.conn.id;
            self.lingering.retain(|(_, _, other)| *other != id);
        }
        if let Some(port) = s.port.take() {
            self.release_target(inbox, port);
        }
        if let Some((request, address)) = s.connecting.take().map(|c| *c) {
            // Closed before it connected (the server stops): the request gets its answer.
            self.stage(
                inbox,
                Event::ConnectFailed(request, libc::ECANCELED, address),
            );
        }
        self.free_slot(s.conn.slot);
    }

    /// An open that did not happen: its request gets `ConnectError` (`errno`, `address`)
    /// and the port's (or listener's) loop half goes back to its loop, dropped there.
    fn refuse(
        &mut self,
        inbox: usize,
        request: Target,
        errno: i32,
        address: Address,
        target: Target,
    ) {
        self.stage(inbox, Event::ConnectFailed(request, errno, address));
        self.release_target(inbox, target);
    }

    fn free_slot(&mut self, slot: usize) {
        self.freed.push(slot);
        self.shared.ports_open.fetch_sub(1, Ordering::Relaxed);
        // A descriptor was freed: listeners that ran out of them may accept again.
        self.retry_listeners();
    }

    /// Listeners that ran out of descriptors try to accept again (this round): one of this
    /// thread's ports freed one, or [`ACCEPT_RETRY`] passed since they ran out.  A
    /// listener whose accept fails so again waits for the next.
    fn retry_listeners(&mut self) {
        self.accept_retry = None;
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
            Entry::Listener(l) => {
                let Listener {
                    mut sock,
                    conn,
                    port,
                    local,
                    ..
                } = *l;
                self.shared.listeners_open.fetch_sub(1, Ordering::Relaxed);
                if local.is_some() {
                    self.shared
                        .unix_listeners_open
                        .fetch_sub(1, Ordering::Relaxed);
                } else {
                    self.shared
                        .tcp_listeners_open
                        .fetch_sub(1, Ordering::Relaxed);
                }
                let _ = self.poll.registry().deregister(&mut sock);
                // The socket closes (a Unix one's file goes) before the port reads as
                // closed: `closed` then says both are done.
                drop(sock);
                conn.closed.store(true, Ordering::SeqCst);
                self.release_target(conn.inbox(), port);
                if let Some(local) = local {
                    self.release_target(conn.inbox(), local);
                }
                self.free_slot(conn.slot);
            }
        }
    }

    // -- connect -----------------------------------------------------------------------

    fn connect(
        &mut self,
        request: Target,
        port: Target,
        window: Arc<flow::Window>,
        inbox: usize,
        address: Destination,
        (options, overhead): (StreamOptions, u64),
    ) {
        let (made, address) = address.open();
        let (mut sock, done) = match made {
            Ok(made) => made,
            Err(error) => {
                self.refuse(inbox, request, errno_of(&error), address, port);
                return;
            }
        };
        if let Err(error) = sock.apply_options(&options) {
            self.refuse(inbox, request, errno_of(&error), address, port);
            return;
        }
        let slot = self.allocate();
        if let Err(error) = self.poll.registry().register(
            &mut sock,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(slot);
            self.refuse(inbox, request, errno_of(&error), address, port);
            return;
        }
        self.shared.ports_open.fetch_add(1, Ordering::Relaxed);
        if sock.is_unix() {
            self.shared.unix_streams.fetch_add(1, Ordering::Relaxed);
        } else {
            self.shared.tcp_streams.fetch_add(1, Ordering::Relaxed);
        }
        let conn = self.new_conn(slot, inbox, options.flow);
        let receive = Arc::clone(&window);
        let _ = conn.window.set(window);
        let mut s = Box::new(Stream {
            sock,
            conn,
            port: Some(port),
            flow: ReceiveFlow::new(receive, slot, options.active, overhead),
            outq: VecDeque::new(),
            head: 0,
            connecting: Some(Box::new((request, address))),
            readable: false,
            hangup: false,
            in_ready: false,
            dirty: false,
            read_eof: false,
            write_closed: false,
            shutdown_pending: false,
            close_pending: false,
            linger: Linger::new(options.linger),
            framer: options
                .framing
                .and_then(|(mode, size)| crate::framing::Framer::new(mode, size).ok())
                .map(Box::new),
            rare: None,
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
        let Some((request, address)) = s.connecting.take().map(|c| *c) else {
            return true;
        };
        let inbox = s.conn.inbox();
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
                // A Unix destination's path object goes back to be dropped under the GIL.
                if let Address::Given(given) = address {
                    self.release_target(inbox, given);
                }
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
        socket: ListenSocket,
        options: StreamOptions,
    ) {
        // A Unix listener's address is its path as its owner gave it (as on the Python
        // core), also each accepted port's local address.
        let (mut sock, local, given) = match socket {
            ListenSocket::Tcp(socket) => {
                let local = socket.local_addr().map(Address::Inet);
                (ListenSock::Tcp(TcpListener::from_std(socket)), local, None)
            }
            ListenSocket::Unix { socket, path, file } => {
                let sock = ListenSock::Unix {
                    listener: UnixListener::from_std(socket),
                    _file: file,
                };
                (sock, Ok(Address::Given(path.clone())), Some(path))
            }
        };
        let slot = self.allocate();
        let registered = self
            .poll
            .registry()
            .register(&mut sock, Token(slot), Interest::READABLE);
        let local = match (registered, local) {
            (Ok(()), Ok(local)) => local,
            (Err(error), _) | (_, Err(error)) => {
                self.free.push(slot);
                let address = match given {
                    Some(path) => Address::Given(path),
                    None => Address::unspecified(),
                };
                self.refuse(inbox, request, errno_of(&error), address, listener);
                return; // (the socket closes here, and a Unix one's file goes)
            }
        };
        self.shared.ports_open.fetch_add(1, Ordering::Relaxed);
        self.shared.listeners_open.fetch_add(1, Ordering::Relaxed);
        if given.is_some() {
            self.shared
                .unix_listeners_open
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.shared
                .tcp_listeners_open
                .fetch_add(1, Ordering::Relaxed);
        }
        let conn = self.new_conn(slot, inbox, Flow::NONE);
        self.stage(inbox, Event::Listening(request, conn.clone(), local));
        self.put(Entry::Listener(Box::new(Listener {
            sock,
            conn,
            port: listener,
            local: given,
            options,
            credit: -1,
            notify: false,
            readable: false,
            in_ready: false,
            exhausted: false,
            told_exhausted: false,
        })));
    }

    fn accept(&mut self, l: &mut Listener) {
        let inbox = l.conn.inbox();
        for _ in 0..ACCEPT_BATCH {
            if l.credit == 0 || l.exhausted {
                return;
            }
            let (mut sock, remote) = match l.sock.accept() {
                Ok(accepted) => {
                    l.told_exhausted = false; // (an episode out of descriptors ends)
                    accepted
                }
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
                    let exhausted = matches!(
                        errno,
                        libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
                    );
                    // Out of descriptors: told once an episode (see `told_exhausted`).
                    if !(exhausted && l.told_exhausted) {
                        self.stage(inbox, Event::AcceptError(l.port.clone(), errno));
                    }
                    if exhausted {
                        l.told_exhausted = true;
                        l.exhausted = true;
                        self.exhausted_listeners.push(l.conn.slot);
                        self.accept_retry
                            .get_or_insert(Instant::now() + ACCEPT_RETRY);
                    }
                    return;
                }
            };
            if sock.apply_options(&l.options).is_err() {
                continue; // the peer is already gone (reset before we looked)
            }
            let local = match &l.local {
                Some(path) => Address::Given(path.clone()),
                None => match sock.local_addr() {
                    Ok(local) => local,
                    Err(_) => continue,
                },
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
            if sock.is_unix() {
                self.shared.unix_streams.fetch_add(1, Ordering::Relaxed);
            } else {
                self.shared.tcp_streams.fetch_add(1, Ordering::Relaxed);
            }
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
                flow: ReceiveFlow::new(Arc::clone(&self.unattached), slot, l.options.active, 0),
                outq: VecDeque::new(),
                head: 0,
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
                linger: Linger::new(l.options.linger),
                framer: l
                    .options
                    .framing
                    .and_then(|(mode, size)| crate::framing::Framer::new(mode, size).ok())
                    .map(Box::new),
                rare: None,
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
                        None => {
                            // An owner that did not close its port hears of the stop once.
                            if let (false, Some(port)) = (s.close_pending, &s.port) {
                                let port = port.clone();
                                self.stage(s.conn.inbox(), Event::Shutdown(port));
                            }
                            self.close_stream(&mut s)
                        }
                    },
                    Entry::Listener(l) => {
                        let port = l.port.clone();
                        self.stage(l.conn.inbox(), Event::Shutdown(port));
                        self.close(Entry::Listener(l))
                    }
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
                self.budget.discarded(bytes.len() as u64);
                self.release_bytes(conn.inbox(), bytes)
            }
            Command::Attach(conn, port, _) => self.release_target(conn.inbox(), port),
            Command::DecodeFailed(port, inbox, _) => self.release_target(inbox, port),
            Command::Connect {
                request,
                port,
                inbox,
                address,
                ..
            } => {
                self.refuse(
                    inbox,
                    request,
                    libc::ECANCELED,
                    address.into_address(),
                    port,
                );
            }
            Command::Listen {
                request,
                listener,
                inbox,
                socket,
                ..
            } => {
                let address = match socket {
                    ListenSocket::Tcp(_) => Address::unspecified(),
                    ListenSocket::Unix { path, .. } => Address::Given(path),
                };
                self.refuse(inbox, request, libc::ECANCELED, address, listener);
            }
            _ => {}
        }
    }
}

/// What a gathered write left to do.
enum Written {
    /// It wrote all it was given: write again (more may be queued).
    Again,
    /// The socket is full (a short write, or `EAGAIN`): its writable edge comes later.
    Full,
    /// The connection broke: the port is closed.
    Closed,
}

/// The first [`IOV_MAX`] buffers of the queued output, the head's written part skipped:
/// what one gathered write takes.
fn gathered(s: &Stream) -> impl Iterator<Item = &[u8]> {
    s.outq
        .iter()
        .take(IOV_MAX)
        .enumerate()
        .map(|(index, bytes)| {
            if index == 0 {
                &bytes.as_slice()[s.head..]
            } else {
                bytes.as_slice()
            }
        })
}

/// The event of a packet charged `charge` bytes: for bytes, `Data` when the port charges
/// packets their length alone (`overhead` 0), else `Packet`, which carries the charge to
/// the port's `window.sizes` (see [`TargetExtra::Sizes`]); for an object, `Object` (its
/// charge is never its length).
fn packet_event(port: &Target, payload: Payload, charge: u64, overhead: u64, slot: usize) -> Event {
    match payload {
        Payload::Bytes(bytes) if overhead == 0 => Event::Data(port.clone(), bytes, slot),
        Payload::Bytes(bytes) => Event::Packet(port.clone(), bytes, charge, slot),
        object => Event::Object(port.clone(), object, charge, slot),
    }
}

/// The sizes of a port's native state (issue 14: ioserver's own memory per idle
/// connection).  Each is an allocation of its own - the boxed [`Stream`], and in their
/// `Arc`s (16 bytes of counts more) [`ConnShared`], the [`flow::Window`] and the
/// [`PyTarget`] - which glibc rounds up to 16 bytes with an 8-byte header: a field that
/// pushes one past these bounds costs 16 bytes a connection.
#[cfg(all(test, target_os = "linux", target_pointer_width = "64"))]
mod size_tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn a_ports_native_state_stays_within_its_allocation_size_classes() {
        // (Stream: 216 bytes in a test build, whose mio sockets carry a selector id, a
        // 224-byte chunk; 200 and 208 in release.  ConnShared, Window: 128-byte chunks
        // with their Arc counts; PyTarget: 48.)
        assert!(
            size_of::<Stream>() <= 216,
            "Stream: {}",
            size_of::<Stream>()
        );
        assert!(
            size_of::<ConnShared>() <= 104,
            "ConnShared: {}",
            size_of::<ConnShared>()
        );
        let window = size_of::<flow::Window>();
        assert!(window <= 104, "flow::Window: {window}");
        // (Inline in the Stream: its token and packet overhead in 32 bits each.)
        let receive = size_of::<flow::ReceiveFlow>();
        assert!(receive <= 96, "flow::ReceiveFlow: {receive}");
        assert!(
            size_of::<PyTarget>() <= 24,
            "PyTarget: {}",
            size_of::<PyTarget>()
        );
    }
}

/// The text a caught panic carries (`panic!`'s message: a `&str` or a `String`), or
/// "a panic": for the reports of the boundaries that catch one (the I/O thread's rounds,
/// a hosted round, an event's build).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string())
}
