//! `ioserver._native._FlowModel`: ports' flow control and a budget with a Python face,
//! private, for the differential tests (`tests/test_native_flow.py`) that run the same
//! steps on `ioserver._flow` and the budget of `ioserver._iothread` and compare.

use std::collections::VecDeque;
use std::sync::Arc;

use pyo3::exceptions::PyIndexError;
use pyo3::prelude::*;

use super::{
    framed_read, Budget, Delivered, LoopCounters, ReadFault, ReceiveFlow, Watermarks, Window,
};
use crate::framing::{frame_error, framer_from_py, Framer, Packets};

/// `_FlowModel(memory_limit, port_buffer_limit, read_size)`: a budget, one loop, and the
/// ports added to it; every step names its port by index.
#[pyclass(name = "_FlowModel", module = "ioserver._native")]
pub struct PyFlowModel {
    budget: Budget,
    counters: Arc<LoopCounters>,
    ports: Vec<ReceiveFlow>,
    /// Each port's framer (None: charges are given), the charges of its held packets,
    /// and whether it was closed.
    framers: Vec<Option<Framer>>,
    held: Vec<VecDeque<u64>>,
    closed: Vec<bool>,
}

/// What the I/O thread does after a delivery: pause over a high watermark, and re-read.
fn react(flow: &mut ReceiveFlow, delivered: Delivered) {
    if delivered.over_high && flow.pause() {
        flow.recheck();
    }
}

impl PyFlowModel {
    /// A grant came: deliver held packets as far as the credit goes.
    fn deliver_held(&mut self, port: usize) -> (Vec<u64>, bool) {
        let flow = &mut self.ports[port];
        if self.closed[port] || flow.credit() == 0 {
            return (Vec::new(), false);
        }
        let count = flow.grant_held();
        let charges: Vec<u64> = self.held[port].drain(..count).collect();
        if charges.is_empty() {
            return (charges, false);
        }
        flow.unhold(&mut self.budget, &charges);
        let delivered = flow.deliver(&mut self.budget, &charges);
        react(flow, delivered);
        (charges, delivered.send_passive)
    }

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
            framers: Vec::new(),
            held: Vec::new(),
            closed: Vec::new(),
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
        self.framers.push(None);
        self.held.push(VecDeque::new());
        self.closed.push(false);
        token
    }

    /// Add a port whose reads go through a framer (`packet`, `packet_size`, `delimiter` as
    /// `make_framer` takes them); return its index.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (high_bytes, low_bytes, high_messages, active, packet_overhead, packet, packet_size, delimiter = b"\n".to_vec()))]
    fn add_framed_port(
        &mut self,
        py: Python<'_>,
        high_bytes: u64,
        low_bytes: u64,
        high_messages: u64,
        active: (i64, bool),
        packet_overhead: u64,
        packet: &Bound<'_, PyAny>,
        packet_size: usize,
        delimiter: Vec<u8>,
    ) -> PyResult<usize> {
        let framer = framer_from_py(py, packet, packet_size, &delimiter)?;
        let token = self.add_port(
            high_bytes,
            low_bytes,
            high_messages,
            active,
            packet_overhead,
        );
        self.framers[token] = Some(framer);
        Ok(token)
    }

    /// One read of a framed port, and what the I/O thread does after it: `(charges of the
    /// messages delivered, Passive after them, fault)`; the fault, if any, is the
    /// exception the owner is told of (`PacketTooLarge`, `FrameError`) or the text of
    /// the `ENOBUFS` error, and the port is then closed.
    fn framed_read<'py>(
        &mut self,
        py: Python<'py>,
        port: usize,
        data: &[u8],
    ) -> PyResult<(Vec<u64>, bool, Option<Bound<'py, PyAny>>)> {
        let flow = self
            .ports
            .get_mut(port)
            .ok_or_else(|| PyIndexError::new_err(port))?;
        let framer = self.framers[port]
            .as_mut()
            .ok_or_else(|| PyIndexError::new_err("not a framed port"))?;
        let (mut packets, mut charges) = (Packets::new(), Vec::new());
        match framed_read(
            &mut self.budget,
            flow,
            framer,
            data,
            &mut packets,
            &mut charges,
        ) {
            Ok(read) => {
                self.held[port].extend(&charges[read.deliver..]);
                charges.truncate(read.deliver);
                react(flow, read.delivered);
                Ok((charges, read.delivered.send_passive, None))
            }
            Err(fault) => {
                flow.close(&mut self.budget, framer.buffered());
                self.held[port].clear();
                self.closed[port] = true;
                let fault = match fault {
                    ReadFault::Frame(error) => frame_error(py, &error)?,
                    ReadFault::BufferLimit(limit) => {
                        limit.to_string().into_pyobject(py)?.into_any()
                    }
                };
                Ok((Vec::new(), false, Some(fault)))
            }
        }
    }

    /// `cmd_set_active` on a framed port: `(Passive first, charges of the held messages
    /// delivered, Passive after them)`.
    fn set_active_framed(
        &mut self,
        port: usize,
        mode: (i64, bool),
    ) -> PyResult<(bool, Vec<u64>, bool)> {
        let passive = self.port(port)?.set_active(mode);
        let (charges, after) = self.deliver_held(port);
        Ok((passive, charges, after))
    }

    /// `cmd_read_once` on a framed port: `(it was passive, charges of the held messages
    /// delivered, Passive after them)`.
    fn read_once_framed(&mut self, port: usize) -> PyResult<(bool, Vec<u64>, bool)> {
        if !self.port(port)?.read_once() {
            return Ok((false, Vec::new(), false));
        }
        let (charges, after) = self.deliver_held(port);
        Ok((true, charges, after))
    }

    /// Bytes held by framers and in held packets.
    fn framing_bytes(&self) -> u64 {
        self.budget.framing_bytes()
    }

    /// A framed port's framer: `(bytes held, charge beyond them)`
    /// ([`Framer::pending_charge`]: a msgpack object's items walked so far); `(0, 0)`
    /// once the port is closed (its close released them).
    fn framer_holds(&self, port: usize) -> PyResult<(usize, u64)> {
        if self.closed.get(port).copied().unwrap_or(false) {
            return Ok((0, 0));
        }
        let flow = self
            .ports
            .get(port)
            .ok_or_else(|| PyIndexError::new_err(port))?;
        let framer = self.framers[port]
            .as_ref()
            .ok_or_else(|| PyIndexError::new_err("not a framed port"))?;
        Ok((
            framer.buffered(),
            framer.pending_charge(flow.packet_overhead()),
        ))
    }

    /// A port's held packets: `(count, bytes)`.
    fn held(&mut self, port: usize) -> PyResult<(usize, u64)> {
        Ok(self.port(port)?.held())
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
