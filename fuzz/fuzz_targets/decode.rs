//! Arbitrary bytes preprocessed as one image (decode, resize, center crop), in
//! both modes. Invariants: no panic or abort, memory within -rss_limit_mb, and an
//! accepted image gives exactly `size * size * 3` bytes.
#![no_main]

use _core::fuzzing::{preprocess_one, Mode};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer stays fast, big enough for real images.
const MAX_PIXELS: u64 = 4_000_000;

fuzz_target!(|data: &[u8]| {
    for (size, mode) in [(224, Mode::Exact), (37, Mode::Fast)] {
        if let Ok(rgb) = preprocess_one(data, size, mode, MAX_PIXELS) {
            assert_eq!(rgb.len(), size * size * 3);
        }
    }
});
