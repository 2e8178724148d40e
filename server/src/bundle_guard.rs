//! A cheap pre-scan of Automerge bundles from devices, before Automerge parses them.
//!
//! Automerge's column encoding is run-length: a run header of a few bytes can announce a
//! billion repeated values, and deflated columns can inflate a thousandfold. automerge
//! 0.12 materialises what the header announces, so a 29-byte bundle found by the fuzzer
//! makes it allocate gigabytes (a memory bomb from any authenticated device). This scan
//! walks the bundle's layout (header, deps, actors, change and op columns), inflates
//! deflated columns within a bound, and counts the values each column would decode to,
//! without materialising them. Bundles announcing more than a legitimate bundle of their
//! size could hold are refused. So are columns that break off inside a value or hold a
//! run of no values after the first: automerge 0.12 loops forever verifying a bundle
//! whose boolean column ends inside a run length (a CPU bomb found by the property
//! tests), and no encoder writes either. Anything else it does not understand is left
//! for Automerge to refuse.

use std::io::Read;

/// Values any column may announce, whatever the bundle's size.
const ITEMS_FLOOR: u64 = 1 << 20;
/// Further values per byte of bundle.
const ITEMS_PER_BYTE: u64 = 4;
/// Inflated bytes any bundle may produce, whatever its size...
const INFLATE_FLOOR: u64 = 4 << 20;
/// ...plus this many per byte of bundle.
const INFLATE_PER_BYTE: u64 = 32;

use redline_proto::wire::CHUNK_MAGIC as MAGIC;

/// Refuses `bytes` if its columns announce more values (or inflate to more bytes) than
/// a bundle of its size can legitimately hold.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    verdict(Scan::new(bytes).bundle())
}

/// Like [`check`], for one change chunk (the form Automerge's sync messages carry).
pub fn check_change(bytes: &[u8]) -> Result<(), String> {
    verdict(Scan::new(bytes).change())
}

fn verdict(scanned: Option<Result<(), String>>) -> Result<(), String> {
    match scanned {
        Some(Err(refusal)) => Err(refusal),
        // Well within bounds, or malformed in a way Automerge reports itself.
        Some(Ok(())) | None => Ok(()),
    }
}

struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
    items_limit: u64,
    inflate_left: u64,
}

impl<'a> Scan<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Scan {
            bytes,
            at: 0,
            items_limit: ITEMS_FLOOR
                .saturating_add(ITEMS_PER_BYTE.saturating_mul(bytes.len() as u64)),
            inflate_left: INFLATE_FLOOR
                .saturating_add(INFLATE_PER_BYTE.saturating_mul(bytes.len() as u64)),
        }
    }

    fn take(&mut self, n: u64) -> Option<&'a [u8]> {
        let n = usize::try_from(n).ok()?;
        let end = self.at.checked_add(n)?;
        let bytes: &'a [u8] = self.bytes;
        let s = bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn uleb(&mut self) -> Option<u64> {
        let (v, used) = uleb(self.bytes.get(self.at..)?)?;
        self.at += used;
        Some(v)
    }

    /// The chunk header (magic, checksum, type, length) and the dependency hashes that
    /// bundles and changes both begin with.
    fn header_and_deps(&mut self) -> Option<()> {
        if self.take(4)? != MAGIC {
            return None;
        }
        self.take(5)?; // checksum, chunk type
        self.uleb()?; // chunk length
        let deps = self.uleb()?;
        self.take(deps.checked_mul(32)?)?;
        Some(())
    }

    /// A count, then that many length-prefixed byte strings (actor ids). Each takes at
    /// least a byte, so a huge count ends at the input's end.
    fn byte_strings(&mut self) -> Option<()> {
        let n = self.uleb()?;
        for _ in 0..n {
            let len = self.uleb()?;
            self.take(len)?;
        }
        Some(())
    }

    /// `None`: malformed (Automerge will say so); `Some(Err)`: refused for size.
    fn bundle(&mut self) -> Option<Result<(), String>> {
        self.header_and_deps()?;
        self.byte_strings()?; // actors
        // Change columns, then op columns.
        self.sections(2)
    }

    /// A change chunk: header, then deps, actor, seq, start op, time, message, other
    /// actors, and one section of op columns.
    fn change(&mut self) -> Option<Result<(), String>> {
        self.header_and_deps()?;
        let actor = self.uleb()?;
        self.take(actor)?;
        self.uleb()?; // seq
        self.uleb()?; // start op
        let (_, used) = sleb(self.bytes.get(self.at..)?)?; // time
        self.at += used;
        let message = self.uleb()?;
        self.take(message)?;
        self.byte_strings()?; // other actors
        self.sections(1)
    }

    fn sections(&mut self, sections: usize) -> Option<Result<(), String>> {
        for _section in 0..sections {
            let n = self.uleb()?;
            let mut columns = Vec::new();
            for _ in 0..n.min(1024) {
                let spec = self.uleb()?;
                let len = self.uleb()?;
                columns.push((spec, len));
            }
            if n > 1024 {
                return Some(Err(format!("{n} columns in one bundle")));
            }
            for (spec, len) in columns {
                let data = self.take(len)?;
                let inflated;
                let data = if spec & 0b1000 != 0 {
                    let limit = self.inflate_left;
                    let mut out = Vec::new();
                    let read = flate2::read::DeflateDecoder::new(data)
                        .take(limit.saturating_add(1))
                        .read_to_end(&mut out)
                        .ok()?;
                    if read as u64 > limit {
                        return Some(Err(
                            "compressed columns inflate beyond what the bundle's size allows"
                                .into(),
                        ));
                    }
                    self.inflate_left -= read as u64;
                    inflated = out;
                    &inflated[..]
                } else {
                    data
                };
                let Some(items) = count_items(spec & 0b111, data) else {
                    return Some(Err(
                        "a column breaks off inside a value, or holds an empty run".into(),
                    ));
                };
                if items > self.items_limit {
                    return Some(Err(format!(
                        "a column announces {items} values in a bundle of {} bytes",
                        self.bytes.len()
                    )));
                }
            }
        }
        Some(Ok(()))
    }
}

pub(crate) use redline_proto::wire::uleb;

/// A signed LEB128 and the bytes it used.
fn sleb(b: &[u8]) -> Option<(i64, usize)> {
    let mut v: i64 = 0;
    let mut shift = 0u32;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= i64::from(byte & 0x7f).checked_shl(shift)?;
        shift += 7;
        if byte & 0x80 == 0 {
            if shift < 64 && byte & 0x40 != 0 {
                v |= -1i64 << shift;
            }
            return Some((v, i + 1));
        }
    }
    None
}

/// How many values a column of `col_type` announces, without decoding them; `None` if
/// it breaks off inside a value or holds an empty run where no encoder writes one.
fn count_items(col_type: u64, data: &[u8]) -> Option<u64> {
    let mut items: u64 = 0;
    count_into(col_type, data, &mut items)?;
    Some(items)
}

fn count_into(col_type: u64, data: &[u8], items: &mut u64) -> Option<()> {
    let mut at = 0usize;
    // One encoded value of this column's type.
    let value = |at: &mut usize| -> Option<()> {
        match col_type {
            // String: length-prefixed bytes.
            5 => {
                let (len, used) = uleb(data.get(*at..)?)?;
                *at = at
                    .checked_add(used)?
                    .checked_add(usize::try_from(len).ok()?)?;
                (*at <= data.len()).then_some(())
            }
            // Delta integers are signed; the others unsigned.
            3 => {
                let (_, used) = sleb(data.get(*at..)?)?;
                *at += used;
                Some(())
            }
            _ => {
                let (_, used) = uleb(data.get(*at..)?)?;
                *at += used;
                Some(())
            }
        }
    };
    match col_type {
        // Raw values: their size is their bytes.
        7 => {}
        // Booleans: alternating run lengths; only the first (of `false`) may be empty.
        4 => {
            let mut first = true;
            while at < data.len() {
                let (n, used) = uleb(&data[at..])?;
                at += used;
                if n == 0 && !first {
                    return None;
                }
                first = false;
                *items = items.saturating_add(n);
            }
        }
        // Run-length encodings: count > 0 a run of one value, < 0 literals, 0 nulls.
        _ => {
            while at < data.len() {
                let (count, used) = sleb(&data[at..])?;
                at += used;
                if count > 0 {
                    *items = items.saturating_add(count as u64);
                    value(&mut at)?;
                } else if count < 0 {
                    *items = items.saturating_add(count.unsigned_abs());
                    for _ in 0..count.unsigned_abs() {
                        value(&mut at)?;
                    }
                } else {
                    let (n, used) = uleb(data.get(at..)?)?;
                    at += used;
                    if n == 0 {
                        return None;
                    }
                    *items = items.saturating_add(n);
                }
            }
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ROOT};

    #[test]
    fn real_bundles_pass() {
        let mut doc = Automerge::new();
        for i in 0..200 {
            doc.transact::<_, _, automerge::AutomergeError>(|tx| {
                tx.put(ROOT, format!("k{i}"), "some text that repeats and repeats")?;
                tx.put(ROOT, "n", i)?;
                Ok(())
            })
            .unwrap();
        }
        let all: Vec<_> = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
        let bundle = doc.bundle(all).unwrap().bytes().to_vec();
        assert_eq!(check(&bundle), Ok(()));
    }

    #[test]
    fn the_fuzzers_memory_bomb_is_refused() {
        // Found by `cargo fuzz run sync_payloads`: 28 bytes announcing ~1.6 billion values.
        let bomb = [
            0x85, 0x6f, 0x4a, 0x83, 0x82, 0xd0, 0x29, 0x00, 0x00, 0x09, 0x00, 0x01, 0x00, 0x00,
            0x01, 0x23, 0x08, 0x85, 0xff, 0xff, 0xff, 0x05, 0xf2, 0x02, 0x26, 0x8e, 0x80, 0x00,
        ];
        assert!(check(&bomb).is_err());
    }

    #[test]
    fn a_boolean_column_cut_inside_a_run_length_is_refused() {
        // Found by the property tests: automerge 0.12 loops forever verifying it.
        let hang = include_bytes!("../tests/regressions/bundle-bool-truncated-hang.bin");
        let refused = check(hang).unwrap_err();
        assert!(refused.contains("breaks off"), "{refused}");
    }

    #[test]
    fn leb128_reads_match_the_spec() {
        assert_eq!(uleb(&[0xe5, 0x8e, 0x26]), Some((624_485, 3)));
        assert_eq!(sleb(&[0xc0, 0xbb, 0x78]), Some((-123_456, 3)));
        assert_eq!(sleb(&[0x7f]), Some((-1, 1)));
        assert_eq!(uleb(&[0x80]), None);
    }
}
