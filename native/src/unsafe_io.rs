//! Every `unsafe` block of the crate, and why each is sound.
//!
//! Three things need it, and nothing else in the crate may:
//!
//! * [`HeldBytes`]: the I/O thread writes a Python `bytes` object's buffer to a socket
//!   without the GIL and without copying it.  The object is immutable and the held
//!   reference keeps it alive, so its buffer does not move or change while it is held.
//! * [`eventfd`]: the wake-up fd of each direction (Linux's `eventfd(2)`).
//! * [`adopt_listener`]: a listening socket Python bound (with its errors in the
//!   project's terms) is handed to the I/O thread: its `socket.socket` object gives up
//!   the fd (`detach()`), and only then does the crate own it.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use pyo3::prelude::*;
use pyo3::types::PyBytes;

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

/// Take ownership of a listening TCP socket from its Python `socket.socket` object.
///
/// `sock` must be exactly a `socket.socket` (not a subclass, whose `detach` could lie), of
/// type `SOCK_STREAM`, listening (`SO_ACCEPTCONN`); the fd comes from its own `detach()`,
/// which leaves the object closed (fd -1) without closing the fd: from then on nothing in
/// Python refers to it, and the returned listener owns it.
///
/// Raises (as `PyErr`): `TypeError` if `sock` is not a `socket.socket`; `ValueError` if
/// it is closed, not a stream socket, or not listening; `OSError` from `getsockopt`.
pub fn adopt_listener(sock: &Bound<'_, PyAny>) -> PyResult<std::net::TcpListener> {
    let py = sock.py();
    let socket_class = py.import("socket")?.getattr("socket")?;
    if !sock.get_type().is(&socket_class) {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "the native core listens on a socket.socket",
        ));
    }
    if sock.call_method0("fileno")?.extract::<i64>()? < 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "the socket is closed",
        ));
    }
    let kind: i32 = sock.getattr("type")?.extract()?;
    let accepting: i64 = sock
        .call_method1("getsockopt", (libc::SOL_SOCKET, libc::SO_ACCEPTCONN))?
        .extract()?;
    if kind != libc::SOCK_STREAM || accepting == 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "the native core listens on a listening stream socket (listen() was not called)",
        ));
    }
    let fd: RawFd = sock.call_method0("detach")?.extract()?;
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF).into());
    }
    // SAFETY: `fd` was returned by `detach()` of an exact `socket.socket` (checked above,
    // so the method is CPython's own): that call gave up the object's ownership of the
    // fd without closing it, and no other Python object refers to it, so this `OwnedFd`
    // is its only owner and the only one to close it.  The checks above (a stream socket,
    // listening) ran on that same fd under the GIL, with the object still owning it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(std::net::TcpListener::from(owned))
}
