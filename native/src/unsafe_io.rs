//! Every `unsafe` block of the crate, and why each is sound.
//!
//! Five things need it, and nothing else in the crate may:
//!
//! * [`HeldBytes`]: the I/O thread writes a Python `bytes` object's buffer to a socket
//!   without the GIL and without copying it.  The object is immutable and the held
//!   reference keeps it alive, so its buffer does not move or change while it is held.
//! * [`eventfd`]: the wake-up fd of each direction (Linux's `eventfd(2)`).
//! * [`adopt_listener`], [`adopt_stream`]: a listening socket Python bound (with its
//!   errors in the project's terms), or a program's stdio socket Python made, is handed to
//!   the I/O thread: its `socket.socket` object gives up the fd (`detach()`), and only
//!   then does the crate own it.
//! * [`Ring`]: the io_uring backend (`uring.rs`) hands the kernel pointers to memory it
//!   reads (queued output) or writes (receive buffers) after the call that submits them has
//!   returned: `io_uring::SubmissionQueue::push` is `unsafe` for that reason.  [`Ring::run`]
//!   submits a round's operations and does not return until the kernel has completed every
//!   one of them, so no buffer is freed, moved or reused while the kernel may touch it.
//! * [`new_bytes`], [`new_pair`], [`new_list`]: the drain's Python objects made so that an
//!   allocation that fails is a `MemoryError` (`PyErr`), not a panic: PyO3's
//!   `PyBytes::new`, its tuple conversions and `PyList::empty` (and `PyList::new`,
//!   `PyTuple::new`, although they return `PyResult`) panic when CPython returns NULL
//!   (`panic_after_error`), and a panic unwinds past the carried events (lost) or ends
//!   the thread.  Each is the C API call and a NULL check (`assume_owned_or_err`).

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};

/// A `bytes` object of `data` (CPython's `PyBytes_FromStringAndSize`, one copy); a
/// `MemoryError` when it cannot be allocated (PyO3's `PyBytes::new` panics then).
pub fn new_bytes<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    // SAFETY: `data` is a valid slice for the call (CPython copies it); the length of a
    // Rust slice fits `Py_ssize_t` (at most `isize::MAX` bytes).  The result is a new
    // reference or NULL with the error set, which `assume_owned_or_err` checks; a non-NULL
    // result of `PyBytes_FromStringAndSize` is a `bytes` object.
    unsafe {
        let ptr =
            ffi::PyBytes_FromStringAndSize(data.as_ptr().cast(), data.len() as ffi::Py_ssize_t);
        Ok(Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked())
    }
}

/// The tuple `(first, second)` (a drain's `(target, message)` pair); a `MemoryError` when
/// it cannot be allocated (PyO3's tuple conversion panics then).
pub fn new_pair<'py>(
    py: Python<'py>,
    first: Bound<'py, PyAny>,
    second: Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyTuple>> {
    // SAFETY: `PyTuple_New(2)` returns a new tuple of two NULL slots, or NULL with the
    // error set (checked by `from_owned_ptr_or_err`: the two objects are then dropped,
    // their references released).  `PyTuple_SetItem` on a fresh tuple nobody else has
    // seen, at indexes 0 and 1 (in range), steals the reference `into_ptr` gives it and
    // cannot fail; the result is a tuple.
    unsafe {
        let tuple = Bound::from_owned_ptr_or_err(py, ffi::PyTuple_New(2))?;
        ffi::PyTuple_SetItem(tuple.as_ptr(), 0, first.into_ptr());
        ffi::PyTuple_SetItem(tuple.as_ptr(), 1, second.into_ptr());
        Ok(tuple.cast_into_unchecked())
    }
}

/// A new empty list; a `MemoryError` when it cannot be allocated (PyO3's `PyList::empty`
/// panics then).
pub fn new_list(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    // SAFETY: `PyList_New(0)` returns a new empty list, or NULL with the error set, which
    // `from_owned_ptr_or_err` checks.
    unsafe { Ok(Bound::from_owned_ptr_or_err(py, ffi::PyList_New(0))?.cast_into_unchecked()) }
}

/// A Python `bytes` object queued for writing, readable without the GIL.
///
/// Made under the GIL ([`HeldBytes::new`]); read on the I/O thread ([`HeldBytes::as_slice`]);
/// dropped under the GIL again: the I/O thread hands it back to the owning loop, whose next
/// drain drops it (see `core.rs`), so its reference count is never touched off the GIL on the
/// hot path.
pub struct HeldBytes {
    obj: Py<PyBytes>,
    ptr: *const u8,
    len: usize,
}

// SAFETY: `obj` is a `Py<PyBytes>`, which is `Send`; `ptr`/`len` describe the immutable
// buffer that `obj` keeps alive (see `as_slice`), and reading it from another thread is a
// plain read of memory nobody writes.
unsafe impl Send for HeldBytes {}

impl HeldBytes {
    /// Hold `bytes`, recording where its buffer is (under the GIL).
    pub fn new(bytes: Bound<'_, PyBytes>) -> Self {
        let slice = bytes.as_bytes();
        let (ptr, len) = (slice.as_ptr(), slice.len());
        HeldBytes {
            obj: bytes.unbind(),
            ptr,
            len,
        }
    }

    /// The bytes, from any thread, without the GIL.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` and `len` were read from `obj`'s buffer under the GIL.  A `bytes`
        // object is immutable (CPython never resizes or writes one that has escaped to
        // Python code), its buffer lives inline in the object, and `self.obj` holds a
        // strong reference for as long as `self` lives, so the memory stays valid and
        // unchanged for the lifetime of the returned slice.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The Python object (to drop it under the GIL).
    pub fn into_object(self) -> Py<PyBytes> {
        self.obj
    }
}

/// A non-blocking, close-on-exec eventfd, as a `File` (whose `read`/`write` of 8 bytes are
/// the eventfd's operations).
pub fn eventfd() -> io::Result<File> {
    // SAFETY: eventfd(2) takes no pointers; it returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd(2): it is open and owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Take ownership of a listening stream socket (TCP or Unix) from its Python
/// `socket.socket` object.
///
/// `sock` must be exactly a `socket.socket` (not a subclass, whose `detach` could lie), of
/// one of `families`, of type `SOCK_STREAM`, listening (`SO_ACCEPTCONN`); the fd comes
/// from its own `detach()`,
/// which leaves the object closed (fd -1) without closing the fd: from then on nothing in
/// Python refers to it, and the returned listener owns it.
///
/// Raises (as `PyErr`): `TypeError` if `sock` is not a `socket.socket`; `ValueError` if
/// it is closed, of another family, not a stream socket, or not listening; `OSError`
/// from `getsockopt`.
pub fn adopt_listener(sock: &Bound<'_, PyAny>, families: &[i32]) -> PyResult<OwnedFd> {
    adopt_socket(sock, families, true)
}

/// Take ownership of a connected Unix stream socket (our end of a program's stdio socket
/// pair) from its Python `socket.socket` object, as [`adopt_listener`] does a listener:
/// exactly a `socket.socket`, `AF_UNIX`, `SOCK_STREAM`, not listening, connected (its
/// `getpeername()` succeeds).
///
/// Raises (as `PyErr`): `TypeError` if `sock` is not a `socket.socket`; `ValueError` if
/// it is closed, not a Unix stream socket, or listening; `OSError` if it is not connected
/// (`ENOTCONN`).
pub fn adopt_stream(sock: &Bound<'_, PyAny>) -> PyResult<OwnedFd> {
    adopt_socket(sock, &[libc::AF_UNIX], false)
}

/// [`adopt_listener`] (`listening`) or [`adopt_stream`].
fn adopt_socket(sock: &Bound<'_, PyAny>, families: &[i32], listening: bool) -> PyResult<OwnedFd> {
    let py = sock.py();
    let socket_class = py.import("socket")?.getattr("socket")?;
    if !sock.get_type().is(&socket_class) {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "the native core takes a socket.socket",
        ));
    }
    if sock.call_method0("fileno")?.extract::<i64>()? < 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "the socket is closed",
        ));
    }
    let family: i32 = sock.getattr("family")?.extract()?;
    if !families.contains(&family) {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "the socket is not of the address family this call takes",
        ));
    }
    let kind: i32 = sock.getattr("type")?.extract()?;
    let accepting: i64 = sock
        .call_method1("getsockopt", (libc::SOL_SOCKET, libc::SO_ACCEPTCONN))?
        .extract()?;
    if kind != libc::SOCK_STREAM || (accepting != 0) != listening {
        return Err(pyo3::exceptions::PyValueError::new_err(if listening {
            "the native core listens on a listening stream socket (listen() was not called)"
        } else {
            "the native core carries a connected stream socket, not a listening one"
        }));
    }
    if !listening {
        sock.call_method0("getpeername")?; // ENOTCONN: not connected
    }
    let fd: RawFd = sock.call_method0("detach")?.extract()?;
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF).into());
    }
    // SAFETY: `fd` was returned by `detach()` of an exact `socket.socket` (checked above,
    // so the method is CPython's own): that call gave up the object's ownership of the
    // fd without closing it, and no other Python object refers to it, so this `OwnedFd`
    // is its only owner and the only one to close it.  The checks above (a stream socket,
    // listening or connected) ran on that same fd under the GIL, with the object still
    // owning it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// -- io_uring ------------------------------------------------------------------------------

/// The io_uring backend's submission: a round's receives and gathered sends, submitted in
/// one `io_uring_enter` and all reaped before [`Ring::run`] returns (Linux only).
///
/// Buffer lifetimes, the whole argument:
///
/// * a receive writes into one of the ring's own buffers ([`Ring::buffer_mut`]), which the
///   ring owns for its whole life and hands out only between runs;
/// * a send reads the caller's slices (a stream's queued `HeldBytes`), borrowed for the
///   duration of `run`; its `iovec`s and `msghdr` live in the ring's scratch vectors, which
///   are filled before the first pointer into them is taken and not touched again until
///   `run` returns;
/// * `run` returns only once every submitted operation has its completion reaped (the
///   sockets are non-blocking and each operation carries `MSG_DONTWAIT`, so the kernel
///   completes it at once: with data, a short count, `EAGAIN` or an error, never by
///   waiting - [`Ring::new`] checks that this kernel does so), or with an error when the
///   kernel took none of them (then the ring is never entered again, so the entries it did
///   not take are never read).  An error of `io_uring_enter` after the kernel took some
///   operations cannot be waited out and would leave the kernel with pointers to memory
///   the caller is about to free: the process aborts there (no such error exists for a
///   ring this thread alone uses; see `wait_all`).
#[cfg(target_os = "linux")]
pub struct Ring {
    ring: io_uring::IoUring,
    /// The receive buffers: operation `i` of a run's receives writes into `buffers[i]`.
    buffers: Vec<Vec<u8>>,
    /// The most sends in one run.
    max_sends: usize,
    /// Scratch of the sends: their `iovec`s, in order...
    iovecs: Vec<libc::iovec>,
    /// ... each send's `(fd, first iovec, iovec count)` ...
    spans: Vec<(RawFd, usize, usize)>,
    /// ... and their `msghdr`s.
    headers: Vec<libc::msghdr>,
    /// Each operation's result (bytes, or `-errno`), by its index in the run.
    results: Vec<i32>,
    /// `io_uring_enter` failed with nothing submitted: the ring is not entered again.
    failed: bool,
    /// Operations the kernel took whose completions are not reaped yet (0 between runs).
    in_flight: usize,
}

// SAFETY: `IoUring` is `Send` (the crate says so: it is its fd and mappings).  The only
// fields that are not `Send` by themselves are the scratch `iovecs` and `headers`, because
// they hold raw pointers; those pointers are written and used only inside `run`, on the
// thread that calls it, and `run` never returns with the kernel still using them (see the
// type's comment), so moving the ring to another thread between runs moves stale values
// that are cleared before they are read again.
#[cfg(target_os = "linux")]
unsafe impl Send for Ring {}

#[cfg(target_os = "linux")]
impl Ring {
    /// A ring for up to `receives` receives of `buffer_size` bytes each and `sends` sends
    /// per run.  Refused (the error names the errno) where the kernel refuses io_uring
    /// (`ENOSYS`: too old or compiled out; `EPERM`: `kernel.io_uring_disabled`, a seccomp
    /// filter, a container's policy), lacks `IORING_OP_RECV`/`IORING_OP_SENDMSG`
    /// (`EOPNOTSUPP`, kernels before 5.6), or parks a `MSG_DONTWAIT` receive on an empty
    /// socket instead of completing it with `EAGAIN` (`EOPNOTSUPP`: a `run` could block).
    pub fn new(receives: usize, sends: usize, buffer_size: usize) -> io::Result<Ring> {
        use io_uring::{opcode, IoUring, Probe};
        let entries = (receives + sends).max(1).next_power_of_two() as u32;
        let ring = IoUring::builder().dontfork().build(entries)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !(probe.is_supported(opcode::Recv::CODE) && probe.is_supported(opcode::SendMsg::CODE)) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let mut ring = Ring {
            ring,
            buffers: (0..receives).map(|_| vec![0; buffer_size]).collect(),
            max_sends: sends,
            iovecs: Vec::new(),
            spans: Vec::with_capacity(sends),
            headers: Vec::with_capacity(sends),
            results: Vec::with_capacity(receives + sends),
            failed: false,
            in_flight: 0,
        };
        ring.check_nowait()?;
        Ok(ring)
    }

    /// A receive on an empty non-blocking socket, and a send to a full one, must complete
    /// at once with `EAGAIN` (not wait for data or room): `run` relies on it.
    fn check_nowait(&mut self) -> io::Result<()> {
        use io_uring::{opcode, types};
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;

        // The receive: on an empty socket.
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        let mut byte = [0u8; 1];
        let entry = opcode::Recv::new(types::Fd(reader.as_raw_fd()), byte.as_mut_ptr(), 1)
            .flags(libc::MSG_DONTWAIT)
            .build();
        // SAFETY: the receive writes into `byte` (1 byte, its length); `byte` lives until
        // the end of this function, which does not return before the operation's
        // completion is reaped (`settle`: if the kernel parked it, closing `writer` ends it
        // with an end of file; `wait_all` aborts rather than return with it in flight).
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
        let received = self.settle(|| drop(writer))?;

        // The send: to a socket whose buffer is full.
        let (full, mut reader) = UnixStream::pair()?;
        full.set_nonblocking(true)?;
        socket2::SockRef::from(&full).set_send_buffer_size(4096)?;
        let chunk = [0u8; 4096];
        loop {
            match (&full).write(&chunk) {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(error),
            }
        }
        let iovec = libc::iovec {
            iov_base: chunk.as_ptr() as *mut libc::c_void,
            iov_len: 1,
        };
        // SAFETY: as in `run`: all zeroes is a valid `msghdr`.
        let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
        header.msg_iov = &iovec as *const libc::iovec as *mut libc::iovec;
        header.msg_iovlen = 1;
        let entry = opcode::SendMsg::new(types::Fd(full.as_raw_fd()), &header)
            .flags((libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32)
            .build();
        // SAFETY: the send reads `header`, `iovec` and one byte of `chunk`, all of which
        // live until the end of this function, which does not return before the
        // operation's completion is reaped (`settle`: if the kernel parked it, reading the
        // peer's buffer empty makes room for it; `wait_all` aborts rather than return with
        // it in flight).
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
        let sent = self.settle(|| {
            let mut sink = [0u8; 65536];
            let _ = reader.read(&mut sink);
        })?;
        match (received, sent) {
            (Some(received), Some(sent)) if received == -libc::EAGAIN && sent == -libc::EAGAIN => {
                Ok(())
            }
            _ => Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP)),
        }
    }

    /// Submit the one queued operation without waiting and return its result if the
    /// kernel completed it at once; if it parked it instead, `unpark` (which makes it
    /// complete), wait for it, and return None.
    fn settle(&mut self, unpark: impl FnOnce()) -> io::Result<Option<i32>> {
        // An operation the kernel completes at once has its completion posted before
        // io_uring_enter returns.
        self.wait_all(0)?;
        if let Some(cqe) = self.ring.completion().next() {
            self.in_flight -= 1;
            return Ok(Some(cqe.result()));
        }
        unpark();
        self.wait_all(1)?;
        let reaped = self.ring.completion().count();
        self.in_flight -= reaped;
        Ok(None)
    }

    /// How many receives one run takes at most.
    pub fn max_receives(&self) -> usize {
        self.buffers.len()
    }

    /// How many sends one run takes at most.
    pub fn max_sends(&self) -> usize {
        self.max_sends
    }

    /// Receive buffer `index` (what receive `index` of the last run wrote), to read or to
    /// exchange for another buffer of the same use (the next run receives into whatever
    /// `Vec` is there, up to its length).
    pub fn buffer_mut(&mut self, index: usize) -> &mut Vec<u8> {
        &mut self.buffers[index]
    }

    /// Submit a receive on each of `receives` (`(fd, bytes at most)`, into buffer `i` for
    /// the `i`th, up to its length) and a
    /// gathered send of each of `sends` (`(fd, slices)`), all in one `io_uring_enter`, and
    /// reap every completion.  Returns each operation's result in the order given,
    /// receives first: bytes received or sent, or `-errno` (`-EAGAIN`: nothing to read,
    /// or no room to write), and the number of `io_uring_enter` calls it took (one, unless
    /// a signal interrupted the wait).
    ///
    /// Sends carry `MSG_NOSIGNAL` (a peer that closed gives `EPIPE`, never `SIGPIPE`).
    ///
    /// Errors: `io_uring_enter` failed before the kernel took any operation; the ring is
    /// then unusable (every later run fails too).
    ///
    /// Panics if there are more receives than buffers or more sends than `max_sends`.
    pub fn run<'a, S, B>(
        &mut self,
        receives: &[(RawFd, usize)],
        sends: S,
    ) -> io::Result<(&[i32], u64)>
    where
        S: IntoIterator<Item = (RawFd, B)>,
        B: IntoIterator<Item = &'a [u8]>,
    {
        use io_uring::{opcode, types};
        if self.failed {
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        assert!(
            receives.len() <= self.buffers.len(),
            "more receives than buffers"
        );
        self.iovecs.clear();
        self.spans.clear();
        self.headers.clear();
        self.results.clear();
        for (fd, slices) in sends {
            assert!(
                self.spans.len() < self.max_sends,
                "more sends than the ring takes"
            );
            let start = self.iovecs.len();
            for slice in slices {
                self.iovecs.push(libc::iovec {
                    iov_base: slice.as_ptr() as *mut libc::c_void,
                    iov_len: slice.len(),
                });
            }
            self.spans.push((fd, start, self.iovecs.len() - start));
        }
        // `iovecs` is complete: from here to the end of the run it does not grow, so the
        // pointers into it stay valid.
        let base = self.iovecs.as_mut_ptr();
        for &(_, start, count) in &self.spans {
            // SAFETY: `msghdr` is a plain C struct (pointers, lengths, flags, and padding on
            // some targets): all zeroes is a valid value of it (no name, no control data).
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_iov = base.wrapping_add(start);
            header.msg_iovlen = count as _;
            self.headers.push(header);
        }
        let total = receives.len() + self.spans.len();
        if total == 0 {
            return Ok((&self.results, 0));
        }
        self.results.resize(total, 0);
        {
            let mut queue = self.ring.submission();
            for (index, &(fd, most)) in receives.iter().enumerate() {
                let buffer = &mut self.buffers[index];
                let length = most.min(buffer.len()).min(u32::MAX as usize) as u32;
                let entry = opcode::Recv::new(types::Fd(fd), buffer.as_mut_ptr(), length)
                    .flags(libc::MSG_DONTWAIT)
                    .build()
                    .user_data(index as u64);
                // SAFETY: the kernel writes at most `length` bytes, no more than the
                // buffer's length, into `buffers[index]`, which the ring owns and does not
                // touch, move or free before this run has reaped every completion
                // (`wait_all` below; `buffer_mut` needs the `&mut self` this run holds).
                // The fd only names the socket: memory safety does not depend on it (a
                // wrong one fails or reads into this same buffer).  The queue has room: it
                // has `receives + sends` entries or more, and every earlier run left it
                // empty.
                unsafe { queue.push(&entry) }.expect("the submission queue has room");
            }
            for (index, header) in self.headers.iter().enumerate() {
                let entry = opcode::SendMsg::new(types::Fd(self.spans[index].0), header)
                    .flags((libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32)
                    .build()
                    .user_data((receives.len() + index) as u64);
                // SAFETY: the kernel reads `header`, the `iovec`s it points to (in
                // `self.iovecs`, complete and no longer growing) and the slices those
                // describe, which the caller lent for `'a`, beyond the end of this call.
                // None of them is moved or freed before `wait_all` below has reaped every
                // completion.  The queue has room (as above).
                unsafe { queue.push(&entry) }.expect("the submission queue has room");
            }
        }
        let enters = self.wait_all(total)?;
        for cqe in self.ring.completion() {
            self.in_flight -= 1;
            if let Some(result) = self.results.get_mut(cqe.user_data() as usize) {
                *result = cqe.result();
            }
        }
        Ok((&self.results, enters))
    }

    /// Submit every queued entry and wait until `want` completions are there (the caller
    /// reaped all earlier ones); the number of `io_uring_enter` calls made.
    ///
    /// The kernel takes the queued entries in one call in practice.  A call that a signal
    /// interrupts (`EINTR`, while waiting: what was submitted stays submitted), that finds
    /// no memory for a request (`EAGAIN`) or a completion queue in overflow (`EBUSY`) is
    /// made again.  Any other error with no operation in flight makes the ring unusable
    /// and is returned (io_uring_enter reports an error only when it took no entry);
    /// with operations in flight it aborts the process (see the type's comment: returning
    /// would let the caller free memory the kernel may still use).
    fn wait_all(&mut self, want: usize) -> io::Result<u64> {
        let mut enters = 0u64;
        loop {
            let pending = self.ring.submission().len();
            if pending == 0 && self.ring.completion().len() >= want {
                return Ok(enters);
            }
            enters += 1;
            match self.ring.submit_and_wait(want) {
                Ok(taken) => self.in_flight += taken,
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(error) if self.in_flight == 0 => {
                    self.failed = true;
                    return Err(error);
                }
                Err(error) => {
                    eprintln!(
                        "ioserver: io_uring_enter failed with operations in flight ({error}): \
                         aborting, as their buffers cannot be released safely"
                    );
                    std::process::abort();
                }
            }
        }
    }
}

/// The io_uring backend, where there is no io_uring: never made.
#[cfg(not(target_os = "linux"))]
pub enum Ring {}

#[cfg(not(target_os = "linux"))]
impl Ring {
    /// Refused: io_uring is Linux's (`EOPNOTSUPP`).
    pub fn new(_receives: usize, _sends: usize, _buffer_size: usize) -> io::Result<Ring> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Never called (no ring exists).
    pub fn max_receives(&self) -> usize {
        match *self {}
    }
    /// Never called (no ring exists).
    pub fn max_sends(&self) -> usize {
        match *self {}
    }
    /// Never called (no ring exists).
    pub fn buffer_mut(&mut self, _index: usize) -> &mut Vec<u8> {
        match *self {}
    }
    /// Never called (no ring exists).
    pub fn run<'a, S, B>(
        &mut self,
        _receives: &[(RawFd, usize)],
        _sends: S,
    ) -> io::Result<(&[i32], u64)>
    where
        S: IntoIterator<Item = (RawFd, B)>,
        B: IntoIterator<Item = &'a [u8]>,
    {
        match *self {}
    }
}
