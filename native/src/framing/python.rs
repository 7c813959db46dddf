//! `ioserver._native._Framer`: a [`Framer`] with the Python framers' face, private, for
//! the differential tests (`tests/test_native_framing.py`) that feed the same streams to
//! both and compare what comes out.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

use super::{FrameError, Framer, Mode, Packet, Packets, DEFAULT_PACKET_SIZE};

/// `_Framer(packet, packet_size=64 MiB, delimiter=b"\n")`: the native framer of a packet
/// mode (`"raw"` or 0, 1, 2, 4, `"line"`, `"msgpack"`, `"resp"`).
///
/// `feed(data)` returns what the Python framer's `feed` returns, except that a msgpack
/// object is its wire bytes (not decoded) and a RESP command a `list[bytes]`; errors are
/// `ioserver`'s own (`PacketTooLarge`, `FrameError`), raised, or for `"resp"` returned as
/// the last message.
#[pyclass(name = "_Framer", module = "ioserver._native")]
pub struct PyFramer {
    framer: Framer,
    packets: Packets,
}

fn option_error(py: Python<'_>, message: String) -> PyErr {
    match py
        .import("ioserver._exceptions")
        .and_then(|module| module.getattr("OptionError"))
        .and_then(|class| class.call1((message,)))
    {
        Ok(error) => PyErr::from_value(error),
        Err(error) => error,
    }
}

/// The Python exception a [`FrameError`] maps onto (an instance, not raised).
pub fn frame_error<'py>(py: Python<'py>, error: &FrameError) -> PyResult<Bound<'py, PyAny>> {
    let module = py.import("ioserver._exceptions")?;
    match error {
        FrameError::TooLarge { limit, size, what } => module
            .getattr("PacketTooLarge")?
            .call1((*limit, *size, *what)),
        FrameError::TooManyItems { limit, size, what } => module
            .getattr("PacketTooLarge")?
            .call1((*limit, *size, *what, "items", "MSGPACK_MAX_ITEMS")),
        FrameError::OverBudget { limit, size } => module.getattr("PacketTooLarge")?.call1((
            *limit,
            *size,
            "message",
            "bytes charged",
            "memory_limit less a read",
        )),
        FrameError::Malformed(message) => module.getattr("FrameError")?.call1((message,)),
    }
}

/// `_msgpack_charges(data, start, stop)`: the charge of each whole msgpack object of
/// `data[start:stop]` (a bytes-like object; the objects back to back, as the Python
/// framer's C skip found them), in order, up to the first unfinished one if any: what the
/// decoded object holds beyond its wire bytes and `PACKET_OVERHEAD`, by kind of item
/// (`ioserver._framing.MSGPACK_CHARGES`), which `ioserver._framing.MsgpackFramer` charges,
/// added up here at the native scanner's speed instead of by its Python loop
/// ([`super::msgpack::whole_object_charges`]).
///
/// Raises ``PacketTooLarge`` (an object past ``MSGPACK_MAX_ITEMS``, as ``_check_items``
/// raises it), ``ValueError`` (`start`, `stop` outside `data`), ``TypeError`` (not a
/// bytes-like object).
#[pyfunction]
#[pyo3(name = "_msgpack_charges")]
pub fn msgpack_charges(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    start: usize,
    stop: usize,
) -> PyResult<Vec<u64>> {
    let count = |bytes: &[u8]| -> PyResult<Vec<u64>> {
        if start > stop || stop > bytes.len() {
            return Err(PyValueError::new_err(format!(
                "{start}..{stop} is outside the {} bytes given",
                bytes.len()
            )));
        }
        let mut items = Vec::new();
        super::msgpack::whole_object_charges(bytes, start, stop, &mut items).map_err(|error| {
            match frame_error(py, &error) {
                Ok(exception) => PyErr::from_value(exception),
                Err(failed) => failed,
            }
        })?;
        Ok(items)
    };
    if let Ok(bytes) = data.cast::<PyBytes>() {
        return count(bytes.as_bytes());
    }
    // A memoryview (the Python I/O thread's read, a view of a held buffer), a bytearray:
    // copied (one memcpy of at most a read and an object; the walk is the cost).
    let buffer = pyo3::buffer::PyBuffer::<u8>::get(data)?;
    count(&buffer.to_vec(py)?)
}

/// The framer of a packet mode given as Python gives it (`"raw"` or 0, 1, 2, 4, `"line"`,
/// `"msgpack"`, `"resp"`); `OptionError` for a wrong one.
pub(crate) fn framer_from_py(
    py: Python<'_>,
    packet: &Bound<'_, PyAny>,
    packet_size: usize,
    delimiter: &[u8],
) -> PyResult<Framer> {
    let mode = if let Ok(name) = packet.extract::<String>() {
        match name.as_str() {
            "raw" => Mode::Raw,
            "line" => match delimiter {
                [byte] => Mode::Line(*byte),
                _ => {
                    return Err(option_error(
                        py,
                        format!("line delimiter must be one byte, not {delimiter:?}"),
                    ))
                }
            },
            "msgpack" => Mode::Msgpack,
            "resp" => Mode::Resp,
            _ => return Err(option_error(py, format!("unknown packet mode {name:?}"))),
        }
    } else {
        match packet.extract::<u8>() {
            Ok(0) => Mode::Raw,
            Ok(header) => Mode::Length(header),
            Err(_) => return Err(PyTypeError::new_err("packet must be a str or an int")),
        }
    };
    Framer::new(mode, packet_size).map_err(|e| option_error(py, e.0))
}

fn packet_value<'py>(py: Python<'py>, packet: Packet<'_>) -> PyResult<Bound<'py, PyAny>> {
    Ok(match packet {
        Packet::Bytes(payload) => PyBytes::new(py, payload).into_any(),
        Packet::Command(command) => {
            PyList::new(py, command.iter().map(|arg| PyBytes::new(py, arg)))?.into_any()
        }
    })
}

#[pymethods]
impl PyFramer {
    #[new]
    #[pyo3(signature = (packet, packet_size = DEFAULT_PACKET_SIZE, delimiter = b"\n".to_vec()))]
    fn new(
        py: Python<'_>,
        packet: &Bound<'_, PyAny>,
        packet_size: usize,
        delimiter: Vec<u8>,
    ) -> PyResult<PyFramer> {
        let framer = framer_from_py(py, packet, packet_size, &delimiter)?;
        Ok(PyFramer {
            framer,
            packets: Packets::new(),
        })
    }

    /// Take received bytes; return the packets they completed, in order.
    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyList>> {
        self.packets.clear();
        let result = self.framer.feed(data, &mut self.packets);
        let messages = PyList::empty(py);
        for packet in self.packets.iter() {
            messages.append(packet_value(py, packet)?)?;
        }
        if let Err(error) = result {
            let error = frame_error(py, &error)?;
            if !self.framer.delivers_errors() {
                return Err(PyErr::from_value(error));
            }
            messages.append(error)?;
        }
        Ok(messages)
    }

    /// Like `feed`, with the budget charge of each message (`Framer::charges`):
    /// `(messages, charges)`, for a port charging `overhead` bytes per packet.
    fn feed_charged<'py>(
        &mut self,
        py: Python<'py>,
        data: &[u8],
        overhead: u64,
    ) -> PyResult<(Bound<'py, PyList>, Vec<u64>)> {
        let before = self.framer.buffered();
        let messages = self.feed(py, data)?;
        let after = self.framer.buffered();
        let error = messages.len() > self.packets.len();
        let mut charges = Vec::new();
        let consumed = data.len() + before - after;
        self.framer
            .charges(&self.packets, 0, error, consumed, overhead, &mut charges);
        Ok((messages, charges))
    }

    /// The bytes to send for one payload of bytes (header + payload + trailer).
    fn frame<'py>(&self, py: Python<'py>, payload: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let envelope =
            self.framer
                .envelope(payload)
                .map_err(|error| match frame_error(py, &error) {
                    Ok(error) => PyErr::from_value(error),
                    Err(error) => error,
                })?;
        let mut bytes = Vec::with_capacity(payload.len() + 5);
        bytes.extend_from_slice(envelope.header());
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(envelope.trailer());
        Ok(PyBytes::new(py, &bytes))
    }

    /// Bytes received and held for an unfinished packet.
    #[getter]
    fn buffered(&self) -> usize {
        self.framer.buffered()
    }

    /// Bytes the packet under way still needs, when the mode knows.
    fn wants(&self) -> Option<usize> {
        self.framer.wants()
    }

    /// True when packets are delivered as decoded objects (msgpack, resp).
    #[getter]
    fn decodes_objects(&self) -> bool {
        self.framer.decodes_objects()
    }
}
