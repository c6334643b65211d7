//! The gdb remote serial protocol as the bridge sees it: a pure filter over gdb's byte stream
//! ([`GdbFilter`]) that answers target-description reads itself ([`xfer_answer`]) and notes
//! detach and kill packets. No I/O here: the caller moves the bytes.

/// Where [`GdbFilter`] sends a piece of gdb's stream, or its own answer.
#[derive(Debug, PartialEq, Eq)]
pub enum ToSend {
    /// gdb's bytes, for the machine's `gdb` channel.
    Machine(Vec<u8>),
    /// The bridge's own answer, for gdb.
    Gdb(Vec<u8>),
}

/// gdb's byte stream, packet by packet (across reads). Everything goes on to the machine as
/// it came, except reads of the target description: the bridge answers those from its own
/// copy (`quicksilver_proto::gdb::TARGET_XML`, the hv's), which keeps 6.3 KB off the serial
/// link at every attach. Until gdb asks for `QStartNoAckMode` (which the hv's stub grants:
/// the gdbstub crate's default, and gdb asks before it reads the description), the bridge
/// acks the packet it answers and takes gdb's ack of its answer (a `-` gets the answer again);
/// after it, neither side acks. Also notes gdb's detach and kill packets, and (with
/// [`GdbFilter::push_answering_link`]) answers `monitor link`, which only the bridge knows.
#[derive(Default)]
pub struct GdbFilter {
    /// The packet being collected, from `$` to the end of its checksum.
    packet: Vec<u8>,
    /// Checksum characters still to come once `#` was seen.
    checksum_left: Option<u8>,
    /// The bridge's last answer, until gdb acks it.
    answer: Option<Vec<u8>>,
    /// gdb asked for no acks.
    no_ack: bool,
    /// gdb sent `D`, `k` or `vKill`.
    pub ended: bool,
}

impl GdbFilter {
    const TARGET_XML_READ: &'static [u8] = b"qXfer:features:read:target.xml:";
    /// `monitor link`: `qRcmd` and "link" in hex.
    const MONITOR_LINK: &'static [u8] = b"qRcmd,6c696e6b";

    /// Takes the next bytes of gdb's stream (any split); appends to `out` what goes where,
    /// in the stream's order.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<ToSend>) {
        self.push_inner(bytes, out, None)
    }

    /// [`GdbFilter::push`], answering `monitor link` with `report()`'s text; every other
    /// `monitor` command still goes to the machine.
    pub fn push_answering_link(
        &mut self,
        bytes: &[u8],
        out: &mut Vec<ToSend>,
        report: &dyn Fn() -> String,
    ) {
        self.push_inner(bytes, out, Some(report))
    }

    fn push_inner(
        &mut self,
        bytes: &[u8],
        out: &mut Vec<ToSend>,
        report: Option<&dyn Fn() -> String>,
    ) {
        let mut machine = Vec::new();
        for &b in bytes {
            if !self.packet.is_empty() {
                self.packet.push(b);
                match &mut self.checksum_left {
                    Some(left) => {
                        *left -= 1;
                        if *left == 0 {
                            self.checksum_left = None;
                            let packet = std::mem::take(&mut self.packet);
                            self.packet_done(packet, &mut machine, out, report);
                        }
                    }
                    None if b == b'#' => self.checksum_left = Some(2),
                    None => {}
                }
                continue;
            }
            match b {
                b'$' => self.packet.push(b),
                b'+' if self.answer.is_some() => self.answer = None,
                b'-' if self.answer.is_some() => {
                    flush(&mut machine, out);
                    out.push(ToSend::Gdb(self.answer.clone().unwrap_or_default()));
                }
                // Acks of the machine's packets, Ctrl-C (0x03).
                _ => machine.push(b),
            }
        }
        flush(&mut machine, out);
    }

    fn packet_done(
        &mut self,
        packet: Vec<u8>,
        machine: &mut Vec<u8>,
        out: &mut Vec<ToSend>,
        report: Option<&dyn Fn() -> String>,
    ) {
        let body = &packet[1..packet.len() - 3];
        let own = match report {
            Some(report) if body == Self::MONITOR_LINK => Some(monitor_answer(&report())),
            _ => body.strip_prefix(Self::TARGET_XML_READ).and_then(|range| {
                xfer_answer(range, quicksilver_proto::gdb::TARGET_XML.as_bytes())
            }),
        };
        if let Some(answer) = own {
            flush(machine, out);
            if self.no_ack {
                out.push(ToSend::Gdb(answer));
            } else {
                out.push(ToSend::Gdb([b"+".as_slice(), &answer].concat()));
                self.answer = Some(answer);
            }
            return;
        }
        if body == b"QStartNoAckMode" {
            self.no_ack = true;
        }
        if body == b"D" || body.starts_with(b"D;") || body == b"k" || body.starts_with(b"vKill") {
            self.ended = true;
        }
        machine.extend_from_slice(&packet);
    }
}

/// Moves collected machine-bound bytes into `out`, keeping the stream's order.
fn flush(machine: &mut Vec<u8>, out: &mut Vec<ToSend>) {
    if !machine.is_empty() {
        out.push(ToSend::Machine(std::mem::take(machine)));
    }
}

/// The answer packet to a `qRcmd` whose output is `text` (hex, as gdb prints it).
pub fn monitor_answer(text: &str) -> Vec<u8> {
    let hex: String = text.bytes().map(|b| format!("{b:02x}")).collect();
    packet(hex.as_bytes())
}

/// The last whole `$...#xx` packet in `bytes`, without `$` and checksum.
pub fn last_packet(bytes: &[u8]) -> Option<&[u8]> {
    let hash = bytes.iter().rposition(|&b| b == b'#')?;
    let dollar = bytes[..hash].iter().rposition(|&b| b == b'$')?;
    Some(&bytes[dollar + 1..hash])
}

/// Whether a gdb packet only reads (asking it again changes nothing on the machine).
pub fn is_read(packet: &[u8]) -> bool {
    matches!(packet.first(), Some(b'm' | b'g' | b'p' | b'q' | b'?'))
}

/// A whole packet: `$`, body, `#`, checksum.
pub fn packet(body: &[u8]) -> Vec<u8> {
    let sum = body.iter().fold(0u8, |s, &b| s.wrapping_add(b));
    let mut p = Vec::with_capacity(body.len() + 4);
    p.push(b'$');
    p.extend_from_slice(body);
    p.extend_from_slice(format!("#{sum:02x}").as_bytes());
    p
}

/// The answer packet to a `qXfer:...:read` of `doc` for the `OFFSET,LENGTH` (hex) in `range`:
/// `m` and a part when more follows, `l` and the rest at the end, binary-escaped, at most
/// LENGTH bytes of data. None if `range` does not parse.
pub fn xfer_answer(range: &[u8], doc: &[u8]) -> Option<Vec<u8>> {
    let (offset, length) = std::str::from_utf8(range).ok()?.split_once(',')?;
    let offset = usize::from_str_radix(offset, 16).ok()?;
    let length = usize::from_str_radix(length, 16).ok()?;
    let rest = doc.get(offset.min(doc.len())..).unwrap_or_default();
    let mut data = Vec::new();
    let mut taken = 0;
    for &c in rest {
        let escaped: &[u8] = match c {
            b'#' | b'$' | b'}' | b'*' => &[b'}', c ^ 0x20],
            _ => std::slice::from_ref(&c),
        };
        if data.len() + escaped.len() > length {
            break;
        }
        data.extend_from_slice(escaped);
        taken += 1;
    }
    let kind = if taken < rest.len() { b'm' } else { b'l' };
    data.insert(0, kind);
    Some(packet(&data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reads_are_asked_again() {
        assert_eq!(last_packet(b"+$m1000,4#8d"), Some(&b"m1000,4"[..]));
        assert_eq!(last_packet(b"$g#67$c#63"), Some(&b"c"[..]));
        assert_eq!(last_packet(b"+"), None);
        for read in ["m1000,4", "g", "p10", "qSupported", "?"] {
            assert!(is_read(read.as_bytes()), "{read}");
        }
        for write in [
            "M1000,1:00",
            "G00",
            "P10=0",
            "c",
            "s",
            "Z0,1,1",
            "D",
            "vCont;c",
        ] {
            assert!(!is_read(write.as_bytes()), "{write}");
        }
        assert_eq!(packet(b"g"), b"$g#67");
    }

    #[test]
    fn monitor_link_is_answered_by_the_bridge_and_other_monitor_commands_are_not() {
        let mut f = GdbFilter::default();
        let mut out = Vec::new();
        let report = || "fast link up\n".to_string();
        f.push_answering_link(b"$qRcmd,6c696e6b#af$qRcmd,7374617473#fb", &mut out, &report);
        let [ToSend::Gdb(answer), ToSend::Machine(rest)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(
            answer,
            &[b"+".as_slice(), &monitor_answer("fast link up\n")].concat()
        );
        assert!(answer.starts_with(b"+$66617374"), "{answer:?}");
        assert_eq!(rest, b"$qRcmd,7374617473#fb");
        // Without a report (the plain push), `monitor link` is the machine's.
        let mut out = Vec::new();
        GdbFilter::default().push(b"$qRcmd,6c696e6b#af", &mut out);
        assert!(matches!(&out[..], [ToSend::Machine(_)]));
    }

    /// Feeds `chunks` to a fresh filter; returns what it sent where, and whether gdb ended.
    fn filter(chunks: &[&[u8]]) -> (Vec<ToSend>, bool) {
        let mut f = GdbFilter::default();
        let mut out = Vec::new();
        for c in chunks {
            f.push(c, &mut out);
        }
        (out, f.ended)
    }

    #[test]
    fn detach_and_kill_packets_are_spotted_across_reads() {
        assert!(filter(&[b"+$D#44"]).1);
        assert!(filter(&[b"$g#67+$", b"k#6b"]).1);
        assert!(filter(&[b"$vK", b"ill;a410#33"]).1);
        assert!(!filter(&[b"$qSupported:multiprocess+#c6", b"$m ffff,4#00"]).1);
        assert!(!filter(&[b"$g#67", b"D"]).1, "a D outside a packet start");
    }

    #[test]
    fn everything_but_target_description_reads_goes_to_the_machine_unchanged() {
        let stream: &[&[u8]] = &[
            b"+$qSupp",
            b"orted:xmlRegisters=i386#6a",
            b"\x03+$g#67",
            b"+",
        ];
        let (out, _) = filter(stream);
        let sent: Vec<u8> = out
            .iter()
            .flat_map(|o| match o {
                ToSend::Machine(b) => b.clone(),
                ToSend::Gdb(b) => panic!("answered {b:?} itself"),
            })
            .collect();
        assert_eq!(sent, stream.concat());
    }

    #[test]
    fn the_target_description_is_answered_here_in_parts_that_gdb_can_join() {
        let doc = quicksilver_proto::gdb::TARGET_XML.as_bytes();
        let mut joined = Vec::new();
        let mut f = GdbFilter::default();
        let mut offset = 0;
        loop {
            let mut out = Vec::new();
            let request = format!("qXfer:features:read:target.xml:{offset:x},3fb");
            let sum = request.bytes().fold(0u8, |s, c| s.wrapping_add(c));
            f.push(format!("${request}#{sum:02x}").as_bytes(), &mut out);
            let [ToSend::Gdb(reply)] = &out[..] else {
                panic!("not answered here: {out:?}")
            };
            let reply = reply.clone();
            out.clear();
            // Our ack of gdb's packet, then `$`, m or l, data, `#xx` with a valid checksum.
            assert_eq!(&reply[..2], b"+$");
            let packet = &reply[2..];
            let (body, sum) = packet.split_at(packet.len() - 3);
            let want = body.iter().fold(0u8, |s, &c| s.wrapping_add(c));
            assert_eq!(sum, format!("#{want:02x}").as_bytes());
            assert!(body.len() - 1 <= 0x3fb);
            joined.extend_from_slice(&body[1..]);
            offset = joined.len();
            // gdb's ack of the answer is the bridge's, not the machine's.
            f.push(b"+", &mut out);
            assert!(out.is_empty(), "the ack went on: {out:?}");
            if body[0] == b'l' {
                break;
            }
            assert_eq!(body[0], b'm');
        }
        assert_eq!(joined, doc);
    }

    #[test]
    fn a_nacked_answer_is_sent_again_and_bad_ranges_go_to_the_machine() {
        let (out, _) = filter(&[b"$qXfer:features:read:target.xml:0,10#00", b"-"]);
        assert_eq!(out.len(), 2);
        let (ToSend::Gdb(first), ToSend::Gdb(again)) = (&out[0], &out[1]) else {
            panic!("{out:?}")
        };
        assert_eq!(
            &first[1..],
            &again[..],
            "the same answer, without a second ack"
        );
        let (out, _) = filter(&[b"$qXfer:features:read:target.xml:zz#00"]);
        assert!(matches!(&out[..], [ToSend::Machine(_)]));
    }

    #[test]
    fn after_no_ack_mode_the_answer_comes_without_an_ack() {
        let (out, _) = filter(&[
            b"$QStartNoAckMode#b0",
            b"$qXfer:features:read:target.xml:0,10#00",
        ]);
        let [ToSend::Machine(asked), ToSend::Gdb(answer)] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(asked, b"$QStartNoAckMode#b0", "the machine grants it");
        assert_eq!(answer[0], b'$', "no ack before the answer");
    }

    #[test]
    fn escaped_bytes_count_against_the_length() {
        // `#` takes two bytes (`}` and # ^ 0x20), so 3 bytes hold "a#" and "b" is left.
        let sum = [b'm', b'a', b'}', 0x03]
            .iter()
            .fold(0u8, |s, &c| s.wrapping_add(c));
        let mut want = b"$ma}\x03".to_vec();
        want.extend_from_slice(format!("#{sum:02x}").as_bytes());
        assert_eq!(xfer_answer(b"0,3", b"a#b"), Some(want));
        assert_eq!(xfer_answer(b"3,10", b"a#b").as_deref(), Some(&b"$l#6c"[..]));
    }
}
