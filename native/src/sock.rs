//! The sockets of the native I/O thread's stream ports: TCP or Unix, one type each for a
//! connection ([`Sock`]) and a listener ([`ListenSock`]), so that the rest of the thread
//! (`core.rs`, `uring.rs`: reads, gathered writes, half-close, `linger`, the flow control)
//! is the same code for both, and for a program's stdin and stdout (our end of its socket
//! pair, adopted as a connected Unix stream: [`Destination::Adopted`]).  What differs is
//! here: how a connect starts, which socket
//! options apply (`TCP_NODELAY` and `SO_KEEPALIVE` are TCP's), and the addresses.
//!
//! Addresses ([`Address`]) are handed to Python as the Python core hands them
//! (`socket.getsockname()`/`getpeername()`, CPython's `makesockaddr`): a TCP address a
//! tuple, a Unix one a `str` (the path, decoded as the file system's names are), `bytes`
//! for a name in Linux's abstract namespace (its leading NUL kept), `""` for an unnamed
//! socket (a client that did not bind).  A Unix listener's own address is the path as its
//! owner gave it ([`Address::Given`]), as on the Python core.
//!
//! A Unix listener's socket file ([`SocketFile`]) is removed when the listener's socket
//! closes, if it is still the file the listener bound (same device and inode): the rule of
//! `ioserver._unix._UnixListenerSocket.close`, carried over because the native thread
//! owns that socket.  The checks before binding (a stale file probed and removed, a file
//! that is not a socket never touched) stay in Python, where the socket is bound.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

use crate::core::{StreamOptions, Target};

/// A stream port's socket.
pub enum Sock {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix stream connection.
    Unix(UnixStream),
}

/// Where a connect goes.
pub enum Destination {
    /// A numeric TCP address.
    Inet(SocketAddr),
    /// A Unix socket: the path's bytes as the kernel takes them (a leading NUL: Linux's
    /// abstract namespace), and the path as Python gave it (what its errors name).
    Unix(Vec<u8>, Target),
    /// No connect: a connected Unix stream Python made (our end of the socket pair that
    /// is a program's stdin and stdout), and what its errors name.
    Adopted(std::os::unix::net::UnixStream, Target),
}

impl Destination {
    /// The address a refusal names, the destination given up (an adopted socket closes).
    pub fn into_address(self) -> Address {
        match self {
            Destination::Inet(address) => Address::Inet(address),
            Destination::Unix(_, given) | Destination::Adopted(_, given) => Address::Given(given),
        }
    }

    /// Start connecting a non-blocking socket: the socket and whether the connect is
    /// done already (else its writable edge says when); and the address a failure
    /// names.  A Unix connect is done at once or fails: `EAGAIN` (the listener's backlog
    /// is full) is its failure, not a connect in progress, as an unconnected Unix socket
    /// gets no edge when the backlog frees.  An adopted socket is connected already.
    pub fn open(self) -> (io::Result<(Sock, bool)>, Address) {
        match self {
            Destination::Inet(address) => {
                let domain = socket2::Domain::for_address(address);
                let made = Sock::start(domain, &address.into(), false);
                (made, Address::Inet(address))
            }
            Destination::Unix(path, given) => (Sock::connect_unix(&path), Address::Given(given)),
            Destination::Adopted(stream, given) => {
                let made = stream
                    .set_nonblocking(true)
                    .map(|()| (Sock::Unix(UnixStream::from_std(stream)), true));
                (made, Address::Given(given))
            }
        }
    }
}

/// A socket address, as events carry it to Python (see the module's comment).
pub enum Address {
    /// A TCP address.
    Inet(SocketAddr),
    /// A Unix socket's address, as the kernel reports it.
    Unix(std::os::unix::net::SocketAddr),
    /// The Python object the owner gave (a Unix listener's path): handed back as it is.
    Given(Target),
}

impl Address {
    /// `0.0.0.0:0`: what a TCP listen that failed before it had an address names.
    pub fn unspecified() -> Address {
        Address::Inet(SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

impl Sock {
    /// True for a Unix stream (a Unix connection, a program's stdio).
    pub fn is_unix(&self) -> bool {
        matches!(self, Sock::Unix(_))
    }

    /// Start connecting to the Unix socket at `path` (its bytes; a leading NUL: the
    /// abstract namespace).
    fn connect_unix(path: &[u8]) -> io::Result<(Sock, bool)> {
        use std::os::unix::ffi::OsStrExt;
        let address = socket2::SockAddr::unix(std::ffi::OsStr::from_bytes(path))?;
        Sock::start(socket2::Domain::UNIX, &address, true)
    }

    fn start(
        domain: socket2::Domain,
        address: &socket2::SockAddr,
        unix: bool,
    ) -> io::Result<(Sock, bool)> {
        let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        socket.set_cloexec(true)?;
        let done = match socket.connect(address) {
            Ok(()) => true,
            Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => false,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock && !unix => false,
            Err(error) => return Err(error),
        };
        let sock = if unix {
            Sock::Unix(UnixStream::from_std(socket.into()))
        } else {
            Sock::Tcp(TcpStream::from_std(socket.into()))
        };
        Ok((sock, done))
    }

    /// Set a connection's socket options: `TCP_NODELAY` and `SO_KEEPALIVE` on TCP, the
    /// buffer sizes on either (as `ioserver._tcp.apply_stream_options`).
    pub fn apply_options(&self, options: &StreamOptions) -> io::Result<()> {
        let socket = socket2::SockRef::from(self);
        if let Sock::Tcp(_) = self {
            socket.set_nodelay(options.nodelay)?;
            if options.keepalive {
                socket.set_keepalive(true)?;
            }
        }
        if let Some(size) = options.recbuf {
            socket.set_recv_buffer_size(size)?;
        }
        if let Some(size) = options.sndbuf {
            socket.set_send_buffer_size(size)?;
        }
        Ok(())
    }

    /// Shut down one direction (`send_eof`).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        }
    }

    /// The pending error (`SO_ERROR`), cleared.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Sock::Tcp(s) => s.take_error(),
            Sock::Unix(s) => s.take_error(),
        }
    }

    /// The socket's own address.
    pub fn local_addr(&self) -> io::Result<Address> {
        match self {
            Sock::Tcp(s) => s.local_addr().map(Address::Inet),
            Sock::Unix(s) => s.local_addr().map(Address::Unix),
        }
    }

    /// The peer's address (`ENOTCONN` while a connect is in progress).
    pub fn peer_addr(&self) -> io::Result<Address> {
        match self {
            Sock::Tcp(s) => s.peer_addr().map(Address::Inet),
            Sock::Unix(s) => s.peer_addr().map(Address::Unix),
        }
    }
}

impl Read for &Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Sock::Tcp(s) => (&*s).read(buf),
            Sock::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Sock::Tcp(s) => (&*s).write(buf),
            Sock::Unix(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Sock::Tcp(s) => (&*s).write_vectored(bufs),
            Sock::Unix(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Sock::Tcp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Source for Sock {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.register(registry, token, interests),
            Sock::Unix(s) => s.register(registry, token, interests),
        }
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.reregister(registry, token, interests),
            Sock::Unix(s) => s.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.deregister(registry),
            Sock::Unix(s) => s.deregister(registry),
        }
    }
}

/// A Unix listener's socket file: removed when dropped, if the path still names it (the
/// same device and inode as when it was bound), as `_UnixListenerSocket.close` does; a
/// file that replaced it is left alone.
pub struct SocketFile {
    path: PathBuf,
    identity: (u64, u64),
}

impl SocketFile {
    /// The file bound at `path` (its bytes), which was `(st_dev, st_ino)` when bound.
    pub fn new(path: Vec<u8>, identity: (u64, u64)) -> SocketFile {
        use std::os::unix::ffi::OsStringExt;
        SocketFile {
            path: PathBuf::from(std::ffi::OsString::from_vec(path)),
            identity,
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Already gone, or not ours to remove: nothing to do (as in Python).
        if let Ok(info) = std::fs::metadata(&self.path) {
            if (info.dev(), info.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// A listening socket Python made (bound and listening), handed to the I/O thread
/// (`Command::Listen`).
pub enum ListenSocket {
    /// A TCP listener.
    Tcp(std::net::TcpListener),
    /// A Unix stream listener.
    Unix {
        /// The socket.
        socket: std::os::unix::net::UnixListener,
        /// Its path as its owner gave it (its address, and each accepted port's local one).
        path: Target,
        /// Its socket file, removed when it closes (None: the abstract namespace).
        file: Option<SocketFile>,
    },
}

/// A listening socket.  A Unix one's socket file (if it has one: not in the abstract
/// namespace) goes when it closes: the variant's fields drop in order, the socket first.
pub enum ListenSock {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix stream listener.
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Its socket file, held for its drop (which removes it), after the socket's.
        _file: Option<SocketFile>,
    },
}

impl ListenSock {
    /// Accept a connection: its socket and the peer's address.
    pub fn accept(&self) -> io::Result<(Sock, Address)> {
        match self {
            ListenSock::Tcp(l) => l
                .accept()
                .map(|(s, remote)| (Sock::Tcp(s), Address::Inet(remote))),
            ListenSock::Unix { listener: l, .. } => l
                .accept()
                .map(|(s, remote)| (Sock::Unix(s), Address::Unix(remote))),
        }
    }
}

impl Source for ListenSock {
    fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            ListenSock::Tcp(l) => l.register(registry, token, interests),
            ListenSock::Unix { listener: l, .. } => l.register(registry, token, interests),
        }
    }

    fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interests: Interest,
    ) -> io::Result<()> {
        match self {
            ListenSock::Tcp(l) => l.reregister(registry, token, interests),
            ListenSock::Unix { listener: l, .. } => l.reregister(registry, token, interests),
        }
    }

    fn deregister(&mut self, registry: &Registry) -> io::Result<()> {
        match self {
            ListenSock::Tcp(l) => l.deregister(registry),
            ListenSock::Unix { listener: l, .. } => l.deregister(registry),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_file_goes_only_if_it_is_still_the_one_bound() {
        let dir = std::env::temp_dir().join(format!("ioserver-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let info = std::fs::metadata(&path).unwrap();
        let bytes = path.as_os_str().as_encoded_bytes().to_vec();
        drop(SocketFile::new(bytes.clone(), (info.dev(), info.ino())));
        assert!(!path.exists(), "its own file is removed");
        // Another file put at the path (made while the socket file still exists, so that
        // its inode is another): left alone.
        let listener2 = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let info = std::fs::metadata(&path).unwrap();
        let other = dir.join("other");
        std::fs::write(&other, b"someone else's").unwrap();
        std::fs::rename(&other, &path).unwrap();
        drop(SocketFile::new(bytes, (info.dev(), info.ino())));
        drop((listener, listener2));
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_unix_connect_is_done_at_once_or_fails() {
        let error = Sock::connect_unix(b"/nonexistent-ioserver-dir/s.sock").err();
        assert_eq!(error.and_then(|e| e.raw_os_error()), Some(libc::ENOENT));
        let name = format!("\0ioserver-sock-test-{}", std::process::id());
        let listener = std::os::unix::net::UnixListener::bind_addr(
            &<std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(&name.as_bytes()[1..]).unwrap(),
        )
        .unwrap();
        let (sock, done) = Sock::connect_unix(name.as_bytes()).unwrap();
        assert!(done);
        // (Through the mio socket: an `Address` dropped here would link Python's decref.)
        let Sock::Unix(stream) = &sock else {
            panic!("not a Unix socket")
        };
        use std::os::linux::net::SocketAddrExt;
        let peer = stream.peer_addr().unwrap();
        assert_eq!(peer.as_abstract_name(), Some(&name.as_bytes()[1..]));
        drop(listener);
    }
}
