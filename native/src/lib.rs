//! The native I/O half of ioserver (issue 14): a Python extension module, `ioserver._native`.
//!
//! This crate is built by maturin as part of `pip install` (see `pyproject.toml`).
//!
//! * [`wakeup`]: the queues between the threads, on the wake-up protocol of the
//!   `ioserver-wakeup` crate (`native/wakeup/`, with its loom model), with an eventfd;
//! * `core`: the I/O thread (TCP streams and listeners, through mio), with its io_uring
//!   backend (`core::uring`: a round's reads and writes in one `io_uring_enter`);
//! * `hosted`: the Python I/O half's rounds, run on the native thread under the GIL;
//! * `py`: the Python face (`Core`, `Inbox`, `Conn`, `WindowCounters`);
//! * [`framing`]: every packet mode's boundaries (pure logic);
//! * [`flow`]: watermarks, active modes, the pause handshake and the memory budget (pure
//!   logic, with its theory of operation; the I/O thread uses its own watermark rule so far);
//! * [`unsafe_io`]: every `unsafe` block, each with its argument.

// Every `unsafe` block of the crate is in `unsafe_io`, which says why each is sound; the
// lint keeps it so.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod unsafe_io;
pub mod wakeup;

mod core;
mod hosted;
mod py;
mod sock;

pub mod flow;
pub mod framing;

/// The crate's version, as Cargo knows it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `ioserver._native`: the native I/O core's Python face.
#[pyo3::pymodule]
fn _native(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    use pyo3::types::PyModuleMethods;
    m.add("__version__", VERSION)?;
    py::register(m)?;
    m.add_class::<framing::PyFramer>()?;
    m.add_function(pyo3::wrap_pyfunction!(framing::msgpack_charges, m)?)?;
    m.add_class::<flow::PyFlowModel>()?;
    Ok(())
}
