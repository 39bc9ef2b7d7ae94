//! Guest hints read from a file: the free-page list or the working set a
//! guest agent reports.
//!
//! One range per line, `GPA LENGTH`, each a decimal or `0x` hexadecimal
//! number of bytes; blank lines and `#` comments are skipped. A range may
//! span regions; only whole 4 KiB pages inside it count as free.
//!
//! ```text
//! # free pages reported by the guest at 12:00:03
//! 0x100000 0x200000
//! 0x40000000 1048576
//! ```

use pmigrate_ranges::{GuestMemory, PageIdx, PageRange, PAGE_SIZE_U64};

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A line of a range list that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HintError {
    /// Not two numbers.
    #[error("line {line}: expected `GPA LENGTH`, got {text:?}")]
    Syntax {
        /// Line number, from 1.
        line: usize,
        /// The line, comment and blanks trimmed.
        text: String,
    },
    /// A range past the end of the 64-bit address space.
    #[error("line {line}: range {gpa:#x}+{len:#x} wraps")]
    Wraps {
        /// Line number, from 1.
        line: usize,
        /// Its guest address.
        gpa: u64,
        /// Its length.
        len: u64,
    },
}

/// The page ranges of `mem` that the range list `text` covers (a free-page
/// list or a working set).
pub fn parse_free_pages(text: &str, mem: &GuestMemory) -> Result<Vec<PageRange>, HintError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut it = line.split_whitespace();
        let (gpa, len) = match (it.next().and_then(number), it.next().and_then(number), it.next()) {
            (Some(g), Some(l), None) => (g, l),
            _ => return Err(HintError::Syntax { line: n + 1, text: line.to_string() }),
        };
        let end = gpa.checked_add(len).ok_or(HintError::Wraps { line: n + 1, gpa, len })?;
        for (idx, region) in mem.iter() {
            let (rs, re) = (region.gpa().0, region.gpa().0 + region.len());
            let (s, e) = (gpa.max(rs), end.min(re));
            if s >= e {
                continue;
            }
            // Whole pages only: round the start up and the end down.
            let first = (s - rs).div_ceil(PAGE_SIZE_U64);
            let last = (e - rs) / PAGE_SIZE_U64;
            if first < last {
                out.push(PageRange { region: idx, start: PageIdx(first), end: PageIdx(last) });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmigrate_ranges::{Gpa, GuestRegion, HostPageSize, RegionIdx};

    #[test]
    fn ranges_map_to_whole_pages_of_each_region() {
        let mem = GuestMemory::new(vec![
            GuestRegion::anonymous(Gpa(0), 1 << 20, HostPageSize::Small).unwrap(),
            GuestRegion::anonymous(Gpa(1 << 30), 1 << 20, HostPageSize::Small).unwrap(),
        ])
        .unwrap();
        let text = "# comment\n\n0x1000 0x3000\n0x800 4096   # half pages round inward\n0xff000 0x40001000\n";
        let r = parse_free_pages(text, &mem).unwrap();
        let pr = |reg: u32, s: u64, e: u64| PageRange { region: RegionIdx(reg), start: PageIdx(s), end: PageIdx(e) };
        assert_eq!(r, vec![pr(0, 1, 4), pr(0, 255, 256), pr(1, 0, 256)]);
        assert!(parse_free_pages("12", &mem).is_err());
        assert!(parse_free_pages("1 2 3", &mem).is_err());
        assert_eq!(
            parse_free_pages("0 1\n\n0xffffffffffffffff 2", &mem),
            Err(HintError::Wraps { line: 3, gpa: u64::MAX, len: 2 })
        );
        assert_eq!(
            parse_free_pages("zz 4096 # a typo", &mem),
            Err(HintError::Syntax { line: 1, text: "zz 4096".into() })
        );
    }
}
