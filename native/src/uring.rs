//! The io_uring backend of the native I/O thread: a round's reads and writes in one
//! `io_uring_enter` (issue 14).
//!
//! Readiness still comes from epoll (mio, edge-triggered): the backend changes how the
//! round's syscalls are made, not which ports take part or what follows each.  At the
//! round's flush point (where the epoll backend writes its dirty ports), the thread takes
//! the ready list as `read_ready` would and the dirty list as `flush_dirty` would; each
//! stream that would read gets one receive of up to [`READ_SIZE`] bytes into a buffer of
//! the ring's ([`RECEIVES`] of them: the other ready streams stay ready for the next round),
//! and each dirty stream one gathered send of its first `IOV_MAX` queued buffers
//! ([`SENDS`] of them: the others stay dirty).  Listeners accept as with epoll.  All of it
//! goes to the kernel in one `io_uring_enter`, which also waits for every completion; the
//! sockets are non-blocking and every operation carries `MSG_DONTWAIT`, so the kernel
//! completes each at once: with bytes, a short count, `EAGAIN` or an error.  The results
//! are then handled in order, receives first, by the code that follows the epoll backend's
//! `read` and `writev` ([`IoThread::after_read`], [`IoThread::after_write`],
//! [`IoThread::finish_write`]): framing, flow control, EOF, errors and `EAGAIN` are the
//! same decisions.  A receive's bytes are in the ring's buffer; it is exchanged with the
//! thread's own read buffer (a swap of two `Vec`s, no copy) before `after_read` runs.
//!
//! What differs from the epoll backend, and why it does not matter:
//! * the reads are made at the flush point, after the round's commands, not before them
//!   (the commands cannot make a read wrong: whether a stream may read is decided when its
//!   receive is prepared, in the same step as the submission);
//! * a port whose queue holds more than `IOV_MAX` buffers writes one gather per round
//!   (the epoll backend loops until the socket is full): the rest goes next round, which
//!   polls without sleeping while a port is dirty.
//!
//! Buffer lifetimes: nothing the kernel reads or writes is freed, moved or reused before
//! its completion is reaped.  `Ring::run` (in `unsafe_io.rs`, with the whole argument)
//! returns only once every completion of the round is reaped; the sends' slices are
//! borrowed from the streams' queues for that call, and no stream is closed or changed
//! while it runs (this thread is in the call).  Only after it does `after_read` or
//! `after_write` pop a written buffer or close a port.
//!
//! Where the kernel refuses io_uring (`ENOSYS`, `EPERM` under a seccomp filter or
//! `kernel.io_uring_disabled`, a kernel before 5.6, one that would park a non-blocking
//! receive or send, `ENOMEM` under an old kernel's locked-memory limit), [`open`] says why: the default falls back to epoll, an explicit
//! `io_uring` is an error.  Should `io_uring_enter` fail during a round with nothing
//! submitted, the thread gives the ring up and continues on epoll (`Shared::io_uring`
//! goes false, `internal_errors` counts it).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use super::{gathered, Entry, IoThread, Stream, Written, READ_SIZE};
use crate::unsafe_io::Ring;

/// Receives per round at most (each into its own [`READ_SIZE`] buffer: 4 MiB of address
/// space, resident only as far as reads have filled it).
pub const RECEIVES: usize = 64;
/// Sends per round at most.
pub const SENDS: usize = 192;

/// Which syscalls the native I/O thread makes for its reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// One `read` or `writev` per port (readiness from epoll).
    Epoll,
    /// A round's receives and sends in one `io_uring_enter` (readiness from epoll).
    IoUring,
}

impl Backend {
    /// `"epoll"` or `"io_uring"`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Epoll => "epoll",
            Backend::IoUring => "io_uring",
        }
    }

    /// The backend named `name` (`"epoll"`, `"io_uring"`), if any.
    pub fn parse(name: &str) -> Option<Backend> {
        match name {
            "epoll" => Some(Backend::Epoll),
            "io_uring" => Some(Backend::IoUring),
            _ => None,
        }
    }
}

/// The io_uring backend's state: the ring and its per-round scratch.
pub struct Uring {
    ring: Ring,
    /// This round's receives: `(slot, port id, bytes of headroom held)`, and their `(fd,
    /// bytes at most)`.
    receiving: Vec<(usize, u64, u64)>,
    receives: Vec<(RawFd, usize)>,
    /// This round's sends: `(slot, port id, bytes asked)`.
    sending: Vec<(usize, u64, usize)>,
    /// The operations' results, receives first.
    results: Vec<i32>,
}

/// The backend to run: `requested`, or (None) io_uring where the kernel allows it, else
/// epoll.  Returns the ring (None: epoll) and, when the default fell back to epoll, the
/// kernel's refusal.  Errors: `requested` is io_uring and the kernel refuses it (the
/// error's errno says why).
pub fn open(requested: Option<Backend>) -> io::Result<(Option<Uring>, Option<io::Error>)> {
    if requested == Some(Backend::Epoll) {
        return Ok((None, None));
    }
    match Ring::new(RECEIVES, SENDS, READ_SIZE) {
        Ok(ring) => Ok((
            Some(Uring {
                ring,
                receiving: Vec::with_capacity(RECEIVES),
                receives: Vec::with_capacity(RECEIVES),
                sending: Vec::with_capacity(SENDS),
                results: Vec::with_capacity(RECEIVES + SENDS),
            }),
            None,
        )),
        Err(error) if requested.is_none() => Ok((None, Some(error))),
        Err(error) => Err(error),
    }
}

impl IoThread {
    /// Make the rounds' reads and writes through `uring` (None: the epoll backend).
    pub fn set_uring(&mut self, uring: Option<Uring>) {
        self.shared
            .io_uring
            .store(uring.is_some(), Ordering::Relaxed);
        self.uring = uring;
    }

    /// Take the stream in `slot` out of the table if it is still port `id`.
    fn take_stream(&mut self, slot: usize, id: u64) -> Option<Box<Stream>> {
        match self.table.get_mut(slot) {
            Some(entry) if entry.as_ref().is_some_and(|e| e.conn().id == id) => {
                match entry.take() {
                    Some(Entry::Stream(s)) => Some(s),
                    other => {
                        *entry = other;
                        None
                    }
                }
            }
            _ => None,
        }
    }

    /// The round's reads and writes, io_uring's way (see the module's comment).
    pub(super) fn uring_round(&mut self) {
        let Some(mut u) = self.uring.take() else {
            return;
        };
        u.receiving.clear();
        u.receives.clear();
        u.sending.clear();
        // The reads: the ready list, as `read_ready` takes it.
        for slot in std::mem::take(&mut self.ready) {
            match self.table.get_mut(slot).and_then(|e| e.take()) {
                Some(Entry::Stream(mut s)) => {
                    s.in_ready = false;
                    if Self::may_read(&s) && s.readable {
                        // After the round's first read, only reads the budget admits whole
                        // (its headroom less what the reads before may be charged): the
                        // others wait a round, as one read at a time would see them.
                        // (A closing port's reads are dropped, not charged: not the
                        // budget's, as in read_ready.)
                        let fits =
                            s.close_pending || u.receiving.is_empty() || self.budget.fits(&s.flow);
                        if u.receiving.len() < u.ring.max_receives() && fits {
                            if s.close_pending {
                                let max = self.buffer.len();
                                u.receiving.push((slot, s.conn.id, 0));
                                u.receives.push((s.sock.as_raw_fd(), max));
                            // The budget, as read_ready asks it: None pauses the port (the
                            // round that lets it go, or its owner's cmd_want, schedules it).
                            } else if let Some(grant) = self.budget.admit_read(&mut s.flow) {
                                let max = grant.max.min(self.buffer.len());
                                let held = self.budget.hold(&s.flow, max);
                                u.receiving.push((slot, s.conn.id, held));
                                u.receives.push((s.sock.as_raw_fd(), max));
                            } else {
                                s.conn.publish(&s.flow, &self.shared);
                            }
                        } else {
                            s.in_ready = true; // next round
                            self.ready.push(slot);
                        }
                    }
                    self.put(Entry::Stream(s));
                }
                Some(Entry::Listener(mut l)) => {
                    l.in_ready = false;
                    self.accept(&mut l);
                    self.put(Entry::Listener(l));
                }
                None => {}
            }
        }
        // The writes: the dirty list, as `flush_dirty` takes it.
        for slot in std::mem::take(&mut self.dirty) {
            match self.table.get_mut(slot).and_then(|e| e.take()) {
                Some(Entry::Stream(mut s)) => {
                    s.dirty = false;
                    if s.outq.is_empty() {
                        // No syscall: only what follows the writes (a pending close).
                        if self.write(&mut s) {
                            self.put(Entry::Stream(s));
                        }
                        continue;
                    }
                    if u.sending.len() < u.ring.max_sends() {
                        let wanted = gathered(&s).map(<[u8]>::len).sum();
                        u.sending.push((slot, s.conn.id, wanted));
                    } else {
                        s.dirty = true; // next round
                        self.dirty.push(slot);
                    }
                    self.put(Entry::Stream(s));
                }
                Some(entry) => self.put(entry),
                None => {}
            }
        }
        if u.receiving.is_empty() && u.sending.is_empty() {
            self.uring = Some(u);
            return;
        }
        // One io_uring_enter.  The sends' slices are borrowed from the streams' queues,
        // which stay in the table, untouched, until `run` has reaped every completion.
        let table = &self.table;
        let sends = u.sending.iter().map(|&(slot, ..)| {
            let stream = match table.get(slot) {
                Some(Some(Entry::Stream(s))) => Some(s),
                _ => None, // cannot be: it was just put back (an empty send if it were)
            };
            (
                stream.map_or(-1, |s| s.sock.as_raw_fd()),
                stream.into_iter().flat_map(|s| gathered(s)),
            )
        });
        let enters = match u.ring.run(&u.receives, sends) {
            Ok((results, enters)) => {
                u.results.clear();
                u.results.extend_from_slice(results);
                enters
            }
            Err(error) => {
                self.give_up_uring(&u, &error);
                return;
            }
        };
        let submitted = (u.receiving.len() + u.sending.len()) as u64;
        self.shared
            .uring_enters
            .fetch_add(enters, Ordering::Relaxed);
        self.shared
            .uring_submissions
            .fetch_add(submitted, Ordering::Relaxed);
        // What follows each, in order: the reads, then the writes.
        for (index, &(slot, id, held)) in u.receiving.iter().enumerate() {
            self.budget.release_hold(held);
            let Some(mut s) = self.take_stream(slot, id) else {
                continue;
            };
            let result = match u.results[index] {
                received if received >= 0 => {
                    std::mem::swap(&mut self.buffer, u.ring.buffer_mut(index));
                    Ok(received as usize)
                }
                errno => Err(io::Error::from_raw_os_error(-errno)),
            };
            if self.after_read(&mut s, result, u.receives[index].1) {
                self.put(Entry::Stream(s));
            }
        }
        let first_send = u.receiving.len();
        for (index, &(slot, id, wanted)) in u.sending.iter().enumerate() {
            let Some(mut s) = self.take_stream(slot, id) else {
                continue; // its read closed it
            };
            let result = match u.results[first_send + index] {
                sent if sent >= 0 => Ok(sent as usize),
                errno => Err(io::Error::from_raw_os_error(-errno)),
            };
            let mut total = 0u64;
            match self.after_write(&mut s, result, wanted, &mut total) {
                Written::Closed => continue,
                Written::Again if !s.outq.is_empty() && !s.dirty => {
                    s.dirty = true; // more than one gather queued: the rest next round
                    self.dirty.push(slot);
                }
                Written::Again | Written::Full => {}
            }
            if self.finish_write(&mut s, total) {
                self.put(Entry::Stream(s));
            }
        }
        self.uring = Some(u);
    }

    /// `io_uring_enter` failed and the kernel took none of the round's operations: go on
    /// with the epoll backend (the round's reads and writes stay on the ready and dirty
    /// lists, for the next round).
    fn give_up_uring(&mut self, u: &Uring, error: &io::Error) {
        self.shared.io_uring.store(false, Ordering::Relaxed);
        self.shared.internal_errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut failure) = self.shared.uring_failure.lock() {
            *failure = Some(format!("io_uring_enter failed: {error}"));
        }
        for &(slot, id, held) in &u.receiving {
            self.budget.release_hold(held); // never made
            if let Some(mut s) = self.take_stream(slot, id) {
                if !s.in_ready {
                    s.in_ready = true;
                    self.ready.push(slot);
                }
                self.put(Entry::Stream(s));
            }
        }
        for &(slot, id, _) in &u.sending {
            if let Some(mut s) = self.take_stream(slot, id) {
                if !s.dirty {
                    s.dirty = true;
                    self.dirty.push(slot);
                }
                self.put(Entry::Stream(s));
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// A ring, or None where this kernel refuses io_uring (the test is then skipped).
    fn ring() -> Option<Ring> {
        match Ring::new(4, 4, 1024) {
            Ok(ring) => Some(ring),
            Err(error) => {
                eprintln!("io_uring is refused here ({error}): skipped");
                None
            }
        }
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    #[test]
    fn the_backends_are_named() {
        for backend in [Backend::Epoll, Backend::IoUring] {
            assert_eq!(Backend::parse(backend.name()), Some(backend));
        }
        assert_eq!(Backend::parse("kqueue"), None);
        assert!(open(Some(Backend::Epoll)).unwrap().0.is_none());
    }

    #[test]
    fn a_rounds_receives_and_sends_take_one_enter() {
        let Some(mut ring) = ring() else { return };
        let pairs: Vec<_> = (0..3).map(|_| pair()).collect();
        (&pairs[0].1).write_all(b"hello").unwrap();
        (&pairs[1].1).write_all(b"world!").unwrap();
        let receives = [
            (pairs[0].0.as_raw_fd(), 1024),
            (pairs[1].0.as_raw_fd(), 3),    // at most 3 bytes
            (pairs[2].0.as_raw_fd(), 1024), // nothing to read: EAGAIN, at once
        ];
        let (first, second) = (b"gathered ".to_vec(), b"write".to_vec());
        let sends = [(pairs[2].0.as_raw_fd(), [&first[..], &second[..]])];
        let (results, enters) = ring.run(&receives, sends).unwrap();
        assert_eq!(results, &[5, 3, -libc::EAGAIN, 14]);
        assert_eq!(enters, 1);
        assert_eq!(&ring.buffer_mut(0)[..5], b"hello");
        assert_eq!(&ring.buffer_mut(1)[..3], b"wor");
        let mut got = [0u8; 14];
        (&pairs[2].1).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"gathered write");
        // Nothing submitted: no enter.
        let none: [(RawFd, [&[u8]; 0]); 0] = [];
        assert_eq!(ring.run(&[], none).unwrap().1, 0);
    }

    #[test]
    fn a_send_to_a_full_socket_is_short_then_eagain_never_a_wait() {
        let Some(mut ring) = ring() else { return };
        let (a, b) = pair();
        let big = vec![7u8; 4 << 20];
        let (results, _) = ring.run(&[], [(a.as_raw_fd(), [&big[..]])]).unwrap();
        assert!(
            results[0] > 0 && (results[0] as usize) < big.len(),
            "{results:?}"
        );
        let (results, _) = ring.run(&[], [(a.as_raw_fd(), [&big[..]])]).unwrap();
        assert_eq!(results, &[-libc::EAGAIN]);
        drop(b);
        let (results, _) = ring.run(&[], [(a.as_raw_fd(), [&big[..]])]).unwrap();
        assert_eq!(results, &[-libc::EPIPE]);
    }

    #[test]
    fn a_swapped_buffer_is_the_next_runs_target() {
        let Some(mut ring) = ring() else { return };
        let (a, b) = pair();
        (&b).write_all(b"one").unwrap();
        let none: [(RawFd, [&[u8]; 0]); 0] = [];
        ring.run(&[(a.as_raw_fd(), 1024)], none).unwrap();
        let mut mine = vec![0u8; 1024];
        std::mem::swap(&mut mine, ring.buffer_mut(0));
        assert_eq!(&mine[..3], b"one");
        (&b).write_all(b"two").unwrap();
        let none: [(RawFd, [&[u8]; 0]); 0] = [];
        let (results, _) = ring.run(&[(a.as_raw_fd(), 1024)], none).unwrap();
        assert_eq!(results, &[3]);
        assert_eq!(&ring.buffer_mut(0)[..3], b"two");
        assert_eq!(
            &mine[..3],
            b"one",
            "the buffer taken out is not written again"
        );
    }
}
