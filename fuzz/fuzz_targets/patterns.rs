//! Arbitrary text expanded as a shard pattern's brace groups.
//! Invariants: no panic, the expansion stays within its documented limits (a million
//! paths, 64 MiB of text), and no pattern takes past -timeout to expand.
#![no_main]

use _core::fuzzing::expand_braces;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pattern = String::from_utf8_lossy(data);
    let Ok(paths) = expand_braces(&pattern) else {
        return;
    };
    assert!(paths.len() <= 1_000_000, "{} paths", paths.len());
    let bytes: usize = paths.iter().map(String::len).sum();
    assert!(bytes <= 64 << 20, "{bytes} bytes of paths");
    if !pattern.contains('{') {
        assert_eq!(paths, [pattern.into_owned()]);
    }
});
