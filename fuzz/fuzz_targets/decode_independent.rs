//! Every image must be decoded independently of what its thread decoded before.
//! Each input is preprocessed on the fuzzing thread (after every earlier input) and
//! on a fresh thread; then a good JPEG and a good PNG must still give the result
//! they give on a fresh thread. A difference is a crash with both results shown.
#![no_main]

use std::sync::OnceLock;
use std::thread;

use _core::fuzzing::{preprocess_one, Mode};
use libfuzzer_sys::fuzz_target;

const GOOD_JPEG: &[u8] = include_bytes!("../seeds/decode/good.jpg");
const GOOD_PNG: &[u8] = include_bytes!("../seeds/decode/good.png");
const SIZE: usize = 64;
const MAX_PIXELS: u64 = 4_000_000;

type Outcome = Result<Vec<u8>, String>;

fn run(data: &[u8]) -> Outcome {
    preprocess_one(data, SIZE, Mode::Exact, MAX_PIXELS)
}

/// `data` preprocessed on a thread that decoded nothing before.
fn on_fresh_thread(data: &[u8]) -> Outcome {
    thread::scope(|s| s.spawn(|| run(data)).join()).unwrap_or_else(|_| panic!("decoder panicked"))
}

fn reference() -> &'static [Outcome; 2] {
    static REFERENCE: OnceLock<[Outcome; 2]> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let refs = [on_fresh_thread(GOOD_JPEG), on_fresh_thread(GOOD_PNG)];
        for r in &refs {
            assert!(r.is_ok(), "the embedded good images must decode: {r:?}");
        }
        refs
    })
}

fn describe(o: &Outcome) -> String {
    match o {
        Ok(rgb) => format!(
            "ok, {} bytes, first {:?}",
            rgb.len(),
            &rgb[..rgb.len().min(12)]
        ),
        Err(why) => format!("failed: {why}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let reference = reference();
    let here = run(data);
    let alone = on_fresh_thread(data);
    assert!(
        here == alone,
        "input decoded after earlier inputs: {}; alone: {}",
        describe(&here),
        describe(&alone)
    );
    for (name, good, expected) in [
        ("good.jpg", GOOD_JPEG, &reference[0]),
        ("good.png", GOOD_PNG, &reference[1]),
    ] {
        let got = run(good);
        assert!(
            got == *expected,
            "{name} after this input: {}; alone: {}",
            describe(&got),
            describe(expected)
        );
    }
});
