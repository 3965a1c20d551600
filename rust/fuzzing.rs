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
