//! The synchronisation primitives the wake-up protocol is written against: the standard
//! library's, or loom's when the crate is built with `--cfg loom` (the model checker then
//! explores every interleaving of the threads that use them).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU64, Ordering};
