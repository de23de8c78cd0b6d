//! Reading DER (X.690) elements: enough to find a public key in a SubjectPublicKeyInfo or a
//! URI in a certificate's subjectAltName, without an ASN.1 library.

/// One DER element of `input`: (tag, contents, what follows); `None` when `input` does not
/// start with a whole element (or its length needs more than four bytes).
pub fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let count = (first & 0x7f) as usize;
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[count..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_lengths_read_and_truncated_elements_do_not() {
        assert_eq!(element(&[0x04, 2, 7, 8, 9]), Some((0x04, &[7u8, 8][..], &[9u8][..])));
        let mut long = vec![0x30, 0x81, 200];
        long.extend([1u8; 200]);
        let (tag, contents, rest) = element(&long).unwrap();
        assert_eq!((tag, contents.len(), rest.len()), (0x30, 200, 0));
        assert_eq!(element(&[0x04, 3, 1, 2]), None);
        assert_eq!(element(&[0x04, 0x80]), None);
        assert_eq!(element(&[0x04, 0x85, 0, 0, 0, 0, 1]), None);
        assert_eq!(element(&[]), None);
    }
}
