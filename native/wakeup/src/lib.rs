//! Queues between threads, with a wake-up fd written only when the consumer sleeps: the
//! protocol of `ioserver/_wakeup.py`, in Rust, with the atomics it needs.
//!
//! # Theory of operation
//!
//! Each direction is one [`WakeQueue`]: a lock-free queue of items (the crate's own,
//! multi-producer, one consumer: see *The queue* below), a wake-up [`Wake`] (an eventfd)
//! and a flag, `asleep`.  Towards the I/O thread the producers are the event loops'
//! threads (commands) and the consumer is the I/O thread, blocked in epoll; towards an
//! event loop the producer is the I/O thread and the consumer is that loop's hub, blocked
//! in the loop's selector.
//!
//! **The queue.**  Every queue has exactly one consumer: the I/O thread pops the commands
//! (in its round and at its shutdown, `native/src/core.rs`), and a loop's inbox is popped
//! by that loop's hub only (`Inbox.take`, `native/src/py.rs`; an inbox belongs to one
//! loop).  So it is a multi-producer, single-consumer queue (`stack.rs`, the crate's only
//! `unsafe` code): a producer pushes a node on an intrusive stack with one CAS (Release);
//! the consumer, when what it took before is used up, takes the whole stack with one swap
//! (Acquire) and pops the nodes oldest first.  The Release/Acquire pair is the items'
//! hand-off: the push's writes (the item, the node's link) happen before the consumer's
//! reads.  Only whole stacks are taken, so there is no ABA; the order is the order of the
//! pushes' CASes, so one producer's items (the commands of one port, from its loop's
//! thread) come out in the order it pushed them.  The consumer's side sits behind a lock
//! that only the consumer takes (uncontended): it makes `pop` sound whoever calls it, and
//! producers never wait on it.  Items still queued when the queue is dropped are dropped
//! with it.
//!
//! The flag and a count of the items pushed share one atomic word, `state`: bit 0 is
//! `asleep`, bit 1 says the sleep is *timed* (see deferred wakes below), the rest counts
//! completed pushes (`state >> 2`; written `<< 1` below for the argument's sake).  The
//! consumer counts what it took (`taken`, its own).
//!
//! Consumer, before it blocks ([`WakeQueue::prepare_to_sleep`], then the block, then
//! [`WakeQueue::woke`]):
//!
//! ```text
//! C1+C2  CAS state: taken << 1  ->  taken << 1 | 1       (AcqRel)
//!        failed (more was pushed than taken): do not block, take the items
//! C3     block until the fd is readable (or another fd is)
//! C4     state.fetch_and(!1); drain the fd; take every item (taken += 1 each)
//! ```
//!
//! Producer ([`WakeQueue::put`]):
//!
//! ```text
//! P1  items.push(x)
//! P2  prev = state.fetch_add(2)                         (AcqRel)
//!     if prev & 1 and state.fetch_and(!1) & 1: write the fd
//! ```
//!
//! **Why no wake-up is lost.**  Every access to `state` is a read-modify-write, so all of
//! them - every producer's and the consumer's - fall in one total order (the word's
//! modification order), and each reads the value the one before it wrote.  Take a
//! producer whose item the consumer has not taken when it announces its sleep.  If the
//! producer's `fetch_add` comes before the consumer's CAS in that order, the CAS finds
//! the count past `taken` and fails: the consumer does not block.  If it comes after, it
//! reads bit 0 set, unless an RMW in between cleared it - another producer's `fetch_and`
//! that got the bit (and so wrote the fd), or the consumer's own C4 (it is awake then).
//! Of the producers that see the bit, the one whose `fetch_and` returns it set writes
//! the fd.  So the consumer never blocks at C3 with an item queued and no write to come.
//! This is the classic "announce, then re-check" of ZeroMQ's `ypipe` and Erlang's
//! `erl_poll.c` (as in `ioserver/_wakeup.py`), with the announcement and the re-check made
//! one atomic step: the argument rests on the modification order of one word, which every
//! ordering, even `Relaxed`, respects, rather than on a flag and a separate queue check,
//! each fenced (which needs `SeqCst` fences).  AcqRel, not Relaxed, because the count
//! stands for the pushed items: a consumer whose CAS fails goes on to pop them, and the
//! count's release (the push's CAS is sequenced before it) makes that push happen before
//! the consumer's next take, whose swap therefore finds the item (the items' own hand-off
//! is the queue's Release/Acquire, above; this one only makes the take after a failed CAS
//! find what the count promised instead of polling again).  A producer's
//! item may be popped before its `fetch_add` lands; until it lands the count is below
//! `taken`, the consumer's CAS fails, and it polls again without blocking (a few
//! instructions).
//!
//! **What the loom model proves, and what it does not.**  The model runs this crate's
//! code - the queue and the handshake - with loom's atomics, mutex and `UnsafeCell` in
//! place of std's (`sync.rs`), and explores the interleavings of its threads:
//!
//! - *the queue* (`loom_queue_hand_off`): two producers push while the consumer takes,
//!   and in every interleaving each item is taken exactly once, one producer's items in
//!   its order, with their contents, and an item left in the queue is dropped with it.
//!   Loom's race detector checks every read of a node (its item and its link) against the
//!   producer's writes, so the model checks the push's Release and the take's Acquire:
//!   it fails with either weakened to `Relaxed` (`loom_relaxed_push_is_caught`,
//!   `loom_relaxed_take_is_caught`, through a test-only ordering parameter,
//!   `stack::Orders`) - the model can fail.
//! - *the handshake* (`loom_no_lost_wakeup`, `loom_deferred_wake_is_not_lost`): two
//!   producers and a consumer (and a deferred push with and without its flush), with the
//!   real queue, and no schedule lets the consumer block with an item pushed and no signal
//!   to come: within 5 preemptions per execution in the ordinary run (111,426
//!   interleavings, seconds), every interleaving with `IOSERVER_LOOM_EXHAUSTIVE=1` (4.1
//!   million, minutes; native/README.md).  The broken order (read the queue, then
//!   announce) deadlocks in it, and loom says so (`loom_broken_order_is_caught`).
//!
//! Not checked by the model: the orderings of `state` (AcqRel).  The safety of the items
//! does not rest on them (the queue's own pair, checked above, carries them), and the
//! interleaving property holds with any ordering (one word's modification order); what
//! AcqRel adds is that a take after a failed CAS finds the promised item at once, which the
//! model, whose consumer polls again, does not tell from a second poll.  The signal is a
//! loom `Mutex` and `Condvar` in the model (`LoomSignal`), an eventfd in production; the
//! multi-producer stress test (`native/src/wakeup.rs`) runs the real queue and eventfd.
//!
//! **Why a burst costs one write.**  `fetch_and(!1)` is a read-modify-write: of many
//! producers that find `asleep` set, exactly one gets it back set and writes the fd; the
//! others only push.  (Python's version may write twice; an eventfd sums the two.)  A
//! consumer woken by another fd (the I/O thread's sockets) clears the bit at C4 before a
//! producer sees it; a producer that cleared it just before still writes the fd, for an
//! item the consumer takes anyway, and the consumer's next block returns at once and finds
//! nothing: the only spurious wake-up, counted in `spurious_wakes` by the consumer.
//!
//! **Deferred wakes (the loop's flush point).**  A loop that runs a batch of events defers
//! the wakes of the sends its tasks make ([`WakeQueue::put_deferred`]) and wakes the I/O
//! thread once, when they have run ([`WakeQueue::wake_if_asleep`]).  A deferral must not
//! depend on that flush coming soon (a task may block in synchronous code after a send),
//! so it only skips the wake of a consumer whose sleep is *timed*: the I/O thread sleeps
//! with a short timeout after handing a loop a batch (it expects that loop's replies) and
//! untimed otherwise, and a deferred push wakes an untimed sleeper at once.  The loom model
//! checks the untimed case (a timer is not modelled: its bound is the timeout).
//!
//! **Batches.**  The I/O thread publishes one round's events for a loop as one item (a
//! `Vec` of events: one push, one wake at most), so ten thousand events cost one write.
//! A side never wakes the other for nothing: an empty batch is not pushed.
//!
//! The counters (`wakes_sent`, `wakes_skipped`, `spurious_wakes`) are statistics, updated
//! with relaxed atomic adds: exact, but not ordered with anything.  The cost on the hot
//! path: per push, a node's allocation and two locked instructions (the stack's CAS and
//! the count's `fetch_add`; the latter costs what a `SeqCst` fence would); per pop, the
//! consumer's uncontended lock, and one swap per take of the whole stack.
//!
//! The wake-up fd is the caller's [`Wake`] (the extension's eventfd, in `native/src/`):
//! this crate has no pyo3 and no dependency, and its only `unsafe` is `stack.rs`, so that
//! the loom model builds it and loom, nothing else, and runs the production queue.  Under
//! `--cfg loom` only the primitives change (`sync.rs`) and the signal is a loom `Condvar`
//! (`LoomSignal`); the models are `loom_tests` below.

use std::io;

#[allow(unsafe_code)]
mod stack;
mod sync;

use crate::sync::{AtomicU64, Mutex, Ordering};

/// `WakeQueue::state`: the consumer announced its sleep.
const ASLEEP: u64 = 1;
/// `WakeQueue::state`: ... a sleep that ends by itself within a bound.
const TIMED: u64 = 2;
/// Both flags.
const FLAGS: u64 = ASLEEP | TIMED;
/// `WakeQueue::state`: one item pushed.
const ONE: u64 = 4;

/// The capacity, in items, the consumer's buffer keeps between takes: a take larger than
/// this (a burst of commands while the I/O thread slept) gets a buffer of its own, given
/// back once it is used up, so that one burst does not pin its size for the queue's life
/// (100,000 commands of 208 bytes would keep 21 MB, outside any budget).
const KEEP_CAPACITY: usize = 1024;

/// The items of a [`WakeQueue`]: a multi-producer queue, FIFO per producer (and in the
/// order the pushes' CASes took effect), for one consumer.  The producers push on a
/// lock-free [`stack::Stack`]; the consumer takes the whole stack at once, when what it
/// took before is used up, into `taken`, and pops from there in push order.  The same
/// code runs in production and under loom.
struct Items<T> {
    stack: stack::Stack<T>,
    /// The consumer's side: the last take's items not yet popped, oldest *last* (so
    /// `Vec::pop` yields them in push order).  Each queue has one consumer (the I/O thread
    /// takes its commands; one loop's hub takes its inbox), so the lock is uncontended: it
    /// only makes `pop` sound for any caller, a second consumer included.  Producers never
    /// take it.  Its capacity is given back when used up past [`KEEP_CAPACITY`].
    taken: Mutex<Vec<T>>,
}

impl<T> Items<T> {
    fn new() -> Self {
        Items {
            stack: stack::Stack::new(),
            taken: Mutex::new(Vec::new()),
        }
    }

    /// Items on a stack whose push and take use `orders` (the loom model's mutations).
    #[cfg(all(loom, test))]
    fn with_orders(orders: stack::Orders) -> Self {
        Items {
            stack: stack::Stack::with_orders(orders),
            taken: Mutex::new(Vec::new()),
        }
    }

    fn push(&self, item: T) {
        self.stack.push(item)
    }

    fn pop(&self) -> Option<T> {
        // A poisoned lock (a panic while it was held) leaves a valid `Vec`: go on.
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        if taken.is_empty() {
            if taken.capacity() > KEEP_CAPACITY {
                *taken = Vec::new(); // a burst's buffer, used up: given back
            }
            self.stack.take_all(&mut taken);
        }
        taken.pop()
    }

    fn is_empty(&self) -> bool {
        let taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        taken.is_empty() && self.stack.is_empty()
    }
}

/// The consumer's wake-up: what a producer makes "readable" when the consumer sleeps.
pub trait Wake: Sized {
    /// A new wake-up, not signalled.
    fn new() -> io::Result<Self>;
    /// Make it readable (from any thread; never blocks).
    fn signal(&self);
}

/// The loom model's signal: a counter under a mutex, and a condition variable to block on.
#[cfg(loom)]
pub struct LoomSignal {
    count: crate::sync::Mutex<u64>,
    ready: crate::sync::Condvar,
}

#[cfg(loom)]
impl Wake for LoomSignal {
    fn new() -> io::Result<Self> {
        Ok(LoomSignal {
            count: crate::sync::Mutex::new(0),
            ready: crate::sync::Condvar::new(),
        })
    }

    /// Make it "readable".
    fn signal(&self) {
        *self.count.lock().unwrap() += 1;
        self.ready.notify_one();
    }
}

#[cfg(loom)]
impl LoomSignal {
    /// Block until it is "readable", then drain it (C3 and the drain of C4).
    pub fn block(&self) {
        let mut count = self.count.lock().unwrap();
        while *count == 0 {
            count = self.ready.wait(count).unwrap();
        }
        *count = 0;
    }
}
/// A queue from producer threads to one consumer that sleeps on its [`Wake`] (see the
/// module's theory of operation).
pub struct WakeQueue<T, S> {
    items: Items<T>,
    /// Bit 0 ([`ASLEEP`]): the consumer announced its sleep; bit 1 ([`TIMED`]): a sleep
    /// with a timeout; bits 2..: items pushed, ever (in units of [`ONE`]).
    state: AtomicU64,
    /// Items the consumer took, ever (written by the consumer only).
    taken: AtomicU64,
    /// The wake-up fd.
    pub signal: S,
    /// Writes of the fd (wake-ups sent).
    pub wakes_sent: AtomicU64,
    /// Items pushed while the consumer was awake (no write needed).
    pub wakes_skipped: AtomicU64,
    /// Wake-ups after which the consumer found nothing (counted by the consumer).
    pub spurious_wakes: AtomicU64,
}

impl<T, S: Wake> WakeQueue<T, S> {
    /// An empty queue whose consumer is awake (it announces its sleep with
    /// [`WakeQueue::prepare_to_sleep`]).
    pub fn new() -> io::Result<Self> {
        Ok(WakeQueue {
            items: Items::new(),
            state: AtomicU64::new(0),
            taken: AtomicU64::new(0),
            signal: S::new()?,
            wakes_sent: AtomicU64::new(0),
            wakes_skipped: AtomicU64::new(0),
            spurious_wakes: AtomicU64::new(0),
        })
    }

    /// P1 and P2: push `item`, then wake the consumer if it announced its sleep.
    pub fn put(&self, item: T) {
        self.items.push(item);
        // P2: count the push; AcqRel, so that a consumer whose CAS reads this count sees
        // the push (release) and so that this read of bit 0 is ordered after the push.
        let previous = self.state.fetch_add(ONE, Ordering::AcqRel);
        if previous & ASLEEP != 0 && self.state.fetch_and(!FLAGS, Ordering::AcqRel) & ASLEEP != 0 {
            self.signal.signal();
            self.wakes_sent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.wakes_skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// P1 and P2 for a producer that defers its wake to a *flush point* (a loop that
    /// hands out a batch defers the wakes of its tasks' sends until they have run, and pays
    /// one then: [`WakeQueue::wake_if_asleep`]).  A consumer in a *timed* sleep
    /// ([`WakeQueue::prepare_to_sleep`] with `timed`) is not woken here: it wakes by
    /// itself within its bound, or at the flush.  A consumer in an untimed sleep is woken
    /// at once, as by [`WakeQueue::put`], so a deferred push is never left to a flush that
    /// may not come soon (a loop blocked in synchronous code): the delay is bounded by the
    /// consumer's timeout.
    pub fn put_deferred(&self, item: T) {
        self.items.push(item);
        let previous = self.state.fetch_add(ONE, Ordering::AcqRel);
        if previous & ASLEEP != 0
            && previous & TIMED == 0
            && self.state.fetch_and(!FLAGS, Ordering::AcqRel) & ASLEEP != 0
        {
            self.signal.signal();
            self.wakes_sent.fetch_add(1, Ordering::Relaxed);
        } else {
            self.wakes_skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The flush point of deferred pushes: wake the consumer if it announced its sleep.
    pub fn wake_if_asleep(&self) {
        if self.state.load(Ordering::Acquire) & ASLEEP != 0
            && self.state.fetch_and(!FLAGS, Ordering::AcqRel) & ASLEEP != 0
        {
            self.signal.signal();
            self.wakes_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// C1 and C2, one atomic step: announce a sleep if every item pushed was taken.
    /// True: block now (on the fd); false: items are waiting (or a push is landing), take
    /// them and call again.  `timed`: the consumer will wake by itself within a bound, so
    /// deferred pushes need not wake it ([`WakeQueue::put_deferred`]).
    pub fn prepare_to_sleep_for(&self, timed: bool) -> bool {
        let taken = self.taken.load(Ordering::Relaxed);
        let flags = if timed { ASLEEP | TIMED } else { ASLEEP };
        self.state
            .compare_exchange(
                taken * ONE,
                (taken * ONE) | flags,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// [`WakeQueue::prepare_to_sleep_for`] an untimed sleep.
    pub fn prepare_to_sleep(&self) -> bool {
        self.prepare_to_sleep_for(false)
    }

    /// C4: the consumer is awake again (drain the fd separately, then take the items).
    pub fn woke(&self) {
        self.state.fetch_and(!FLAGS, Ordering::AcqRel);
    }

    /// Whether the consumer has announced its sleep (statistics and tests).
    pub fn is_asleep(&self) -> bool {
        self.state.load(Ordering::Acquire) & ASLEEP != 0
    }

    /// Take the next item, if any (the consumer only).
    pub fn pop(&self) -> Option<T> {
        let item = self.items.pop();
        if item.is_some() {
            // Only the consumer writes `taken`.
            self.taken.fetch_add(1, Ordering::Relaxed);
        }
        item
    }

    /// Whether no item is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    // std's Arc: a loom Arc dropped while the caught deadlock unwinds would abort.
    use std::sync::Arc;

    /// The consumer takes `total` items, blocking whenever it finds none; `announce_first`
    /// false is the broken order (read the queue, then announce), which loses wake-ups.
    fn consume(queue: &WakeQueue<u8, LoomSignal>, total: usize, announce_first: bool) {
        let mut got = 0;
        while got < total {
            while queue.pop().is_some() {
                got += 1;
            }
            if got == total {
                break;
            }
            let block = if announce_first {
                queue.prepare_to_sleep()
            } else {
                // Broken: look at the queue, then announce the sleep unconditionally.
                let empty = queue.is_empty();
                queue.state.fetch_or(ASLEEP, Ordering::AcqRel);
                empty
            };
            if block {
                queue.signal.block();
                queue.woke();
            } else {
                // A push whose count has not landed yet: let the producer run (the real
                // consumers poll their fds without blocking here).
                loom::thread::yield_now();
            }
        }
    }

    /// The handshake model's preemption bound in the ordinary run (CI): 111,426
    /// interleavings, about 5 s; unbounded it is 4.1 million, about 2.5 min of CPU
    /// (`IOSERVER_LOOM_EXHAUSTIVE=1`, native/README.md).
    const HANDSHAKE_PREEMPTIONS: usize = 5;

    /// `loom::model(f)`, printing how many interleavings (executions) loom explored (seen
    /// with `-- --nocapture`).  `bound`: at most that many preemptions per execution,
    /// unless `LOOM_MAX_PREEMPTIONS` sets another bound or `IOSERVER_LOOM_EXHAUSTIVE` is
    /// set (then every interleaving).
    fn explore<F: Fn() + Sync + Send + 'static>(name: &str, bound: Option<usize>, f: F) {
        let mut builder = loom::model::Builder::new();
        if builder.preemption_bound.is_none()
            && std::env::var_os("IOSERVER_LOOM_EXHAUSTIVE").is_none()
        {
            builder.preemption_bound = bound;
        }
        let bound = builder.preemption_bound;
        let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = runs.clone();
        builder.check(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            f()
        });
        println!(
            "{name}: {} interleavings ({})",
            runs.load(std::sync::atomic::Ordering::Relaxed),
            match bound {
                Some(bound) => format!("at most {bound} preemptions"),
                None => "all".to_string(),
            }
        );
    }

    fn model(announce_first: bool) {
        explore("handshake", Some(HANDSHAKE_PREEMPTIONS), move || {
            let queue = Arc::new(WakeQueue::<u8, LoomSignal>::new().unwrap());
            let producers: Vec<_> = (0..2)
                .map(|i| {
                    let queue = queue.clone();
                    loom::thread::spawn(move || queue.put(i))
                })
                .collect();
            consume(&queue, 2, announce_first);
            for producer in producers {
                producer.join().unwrap();
            }
        });
    }

    /// Two producers, one consumer: no interleaving loses a wake-up (loom reports a
    /// deadlock if the consumer can block with an item queued and no signal to come).
    /// Within [`HANDSHAKE_PREEMPTIONS`] preemptions in the ordinary run; every
    /// interleaving with `IOSERVER_LOOM_EXHAUSTIVE=1` (run so for this change: 4,100,294
    /// interleavings, all without a lost wake-up).
    #[test]
    fn loom_no_lost_wakeup() {
        model(true);
    }

    /// A producer that defers its wake (`put_deferred`), with or without the flush point
    /// that follows (`wake_if_asleep`), and a consumer in an untimed sleep: no lost
    /// wake-up - a deferred push wakes an untimed sleeper itself.
    #[test]
    fn loom_deferred_wake_is_not_lost() {
        for flush in [true, false] {
            explore("deferred wake", None, move || {
                let queue = Arc::new(WakeQueue::<u8, LoomSignal>::new().unwrap());
                let deferred = {
                    let queue = queue.clone();
                    loom::thread::spawn(move || {
                        queue.put_deferred(0);
                        if flush {
                            queue.wake_if_asleep();
                        }
                    })
                };
                consume(&queue, 1, true);
                deferred.join().unwrap();
            });
        }
    }

    /// The model can fail: the consumer that reads the queue before it announces its
    /// sleep (C2 before C1) blocks forever in some interleaving, and loom finds it (its
    /// panic says "deadlock; threads = ..."; any other panic fails this test).
    #[test]
    #[should_panic(expected = "deadlock")]
    fn loom_broken_order_is_caught() {
        model(false);
    }

    /// An item that counts its drops, and says who pushed it and in which order.
    struct Counted {
        producer: u8,
        seq: u8,
        /// A heap value the item carries through the queue (moved into a node and out
        /// again), checked to arrive whole.
        payload: Box<[u8; 3]>,
        drops: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.drops
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Checks a taken item's contents and notes who pushed it, in which order.
    fn record(got: &mut Vec<(u8, u8)>, counted: Counted) {
        let expected = [
            counted.producer,
            counted.seq,
            counted.producer ^ counted.seq,
        ];
        assert_eq!(*counted.payload, expected, "contents lost in the hand-off");
        got.push((counted.producer, counted.seq));
    }

    /// Two producers push (producer 0 two items, producer 1 one) while the consumer
    /// takes twice; then the consumer joins them and takes the rest, and a last item is
    /// left in the queue when it is dropped.  In every interleaving: each item is taken
    /// exactly once, one producer's items in its push order, with the contents it wrote
    /// (loom's race detector checks every read of a node against the producer's writes:
    /// the push's Release and the take's Acquire make that hand-off a happens-before
    /// edge), and every item is dropped once (the one left in the queue with it).
    fn queue_model(orders: stack::Orders) {
        explore("queue hand-off", None, move || {
            let drops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let items = Arc::new(Items::<Counted>::with_orders(orders));
            let item = |producer: u8, seq: u8| Counted {
                producer,
                seq,
                payload: Box::new([producer, seq, producer ^ seq]),
                drops: drops.clone(),
            };
            let pushes: [&[u8]; 2] = [&[0, 1], &[0]];
            let producers: Vec<_> = (0..2u8)
                .map(|p| {
                    let items = items.clone();
                    let batch: Vec<Counted> =
                        pushes[p as usize].iter().map(|&s| item(p, s)).collect();
                    loom::thread::spawn(move || {
                        for counted in batch {
                            items.push(counted);
                        }
                    })
                })
                .collect();
            let mut got: Vec<(u8, u8)> = Vec::new();
            // Concurrently with the pushes (each `pop` that finds its buffer empty takes
            // the stack).
            for _ in 0..2 {
                if let Some(counted) = items.pop() {
                    record(&mut got, counted);
                }
            }
            for producer in producers {
                producer.join().unwrap();
            }
            while let Some(counted) = items.pop() {
                record(&mut got, counted);
            }
            let mut sorted = got.clone();
            sorted.sort();
            assert_eq!(
                sorted,
                [(0, 0), (0, 1), (1, 0)],
                "an item lost or taken twice"
            );
            let zero = got
                .iter()
                .filter(|(p, _)| *p == 0)
                .map(|(_, s)| *s)
                .collect::<Vec<_>>();
            assert_eq!(zero, [0, 1], "producer 0's items out of order");
            assert_eq!(drops.load(std::sync::atomic::Ordering::Relaxed), 3);
            items.push(item(1, 1));
            let items = Arc::try_unwrap(items).ok().expect("the producers are done");
            drop(items);
            assert_eq!(
                drops.load(std::sync::atomic::Ordering::Relaxed),
                4,
                "an item left in the queue was not dropped with it"
            );
        });
    }

    #[test]
    fn loom_queue_hand_off() {
        queue_model(stack::Orders::CORRECT);
    }

    /// Mutation check: with the push's CAS `Relaxed` the model fails (a take reads a
    /// node whose writes do not happen before it: loom's "Causality violation").
    #[test]
    #[should_panic(expected = "Causality violation")]
    fn loom_relaxed_push_is_caught() {
        queue_model(stack::Orders {
            push: Ordering::Relaxed,
            ..stack::Orders::CORRECT
        });
    }

    /// Mutation check: with the take's swap `Relaxed` the model fails likewise.
    #[test]
    #[should_panic(expected = "Causality violation")]
    fn loom_relaxed_take_is_caught() {
        queue_model(stack::Orders {
            take: Ordering::Relaxed,
            ..stack::Orders::CORRECT
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// A wake-up that counts its signals.
    struct Count(AtomicU64);

    impl Wake for Count {
        fn new() -> io::Result<Self> {
            Ok(Count(AtomicU64::new(0)))
        }
        fn signal(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An item that counts its drops.
    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Items come out in push order, across takes of the stack (pushes after a take wait
    /// behind what that take got).
    #[test]
    fn fifo_across_takes() {
        let queue = WakeQueue::<u32, Count>::new().unwrap();
        let mut out = Vec::new();
        for i in 0..3 {
            queue.put(i);
        }
        out.push(queue.pop().unwrap());
        for i in 3..5 {
            queue.put(i);
        }
        out.push(queue.pop().unwrap());
        queue.put(5);
        while let Some(item) = queue.pop() {
            out.push(item);
        }
        assert_eq!(out, [0, 1, 2, 3, 4, 5]);
        assert!(queue.is_empty());
        assert!(queue.prepare_to_sleep(), "every push was taken");
    }

    /// A burst's buffer is given back once used up: the consumer keeps at most
    /// `KEEP_CAPACITY` items of capacity between takes (it kept the largest take's for
    /// the queue's life: 500,000 commands pinned 104 MiB).
    #[test]
    fn a_bursts_buffer_is_given_back_once_used_up() {
        let queue = WakeQueue::<u64, Count>::new().unwrap();
        for i in 0..100_000 {
            queue.put(i);
        }
        for i in 0..100_000 {
            assert_eq!(queue.pop(), Some(i));
        }
        queue.put(7);
        assert_eq!(queue.pop(), Some(7));
        let capacity = queue.items.taken.lock().unwrap().capacity();
        assert!(
            capacity <= KEEP_CAPACITY,
            "{capacity} items of capacity kept"
        );
        // A small take keeps its buffer (no allocation per take in the steady state).
        for round in 0..3 {
            for i in 0..10 {
                queue.put(round * 10 + i);
            }
            for i in 0..10 {
                assert_eq!(queue.pop(), Some(round * 10 + i));
            }
        }
        assert!(queue.items.taken.lock().unwrap().capacity() <= KEEP_CAPACITY);
    }

    /// Items still queued when the queue is dropped are dropped with it: those the
    /// consumer's last take got and those still on the stack.
    #[test]
    fn queued_items_are_dropped_with_the_queue() {
        let drops = Arc::new(AtomicUsize::new(0));
        let queue = WakeQueue::<Counted, Count>::new().unwrap();
        for _ in 0..10 {
            queue.put(Counted(drops.clone()));
        }
        for _ in 0..3 {
            drop(queue.pop().unwrap());
        }
        assert_eq!(drops.load(Ordering::Relaxed), 3);
        for _ in 0..5 {
            queue.put(Counted(drops.clone()));
        }
        assert!(!queue.is_empty());
        drop(queue);
        assert_eq!(drops.load(Ordering::Relaxed), 15, "queued items leaked");
    }

    /// Producers on real threads, a consumer that takes part of their items concurrently
    /// and then drops the queue: every item is dropped exactly once (none leaked, none
    /// dropped twice, as a double free would be).
    #[test]
    fn concurrent_pushes_then_drop() {
        const PRODUCERS: usize = 4;
        const EACH: usize = 20_000;
        let drops = Arc::new(AtomicUsize::new(0));
        let queue = Arc::new(WakeQueue::<Counted, Count>::new().unwrap());
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|_| {
                let queue = queue.clone();
                let drops = drops.clone();
                std::thread::spawn(move || {
                    for _ in 0..EACH {
                        queue.put(Counted(drops.clone()));
                    }
                })
            })
            .collect();
        let mut taken = 0;
        while taken < PRODUCERS * EACH / 2 {
            if queue.pop().is_some() {
                taken += 1;
            } else {
                std::thread::yield_now();
            }
        }
        for producer in producers {
            producer.join().unwrap();
        }
        assert_eq!(drops.load(Ordering::Relaxed), taken);
        drop(Arc::try_unwrap(queue).ok().expect("the producers are done"));
        assert_eq!(drops.load(Ordering::Relaxed), PRODUCERS * EACH);
    }
}
