//! msgpack object boundaries, found before anything is decoded (`MsgpackFramer`).
//!
//! A packet is the wire bytes of one whole msgpack object of at most `packet_size` bytes;
//! **decoding stays in Python** (`msgpack.unpackb(packet, raw=False, strict_map_key=False)`,
//! whose length caps default to the packet's own size).  What the Python framer refuses
//! while finding boundaries is refused here, at the same read and with the same error:
//!
//! - an object larger than `packet_size`, as soon as a header announces it (a length, or
//!   a count of items that cannot fit, each taking one byte at least) or its bytes reach
//!   it: [`FrameError::TooLarge`] (`"msgpack object"`);
//! - an object of more than [`MSGPACK_MAX_ITEMS`] items, whatever its size in bytes, as
//!   soon as the count is known to pass the cap (a container's header adds all the items
//!   it announces): [`FrameError::TooManyItems`], answered as `TooLarge` is;
//! - nesting deeper than [`MSGPACK_MAX_DEPTH`], and the byte `0xc1` (never used):
//!   [`FrameError::Malformed`].
//!
//! What only the decoder finds (a `str` that is not UTF-8, an unhashable map key, a bad
//! timestamp extension) is found by the Python side when it decodes the packet (the loop's
//! drain, `py.rs`'s `Inbox`, with the same options: a reused `msgpack.Unpacker` up to
//! 16 KiB, `unpackb` above), and the drain answers it as the Python framer does:
//! `Error("EPROTO", "malformed msgpack data: <the decoder's text>")`, then
//! `Closed("EPROTO")`, and the port is closed.  Two
//! things differ, and only for such an object: the Python framer decodes a read's objects
//! before it delivers any, so the objects that came before the bad one *in the same read*
//! were dropped with it; decoded at the drain, they are delivered first.  And a read that
//! also leaves a partial object over `port_buffer_limit` closes the native port with
//! `ENOBUFS` (the I/O thread's check, before any decoding), where the Python core, whose
//! `feed` decoded first, says `EPROTO`.
//!
//! # Exactly the Python framer's errors
//!
//! The Python framer runs two scanners: msgpack's C decoder in skip mode over the whole
//! objects of a read (it has no length caps, refuses nesting past its own stack of 1024
//! containers and `0xc1` with an empty message), and a resumable walk over an unfinished
//! object (caps and [`MSGPACK_MAX_DEPTH`]), then checks the whole objects' sizes and depths
//! before decoding.  When one read holds several faults, which one is reported depends on
//! that order, so this module runs the same two scanners in the same order: `skip` is
//! the C decoder's rule, `MsgpackFramer::walk` the walk's.

use super::{FrameError, Packets};

/// The deepest nesting of arrays and maps in one msgpack object
/// (`_framing.MSGPACK_MAX_DEPTH`: half the C decoder's stack of 1024).
pub const MSGPACK_MAX_DEPTH: usize = 512;

/// The most items one msgpack object may hold (`_framing.MSGPACK_MAX_ITEMS`), whatever
/// `packet_size`: the object itself counts one, and each element of an array, each key
/// and each value of a map one more (so a count is 1 + the sum of its containers'
/// counts, a map's doubled).  Decoding builds up to ~80 bytes of Python objects per item
/// (an ext: 80, an empty dict in a list: 72, an empty list: 64), at up to ~1 µs per item
/// (an ext, built by a Python call; ~0.2 µs for the others), so this bounds one object
/// at ~80 MiB and about a second of the drain at worst, where `packet_size` alone
/// (64 Mi one-byte items at the default) allowed ~4.5 GiB and a minute.  Redis's cap on a command's arguments, as [`super::resp::RESP_MAX_ARGUMENTS`].
pub const MSGPACK_MAX_ITEMS: usize = 1024 * 1024;

/// The C decoder's stack: containers nested deeper are refused by its skip.
const C_STACK: usize = 1024;

pub(crate) const WHAT: &str = "msgpack object";

/// What an item's first byte says of it.
#[derive(Clone, Copy)]
enum Item {
    /// The whole item's size (fixints, nil, booleans, floats, ints, fixext, fixstr).
    Fixed(usize),
    /// A fixarray or fixmap of this many items (a map's count doubled).
    FixContainer(usize),
    /// A length field of `width` bytes, then `extra` header bytes, then the data.
    Sized { width: usize, extra: usize },
    /// A count field of `width` bytes, `per` items per count.
    Container { width: usize, per: usize },
    /// 0xc1, never used.
    Never,
}

fn item(byte: u8) -> Item {
    match byte {
        0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => Item::Fixed(1),
        0x80..=0x8f => Item::FixContainer(usize::from(byte & 0x0f) * 2),
        0x90..=0x9f => Item::FixContainer(usize::from(byte & 0x0f)),
        0xa0..=0xbf => Item::Fixed(1 + usize::from(byte & 0x1f)),
        0xc1 => Item::Never,
        0xc4 | 0xd9 => Item::Sized { width: 1, extra: 0 }, // bin 8, str 8
        0xc5 | 0xda => Item::Sized { width: 2, extra: 0 }, // bin 16, str 16
        0xc6 | 0xdb => Item::Sized { width: 4, extra: 0 }, // bin 32, str 32
        0xc7 => Item::Sized { width: 1, extra: 1 },        // ext 8 (then a type byte)
        0xc8 => Item::Sized { width: 2, extra: 1 },        // ext 16
        0xc9 => Item::Sized { width: 4, extra: 1 },        // ext 32
        0xca => Item::Fixed(5),                            // float 32
        0xcb => Item::Fixed(9),                            // float 64
        0xcc | 0xd0 => Item::Fixed(2),                     // (u)int 8
        0xcd | 0xd1 => Item::Fixed(3),                     // (u)int 16
        0xce | 0xd2 => Item::Fixed(5),                     // (u)int 32
        0xcf | 0xd3 => Item::Fixed(9),                     // (u)int 64
        0xd4 => Item::Fixed(3),                            // fixext 1 (type byte + data)
        0xd5 => Item::Fixed(4),                            // fixext 2
        0xd6 => Item::Fixed(6),                            // fixext 4
        0xd7 => Item::Fixed(10),                           // fixext 8
        0xd8 => Item::Fixed(18),                           // fixext 16
        0xdc => Item::Container { width: 2, per: 1 },      // array 16
        0xdd => Item::Container { width: 4, per: 1 },      // array 32
        0xde => Item::Container { width: 2, per: 2 },      // map 16
        0xdf => Item::Container { width: 4, per: 2 },      // map 32
    }
}

fn big_endian(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .fold(0usize, |n, &byte| (n << 8) | usize::from(byte))
}

fn too_many_items(items: usize) -> FrameError {
    FrameError::TooManyItems {
        limit: MSGPACK_MAX_ITEMS,
        size: items,
        what: WHAT,
    }
}

/// Refuse the whole object `data[start..end]` (found by the C skip) if it holds more than
/// [`MSGPACK_MAX_ITEMS`] items (Python's `_check_items`): its item headers in order, the
/// count 1 + the items each container header announces, refused at the first header
/// that passes the cap, with the count there (what the walk would have said).
fn check_items(data: &[u8], start: usize, end: usize) -> Result<(), FrameError> {
    let mut items: usize = 1;
    let mut position = start;
    while position < end {
        let byte = data[position];
        let count = match item(byte) {
            Item::Fixed(size) => {
                position += size;
                continue;
            }
            Item::FixContainer(count) => {
                position += 1;
                count
            }
            Item::Sized { width, extra } => {
                let length = big_endian(&data[position + 1..position + 1 + width]);
                position += 1 + width + extra + length;
                continue;
            }
            Item::Container { width, per } => {
                let count = big_endian(&data[position + 1..position + 1 + width]) * per;
                position += 1 + width;
                count
            }
            // (The C skip refused it.)
            Item::Never => return Err(disagree()),
        };
        items += count;
        if items > MSGPACK_MAX_ITEMS {
            return Err(too_many_items(items));
        }
    }
    Ok(())
}

/// Append the items of each whole object of `data[start..end]` to `items`, in order: the
/// objects back to back, as the C skip found them (the Python framer's, which calls this
/// through `ioserver._native._msgpack_items` for each object's charge, in place of its
/// Python `_check_items` loop).  Counted as [`check_items`] counts (itself and what its
/// containers' headers announce) and refused past [`MSGPACK_MAX_ITEMS`] as it refuses: at
/// the first header that passes the cap, with the count there.
///
/// An unfinished object ends the count (the bytes were not whole objects back to back:
/// the caller, which knows how many it framed, sees fewer counts).
///
/// Errors: [`FrameError::TooManyItems`].
pub(crate) fn whole_object_items(
    data: &[u8],
    mut start: usize,
    end: usize,
    items: &mut Vec<usize>,
) -> Result<(), FrameError> {
    let mut stack = Vec::new();
    while start < end {
        let Some((stop, _, count)) = skip_one(data, start, end, &mut stack)? else {
            break;
        };
        if count > MSGPACK_MAX_ITEMS {
            check_items(data, start, stop)?;
            return Err(too_many_items(count)); // (check_items refused it already)
        }
        items.push(count);
        start = stop;
    }
    Ok(())
}

pub(crate) fn too_deep() -> FrameError {
    FrameError::Malformed(format!(
        "malformed msgpack data: nested deeper than {MSGPACK_MAX_DEPTH} levels"
    ))
}

/// One object as the C decoder skips it: `Ok(Some((end, deepest, items)))` if it is whole
/// in `data[start..end]` (`deepest`: the most containers around any container of it, the
/// one it opened included; `items`: itself and what its containers' headers announce, as
/// [`MSGPACK_MAX_ITEMS`] counts them), `Ok(None)` if it is unfinished.
///
/// Errors as the C decoder's: a container opened inside [`C_STACK`] others (empty ones
/// too) is too deep, `0xc1` is `"malformed msgpack data: "` (msgpack's `FormatError` has
/// no text).
fn skip_one(
    data: &[u8],
    start: usize,
    end: usize,
    stack: &mut Vec<usize>,
) -> Result<Option<(usize, usize, usize)>, FrameError> {
    stack.clear();
    let mut position = start;
    let mut deepest = 0;
    let mut items: usize = 1;
    while position < end {
        let byte = data[position];
        let count = match item(byte) {
            Item::Fixed(size) => {
                if position + size > end {
                    return Ok(None);
                }
                position += size;
                None
            }
            Item::FixContainer(count) => {
                position += 1;
                Some(count)
            }
            Item::Sized { width, extra } => {
                if position + 1 + width > end {
                    return Ok(None);
                }
                let length = big_endian(&data[position + 1..position + 1 + width]);
                let size = (1 + width + extra).saturating_add(length);
                if position.saturating_add(size) > end {
                    return Ok(None);
                }
                position += size;
                None
            }
            Item::Container { width, per } => {
                if position + 1 + width > end {
                    return Ok(None);
                }
                let count = big_endian(&data[position + 1..position + 1 + width]) * per;
                position += 1 + width;
                Some(count)
            }
            Item::Never => {
                return Err(FrameError::Malformed("malformed msgpack data: ".into()));
            }
        };
        if let Some(count) = count {
            if stack.len() >= C_STACK {
                return Err(too_deep());
            }
            deepest = deepest.max(stack.len() + 1);
            if count > 0 {
                items = items.saturating_add(count);
                stack.push(count);
                continue;
            }
        }
        // An item ended: count it in its container, closing the containers it fills.
        loop {
            match stack.last_mut() {
                Some(top) => {
                    *top -= 1;
                    if *top != 0 {
                        break;
                    }
                    stack.pop();
                }
                None => return Ok(Some((position, deepest, items))),
            }
        }
    }
    Ok(None)
}

/// The whole objects of `data[start..end]`, as the C decoder in skip mode finds them:
/// pushes their bounds and depths; returns where the unfinished rest begins (`end` if
/// none).
fn skip(
    data: &[u8],
    mut start: usize,
    end: usize,
    bounds: &mut Vec<Bound>,
    stack: &mut Vec<usize>,
) -> Result<usize, FrameError> {
    while start < end {
        match skip_one(data, start, end, stack)? {
            Some((stop, deepest, items)) => {
                bounds.push(Bound {
                    start,
                    end: stop,
                    deepest: Some(deepest),
                    items,
                });
                start = stop;
            }
            None => break,
        }
    }
    Ok(start)
}

/// A whole object found in a read.
#[derive(Clone, Copy, Debug)]
struct Bound {
    start: usize,
    end: usize,
    /// Its deepest nesting, when the C skip found it (None: the walk finished it).
    deepest: Option<usize>,
    /// Its items (itself, each array element, each map key and value), counted by the
    /// scanner that found it.
    items: usize,
}

/// `MsgpackFramer`'s boundary finder: the unfinished object's bytes and the walk's place.
#[derive(Clone, Debug)]
pub(crate) struct MsgpackFramer {
    limit: usize,
    /// The unfinished object's bytes (and, in a held feed, the read).
    buffer: Vec<u8>,
    /// Bytes of it walked: the next item's header starts there.
    scanned: usize,
    /// Items each open array or map still needs, innermost last.
    stack: Vec<usize>,
    /// Items of the walked object counted so far (itself, and what its containers'
    /// headers announced); meaningful while `scanned` is not 0, and, once a walk
    /// finished an object, that object's count.
    items: usize,
    /// Scratch: the C skip's stack, and a read's whole objects.
    skip_stack: Vec<usize>,
    bounds: Vec<Bound>,
    /// The items of each object the last [`feed`](MsgpackFramer::feed) pushed, in order
    /// (what [`super::Framer::charges`] charges per item).
    object_items: Vec<usize>,
}

impl MsgpackFramer {
    pub(crate) fn new(limit: usize) -> MsgpackFramer {
        MsgpackFramer {
            limit,
            buffer: Vec::new(),
            scanned: 0,
            stack: Vec::new(),
            items: 1,
            skip_stack: Vec::new(),
            bounds: Vec::new(),
            object_items: Vec::new(),
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The items of each object the last [`feed`](MsgpackFramer::feed) pushed, in order.
    pub(crate) fn object_items(&self) -> &[usize] {
        &self.object_items
    }

    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Packets) -> Result<(), FrameError> {
        self.object_items.clear();
        let result = if self.buffer.is_empty() {
            self.feed_fresh(input, out)
        } else {
            self.feed_held(input, out)
        };
        if result.is_err() {
            // A failed framer holds nothing (and pushed nothing).
            self.object_items.clear();
            self.buffer.clear();
            self.scanned = 0;
            self.stack.clear();
        }
        result
    }

    /// `feed` when nothing is held (the usual case): find the whole objects in the read
    /// itself, and copy only an unfinished one at its end.
    fn feed_fresh(&mut self, data: &[u8], out: &mut Packets) -> Result<(), FrameError> {
        let end = data.len();
        if end == 0 {
            return Ok(());
        }
        let mut bounds = std::mem::take(&mut self.bounds);
        bounds.clear();
        let result = self.fresh(data, &mut bounds, out);
        self.bounds = bounds;
        result
    }

    fn fresh(
        &mut self,
        data: &[u8],
        bounds: &mut Vec<Bound>,
        out: &mut Packets,
    ) -> Result<(), FrameError> {
        let end = data.len();
        let start = skip(data, 0, end, bounds, &mut self.skip_stack)?;
        if start < end {
            self.buffer.extend_from_slice(&data[start..]);
            if self.walk(0, end - start)?.is_some() {
                return Err(disagree());
            }
            if end - start > self.limit {
                return Err(FrameError::too_large(self.limit, end - start, WHAT));
            }
        }
        self.check_and_push(data, bounds, out)
    }

    /// `feed` when an unfinished object is held: walk on from where it stopped.
    fn feed_held(&mut self, input: &[u8], out: &mut Packets) -> Result<(), FrameError> {
        self.buffer.extend_from_slice(input);
        let end = self.buffer.len();
        let mut bounds = std::mem::take(&mut self.bounds);
        bounds.clear();
        let result = self.held(end, &mut bounds, out);
        self.bounds = bounds;
        result
    }

    fn held(
        &mut self,
        end: usize,
        bounds: &mut Vec<Bound>,
        out: &mut Packets,
    ) -> Result<(), FrameError> {
        let start = match self.walk(0, end)? {
            Some(stop) => {
                bounds.push(Bound {
                    start: 0,
                    end: stop,
                    deepest: None,
                    items: self.items,
                });
                let mut start = stop;
                if start < end {
                    start = skip(&self.buffer, start, end, bounds, &mut self.skip_stack)?;
                    if start < end && self.walk(start, end)?.is_some() {
                        return Err(disagree());
                    }
                }
                start
            }
            None => 0,
        };
        if end - start > self.limit {
            return Err(FrameError::too_large(self.limit, end - start, WHAT));
        }
        let buffer = std::mem::take(&mut self.buffer);
        let result = self.check_and_push(&buffer, bounds, out);
        self.buffer = buffer;
        result?;
        self.buffer.drain(..start);
        Ok(())
    }

    /// Python's `_decode`, less the decoding: refuse a whole object larger than the
    /// limit (the largest is named), nested deeper than [`MSGPACK_MAX_DEPTH`] (checked
    /// as `_check_depth` does: the C skip inside 512 levels of padding), or of more than
    /// [`MSGPACK_MAX_ITEMS`] items (`check_items`; an object the walk finished was
    /// counted by the walk); then push them.
    fn check_and_push(
        &mut self,
        data: &[u8],
        bounds: &[Bound],
        out: &mut Packets,
    ) -> Result<(), FrameError> {
        let largest = bounds.iter().map(|b| b.end - b.start).max().unwrap_or(0);
        if largest > self.limit {
            return Err(FrameError::too_large(self.limit, largest, WHAT));
        }
        if largest > MSGPACK_MAX_DEPTH {
            // (An object nested d deep has d bytes at least.)
            for bound in bounds {
                if bound.end - bound.start <= MSGPACK_MAX_DEPTH {
                    continue;
                }
                let deepest = match bound.deepest {
                    Some(deepest) => deepest,
                    None => match skip_one(data, bound.start, bound.end, &mut self.skip_stack) {
                        Ok(Some((_, deepest, _))) => deepest,
                        // It is whole, and the walk allowed no more than 512 levels.
                        _ => return Err(disagree()),
                    },
                };
                if deepest > C_STACK - MSGPACK_MAX_DEPTH {
                    return Err(too_deep());
                }
            }
        }
        if largest > MSGPACK_MAX_ITEMS {
            // (Each item takes one byte at least.)
            for bound in bounds {
                if bound.deepest.is_some() && bound.end - bound.start > MSGPACK_MAX_ITEMS {
                    check_items(data, bound.start, bound.end)?;
                }
            }
        }
        for bound in bounds {
            out.push_bytes(&data[bound.start..bound.end]);
            self.object_items.push(bound.items);
        }
        Ok(())
    }

    /// Walk the held object that begins at `start`, from where the last walk stopped;
    /// return its end, or `None` if it is unfinished (its place kept for the next read).
    ///
    /// Errors: a header announcing more than the limit (`TooLarge`), a container header
    /// that brings the object's items past [`MSGPACK_MAX_ITEMS`] (`TooManyItems`), a
    /// non-empty container nested deeper than [`MSGPACK_MAX_DEPTH`], the byte `0xc1`.
    fn walk(&mut self, start: usize, end: usize) -> Result<Option<usize>, FrameError> {
        let buffer = &self.buffer;
        let stack = &mut self.stack;
        let limit = self.limit;
        let mut items = if self.scanned == 0 { 1 } else { self.items };
        let mut position = start + self.scanned;
        while position < end {
            let byte = buffer[position];
            match item(byte) {
                Item::Fixed(size) => {
                    if position + size > end {
                        break;
                    }
                    position += size;
                }
                Item::FixContainer(count) => {
                    position += 1;
                    if count > 0 {
                        items += count;
                        if items > MSGPACK_MAX_ITEMS {
                            return Err(too_many_items(items));
                        }
                        if stack.len() >= MSGPACK_MAX_DEPTH {
                            return Err(too_deep());
                        }
                        stack.push(count);
                        continue;
                    }
                }
                Item::Sized { width, extra } => {
                    if position + 1 + width > end {
                        break;
                    }
                    let length = big_endian(&buffer[position + 1..position + 1 + width]);
                    let size = (1 + width + extra).saturating_add(length);
                    let reach = (position - start).saturating_add(size);
                    if reach > limit {
                        return Err(FrameError::too_large(limit, reach, WHAT));
                    }
                    if position + size > end {
                        break;
                    }
                    position += size;
                }
                Item::Container { width, per } => {
                    if position + 1 + width > end {
                        break;
                    }
                    let count = big_endian(&buffer[position + 1..position + 1 + width]) * per;
                    position += 1 + width;
                    if count > 0 {
                        // Each item takes one byte at least: refuse a count that cannot fit.
                        let reach = position - start + count;
                        if reach > limit {
                            return Err(FrameError::too_large(limit, reach, WHAT));
                        }
                        items = items.saturating_add(count);
                        if items > MSGPACK_MAX_ITEMS {
                            return Err(too_many_items(items));
                        }
                        if stack.len() >= MSGPACK_MAX_DEPTH {
                            return Err(too_deep());
                        }
                        stack.push(count);
                        continue;
                    }
                }
                Item::Never => {
                    return Err(FrameError::Malformed(format!(
                        "malformed msgpack data: byte 0x{byte:02x}"
                    )));
                }
            }
            // An item ended: count it in its container, closing the containers it fills.
            loop {
                match stack.last_mut() {
                    Some(top) => {
                        *top -= 1;
                        if *top != 0 {
                            break;
                        }
                        stack.pop();
                    }
                    None => {
                        self.scanned = 0;
                        self.items = items; // (its count, for its Bound)
                        return Ok(Some(position)); // the top-level object ended
                    }
                }
            }
        }
        self.scanned = position - start;
        self.items = items;
        Ok(None)
    }
}

fn disagree() -> FrameError {
    FrameError::Malformed("malformed msgpack data: scanners disagree".into())
}
