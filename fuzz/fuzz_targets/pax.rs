//! Arbitrary bytes as the records of a pax extended header, followed by one
//! regular member and the end-of-archive marker, read through the shard reader
//! (the pax parser is private to it). Invariant: no panic or abort.
#![no_main]

use _core::shards::{ReaderOptions, ShardItem, ShardSamples};
use libfuzzer_sys::fuzz_target;

fn header(kind: tar::EntryType, path: &str, size: usize) -> [u8; 512] {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    // The names are short ASCII literals: setting them cannot fail.
    h.set_path(path).expect("short path");
    h.set_size(size as u64);
    h.set_mode(0o644);
    h.set_cksum();
    *h.as_bytes()
}

fn padded(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
}

fuzz_target!(|records: &[u8]| {
    let mut tar = Vec::with_capacity(records.len() + 4096);
    tar.extend_from_slice(&header(
        tar::EntryType::XHeader,
        "PaxHeaders/0",
        records.len(),
    ));
    padded(&mut tar, records);
    tar.extend_from_slice(&header(tar::EntryType::Regular, "0.jpg", 3));
    padded(&mut tar, b"abc");
    tar.extend_from_slice(&[0; 1024]);
    let items: Vec<ShardItem> =
        ShardSamples::new(&tar[..], "pax.tar", &ReaderOptions::default()).collect();
    // webdataset skips members whose name starts with `__` (and so do we, silently);
    // anything else must come out as a sample or a recorded issue.
    let may_be_skipped = records.windows(2).any(|w| w == b"__");
    assert!(
        !items.is_empty() || may_be_skipped,
        "a pax header and a member gave neither a sample nor an issue"
    );
});
