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

// -- what a decoded object holds ---------------------------------------------------------
//
// The charge of a decoded msgpack object beyond its wire bytes and `PACKET_OVERHEAD`, per
// kind of item: an upper bound of what `msgpack.unpackb(packet, raw=False,
// strict_map_key=False)` allocates for it, measured with `tracemalloc` on CPython 3.11
// x86-64 and msgpack 1.1 (`bench/msgpack_charges.py` prints the measurements; the table
// and the method are in docs/reference/limits.rst).  `_framing.py` has the same table.
// Each item is charged its own object (0 for the shared ones: nil, booleans, fixints
// 0..127 and uint 8, the empty and one-byte str and bin) and its slot in the container
// holding it; the object itself is charged its variable part only (its own object is in
// `PACKET_OVERHEAD`).  No item is charged more than `PACKET_OVERHEAD` a wire byte of its
// header (a map's in a map: 64 + 32 + 64 = 160), so no prefix of a read of `n` bytes is
// charged more than `n * (1 + PACKET_OVERHEAD)`: the bound the budget's shortened reads
// rely on, for whole objects and for unfinished ones (charged as they arrive).

/// An `int` that is not a shared small int (negative fixint, int 8..64, uint 16..64): 28
/// to 36 bytes measured, allocator rounding included.
pub const CHARGE_INT: u64 = 48;
/// A `float` (float 32 or 64): 24 bytes measured.
pub const CHARGE_FLOAT: u64 = 32;
/// A `str` of 2 bytes or more: its object header (49 bytes for ASCII, 73 to 76 for the
/// wider kinds), beyond its wire bytes.  A str whose characters take more bytes decoded
/// than encoded is charged that too: CPython keeps 2 bytes a character when one is past
/// U+00FF, 4 when one is past U+FFFF (so an ASCII character, one byte on the wire, then
/// takes 2 or 4), found from its widest byte and its count of characters.
pub const CHARGE_STR: u64 = 80;
/// A `bytes` (bin) of 2 bytes or more: 33 bytes measured, beyond its wire bytes.
pub const CHARGE_BIN: u64 = 48;
/// An ext: an `ExtType` (a named tuple, its code and its `bytes`: 105 bytes measured
/// beyond its data) or a `Timestamp` (type -1: 48 to 80).
pub const CHARGE_EXT: u64 = 112;
/// A `list` (array): its object, 56 bytes measured; its slots are its items'.
pub const CHARGE_ARRAY: u64 = 64;
/// A `dict` (map): its object, 64 bytes measured; its table is its items'.
pub const CHARGE_MAP: u64 = 64;
/// Each item of an array: its slot in the list (8 bytes).
pub const CHARGE_ARRAY_SLOT: u64 = 8;
/// Each key and each value of a map: its share of the dict's table, 64 bytes, so 128 an
/// entry (measured: at most 60 an entry past 5 entries, 63 with a str key's place in the
/// interned strings).
pub const CHARGE_MAP_SLOT: u64 = 64;
/// A map of one entry or more, at its header: the rest of its first table (160 bytes
/// measured for 1 to 5 entries: 224 for a dict of one, its own 64 and its entry's 128
/// and this 32).
pub const CHARGE_MAP_TABLE: u64 = 32;

/// The own charge of a scalar item whose first byte says it all (ints, floats, exts;
/// 0 for the shared ones, and for a str or a bin: see [`scalar_charge`]), by first byte.
static OWN: [u8; 256] = own_by_byte();

const fn own_by_byte() -> [u8; 256] {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = match byte as u8 {
            0xe0..=0xff | 0xcd..=0xcf | 0xd0..=0xd3 => CHARGE_INT as u8,
            0xca | 0xcb => CHARGE_FLOAT as u8,
            0xc7..=0xc9 | 0xd4..=0xd8 => CHARGE_EXT as u8, // ext 8..32, fixext 1..16
            _ => 0,
        };
        byte += 1;
    }
    table
}

/// What decoding a scalar item (not an array or map) builds beyond its wire bytes and
/// its slot: `(fixed, variable)`, the variable part what a str's characters take decoded
/// beyond its bytes.  `byte` is its first byte, `body` its data (a str's, a bin's; empty
/// for the others).
#[inline]
fn scalar_charge(byte: u8, body: &[u8]) -> (u64, u64) {
    match byte {
        0xa0..=0xbf | 0xd9..=0xdb => str_charge(body),
        0xc4..=0xc6 if body.len() > 1 => (CHARGE_BIN, 0),
        _ => (u64::from(OWN[usize::from(byte)]), 0),
    }
}

/// A str of `body` (UTF-8): see [`CHARGE_STR`].
#[inline]
fn str_charge(body: &[u8]) -> (u64, u64) {
    if body.len() <= 1 {
        (0, 0) // "" and one ASCII character are shared objects
    } else if is_ascii(body) {
        (CHARGE_STR, 0) // one byte a character
    } else {
        (CHARGE_STR, wide_str_charge(body))
    }
}

/// Whether `bytes` are all ASCII: eight at a time (`<[u8]>::is_ascii` costs more on the
/// short strs of small objects, the framer's common case).
#[inline]
fn is_ascii(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    let mut any = 0u64;
    for word in &mut words {
        any |= u64::from_ne_bytes([
            word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
        ]);
    }
    let mut rest = 0u8;
    for &byte in words.remainder() {
        rest |= byte;
    }
    (any & 0x8080_8080_8080_8080) == 0 && rest < 0x80
}

/// What a str of `body`, not ASCII, takes decoded beyond its bytes.
fn wide_str_charge(body: &[u8]) -> u64 {
    // CPython keeps a str one, two or four bytes a character, by its widest character: a
    // lead byte from 0xf0 is one past U+FFFF, from 0xc4 one past U+00FF.
    let widest = body.iter().copied().max().unwrap_or(0);
    if widest < 0xc4 {
        return 0; // at most one byte a character: no more than its bytes
    }
    let width = if widest >= 0xf0 { 4 } else { 2 };
    // Its characters: the bytes that do not continue one (0x80..=0xbf).
    let characters = body.iter().filter(|&&byte| (byte as i8) >= -0x40).count();
    ((width * characters) as u64).saturating_sub(body.len() as u64)
}

/// An array's or map's of `count` items: `(own object, variable part at its header, each
/// item's slot)`.
#[inline]
fn container_charge(byte: u8, count: usize) -> (u64, u64, u64) {
    if matches!(byte, 0x80..=0x8f | 0xde | 0xdf) {
        let table = if count > 0 { CHARGE_MAP_TABLE } else { 0 };
        (CHARGE_MAP, table, CHARGE_MAP_SLOT)
    } else {
        (CHARGE_ARRAY, 0, CHARGE_ARRAY_SLOT)
    }
}

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

#[inline]
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

/// Append the charge of each whole object of `data[start..end]` to `charges`, in order
/// (what it holds decoded beyond its wire bytes and `PACKET_OVERHEAD`: the per-kind
/// charges above): the objects back to back, as the C skip found them (the Python
/// framer's, which calls this through `ioserver._native._msgpack_charges` for each
/// object's charge).  An object of more than [`MSGPACK_MAX_ITEMS`] items is refused as
/// [`check_items`] refuses it: at the first header that passes the cap, with the count
/// there.
///
/// An unfinished object ends the count (the bytes were not whole objects back to back:
/// the caller, which knows how many it framed, sees fewer charges).
///
/// Errors: [`FrameError::TooManyItems`].
pub(crate) fn whole_object_charges(
    data: &[u8],
    mut start: usize,
    end: usize,
    charges: &mut Vec<u64>,
) -> Result<(), FrameError> {
    let mut stack = Vec::new();
    while start < end {
        let Some(whole) = skip_one(data, start, end, &mut stack)? else {
            break;
        };
        if whole.items > MSGPACK_MAX_ITEMS {
            check_items(data, start, whole.end)?;
            return Err(too_many_items(whole.items)); // (check_items refused it already)
        }
        charges.push(whole.charge);
        start = whole.end;
    }
    Ok(())
}

pub(crate) fn too_deep() -> FrameError {
    FrameError::Malformed(format!(
        "malformed msgpack data: nested deeper than {MSGPACK_MAX_DEPTH} levels"
    ))
}

/// A whole object as [`skip_one`] found it.
struct Whole {
    /// Where it ends.
    end: usize,
    /// The most containers around any container of it, the one it opened included.
    deepest: usize,
    /// Itself and what its containers' headers announce, as [`MSGPACK_MAX_ITEMS`] counts.
    items: usize,
    /// What it holds decoded beyond its wire bytes and `PACKET_OVERHEAD` (the per-kind
    /// charges above).
    charge: u64,
}

/// One object as the C decoder skips it: `Ok(Some(whole))` if it is whole in
/// `data[start..end]`, `Ok(None)` if it is unfinished.
///
/// Errors as the C decoder's: a container opened inside [`C_STACK`] others (empty ones
/// too) is too deep, `0xc1` is `"malformed msgpack data: "` (msgpack's `FormatError` has
/// no text).
fn skip_one(
    data: &[u8],
    start: usize,
    end: usize,
    stack: &mut Vec<usize>,
) -> Result<Option<Whole>, FrameError> {
    stack.clear();
    let mut position = start;
    let mut deepest = 0;
    let mut items: usize = 1;
    // Each item its own object and slot; the object itself its variable part only.
    let mut charge: u64 = 0;
    while position < end {
        let at = position;
        let byte = data[position];
        let (count, (fixed, variable)) = match item(byte) {
            Item::Fixed(size) => {
                if position + size > end {
                    return Ok(None);
                }
                let own = if size > 2 && byte & 0xe0 == 0xa0 {
                    str_charge(&data[position + 1..position + size]) // a fixstr
                } else {
                    (u64::from(OWN[usize::from(byte)]), 0)
                };
                position += size;
                (None, own)
            }
            Item::FixContainer(count) => {
                position += 1;
                let (own, table, slot) = container_charge(byte, count);
                (Some(count), (own, table + slot * count as u64))
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
                let body = &data[position + 1 + width + extra..position + size];
                position += size;
                (None, scalar_charge(byte, body))
            }
            Item::Container { width, per } => {
                if position + 1 + width > end {
                    return Ok(None);
                }
                let count = big_endian(&data[position + 1..position + 1 + width]) * per;
                position += 1 + width;
                let (own, table, slot) = container_charge(byte, count);
                (Some(count), (own, table + slot * count as u64))
            }
            Item::Never => {
                return Err(FrameError::Malformed("malformed msgpack data: ".into()));
            }
        };
        // (At most 160 a byte of a whole object within `end`: no overflow.)
        charge += variable + if at == start { 0 } else { fixed };
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
                None => {
                    return Ok(Some(Whole {
                        end: position,
                        deepest,
                        items,
                        charge,
                    }))
                }
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
            Some(whole) => {
                bounds.push(Bound {
                    start,
                    end: whole.end,
                    deepest: Some(whole.deepest),
                    charge: whole.charge,
                });
                start = whole.end;
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
    /// What it holds decoded beyond its wire bytes and `PACKET_OVERHEAD`, charged by the
    /// scanner that found it (the same sum whichever did).
    charge: u64,
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
    /// The slot charge of each open array's or map's items, beside `stack`.
    slots: Vec<u64>,
    /// The charge of the walked object's items walked so far (each as it arrives: a
    /// container's header its own object, each item its slot); meaningful while `scanned`
    /// is not 0, and, once a walk finished an object, that object's charge (what the C
    /// skip charges it).
    charge: u64,
    /// Scratch: the C skip's stack, and a read's whole objects.
    skip_stack: Vec<usize>,
    bounds: Vec<Bound>,
    /// The charge of each object the last [`feed`](MsgpackFramer::feed) pushed, in order
    /// (what [`super::Framer::charges`] adds to each).
    object_charges: Vec<u64>,
}

impl MsgpackFramer {
    pub(crate) fn new(limit: usize) -> MsgpackFramer {
        MsgpackFramer {
            limit,
            buffer: Vec::new(),
            scanned: 0,
            stack: Vec::new(),
            items: 1,
            slots: Vec::new(),
            charge: 0,
            skip_stack: Vec::new(),
            bounds: Vec::new(),
            object_charges: Vec::new(),
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The charge of the unfinished object held, its items walked so far (0 when none is
    /// held): each item as it arrives, as the C skip will charge it once whole (each
    /// container's slots with its items, not at its header), so that no prefix of a read
    /// is charged more than `PACKET_OVERHEAD` a byte; once whole, its charge in
    /// [`object_charges`](MsgpackFramer::object_charges) replaces this.
    pub(crate) fn pending_charge(&self) -> u64 {
        if self.buffer.is_empty() {
            0
        } else {
            self.charge
        }
    }

    /// The charge of each object the last [`feed`](MsgpackFramer::feed) pushed, in order:
    /// what it holds decoded beyond its wire bytes and `PACKET_OVERHEAD`.
    pub(crate) fn object_charges(&self) -> &[u64] {
        &self.object_charges
    }

    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Packets) -> Result<(), FrameError> {
        self.object_charges.clear();
        let result = if self.buffer.is_empty() {
            self.feed_fresh(input, out)
        } else {
            self.feed_held(input, out)
        };
        if result.is_err() {
            // A failed framer holds nothing (and pushed nothing).
            self.object_charges.clear();
            self.buffer.clear();
            self.scanned = 0;
            self.stack.clear();
            self.slots.clear();
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
                    charge: self.charge,
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
                        Ok(Some(whole)) => whole.deepest,
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
            self.object_charges.push(bound.charge);
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
        let slots = &mut self.slots;
        let limit = self.limit;
        let mut items = if self.scanned == 0 { 1 } else { self.items };
        let mut charge = if self.scanned == 0 { 0 } else { self.charge };
        let mut position = start + self.scanned;
        while position < end {
            let byte = buffer[position];
            // Each item is charged as it arrives (a container at its header): its slot,
            // its own object (the object itself: its variable part only).
            let top = position == start;
            let slot = slots.last().copied().unwrap_or(0);
            match item(byte) {
                Item::Fixed(size) => {
                    if position + size > end {
                        break;
                    }
                    let (fixed, variable) =
                        scalar_charge(byte, &buffer[position + 1..position + size]);
                    charge += slot + variable + if top { 0 } else { fixed };
                    position += size;
                }
                Item::FixContainer(count) => {
                    position += 1;
                    let (own, table, each) = container_charge(byte, count);
                    charge += slot + table + if top { 0 } else { own };
                    if count > 0 {
                        items += count;
                        if items > MSGPACK_MAX_ITEMS {
                            return Err(too_many_items(items));
                        }
                        if stack.len() >= MSGPACK_MAX_DEPTH {
                            return Err(too_deep());
                        }
                        stack.push(count);
                        slots.push(each);
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
                    let body = &buffer[position + 1 + width + extra..position + size];
                    let (fixed, variable) = scalar_charge(byte, body);
                    charge += slot + variable + if top { 0 } else { fixed };
                    position += size;
                }
                Item::Container { width, per } => {
                    if position + 1 + width > end {
                        break;
                    }
                    let count = big_endian(&buffer[position + 1..position + 1 + width]) * per;
                    position += 1 + width;
                    let (own, table, each) = container_charge(byte, count);
                    charge += slot + table + if top { 0 } else { own };
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
                        slots.push(each);
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
                        slots.pop();
                    }
                    None => {
                        self.scanned = 0;
                        self.items = items; // (its count and charge, for its Bound)
                        self.charge = charge;
                        return Ok(Some(position)); // the top-level object ended
                    }
                }
            }
        }
        self.scanned = position - start;
        self.items = items;
        self.charge = charge;
        Ok(None)
    }
}

fn disagree() -> FrameError {
    FrameError::Malformed("malformed msgpack data: scanners disagree".into())
}
