//! qs-bridge's gdb packet filter (`qs_bridge::rsp::GdbFilter`), which reads every byte a gdb
//! client sends, against any byte stream cut into any reads.
//!
//! What must hold besides "no panic":
//! - the cut into reads changes nothing: the same stream in one read gives the same output;
//! - what goes on to the machine is gdb's stream in order with pieces left out (the packets
//!   the bridge answers itself and gdb's acks of those answers), never altered or added to;
//!   and when the bridge answered nothing, it is the whole stream (but for a packet still
//!   incomplete at its end);
//! - each answer of the bridge's own is a sound packet (an optional `+`, `$`, `m` or `l`,
//!   escaped data, `#` and the right checksum) whose data is a piece of the target
//!   description.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qs_bridge::rsp::{GdbFilter, ToSend};
use quicksilver_proto::gdb::TARGET_XML;

/// Feeds the reads; returns the output with adjacent machine-bound pieces joined.
fn run(reads: &[&[u8]]) -> (Vec<ToSend>, bool) {
    let mut f = GdbFilter::default();
    let mut out = Vec::new();
    for r in reads {
        f.push(r, &mut out);
    }
    let mut joined: Vec<ToSend> = Vec::new();
    for o in out {
        match (joined.last_mut(), o) {
            (Some(ToSend::Machine(prev)), ToSend::Machine(more)) => prev.extend_from_slice(&more),
            (_, o) => joined.push(o),
        }
    }
    (joined, f.ended)
}

fn check_answer(answer: &[u8]) {
    let packet = answer.strip_prefix(b"+").unwrap_or(answer);
    assert!(packet.len() >= 5 && packet[0] == b'$', "{answer:?}");
    let (body, sum) = packet[1..].split_at(packet.len() - 4);
    assert_eq!(sum[0], b'#');
    let want = body.iter().fold(0u8, |s, &c| s.wrapping_add(c));
    assert_eq!(&sum[1..], format!("{want:02x}").as_bytes(), "bad checksum");
    assert!(matches!(body[0], b'm' | b'l'));
    let mut data = Vec::new();
    let mut escaped = false;
    for &c in &body[1..] {
        assert!(!matches!(c, b'$' | b'#'), "unescaped {c} in {answer:?}");
        if escaped {
            data.push(c ^ 0x20);
            escaped = false;
        } else if c == b'}' {
            escaped = true;
        } else {
            assert_ne!(c, b'*', "an unescaped run-length marker");
            data.push(c);
        }
    }
    assert!(!escaped, "an escape cut in two");
    // `str::contains` is linear (two-way search); the description is ASCII, so a piece of
    // it is UTF-8.
    assert!(
        std::str::from_utf8(&data).is_ok_and(|piece| TARGET_XML.contains(piece)),
        "an answer that is not a piece of the description"
    );
}

fuzz_target!(|input: &[u8]| {
    // The first byte says where the stream is cut into reads: every `cut`-th byte.
    let Some((&cut, stream)) = input.split_first() else {
        return;
    };
    let cut = usize::from(cut.max(1));
    let reads: Vec<&[u8]> = stream.chunks(cut).collect();
    let (out, ended) = run(&reads);
    assert_eq!(
        run(&[stream]),
        (out, ended),
        "the cut into reads changed the output"
    );
    let (out, _) = run(&reads);
    let mut rest = stream;
    let mut answered = false;
    // Each `-` gets the same answer again: check each answer once.
    let mut checked = std::collections::HashSet::new();
    for o in &out {
        match o {
            ToSend::Machine(bytes) => {
                // A subsequence of what is left of gdb's stream, in order.
                for &b in bytes {
                    let at = rest
                        .iter()
                        .position(|&c| c == b)
                        .expect("a byte gdb did not send");
                    rest = &rest[at + 1..];
                }
            }
            ToSend::Gdb(answer) => {
                answered = true;
                if checked.insert(answer) {
                    check_answer(answer);
                }
            }
        }
    }
    if !answered {
        let machine: Vec<u8> = out
            .iter()
            .flat_map(|o| match o {
                ToSend::Machine(b) => b.clone(),
                ToSend::Gdb(_) => Vec::new(),
            })
            .collect();
        // All of it, but for a packet still incomplete at the end (held until it is whole).
        let held = stream
            .strip_prefix(machine.as_slice())
            .expect("bytes left out though nothing was answered");
        if let Some(packet) = held.strip_prefix(b"$") {
            let complete = packet
                .iter()
                .position(|&c| c == b'#')
                .is_some_and(|h| h + 2 < packet.len());
            assert!(!complete, "a whole packet held back: {held:?}");
        } else {
            assert!(
                held.is_empty(),
                "bytes left out though nothing was answered: {held:?}"
            );
        }
    }
});
