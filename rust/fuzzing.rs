//! Entry points for the cargo-fuzz targets in `fuzz/`, built only with the `fuzzing`
//! feature. Each one is a parser of untrusted input called the way production calls it,
//! so a target needs none of the private modules.

use crate::preprocess::{self, Options};

pub use crate::dedup::{select, Choice, FlatMoments, Moment, Outcome, Params, Reuse, Shown};
pub use crate::preprocess::Mode;
pub use crate::shards::expand_braces;

/// Decode, resize and center-crop one image as `preprocess_images` does: the
/// `size * size * 3` RGB crop, or the failure reason a user would see.
pub fn preprocess_one(
    data: &[u8],
    size: usize,
    mode: Mode,
    max_pixels: u64,
) -> Result<Vec<u8>, String> {
    let opts = Options {
        size,
        mode,
        max_pixels,
    };
    preprocess::rgb_crop(data, &opts).map_err(|e| e.to_string())
}

/// Exact top-`k` of float32 `rows` (dimension `d`) through an int8 copy read from
/// untrusted bytes (`codes`, as `q8_search_parts` takes it from disk), and the float32
/// scan's answer: `Err` for a copy of the wrong size, never a panic.
pub fn q8_search(
    rows: &[f32],
    d: usize,
    codes: Option<&[u8]>,
    queries: &[f32],
    k: usize,
) -> Result<(crate::topk::TopK, crate::topk::TopK), String> {
    use crate::{q8, topk};
    let db = topk::Database::new(topk::Rows::F32(rows), d)?;
    let own;
    let codes = match codes {
        Some(c) => c,
        None => {
            own = q8::quantise_rows(&db, 1)?;
            &own
        }
    };
    let part = q8::Part::new(db, codes)?;
    let exclude = topk::Exclude::NOTHING;
    let got = q8::search_parts(queries, &[part], k, &exclude, 1, q8::Path::Auto)?;
    let want = topk::search_parts(queries, &[db], k, &exclude, 1)?;
    Ok((got.top, want))
}
