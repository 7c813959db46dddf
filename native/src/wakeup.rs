//! The queues between the threads and their wake-up fd: the protocol is the
//! `ioserver-wakeup` crate (`native/wakeup/`, its theory of operation and its loom model);
//! this module gives it the wake-up fd, an eventfd (made in `unsafe_io`), and runs it
//! against real threads and epoll (the multi-producer stress test).

use std::io;

pub use ioserver_wakeup::Wake;

/// A queue from producer threads to one consumer that sleeps on its eventfd [`Signal`].
pub type WakeQueue<T> = ioserver_wakeup::WakeQueue<T, Signal>;

/// A wake-up fd: an eventfd, non-blocking.  [`Signal::signal`] makes it readable from any
/// thread; [`Signal::drain`] makes it unreadable again.
pub struct Signal {
    /// The eventfd; None once closed (a signal then does nothing: the consumer is gone).
    /// Read-locked to write or drain it (at most once per wake, not per item), so the two
    /// never wait for each other; write-locked only to close it, which waits for a write or
    /// drain in progress (then none can use the fd number after it is closed, and reused).
    /// A `Mutex` here made every wake race its own drain: the producer held it across the
    /// `write`, which wakes the consumer, whose first act is the drain - it found the lock
    /// held, slept on the futex and was woken again by the unlock (a third of the wakes
    /// did, each a futex wait, a futex wake and two context switches; bench/README.md).
    file: std::sync::RwLock<Option<std::fs::File>>,
    fd: std::os::fd::RawFd,
}

impl Wake for Signal {
    /// A new eventfd.
    fn new() -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let file = crate::unsafe_io::eventfd()?;
        let fd = file.as_raw_fd();
        Ok(Signal {
            file: std::sync::RwLock::new(Some(file)),
            fd,
        })
    }

    /// Make the fd readable; never blocks (a full counter is already readable).
    fn signal(&self) {
        use std::io::Write;
        if let Ok(file) = self.file.read() {
            if let Some(file) = file.as_ref() {
                let _ = (&*file).write(&1u64.to_ne_bytes());
            }
        }
    }
}

impl Signal {
    /// Make the fd readable (as [`Wake::signal`], callable without the trait in scope).
    pub fn signal(&self) {
        Wake::signal(self)
    }

    /// The fd to wait on for readability (-1 once closed).
    pub fn fd(&self) -> std::os::fd::RawFd {
        match self.file.read() {
            Ok(file) if file.is_some() => self.fd,
            _ => -1,
        }
    }

    /// Consume every pending signal; true if there was one.
    pub fn drain(&self) -> bool {
        use std::io::Read;
        let mut value = [0u8; 8];
        match self.file.read() {
            Ok(file) => match file.as_ref() {
                Some(file) => matches!((&*file).read(&mut value), Ok(8)),
                None => false,
            },
            Err(_) => false,
        }
    }

    /// Close the fd (idempotent): the consumer will not wait on it again.
    pub fn close(&self) {
        if let Ok(mut file) = self.file.write() {
            file.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::unix::SourceFd;
    use mio::{Events, Interest, Poll, Token};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    /// Several producers and one consumer that sleeps in epoll whenever the queue looks
    /// empty: every item arrives once, each producer's in the order it pushed them, the
    /// consumer never sleeps through one (a lost wake-up would end in the 5 s timeout),
    /// and a burst costs far fewer writes than items.
    #[test]
    fn stress_multi_producer() {
        const PRODUCERS: u64 = 4;
        const EACH: u64 = 50_000;
        let queue = Arc::new(WakeQueue::<u64>::new().unwrap());
        let mut poll = Poll::new().unwrap();
        let fd = queue.signal.fd();
        poll.registry()
            .register(&mut SourceFd(&fd), Token(0), Interest::READABLE)
            .unwrap();
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|p| {
                let queue = queue.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        queue.put(p * EACH + i);
                        if i % 1000 == 0 {
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let mut seen = vec![false; (PRODUCERS * EACH) as usize];
        // Each producer's next item, in its push order.
        let mut next = vec![0; PRODUCERS as usize];
        let mut got = 0;
        let mut events = Events::with_capacity(4);
        while got < PRODUCERS * EACH {
            while let Some(item) = queue.pop() {
                assert!(!seen[item as usize], "item {item} delivered twice");
                seen[item as usize] = true;
                let (producer, index) = ((item / EACH) as usize, item % EACH);
                assert_eq!(
                    index, next[producer],
                    "producer {producer}'s items out of order"
                );
                next[producer] += 1;
                got += 1;
            }
            if got == PRODUCERS * EACH {
                break;
            }
            if queue.prepare_to_sleep() {
                poll.poll(&mut events, Some(Duration::from_secs(5)))
                    .unwrap();
                assert!(
                    !events.is_empty(),
                    "lost wake-up: slept 5 s with {got} of {} items taken",
                    PRODUCERS * EACH
                );
                queue.signal.drain();
            }
            queue.woke();
        }
        for producer in producers {
            producer.join().unwrap();
        }
        let sent = queue.wakes_sent.load(Ordering::Relaxed);
        let skipped = queue.wakes_skipped.load(Ordering::Relaxed);
        assert_eq!(sent + skipped, PRODUCERS * EACH);
        assert!(sent < PRODUCERS * EACH / 2, "{sent} wakes for a burst");
    }

    /// A signal drains to unreadable, and a push to an awake consumer writes nothing.
    #[test]
    fn no_write_while_awake() {
        let queue = WakeQueue::<u8>::new().unwrap();
        queue.put(1);
        assert!(!queue.signal.drain());
        assert!(!queue.prepare_to_sleep());
        assert_eq!(queue.pop(), Some(1));
        assert!(queue.prepare_to_sleep());
        queue.put(2);
        assert!(queue.signal.drain());
        assert!(!queue.signal.drain());
        assert_eq!(queue.wakes_sent.load(Ordering::Relaxed), 1);
    }

    /// A drain does not wait for a signal in progress (nor a signal for a drain): the
    /// consumer a write wakes drains at once, while the producer is still in its `write`.
    /// Here a producer stays inside its signal (holding what a signal holds), and the
    /// consumer's drain and fd, and another producer's signal, must still return; a close
    /// waits for it, so the fd is never used once closed.
    #[test]
    fn a_drain_does_not_wait_for_a_signal_in_progress() {
        let signal = Arc::new(Signal::new().unwrap());
        let in_write = signal.file.read().unwrap(); // a producer inside its write
        let consumer = {
            let signal = signal.clone();
            std::thread::spawn(move || {
                signal.signal(); // another producer
                (signal.drain(), signal.fd() >= 0)
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !consumer.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            consumer.is_finished(),
            "the drain waited for a signal in progress"
        );
        assert_eq!(consumer.join().unwrap(), (true, true));
        let closer = {
            let signal = signal.clone();
            std::thread::spawn(move || signal.close())
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(!closer.is_finished(), "close did not wait for the write");
        drop(in_write);
        closer.join().unwrap();
        assert_eq!(signal.fd(), -1);
        signal.signal(); // closed: nothing, no error
        assert!(!signal.drain());
    }
}
