//! Packet framing: sans-I/O state machines that turn a byte stream into packets and back.
//!
//! The Rust twin of `ioserver/_framing.py`, with **the same semantics exactly**: the same
//! packets, the same errors at the same points (the same kind, limit, size and text), and
//! the same bytes held ([`Framer::buffered`]), so that the memory budget is charged the same
//! whichever I/O half runs.  A framer knows nothing of sockets or threads: the I/O thread
//! calls [`Framer::feed`] with each read and delivers the packets it pushed.
//!
//! The modes are Erlang's `{packet, ...}` option of `inet:setopts/2`:
//!
//! | [`Mode`]              | a packet is                                                |
//! |-----------------------|------------------------------------------------------------|
//! | `Raw`                 | each read, as it came                                      |
//! | `Length(1, 2, 4)`     | the body after a big-endian length header of that many bytes |
//! | `Line(delimiter)`     | the bytes up to and including the delimiter                |
//! | `Resp`                | one Redis command: its arguments (see [`resp`])            |
//! | `Msgpack`             | the wire bytes of one whole msgpack object (see [`msgpack`]) |
//!
//! # How to drive one (the I/O thread's side)
//!
//! ```
//! use _native::framing::{Framer, Mode, Packets, Packet};
//! let mut framer = Framer::new(Mode::Length(2), 1024).unwrap();
//! let mut packets = Packets::new();
//! let before = framer.buffered();
//! framer.feed(b"\x00\x03abc\x00\x02x", &mut packets).unwrap();
//! assert_eq!(packets.get(0), Some(Packet::Bytes(b"abc")));
//! assert_eq!(framer.buffered(), 1); // one byte of the next body (its header was consumed)
//! assert_eq!(framer.wants(), Some(1));
//! // The budget charge of each packet (see `Framer::charges`):
//! let consumed = 9 + before - framer.buffered();
//! let mut shares = Vec::new();
//! framer.charges(&packets, 0, false, consumed, 160, &mut shares);
//! assert_eq!(shares, vec![3 + 160]);
//! ```
//!
//! # Errors
//!
//! [`Framer::feed`] returns a [`FrameError`]: [`FrameError::TooLarge`] is Python's
//! `PacketTooLarge(limit, size, what)` (the owner gets `EMSGSIZE`), and so is
//! [`FrameError::TooManyItems`] (a msgpack object of too many items), [`FrameError::Malformed`]
//! is `FrameError(message)` (`EPROTO`).  What happens to the packets of the failing read
//! follows the Python framers:
//!
//! - every mode but `Resp` ([`Framer::delivers_errors`] false): the read's packets are not
//!   delivered (`out` is left as it was before the call: Python's `feed` raised before it
//!   returned them), the framer holds nothing, and the I/O thread closes the port;
//! - `Resp`: the commands before the fault stay in `out`, and the error is delivered after
//!   them as the port's last message (a Redis server answers `-ERR Protocol error` before
//!   it closes; only the owner can write that); the framer then holds nothing and ignores
//!   every later byte ([`Framer::feed`] returns `Ok` and pushes nothing).
//!
//! # The charge per packet
//!
//! The memory budget counts what a port holds: [`Framer::buffered`] while a packet is
//! unfinished (and [`Framer::pending_charge`], the charge of a msgpack object's items
//! walked so far, for a port of this process), then each delivered packet's charge
//! ([`Framer::charges`]) until its owner takes it: its bytes (`Length`, `Line`), or its share of the wire bytes the read
//! consumed (`Msgpack`, `Resp`, whose packets Python decodes into objects whose size says
//! nothing), plus [`PACKET_OVERHEAD`] for a port of this process; and for such a port,
//! what a decoded object holds beyond that: for a msgpack object, a charge per kind of
//! item (its own object and its slot: [`msgpack::CHARGE_INT`] and the others, added up as
//! the framer finds the object's bounds), [`RESP_ARGUMENT_CHARGE`] for each argument of a
//! command.

pub mod msgpack;
mod python;
pub mod resp;
#[cfg(test)]
mod tests;

pub(crate) use python::{frame_error, framer_from_py};
pub use python::{msgpack_charges, PyFramer};

use std::fmt;

/// The default cap on one packet: 64 MiB (`_framing.DEFAULT_PACKET_SIZE`).
pub const DEFAULT_PACKET_SIZE: usize = 64 * 1024 * 1024;

/// Bytes charged for each packet a framed port delivers, on top of its size on the wire:
/// what a small queued message costs in Python objects (`_framing.PACKET_OVERHEAD`).
pub const PACKET_OVERHEAD: usize = 160;

/// Bytes charged for each argument of a RESP command, on top of the command's wire bytes
/// and [`PACKET_OVERHEAD`], for a port of this process (`_framing.RESP_ARGUMENT_CHARGE`):
/// a `bytes` object (33 bytes and its length) and its list slot (8), less the six wire
/// bytes an argument takes at least, with the allocator's rounding (35 bytes measured
/// with `tracemalloc`, as the msgpack charges were).
pub const RESP_ARGUMENT_CHARGE: usize = 48;

/// The packet mode of a stream port (Erlang's `{packet, ...}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No framing: each read is one packet.
    Raw,
    /// A big-endian length header of 1, 2 or 4 bytes before each packet.
    Length(u8),
    /// Packets end with this one-byte delimiter, which is kept at the end of each.
    Line(u8),
    /// Redis commands (RESP2 arrays of bulk strings, or inline commands).
    Resp,
    /// A stream of msgpack objects; each packet is one whole object's bytes.
    Msgpack,
}

/// Bytes that do not frame as the port's packet mode says (Python's `FrameError`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Python's `PacketTooLarge(limit, size, what)`: a packet is larger than `limit`
    /// (`packet_size`, or a mode's own cap); `size` is the size it has, a header announced
    /// or it reached.  `what` names it (`"packet"`, `"line"`, `"msgpack object"`,
    /// `"command"`, `"inline command"`).  The owner gets `EMSGSIZE`.
    TooLarge {
        /// The cap, in bytes.
        limit: usize,
        /// The size found, announced or reached, in bytes.
        size: usize,
        /// What was too large, as the message names it.
        what: &'static str,
    },
    /// Python's `PacketTooLarge(limit, size, what, "items", "MSGPACK_MAX_ITEMS")`: one
    /// msgpack object holds more items than [`msgpack::MSGPACK_MAX_ITEMS`] (`limit`);
    /// `size` is the count found or announced when it first passed the cap.  The owner
    /// gets `EMSGSIZE`, as for `TooLarge`.
    TooManyItems {
        /// The cap, in items.
        limit: usize,
        /// The items counted (or announced by a header) when the count passed the cap.
        size: usize,
        /// What held too many items, as the message names it (`"msgpack object"`).
        what: &'static str,
    },
    /// Python's `PacketTooLarge(limit, size, "message", "bytes charged", "memory_limit
    /// less a read")`: one message (whole, or still arriving) is charged more than the
    /// memory budget can ever grant it ([`crate::flow::Budget::message_cap`]): it could
    /// never be delivered, and the port would wait for it for ever.  The owner gets
    /// `EMSGSIZE`, as for `TooLarge`.
    OverBudget {
        /// The most one message may be charged, in bytes.
        limit: u64,
        /// What it is charged (so far, if still arriving), in bytes.
        size: u64,
    },
    /// Python's `FrameError(message)`: the bytes break the mode.  The owner gets `EPROTO`.
    Malformed(String),
}

impl FrameError {
    /// The errno name the owner's `Error` message carries: `EMSGSIZE` or `EPROTO`.
    pub fn errno_name(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. }
            | FrameError::TooManyItems { .. }
            | FrameError::OverBudget { .. } => "EMSGSIZE",
            FrameError::Malformed(_) => "EPROTO",
        }
    }

    pub(crate) fn too_large(limit: usize, size: usize, what: &'static str) -> FrameError {
        FrameError::TooLarge { limit, size, what }
    }
}

impl fmt::Display for FrameError {
    /// The text of Python's exception, exactly.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { limit, size, what } => {
                write!(f, "{what} of {size} bytes exceeds packet_size={limit}")
            }
            FrameError::TooManyItems { limit, size, what } => {
                write!(
                    f,
                    "{what} of {size} items exceeds MSGPACK_MAX_ITEMS={limit}"
                )
            }
            FrameError::OverBudget { limit, size } => write!(
                f,
                "message of {size} bytes charged exceeds memory_limit less a read={limit}"
            ),
            FrameError::Malformed(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for FrameError {}

/// A mode or size a framer cannot be made with (Python's `OptionError`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionError(pub String);

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OptionError {}

// -- the packets a feed pushes -----------------------------------------------------------

/// The packets of one or more feeds, back to back in one buffer (an arena: no allocation
/// per packet).  The drain builds each packet's Python value from its slices under the
/// GIL: `bytes` for a [`Packet::Bytes`], a `list[bytes]` for a [`Packet::Command`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packets {
    data: Vec<u8>,
    entries: Vec<Entry>,
    /// Each command's argument ends, relative to the command's first byte.
    ends: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    /// Where the packet's bytes end in `data` (they start where the previous one's end).
    end: usize,
    /// Where its argument ends end in `ends`; `None` for a bytes packet.
    args_end: Option<usize>,
}

/// One packet, borrowed from [`Packets`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// A payload of bytes: a length-prefixed body, a line (with its delimiter), a raw
    /// read, or the wire bytes of one msgpack object (which Python decodes).
    Bytes(&'a [u8]),
    /// A RESP command: its name and arguments.
    Command(Command<'a>),
}

/// A RESP command's arguments, borrowed from [`Packets`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command<'a> {
    data: &'a [u8],
    ends: &'a [usize],
}

impl<'a> Command<'a> {
    /// How many arguments (the command's name included).
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True for a command of no argument (never pushed by a framer).
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Argument `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<&'a [u8]> {
        let end = *self.ends.get(index)?;
        let start = if index == 0 { 0 } else { self.ends[index - 1] };
        Some(&self.data[start..end])
    }

    /// The arguments in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &'a [u8]> + 'a {
        let (data, ends) = (self.data, self.ends);
        (0..ends.len()).map(move |i| {
            let start = if i == 0 { 0 } else { ends[i - 1] };
            &data[start..ends[i]]
        })
    }
}

impl Packets {
    /// No packet.
    pub fn new() -> Packets {
        Packets::default()
    }

    /// How many packets.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there is no packet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Forget every packet (the buffers are kept for the next feeds).
    pub fn clear(&mut self) {
        self.data.clear();
        self.entries.clear();
        self.ends.clear();
    }

    /// Keep the first `len` packets only.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.entries.len() {
            return;
        }
        self.entries.truncate(len);
        let (end, args_end) = self.bounds_before(len);
        self.data.truncate(end);
        self.ends.truncate(args_end);
    }

    /// Where packet `index`'s bytes and argument ends start.
    fn bounds_before(&self, index: usize) -> (usize, usize) {
        let mut args_end = 0;
        for entry in self.entries[..index].iter().rev() {
            if let Some(end) = entry.args_end {
                args_end = end;
                break;
            }
        }
        let end = if index == 0 {
            0
        } else {
            self.entries[index - 1].end
        };
        (end, args_end)
    }

    /// Packet `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<Packet<'_>> {
        let entry = *self.entries.get(index)?;
        let (start, args_start) = self.bounds_before(index);
        let data = &self.data[start..entry.end];
        Some(match entry.args_end {
            None => Packet::Bytes(data),
            Some(args_end) => Packet::Command(Command {
                data,
                ends: &self.ends[args_start..args_end],
            }),
        })
    }

    /// The packets in order.
    pub fn iter(&self) -> impl Iterator<Item = Packet<'_>> + '_ {
        let mut start = 0;
        let mut args_start = 0;
        self.entries.iter().map(move |entry| {
            let data = &self.data[start..entry.end];
            start = entry.end;
            match entry.args_end {
                None => Packet::Bytes(data),
                Some(args_end) => {
                    let ends = &self.ends[args_start..args_end];
                    args_start = args_end;
                    Packet::Command(Command { data, ends })
                }
            }
        })
    }

    /// Append a bytes packet.
    pub fn push_bytes(&mut self, payload: &[u8]) {
        self.data.extend_from_slice(payload);
        self.entries.push(Entry {
            end: self.data.len(),
            args_end: None,
        });
    }

    /// Append a command of these arguments.
    pub fn push_command<'b>(&mut self, arguments: impl IntoIterator<Item = &'b [u8]>) {
        let start = self.data.len();
        for argument in arguments {
            self.data.extend_from_slice(argument);
            self.ends.push(self.data.len() - start);
        }
        self.entries.push(Entry {
            end: self.data.len(),
            args_end: Some(self.ends.len()),
        });
    }

    /// Append a copy of `packet` (e.g. to hold it past the active credit).
    pub fn push(&mut self, packet: Packet<'_>) {
        match packet {
            Packet::Bytes(payload) => self.push_bytes(payload),
            Packet::Command(command) => self.push_command(command.iter()),
        }
    }
}

// -- the framer ----------------------------------------------------------------------------

/// One port's framer: the state of the packet under way, between reads.
#[derive(Clone, Debug)]
pub struct Framer {
    mode: Mode,
    inner: Inner,
}

#[derive(Clone, Debug)]
enum Inner {
    Raw,
    Length(LengthFramer),
    Line(LineFramer),
    Resp(resp::RespFramer),
    Msgpack(msgpack::MsgpackFramer),
}

/// The header and trailer to write around one outgoing packet's payload (a gathered
/// write: the payload itself is not copied).  See [`Framer::envelope`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    header: [u8; 4],
    header_len: u8,
    trailer: Option<u8>,
}

impl Envelope {
    const EMPTY: Envelope = Envelope {
        header: [0; 4],
        header_len: 0,
        trailer: None,
    };

    /// The bytes to write before the payload (empty but for `Length`).
    pub fn header(&self) -> &[u8] {
        &self.header[..usize::from(self.header_len)]
    }

    /// The bytes to write after the payload (a `Line` delimiter the payload lacks).
    pub fn trailer(&self) -> &[u8] {
        match &self.trailer {
            Some(byte) => std::slice::from_ref(byte),
            None => &[],
        }
    }
}

impl Framer {
    /// The framer for `mode`; `packet_size` caps one packet (bytes, header excluded).
    ///
    /// Errors: `packet_size` 0, a length header other than 1, 2 or 4 bytes (Python's
    /// `make_framer` raises `OptionError` for them).
    pub fn new(mode: Mode, packet_size: usize) -> Result<Framer, OptionError> {
        if packet_size == 0 {
            return Err(OptionError(format!(
                "packet_size must be a positive int (bytes), not {packet_size}"
            )));
        }
        let inner = match mode {
            Mode::Raw => Inner::Raw,
            Mode::Length(header) => Inner::Length(LengthFramer::new(header, packet_size)?),
            Mode::Line(delimiter) => Inner::Line(LineFramer {
                delimiter,
                limit: packet_size,
                buffer: Vec::new(),
                scanned: 0,
            }),
            Mode::Resp => Inner::Resp(resp::RespFramer::new(packet_size)),
            Mode::Msgpack => Inner::Msgpack(msgpack::MsgpackFramer::new(packet_size)),
        };
        Ok(Framer { mode, inner })
    }

    /// The mode it was made with.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Take the bytes of one read; push each packet they complete to `out`, in order.
    ///
    /// On an error (see the module's docs): for every mode but `Resp`, `out` is left as
    /// it was before the call and the port must be closed; for `Resp`, the commands
    /// before the fault stay in `out` and the error is to be delivered after them.
    /// Either way the framer holds nothing afterwards.
    pub fn feed(&mut self, input: &[u8], out: &mut Packets) -> Result<(), FrameError> {
        match &mut self.inner {
            Inner::Raw => {
                if !input.is_empty() {
                    out.push_bytes(input);
                }
                Ok(())
            }
            Inner::Resp(framer) => framer.feed(input, out),
            inner => {
                let mark = out.len();
                let result = match inner {
                    Inner::Length(framer) => framer.feed(input, out),
                    Inner::Line(framer) => framer.feed(input, out),
                    Inner::Msgpack(framer) => framer.feed(input, out),
                    Inner::Raw | Inner::Resp(_) => unreachable!(),
                };
                if result.is_err() {
                    out.truncate(mark);
                }
                result
            }
        }
    }

    /// The peer's end of file: push to `out` the packet the unfinished bytes still make,
    /// if the mode delivers one - `Line`: the last line, without a delimiter, as Erlang's
    /// `{packet, line}` - the framer then empty; the other modes push nothing and keep
    /// their unfinished bytes (released with the port).  Python's `Framer.finish`.
    pub fn finish(&mut self, out: &mut Packets) {
        if let Inner::Line(framer) = &mut self.inner {
            if !framer.buffer.is_empty() {
                out.push_bytes(&framer.buffer);
                framer.buffer.clear();
                framer.scanned = 0;
            }
        }
    }

    /// Bytes received and held towards an unfinished packet: charged to the memory budget
    /// and checked against `port_buffer_limit` (Python's `Framer.buffered`).
    pub fn buffered(&self) -> usize {
        match &self.inner {
            Inner::Raw => 0,
            Inner::Length(framer) => framer.buffer.len(),
            Inner::Line(framer) => framer.buffer.len(),
            Inner::Resp(framer) => framer.buffered(),
            Inner::Msgpack(framer) => framer.buffered(),
        }
    }

    /// What the unfinished packet is charged beyond its [`buffered`](Framer::buffered)
    /// bytes, in bytes: for `Msgpack` when `overhead` is not 0 (see
    /// [`charges`](Framer::charges)), the charge by kind of the unfinished object's items
    /// walked so far (each as it arrives, a container's slots with its items, so that no
    /// prefix of a read is charged more than `PACKET_OVERHEAD` a byte); 0 otherwise.
    /// Once the object is whole, its message's charge replaces this, items and all, so an
    /// object that spans reads is charged its items as they arrive, not all at its last
    /// read.
    pub fn pending_charge(&self, overhead: u64) -> u64 {
        match &self.inner {
            Inner::Msgpack(framer) if overhead != 0 => framer.pending_charge(),
            _ => 0,
        }
    }

    /// Bytes the packet under way still needs before it can complete, when the mode knows
    /// (a length header or body, a RESP bulk string's rest); `None` when it does not
    /// (raw, a line, a msgpack object, between RESP headers).  A read of more is fine:
    /// this is a hint for reads shortened by the memory budget.
    pub fn wants(&self) -> Option<usize> {
        match &self.inner {
            Inner::Length(framer) => Some(framer.wants()),
            Inner::Resp(framer) => framer.wants(),
            Inner::Raw | Inner::Line(_) | Inner::Msgpack(_) => None,
        }
    }

    /// True when a packet is delivered as a decoded object (`Msgpack`, `Resp`), not as
    /// bytes: it is charged its share of the wire bytes (Python's
    /// `Framer.decodes_objects`).
    pub fn decodes_objects(&self) -> bool {
        matches!(self.mode, Mode::Msgpack | Mode::Resp)
    }

    /// True for `Resp`: a [`FrameError`] from [`Framer::feed`] is delivered to the owner
    /// as the port's last message, after the commands before it, and the port stays open
    /// (the owner answers and closes it); false: the port is closed with the error.
    pub fn delivers_errors(&self) -> bool {
        self.mode == Mode::Resp
    }

    /// The budget charge of each packet one feed delivered, as the Python I/O thread
    /// computes it (`IOThread._deliver_framed`): pushes to `out` one charge for each
    /// packet of `packets` from index `first`, then one for the error when
    /// `error_delivered` (a `Resp` error message), each in bytes.
    ///
    /// - `Raw`: each read its own length; nothing more (a raw port has no packet overhead).
    /// - `Length`, `Line`: each packet its payload's length, plus `overhead`.
    /// - `Msgpack`, `Resp`: the wire bytes the read `consumed` (its length plus
    ///   [`buffered`](Framer::buffered) before it, less `buffered` after it), shared
    ///   equally among the messages, the remainder on the last one; plus `overhead` each;
    ///   and, when `overhead` is not 0, what the decoded object holds beyond them: a
    ///   msgpack object the charge of its items by kind (see [`msgpack::CHARGE_INT`]),
    ///   a RESP command
    ///   [`RESP_ARGUMENT_CHARGE`] for each argument.
    ///
    /// `overhead` is [`PACKET_OVERHEAD`] for a framed port of this process, 0 for a
    /// daemon's (which charges wire bytes, as its client counts them).  The charges are
    /// what [`crate::flow::ReceiveFlow::deliver`] takes.  The msgpack items are the last
    /// [`feed`](Framer::feed)'s: call this right after it.
    pub fn charges(
        &self,
        packets: &Packets,
        first: usize,
        error_delivered: bool,
        consumed: usize,
        overhead: u64,
        out: &mut Vec<u64>,
    ) {
        let count = packets.len().saturating_sub(first) + usize::from(error_delivered);
        if count == 0 {
            return;
        }
        match self.mode {
            Mode::Raw => out.extend(packets.iter().skip(first).map(packet_len)),
            Mode::Length(_) | Mode::Line(_) => out.extend(
                packets
                    .iter()
                    .skip(first)
                    .map(|packet| packet_len(packet) + overhead),
            ),
            Mode::Msgpack | Mode::Resp => {
                let (consumed, count_u64) = (consumed as u64, count as u64);
                let share = consumed / count_u64;
                let extra = consumed % count_u64;
                let start = out.len();
                out.extend(std::iter::repeat(share + overhead).take(count));
                if let Some(last) = out.last_mut() {
                    *last += extra;
                }
                if overhead == 0 {
                    return;
                }
                // What decoding builds beyond the object itself (a RESP error message,
                // the last, has no packet and nothing more).
                let objects = &mut out[start..];
                match &self.inner {
                    Inner::Msgpack(framer) => {
                        for (charge, &more) in objects.iter_mut().zip(framer.object_charges()) {
                            *charge += more;
                        }
                    }
                    _ => {
                        for (charge, packet) in objects.iter_mut().zip(packets.iter().skip(first)) {
                            if let Packet::Command(command) = packet {
                                *charge += command.len() as u64 * RESP_ARGUMENT_CHARGE as u64;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The header and trailer to write around an outgoing packet's `payload`, after
    /// checking it against the cap (Python's `Framer.frame`, for a payload of bytes):
    ///
    /// - `Length`: the big-endian length; a payload longer than `packet_size` (or the
    ///   header's range) is `TooLarge("packet")`;
    /// - `Line`: the delimiter as trailer unless the payload ends with it; more than
    ///   `packet_size` bytes with it is `TooLarge("line")`;
    /// - `Msgpack`: nothing; the payload is an object Python packed, and more than
    ///   `packet_size` bytes is `TooLarge("msgpack object")`;
    /// - `Raw`, `Resp`: nothing, no cap (the watermarks bound output).
    pub fn envelope(&self, payload: &[u8]) -> Result<Envelope, FrameError> {
        let len = payload.len();
        match &self.inner {
            Inner::Raw | Inner::Resp(_) => Ok(Envelope::EMPTY),
            Inner::Length(framer) => {
                if len > framer.limit {
                    return Err(FrameError::too_large(framer.limit, len, "packet"));
                }
                let bytes = (len as u64).to_be_bytes();
                let width = usize::from(framer.header);
                let mut header = [0; 4];
                header[..width].copy_from_slice(&bytes[8 - width..]);
                Ok(Envelope {
                    header,
                    header_len: framer.header,
                    trailer: None,
                })
            }
            Inner::Line(framer) => {
                let trailer = match payload.last() {
                    Some(&last) if last == framer.delimiter => None,
                    _ => Some(framer.delimiter),
                };
                let size = len + usize::from(trailer.is_some());
                if size > framer.limit {
                    return Err(FrameError::too_large(framer.limit, size, "line"));
                }
                Ok(Envelope {
                    trailer,
                    ..Envelope::EMPTY
                })
            }
            Inner::Msgpack(framer) => {
                if len > framer.limit() {
                    return Err(FrameError::too_large(framer.limit(), len, msgpack::WHAT));
                }
                Ok(Envelope::EMPTY)
            }
        }
    }
}

fn packet_len(packet: Packet<'_>) -> u64 {
    (match packet {
        Packet::Bytes(payload) => payload.len(),
        Packet::Command(command) => command.data.len(),
    }) as u64
}

// -- length prefixes -----------------------------------------------------------------------

/// `LengthPrefixFramer`: a big-endian length header of 1, 2 or 4 bytes before each packet.
#[derive(Clone, Debug)]
struct LengthFramer {
    header: u8,
    /// `packet_size`, or the header's range if smaller.
    limit: usize,
    buffer: Vec<u8>,
    /// The body length being collected; `None` while reading a header.
    wanted: Option<usize>,
}

impl LengthFramer {
    fn new(header: u8, packet_size: usize) -> Result<LengthFramer, OptionError> {
        if !matches!(header, 1 | 2 | 4) {
            return Err(OptionError(format!(
                "packet must be 1, 2 or 4 header bytes, not {header}"
            )));
        }
        let range = (1u64 << (8 * u32::from(header))) - 1;
        let limit = usize::try_from(range).map_or(packet_size, |range| packet_size.min(range));
        Ok(LengthFramer {
            header,
            limit,
            buffer: Vec::new(),
            wanted: None,
        })
    }

    fn wants(&self) -> usize {
        let have = self.buffer.len();
        match self.wanted {
            None => usize::from(self.header) - have,
            Some(wanted) => wanted - have,
        }
    }

    fn feed(&mut self, input: &[u8], out: &mut Packets) -> Result<(), FrameError> {
        let result = if self.buffer.is_empty() {
            // The usual case: frame the read itself, copy only an unfinished packet.
            self.parse(input, out).map(|start| {
                self.buffer.extend_from_slice(&input[start..]);
            })
        } else {
            let mut buffer = std::mem::take(&mut self.buffer);
            buffer.extend_from_slice(input);
            let result = self.parse(&buffer, out).map(|start| {
                buffer.drain(..start);
            });
            self.buffer = buffer;
            result
        };
        if result.is_err() {
            self.buffer.clear();
        }
        result
    }

    /// Push the whole packets of `data`; return where the unfinished rest begins.
    fn parse(&mut self, data: &[u8], out: &mut Packets) -> Result<usize, FrameError> {
        let header = usize::from(self.header);
        let end = data.len();
        let mut start = 0;
        loop {
            let wanted = match self.wanted {
                Some(wanted) => wanted,
                None => {
                    if end - start < header {
                        break;
                    }
                    let wanted = data[start..start + header]
                        .iter()
                        .fold(0usize, |n, &byte| (n << 8) | usize::from(byte));
                    if wanted > self.limit {
                        return Err(FrameError::too_large(self.limit, wanted, "packet"));
                    }
                    start += header;
                    self.wanted = Some(wanted);
                    wanted
                }
            };
            if end - start < wanted {
                break;
            }
            out.push_bytes(&data[start..start + wanted]);
            start += wanted;
            self.wanted = None;
        }
        Ok(start)
    }
}

// -- lines ---------------------------------------------------------------------------------

/// `LineFramer`: packets end with the delimiter, which is kept.
#[derive(Clone, Debug)]
struct LineFramer {
    delimiter: u8,
    limit: usize,
    buffer: Vec<u8>,
    /// Bytes of the buffer known to hold no delimiter.
    scanned: usize,
}

impl LineFramer {
    fn feed(&mut self, input: &[u8], out: &mut Packets) -> Result<(), FrameError> {
        let result = if self.buffer.is_empty() {
            self.parse(input, 0, out).map(|start| {
                self.buffer.extend_from_slice(&input[start..]);
            })
        } else {
            let mut buffer = std::mem::take(&mut self.buffer);
            buffer.extend_from_slice(input);
            let result = self.parse(&buffer, self.scanned, out).map(|start| {
                buffer.drain(..start);
            });
            self.buffer = buffer;
            result
        };
        match result {
            Ok(()) if self.buffer.len() > self.limit => {
                let size = self.buffer.len();
                self.buffer.clear();
                self.scanned = 0;
                Err(FrameError::too_large(self.limit, size, "line"))
            }
            Ok(()) => {
                self.scanned = self.buffer.len();
                Ok(())
            }
            Err(error) => {
                self.buffer.clear();
                self.scanned = 0;
                Err(error)
            }
        }
    }

    /// Push the lines of `data`, searching from `from`; return where the rest begins.
    fn parse(&self, data: &[u8], from: usize, out: &mut Packets) -> Result<usize, FrameError> {
        let mut start = 0;
        let mut search = from;
        while let Some(offset) = data[search..].iter().position(|&b| b == self.delimiter) {
            let end = search + offset + 1;
            if end - start > self.limit {
                return Err(FrameError::too_large(self.limit, end - start, "line"));
            }
            out.push_bytes(&data[start..end]);
            start = end;
            search = end;
        }
        Ok(start)
    }
}
