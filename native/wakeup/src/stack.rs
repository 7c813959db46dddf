//! The lock-free part of the queues: an intrusive stack that producers push on with one
//! Release CAS each, and that its consumer takes *whole*, with one Acquire swap.  The only
//! `unsafe` code of this crate (the crate denies it elsewhere; the extension's is in
//! `native/src/unsafe_io.rs`).
//!
//! A push links a new heap node on top of `head` (its `next` is the head it read) and
//! publishes it with a CAS; a take swaps `head` to null and owns every node it got: the
//! list, newest first.  No node is ever unlinked from a live stack, only whole stacks
//! are taken, so the CAS cannot suffer ABA: the head a producer compared against may have
//! been taken and a new node allocated at the same address since, but the producer's node
//! then simply links to that new head, which is what the CAS checked.  The order of the
//! nodes in a taken list is the modification order of `head` (the order of the successful
//! CASes), so one producer's items come out in the order it pushed them.
//!
//! Every field the threads hand over (a node's value and `next`) is in the [`sync`]
//! shim's `UnsafeCell`: under `--cfg loom` loom's, whose race detector checks that the
//! producer's writes happen before the consumer's reads - that is, that the Release and
//! the Acquire below are enough.  The loom model weakens either to `Relaxed` and sees it
//! fail (`Orders`, `loom_tests` in `lib.rs`).
//!
//! [`sync`]: crate::sync

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ptr;

use crate::sync::{AtomicPtr, Ordering, UnsafeCell};

/// One pushed item.
struct Node<T> {
    /// Written once, when the node is made (before it is published); moved out once, by
    /// the take that got the node.
    value: UnsafeCell<MaybeUninit<T>>,
    /// The node below this one (pushed before it), or null: written by the pushing
    /// producer before each CAS attempt, read by the take.
    next: UnsafeCell<*mut Node<T>>,
}

/// The orderings of the push's CAS and of the take's swap: under loom a parameter, so that
/// the model can weaken either and see loom fail (the model must be able to fail); in the
/// production build the constants `Release` and `Acquire`, no field.
#[cfg(loom)]
#[derive(Clone, Copy)]
pub(crate) struct Orders {
    /// The success ordering of the push's CAS (`Release`).
    pub push: Ordering,
    /// The ordering of the take's swap (`Acquire`).
    pub take: Ordering,
}

#[cfg(loom)]
impl Orders {
    /// The orderings of the production build.
    pub(crate) const CORRECT: Orders = Orders {
        push: Ordering::Release,
        take: Ordering::Acquire,
    };
}

/// A lock-free multi-producer stack whose consumer takes every item at once.
pub(crate) struct Stack<T> {
    /// The newest node, or null.
    head: AtomicPtr<Node<T>>,
    #[cfg(loom)]
    orders: Orders,
    /// The stack owns `T`s (for the drop check).
    _owns: PhantomData<T>,
}

// SAFETY: a `Stack<T>` owns the `T`s pushed on it and hands them out only by value (a
// push moves one in, a take moves them out); no `&T` is ever shared.  Using the stack
// from several threads therefore moves `T`s between threads, which `T: Send` allows, and
// the nodes (raw pointers, hence not auto-`Send`) are reached by one thread at a time:
// the producer that made a node until its CAS publishes it, then no thread until the
// take whose swap got it (the ownership argument of `push` and `take_all`).  As
// crossbeam's `SegQueue`: `Send` and `Sync` when `T: Send`.
unsafe impl<T: Send> Send for Stack<T> {}
// SAFETY: as for `Send` above: `&Stack<T>` allows push and take only, both by value.
unsafe impl<T: Send> Sync for Stack<T> {}

impl<T> Stack<T> {
    /// An empty stack.
    pub(crate) fn new() -> Self {
        Stack {
            head: AtomicPtr::new(ptr::null_mut()),
            #[cfg(loom)]
            orders: Orders::CORRECT,
            _owns: PhantomData,
        }
    }

    /// An empty stack whose push and take use `orders` (the loom model's mutations).
    #[cfg(all(loom, test))]
    pub(crate) fn with_orders(orders: Orders) -> Self {
        Stack {
            head: AtomicPtr::new(ptr::null_mut()),
            orders,
            _owns: PhantomData,
        }
    }

    #[cfg(loom)]
    fn push_order(&self) -> Ordering {
        self.orders.push
    }
    #[cfg(not(loom))]
    fn push_order(&self) -> Ordering {
        Ordering::Release
    }
    #[cfg(loom)]
    fn take_order(&self) -> Ordering {
        self.orders.take
    }
    #[cfg(not(loom))]
    fn take_order(&self) -> Ordering {
        Ordering::Acquire
    }

    /// Push `value` on top (any thread).
    pub(crate) fn push(&self, value: T) {
        let node = Box::into_raw(Box::new(Node {
            value: UnsafeCell::new(MaybeUninit::new(value)),
            next: UnsafeCell::new(ptr::null_mut()),
        }));
        // No load of `head` first: the CAS starts from a guess (empty) and its failure
        // returns the current head, so a push onto a non-empty stack costs one failed
        // CAS more, and onto an empty one (a consumer that keeps up) nothing.  A load
        // first would also hide, from loom's partial order reduction (one last access kept
        // per atomic: this thread's own load), the conflict between the consumer's
        // emptiness check in `take_all` and this CAS, and the model would never run a
        // push between that check and the take's swap.
        let mut head = ptr::null_mut();
        loop {
            // SAFETY: `node` came from `Box::into_raw` above and is not published yet (no
            // other thread has its address until the CAS succeeds), so this thread has
            // the only access to it.
            unsafe { (*node).next.with_mut(|next| *next = head) };
            // Release on success: the node's writes (its value, at creation, and `next`,
            // just above) happen before any take whose Acquire swap reads this CAS's
            // value, or a later value of `head` (a later push's CAS is a read-modify-write
            // and so continues this release sequence).  Relaxed on failure: nothing was
            // published, the loop retries with the head it read.
            match self
                .head
                .compare_exchange_weak(head, node, self.push_order(), Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(current) => head = current,
            }
        }
    }

    /// Take every item, appending them to `into` *newest first* (so `into.pop()` yields
    /// them in push order, oldest first).  Any thread may call it; each item is taken by
    /// exactly one call.
    pub(crate) fn take_all(&self, into: &mut Vec<T>) {
        // Nothing to take: no swap, whose write would take the cache line from the
        // producers for nothing (an empty take happens at every consumer round).  Relaxed:
        // the pointer is only compared with null; a push that lands after this read is
        // taken at the next call (the wake-up protocol's count says there is one).
        if self.head.load(Ordering::Relaxed).is_null() {
            return;
        }
        // Acquire: pairs with the Release of the push whose node this swap reads (and,
        // through the release sequence of the CASes on `head`, of every push below it),
        // so each node's `value` and `next` writes happen before the reads below.
        let mut node = self.head.swap(ptr::null_mut(), self.take_order());
        while !node.is_null() {
            // SAFETY: every non-null pointer reached here is a node made by
            // `Box::into_raw` in `push` and published by its CAS; the swap above removed
            // the whole list from `head` at once, so no other take can reach these nodes
            // (a take reaches nodes only through `head`), and their producers let go of
            // them at their CAS.  So this call owns each node, and frees it exactly once,
            // here.  The Acquire above makes the node's writes visible.
            let boxed = unsafe { Box::from_raw(node) };
            // SAFETY: `next` was written before the node was published (see above).
            node = boxed.next.with(|next| unsafe { *next });
            // SAFETY: `value` was initialised when the node was made and is read out
            // only here, once (the node is freed right after, and `MaybeUninit` does not
            // drop it again).
            into.push(
                boxed
                    .value
                    .with(|value| unsafe { (*value).assume_init_read() }),
            );
        }
    }

    /// Whether no item is on the stack (a hint: a push may land right after).
    pub(crate) fn is_empty(&self) -> bool {
        // Relaxed: the pointer is only compared with null, never dereferenced.
        self.head.load(Ordering::Relaxed).is_null()
    }
}

impl<T> Drop for Stack<T> {
    /// Drop the items still on the stack (`&mut self`: no other thread can push or take).
    fn drop(&mut self) {
        // A loom model that failed unwinds through here with loom's execution gone, and
        // any loom atomic would then abort the test process: leave the nodes (the model
        // has failed already, and its process ends).
        #[cfg(loom)]
        if std::thread::panicking() {
            return;
        }
        let mut left = Vec::new();
        self.take_all(&mut left);
    }
}
