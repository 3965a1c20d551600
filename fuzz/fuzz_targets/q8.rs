//! Exact search through an int8 copy (`rust/q8.rs`) read from arbitrary bytes.
//! Invariants: a copy of the wrong size is an error and damaged bytes never panic;
//! a copy made by `quantise_rows` gives the float32 scan's ids and scores, bit for bit.
#![no_main]

use _core::fuzzing::q8_search;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    dim: u8,
    rows: Vec<f32>,
    queries: Vec<f32>,
    k: u8,
    codes: Option<Vec<u8>>,
}

fuzz_target!(|input: Input| {
    let d = usize::from(input.dim % 40) + 1;
    let n = input.rows.len() / d;
    let q = input.queries.len() / d;
    if q == 0 {
        return;
    }
    let rows = &input.rows[..n * d];
    let queries = &input.queries[..q * d];
    let k = usize::from(input.k % 16) + 1;
    let trusted = input.codes.is_none();
    if let Ok((got, want)) = q8_search(rows, d, input.codes.as_deref(), queries, k) {
        if trusted {
            let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(got.ids, want.ids);
            assert_eq!(bits(&got.scores), bits(&want.scores));
        }
    }
});
