//! `ioserver._native._FlowModel`: ports' flow control and a budget with a Python face,
//! private, for the differential tests (`tests/test_native_flow.py`) that run the same
//! steps on `ioserver._flow` and the budget of `ioserver._iothread` and compare.

use std::sync::Arc;

use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;

use super::{Budget, LoopCounters, ReceiveFlow, Watermarks, Window};

/// `_FlowModel(memory_limit, port_buffer_limit, read_size)`: a budget, one loop, and the
/// ports added to it; every step names its port by index.
#[pyclass(name = "_FlowModel", module = "ioserver._native")]
pub struct PyFlowModel {
    budget: Budget,
    counters: Arc<LoopCounters>,
    ports: Vec<ReceiveFlow>,
}

impl PyFlowModel {
    fn port(&mut self, port: usize) -> PyResult<&mut ReceiveFlow> {
        self.ports
            .get_mut(port)
            .ok_or_else(|| PyIndexError::new_err("no such port"))
    }
}

#[pymethods]
impl PyFlowModel {
    #[new]
    fn new(memory_limit: Option<u64>, port_buffer_limit: Option<u64>, read_size: usize) -> Self {
        let counters = Arc::new(LoopCounters::new());
        let mut budget = Budget::new(memory_limit, port_buffer_limit, read_size);
        budget.add_loop(Arc::clone(&counters));
        PyFlowModel {
            budget,
            counters,
            ports: Vec::new(),
        }
    }

    /// Add a port; return its index.
    fn add_port(
        &mut self,
        high_bytes: u64,
        low_bytes: u64,
        high_messages: u64,
        active: (i64, bool),
        packet_overhead: u64,
    ) -> usize {
        let marks = Watermarks::new(high_bytes, low_bytes, high_messages);
        let window = Arc::new(Window::new(marks, Arc::clone(&self.counters)));
        let token = self.ports.len();
        self.ports
            .push(ReceiveFlow::new(window, token, active, packet_overhead));
        token
    }

    /// `ReceiveFlow::deliver`: `(turned_passive, send_passive, over_high)`.
    fn deliver(&mut self, port: usize, charges: Vec<u64>) -> PyResult<(bool, bool, bool)> {
        let flow = self
            .ports
            .get_mut(port)
            .ok_or_else(|| PyIndexError::new_err(port))?;
        let delivered = flow.deliver(&mut self.budget, &charges);
        Ok((
            delivered.turned_passive,
            delivered.send_passive,
            delivered.over_high,
        ))
    }

    fn pause(&mut self, port: usize) -> PyResult<bool> {
        Ok(self.port(port)?.pause())
    }

    fn recheck(&mut self, port: usize) -> PyResult<bool> {
        Ok(self.port(port)?.recheck())
    }

    fn may_resume(&mut self, port: usize, generation: u64) -> PyResult<bool> {
        Ok(self.port(port)?.may_resume(generation))
    }

    /// The loop half: `Window::took`.
    fn took(&mut self, port: usize, charge: u64) -> PyResult<Option<u64>> {
        Ok(self.port(port)?.window().took(charge))
    }

    /// The loop half: `Window::set_waiting`.
    fn set_waiting(&mut self, port: usize, waiting: bool) -> PyResult<bool> {
        Ok(self.port(port)?.window().set_waiting(waiting))
    }

    fn set_active(&mut self, port: usize, mode: (i64, bool)) -> PyResult<bool> {
        Ok(self.port(port)?.set_active(mode))
    }

    fn read_once(&mut self, port: usize) -> PyResult<bool> {
        Ok(self.port(port)?.read_once())
    }

    fn admit(&mut self, port: usize, count: usize) -> PyResult<usize> {
        Ok(self.port(port)?.admit(count))
    }

    /// `Budget::begin_round`: `(headroom, resumed ports)`.
    fn begin_round(&mut self) -> (i64, Vec<usize>) {
        let mut resumed = Vec::new();
        let headroom = self.budget.begin_round(&mut resumed);
        (headroom, resumed)
    }

    /// `Budget::admit_read`: `(max, short)`, or None if the budget pauses the port.
    fn admit_read(&mut self, port: usize) -> PyResult<Option<(usize, bool)>> {
        let flow = self
            .ports
            .get_mut(port)
            .ok_or_else(|| PyIndexError::new_err(port))?;
        Ok(self
            .budget
            .admit_read(flow)
            .map(|grant| (grant.max, grant.short)))
    }

    /// `Budget::want` (`cmd_want`).
    fn want(&mut self, port: usize) -> PyResult<bool> {
        let flow = self
            .ports
            .get_mut(port)
            .ok_or_else(|| PyIndexError::new_err(port))?;
        Ok(self.budget.want(flow))
    }

    /// The loop queued output.
    fn queued(&self, bytes: u64) {
        self.counters.queued(bytes);
    }

    /// The I/O thread wrote output.
    fn wrote(&mut self, bytes: u64) {
        self.budget.wrote(bytes);
    }

    fn in_use(&self) -> i64 {
        self.budget.in_use()
    }

    /// A port's state: `(pause_generation, msgq_paused, global_paused, credit,
    /// delivered (bytes, messages), consumed (bytes, messages), pauses, may_read)`.
    #[allow(clippy::type_complexity)]
    fn state(
        &mut self,
        port: usize,
    ) -> PyResult<(u64, bool, bool, i64, (u64, u64), (u64, u64), u64, bool)> {
        let flow = self.port(port)?;
        Ok((
            flow.pause_generation(),
            flow.msgq_paused(),
            flow.global_paused(),
            flow.credit(),
            flow.delivered(),
            flow.window().consumed(),
            flow.pauses,
            flow.may_read(false),
        ))
    }

    /// Budget statistics: `(reserve_reads, global_pauses, peak_memory)`.
    fn stats(&self) -> (u64, u64, i64) {
        (
            self.budget.reserve_reads,
            self.budget.global_pauses,
            self.budget.peak_memory,
        )
    }
}
