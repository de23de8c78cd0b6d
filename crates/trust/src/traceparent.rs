//! The W3C trace context `traceparent` header (`00-<trace id>-<parent id>-<flags>`), parsed
//! as the recommendation asks: lowercase hex of the right lengths, neither id all zeros,
//! version `ff` refused, and a later version read by its first four fields.

/// A well-formed `traceparent`'s fields, as hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traceparent<'a> {
    /// The trace id: 32 lowercase hex digits, not all zero.
    pub trace_id: &'a str,
    /// The caller's span: 16 lowercase hex digits, not all zero.
    pub parent_id: &'a str,
    /// The trace flags: 2 lowercase hex digits.
    pub flags: &'a str,
}

impl<'a> Traceparent<'a> {
    /// The fields of `value`, or `None` when it is not a traceparent to continue.
    pub fn parse(value: &'a str) -> Option<Traceparent<'a>> {
        let mut parts = value.trim().split('-');
        let (version, trace_id, parent_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let extra = parts.next().is_some();
        let valid = hex(version, 2)
            && version != "ff"
            && !(version == "00" && extra)
            && hex(trace_id, 32)
            && hex(parent_id, 16)
            && hex(flags, 2)
            && !zero(trace_id)
            && !zero(parent_id);
        valid.then_some(Traceparent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The trace id as bytes.
    pub fn trace_bytes(&self) -> [u8; 16] {
        bytes(self.trace_id)
    }

    /// The parent id as bytes.
    pub fn parent_bytes(&self) -> [u8; 8] {
        bytes(self.parent_id)
    }
}

fn hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn zero(s: &str) -> bool {
    s.bytes().all(|b| b == b'0')
}

/// `text` (already checked to be `2 * N` lowercase hex digits) as bytes.
fn bytes<const N: usize>(text: &str) -> [u8; N] {
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks(2)) {
        let digit = |c: u8| if c.is_ascii_digit() { c - b'0' } else { c - b'a' + 10 };
        *byte = digit(pair[0]) << 4 | digit(pair[1]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_header_gives_its_fields_and_bytes() {
        let t = Traceparent::parse(VALID).unwrap();
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id, "00f067aa0ba902b7");
        assert_eq!(t.flags, "01");
        assert_eq!(t.trace_bytes()[..2], [0x4b, 0xf9]);
        assert_eq!(t.parent_bytes(), [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        assert!(Traceparent::parse(later).is_some());
    }

    #[test]
    fn junk_is_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(Traceparent::parse(bad), None, "{bad}");
        }
    }
}
