//! The native I/O half of ioserver (issue 14): a Python extension module, `ioserver._native`.
//!
//! This crate is built by maturin as part of `pip install` (see `pyproject.toml`).

use pyo3::prelude::*;

pub mod flow;
pub mod framing;

/// The crate's version, as Cargo knows it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `ioserver._native`: the native I/O core's Python face.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", VERSION)?;
    m.add_class::<framing::PyFramer>()?;
    m.add_class::<flow::PyFlowModel>()?;
    Ok(())
}
