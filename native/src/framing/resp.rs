//! Redis commands in (`RespFramer`): each packet is one command, its name and arguments.
//!
//! Both of Redis's request forms are read, as `ioserver/_framing.py` reads them:
//!
//! - an array of bulk strings, `*<n>\r\n` then `n` times `$<length>\r\n<bytes>\r\n` (what
//!   every client library and `redis-cli` send); an empty or null array (`*0`, `*-1`) is
//!   skipped, as Redis does;
//! - an inline command: one line (CRLF or LF) split on ASCII whitespace, for `nc`/`telnet`
//!   (no quoting); an empty line is skipped.
//!
//! `packet_size` caps one command's wire size (headers included); a `$` header that claims
//! more fails at once.  Redis's own caps apply too: [`RESP_MAX_ARGUMENTS`] arguments,
//! [`RESP_MAX_INLINE`] bytes per inline command, [`RESP_MAX_HEADER`] bytes of a header.
//!
//! **Who builds the value.**  Rust finds each command's boundaries *and* its arguments (for
//! RESP they are the same work: the bulk headers are the arguments' bounds), and pushes a
//! [`Packet::Command`](super::Packet::Command) whose arguments lie back to back in the
//! [`Packets`] arena; the drain builds the `list[bytes]` from those slices under the GIL.
//! Handing Python the command's wire bytes instead would make it parse every header a
//! second time, in Python, for the same list; a RESP2 command has nothing else to decode
//! (no types, no nesting), so there is nothing the Python side would add.
//!
//! **Protocol errors are delivered, not raised** (see [`super::Framer::delivers_errors`]):
//! `feed` leaves the commands before the fault in `out` and returns the error; from then
//! on the framer holds nothing and ignores every later byte.

use super::{FrameError, Packets};

/// Arguments in one command (Redis's cap).
pub const RESP_MAX_ARGUMENTS: usize = 1024 * 1024;
/// Bytes of one inline command (Redis's cap).
pub const RESP_MAX_INLINE: usize = 64 * 1024;
/// Bytes of a `*`/`$` header line, without its CRLF (Redis's cap).
pub const RESP_MAX_HEADER: usize = 32;

/// The parse state of one port's RESP input, resumed at each read.
#[derive(Clone, Debug)]
pub(crate) struct RespFramer {
    limit: usize,
    buffer: Vec<u8>,
    failed: bool,
    /// The arguments of the command being read, back to back, and where each ends.
    arguments: Vec<u8>,
    ends: Vec<usize>,
    /// Arguments of the array being read; `None` between commands.
    count: Option<usize>,
    /// Length of the bulk string being read; `None` while reading its header.
    bulk: Option<usize>,
    /// Wire bytes of the current command already parsed (and consumed).  As in the
    /// Python framer, an empty array's header stays counted here until the next array
    /// header (so `buffered` counts it, in both).
    held: usize,
    /// Bytes at the start of the buffer known to hold no newline: an inline command
    /// still coming is not searched again from its start at each read.
    inline_scanned: usize,
}

fn crlf(data: &[u8], from: usize) -> Option<usize> {
    data[from..]
        .windows(2)
        .position(|pair| pair == b"\r\n")
        .map(|offset| from + offset)
}

/// Python's `bytes.isspace` for one byte: space, `\t`, `\n`, `\r`, `\x0b`, `\x0c`.
fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Python's `bytes.isdigit`: non-empty, ASCII digits only.
fn is_digits(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit)
}

fn digits_value(digits: &[u8]) -> u128 {
    digits
        .iter()
        .fold(0u128, |n, &d| n * 10 + u128::from(d - b'0'))
}

/// A multibulk count, as the Python framer reads it: `Some(None)` for a count of zero or
/// less (an empty or null array, skipped), `Some(Some(n))`, or `None` if it is invalid
/// (Redis's `string2ll`: an optional `-`, at most 19 ASCII digits; at most
/// [`RESP_MAX_ARGUMENTS`]).
fn multibulk_count(segment: &[u8]) -> Option<Option<usize>> {
    let (negative, digits) = match segment.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, segment),
    };
    if !is_digits(digits) || digits.len() > 19 {
        return None;
    }
    let value = digits_value(digits);
    if negative || value == 0 {
        return Some(None);
    }
    if value > RESP_MAX_ARGUMENTS as u128 {
        return None;
    }
    Some(Some(value as usize))
}

impl RespFramer {
    pub(crate) fn new(limit: usize) -> RespFramer {
        RespFramer {
            limit,
            buffer: Vec::new(),
            failed: false,
            arguments: Vec::new(),
            ends: Vec::new(),
            count: None,
            bulk: None,
            held: 0,
            inline_scanned: 0,
        }
    }

    pub(crate) fn buffered(&self) -> usize {
        self.held + self.buffer.len()
    }

    pub(crate) fn wants(&self) -> Option<usize> {
        match (self.count, self.bulk) {
            (Some(_), Some(bulk)) => Some((bulk + 2).saturating_sub(self.buffer.len())),
            _ => None,
        }
    }

    fn fail(&mut self, error: FrameError) -> Result<(), FrameError> {
        self.failed = true;
        self.buffer = Vec::new();
        self.arguments = Vec::new();
        self.ends = Vec::new();
        self.count = None;
        self.bulk = None;
        self.held = 0;
        self.inline_scanned = 0;
        Err(error)
    }

    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Packets) -> Result<(), FrameError> {
        if self.failed {
            return Ok(());
        }
        self.buffer.extend_from_slice(input);
        let mut buffer = std::mem::take(&mut self.buffer);
        let result = self.parse(&buffer, out);
        match result {
            Ok(position) => {
                buffer.drain(..position);
                self.buffer = buffer;
                Ok(())
            }
            Err(error) => self.fail(error),
        }
    }

    /// Push the whole commands of `buffer`; return the bytes consumed.
    fn parse(&mut self, buffer: &[u8], out: &mut Packets) -> Result<usize, FrameError> {
        let limit = self.limit;
        let end = buffer.len();
        let mut position = 0;
        while position < end {
            let count = match self.count {
                Some(count) => count,
                None => {
                    // Between commands: an array header, or an inline command.
                    if buffer[position] != b'*' {
                        let from = position
                            + if position == 0 {
                                self.inline_scanned
                            } else {
                                0
                            };
                        let newline = buffer[from..]
                            .iter()
                            .position(|&b| b == b'\n')
                            .map(|offset| from + offset);
                        self.inline_scanned = match newline {
                            Some(_) => 0,
                            None => end - position,
                        };
                        let cap = limit.min(RESP_MAX_INLINE);
                        let size = newline.map_or(end, |newline| newline + 1) - position;
                        if size > cap {
                            return Err(FrameError::too_large(cap, size, "inline command"));
                        }
                        let Some(newline) = newline else { break };
                        let line = &buffer[position..newline];
                        position = newline + 1;
                        let mut words = line.split(|&b| is_space(b)).filter(|w| !w.is_empty());
                        if let Some(first) = words.next() {
                            out.push_command(std::iter::once(first).chain(words));
                        }
                        continue;
                    }
                    let Some(newline) = crlf(buffer, position) else {
                        if end - position > RESP_MAX_HEADER {
                            return Err(invalid("invalid multibulk length"));
                        }
                        break;
                    };
                    let count = multibulk_count(&buffer[position + 1..newline])
                        .ok_or_else(|| invalid("invalid multibulk length"))?;
                    self.held = newline + 2 - position;
                    position = newline + 2;
                    let Some(count) = count else {
                        continue; // *0 and *-1: nothing to run, as Redis
                    };
                    // Each argument takes at least 6 bytes ("$0\r\n\r\n").
                    if self.held + 6 * count > limit {
                        let size = self.held + 6 * count;
                        return Err(FrameError::too_large(limit, size, "command"));
                    }
                    self.arguments.clear();
                    self.ends.clear();
                    self.bulk = None;
                    self.count = Some(count);
                    count
                }
            };
            // Inside an array: its bulk strings.
            while self.ends.len() < count {
                let bulk = match self.bulk {
                    Some(bulk) => bulk,
                    None => {
                        if position >= end {
                            break;
                        }
                        if buffer[position] != b'$' {
                            let got = char::from(buffer[position]);
                            return Err(invalid(&format!("expected '$', got '{got}'")));
                        }
                        let Some(newline) = crlf(buffer, position) else {
                            if end - position > RESP_MAX_HEADER {
                                return Err(invalid("invalid bulk length"));
                            }
                            break;
                        };
                        let digits = &buffer[position + 1..newline];
                        if !(is_digits(digits) && digits.len() < 19) {
                            return Err(invalid("invalid bulk length"));
                        }
                        let bulk = digits_value(digits) as usize;
                        self.held += newline + 2 - position;
                        let size = self.held.saturating_add(bulk).saturating_add(2);
                        if size > limit {
                            return Err(FrameError::too_large(limit, size, "command"));
                        }
                        position = newline + 2;
                        self.bulk = Some(bulk);
                        bulk
                    }
                };
                let after = position + bulk;
                if end < after + 2 {
                    break;
                }
                if &buffer[after..after + 2] != b"\r\n" {
                    return Err(invalid("bulk string not ended by CRLF"));
                }
                self.arguments.extend_from_slice(&buffer[position..after]);
                self.ends.push(self.arguments.len());
                self.held += bulk + 2;
                position = after + 2;
                self.bulk = None;
            }
            if self.ends.len() < count {
                break;
            }
            push_arguments(out, &self.arguments, &self.ends);
            self.arguments.clear();
            self.ends.clear();
            self.count = None;
            self.held = 0;
        }
        Ok(position)
    }
}

fn push_arguments(out: &mut Packets, arguments: &[u8], ends: &[usize]) {
    out.push_command((0..ends.len()).map(|i| {
        let start = if i == 0 { 0 } else { ends[i - 1] };
        &arguments[start..ends[i]]
    }));
}

fn invalid(message: &str) -> FrameError {
    FrameError::Malformed(message.to_owned())
}
