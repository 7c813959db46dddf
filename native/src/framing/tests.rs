//! Unit tests of the framers: every mode's edges, and properties over random cuts.
//! (The differential tests against the Python framers are in
//! `tests/test_native_framing.py`.)

use super::msgpack::{MSGPACK_MAX_DEPTH, MSGPACK_MAX_ITEMS};
use super::resp::RESP_MAX_INLINE;
use super::*;
use proptest::prelude::*;

/// A packet, owned, for comparisons.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Owned {
    Bytes(Vec<u8>),
    Command(Vec<Vec<u8>>),
}

fn owned(packets: &Packets) -> Vec<Owned> {
    packets
        .iter()
        .map(|packet| match packet {
            Packet::Bytes(bytes) => Owned::Bytes(bytes.to_vec()),
            Packet::Command(command) => {
                Owned::Command(command.iter().map(<[u8]>::to_vec).collect())
            }
        })
        .collect()
}

fn bytes(items: &[&[u8]]) -> Vec<Owned> {
    items.iter().map(|b| Owned::Bytes(b.to_vec())).collect()
}

fn command(args: &[&[u8]]) -> Owned {
    Owned::Command(args.iter().map(|a| a.to_vec()).collect())
}

/// Feed `chunks` in order (stopping at an error); every packet, and the error.
fn feed_chunks(mode: Mode, limit: usize, chunks: &[&[u8]]) -> (Vec<Owned>, Option<FrameError>) {
    let mut framer = Framer::new(mode, limit).unwrap();
    let mut packets = Packets::new();
    for chunk in chunks {
        if let Err(error) = framer.feed(chunk, &mut packets) {
            assert_eq!(framer.buffered(), 0, "a failed framer holds nothing");
            return (owned(&packets), Some(error));
        }
    }
    (owned(&packets), None)
}

fn feed_all(mode: Mode, limit: usize, stream: &[u8]) -> (Vec<Owned>, Option<FrameError>) {
    feed_chunks(mode, limit, &[stream])
}

/// Split `stream` at every byte, and byte by byte: the same result as whole.
fn every_split(mode: Mode, limit: usize, stream: &[u8]) -> (Vec<Owned>, Option<FrameError>) {
    let whole = feed_all(mode, limit, stream);
    for cut in 0..=stream.len() {
        let (head, tail) = stream.split_at(cut);
        assert_eq!(
            feed_chunks(mode, limit, &[head, tail]),
            whole,
            "cut at {cut}"
        );
    }
    let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(feed_chunks(mode, limit, &bytewise), whole, "byte by byte");
    whole
}

fn too_large(limit: usize, size: usize, what: &'static str) -> Option<FrameError> {
    Some(FrameError::TooLarge { limit, size, what })
}

fn malformed(message: &str) -> Option<FrameError> {
    Some(FrameError::Malformed(message.into()))
}

// -- errors and options ------------------------------------------------------------------

#[test]
fn errors_read_as_python_s() {
    let error = FrameError::too_large(10, 11, "line");
    assert_eq!(error.to_string(), "line of 11 bytes exceeds packet_size=10");
    assert_eq!(error.errno_name(), "EMSGSIZE");
    let error = FrameError::Malformed("invalid bulk length".into());
    assert_eq!(error.to_string(), "invalid bulk length");
    assert_eq!(error.errno_name(), "EPROTO");
}

#[test]
fn bad_options_are_refused() {
    assert!(Framer::new(Mode::Length(3), 10).is_err());
    assert!(Framer::new(Mode::Length(0), 10).is_err());
    assert!(Framer::new(Mode::Raw, 0).is_err());
    assert!(Framer::new(Mode::Line(b'\n'), 1).is_ok());
}

// -- raw -----------------------------------------------------------------------------------

#[test]
fn raw_each_read_is_a_packet() {
    let (packets, error) = feed_chunks(Mode::Raw, 1, &[b"abc", b"", b"de"]);
    assert_eq!(packets, bytes(&[b"abc", b"de"]));
    assert_eq!(error, None);
    let framer = Framer::new(Mode::Raw, 1).unwrap();
    assert_eq!(framer.buffered(), 0);
    assert_eq!(framer.wants(), None);
}

// -- length prefixes ---------------------------------------------------------------------

#[test]
fn length_prefixes_at_every_split() {
    for header in [1u8, 2, 4] {
        let mut stream = Vec::new();
        for body in [&b"hello"[..], b"", b"x", b"world!"] {
            let len = (body.len() as u32).to_be_bytes();
            stream.extend_from_slice(&len[4 - usize::from(header)..]);
            stream.extend_from_slice(body);
        }
        let (packets, error) = every_split(Mode::Length(header), 100, &stream);
        assert_eq!(packets, bytes(&[b"hello", b"", b"x", b"world!"]));
        assert_eq!(error, None);
    }
}

#[test]
fn length_limit_exactly_at_and_one_past() {
    let (packets, error) = feed_all(Mode::Length(2), 5, b"\x00\x05abcde");
    assert_eq!((packets, error), (bytes(&[b"abcde"]), None));
    // One past: refused at the header, before the body comes; nothing of the read is
    // delivered (the Python framer raised before it returned them).
    let (packets, error) = feed_all(Mode::Length(2), 5, b"\x00\x01a\x00\x06");
    assert_eq!((packets, error), (vec![], too_large(5, 6, "packet")));
}

#[test]
fn length_header_range_caps_the_limit() {
    let mut framer = Framer::new(Mode::Length(1), 1 << 20).unwrap();
    let mut packets = Packets::new();
    let mut stream = vec![255u8];
    stream.extend(std::iter::repeat(b'x').take(255));
    framer.feed(&stream, &mut packets).unwrap();
    assert_eq!(packets.len(), 1);
    assert_eq!(
        framer.envelope(&[0; 256]),
        Err(FrameError::too_large(255, 256, "packet"))
    );
    assert_eq!(framer.envelope(&[0; 255]).unwrap().header(), &[255]);
    let framer = Framer::new(Mode::Length(4), 1 << 20).unwrap();
    assert_eq!(framer.envelope(&[0; 258]).unwrap().header(), &[0, 0, 1, 2]);
    assert!(framer.envelope(&[0; 258]).unwrap().trailer().is_empty());
}

#[test]
fn length_buffered_and_wants() {
    let mut framer = Framer::new(Mode::Length(4), 100).unwrap();
    let mut packets = Packets::new();
    assert_eq!(framer.wants(), Some(4));
    framer.feed(b"\x00\x00\x00", &mut packets).unwrap();
    assert_eq!((framer.buffered(), framer.wants()), (3, Some(1)));
    framer.feed(b"\x0aabc", &mut packets).unwrap();
    // The header is consumed once whole: the body's bytes are what is held.
    assert_eq!((framer.buffered(), framer.wants()), (3, Some(7)));
    framer.feed(b"defghij\x00", &mut packets).unwrap();
    assert_eq!(owned(&packets), bytes(&[b"abcdefghij"]));
    assert_eq!((framer.buffered(), framer.wants()), (1, Some(3)));
}

// -- lines ---------------------------------------------------------------------------------

#[test]
fn lines_at_every_split_keep_their_delimiter() {
    let (packets, error) = every_split(Mode::Line(b'\n'), 100, b"one\n\ntwo\nrest");
    assert_eq!(packets, bytes(&[b"one\n", b"\n", b"two\n"]));
    assert_eq!(error, None);
    let (packets, _) = every_split(Mode::Line(0), 100, b"a\0b\nc\0");
    assert_eq!(packets, bytes(&[b"a\0", b"b\nc\0"]));
}

#[test]
fn line_limit_exactly_at_and_one_past() {
    // The delimiter counts.
    let (packets, error) = every_split(Mode::Line(b'\n'), 4, b"abc\nabc\n");
    assert_eq!((packets, error), (bytes(&[b"abc\n", b"abc\n"]), None));
    let (packets, error) = feed_all(Mode::Line(b'\n'), 4, b"ab\nabcd\n");
    assert_eq!((packets, error), (vec![], too_large(4, 5, "line")));
    // An unfinished line is refused as soon as it passes the limit.
    let (packets, error) = feed_chunks(Mode::Line(b'\n'), 4, &[b"ab\nabcd", b"e"]);
    assert_eq!(
        (packets, error),
        (bytes(&[b"ab\n"]), too_large(4, 5, "line"))
    );
    let (_, error) = feed_chunks(Mode::Line(b'\n'), 4, &[b"abcd"]);
    assert_eq!(error, None);
}

#[test]
fn finish_delivers_an_unterminated_last_line_and_nothing_else() {
    // A line port's end of file: its unterminated rest is its last packet, once.
    let mut framer = Framer::new(Mode::Line(b'\n'), 100).unwrap();
    let mut out = Packets::default();
    framer.feed(b"a\nb", &mut out).unwrap();
    framer.finish(&mut out);
    assert_eq!(owned(&out), bytes(&[b"a\n", b"b"]));
    assert_eq!(framer.buffered(), 0);
    framer.finish(&mut out);
    assert_eq!(out.len(), 2);
    // Nothing when the stream ended with its delimiter.
    let mut framer = Framer::new(Mode::Line(b'\n'), 100).unwrap();
    let mut out = Packets::default();
    framer.feed(b"a\n", &mut out).unwrap();
    framer.finish(&mut out);
    assert_eq!(owned(&out), bytes(&[b"a\n"]));
    // A length-prefixed packet cut short makes no packet: its bytes stay held.
    let mut framer = Framer::new(Mode::Length(4), 100).unwrap();
    let mut out = Packets::default();
    framer.feed(b"\0\0\0\x05ab", &mut out).unwrap();
    framer.finish(&mut out);
    assert!(out.is_empty());
    assert_eq!(framer.buffered(), 2); // the body so far (its header was read)
}

#[test]
fn line_envelope_adds_a_missing_delimiter() {
    let framer = Framer::new(Mode::Line(b'\n'), 4).unwrap();
    assert_eq!(framer.envelope(b"abc").unwrap().trailer(), b"\n");
    assert!(framer.envelope(b"abc\n").unwrap().trailer().is_empty());
    assert_eq!(
        framer.envelope(b"abcd"),
        Err(FrameError::too_large(4, 5, "line"))
    );
    assert_eq!(framer.envelope(b"").unwrap().trailer(), b"\n");
}

// -- RESP ----------------------------------------------------------------------------------

#[test]
fn resp_arrays_and_inline_commands_at_every_split() {
    let stream = b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n*0\r\n*-1\r\nPING  a\tb\r\n\r\n \x0b\nSET k v\n";
    let (packets, error) = every_split(Mode::Resp, 1000, stream);
    assert_eq!(
        packets,
        vec![
            command(&[b"GET", b""]),
            command(&[b"PING", b"a", b"b"]),
            command(&[b"SET", b"k", b"v"]),
        ]
    );
    assert_eq!(error, None);
}

#[test]
fn resp_errors_are_delivered_after_the_commands_before_them() {
    let mut framer = Framer::new(Mode::Resp, 1000).unwrap();
    assert!(framer.delivers_errors());
    let mut packets = Packets::new();
    let error = framer.feed(b"PING\r\n*1\r\n:1\r\n", &mut packets);
    assert_eq!(
        error,
        Err(FrameError::Malformed("expected '$', got ':'".into()))
    );
    assert_eq!(owned(&packets), vec![command(&[b"PING"])]);
    // From then on: nothing held, every later byte ignored.
    assert_eq!(framer.buffered(), 0);
    assert_eq!(framer.feed(b"PING\r\n", &mut packets), Ok(()));
    assert_eq!(packets.len(), 1);
}

#[test]
fn resp_malformed_headers() {
    let cases: &[(&[u8], &str)] = &[
        (b"*abc\r\n", "invalid multibulk length"),
        (b"*1048577\r\n", "invalid multibulk length"),
        (b"*99999999\r\n", "invalid multibulk length"),
        (b"*12345678901234567890\r\n", "invalid multibulk length"),
        (b"*1\r\n$-1\r\n", "invalid bulk length"),
        (b"*1\r\n$1234567890123456789\r\n", "invalid bulk length"),
        (b"*1\r\n$3\r\nabcX\r\n", "bulk string not ended by CRLF"),
        (b"*1\r\nx", "expected '$', got 'x'"),
        (b"*1\r\n\xe9", "expected '$', got '\u{e9}'"),
    ];
    for (stream, message) in cases {
        let (_, error) = every_split(Mode::Resp, 1 << 20, stream);
        assert_eq!(error, malformed(message), "{stream:?}");
    }
    // A header line longer than 32 bytes without its CRLF.
    let mut long = b"*".to_vec();
    long.extend([b'1'; 32]);
    assert_eq!(feed_all(Mode::Resp, 1 << 20, &long[..32]).1, None);
    assert_eq!(
        feed_all(Mode::Resp, 1 << 20, &long).1,
        malformed("invalid multibulk length")
    );
    // 1,048,576 arguments are allowed (each needs 6 bytes: the packet size decides).
    assert_eq!(
        feed_all(Mode::Resp, 1 << 20, b"*1048576\r\n").1,
        too_large(1 << 20, 10 + 6 * 1048576, "command")
    );
    assert_eq!(feed_all(Mode::Resp, 1 << 30, b"*1048576\r\n").1, None);
}

#[test]
fn resp_limit_exactly_at_and_one_past() {
    // *1\r\n (4) + $3\r\n (4) + abc\r\n (5) = 13 bytes.
    let stream = b"*1\r\n$3\r\nabc\r\n";
    assert_eq!(
        feed_all(Mode::Resp, 13, stream),
        (vec![command(&[b"abc"])], None)
    );
    assert_eq!(
        feed_all(Mode::Resp, 12, stream),
        (vec![], too_large(12, 13, "command"))
    );
    // The count is checked against 6 bytes an argument first.
    assert_eq!(
        feed_all(Mode::Resp, 15, b"*2\r\n").1,
        too_large(15, 16, "command")
    );
    // Inline commands: min(packet_size, 64 KiB), newline included.
    let mut line = vec![b'x'; RESP_MAX_INLINE - 1];
    line.push(b'\n');
    assert_eq!(feed_all(Mode::Resp, 1 << 20, &line).1, None);
    line.insert(0, b'y');
    assert_eq!(
        feed_all(Mode::Resp, 1 << 20, &line).1,
        too_large(RESP_MAX_INLINE, RESP_MAX_INLINE + 1, "inline command")
    );
    assert_eq!(
        feed_all(Mode::Resp, 5, b"PING\n").0,
        vec![command(&[b"PING"])]
    );
    assert_eq!(
        feed_all(Mode::Resp, 5, b"PINGS").1,
        None,
        "unfinished, at the cap"
    );
    assert_eq!(
        feed_all(Mode::Resp, 5, b"PINGS\n").1,
        too_large(5, 6, "inline command")
    );
}

#[test]
fn resp_buffered_counts_what_the_command_consumed() {
    let mut framer = Framer::new(Mode::Resp, 1000).unwrap();
    let mut packets = Packets::new();
    framer.feed(b"*2\r\n$3\r\nab", &mut packets).unwrap();
    assert_eq!(framer.buffered(), 10);
    assert_eq!(framer.wants(), Some(3));
    framer.feed(b"c\r\n$1\r", &mut packets).unwrap();
    assert_eq!(framer.buffered(), 16);
    assert_eq!(framer.wants(), None);
    framer.feed(b"\nk\r\n", &mut packets).unwrap();
    assert_eq!(framer.buffered(), 0);
    // The Python framer's quirk, kept: an empty array's header stays counted until the
    // next array header.
    framer.feed(b"*0\r\n", &mut packets).unwrap();
    assert_eq!(framer.buffered(), 4);
}

// -- msgpack -------------------------------------------------------------------------------

fn nested(depth: usize, innermost: &[u8]) -> Vec<u8> {
    let mut data = vec![0x91; depth];
    data.extend_from_slice(innermost);
    data
}

#[test]
fn msgpack_objects_at_every_split() {
    let objects: &[&[u8]] = &[
        b"\x01",
        b"\x92\x01\xa3abc",
        b"\x82\xa1a\x90\xa1b\x80",
        b"\xc4\x03xyz",
        b"\xc7\x02\x05ab",
        b"\xd8\x01abcdefghijklmnop",
        b"\xdc\x00\x02\xcb\x00\x00\x00\x00\x00\x00\x00\x00\xc0",
        b"\xdf\x00\x00\x00\x01\xc3\xc2",
        b"\xdb\x00\x00\x00\x01z",
    ];
    let stream: Vec<u8> = objects.concat();
    let (packets, error) = every_split(Mode::Msgpack, 1000, &stream);
    assert_eq!(packets, bytes(objects));
    assert_eq!(error, None);
}

#[test]
fn msgpack_depth_exactly_at_and_one_past() {
    let at = nested(MSGPACK_MAX_DEPTH, b"\x01");
    let (packets, error) = every_split(Mode::Msgpack, 1 << 20, &at);
    assert_eq!((packets.len(), error), (1, None));
    let past = nested(MSGPACK_MAX_DEPTH + 1, b"\x01");
    let deep = malformed("malformed msgpack data: nested deeper than 512 levels");
    assert_eq!(every_split(Mode::Msgpack, 1 << 20, &past).1, deep);
    // Past the C decoder's own stack, whole or not.
    assert_eq!(feed_all(Mode::Msgpack, 1 << 20, &nested(1030, b"")).1, deep);
    assert_eq!(
        feed_all(Mode::Msgpack, 1 << 20, &nested(1025, b"\x01")).1,
        deep
    );
}

#[test]
fn msgpack_empty_container_counts_as_a_level_once_whole_as_in_python() {
    // The C decoder's rule counts an empty array at level 513; the walk of an unfinished
    // object does not, but the whole object is checked by the C rule, however it came.
    let data = nested(MSGPACK_MAX_DEPTH, b"\x90");
    let deep = malformed("malformed msgpack data: nested deeper than 512 levels");
    assert_eq!(every_split(Mode::Msgpack, 1 << 20, &data).1, deep);
    let (head, _) = data.split_at(data.len() - 1);
    assert_eq!(feed_all(Mode::Msgpack, 1 << 20, head).1, None);
}

#[test]
fn msgpack_byte_c1_is_refused() {
    // The C decoder's FormatError has no text; the walk names the byte.
    assert_eq!(
        feed_all(Mode::Msgpack, 100, b"\x92\x01\xc1").1,
        malformed("malformed msgpack data: ")
    );
    assert_eq!(
        feed_chunks(Mode::Msgpack, 100, &[b"\x92", b"\x01\xc1"]).1,
        malformed("malformed msgpack data: byte 0xc1")
    );
}

#[test]
fn msgpack_limit_exactly_at_and_one_past() {
    // bin 8 of 3 bytes: 5 bytes in all.
    assert_eq!(feed_all(Mode::Msgpack, 5, b"\xc4\x03abc").1, None);
    assert_eq!(
        every_split(Mode::Msgpack, 4, b"\xc4\x03abc").1,
        too_large(4, 5, "msgpack object")
    );
    // A count that cannot fit: refused at its header (array 16 of 100 items).
    assert_eq!(
        feed_all(Mode::Msgpack, 50, b"\xdc\x00\x64").1,
        too_large(50, 103, "msgpack object")
    );
    // An unfinished object as large as the limit is held; one byte more is refused.
    assert_eq!(feed_all(Mode::Msgpack, 4, b"\x94\x01\x02\x03").1, None);
    assert_eq!(
        feed_chunks(Mode::Msgpack, 4, &[b"\x95\x01\x02\x03", b"\x04"]).1,
        too_large(4, 5, "msgpack object")
    );
    // A whole object in one read is named by its whole size.
    let mut array = b"\xdc\x00\x64".to_vec();
    array.extend([0xcc, 0x80].repeat(100));
    assert_eq!(
        feed_all(Mode::Msgpack, 150, &array).1,
        too_large(150, 203, "msgpack object")
    );
    // In pieces, the same object is named by its size once whole, or by its count's
    // reach when the header alone is too large (as in Python: which depends on the cut).
    assert_eq!(
        feed_chunks(Mode::Msgpack, 150, &[&array[..2], &array[2..]]).1,
        too_large(150, 203, "msgpack object")
    );
    assert_eq!(
        feed_chunks(Mode::Msgpack, 100, &[&array[..2], &array[2..]]).1,
        too_large(100, 103, "msgpack object")
    );
    assert_eq!(
        feed_all(Mode::Msgpack, 100, &array).1,
        too_large(100, 203, "msgpack object")
    );
}

fn too_many_items(size: usize) -> Option<FrameError> {
    Some(FrameError::TooManyItems {
        limit: MSGPACK_MAX_ITEMS,
        size,
        what: "msgpack object",
    })
}

/// An array 32 header announcing `count` items.
fn array32(count: usize) -> Vec<u8> {
    let mut data = vec![0xdd];
    data.extend_from_slice(&u32::try_from(count).unwrap().to_be_bytes());
    data
}

#[test]
fn msgpack_items_error_reads_as_python_s() {
    let error = too_many_items(MSGPACK_MAX_ITEMS + 1).unwrap();
    assert_eq!(
        error.to_string(),
        "msgpack object of 1048577 items exceeds MSGPACK_MAX_ITEMS=1048576"
    );
    assert_eq!(error.errno_name(), "EMSGSIZE");
}

#[test]
fn msgpack_items_header_past_the_cap_is_refused_at_the_header() {
    // The object itself and MSGPACK_MAX_ITEMS elements: one item too many, announced by
    // five bytes; no element has come.
    let header = array32(MSGPACK_MAX_ITEMS);
    let limit = 64 << 20;
    assert_eq!(
        feed_all(Mode::Msgpack, limit, &header).1,
        too_many_items(MSGPACK_MAX_ITEMS + 1)
    );
    // A map's count is doubled (a key and a value each): 2^19 elements pass, 2^19 pairs
    // do not; [{2^19 - 1 pairs}] is exactly at the cap.
    let half = u32::try_from(MSGPACK_MAX_ITEMS / 2).unwrap();
    assert_eq!(
        feed_all(Mode::Msgpack, limit, &array32(MSGPACK_MAX_ITEMS / 2)).1,
        None
    );
    let mut map = vec![0xdf];
    map.extend_from_slice(&half.to_be_bytes());
    assert_eq!(
        feed_all(Mode::Msgpack, limit, &map).1,
        too_many_items(MSGPACK_MAX_ITEMS + 1)
    );
    let mut inside = vec![0x91, 0xdf];
    inside.extend_from_slice(&(half - 1).to_be_bytes());
    assert_eq!(feed_all(Mode::Msgpack, limit, &inside).1, None);
    // A header that is too large in bytes too is named by its bytes (checked first).
    assert_eq!(
        feed_all(Mode::Msgpack, 1000, &header).1,
        too_large(1000, 5 + MSGPACK_MAX_ITEMS, "msgpack object")
    );
}

#[test]
fn msgpack_items_exactly_at_the_cap_are_framed_and_one_past_refused() {
    let limit = 64 << 20;
    // The array and MSGPACK_MAX_ITEMS - 1 nils: whole in one read, and in pieces.
    let mut at = array32(MSGPACK_MAX_ITEMS - 1);
    at.resize(at.len() + MSGPACK_MAX_ITEMS - 1, 0xc0);
    let (packets, error) = feed_all(Mode::Msgpack, limit, &at);
    assert_eq!((packets.len(), error), (1, None));
    let pieces: Vec<&[u8]> = at.chunks(65536).collect();
    let (packets, error) = feed_chunks(Mode::Msgpack, limit, &pieces);
    assert_eq!((packets, error), (bytes(&[&at]), None));
    // [[nil] * (cap - 3), [nil]]: the cap is reached before the last fixarray, whose
    // header passes it, whole or in pieces.
    let mut past = vec![0x92];
    past.extend_from_slice(&array32(MSGPACK_MAX_ITEMS - 3));
    past.resize(past.len() + MSGPACK_MAX_ITEMS - 3, 0xc0);
    past.extend_from_slice(b"\x91\xc0");
    assert_eq!(
        feed_all(Mode::Msgpack, limit, &past).1,
        too_many_items(MSGPACK_MAX_ITEMS + 1)
    );
    let pieces: Vec<&[u8]> = past.chunks(65536).collect();
    assert_eq!(
        feed_chunks(Mode::Msgpack, limit, &pieces).1,
        too_many_items(MSGPACK_MAX_ITEMS + 1)
    );
}

#[test]
fn msgpack_items_are_counted_per_object_not_per_container() {
    // 2^12 arrays of 2^8 nils: every container small, 1 + 2^12 + 2^20 items in all.
    let limit = 64 << 20;
    let mut data = vec![0xdc, 0x10, 0x00];
    for _ in 0..4096 {
        data.extend_from_slice(&[0xdc, 0x01, 0x00]);
        data.resize(data.len() + 256, 0xc0);
    }
    // Refused at the inner header that passes the cap: the object, the outer array's
    // 4096, then 256 per inner array.
    let first_past = 1 + 4096 + 256 * ((MSGPACK_MAX_ITEMS - 4096 - 1) / 256 + 1);
    let expected = too_many_items(first_past);
    assert_eq!(feed_all(Mode::Msgpack, limit, &data).1, expected);
    let pieces: Vec<&[u8]> = data.chunks(4096).collect();
    assert_eq!(feed_chunks(Mode::Msgpack, limit, &pieces).1, expected);
    // A cut inside the last header counted is held, the count kept across reads.
    let cut = 3 + (first_past - 1 - 4096) / 256 * 259 - 259 + 1;
    assert_eq!(
        feed_chunks(Mode::Msgpack, limit, &[&data[..cut], &data[cut..]]).1,
        expected
    );
    // Objects under the cap each, many of them: no count carries from one to the next.
    let mut small = vec![0xdc, 0x01, 0x00];
    small.resize(small.len() + 256, 0xc0);
    let stream = small.repeat(8192);
    let pieces: Vec<&[u8]> = stream.chunks(1000).collect();
    let (packets, error) = feed_chunks(Mode::Msgpack, limit, &pieces);
    assert_eq!((packets.len(), error), (8192, None));
}

#[test]
fn msgpack_buffered_is_the_unfinished_object_s_bytes() {
    let mut framer = Framer::new(Mode::Msgpack, 100).unwrap();
    let mut packets = Packets::new();
    framer.feed(b"\x01\x93\x01", &mut packets).unwrap();
    assert_eq!((packets.len(), framer.buffered()), (1, 2));
    framer.feed(b"\x02\x03\x04", &mut packets).unwrap();
    assert_eq!(
        owned(&packets),
        bytes(&[b"\x01", b"\x93\x01\x02\x03", b"\x04"])
    );
    assert_eq!(framer.buffered(), 0);
    assert_eq!(framer.wants(), None);
}

#[test]
fn a_failed_feed_delivers_nothing_of_its_read() {
    let mut framer = Framer::new(Mode::Msgpack, 100).unwrap();
    let mut packets = Packets::new();
    packets.push_bytes(b"earlier");
    assert!(framer.feed(b"\x01\x02\xc1", &mut packets).is_err());
    assert_eq!(owned(&packets), bytes(&[b"earlier"]));
}

// -- charges and packets -------------------------------------------------------------------

#[test]
fn charges_as_the_python_io_thread_computes_them() {
    let mut packets = Packets::new();
    let mut framer = Framer::new(Mode::Line(b'\n'), 100).unwrap();
    framer.feed(b"a\nbcd\ne", &mut packets).unwrap();
    let mut charges = Vec::new();
    framer.charges(&packets, 0, false, 6, PACKET_OVERHEAD as u64, &mut charges);
    assert_eq!(charges, vec![2 + 160, 4 + 160]);
    // Decoded objects share the consumed wire bytes, the remainder on the last.
    let mut framer = Framer::new(Mode::Msgpack, 100).unwrap();
    packets.clear();
    framer.feed(b"\x01\x02\xa2ab", &mut packets).unwrap();
    charges.clear();
    framer.charges(&packets, 0, false, 5, 0, &mut charges);
    assert_eq!(charges, vec![1, 1, 3]);
    let mut own = Packets::new();
    // For a port of this process, each item of an object is charged its own object and
    // its slot, the object itself its variable part only (`[1, []]`: the slot of `1`, an
    // empty list and its slot; `1`: nothing), by the C skip and by the walk alike.
    for cuts in [&[][..], &[2][..]] {
        let mut framer = Framer::new(Mode::Msgpack, 100).unwrap();
        let stream = b"\x92\x01\x90\x01";
        let mut charges = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([stream.len()].iter()) {
            own.clear();
            let before = framer.buffered();
            framer.feed(&stream[start..end], &mut own).unwrap();
            let consumed = end - start + before - framer.buffered();
            framer.charges(&own, 0, false, consumed, 160, &mut charges);
            start = end;
        }
        let more = 2 * msgpack::CHARGE_ARRAY_SLOT + msgpack::CHARGE_ARRAY;
        assert_eq!(charges, vec![2 + 160 + more, 2 + 160], "cuts {cuts:?}");
    }
    // A RESP command, each argument.
    let mut framer = Framer::new(Mode::Resp, 100).unwrap();
    own.clear();
    framer
        .feed(b"*2\r\n$1\r\na\r\n$0\r\n\r\n", &mut own)
        .unwrap();
    let mut resp_charges = Vec::new();
    framer.charges(&own, 0, false, 17, 160, &mut resp_charges);
    assert_eq!(
        resp_charges,
        vec![17 + 160 + 2 * RESP_ARGUMENT_CHARGE as u64]
    );
    // A RESP error is one more message; the packets from `first` only.
    let framer = Framer::new(Mode::Resp, 100).unwrap();
    charges.clear();
    framer.charges(&packets, 1, true, 11, 10, &mut charges);
    assert_eq!(charges, vec![13, 13, 15]);
    // Raw: each read its length, no overhead.
    let framer = Framer::new(Mode::Raw, 100).unwrap();
    charges.clear();
    framer.charges(&packets, 0, false, 5, 160, &mut charges);
    assert_eq!(charges, vec![1, 1, 3]);
    charges.clear();
    framer.charges(&Packets::new(), 0, false, 0, 160, &mut charges);
    assert!(charges.is_empty());
}

#[test]
fn packets_arena_get_iter_truncate_push() {
    let mut packets = Packets::new();
    packets.push_bytes(b"ab");
    packets.push_command([&b"GET"[..], b"k"]);
    packets.push_bytes(b"");
    packets.push_command([&b"PING"[..]]);
    assert_eq!(packets.len(), 4);
    let Some(Packet::Command(get)) = packets.get(1) else {
        panic!("not a command")
    };
    assert_eq!(
        (get.len(), get.get(1), get.get(2)),
        (2, Some(&b"k"[..]), None)
    );
    assert_eq!(
        packets
            .get(3)
            .map(|p| matches!(p, Packet::Command(c) if c.get(0) == Some(b"PING"))),
        Some(true)
    );
    let mut copy = Packets::new();
    for packet in packets.iter() {
        copy.push(packet);
    }
    assert_eq!(owned(&copy), owned(&packets));
    packets.truncate(2);
    assert_eq!(
        owned(&packets),
        vec![Owned::Bytes(b"ab".to_vec()), command(&[b"GET", b"k"])]
    );
    packets.push_command([&b"X"[..]]);
    assert_eq!(owned(&packets)[2], command(&[b"X"]));
    packets.truncate(0);
    assert!(packets.is_empty());
    assert_eq!(packets.get(0), None);
}

// -- properties ----------------------------------------------------------------------------

/// A random msgpack object's wire bytes (any type, nested up to a few levels).
fn msgpack_object() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        any::<u8>().prop_filter_map("a one-byte item", |b| match b {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => Some(vec![b]),
            _ => None,
        }),
        (0usize..40).prop_map(|n| {
            let mut v = vec![0xc4, n as u8];
            v.extend(std::iter::repeat(b'b').take(n));
            v
        }),
        (0usize..300).prop_map(|n| {
            let mut v = vec![0xda, (n >> 8) as u8, n as u8];
            v.extend(std::iter::repeat(b's').take(n));
            v
        }),
        Just(b"\xcb\x40\x09\x21\xfb\x54\x44\x2d\x18".to_vec()),
        Just(b"\xd7\xff\x00\x00\x00\x00\x00\x00\x00\x01".to_vec()),
        Just(b"\xc9\x00\x00\x00\x02\x07ab".to_vec()),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|items| {
                let mut v = vec![0x90 | items.len() as u8];
                v.extend(items.concat());
                v
            }),
            prop::collection::vec(inner.clone(), 0..6).prop_map(|items| {
                let mut v = vec![0xdc, 0, items.len() as u8];
                v.extend(items.concat());
                v
            }),
            prop::collection::vec((inner.clone(), inner), 0..4).prop_map(|pairs| {
                let mut v = vec![0x80 | pairs.len() as u8];
                for (key, value) in pairs {
                    v.extend(key);
                    v.extend(value);
                }
                v
            }),
        ]
    })
}

fn split_at_points(stream: &[u8], points: &[usize]) -> Vec<Vec<u8>> {
    let mut cuts: Vec<usize> = points.iter().map(|p| p % (stream.len() + 1)).collect();
    cuts.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for cut in cuts {
        chunks.push(stream[start..cut].to_vec());
        start = cut;
    }
    chunks.push(stream[start..].to_vec());
    chunks
}

proptest! {
    /// Any stream of whole msgpack objects, cut anywhere, frames into exactly its objects.
    #[test]
    fn msgpack_objects_survive_any_cuts(
        objects in prop::collection::vec(msgpack_object(), 0..8),
        points in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let stream = objects.concat();
        let chunks = split_at_points(&stream, &points);
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let (packets, error) = feed_chunks(Mode::Msgpack, 1 << 20, &chunks);
        prop_assert_eq!(error, None);
        let expected: Vec<Owned> = objects.into_iter().map(Owned::Bytes).collect();
        prop_assert_eq!(packets, expected);
    }

    /// Any bytes, cut anywhere: the packets delivered before an error (or all of them)
    /// are the stream's whole objects from its start, never more than were sent, and a
    /// framer never holds more than the limit.
    #[test]
    fn msgpack_never_holds_more_than_the_limit(
        stream in prop::collection::vec(any::<u8>(), 0..200),
        points in prop::collection::vec(any::<usize>(), 0..8),
        limit in 1usize..64,
    ) {
        let mut framer = Framer::new(Mode::Msgpack, limit).unwrap();
        let mut packets = Packets::new();
        for chunk in split_at_points(&stream, &points) {
            if framer.feed(&chunk, &mut packets).is_err() {
                break;
            }
            prop_assert!(framer.buffered() <= limit);
        }
        let delivered: Vec<u8> = packets.iter().flat_map(|p| match p {
            Packet::Bytes(b) => b.to_vec(),
            Packet::Command(_) => unreachable!(),
        }).collect();
        prop_assert!(stream.starts_with(&delivered));
        for packet in packets.iter() {
            if let Packet::Bytes(b) = packet {
                prop_assert!(b.len() <= limit);
            }
        }
    }

    /// Any bytes, cut anywhere, in any mode: no panic, and a framer never holds more than
    /// one packet's limit (and a header) of input.
    #[test]
    fn any_bytes_in_any_mode(
        stream in prop::collection::vec(
            prop_oneof![any::<u8>(), Just(b'\n'), Just(b'\r'), Just(b'*'), Just(b'$'), Just(b'1')],
            0..300,
        ),
        points in prop::collection::vec(any::<usize>(), 0..8),
        limit in 1usize..100,
        mode in prop_oneof![
            Just(Mode::Raw), Just(Mode::Length(1)), Just(Mode::Length(2)), Just(Mode::Length(4)),
            Just(Mode::Line(b'\n')), Just(Mode::Resp), Just(Mode::Msgpack),
        ],
    ) {
        let mut framer = Framer::new(mode, limit).unwrap();
        let mut packets = Packets::new();
        for chunk in split_at_points(&stream, &points) {
            let failed = framer.feed(&chunk, &mut packets).is_err();
            if mode == Mode::Resp {
                // The command's consumed headers count too: within a limit and a header.
                prop_assert!(framer.buffered() <= limit.max(64) + 64);
            } else {
                prop_assert!(framer.buffered() <= limit + 4);
            }
            let _ = framer.wants();
            if failed && !framer.delivers_errors() {
                break;
            }
        }
    }

    /// Length-prefixed bodies and RESP commands, cut anywhere, come out whole and in order.
    #[test]
    fn length_and_resp_packets_survive_any_cuts(
        bodies in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..50), 0..8),
        points in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut stream = Vec::new();
        let mut commands = Vec::new();
        for body in &bodies {
            stream.extend((body.len() as u16).to_be_bytes());
            stream.extend(body);
            commands.extend(format!("*2\r\n$3\r\nSET\r\n${}\r\n", body.len()).into_bytes());
            commands.extend(body);
            commands.extend(b"\r\n");
        }
        let chunks = split_at_points(&stream, &points);
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let (packets, error) = feed_chunks(Mode::Length(2), 100, &chunks);
        prop_assert_eq!(error, None);
        prop_assert_eq!(packets, bodies.iter().map(|b| Owned::Bytes(b.clone())).collect::<Vec<_>>());
        let chunks = split_at_points(&commands, &points);
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let (packets, error) = feed_chunks(Mode::Resp, 1000, &chunks);
        prop_assert_eq!(error, None);
        let expected: Vec<Owned> = bodies
            .iter()
            .map(|b| Owned::Command(vec![b"SET".to_vec(), b.clone()]))
            .collect();
        prop_assert_eq!(packets, expected);
    }
}

/// `msgpack::whole_object_charges` (the Python framer's charges, `_native._msgpack_charges`):
/// each whole object's charge in order, up to an unfinished one, and the cap refused at
/// the first header past it, with the count there.
#[test]
fn whole_object_charges_count_as_python_s() {
    use super::msgpack::*;
    // [1, "abc", {"a": 1}], an empty map, a str of 2 whose bytes look like an array header,
    // then an unfinished fixarray of 2 (one item).
    let mut stream = vec![0x93, 0x01, 0xa3, b'a', b'b', b'c', 0x81, 0xa1, b'a', 0x01];
    stream.extend([0x80, 0xa2, 0x92, 0x92, 0x92, 0x01]);
    let mut charges = Vec::new();
    assert_eq!(
        whole_object_charges(&stream, 0, stream.len(), &mut charges),
        Ok(())
    );
    // The list's three slots, "abc", the dict and its key and value ("a" and 1 shared).
    let first =
        3 * CHARGE_ARRAY_SLOT + CHARGE_STR + CHARGE_MAP + CHARGE_MAP_TABLE + 2 * CHARGE_MAP_SLOT;
    assert_eq!(charges, vec![first, 0, 0]);
    let mut past = array32(MSGPACK_MAX_ITEMS - 1);
    past.extend(vec![0xc0; MSGPACK_MAX_ITEMS - 3]);
    past.extend([0x91, 0xc0, 0x92, 0xc0, 0xc0]);
    let mut charges = Vec::new();
    assert_eq!(
        whole_object_charges(&past, 0, past.len(), &mut charges).err(),
        too_many_items(MSGPACK_MAX_ITEMS + 1)
    );
}

/// The charge of one object, as a read of it whole charges it (`None`: not one whole
/// object).
fn object_charge(object: &[u8]) -> Option<u64> {
    let mut charges = Vec::new();
    msgpack::whole_object_charges(object, 0, object.len(), &mut charges).ok()?;
    (charges.len() == 1).then(|| charges[0])
}

/// Each kind of item is charged its own (see docs/reference/limits.rst for the table and
/// its measurement), in an array (its slot: 8) and in a map (96 a key or value).
#[test]
fn msgpack_items_are_charged_by_kind() {
    use super::msgpack::*;
    let str_of = |body: &[u8]| {
        let mut item = vec![0xd9, body.len() as u8];
        item.extend_from_slice(body);
        item
    };
    let astral = "\u{1F600}".as_bytes();
    let kinds: Vec<(Vec<u8>, u64)> = vec![
        (vec![0xc0], 0),                // nil
        (vec![0xc3], 0),                // true
        (vec![0x05], 0),                // fixint
        (vec![0xcc, 0xff], 0),          // uint 8 (a shared small int)
        (vec![0xff], CHARGE_INT),       // -1 (negative fixint: -32..-6 are not shared)
        (vec![0xd0, 0x80], CHARGE_INT), // int 8
        (vec![0xcf; 9], CHARGE_INT),    // uint 64
        (vec![0xca, 0, 0, 0, 0], CHARGE_FLOAT),
        (vec![0xcb; 9], CHARGE_FLOAT),
        (vec![0xa0], 0),       // ""
        (vec![0xa1, b'a'], 0), // "a"
        (vec![0xa2, b'a', b'b'], CHARGE_STR),
        (str_of("é€".as_bytes()), CHARGE_STR), // 2 bytes a character, 5 on the wire
        (str_of("aĀ".as_bytes()), CHARGE_STR + 1), // past U+00FF: 2 bytes a character
        (str_of("a\u{1F600}".as_bytes()), CHARGE_STR + 3), // past U+FFFF: 4 a character
        (str_of(astral), CHARGE_STR),          // 4 bytes, as on the wire
        (str_of(&[b'a'; 200]), CHARGE_STR),
        (vec![0xc4, 0], 0), // b""
        (vec![0xc4, 2, 1, 2], CHARGE_BIN),
        (vec![0xd4, 1, 0], CHARGE_EXT),             // fixext 1
        (vec![0xd6, 0xff, 0, 0, 0, 1], CHARGE_EXT), // a timestamp
        (vec![0xc7, 0, 5], CHARGE_EXT),             // ext 8, empty
        (vec![0x90], CHARGE_ARRAY),
        (vec![0x92, 0xc0, 0xc0], CHARGE_ARRAY + 2 * CHARGE_ARRAY_SLOT),
        (vec![0x80], CHARGE_MAP),
        (
            vec![0x81, 0x01, 0xc0],
            CHARGE_MAP + CHARGE_MAP_TABLE + 2 * CHARGE_MAP_SLOT,
        ),
        (vec![0xdc, 0, 1, 0xc0], CHARGE_ARRAY + CHARGE_ARRAY_SLOT),
        (
            vec![0xde, 0, 1, 0xc0, 0xc0],
            CHARGE_MAP + CHARGE_MAP_TABLE + 2 * CHARGE_MAP_SLOT,
        ),
    ];
    for (item, own) in &kinds {
        let mut in_array = vec![0x91];
        in_array.extend(item);
        assert_eq!(
            object_charge(&in_array),
            Some(CHARGE_ARRAY_SLOT + own),
            "{item:x?} in an array"
        );
        let mut in_map = vec![0x81, 0xc0];
        in_map.extend(item);
        assert_eq!(
            object_charge(&in_map),
            Some(CHARGE_MAP_TABLE + 2 * CHARGE_MAP_SLOT + own),
            "{item:x?} in a map"
        );
        // No scalar is charged more than PACKET_OVERHEAD a wire byte of it, its slot in a
        // map included (a container at its header: see the property test below).
        if item[0] & 0xe0 != 0x80 && !(0xdc..=0xdf).contains(&item[0]) {
            assert!(
                own + CHARGE_MAP_SLOT <= PACKET_OVERHEAD as u64 * item.len() as u64,
                "{item:x?}"
            );
        }
    }
    // The object itself: its variable part only (a wide str's characters, a container's
    // slots); its own object is in PACKET_OVERHEAD.
    assert_eq!(
        object_charge(&str_of("ab\u{1F600}".as_bytes())),
        Some(12 - 6)
    );
    assert_eq!(object_charge(&str_of(&[b'a'; 100])), Some(0));
    assert_eq!(object_charge(&[0xa2, b'a', b'b']), Some(0));
    assert_eq!(object_charge(&[0xff]), Some(0));
    assert_eq!(
        object_charge(&[0x92, 0x90, 0x90]),
        Some(2 * (CHARGE_ARRAY + 8))
    );
    assert_eq!(
        object_charge(&[0x81, 0x01, 0x01]),
        Some(CHARGE_MAP_TABLE + 2 * CHARGE_MAP_SLOT)
    );
    assert_eq!(object_charge(&[0x80]), Some(0));
}

/// Msgpack objects of every kind of item, nested (wide strs and maps too).
fn msgpack_object_of_every_kind() -> impl Strategy<Value = Vec<u8>> {
    let scalar = prop_oneof![
        Just(vec![0xc0]),
        any::<u8>().prop_map(|b| vec![b & 0x7f]),
        Just(vec![0xf0]),
        Just(vec![0xd1, 1, 2]),
        Just(vec![0xcb, 0, 0, 0, 0, 0, 0, 0, 0]),
        "[a-z\u{e9}\u{20ac}\u{1F600}]{0,40}".prop_map(|text| {
            let mut item = vec![0xd9, text.len() as u8];
            item.extend(text.as_bytes());
            item
        }),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|data| {
            let mut item = vec![0xc4, data.len() as u8];
            item.extend(data);
            item
        }),
        Just(vec![0xd5, 3, 1, 2]),
    ];
    scalar.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(|items| {
                let mut object = vec![0x90 | items.len() as u8];
                object.extend(items.concat());
                object
            }),
            proptest::collection::vec(inner.clone(), 0..8).prop_map(|items| {
                let mut object = vec![0xdc, 0, items.len() as u8];
                object.extend(items.concat());
                object
            }),
            proptest::collection::vec((inner.clone(), inner), 0..6).prop_map(|entries| {
                let mut object = vec![0x80 | entries.len() as u8];
                for (key, value) in entries {
                    object.extend(key);
                    object.extend(value);
                }
                object
            }),
        ]
    })
}

proptest! {
    /// An object is charged the same whether the C skip finds it in one read or the walk
    /// finishes it over several, at every split; and it is charged at most
    /// PACKET_OVERHEAD a wire byte, whole and while it arrives.
    #[test]
    fn msgpack_charge_is_the_same_at_every_split(object in msgpack_object_of_every_kind(), cut in 0usize..400) {
        let whole = object_charge(&object).expect("one whole object");
        prop_assert!(whole <= PACKET_OVERHEAD as u64 * object.len() as u64);
        let cut = cut % (object.len() + 1);
        for cuts in [vec![cut], (1..object.len()).collect::<Vec<_>>()] {
            let mut framer = Framer::new(Mode::Msgpack, 1 << 20).unwrap();
            let mut packets = Packets::new();
            let mut charges = Vec::new();
            let mut start = 0;
            for end in cuts.into_iter().chain([object.len()]) {
                let end = end.max(start);
                let before = framer.buffered();
                let first = packets.len();
                framer.feed(&object[start..end], &mut packets).unwrap();
                // Unfinished, it is charged as its items arrive: never more than the
                // whole object, nor than PACKET_OVERHEAD a byte held.
                let pending = framer.pending_charge(160);
                prop_assert!(pending <= whole);
                prop_assert!(pending <= PACKET_OVERHEAD as u64 * framer.buffered() as u64);
                let consumed = end - start + before - framer.buffered();
                framer.charges(&packets, first, false, consumed, 160, &mut charges);
                start = end;
            }
            prop_assert_eq!(charges, vec![object.len() as u64 + 160 + whole]);
        }
    }
}

#[test]
fn msgpack_pending_charge_counts_the_items_walked_so_far() {
    use super::msgpack::*;
    // `[-1, [2, "ab"], {}]`, then `[[], ...` unfinished, fed a byte a read: the
    // unfinished object is charged its items walked so far (a string once whole, each
    // item its slot as it arrives, announced items not yet arrived left out); the whole
    // object's own charge replaces it (0 pending).
    let (slot, array, int, text) = (CHARGE_ARRAY_SLOT, CHARGE_ARRAY, CHARGE_INT, CHARGE_STR);
    let stream = b"\x93\xff\x92\x02\xa2ab\x80\x92\x90";
    let mut framer = Framer::new(Mode::Msgpack, 100).unwrap();
    let mut packets = Packets::new();
    let mut pending = Vec::new();
    for byte in stream.chunks(1) {
        framer.feed(byte, &mut packets).unwrap();
        assert_eq!(
            framer.pending_charge(0),
            0,
            "a daemon's port: wire bytes only"
        );
        assert!(framer.pending_charge(160) <= 160 * framer.buffered() as u64);
        pending.push(framer.pending_charge(160));
    }
    let two = slot + int + slot + array + slot; // -1, [2
    assert_eq!(
        pending,
        [
            0,
            slot + int,
            slot + int + slot + array,
            two,
            two,
            two,
            two + slot + text,
            0,
            0,
            slot + array,
        ]
    );
    assert_eq!(packets.len(), 1);
    // In one read (the C skip finds the whole object) or cut after it: the tail alone.
    for cut in [stream.len(), 8, 3] {
        let mut framer = Framer::new(Mode::Msgpack, 100).unwrap();
        framer.feed(&stream[..cut], &mut packets).unwrap();
        framer.feed(&stream[cut..], &mut packets).unwrap();
        assert_eq!(framer.pending_charge(160), slot + array, "cut {cut}");
        // A framing error empties the framer, and its charge with it.
        framer.feed(b"\xc1", &mut packets).unwrap_err();
        assert_eq!(framer.pending_charge(160), 0);
    }
    // The other modes hold bytes, no items.
    for (mode, input) in [
        (Mode::Line(b'\n'), &b"abc"[..]),
        (Mode::Length(4), b"\x00\x00\x00\x05ab"),
        (Mode::Resp, b"*2\r\n$1\r\na\r\n"),
    ] {
        let mut framer = Framer::new(mode, 100).unwrap();
        framer.feed(input, &mut packets).unwrap();
        assert!(framer.buffered() > 0, "{mode:?}");
        assert_eq!(framer.pending_charge(160), 0);
    }
}
