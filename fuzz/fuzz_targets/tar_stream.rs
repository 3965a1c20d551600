//! Arbitrary bytes read as one webdataset shard: every member and its data.
//! Invariants: no panic or abort, bounded memory, and no sample holds more bytes
//! than the shard had.
#![no_main]

use _core::shards::{ReaderOptions, ShardItem, ShardSamples};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut kept = 0usize;
    for item in ShardSamples::new(data, "fuzz.tar", &ReaderOptions::default()) {
        if let ShardItem::Sample(s) = item {
            kept += s.image.len();
            assert!(!s.key.is_empty(), "a sample without a key");
        }
    }
    assert!(
        kept <= data.len(),
        "{kept} image bytes from a {} byte shard",
        data.len()
    );
});
