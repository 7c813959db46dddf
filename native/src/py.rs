//! The Python face of the native core: `Core` (the I/O thread and its commands), `Inbox`
//! (a loop's events, drained in one call), `Conn` (a port's I/O half as the loop reads
//! it: `ioserver._contract.PortIO`) and `WindowCounters` (the atomic part of a port's
//! flow-control window, which `ioserver._native_core.NativeWindow` extends).
//!
//! Used by `ioserver/_native_core.py` only; nothing here is public API.

use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::exceptions::{PyException, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::core::uring::{self, Backend};
use crate::core::{
    Command, ConnShared, Event, Flow, IoThread, MakePort, Payload, PyTarget, Shared, StreamOptions,
    TargetExtra,
};
use crate::flow::{self, Charges, LoopCounters, Watermarks};
use crate::hosted::{Hosted, HostedLists};
use crate::sock::{Address, Destination, ListenSocket, SocketFile};
use crate::unsafe_io::{adopt_listener, adopt_stream, new_bytes, new_list, new_pair, HeldBytes};
use crate::wakeup::WakeQueue;

fn target(obj: Py<PyAny>) -> Arc<PyTarget> {
    Arc::new(PyTarget {
        obj,
        window: None,
        extra: None,
    })
}

/// A port's target: the port, its receive window and - when its packets are charged more
/// than their length (`window.sizes` is a deque: a framed port of this process) - the
/// deque's `append`; and the bytes charged per packet beyond its length.
fn port_target(port: Py<PyAny>, window: &Bound<'_, WindowCounters>) -> PyResult<(Target, u64)> {
    let sizes = window.getattr("sizes")?;
    let (extra, overhead) = if sizes.is_none() {
        (None, 0)
    } else {
        // A `u32` (ReceiveFlow keeps it in 32 bits): a larger value is an OverflowError
        // here, on the loop thread, not a panic of the I/O thread's `ReceiveFlow::new`.
        let overhead: u32 = window.getattr("packet_overhead")?.extract()?;
        let overhead = u64::from(overhead);
        let append = sizes.getattr("append")?.unbind();
        (Some(Box::new(TargetExtra::Sizes(append))), overhead)
    };
    let receive = Arc::clone(&window.get().shared);
    let target = Arc::new(PyTarget {
        obj: port,
        window: Some(receive),
        extra,
    });
    Ok((target, overhead))
}

/// A listener's target: the listener, and the function that makes each accepted
/// connection's loop half, with the watermarks those ports get.
fn listener_target(listener: Py<PyAny>, make_port: Py<PyAny>, watermarks: Watermarks) -> Target {
    Arc::new(PyTarget {
        obj: listener,
        window: None,
        extra: Some(Box::new(TargetExtra::Listener(MakePort {
            make: make_port,
            watermarks,
        }))),
    })
}

type Target = Arc<PyTarget>;

fn address<'py>(py: Python<'py>, address: &SocketAddr) -> PyResult<Bound<'py, PyTuple>> {
    match address {
        SocketAddr::V4(a) => (a.ip().to_string(), a.port()).into_pyobject(py),
        SocketAddr::V6(a) => {
            (a.ip().to_string(), a.port(), a.flowinfo(), a.scope_id()).into_pyobject(py)
        }
    }
}

/// An address as the Python core gives it (`socket.getsockname()`, CPython's
/// `makesockaddr`; see `sock.rs`): a tuple for TCP; for Unix the path as a `str` (decoded
/// as file names are), a `bytes` abstract name with its leading NUL, `""` unnamed; or the
/// object the owner gave.
fn address_object<'py>(py: Python<'py>, address: &Address) -> PyResult<Bound<'py, PyAny>> {
    match address {
        Address::Inet(a) => Ok(self::address(py, a)?.into_any()),
        Address::Unix(a) => {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt;
                if let Some(name) = a.as_abstract_name() {
                    let mut bytes = Vec::with_capacity(name.len() + 1);
                    bytes.push(0);
                    bytes.extend_from_slice(name);
                    return Ok(new_bytes(py, &bytes)?.into_any());
                }
            }
            match a.as_pathname() {
                Some(path) => Ok(path.as_os_str().into_pyobject(py)?.into_any()),
                None => Ok(pyo3::types::PyString::new(py, "").into_any()),
            }
        }
        Address::Given(target) => Ok(target.obj.bind(py).clone()),
    }
}

fn get<'py, T: pyo3::conversion::FromPyObjectOwned<'py>>(
    options: &Bound<'py, PyDict>,
    name: &str,
) -> PyResult<Option<T>> {
    match options.get_item(name)? {
        None => Ok(None),
        Some(value) if value.is_none() => Ok(None),
        Some(value) => Ok(Some(value.extract().map_err(Into::into)?)),
    }
}

/// The packet mode of `options` (None: raw).
fn framing(options: &Bound<'_, PyDict>) -> PyResult<Option<(crate::framing::Mode, usize)>> {
    use crate::framing::Mode;
    let Some(packet) = options.get_item("packet")? else {
        return Ok(None);
    };
    let mode = if let Ok(name) = packet.extract::<String>() {
        match name.as_str() {
            "raw" => return Ok(None),
            "line" => {
                let delimiter: Vec<u8> =
                    get(options, "delimiter")?.unwrap_or_else(|| b"\n".to_vec());
                match delimiter.as_slice() {
                    [byte] => Mode::Line(*byte),
                    _ => return Err(PyValueError::new_err("line delimiter must be one byte")),
                }
            }
            "msgpack" => Mode::Msgpack,
            "resp" => Mode::Resp,
            other => {
                return Err(PyValueError::new_err(format!(
                    "packet={other:?} is not a packet mode"
                )))
            }
        }
    } else {
        match packet.extract::<u8>()? {
            0 => return Ok(None),
            header => Mode::Length(header),
        }
    };
    let size: usize = get(options, "packet_size")?.unwrap_or(crate::framing::DEFAULT_PACKET_SIZE);
    crate::framing::Framer::new(mode, size).map_err(|e| PyValueError::new_err(e.0))?;
    Ok(Some((mode, size)))
}

fn stream_options(options: &Bound<'_, PyDict>, active: (i64, bool)) -> PyResult<StreamOptions> {
    let high: u64 = get(options, "high_msgq_watermark")?.unwrap_or(flow::NO_LIMIT);
    let low: u64 = get(options, "low_msgq_watermark")?.unwrap_or(high);
    let high_messages: u64 = get(options, "high_msgq_messages")?.unwrap_or(flow::NO_LIMIT);
    let linger = match get::<f64>(options, "linger")? {
        None => None,
        Some(seconds) => Some(Duration::try_from_secs_f64(seconds).map_err(|_| {
            PyValueError::new_err(format!("linger must be seconds >= 0, not {seconds}"))
        })?),
    };
    Ok(StreamOptions {
        nodelay: get(options, "nodelay")?.unwrap_or(true),
        keepalive: get(options, "keepalive")?.unwrap_or(false),
        recbuf: get(options, "recbuf")?,
        sndbuf: get(options, "sndbuf")?,
        flow: Flow {
            watermarks: Watermarks::new(high, low, high_messages),
            send_low: get(options, "low_watermark")?.unwrap_or(0),
        },
        active,
        framing: framing(options)?,
        linger,
    })
}

/// The atomic counters of a port's flow-control window, written by the loop half and
/// read by the I/O thread without the GIL (see `ioserver._flow.Window`): a
/// [`flow::Window`], its receive side and its send side (`queued_bytes`, `send_blocked`),
/// one allocation per port.  The loop half
/// assigns the counters (`window.consumed_bytes += charge`); each assignment's growth is
/// counted for the memory budget too (the loop's counters, `flow::LoopCounters`).
///
/// It is a raw port's whole window (``ioserver._native_core.NativeWindow``), so the
/// fields of ``ioserver._flow.Window`` that are the same for every raw native port are
/// class attributes here (``framer``, ``packet_overhead``, ``sizes``; ``on_pause`` and
/// ``on_gone``, for a daemon's clients, which the native thread does not serve) and
/// ``task_waits`` answers False (the native thread asks the loop half nothing): an
/// instance is the object's header and the `Arc`, 24 bytes, a 32-byte pymalloc block -
/// a Python subclass's instances carry a 16-byte GC header more (issue 14).  A framed
/// port's window is such a subclass (``FramedNativeWindow``), with those three in slots.
#[pyclass(module = "ioserver._native", subclass, frozen)]
pub struct WindowCounters {
    shared: Arc<flow::Window>,
}

#[pymethods]
impl WindowCounters {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> Self {
        WindowCounters {
            shared: Arc::new(flow::Window::unconfigured()),
        }
    }

    /// A raw port has no framer.
    #[classattr]
    fn framer(py: Python<'_>) -> Py<PyAny> {
        py.None()
    }

    /// A raw port's messages are charged their length, nothing more.
    #[classattr]
    fn packet_overhead() -> u64 {
        0
    }

    /// A raw port's charges are its messages' lengths: no queue of them.
    #[classattr]
    fn sizes(py: Python<'_>) -> Py<PyAny> {
        py.None()
    }

    /// Only a daemon's client port is told of pauses (the hosted half's windows).
    #[classattr]
    fn on_pause(py: Python<'_>) -> Py<PyAny> {
        py.None()
    }

    /// Only a daemon's client port is told it is gone (the hosted half's windows).
    #[classattr]
    fn on_gone(py: Python<'_>) -> Py<PyAny> {
        py.None()
    }

    /// Whether a task waits on the port: the native thread never asks (it reads
    /// `flow::Window`'s `waiting` mark), so False, as `Window.task_waits` by default.
    fn task_waits(&self) -> bool {
        false
    }

    /// The bytes a delivered message's payload ``data`` is charged (``Window.charge``):
    /// its length, on a raw port.
    fn charge(&self, data: &Bound<'_, PyAny>) -> PyResult<usize> {
        data.len()
    }

    /// Step 2 of the handshake (``Window.resume_due``): ``flow.pause_generation`` if the
    /// owner took enough (``flow.drained()``; it becomes ``resume_generation``), else None.
    fn resume_due(&self, flow: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
        let generation: u64 = flow.getattr("pause_generation")?.extract()?;
        if flow.call_method0("drained")?.is_truthy()? {
            self.shared.set_resume_generation(generation);
            return Ok(Some(generation));
        }
        Ok(None)
    }

    /// The owner took a message charged ``charge`` bytes (its length, or for a framed
    /// port its charge popped from ``sizes``): step 2 of the pause handshake in one call
    /// (``flow::Window::took``: the counters, counted for the budget too, then the pause
    /// generation).  Returns the generation to ask the I/O thread to end
    /// (``cmd_resume``) if it paused reading and the owner has now taken enough, else None.
    fn took(&self, charge: u64) -> Option<u64> {
        self.shared.took(charge)
    }

    /// The last pause generation the loop half asked to end (``Window.resume_due``).
    #[getter]
    fn get_resume_generation(&self) -> u64 {
        self.shared.resume_generation()
    }

    #[setter]
    fn set_resume_generation(&self, value: u64) {
        self.shared.set_resume_generation(value)
    }

    /// Bytes of input the owner took.
    #[getter]
    fn get_consumed_bytes(&self) -> u64 {
        self.shared.consumed().0
    }

    #[setter]
    fn set_consumed_bytes(&self, value: u64) {
        self.shared.set_consumed_bytes(value)
    }

    /// Messages the owner took.
    #[getter]
    fn get_consumed_messages(&self) -> u64 {
        self.shared.consumed().1
    }

    #[setter]
    fn set_consumed_messages(&self, value: u64) {
        self.shared.set_consumed_messages(value)
    }

    /// Bytes the owner queued for output, ever.
    #[getter]
    fn get_queued_bytes(&self) -> u64 {
        self.shared.queued_bytes()
    }

    /// The owner queued more (it assigns the sum before it submits the send): the growth
    /// is counted for the budget before the send can be written and subtracted.
    #[setter]
    fn set_queued_bytes(&self, value: u64) {
        self.shared.set_queued_bytes(value);
    }

    /// A sender waits for the output to drain below the low watermark.
    #[getter]
    fn get_send_blocked(&self) -> bool {
        self.shared.send_blocked()
    }

    #[setter]
    fn set_send_blocked(&self, value: bool) {
        self.shared.set_send_blocked(value)
    }
}

/// A mailbox's cell in the native I/O half (`flow::OwnerCell`): the mailbox marks a park
/// on it here and learns, in O(1), whether any port it owns is paused by the memory
/// budget (``ports.Mailbox._want_input``).  Made by ``NativeIOThread.owner_cell``; named
/// to the thread by ``Core.owner`` (``cmd_owner``) and ``Core.want_owner``.
#[pyclass(module = "ioserver._native", frozen)]
pub struct OwnerCell {
    cell: Arc<flow::OwnerCell>,
}

#[pymethods]
impl OwnerCell {
    /// A cell with nobody waiting and no port paused (one per mailbox and I/O half, made
    /// by the loop half: ``ports.Mailbox``).
    #[new]
    fn new() -> Self {
        OwnerCell {
            cell: Arc::new(flow::OwnerCell::new()),
        }
    }

    /// A task parks on the mailbox (its waiter is in the list): mark it waiting, then
    /// True if a port it owns is paused by the budget - the caller then sends
    /// ``cmd_want_owner`` (`flow::OwnerCell::park`: `SeqCst`, the thread counts a pause
    /// then loads the mark).
    fn park(&self) -> bool {
        self.cell.park()
    }

    /// No task waits on the mailbox any more.
    fn unpark(&self) {
        self.cell.unpark()
    }

    /// Whether a task is marked waiting on the mailbox.
    #[getter]
    fn waiting(&self) -> bool {
        self.cell.waiting()
    }

    /// How many of the mailbox's ports the budget paused now.
    #[getter]
    fn paused(&self) -> usize {
        self.cell.paused()
    }
}

/// A port's I/O half, as its loop half reads it (`ioserver._contract.PortIO`).
#[pyclass(module = "ioserver._native", frozen)]
pub struct Conn {
    shared: Arc<ConnShared>,
    /// An accepted TCP connection's peer: the port makes its address from it when first
    /// asked (``peer_address``), instead of keeping a tuple and an int from the accept on.
    peer: Option<Peer>,
}

impl Conn {
    /// The handle of a connection with no peer kept (connected, listening, Unix).
    fn new(shared: Arc<ConnShared>) -> Self {
        Self { shared, peer: None }
    }
}

/// The last host string [`Conn`]'s ``peer_address`` made (taken under the GIL only, so
/// never contended), shared by the next address of the same host.
static PEER_HOST: Mutex<Option<(IpAddr, Py<pyo3::types::PyString>)>> = Mutex::new(None);

/// An accepted connection's peer address, in 16 bytes: an IPv6 one is boxed (an IPv4 one
/// is 6 bytes, a `SocketAddr` 32), so the handle of an IPv4 connection is one pymalloc
/// size class (48 bytes) where the handle, the peer's tuple and its port's int took three
/// (32 + 64 + 32; issue 14, memory per idle connection).
enum Peer {
    V4(SocketAddrV4),
    V6(Box<SocketAddrV6>),
}

impl Peer {
    fn of(address: &Address) -> Option<Self> {
        match address {
            Address::Inet(SocketAddr::V4(a)) => Some(Self::V4(*a)),
            Address::Inet(SocketAddr::V6(a)) => Some(Self::V6(Box::new(*a))),
            _ => None,
        }
    }

    fn address(&self) -> SocketAddr {
        match self {
            Self::V4(a) => SocketAddr::V4(*a),
            Self::V6(a) => SocketAddr::V6(**a),
        }
    }
}

#[pymethods]
impl Conn {
    /// Closed on the I/O side.
    #[getter]
    fn closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }
    /// Bytes read from the socket.
    #[getter]
    fn bytes_in(&self) -> u64 {
        self.shared.bytes_in.load(Ordering::Relaxed)
    }
    /// Bytes written to the socket.
    #[getter]
    fn bytes_out(&self) -> u64 {
        self.shared.bytes_out.load(Ordering::SeqCst)
    }
    /// Bytes queued on the I/O thread and not written.
    #[getter]
    fn out_bytes(&self) -> u64 {
        self.shared.out_bytes.load(Ordering::Relaxed)
    }
    /// Bytes delivered to the loop half (charged: a packet's length and its overhead).
    #[getter]
    fn delivered_bytes(&self) -> u64 {
        self.shared
            .receive()
            .map_or(0, |window| window.delivered().0)
    }
    /// Messages delivered to the loop half.
    #[getter]
    fn delivered_messages(&self) -> u64 {
        self.shared
            .receive()
            .map_or(0, |window| window.delivered().1)
    }
    /// The current receive pause (the handshake of `flow.rs`).
    #[getter]
    fn pause_generation(&self) -> u64 {
        self.shared
            .receive()
            .map_or(0, |window| window.pause_generation())
    }
    /// Paused by the watermarks now (as the I/O thread last published it).
    #[getter]
    fn msgq_paused(&self) -> bool {
        self.shared.msgq_paused.load(Ordering::Relaxed)
    }
    /// Receive pauses so far.
    #[getter]
    fn pauses(&self) -> u64 {
        self.shared.pauses.load(Ordering::Relaxed)
    }
    /// The most input ever buffered.
    #[getter]
    fn peak_buffered(&self) -> u64 {
        self.shared.peak_buffered.load(Ordering::Relaxed)
    }
    /// Paused by the memory budget.
    ///
    /// The loop half reads this when, and only when, a task parks on the port
    /// (`ports.Port`: the waiter is set, then ``global_paused`` is read, and True sends
    /// ``cmd_want``).  On this core the thread cannot ask the loop whether a task waits,
    /// so the read is also the park's mark: it stores `waiting` **then** loads
    /// `global_paused` (`flow::Window::set_waiting`, `SeqCst`; the I/O thread stores
    /// `global_paused` then loads `waiting`: one of the two sees the other).  The next
    /// message handed to the port (`Inbox.take`) clears the mark.
    #[getter]
    fn global_paused(&self) -> bool {
        match self.shared.receive() {
            Some(window) => window.set_waiting(true),
            None => false,
        }
    }
    /// Bytes the framer holds and of packets held past the active credit.
    #[getter]
    fn held_bytes(&self) -> u64 {
        self.shared.framing_bytes.load(Ordering::Relaxed)
    }
    /// Packets refused for exceeding packet_size.
    #[getter]
    fn packets_too_large(&self) -> u64 {
        self.shared.packets_too_large.load(Ordering::Relaxed)
    }
    /// The owner took what was delivered down to the low watermarks.
    fn drained(&self) -> bool {
        self.shared
            .receive()
            .map_or(true, |window| window.drained())
    }
    /// An accepted TCP connection's peer address as ``socket.getpeername()`` gives it
    /// (``(host, port)``, or ``(host, port, flowinfo, scope_id)`` for IPv6), a new tuple
    /// each call; None for any other connection (its port was given its address).
    /// The host's string is shared with the last peer address made so, when it is the
    /// same host, as the drain shares it between accepted connections.
    #[getter]
    fn peer_address<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let Some(peer) = &self.peer else {
            return Ok(None);
        };
        let peer = peer.address();
        let ip = peer.ip();
        let host = match PEER_HOST.lock() {
            Ok(mut last) => match &*last {
                Some((known, host)) if *known == ip => host.bind(py).clone(),
                _ => {
                    let host = pyo3::types::PyString::new(py, &ip.to_string());
                    *last = Some((ip, host.clone().unbind()));
                    host
                }
            },
            Err(_) => pyo3::types::PyString::new(py, &ip.to_string()),
        };
        Ok(Some(match peer {
            SocketAddr::V4(a) => (host, a.port()).into_pyobject(py)?,
            SocketAddr::V6(a) => (host, a.port(), a.flowinfo(), a.scope_id()).into_pyobject(py)?,
        }))
    }
    fn __repr__(&self) -> String {
        format!("<native Conn {} slot {}>", self.shared.id, self.shared.slot)
    }
}

/// The largest msgpack packet the drain decodes with its reused `Unpacker` (bytes): that
/// decoder's buffer, which it never shrinks (see [`Inbox`]'s `unpackb`).
const REUSED_DECODER_MAX: usize = 16 << 10;

/// A loop's end of the I/O thread's events: a wake-up fd and one call that turns every
/// queued batch into `(target, message)` pairs.
#[pyclass(module = "ioserver._native")]
pub struct Inbox {
    queue: Arc<WakeQueue<Vec<Event>>>,
    /// Its number in the I/O thread (the order of the AddInbox commands).
    index: usize,
    shared: Arc<Shared>,
    /// The budget's charges (the buffers this loop drops are unpinned there).
    charges: Arc<Charges>,
    /// The loops' counters (an accepted port's window counts there).
    counters: Arc<LoopCounters>,
    stop_target: Py<PyAny>,
    data: Py<PyAny>,
    /// ``object.__new__`` and ``Data.data.__set__``: a Data without its dataclass
    /// ``__init__`` (frozen: it would go through ``object.__setattr__``), as the Python
    /// I/O thread makes them.
    new: Py<PyAny>,
    set_data: Py<PyAny>,
    closed: Py<PyAny>,
    error: Py<PyAny>,
    accepted: Py<PyAny>,
    passive: Py<PyAny>,
    writable: Py<PyAny>,
    errno_name: Py<PyAny>,
    connect_error: Py<PyAny>,
    eof: Py<PyAny>,
    /// A small msgpack packet's decoder (at most [`REUSED_DECODER_MAX`] bytes):
    /// `msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=16 KiB)` (the
    /// Python framer's options; its length caps are the buffer's size, which the whole
    /// object fits), made by `unpacker`, and its `feed` and `unpack`.  One per loop,
    /// reused: `feed` then `unpack` is 410 ns for a small object where `unpackb` with its
    /// keywords is 675 (1,000 called with a dict from here): keywords cost a Cython
    /// function more than its decoding.  Replaced after a refusal (it may hold the rest of
    /// the object), and checked after each object: it must have consumed exactly the
    /// packet (see [`ReusedDecoder`]).
    unpacker: Py<PyAny>,
    decoder: Mutex<Option<ReusedDecoder>>,
    /// `msgpack.OutOfData`: the reused decoder found the packet unfinished.
    out_of_data: Py<PyAny>,
    /// A larger packet's: `msgpack.unpackb` with `unpack_options` (`raw=False,
    /// strict_map_key=False`; its caps default to the packet's size), as the Python
    /// framer decodes one object.  The reused `Unpacker` keeps the largest buffer it ever
    /// held, so it never takes more than its 16 KiB: a loop keeps no copy of a large
    /// object it decoded once.
    unpackb: Py<PyAny>,
    unpack_options: Py<PyDict>,
    /// The last accepted connection's addresses as Python objects, reused for the next
    /// (see [`Inbox::accepted_addresses`]).
    addresses: Mutex<AddressCache>,
    /// What the hosted half delivers to this loop, staged by its handlers on the I/O
    /// thread (``stage``: this list's ``append``) and moved to the loop's batch after each
    /// hosted round (`hosted.rs`).
    hosted: Py<PyList>,
    /// What an interrupted `take` left for the next (see [`Carried`]).
    carried: Mutex<Carried>,
    /// A test hook (``_fail_packets_for_test``): the next this many ``Data`` messages (a
    /// raw read's, a decoded object's, a charged packet's) raise ``MemoryError`` while
    /// being built.  Relaxed: touched by the loop's thread only (one load per message).
    fail_packets: std::sync::atomic::AtomicU32,
    /// A test hook (``_fail_replies_for_test``): the next this many connect or listen
    /// replies raise ``MemoryError`` while being built.  Relaxed: touched by the loop's
    /// thread only.
    fail_replies: std::sync::atomic::AtomicU32,
    /// A test hook (``_fail_hosted_for_test``): appending the next this many batches of
    /// the hosted half's pairs raises ``MemoryError``.  Relaxed: touched by the loop's
    /// thread only.
    fail_hosted: std::sync::atomic::AtomicU32,
    /// A test hook (``_fail_closes_for_test``): appending the next this many pairs of a
    /// failed port's last messages ([`Inbox::fail`]) raises ``MemoryError``.  Relaxed:
    /// touched by the loop's thread only (on a port's failure, never per message).
    fail_closes: std::sync::atomic::AtomicU32,
    /// The last take postponed events (a `MemoryError` appending the hosted half's pairs:
    /// [`Unbuilt::Postponed`]): an episode of postponements, counted once in
    /// `internal_errors` at its start, ended by a take that postpones nothing.  The hub
    /// reads it (``postponed``) to retry after a short wait rather than at once.  Relaxed:
    /// touched by the loop's thread only.
    postponing: std::sync::atomic::AtomicBool,
}

/// What a `take` interrupted by a `BaseException` that is not an `Exception` (a
/// `KeyboardInterrupt` in one of the Python calls that build an event) leaves for the
/// next one, which returns it first: the pairs it built (`pairs`: `Some` while anything is
/// carried) and the events it had not built yet, the interrupted one first.  A take that
/// postponed events ([`Unbuilt::Postponed`]) returned its pairs: it leaves its events
/// only (`pairs` None, `events` not empty), and `postponed` set.
#[derive(Default)]
struct Carried {
    pairs: Option<Py<PyList>>,
    events: Vec<Event>,
    /// A failed port's last messages (its `Error`, its `Closed`) that [`Inbox::fail`]
    /// built but could not append (a `MemoryError`): `(target, message)`, appended first
    /// at the next take ([`Inbox::append_untold`]).  Before, that owner was never told,
    /// and its receive waited for good.
    untold: Vec<(Py<PyAny>, Py<PyAny>)>,
    /// The events are postponed (a `MemoryError`), not interrupted: the loop may sleep
    /// on its fd, and its hub retries after a short wait ([`Inbox::prepare_to_sleep`]).
    postponed: bool,
}

impl Carried {
    /// Anything is carried to the next take.
    fn any(&self) -> bool {
        self.pairs.is_some() || !self.events.is_empty()
    }
}

/// How [`Inbox::build_all`] ended without an interrupt.
#[derive(PartialEq)]
enum Built {
    /// Every event built (or failed, counted).
    All,
    /// Events postponed (carried to the next take): the take stops there, so that no
    /// later event comes before them.
    Postponed,
}

/// The high bit of the packet hook's count (``_panic_packets_for_test``): its faults are
/// panics, not `MemoryError`s.
const PANIC_FAULT: u32 = 1 << 31;

/// Why [`Inbox::build`] did not build an event.
enum Unbuilt {
    /// An `Exception` (a `make_port` that raised, a `MemoryError`): the event's own
    /// failure, dealt with as far as it can be (the owner told, the new connection
    /// closed); `take` reports it as unraisable and goes on.
    Failed(PyErr),
    /// A `BaseException` that is not an `Exception` (a `KeyboardInterrupt`, a
    /// `SystemExit`: a signal handler that ran in one of the build's Python calls - a
    /// decode's, `errno_name`, a message's dataclass `__init__`, `make_port`,
    /// `connect_error`): not the event's fault, and not to be swallowed (trio's and
    /// anyio's rule).  Nothing of the event was done yet: it is given back whole, to be
    /// built again at the next take (boxed: an event is large, an interrupt rare).
    Interrupted(PyErr, Box<Event>),
    /// The hosted half's pairs ([`Event::Hosted`]) could not be appended (a
    /// `MemoryError`: one allocation, so none was): they are messages already made, with
    /// their charges counted, of many ports, so neither dropped nor failed - kept whole,
    /// with the events after them, for the next take, which the loop makes at once
    /// (`prepare_to_sleep` is false while anything is carried).  Before, they were
    /// appended one by one and the rest dropped at the first that failed.
    Postponed(Box<Event>),
}

/// The reused msgpack decoder's bound methods: `feed`, `unpack` and `read_bytes`.  Each
/// packet is one whole object by the Rust framer's reckoning, and the decoder must agree:
/// after `feed(packet)`, one `unpack()` must neither find the object unfinished
/// (`OutOfData`) nor leave a byte in the decoder (`read_bytes(1)` is empty).  Were the two
/// ever to disagree, bytes of one object would stay in the decoder and begin the next (a
/// corrupt or duplicated message); instead the packet is refused (the port fails with
/// `EPROTO`, "the framer's object boundary and the decoder's disagree") and the decoder
/// is dropped, so nothing is carried over.
struct ReusedDecoder {
    feed: Py<PyAny>,
    unpack: Py<PyAny>,
    read_bytes: Py<PyAny>,
}

/// The error of a packet the reused decoder did not find to be exactly one object.
fn boundaries_disagree(framed: usize, unfinished: bool) -> PyErr {
    let found = if unfinished {
        "the decoder's object goes on past them"
    } else {
        "the decoder's object ends before them"
    };
    PyValueError::new_err(format!(
        "the framer's object boundary and the decoder's disagree ({framed} bytes framed, {found})"
    ))
}

/// Python objects of recent addresses: the local address of the last accepted connection
/// (the same for every connection of one listener) and the last peer host's string (the
/// same for every connection from one client host).  Each is shared by the ports that
/// have it, instead of a tuple and a string per port (about 200 bytes a connection).
#[derive(Default)]
struct AddressCache {
    local: Option<(SocketAddr, Py<PyTuple>)>,
    host: Option<(IpAddr, Py<pyo3::types::PyString>)>,
}

impl Inbox {
    /// An accepted connection's `(local, remote)` addresses as `address` makes them, with
    /// the local tuple and the remote host's string shared with the previous connection's
    /// when they are equal (they are immutable, so nobody can tell).
    fn accepted_addresses<'py>(
        &self,
        py: Python<'py>,
        local: &Address,
        remote: &Address,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let (Address::Inet(local), Address::Inet(remote)) = (local, remote) else {
            // A Unix connection: its local address is its listener's path, shared already.
            return Ok((address_object(py, local)?, address_object(py, remote)?));
        };
        let Ok(mut cache) = self.addresses.lock() else {
            let (local, remote) = (address(py, local)?, address(py, remote)?);
            return Ok((local.into_any(), remote.into_any()));
        };
        let local = match &cache.local {
            Some((known, tuple)) if known == local => tuple.bind(py).clone(),
            _ => {
                let tuple = address(py, local)?;
                cache.local = Some((*local, tuple.clone().unbind()));
                tuple
            }
        };
        let ip = remote.ip();
        let host = match &cache.host {
            Some((known, host)) if *known == ip => host.bind(py).clone(),
            _ => {
                let host = pyo3::types::PyString::new(py, &ip.to_string());
                cache.host = Some((ip, host.clone().unbind()));
                host
            }
        };
        let remote = match remote {
            SocketAddr::V4(a) => (host, a.port()).into_pyobject(py)?,
            SocketAddr::V6(a) => (host, a.port(), a.flowinfo(), a.scope_id()).into_pyobject(py)?,
        };
        Ok((local.into_any(), remote.into_any()))
    }

    /// The message of an object packet (`Event::Object`): the decoded msgpack object, the
    /// command's `list[bytes]`, the resp error's exception.  `Err`: the msgpack decoder
    /// raised.
    fn object<'py>(&self, py: Python<'py>, payload: &Payload) -> PyResult<Bound<'py, PyAny>> {
        Ok(match payload {
            Payload::Msgpack(bytes) if bytes.len() > REUSED_DECODER_MAX => {
                let packet = new_bytes(py, bytes)?;
                let options = self.unpack_options.bind(py);
                self.unpackb.bind(py).call((packet,), Some(options))?
            }
            Payload::Msgpack(bytes) => {
                let packet = new_bytes(py, bytes)?;
                // Taken out of the lock while Python runs (nothing is held across a call).
                let held = self
                    .decoder
                    .lock()
                    .ok()
                    .and_then(|mut decoder| decoder.take());
                let reused = match held {
                    Some(reused) => reused,
                    None => {
                        let unpacker = self.unpacker.bind(py).call0()?;
                        ReusedDecoder {
                            feed: unpacker.getattr("feed")?.unbind(),
                            unpack: unpacker.getattr("unpack")?.unbind(),
                            read_bytes: unpacker.getattr("read_bytes")?.unbind(),
                        }
                    }
                };
                reused.feed.bind(py).call1((packet,))?;
                let object = match reused.unpack.bind(py).call0() {
                    Ok(object) => object,
                    Err(error) if error.is_instance(py, self.out_of_data.bind(py)) => {
                        return Err(boundaries_disagree(bytes.len(), true));
                    }
                    Err(error) => return Err(error),
                };
                // Nothing left, or it would begin the next object.
                if reused.read_bytes.bind(py).call1((1,))?.is_truthy()? {
                    return Err(boundaries_disagree(bytes.len(), false));
                }
                // Put back only after a success: a refused object may leave bytes in it.
                if let Ok(mut decoder) = self.decoder.lock() {
                    *decoder = Some(reused);
                }
                object
            }
            Payload::Command(data, ends) => {
                let arguments = new_list(py)?;
                let mut start = 0;
                for &end in ends {
                    arguments.append(new_bytes(py, &data[start..end])?)?;
                    start = end;
                }
                arguments.into_any()
            }
            Payload::Error(error) => crate::framing::frame_error(py, error)?,
            Payload::Bytes(bytes) => new_bytes(py, bytes)?.into_any(),
        })
    }

    /// A msgpack packet of `port` did not decode (`error`), or a packet's message could not
    /// be delivered (a `MemoryError`: [`Inbox::deliver_packet`]): tell its owner as the
    /// Python core does, drop what comes for the port after this, and have the I/O thread
    /// close it.  The decoder's refusal (`ValueError`, `TypeError`) is the framer's
    /// (`MsgpackFramer._decode`, then `IOThread._frame_error`): `Error("EPROTO", EPROTO,
    /// "malformed msgpack data: <its text>")`, then `Closed("EPROTO")`; another exception
    /// is an internal error (`IOThread._internal_error`): reported as unraisable, then
    /// `Closed("internal error: <repr>", "EIO")`.  The packet's `charge` is counted taken
    /// (it never reaches the owner), as is every later packet's (`drop_failed`).
    ///
    /// A `BaseException` that is not an `Exception` while the messages are built (a
    /// `KeyboardInterrupt` in `errno_name`) is returned before anything is done: the
    /// event is built again at the next take ([`Unbuilt::Interrupted`]).
    fn fail(
        &self,
        py: Python<'_>,
        list: &Bound<'_, PyList>,
        port: &Target,
        slot: usize,
        charge: u64,
        error: PyErr,
    ) -> PyResult<()> {
        let obj = &port.obj;
        let internal =
            !(error.is_instance_of::<PyValueError>(py) || error.is_instance_of::<PyTypeError>(py));
        // The owner's last messages are built first: should that fail too (a MemoryError,
        // a str() that raises), the owner still gets a Closed, and only then is the port
        // marked failed (every later event of it dropped, its Closed included).
        let built = || -> PyResult<Vec<Bound<'_, PyAny>>> {
            if !internal {
                let text = format!("malformed msgpack data: {}", error.value(py).str()?);
                let name = self.errno_name.bind(py).call1((libc::EPROTO,))?;
                let message = self.error.bind(py).call1((&name, libc::EPROTO, text))?;
                let closed = self.closed.bind(py).call1((&name, &name))?;
                Ok(vec![message, closed])
            } else {
                let reason = format!("internal error: {}", error.value(py).repr()?);
                Ok(vec![self.closed.bind(py).call1((reason, "EIO"))?])
            }
        };
        // Should even the plain `Closed` fail (a `MemoryError`), the port still fails,
        // with no last message (`failures` says so, once).
        let mut failures = Vec::new();
        let messages = match built() {
            Ok(messages) => messages,
            Err(second) if !second.is_instance_of::<PyException>(py) => return Err(second),
            Err(second) => {
                failures.push(second);
                match self.closed.bind(py).call1(("internal error", "EIO")) {
                    Ok(closed) => vec![closed],
                    Err(third) if !third.is_instance_of::<PyException>(py) => return Err(third),
                    Err(third) => {
                        failures.push(third);
                        Vec::new()
                    }
                }
            }
        };
        if let Some(window) = &port.window {
            window.mark_decode_failed();
            let _ = window.took(charge);
        }
        self.shared
            .commands
            .put(Command::DecodeFailed(port.clone(), self.index, slot));
        let mut messages = messages.into_iter();
        while let Some(message) = messages.next() {
            let appended = self
                .close_fault()
                .and_then(|()| Inbox::append_pair(py, list, obj, message.clone()));
            if let Err(second) = appended {
                // Told at the next take (`append_untold`): this one and those after it.
                failures.push(second);
                let mut untold = vec![(obj.clone_ref(py), message.unbind())];
                untold.extend(messages.map(|message| (obj.clone_ref(py), message.unbind())));
                self.carried().untold.append(&mut untold);
                break;
            }
        }
        // (Reported and counted once the messages are built: an interrupted build is
        // retried.)  Counted once - the port's failure, however many of its steps failed
        // - as the Python core's `_internal_error` counts it; before, a last message that
        // could not be appended was counted again (`take` counted the error `fail`
        // returned).  A last message that could not be appended is carried to the next
        // take (`untold`); the port is closed, its later events dropped.
        if internal || !failures.is_empty() {
            self.shared.internal_errors.fetch_add(1, Ordering::Relaxed);
        }
        if internal {
            error.write_unraisable(py, Some(obj.bind(py)));
        }
        for failure in failures {
            failure.write_unraisable(py, Some(obj.bind(py)));
        }
        Ok(())
    }

    /// The test hook's fault (``_fail_closes_for_test``): `MemoryError` while it lasts.
    fn close_fault(&self) -> PyResult<()> {
        countdown_fault(&self.fail_closes)
    }

    /// An event for a port whose msgpack packet failed to decode (`Inbox::fail`): dropped,
    /// a packet's charge counted taken; false for every other event.
    fn drop_failed(event: &Event) -> bool {
        let (port, charge) = match event {
            Event::Object(port, _, charge, _) | Event::Packet(port, _, charge, _) => {
                (port, *charge)
            }
            Event::Data(port, bytes, _) => (port, bytes.len() as u64),
            Event::Eof(port)
            | Event::Shutdown(port)
            | Event::Broken(port, _)
            | Event::Passive(port)
            | Event::Writable(port)
            | Event::FrameError(port, _, _)
            | Event::Aborted(port, _) => (port, 0),
            _ => return false,
        };
        if !port.failed() {
            return false;
        }
        if let (Some(window), true) = (&port.window, charge > 0) {
            let _ = window.took(charge);
        }
        true
    }

    /// Answer a connect or listen `request` with `answer`; if building it failed (a
    /// `MemoryError`...), with that error instead - the owner's ``connect_*`` or
    /// ``listen_*`` raises it - and the port the I/O thread opened for it (`conn`) is
    /// closed.  The owner always gets an answer: before, the error was only reported as
    /// unraisable, and the owner waited for good with the port left open.  A
    /// `BaseException` that is not an `Exception` (a `KeyboardInterrupt` in
    /// `connect_error`) is returned instead, the port left open: the event is built again
    /// at the next take ([`Unbuilt::Interrupted`]).
    fn answer<'py>(
        &self,
        py: Python<'py>,
        list: &Bound<'py, PyList>,
        request: &PyTarget,
        answer: PyResult<Bound<'py, PyAny>>,
        conn: Option<&Arc<ConnShared>>,
    ) -> PyResult<()> {
        let message = match answer {
            Ok(message) => message,
            Err(error) if !error.is_instance_of::<PyException>(py) => return Err(error),
            Err(error) => {
                if let Some(conn) = conn {
                    self.shared.commands.put(Command::Close(Arc::clone(conn)));
                }
                error.into_value(py).into_bound(py).into_any()
            }
        };
        Inbox::append_pair(py, list, &request.obj, message)
    }

    /// What the last `take` left when it was interrupted (see [`Carried`]): its pairs (or a
    /// new list) and its events, if any.
    ///
    /// The new list is made before anything is taken: should it fail (a `MemoryError`),
    /// the take raises it and everything stays where it was (`PyList::empty` panicked).
    /// (The lock is not held across the allocation, which may run a collection.)
    fn resume<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyList>, Option<Vec<Event>>)> {
        let interrupted = {
            let mut carried = self.carried();
            carried.pairs.take().map(|pairs| {
                carried.postponed = false;
                (pairs, std::mem::take(&mut carried.events))
            })
        };
        if let Some((pairs, events)) = interrupted {
            return Ok((pairs.into_bound(py), Some(events)));
        }
        let list = new_list(py)?;
        let mut carried = self.carried();
        if carried.events.is_empty() {
            return Ok((list, None));
        }
        carried.postponed = false;
        Ok((list, Some(std::mem::take(&mut carried.events))))
    }

    /// Build `events` into `list`; on a `BaseException` that is not an `Exception`, keep
    /// `list` and the events not built (the interrupted one first) for the next `take`,
    /// and raise it.  [`Built::Postponed`] when an event was postponed: it and the events
    /// after it wait for the next `take` (without `list`, which goes to the loop now),
    /// and this take must end here, so that no later batch overtakes them.
    fn build_all(
        &self,
        py: Python<'_>,
        list: &Bound<'_, PyList>,
        events: Vec<Event>,
    ) -> PyResult<Built> {
        let mut events = events.into_iter();
        while let Some(event) = events.next() {
            match self.build(py, list, event) {
                Ok(()) => {}
                Err(Unbuilt::Failed(error)) => {
                    // An internal error, as the Python core's `_internal_error` counts.
                    self.shared.internal_errors.fetch_add(1, Ordering::Relaxed);
                    error.write_unraisable(py, None)
                }
                Err(Unbuilt::Interrupted(error, event)) => {
                    self.carry(Some(list), *event, events);
                    return Err(error);
                }
                Err(Unbuilt::Postponed(event)) => {
                    // Nothing of it was appended (one allocation, all or nothing): it and
                    // the events after it wait for the next take, in order.  The pairs
                    // built so far are this take's (returned): not carried, or the next
                    // take would return them again.  Counted once an episode.
                    if !self.postponing.swap(true, Ordering::Relaxed) {
                        self.shared.internal_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    self.carry(None, *event, events);
                    return Ok(Built::Postponed);
                }
            }
        }
        Ok(Built::All)
    }

    /// Append the pair `(target, message)` to `list`, its tuple made fallibly
    /// ([`new_pair`]: a `MemoryError`, where PyO3's tuple conversion panicked).
    fn append_pair(
        py: Python<'_>,
        list: &Bound<'_, PyList>,
        target: &Py<PyAny>,
        message: Bound<'_, PyAny>,
    ) -> PyResult<()> {
        list.append(new_pair(py, target.bind(py).clone(), message)?)
    }

    /// The carried events, whatever became of the lock: a panic while it was held
    /// (poisoning it) cannot lose them.  No code that can panic runs while it is held
    /// (moves, and a `Vec` reserved before it is taken); should one ever, what the lock
    /// holds is still whole - `pairs` and `events` are each replaced by one move - so
    /// the poisoned data is taken as it is (`PoisonError::into_inner`) rather than
    /// dropped, which lost the events and left the loop asleep with them.
    fn carried(&self) -> std::sync::MutexGuard<'_, Carried> {
        self.carried
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keep `list` (an interrupted take's pairs; None: a postponing take's, which it
    /// returns) and the events not built (`event`, then `rest`) for the next `take`.
    fn carry(
        &self,
        list: Option<&Bound<'_, PyList>>,
        event: Event,
        rest: std::vec::IntoIter<Event>,
    ) {
        let mut left = Vec::with_capacity(1 + rest.len());
        left.push(event);
        left.extend(rest);
        let pairs = list.map(|list| list.clone().unbind());
        let mut carried = self.carried();
        carried.events = left;
        carried.postponed = pairs.is_none();
        carried.pairs = pairs;
    }

    /// Append the failed ports' last messages that [`Inbox::fail`] could not append
    /// (`untold`) to `list`, first in this take (they end their ports: no later event of
    /// those ports is delivered).  False if appending failed again: those left stay, in
    /// order, for the next take.
    fn append_untold(&self, py: Python<'_>, list: &Bound<'_, PyList>) -> bool {
        let untold = std::mem::take(&mut self.carried().untold);
        let mut untold = untold.into_iter();
        while let Some((target, message)) = untold.next() {
            if Inbox::append_pair(py, list, &target, message.bind(py).clone()).is_err() {
                // (The failure is counted: its port's, once, in `fail`.)
                let mut left = vec![(target, message)];
                left.extend(untold);
                let mut carried = self.carried();
                left.append(&mut carried.untold);
                carried.untold = left;
                return false;
            }
        }
        true
    }

    /// A test hook's fault (``_poison_carried_for_test``): a panic while the carried
    /// events' lock is held, which poisons it.
    fn poison_carried(&self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = self.carried.lock();
            panic!("a panic while the carried events' lock is held (a test's)");
        }));
    }

    /// A packet's `Data(payload)` message (``Data`` without its ``__init__``).
    fn data_message<'py>(
        &self,
        py: Python<'py>,
        payload: Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.packet_fault()?;
        let data = self.new.bind(py).call1((self.data.bind(py),))?;
        self.set_data.bind(py).call1((&data, payload))?;
        Ok(data)
    }

    /// Deliver a packet's `data` message, charged `charge`: its charge to the port's
    /// `window.sizes` (the port pops it when its owner takes the packet), then the pair -
    /// both or neither.  Built first, so that no failure can come between them: a charge
    /// appended without its message shifted every later one of the port, and left the
    /// difference charged for good.  Should either fail (a `MemoryError`), the appended
    /// charge is taken back and the port fails as an undecodable packet does
    /// ([`Inbox::fail`]: its owner told, its charge counted taken).
    fn deliver_packet(
        &self,
        py: Python<'_>,
        list: &Bound<'_, PyList>,
        port: &Target,
        slot: usize,
        charge: u64,
        data: Bound<'_, PyAny>,
    ) -> PyResult<()> {
        if let Some(window) = &port.window {
            window.task_woken();
        }
        if let Some(sizes) = port.sizes() {
            if let Err(error) = sizes.bind(py).call1((charge,)) {
                return self.fail(py, list, port, slot, charge, error);
            }
        }
        let Err(error) = Inbox::append_pair(py, list, &port.obj, data) else {
            return Ok(());
        };
        if let Some(sizes) = port.sizes() {
            // (The deque's `pop`: the charge just appended, its last.)
            let popped = sizes
                .bind(py)
                .getattr("__self__")
                .and_then(|deque| deque.call_method0("pop"));
            if let Err(second) = popped {
                second.write_unraisable(py, Some(port.obj.bind(py)));
            }
        }
        self.fail(py, list, port, slot, charge, error)
    }

    /// The test hook's fault (``_fail_packets_for_test``, ``_panic_packets_for_test``).
    fn packet_fault(&self) -> PyResult<()> {
        countdown_fault(&self.fail_packets)
    }

    /// The test hook's fault (``_fail_hosted_for_test``): `MemoryError` while it lasts.
    fn hosted_fault(&self) -> PyResult<()> {
        countdown_fault(&self.fail_hosted)
    }

    /// The test hook's fault (``_fail_replies_for_test``, ``_panic_replies_for_test``).
    fn reply_fault(&self) -> PyResult<()> {
        countdown_fault(&self.fail_replies)
    }

    /// Build `event`'s pairs into `list`.  A `BaseException` that is not an `Exception`
    /// raised by one of its Python calls gives the event back ([`Unbuilt::Interrupted`]),
    /// whatever its kind: [`Inbox::build_event`] does nothing that is not undone or that
    /// cannot be done again before its last call that may raise one, so the next take
    /// builds it again whole - nothing lost, nothing twice, and no charge taken twice.
    fn build(&self, py: Python<'_>, list: &Bound<'_, PyList>, event: Event) -> Result<(), Unbuilt> {
        if Inbox::drop_failed(&event) {
            return Ok(());
        }
        let event = match event {
            Event::Release(bytes, targets) => {
                // Under the GIL: each drop is an immediate decref (no Python call).
                let mut size = 0u64;
                for held in bytes {
                    size += held.len() as u64;
                    drop(held.into_object());
                }
                self.charges.unpin(size);
                drop(targets);
                return Ok(());
            }
            event => event,
        };
        // The boundary of one event's build: a panic in it (PyO3 panics where CPython
        // cannot allocate an object its conversions make - a `str`, an `int`, a tuple of
        // arguments - `panic_after_error`) is caught here, so that it neither unwinds past
        // the take's events (lost) nor out of `take` (a `PanicException`, which no hub
        // catches); the event is then failed as an internal error ([`Inbox::panicked`]).
        // The drain's own allocations are fallible (`new_bytes`, `new_pair`, `new_list`:
        // a `MemoryError`, the failure paths below); this is for the rest.
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.build_event(py, list, &event)
        }));
        let built = match built {
            Ok(built) => built,
            Err(panic) => {
                self.panicked(py, list, &event, panic);
                return Ok(());
            }
        };
        match built {
            Ok(()) => Ok(()),
            Err(error)
                if matches!(event, Event::Hosted(_))
                    && error.is_instance_of::<pyo3::exceptions::PyMemoryError>(py) =>
            {
                Err(Unbuilt::Postponed(Box::new(event)))
            }
            Err(error) if error.is_instance_of::<PyException>(py) => Err(Unbuilt::Failed(error)),
            Err(error) => Err(Unbuilt::Interrupted(error, Box::new(event))),
        }
    }

    /// A panic while `event` was built (caught in [`Inbox::build`]): an internal error,
    /// counted once.  A port's input (a read, a packet, an object) fails its port as a
    /// `MemoryError` would ([`Inbox::fail`]: its owner told, its charge counted taken, the
    /// port closed), so that its stream has no silent gap; should that panic too, the port
    /// is failed without a last message.  A new connection is closed (nobody owns it); a
    /// connect's or a listen's reply answers its request with the error (the port opened
    /// for it closed); another event (a notice) is reported and dropped.
    fn panicked(
        &self,
        py: Python<'_>,
        list: &Bound<'_, PyList>,
        event: &Event,
        panic: Box<dyn std::any::Any + Send>,
    ) {
        let text = crate::core::panic_message(panic.as_ref());
        let failed = match event {
            Event::Object(port, _, charge, slot) | Event::Packet(port, _, charge, slot) => {
                Some((port, *charge, *slot))
            }
            Event::Data(port, bytes, slot) => Some((port, bytes.len() as u64, *slot)),
            Event::Accepted { conn, .. } => {
                self.shared.commands.put(Command::Close(Arc::clone(conn)));
                None
            }
            _ => None,
        };
        let error = || PyRuntimeError::new_err(format!("a panic in the drain: {text}"));
        // A reply is answered with the error (its owner's `connect_tcp`/`listen_tcp`
        // raises it) and the port the thread opened for it is closed, as for a
        // `MemoryError` ([`Inbox::answer`]): dropped, its owner would wait for good.
        let reply = match event {
            Event::Connected { request, conn, .. } | Event::Listening(request, conn, _) => {
                Some((request, Some(conn)))
            }
            Event::ConnectFailed(request, ..) => Some((request, None)),
            _ => None,
        };
        if let Some((request, conn)) = reply {
            let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.answer(py, list, request, Err(error()), conn)
            }));
            if !matches!(answered, Ok(Ok(()))) {
                if let Some(conn) = conn {
                    self.shared.commands.put(Command::Close(Arc::clone(conn)));
                }
            }
        }
        if let Some((port, charge, slot)) = failed {
            // (`fail` counts and reports it.)
            let failing = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.fail(py, list, port, slot, charge, error())
            }));
            if matches!(failing, Ok(Ok(()))) {
                return;
            }
            if !port.failed() {
                if let Some(window) = &port.window {
                    window.mark_decode_failed();
                    let _ = window.took(charge);
                }
                self.shared
                    .commands
                    .put(Command::DecodeFailed(port.clone(), self.index, slot));
            }
        }
        self.shared.internal_errors.fetch_add(1, Ordering::Relaxed);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            error().write_unraisable(py, None)
        }));
    }

    /// Build `event` (any but `Release`) into `list`.  Its rule, for [`Inbox::build`]:
    /// every Python call that may raise (and so be interrupted: a signal handler runs in
    /// any of them) comes before anything is done that could not be done again - a pair
    /// appended, a charge counted, a command queued - or, where an `Exception` leads to
    /// such a thing (a failed port, a new connection closed), that is done for an
    /// `Exception` only.
    fn build_event(&self, py: Python<'_>, list: &Bound<'_, PyList>, event: &Event) -> PyResult<()> {
        let pair = |target: &PyTarget, message: Bound<'_, PyAny>| -> PyResult<()> {
            Inbox::append_pair(py, list, &target.obj, message)
        };
        let interrupted = |error: &PyErr| !error.is_instance_of::<PyException>(py);
        match event {
            Event::Object(port, payload, charge, slot) => {
                let (charge, slot) = (*charge, *slot);
                let message = match self.object(py, payload) {
                    Ok(message) => message,
                    Err(error) if interrupted(&error) => return Err(error),
                    Err(error) => return self.fail(py, list, port, slot, charge, error),
                };
                let data = match self.data_message(py, message) {
                    Ok(data) => data,
                    Err(error) if interrupted(&error) => return Err(error),
                    Err(error) => return self.fail(py, list, port, slot, charge, error),
                };
                self.deliver_packet(py, list, port, slot, charge, data)
            }
            Event::Data(port, bytes, slot) => {
                // Charged its length, which the port counts taken as its owner takes it.
                // A message that could not be made or appended (a `MemoryError`) fails
                // the port as a packet's does ([`Inbox::fail`]: its owner told, its
                // charge counted taken, the port closed); before, it was dropped, the
                // port went on with a gap in its stream, and its charge stayed for good.
                let charge = bytes.len() as u64;
                if let Some(window) = &port.window {
                    window.task_woken();
                }
                let data = new_bytes(py, bytes).and_then(|b| self.data_message(py, b.into_any()));
                let data = match data {
                    Ok(data) => data,
                    Err(error) if interrupted(&error) => return Err(error),
                    Err(error) => return self.fail(py, list, port, *slot, charge, error),
                };
                match pair(port, data) {
                    Ok(()) => Ok(()),
                    Err(error) => self.fail(py, list, port, *slot, charge, error),
                }
            }
            Event::Packet(port, bytes, charge, slot) => {
                let (charge, slot) = (*charge, *slot);
                let data = new_bytes(py, bytes).and_then(|b| self.data_message(py, b.into_any()));
                let data = match data {
                    Ok(data) => data,
                    Err(error) if interrupted(&error) => return Err(error),
                    Err(error) => return self.fail(py, list, port, slot, charge, error),
                };
                self.deliver_packet(py, list, port, slot, charge, data)
            }
            Event::Eof(port) => pair(port, self.eof.bind(py).clone()),
            Event::Shutdown(port) => {
                let message = self
                    .closed
                    .bind(py)
                    .call1(("ioserver closed", "ESHUTDOWN"))?;
                pair(port, message)
            }
            Event::Broken(port, errno) => {
                let name = self.errno_name.bind(py).call1((*errno,))?;
                let message = self.closed.bind(py).call1((&name, &name))?;
                pair(port, message)
            }
            Event::Passive(port) => pair(port, self.passive.bind(py).clone()),
            Event::FrameError(port, errno, text) => {
                let name = self.errno_name.bind(py).call1((*errno,))?;
                let message = self.error.bind(py).call1((&name, *errno, text))?;
                pair(port, message)
            }
            Event::Writable(port) => pair(port, self.writable.bind(py).clone()),
            Event::AcceptError(listener, errno) => {
                let name = self.errno_name.bind(py).call1((*errno,))?;
                let text = std::io::Error::from_raw_os_error(*errno).to_string();
                let message = format!("accept failed: {text} ({name})");
                let message = self.error.bind(py).call1((&name, *errno, message))?;
                pair(listener, message)
            }
            Event::Accepted {
                listener,
                conn,
                local,
                remote,
            } => {
                // The port is made and its Accepted built and appended first; only then is
                // its window configured and the port attached.  An `Exception` before
                // that closes the new connection (nobody will own it); an interrupt
                // leaves it for the next take, which makes the port again.
                let made = self.accepted_port(py, list, listener, conn, local, remote);
                let (watermarks, window, attached, overhead) = match made {
                    Ok(made) => made,
                    Err(error) => {
                        if !interrupted(&error) {
                            self.shared.commands.put(Command::Close(Arc::clone(conn)));
                        }
                        return Err(error);
                    }
                };
                // Configured here, on the loop's thread, before the owner can use it.
                window.configure(watermarks, Arc::clone(&self.counters));
                let _ = conn.window.set(window);
                self.shared
                    .commands
                    .put(Command::Attach(Arc::clone(conn), attached, overhead));
                Ok(())
            }
            Event::Connected {
                request,
                conn,
                local,
                remote,
            } => {
                let answer = || -> PyResult<Bound<'_, PyAny>> {
                    self.reply_fault()?;
                    let handle = Py::new(py, Conn::new(conn.clone()))?;
                    let local = address_object(py, local)?;
                    let answer = (handle, local, address_object(py, remote)?);
                    Ok(answer.into_pyobject(py)?.into_any())
                };
                self.answer(py, list, request, answer(), Some(conn))
            }
            Event::ConnectFailed(request, errno, to) => {
                let answer = || -> PyResult<Bound<'_, PyAny>> {
                    let to = address_object(py, to)?;
                    self.connect_error.bind(py).call1((*errno, to))
                };
                self.answer(py, list, request, answer(), None)
            }
            Event::Listening(request, conn, local) => {
                let answer = || -> PyResult<Bound<'_, PyAny>> {
                    self.reply_fault()?;
                    let handle = Py::new(py, Conn::new(conn.clone()))?;
                    let answer = (handle, address_object(py, local)?, py.None());
                    Ok(answer.into_pyobject(py)?.into_any())
                };
                self.answer(py, list, request, answer(), Some(conn))
            }
            Event::Release(..) => Ok(()), // (`build`'s)
            Event::Aborted(port, reason) => {
                let message = self.closed.bind(py).call1((reason, "EIO"))?;
                pair(port, message)
            }
            Event::Hosted(pairs) => {
                // All or nothing: one slice assignment (`list[n:n] = pairs`) grows the
                // list once, then moves the pairs; should the growth fail, none is
                // appended, and the event is postponed whole ([`Unbuilt::Postponed`]).
                let end = list.len();
                self.hosted_fault()?;
                list.as_sequence().set_slice(end, end, pairs.bind(py))
            }
            Event::Stop => {
                Inbox::append_pair(py, list, &self.stop_target, py.None().into_bound(py))
            }
        }
    }

    /// An accepted connection's port, made by its listener's ``make_port``, and its
    /// ``Accepted`` appended to `list`: the watermarks its listener gives, the port's
    /// window, target and packet overhead, for the caller to configure and attach.  Nothing is done before the append that could
    /// not be done again (an interrupted build is retried whole).
    fn accepted_port(
        &self,
        py: Python<'_>,
        list: &Bound<'_, PyList>,
        listener: &Target,
        conn: &Arc<ConnShared>,
        local: &Address,
        remote: &Address,
    ) -> PyResult<(Watermarks, Arc<flow::Window>, Target, u64)> {
        // A TCP peer's address stays in the handle until the port asks for it
        // (``Conn.peer_address``): ``make_port`` gets None for it.
        let peer = Peer::of(remote);
        let kept = peer.is_some();
        let handle = Py::new(
            py,
            Conn {
                shared: conn.clone(),
                peer,
            },
        )?;
        let Some(make_port) = listener.make_port() else {
            return Err(PyRuntimeError::new_err("a listener without make_port"));
        };
        let (local, remote) = self.accepted_addresses(py, local, remote)?;
        let given = if kept {
            py.None().into_bound(py)
        } else {
            remote.clone()
        };
        let watermarks = make_port.watermarks;
        let port = make_port.make.bind(py).call1((handle, local, given))?;
        let window = port.getattr("_window")?;
        let window = window.cast_into::<WindowCounters>()?;
        let (attached, overhead) = port_target(port.clone().unbind(), &window)?;
        let message = self.accepted.bind(py).call1((port, remote))?;
        Inbox::append_pair(py, list, &listener.obj, message)?;
        let shared = Arc::clone(&window.get().shared);
        Ok((watermarks, shared, attached, overhead))
    }
}

#[pymethods]
impl Inbox {
    /// The fd that becomes readable when a batch is queued for a sleeping loop.
    fn fileno(&self) -> i32 {
        self.queue.signal.fd()
    }

    /// This object, as the Python inbox's `wakeup` (``fileno()``, ``drain()``).
    #[getter]
    fn wakeup(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Consume the fd's pending signal.
    fn drain(&self) -> bool {
        self.queue.signal.drain()
    }

    /// Announce the loop's sleep: True to block on the fd, False if batches wait (or what
    /// an interrupted `take` left).
    ///
    /// Events postponed by a ``MemoryError`` (``postponed``) do not keep it awake: it may
    /// sleep until the next batch, and its hub takes again after a short wait - retrying
    /// at once, as before, spun the loop for as long as memory stayed short.
    fn prepare_to_sleep(&self) -> bool {
        {
            let carried = self.carried();
            if carried.any() && !carried.postponed {
                return false;
            }
        }
        self.queue.prepare_to_sleep()
    }

    /// The loop is awake again.
    fn woke(&self) {
        self.queue.woke()
    }

    /// Every queued event as a list of ``(target, message)`` pairs, built under the GIL
    /// with the messages of ``ioserver._messages``; the references the I/O thread handed
    /// back (written buffers, closed ports) are dropped here.  An error building one pair
    /// (a ``make_port`` that raised) is reported as unraisable; the others are returned.
    ///
    /// A ``BaseException`` that is not an ``Exception`` (a ``KeyboardInterrupt`` that
    /// landed in one of the Python calls that build an event: a decode's, ``errno_name``,
    /// a message's ``__init__``, ``make_port``, ``connect_error``) propagates: the pairs
    /// built so far, the event it interrupted (of any kind) and the events after it are
    /// kept, in order, and the next call returns them first - nothing lost, nothing
    /// twice.
    ///
    /// A ``MemoryError`` appending the hosted half's pairs postpones them, and every event
    /// after them, to the next take (``postponed`` is then true): this one returns the
    /// pairs built before them; the first postponement of an episode counts in
    /// ``internal_errors``.  A ``MemoryError`` making the take's list raises, nothing
    /// taken.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let (list, events) = self.resume(py)?;
        let told = self.append_untold(py, &list);
        if let Some(events) = events {
            if self.build_all(py, &list, events)? == Built::Postponed {
                return Ok(list);
            }
        }
        while let Some(batch) = self.queue.pop() {
            if self.build_all(py, &list, batch)? == Built::Postponed {
                return Ok(list);
            }
        }
        // Untold messages left (appending them failed again): retried after a short wait.
        self.postponing.store(!told, Ordering::Relaxed);
        Ok(list)
    }

    /// The last take postponed events (a ``MemoryError``): the hub takes again after a
    /// short wait (or the next wake), not at once.
    #[getter]
    fn postponed(&self) -> bool {
        self.postponing.load(Ordering::Relaxed)
    }

    /// The hosted half's ``deliver`` for this loop (its hub's ``deliver``): the ``append``
    /// of a list the I/O thread moves to this loop's batch after each hosted round.  Call
    /// it on the I/O thread only (in a hosted handler), as the Python core's ``stage``.
    #[getter]
    fn stage<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.hosted.bind(py).getattr("append")
    }

    /// Wake-up fd writes towards this loop.
    #[getter]
    fn wakes_sent(&self) -> u64 {
        self.queue.wakes_sent.load(Ordering::Relaxed)
    }
    /// Batches queued while this loop was awake.
    #[getter]
    fn wakes_skipped(&self) -> u64 {
        self.queue.wakes_skipped.load(Ordering::Relaxed)
    }
    /// Wake-ups that found nothing.
    #[getter]
    fn get_spurious_wakes(&self) -> u64 {
        self.queue.spurious_wakes.load(Ordering::Relaxed)
    }
    #[setter]
    fn set_spurious_wakes(&self, value: u64) {
        self.queue.spurious_wakes.store(value, Ordering::Relaxed)
    }
    /// Whether the loop announced its sleep.
    #[getter]
    fn asleep(&self) -> bool {
        self.queue.is_asleep()
    }

    /// Close the wake-up fd (once the I/O thread has ended: it writes it no more).
    fn close(&self) {
        self.queue.signal.close()
    }

    /// A test hook, private (``_fail_replies_for_test``, used only by the tests): the next
    /// ``count`` connect or listen replies (``Connected``, ``Listening``) raise
    /// ``MemoryError`` while this inbox builds them, as a real allocation failure would.
    #[pyo3(name = "_fail_replies_for_test")]
    fn fail_replies_for_test(&self, count: u32) {
        self.fail_replies.store(count, Ordering::Relaxed)
    }

    /// A test hook, private (``_panic_replies_for_test``, used only by the tests): the next
    /// ``count`` connect or listen replies (as ``_fail_replies_for_test``) panic while
    /// this inbox builds them, as PyO3 does where CPython cannot allocate an object.
    #[pyo3(name = "_panic_replies_for_test")]
    fn panic_replies_for_test(&self, count: u32) {
        let count = count.min(!PANIC_FAULT);
        let value = if count == 0 { 0 } else { PANIC_FAULT | count };
        self.fail_replies.store(value, Ordering::Relaxed)
    }

    /// A test hook, private (``_fail_packets_for_test``, used only by the tests): the next
    /// ``count`` ``Data`` messages (a raw read's, a decoded msgpack or resp object's, a
    /// framed port's bytes) raise ``MemoryError`` while this inbox builds them, as a real
    /// allocation failure would.
    #[pyo3(name = "_fail_packets_for_test")]
    fn fail_packets_for_test(&self, count: u32) {
        self.fail_packets.store(count, Ordering::Relaxed)
    }

    /// A test hook, private (``_fail_hosted_for_test``, used only by the tests): appending
    /// the next ``count`` batches of the hosted half's pairs to a take's list raises
    /// ``MemoryError``, as a real allocation failure would.
    #[pyo3(name = "_fail_hosted_for_test")]
    fn fail_hosted_for_test(&self, count: u32) {
        self.fail_hosted.store(count, Ordering::Relaxed)
    }

    /// A test hook, private (``_panic_packets_for_test``, used only by the tests): the next
    /// ``count`` ``Data`` messages (as ``_fail_packets_for_test``) panic while this inbox
    /// builds them, as PyO3 does where CPython cannot allocate an object.
    #[pyo3(name = "_panic_packets_for_test")]
    fn panic_packets_for_test(&self, count: u32) {
        let count = count.min(!PANIC_FAULT);
        let value = if count == 0 { 0 } else { PANIC_FAULT | count };
        self.fail_packets.store(value, Ordering::Relaxed)
    }

    /// A test hook, private (``_fail_closes_for_test``, used only by the tests): appending
    /// the next ``count`` last messages of a port that failed (its ``Closed``...) raises
    /// ``MemoryError``, as a real allocation failure would.
    #[pyo3(name = "_fail_closes_for_test")]
    fn fail_closes_for_test(&self, count: u32) {
        self.fail_closes.store(count, Ordering::Relaxed)
    }

    /// A test hook, private (``_poison_carried_for_test``, used only by the tests): a
    /// panic while the lock of what an interrupted take carries is held, which poisons it.
    #[pyo3(name = "_poison_carried_for_test")]
    fn poison_carried_for_test(&self) {
        self.poison_carried()
    }

    /// Garbage collector integration (PyO3's ``__traverse__``): the Python objects this
    /// inbox holds - its hub (``stop_target``, which holds this inbox: a cycle), the hosted
    /// deliveries' list, what an interrupted take carries, the reused decoder, the cached
    /// addresses, the message classes and functions.  Unseen, the hub and everything it
    /// holds (its ``NativeIOThread``, the ports) outlived every closed server.
    ///
    /// Safe as ``Core.__traverse__`` is (see there): each `Mutex` only tried (the loop's
    /// thread takes them under the GIL, the I/O thread never), no Python call, no panic,
    /// and only the references this inbox owns: not the events queued in `queue` (the
    /// I/O thread's, shared), nor the events an interrupted take carries (their targets
    /// are `Arc`s shared with the I/O thread's port table) - only its pairs list.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        for object in [
            &self.stop_target,
            &self.data,
            &self.new,
            &self.set_data,
            &self.closed,
            &self.error,
            &self.accepted,
            &self.passive,
            &self.writable,
            &self.errno_name,
            &self.connect_error,
            &self.eof,
            &self.unpacker,
            &self.out_of_data,
            &self.unpackb,
        ] {
            visit.call(object)?;
        }
        visit.call(&self.unpack_options)?;
        visit.call(&self.hosted)?;
        if let Some(decoder) = unlocked(&self.decoder) {
            if let Some(decoder) = decoder.as_ref() {
                visit.call(&decoder.feed)?;
                visit.call(&decoder.unpack)?;
                visit.call(&decoder.read_bytes)?;
            }
        }
        if let Some(addresses) = unlocked(&self.addresses) {
            visit.call(addresses.local.as_ref().map(|(_, local)| local))?;
            visit.call(addresses.host.as_ref().map(|(_, host)| host))?;
        }
        if let Some(carried) = unlocked(&self.carried) {
            visit.call(carried.pairs.as_ref())?;
            for (target, message) in &carried.untold {
                visit.call(target)?;
                visit.call(message)?;
            }
        }
        Ok(())
    }

    /// Garbage collector integration (``tp_clear``): drop the references that can lead
    /// back here - the hub (replaced by None: no allocation), what an interrupted take
    /// carries, the decoder, the cached addresses.  The hosted list is left: the collector
    /// clears a list itself; the classes and functions are reachable from their modules,
    /// so never part of a garbage cycle.
    fn __clear__(&mut self) {
        let hub = Python::attach(|py| std::mem::replace(&mut self.stop_target, py.None()));
        let carried = std::mem::take(owned(&mut self.carried));
        let decoder = owned(&mut self.decoder).take();
        let addresses = std::mem::take(owned(&mut self.addresses));
        drop((hub, carried, decoder, addresses));
    }
}

thread_local! {
    /// This thread's loop is running a batch its hub drained: sends queue their commands
    /// without waking the I/O thread, which the hub's flush point wakes once
    /// (`Core.defer_wakes`, `Core.flush_wakes`).  A thread-local, because a loop's ports
    /// send from the loop's own thread.
    static DEFERRING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The cores whose I/O thread a deferred send owes a wake.
    static OWED: std::cell::RefCell<Vec<Arc<Shared>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `mutex`'s value if no thread holds it now (a poisoned one's too: its value is whole,
/// a `Py` or an `Option` of one), without waiting: for `__traverse__`, which must never
/// block (see [`Core::__traverse__`]).
fn unlocked<T>(mutex: &Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match mutex.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// `mutex`'s value through `&mut` (no lock taken: nobody else can hold it), for
/// `__clear__`; a poisoned one's too.
fn owned<T>(mutex: &mut Mutex<T>) -> &mut T {
    mutex
        .get_mut()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The native I/O thread and its command queue.
#[pyclass(module = "ioserver._native")]
pub struct Core {
    shared: Arc<Shared>,
    /// What the budget charges, and the loops' counters: the memory in use.
    charges: Arc<Charges>,
    counters: Arc<LoopCounters>,
    thread: Mutex<Option<IoThread>>,
    handle: Mutex<Option<JoinHandle<()>>>,
    inboxes: Mutex<usize>,
    /// Each loop's hosted deliveries (by inbox number), shared with the hosted half.
    hosted_lists: HostedLists,
    /// The hosted half's send (``send_hosted(conn, data)``), for a port it serves.
    hosted_send: Mutex<Option<Py<PyAny>>>,
    /// The hosted half's test hook (``_panic_hosted_for_test``).
    hosted_panics: Arc<std::sync::atomic::AtomicU32>,
}

fn put_conn(
    core: &Core,
    conn: Option<PyRef<'_, Conn>>,
    make: impl FnOnce(Arc<ConnShared>) -> Command,
) {
    if let Some(conn) = conn {
        core.shared.commands.put(make(conn.shared.clone()));
    }
}

impl Core {
    /// The tail of every stream open that answers with a connected port (a connect, an
    /// adopted socket): the options checked, the window configured (here, on the loop's
    /// thread, before the owner can use it), then the command queued.  `destination` runs
    /// last: an adopted socket is the native core's from there on.
    #[allow(clippy::too_many_arguments)]
    fn queue_connect(
        &self,
        request: Py<PyAny>,
        port: Py<PyAny>,
        window: &Bound<'_, WindowCounters>,
        inbox: &Inbox,
        options: &Bound<'_, PyDict>,
        active: (i64, bool),
        destination: impl FnOnce() -> PyResult<Destination>,
    ) -> PyResult<()> {
        let options = stream_options(options, active)?;
        let shared = &window.get().shared;
        shared.configure(options.flow.watermarks, Arc::clone(&self.counters));
        let (port, overhead) = port_target(port, window)?;
        let address = destination()?;
        self.shared.commands.put(Command::Connect {
            request: target(request),
            port,
            window: Arc::clone(shared),
            inbox: inbox.index,
            address,
            options,
            overhead,
        });
        Ok(())
    }

    /// Queue a send's command; within a hub's batch (``defer_wakes``) its wake is owed
    /// to the flush point.
    fn put_send(&self, command: Command) {
        if DEFERRING.with(|deferring| deferring.get()) {
            self.shared.commands.put_deferred(command);
            OWED.with(|owed| {
                let mut owed = owed.borrow_mut();
                if !owed.iter().any(|shared| Arc::ptr_eq(shared, &self.shared)) {
                    owed.push(self.shared.clone());
                }
            });
        } else {
            self.shared.commands.put(command);
        }
    }
}

#[pymethods]
impl Core {
    /// A core whose port table has ``table_size`` slots (from the open-file limit), with
    /// a memory budget of ``memory_limit`` bytes and a cap of ``port_buffer_limit`` bytes
    /// on a framed port's partial packet (None: no limit; validated by ``ioserver.open``),
    /// whose reads and writes go through ``backend``: ``"epoll"`` (a syscall each),
    /// ``"io_uring"`` (a round's in one ``io_uring_enter``) or ``None`` (io_uring where
    /// the kernel allows it, else epoll: ``io_uring_failure`` then says why).
    ///
    /// Raises ``ValueError`` for another name, and ``OSError`` (its errno the kernel's:
    /// ``ENOSYS``, ``EPERM``, ``EOPNOTSUPP``...) when ``backend="io_uring"`` is refused.
    #[new]
    #[pyo3(signature = (table_size, backend=None, memory_limit=None, port_buffer_limit=None))]
    fn new(
        table_size: usize,
        backend: Option<&str>,
        memory_limit: Option<u64>,
        port_buffer_limit: Option<u64>,
    ) -> PyResult<Self> {
        let requested = match backend {
            None => None,
            Some(name) => Some(Backend::parse(name).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "backend must be 'epoll', 'io_uring' or None, not {name:?}"
                ))
            })?),
        };
        let (ring, refused) = uring::open(requested).map_err(|error| {
            // OSError(errno, strerror): its errno names the refusal in Python.
            let errno = error.raw_os_error().unwrap_or(libc::EIO);
            PyOSError::new_err((errno, error.to_string()))
        })?;
        let shared = Arc::new(Shared::new()?);
        if let (Some(error), Ok(mut failure)) = (refused, shared.uring_failure.lock()) {
            *failure = Some(format!("io_uring refused by the kernel: {error}"));
        }
        let counters = Arc::new(LoopCounters::new());
        let mut thread = IoThread::new(
            shared.clone(),
            table_size,
            memory_limit,
            port_buffer_limit,
            Arc::clone(&counters),
        )?;
        thread.set_uring(ring);
        Ok(Core {
            charges: thread.charges(),
            counters,
            shared,
            thread: Mutex::new(Some(thread)),
            handle: Mutex::new(None),
            inboxes: Mutex::new(0),
            hosted_lists: HostedLists::default(),
            hosted_panics: Arc::default(),
            hosted_send: Mutex::new(None),
        })
    }

    /// Run a Python I/O half on the native thread (before ``start``): ``run_round`` and
    /// ``stop_hosted`` are its ``IOThread`` methods, ``poller_fd`` its poller's (an epoll
    /// fd), ``send_hosted(conn, data)`` queues a send for a port it serves (``send`` given
    /// a port that is not native calls it).  See ``native/src/hosted.rs``.
    ///
    /// Raises ``RuntimeError`` once the thread started, ``OSError`` if the fd cannot be
    /// watched.
    fn host(
        &self,
        run_round: Py<PyAny>,
        stop_hosted: Py<PyAny>,
        poller_fd: i32,
        send_hosted: Py<PyAny>,
    ) -> PyResult<()> {
        let mut thread = self
            .thread
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?;
        let Some(thread) = thread.as_mut() else {
            return Err(PyRuntimeError::new_err(
                "the native I/O thread was started already",
            ));
        };
        let hosted = Hosted::new(
            run_round,
            stop_hosted,
            poller_fd,
            self.hosted_lists.clone(),
            Arc::clone(&self.hosted_panics),
        );
        thread.host(hosted)?;
        *self
            .hosted_send
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))? = Some(send_hosted);
        Ok(())
    }

    /// The native I/O thread's OS id (``threading.get_native_id()`` on it), 0 before it
    /// runs.
    #[getter]
    fn thread_id(&self) -> u64 {
        self.shared.thread_id.load(Ordering::Relaxed)
    }

    /// Start the thread (once).
    fn start(&self) -> PyResult<()> {
        let thread = self
            .thread
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("the native I/O thread was started already"))?;
        self.shared.running.store(true, Ordering::SeqCst);
        let handle = std::thread::Builder::new()
            .name("ioserver-io-native".into())
            .spawn(move || thread.run())
            .map_err(|error| {
                self.shared.running.store(false, Ordering::SeqCst);
                PyOSError::new_err(error.to_string())
            })?;
        *self
            .handle
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))? = Some(handle);
        Ok(())
    }

    /// Wait for the thread to end (without the GIL).
    fn join(&self, py: Python<'_>) -> PyResult<()> {
        let handle = self
            .handle
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?
            .take();
        if let Some(handle) = handle {
            let _ = py.detach(move || handle.join());
        }
        Ok(())
    }

    /// Close the commands' wake-up fd (once the thread has ended).
    fn close_commands(&self) {
        self.shared.commands.signal.close()
    }

    /// Garbage collector integration (PyO3's ``__traverse__``; CPython's ``tp_traverse``):
    /// the Python objects this core holds - the hosted half's send (a bound method of the
    /// ``NativeIOThread``, which holds this core through its command queue: a cycle), and,
    /// until the thread starts, the hosted half's ``run_round`` and ``stop_hosted``.  Unseen,
    /// they made every closed server immortal (its ``NativeIOThread``, hub, ports: about
    /// 250 KiB each).
    ///
    /// Why it is safe, run by the collector on any thread that holds the GIL:
    /// - it never blocks: each `Mutex` is only tried ([`unlocked`]).  The I/O thread takes
    ///   `thread` never (it owns its `IoThread` once started) and `hosted_send` never; a
    ///   loop's thread takes them with the GIL held, and may release the GIL inside only
    ///   where it does not hold them; were one held anyway (a thread waiting for the GIL
    ///   this collection holds), it is skipped: an edge not visited only makes the collector
    ///   count its object as referenced from outside, so that object lives on until a later
    ///   collection - never is one freed that is still used;
    /// - it runs no Python code and calls no Python API (only `visit`, PyO3 forbids the
    ///   rest here) and cannot panic (no indexing, no unwrap);
    /// - it visits only references this object owns alone.  Not the ones behind `Arc`s
    ///   the I/O thread shares (`hosted_lists`: each inbox visits its own reference to its
    ///   list; the queued commands' and events' targets): the collector could otherwise
    ///   clear an object the I/O thread still delivers to.  Those are dropped when the
    ///   thread ends, and what it left queued when the server closes (``close_commands``,
    ///   ``Inbox.close``).
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(send) = unlocked(&self.hosted_send) {
            visit.call(send.as_ref())?;
        }
        if let Some(thread) = unlocked(&self.thread) {
            if let Some(hosted) = thread.as_ref().and_then(IoThread::hosted) {
                hosted.traverse(&visit)?;
            }
        }
        Ok(())
    }

    /// Garbage collector integration (``tp_clear``): drop what ``__traverse__`` shows, to
    /// break a cycle of garbage through this core (the hosted half's send; a thread never
    /// started, with its hosted half).
    fn __clear__(&mut self) {
        let send = owned(&mut self.hosted_send).take();
        let thread = owned(&mut self.thread).take();
        drop((send, thread));
    }

    /// The thread runs.
    fn is_alive(&self) -> bool {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// A new loop's inbox; ``stop_target`` gets the stop notice (``_deliver(None)``).
    fn new_inbox(&self, py: Python<'_>, stop_target: Py<PyAny>) -> PyResult<Inbox> {
        let messages = py.import("ioserver._messages")?;
        let exceptions = py.import("ioserver._exceptions")?;
        let tcp = py.import("ioserver._tcp")?;
        let closed = messages.getattr("Closed")?;
        let data = messages.getattr("Data")?;
        let set_data = data
            .getattr("__dict__")?
            .get_item("data")?
            .getattr("__set__")?
            .unbind();
        let new = py
            .import("builtins")?
            .getattr("object")?
            .getattr("__new__")?
            .unbind();
        let eof = closed.call1(("eof",))?.unbind();
        let msgpack = py.import("msgpack")?;
        let unpack_options = PyDict::new(py);
        unpack_options.set_item("raw", false)?;
        unpack_options.set_item("strict_map_key", false)?;
        let unpack_options = unpack_options.unbind();
        let queue = Arc::new(WakeQueue::new()?);
        let hosted = PyList::empty(py).unbind();
        let mut count = self
            .inboxes
            .lock()
            .map_err(|_| PyRuntimeError::new_err("poisoned"))?;
        let index = *count;
        *count += 1;
        // Under the lock: the commands' order is the numbering (of the hosted lists too).
        // (A poisoned lock: a panic contained on the I/O thread while it collected; the
        // lists are whole, see `Hosted::collect`.)
        self.hosted_lists
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(hosted.clone_ref(py));
        self.shared.commands.put(Command::AddInbox(queue.clone()));
        drop(count);
        Ok(Inbox {
            queue,
            index,
            shared: self.shared.clone(),
            charges: Arc::clone(&self.charges),
            counters: Arc::clone(&self.counters),
            stop_target,
            data: data.unbind(),
            new,
            set_data,
            closed: closed.unbind(),
            error: messages.getattr("Error")?.unbind(),
            accepted: messages.getattr("Accepted")?.unbind(),
            passive: messages.getattr("PASSIVE")?.unbind(),
            writable: messages.getattr("WRITABLE")?.unbind(),
            errno_name: exceptions.getattr("errno_name")?.unbind(),
            connect_error: tcp.getattr("connect_error")?.unbind(),
            eof,
            unpacker: {
                let options = unpack_options.bind(py).copy()?;
                options.set_item("max_buffer_size", REUSED_DECODER_MAX)?;
                let unpacker = msgpack.getattr("Unpacker")?;
                py.import("functools")?
                    .getattr("partial")?
                    .call((unpacker,), Some(&options))?
                    .unbind()
            },
            decoder: Mutex::new(None),
            out_of_data: msgpack.getattr("OutOfData")?.unbind(),
            unpackb: msgpack.getattr("unpackb")?.unbind(),
            unpack_options,
            addresses: Mutex::new(AddressCache::default()),
            hosted,
            fail_replies: std::sync::atomic::AtomicU32::new(0),
            carried: Mutex::new(Carried::default()),
            fail_packets: std::sync::atomic::AtomicU32::new(0),
            fail_hosted: std::sync::atomic::AtomicU32::new(0),
            fail_closes: std::sync::atomic::AtomicU32::new(0),
            postponing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Queue ``data`` (``bytes``) for writing on ``conn``; the object is held, not copied.
    /// Within a hub's batch (``defer_wakes``) the I/O thread is woken at the flush point.
    /// An empty ``bytes`` is dropped here (nothing to write; a port never sends one).
    /// A ``conn`` of the hosted half (not a native ``Conn``) gets it through the hosted
    /// half's own send (``host``).
    ///
    /// Raises ``TypeError`` if ``data`` is not ``bytes`` (for a native ``Conn``), or if
    /// ``conn`` is neither a native ``Conn`` nor served by a hosted half.
    fn send(&self, conn: &Bound<'_, PyAny>, data: Bound<'_, PyAny>) -> PyResult<()> {
        let Ok(conn) = conn.cast::<Conn>() else {
            let send = self
                .hosted_send
                .lock()
                .map_err(|_| PyRuntimeError::new_err("poisoned"))?
                .as_ref()
                .map(|send| send.clone_ref(conn.py()));
            return match send {
                Some(send) => send.call1(conn.py(), (conn, data)).map(drop),
                None => Err(PyTypeError::new_err("not a port of the native core")),
            };
        };
        let conn = conn.borrow();
        let Ok(bytes) = data.cast_into::<PyBytes>() else {
            return Err(PyTypeError::new_err("the native core sends bytes"));
        };
        if bytes.as_bytes().is_empty() {
            return Ok(());
        }
        self.put_send(Command::Send(conn.shared.clone(), HeldBytes::new(bytes)));
        Ok(())
    }

    /// :meth:`send`, with the port's send flow control in the same call: if the output
    /// ``conn``'s owner queued and the I/O thread has not written (its window's
    /// ``queued_bytes`` less ``conn.bytes_out``) is at most ``high_watermark``, add
    /// ``data``'s length to ``queued_bytes``, queue it and return True; else (the port is
    /// busy, or ``conn`` has no window) queue nothing and return False.
    ///
    /// ``queued_bytes`` is counted before the command is queued: the I/O thread never
    /// sees written bytes that were not counted (the order ``Port.send`` keeps).
    ///
    /// Raises ``TypeError`` if ``data`` is not ``bytes``.
    fn send_within(
        &self,
        conn: PyRef<'_, Conn>,
        data: Bound<'_, PyAny>,
        high_watermark: u64,
    ) -> PyResult<bool> {
        let Ok(bytes) = data.cast_into::<PyBytes>() else {
            return Err(PyTypeError::new_err("the native core sends bytes"));
        };
        let Some(window) = conn.shared.window.get() else {
            return Ok(false);
        };
        let queued = window.queued_bytes();
        let written = conn.shared.bytes_out.load(Ordering::SeqCst);
        if queued.saturating_sub(written) > high_watermark {
            return Ok(false);
        }
        let size = bytes.as_bytes().len() as u64;
        // Counted for the budget before the send can be written and subtracted.
        window.add_queued_bytes(size);
        if size > 0 {
            self.put_send(Command::Send(conn.shared.clone(), HeldBytes::new(bytes)));
        }
        Ok(true)
    }

    /// The hub starts handing out a batch: this thread's sends wake the I/O thread at
    /// :meth:`flush_wakes`, once, not each.
    #[staticmethod]
    fn defer_wakes() {
        DEFERRING.with(|deferring| deferring.set(true));
    }

    /// The hub's flush point: the tasks its batch woke have run; wake each I/O thread
    /// their sends queued commands for, if it sleeps.
    #[staticmethod]
    fn flush_wakes() {
        DEFERRING.with(|deferring| deferring.set(false));
        let owed = OWED.with(|owed| std::mem::take(&mut *owed.borrow_mut()));
        for shared in owed {
            shared.commands.wake_if_asleep();
        }
    }

    /// Close once the queued output is written.
    fn close(&self, conn: Option<PyRef<'_, Conn>>, _argument: &Bound<'_, PyAny>) {
        put_conn(self, conn, Command::Close)
    }

    /// Half-close once the queued output is written.
    fn send_eof(&self, conn: Option<PyRef<'_, Conn>>, _argument: &Bound<'_, PyAny>) {
        put_conn(self, conn, Command::SendEof)
    }

    /// Apply an active mode ``(credit, notify_passive)``.
    fn set_active(&self, conn: Option<PyRef<'_, Conn>>, mode: (i64, bool)) {
        put_conn(self, conn, |c| Command::SetActive(c, mode.0, mode.1))
    }

    /// A passive port's receiver waits: one message.
    fn read_once(&self, conn: Option<PyRef<'_, Conn>>, _argument: &Bound<'_, PyAny>) {
        put_conn(self, conn, Command::ReadOnce)
    }

    /// The owner took enough after the pause ``generation``.
    fn resume(&self, conn: Option<PyRef<'_, Conn>>, generation: u64) {
        put_conn(self, conn, |c| Command::Resume(c, generation))
    }

    /// The owner of a port the memory budget paused waits for input (``cmd_want``): let
    /// it try a read into the budget's reserve.
    fn want(&self, conn: Option<PyRef<'_, Conn>>, _argument: &Bound<'_, PyAny>) {
        put_conn(self, conn, Command::Want)
    }

    /// The port's owner is now the mailbox whose cell is ``cell`` (None: no mailbox;
    /// ``cmd_owner``, sent under a memory budget only): the budget keeps the port's
    /// pauses in that cell.
    fn owner(&self, conn: Option<PyRef<'_, Conn>>, cell: Option<PyRef<'_, OwnerCell>>) {
        let cell = cell.map(|cell| Arc::clone(&cell.cell));
        put_conn(self, conn, |conn| Command::Owner(conn, cell))
    }

    /// A task parked on the mailbox whose cell is ``cell`` while ports of it are paused by
    /// the budget (``cmd_want_owner``): let each try a read into the reserve.
    fn want_owner(&self, cell: PyRef<'_, OwnerCell>, _argument: &Bound<'_, PyAny>) {
        self.shared
            .commands
            .put(Command::WantOwner(Arc::clone(&cell.cell)))
    }

    /// A test hook, private (``_fail_for_test``: not part of ``Core``'s surface, used only
    /// by ``tests/test_native_core.py``): make the thread panic, to check that the failure
    /// is contained - every port gets ``Closed("EIO")``, the loop its stop notice,
    /// ``failure`` the message.
    #[pyo3(name = "_fail_for_test")]
    fn fail_for_test(&self) {
        self.shared.commands.put(Command::Fail)
    }

    /// A test hook, private (``_panic_hosted_for_test``, used only by the tests): the
    /// next ``count`` collections of a loop's pairs from the hosted half panic (on the
    /// I/O thread, after the pairs are copied out and before they are cut from the list),
    /// as PyO3 panics where CPython cannot allocate.
    #[pyo3(name = "_panic_hosted_for_test")]
    fn panic_hosted_for_test(&self, count: u32) {
        self.hosted_panics.store(count, Ordering::Relaxed)
    }

    /// A test hook, private (``_hold_for_test``, used only by the tests): the I/O thread
    /// stops where it runs this command, until the returned hold is released (or dropped),
    /// so that the commands and socket events queued meanwhile reach it together - one
    /// round's worth, on demand.  ``Hold.wait()`` returns once the thread has stopped.
    #[pyo3(name = "_hold_for_test")]
    fn hold_for_test(&self) -> Hold {
        let (release, released) = std::sync::mpsc::channel();
        let (reached, wait) = std::sync::mpsc::channel();
        self.shared.commands.put(Command::Hold(reached, released));
        Hold {
            release: Mutex::new(Some(release)),
            wait: Mutex::new(Some(wait)),
        }
    }

    /// A Python function run for ``conn`` on the I/O thread raised: close the port, its
    /// owner getting ``Closed(reason, "EIO")`` (as the Python core's contained errors).
    fn abort(&self, conn: PyRef<'_, Conn>, reason: String) {
        self.shared
            .commands
            .put(Command::Abort(conn.shared.clone(), reason))
    }

    /// Close every port and end the thread.
    fn stop(&self, _target: &Bound<'_, PyAny>, _argument: &Bound<'_, PyAny>) {
        self.shared.commands.put(Command::Stop)
    }

    /// Connect to the numeric ``(host, port, flowinfo, scope_id)``; answer ``request``.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (request, port, window, inbox, host, port_number, flowinfo, scope_id, options, active))]
    fn connect(
        &self,
        request: Py<PyAny>,
        port: Py<PyAny>,
        window: &Bound<'_, WindowCounters>,
        inbox: PyRef<'_, Inbox>,
        host: &str,
        port_number: u16,
        flowinfo: u32,
        scope_id: u32,
        options: &Bound<'_, PyDict>,
        active: (i64, bool),
    ) -> PyResult<()> {
        let ip: IpAddr = host
            .parse()
            .map_err(|_| PyValueError::new_err(format!("not a numeric address: {host:?}")))?;
        let address = match ip {
            IpAddr::V4(_) => SocketAddr::new(ip, port_number),
            IpAddr::V6(v6) => {
                SocketAddr::V6(SocketAddrV6::new(v6, port_number, flowinfo, scope_id))
            }
        };
        self.queue_connect(request, port, window, &inbox, options, active, || {
            Ok(Destination::Inet(address))
        })
    }

    /// Serve the listening ``socket.socket`` ``sock``; answer ``request``.  The socket
    /// is detached here (it is closed, fd -1, on return): the I/O thread owns its fd.
    ///
    /// Raises ``TypeError`` if ``sock`` is not a ``socket.socket``, ``ValueError`` if it
    /// is closed or not a listening stream socket (it is then left as it was), and
    /// ``OptionError``/``ValueError`` for bad ``options``.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (request, listener, make_port, inbox, sock, options, active))]
    fn listen(
        &self,
        request: Py<PyAny>,
        listener: Py<PyAny>,
        make_port: Py<PyAny>,
        inbox: PyRef<'_, Inbox>,
        sock: &Bound<'_, PyAny>,
        options: &Bound<'_, PyDict>,
        active: (i64, bool),
    ) -> PyResult<()> {
        let options = stream_options(options, active)?;
        let socket =
            std::net::TcpListener::from(adopt_listener(sock, &[libc::AF_INET, libc::AF_INET6])?);
        socket.set_nonblocking(true)?;
        let index = inbox.index;
        self.shared.commands.put(Command::Listen {
            request: target(request),
            listener: listener_target(listener, make_port, options.flow.watermarks),
            inbox: index,
            socket: ListenSocket::Tcp(socket),
            options,
        });
        Ok(())
    }

    /// Connect to the Unix stream socket at ``path`` (its bytes, ``os.fsencode``d; a
    /// leading NUL: Linux's abstract namespace); answer ``request``.  ``given`` is the
    /// path as the owner gave it, which a ``ConnectError`` names.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (request, port, window, inbox, path, given, options, active))]
    fn connect_unix(
        &self,
        request: Py<PyAny>,
        port: Py<PyAny>,
        window: &Bound<'_, WindowCounters>,
        inbox: PyRef<'_, Inbox>,
        path: Vec<u8>,
        given: Py<PyAny>,
        options: &Bound<'_, PyDict>,
        active: (i64, bool),
    ) -> PyResult<()> {
        self.queue_connect(request, port, window, &inbox, options, active, || {
            Ok(Destination::Unix(path, target(given)))
        })
    }

    /// Carry the connected Unix stream ``sock`` (our end of a program's stdin and stdout:
    /// ``ports.open_process``) as ``port``'s stream; answer ``request`` with ``(conn, "",
    /// "")``.  ``given`` is what a ``ConnectError`` names (the program).  The socket is
    /// detached here (``adopt_stream``'s errors: ``TypeError``, ``ValueError``,
    /// ``OSError``), as by :meth:`listen`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (request, port, window, inbox, sock, given, options, active))]
    fn adopt_stream(
        &self,
        request: Py<PyAny>,
        port: Py<PyAny>,
        window: &Bound<'_, WindowCounters>,
        inbox: PyRef<'_, Inbox>,
        sock: &Bound<'_, PyAny>,
        given: Py<PyAny>,
        options: &Bound<'_, PyDict>,
        active: (i64, bool),
    ) -> PyResult<()> {
        self.queue_connect(request, port, window, &inbox, options, active, || {
            let stream = std::os::unix::net::UnixStream::from(adopt_stream(sock)?);
            Ok(Destination::Adopted(stream, target(given)))
        })
    }

    /// Serve the listening Unix ``socket.socket`` ``sock`` bound to ``path`` (as the owner
    /// gave it: the listener's and each accepted port's local address); answer
    /// ``request``.  ``file`` is ``(path bytes, (st_dev, st_ino))`` of the socket file it
    /// bound (None: the abstract namespace): the I/O thread removes that file when the
    /// listener's socket closes, if the path still names it.  The socket is detached here,
    /// as by :meth:`listen`, whose errors this raises too.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (request, listener, make_port, inbox, sock, path, file, options, active))]
    fn listen_unix(
        &self,
        request: Py<PyAny>,
        listener: Py<PyAny>,
        make_port: Py<PyAny>,
        inbox: PyRef<'_, Inbox>,
        sock: &Bound<'_, PyAny>,
        path: Py<PyAny>,
        file: Option<(Vec<u8>, (u64, u64))>,
        options: &Bound<'_, PyDict>,
        active: (i64, bool),
    ) -> PyResult<()> {
        let options = stream_options(options, active)?;
        let socket =
            std::os::unix::net::UnixListener::from(adopt_listener(sock, &[libc::AF_UNIX])?);
        // Owned from here: an error below still removes the file (SocketFile's drop).
        let file = file.map(|(bytes, identity)| SocketFile::new(bytes, identity));
        socket.set_nonblocking(true)?;
        let index = inbox.index;
        self.shared.commands.put(Command::Listen {
            request: target(request),
            listener: listener_target(listener, make_port, options.flow.watermarks),
            inbox: index,
            socket: ListenSocket::Unix {
                socket,
                path: target(path),
                file,
            },
            options,
        });
        Ok(())
    }

    /// Rounds of the poller.
    #[getter]
    fn polls(&self) -> u64 {
        self.shared.polls.load(Ordering::Relaxed)
    }
    /// Readiness events handled.
    #[getter]
    fn events(&self) -> u64 {
        self.shared.events.load(Ordering::Relaxed)
    }
    /// Commands run.
    #[getter]
    fn commands_run(&self) -> u64 {
        self.shared.commands_run.load(Ordering::Relaxed)
    }
    /// Bytes read, all sockets.
    #[getter]
    fn bytes_in(&self) -> u64 {
        self.shared.bytes_in.load(Ordering::Relaxed)
    }
    /// Bytes written, all sockets.
    #[getter]
    fn bytes_out(&self) -> u64 {
        self.charges.bytes_out()
    }
    /// Bytes delivered to the loops, all ports (charged: packets with their overhead).
    #[getter]
    fn delivered_bytes(&self) -> u64 {
        self.charges.delivered_total()
    }
    /// Queued output dropped because its port closed or broke.
    #[getter]
    fn bytes_discarded(&self) -> u64 {
        self.charges.bytes_discarded()
    }
    /// Bytes of written or discarded buffers not yet handed back and dropped by a drain.
    #[getter]
    fn bytes_held(&self) -> u64 {
        self.charges.pinned()
    }
    /// Bytes the owners of this thread's ports queued for output and the thread has not
    /// yet written nor dropped with a port (what a daemon's grace period waits for).
    ///
    /// Ordering: the written and dropped counts are loaded first, the queued count after
    /// (`Acquire`, with the loop's `Release` adds): every byte written was queued before it
    /// reached the thread, so the figure may count a send made meanwhile, never miss one
    /// made before the call; it is exact, and 0, once nothing more is queued and all of it
    /// was written.
    #[getter]
    fn pending_output(&self) -> u64 {
        let done = self.charges.bytes_out() + self.charges.bytes_discarded();
        let (queued, _) = self.counters.totals();
        queued.saturating_sub(done)
    }
    /// Bytes charged to the memory budget now (`flow::Charges::in_use`): input delivered
    /// and not taken, framing buffers and held packets, output queued and not written,
    /// and buffers held until a loop drops them.
    fn memory_in_use(&self) -> i64 {
        self.charges.in_use(std::slice::from_ref(&self.counters))
    }
    /// :meth:`memory_in_use` without what the hosted half charges: the native ports' own.
    fn own_memory_in_use(&self) -> i64 {
        self.charges
            .own_in_use(std::slice::from_ref(&self.counters))
    }
    /// The hosted Python half charges ``bytes`` now (its budget's own count, set after each
    /// of its rounds): the native budget counts it, so one ``memory_limit`` bounds both.
    fn set_external_in_use(&self, bytes: i64) {
        self.charges.set_external(bytes.max(0) as u64);
    }
    /// The most bytes in use at the start of a round (``memory_limit`` set; else 0).
    #[getter]
    fn peak_memory(&self) -> u64 {
        self.shared.peak_memory.load(Ordering::Relaxed)
    }
    /// Reads paused by the memory budget, ever.
    #[getter]
    fn global_pauses(&self) -> u64 {
        self.shared.global_pauses.load(Ordering::Relaxed)
    }
    /// Reads into the budget's reserve for waiting owners, ever.
    #[getter]
    fn reserve_reads(&self) -> u64 {
        self.shared.reserve_reads.load(Ordering::Relaxed)
    }
    /// Ports failed because the budget stalled on unfinished packets, ever.
    #[getter]
    fn budget_failed_ports(&self) -> u64 {
        self.shared.budget_failed_ports.load(Ordering::Relaxed)
    }
    /// Closed stream ports reset because their output was not written within ``linger``.
    #[getter]
    fn linger_timeouts(&self) -> u64 {
        self.shared.linger_timeouts.load(Ordering::Relaxed)
    }
    /// Sockets open now.
    #[getter]
    fn ports_open(&self) -> u64 {
        self.shared.ports_open.load(Ordering::Relaxed)
    }
    /// Listeners open now (of ``ports_open``).
    #[getter]
    fn listeners_open(&self) -> u64 {
        self.shared.listeners_open.load(Ordering::Relaxed)
    }
    /// Unix listeners open now (of ``listeners_open``).
    #[getter]
    fn unix_listeners_open(&self) -> u64 {
        self.shared.unix_listeners_open.load(Ordering::Relaxed)
    }
    /// Unix streams open now (Unix connections and programs' stdio; of ``ports_open``).
    #[getter]
    fn unix_streams(&self) -> u64 {
        self.shared.unix_streams.load(Ordering::Relaxed)
    }
    /// TCP listeners open now (of ``listeners_open``).
    #[getter]
    fn tcp_listeners_open(&self) -> u64 {
        self.shared.tcp_listeners_open.load(Ordering::Relaxed)
    }
    /// TCP streams open now (connecting ones included; of ``ports_open``).
    #[getter]
    fn tcp_streams(&self) -> u64 {
        self.shared.tcp_streams.load(Ordering::Relaxed)
    }
    /// Streams with more output queued than their low watermark now.
    #[getter]
    fn busy_streams(&self) -> u64 {
        self.shared.busy_streams.load(Ordering::Relaxed)
    }
    /// Streams paused by their watermarks now.
    #[getter]
    fn msgq_paused_streams(&self) -> u64 {
        self.shared.msgq_paused_streams.load(Ordering::Relaxed)
    }
    /// Streams paused by the memory budget now.
    #[getter]
    fn budget_paused_streams(&self) -> u64 {
        self.charges.paused_ports()
    }
    /// Errors contained (and the thread's own failure).
    #[getter]
    fn internal_errors(&self) -> u64 {
        self.shared.internal_errors.load(Ordering::Relaxed)
    }
    /// Wake-up fd writes towards the I/O thread.
    #[getter]
    fn wakes_sent(&self) -> u64 {
        self.shared.commands.wakes_sent.load(Ordering::Relaxed)
    }
    /// Commands queued while the I/O thread was awake.
    #[getter]
    fn wakes_skipped(&self) -> u64 {
        self.shared.commands.wakes_skipped.load(Ordering::Relaxed)
    }
    /// Why the thread failed (a panic's message), or None.
    #[getter]
    fn failure(&self) -> Option<String> {
        self.shared.failure.lock().ok().and_then(|f| f.clone())
    }
    /// The reads' and writes' backend now: ``"epoll"`` or ``"io_uring"``.
    #[getter]
    fn backend(&self) -> &'static str {
        if self.shared.io_uring.load(Ordering::Relaxed) {
            Backend::IoUring.name()
        } else {
            Backend::Epoll.name()
        }
    }
    /// ``io_uring_enter`` calls made.
    #[getter]
    fn uring_enters(&self) -> u64 {
        self.shared.uring_enters.load(Ordering::Relaxed)
    }
    /// Receives and sends submitted through them.
    #[getter]
    fn uring_submissions(&self) -> u64 {
        self.shared.uring_submissions.load(Ordering::Relaxed)
    }
    /// Why io_uring is not used where it was wanted (refused by the kernel, or given up
    /// after a failed ``io_uring_enter``), or None.
    #[getter]
    fn io_uring_failure(&self) -> Option<String> {
        self.shared
            .uring_failure
            .lock()
            .ok()
            .and_then(|f| f.clone())
    }
}

/// A stop of the I/O thread made by ``Core._hold_for_test`` (tests only).
#[pyclass(module = "ioserver._native")]
pub struct Hold {
    release: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    wait: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

#[pymethods]
impl Hold {
    /// Wait (without the GIL) until the I/O thread has stopped at this hold; False if it
    /// never will (it ended first).
    fn wait(&self, py: Python<'_>) -> bool {
        let wait = self.wait.lock().ok().and_then(|mut w| w.take());
        match wait {
            Some(wait) => py.detach(move || wait.recv().is_ok()),
            None => true,
        }
    }

    /// Let the I/O thread go on.
    fn release(&self) {
        if let Ok(mut release) = self.release.lock() {
            release.take();
        }
    }
}

/// Register the classes in ``ioserver._native``.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Core>()?;
    m.add_class::<Inbox>()?;
    m.add_class::<Conn>()?;
    m.add_class::<OwnerCell>()?;
    m.add_class::<WindowCounters>()?;
    m.add_class::<Hold>()?;
    Ok(())
}

/// The handle's size (issue 14: ioserver's own memory per idle connection): with
/// CPython's 16-byte object header, 40 bytes, one 48-byte pymalloc block.
#[cfg(all(test, target_pointer_width = "64"))]
mod size_tests {
    use super::*;
    use std::mem::size_of;

    #[test]
    fn a_conn_handle_keeps_its_peer_in_16_bytes() {
        assert!(
            size_of::<Option<Peer>>() <= 16,
            "{}",
            size_of::<Option<Peer>>()
        );
        assert!(size_of::<Conn>() <= 24, "Conn: {}", size_of::<Conn>());
    }
}

/// A test hook's countdown (``_fail_..._for_test``): `MemoryError` while `counter` is
/// above 0, one less each time; with [`PANIC_FAULT`] (``_panic_..._for_test``) the panic
/// PyO3 makes when CPython cannot allocate (`panic_after_error`: the error printed, then
/// a panic).  Relaxed: the hooks are set and read on the loop's thread (the test's), no
/// other memory is published through them.
fn countdown_fault(counter: &std::sync::atomic::AtomicU32) -> PyResult<()> {
    let left = counter.load(Ordering::Relaxed);
    if left == 0 {
        return Ok(());
    }
    if left & PANIC_FAULT != 0 {
        let count = left & !PANIC_FAULT;
        let next = if count > 1 {
            PANIC_FAULT | (count - 1)
        } else {
            0
        };
        counter.store(next, Ordering::Relaxed);
        Python::attach(|py| pyo3::exceptions::PyMemoryError::new_err(()).print(py));
        panic!("Python API call failed (a test's)");
    }
    counter.store(left - 1, Ordering::Relaxed);
    Err(pyo3::exceptions::PyMemoryError::new_err(()))
}
