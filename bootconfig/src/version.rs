//! systemd's version comparison (`strverscmp_improved`), which systemd-boot
//! uses to order boot entries. A faithful port: `-` separates version from
//! release, `~` sorts before anything (pre-releases), `^` after (patches),
//! numbers compare by value and beat letters.

use std::cmp::Ordering;

fn is_valid_version_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'~' | b'-' | b'^' | b'.')
}

/// Compares two version strings as systemd does. Pure.
pub fn compare(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.is_empty() || b.is_empty() {
        return a.cmp(b);
    }
    let (mut i, mut j) = (0usize, 0usize);
    let at = |s: &[u8], k: usize| s.get(k).copied().unwrap_or(0);
    // A separator on one side only: the side without it is newer. On both
    // sides: step over it. `None` means the comparison goes on.
    let separator = |i: &mut usize, j: &mut usize, sep: u8| -> Option<Ordering> {
        if at(a, *i) != sep && at(b, *j) != sep {
            return None;
        }
        let r = (at(a, *i) != sep).cmp(&(at(b, *j) != sep));
        if r != Ordering::Equal {
            return Some(r);
        }
        *i += 1;
        *j += 1;
        None
    };
    loop {
        while at(a, i) != 0 && !is_valid_version_char(at(a, i)) {
            i += 1;
        }
        while at(b, j) != 0 && !is_valid_version_char(at(b, j)) {
            j += 1;
        }
        if let Some(r) = separator(&mut i, &mut j, b'~') {
            return r;
        }
        if at(a, i) == 0 || at(b, j) == 0 {
            return a[i.min(a.len())..].cmp(&b[j.min(b.len())..]);
        }
        for sep in [b'-', b'^', b'.'] {
            if let Some(r) = separator(&mut i, &mut j, sep) {
                return r;
            }
        }
        let (mut ii, mut jj) = (i, j);
        if at(a, i).is_ascii_digit() || at(b, j).is_ascii_digit() {
            while at(a, ii).is_ascii_digit() {
                ii += 1;
            }
            while at(b, jj).is_ascii_digit() {
                jj += 1;
            }
            let r = (i != ii).cmp(&(j != jj));
            if r != Ordering::Equal {
                return r;
            }
            while at(a, i) == b'0' && i < ii {
                i += 1;
            }
            while at(b, j) == b'0' && j < jj {
                j += 1;
            }
            let r = (ii - i).cmp(&(jj - j));
            if r != Ordering::Equal {
                return r;
            }
            let r = a[i..ii].cmp(&b[j..jj]);
            if r != Ordering::Equal {
                return r;
            }
        } else {
            while at(a, ii).is_ascii_alphabetic() {
                ii += 1;
            }
            while at(b, jj).is_ascii_alphabetic() {
                jj += 1;
            }
            let common = (ii - i).min(jj - j);
            let r = a[i..i + common].cmp(&b[j..j + common]);
            if r != Ordering::Equal {
                return r;
            }
            let r = (ii - i).cmp(&(jj - j));
            if r != Ordering::Equal {
                return r;
            }
        }
        i = ii;
        j = jj;
    }
}

#[cfg(test)]
mod tests {
    use super::compare;
    use std::cmp::Ordering::{Equal, Greater, Less};

    #[test]
    fn orders_like_systemd() {
        // Pairs from systemd's test-string-util.c (test_strverscmp_improved).
        let ascending = [
            "",
            "~1",
            "ab",
            "abb",
            "abc",
            "0001",
            "002",
            "12",
            "122",
            "122.9",
            "123~rc1",
            "123",
            "123-a",
            "123-a.1",
            "123-a1",
            "123-a1.1",
            "123-3",
            "123-3.1",
            "123^patch1",
            "123^1",
            "123.a-1",
            "123.1-1",
            "123a-1",
            "124",
        ];
        for (k, lower) in ascending.iter().enumerate() {
            for higher in &ascending[k + 1..] {
                assert_eq!(compare(lower, higher), Less, "{lower} < {higher}");
                assert_eq!(compare(higher, lower), Greater, "{higher} > {lower}");
            }
            assert_eq!(compare(lower, lower), Equal);
        }
        assert_eq!(compare("123.45-67.89", "123.45-67.89"), Equal);
        assert_eq!(compare("0123", "123"), Equal);
        assert_eq!(compare("4081.2.0", "4081.10.0"), Less);
        assert_eq!(compare("tandem-b.conf", "tandem-a.conf"), Greater);
    }
}
