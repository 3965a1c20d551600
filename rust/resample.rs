//! Resampling that reproduces Pillow's `Image.resize` bit for bit.
//!
//! Pillow's bicubic resize is a separable convolution: a horizontal pass into an 8-bit
//! intermediate image, then a vertical pass. Filter weights are computed in double
//! precision, normalised per output pixel, and (for 8-bit images) rounded to 22-bit
//! fixed point. Integer sums are exact in any order, so this module is free to
//! restructure loops for speed as long as the weights and the rounding match.
//!
//! CLIP preprocessing center-crops right after resizing, so every function here takes
//! the crop `Window` and computes only the output pixels inside it (and only the
//! intermediate rows those need): the result equals resizing fully and cropping.

use crate::transpose;

/// The part of the resized image to produce, in resized-image coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub left: usize,
    pub top: usize,
    pub width: usize,
    pub height: usize,
}

/// Fixed-point precision of Pillow's 8-bit resampler: 32 bits minus 8 for the pixel
/// value minus 2 for sums of weights that leave [0, 1].
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (a = -0.5), evaluated in the same operation order.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Filter taps along one axis for a range of output pixels.
///
/// Only the outputs a crop window needs are computed, so memory follows the window,
/// not the resized image (a 1 x 10,000,000 image resized to 336 wide would otherwise
/// need weights for 3.4 billion rows).
struct Taps {
    /// Coefficients per output pixel, `ksize` each (unused tail is zero).
    ksize: usize,
    /// The first output pixel described.
    first: usize,
    /// First input index and number of inputs per output pixel, from `first` on.
    bounds: Vec<(usize, usize)>,
    weights: Vec<f64>,
}

impl Taps {
    /// Pillow's `precompute_coeffs` for a full-range box (0, in_size), for the output
    /// pixels `outputs` of `out_size` only (each pixel's taps do not depend on others).
    fn bicubic(in_size: usize, out_size: usize, outputs: std::ops::Range<usize>) -> Taps {
        let support_unit = 2.0;
        // Pillow passes the box as C floats; sizes are exact in f32 up to 2^24.
        let scale = (in_size as f32 as f64) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = support_unit * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let first = outputs.start;
        let mut bounds = Vec::with_capacity(outputs.len());
        let mut weights = vec![0.0f64; outputs.len() * ksize];
        let inv = 1.0 / filterscale;
        for (i, k) in weights.chunks_exact_mut(ksize).enumerate() {
            let xx = first + i;
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) conversion truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin);
            let mut total = 0.0;
            for (x, w) in k.iter_mut().enumerate().take(count) {
                *w = bicubic(((x + xmin) as f64 - center + 0.5) * inv);
                total += *w;
            }
            if total != 0.0 {
                for w in k.iter_mut().take(count) {
                    *w /= total;
                }
            }
            bounds.push((xmin, count));
        }
        Taps {
            ksize,
            first,
            bounds,
            weights,
        }
    }

    /// First input index and input count of output pixel `xx`.
    fn bound(&self, xx: usize) -> (usize, usize) {
        self.bounds[xx - self.first]
    }

    /// Weights rounded to fixed point the way Pillow's `normalize_coeffs_8bpc` does.
    fn fixed(&self) -> Vec<i32> {
        let one = (1u32 << PRECISION_BITS) as f64;
        self.weights
            .iter()
            .map(|&w| {
                if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                }
            })
            .collect()
    }

    /// Input indices needed for outputs `first..first + count`.
    fn span(&self, first: usize, count: usize) -> (usize, usize) {
        let start = self.bound(first).0;
        let (last_min, last_count) = self.bound(first + count - 1);
        (start, last_min + last_count)
    }
}

#[inline]
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow 13 runs the vertical pass first when the height shrinks by more than twice
/// as many pixels as the width does; the 8-bit rounding between the passes makes the
/// order visible in the result.
fn vertical_first((w, h): (usize, usize), (out_w, out_h): (usize, usize)) -> bool {
    let dh = h as i64 - out_h as i64;
    let dw = w as i64 - out_w as i64;
    dh > 0 && dh > dw * 2
}

/// A view of columns `col0..col0 + cols` of (part of) an image stored row-major with
/// `stride` samples per row; the stored data starts at row `row0`, column `base`.
/// Row and column numbers are those of the whole image.
struct Plane<'a, T> {
    data: &'a [T],
    stride: usize,
    row0: usize,
    base: usize,
    col0: usize,
    cols: usize,
    channels: usize,
}

impl<T> Plane<'_, T> {
    /// The view's part of row `y`; its first sample belongs to column `col0`.
    fn row(&self, y: usize) -> &[T] {
        let start = (y - self.row0) * self.stride + (self.col0 - self.base) * self.channels;
        &self.data[start..start + self.cols * self.channels]
    }
}

/// The arithmetic of one resampling pass: 8-bit fixed point, or 16-bit in f64.
trait Sample: Copy + Default {
    type Acc: Copy;
    type Weights: std::ops::Deref<Target = [Self::Acc]>;
    fn weights(taps: &Taps) -> Self::Weights;
    fn zero() -> Self::Acc;
    fn add(acc: Self::Acc, v: Self, k: Self::Acc) -> Self::Acc;
    fn finish(acc: Self::Acc) -> Self;

    /// Runs `pass` into `out`, `pass.row_len` samples per output row: the hot loop of
    /// both passes.
    fn convolve(pass: &Pass<'_, Self>, out: &mut [Self]) {
        convolve_blocked::<Self, 16>(pass, out)
    }

    /// `transpose::rows_to_columns`, or a faster equivalent.
    fn rows_to_columns<const CH: usize, const PW: usize>(
        lines: &[&[Self]],
        out: &mut [Self],
        stride: usize,
    ) {
        transpose::rows_to_columns::<Self, CH, PW>(lines, out, stride)
    }

    /// `transpose::columns_to_rows`, or a faster equivalent.
    fn columns_to_rows<const CH: usize, const PW: usize>(
        columns: &[Self],
        stride: usize,
        dst: &mut [Self],
        row_len: usize,
    ) {
        transpose::columns_to_rows::<Self, CH, PW>(columns, stride, dst, row_len)
    }
}

/// A vertical pass in the form the kernels take: output row `i` is the sum of the
/// `filters[i].1.len()` source rows from `filters[i].0` on, weighted by `filters[i].1`,
/// where source row `y` is `src[y * stride..][..row_len]`.
struct Pass<'a, T: Sample> {
    src: &'a [T],
    stride: usize,
    row_len: usize,
    filters: &'a [(usize, &'a [T::Acc])],
}

/// `Sample::convolve` in blocks of `N` lanes whose sums stay in registers while every
/// row is added in, rather than streaming a row of sums through memory once per row.
#[inline(always)]
fn convolve_blocked<T: Sample, const N: usize>(pass: &Pass<'_, T>, out: &mut [T]) {
    let n = pass.row_len;
    if n < N {
        return convolve_lanes(pass, out);
    }
    for (dst, &(first, weights)) in out.chunks_exact_mut(n).zip(pass.filters) {
        let rows = &pass.src[first * pass.stride..];
        let mut at = 0;
        while at < n {
            // The last block is moved back to end at `n`: it recomputes a few lanes
            // (to the same values) instead of needing a scalar tail.
            let start = at.min(n - N);
            let mut acc = [T::zero(); N];
            for (j, &w) in weights.iter().enumerate() {
                let row = &rows[j * pass.stride + start..][..N];
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a = T::add(*a, p, w);
                }
            }
            for (d, a) in dst[start..start + N].iter_mut().zip(acc) {
                *d = T::finish(a);
            }
            at = start + N;
        }
    }
}

/// `Sample::convolve` one lane at a time, for rows shorter than a block.
fn convolve_lanes<T: Sample>(pass: &Pass<'_, T>, out: &mut [T]) {
    for (dst, &(first, weights)) in out.chunks_exact_mut(pass.row_len).zip(pass.filters) {
        for (i, d) in dst.iter_mut().enumerate() {
            let mut acc = T::zero();
            for (j, &w) in weights.iter().enumerate() {
                acc = T::add(acc, pass.src[(first + j) * pass.stride + i], w);
            }
            *d = T::finish(acc);
        }
    }
}

impl Sample for u8 {
    type Acc = i32;
    type Weights = Vec<i32>;
    fn weights(taps: &Taps) -> Vec<i32> {
        taps.fixed()
    }
    #[inline(always)]
    fn zero() -> i32 {
        1 << (PRECISION_BITS - 1)
    }
    #[inline(always)]
    fn add(acc: i32, v: u8, k: i32) -> i32 {
        acc + v as i32 * k
    }
    #[inline(always)]
    fn finish(acc: i32) -> u8 {
        clip8(acc)
    }

    fn convolve(pass: &Pass<'_, u8>, out: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { convolve_u8_avx2(pass, out) };
            return;
        }
        convolve_blocked::<u8, 32>(pass, out);
    }

    fn rows_to_columns<const CH: usize, const PW: usize>(
        lines: &[&[u8]],
        out: &mut [u8],
        stride: usize,
    ) {
        transpose::rows_to_columns_u8::<CH, PW>(lines, out, stride)
    }

    fn columns_to_rows<const CH: usize, const PW: usize>(
        columns: &[u8],
        stride: usize,
        dst: &mut [u8],
        row_len: usize,
    ) {
        transpose::columns_to_rows_u8::<CH, PW>(columns, stride, dst, row_len)
    }
}

/// The u8 convolution compiled for AVX2 (8 lanes of 32-bit multiply-add), chosen at
/// run time so one binary serves every x86-64 CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn convolve_u8_avx2(pass: &Pass<'_, u8>, out: &mut [u8]) {
    convolve_blocked::<u8, 32>(pass, out)
}

impl Sample for u16 {
    type Acc = f64;
    type Weights = Vec<f64>;
    fn weights(taps: &Taps) -> Vec<f64> {
        taps.weights.clone()
    }
    #[inline]
    fn zero() -> f64 {
        0.0
    }
    #[inline]
    fn add(acc: f64, v: u16, k: f64) -> f64 {
        acc + v as f64 * k
    }
    #[inline]
    fn finish(acc: f64) -> u16 {
        // Pillow's ROUND_UP (half away from zero, then truncate) and CLIP16.
        let rounded = if acc >= 0.0 { acc + 0.5 } else { acc - 0.5 } as i64;
        rounded.clamp(0, 65535) as u16
    }
}

/// Horizontal pass: rows `rows` of `src`, output columns `cols` (of the full output
/// width). The rows are transposed so that the pass runs as a vertical one, whose
/// inner loop is a long, vectorisable multiply-add over whole rows; integer sums do
/// not depend on the order, so the result is unchanged.
fn horizontal<T: Sample>(
    src: &Plane<'_, T>,
    taps: &Taps,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> Vec<T> {
    match src.channels {
        1 => horizontal_as::<T, 1, 1>(src, taps, rows, cols),
        2 => horizontal_as::<T, 2, 2>(src, taps, rows, cols),
        // Three-sample pixels travel as four (the fourth is the next pixel's first
        // sample, and its result is overwritten) so that a pixel moves as one word.
        3 => horizontal_as::<T, 3, 4>(src, taps, rows, cols),
        _ => horizontal_as::<T, 4, 4>(src, taps, rows, cols),
    }
}

/// `horizontal` for `CH`-sample pixels, each stored as `PW >= CH` samples while
/// transposed.
fn horizontal_as<T: Sample, const CH: usize, const PW: usize>(
    src: &Plane<'_, T>,
    taps: &Taps,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> Vec<T> {
    // Rows go through in blocks small enough that a transposed block stays in L1.
    const BLOCK: usize = 16;
    let (x0, x1) = taps.span(cols.start, cols.len());
    let row_len = cols.len() * CH;
    let mut out = vec![T::default(); rows.len() * row_len];
    if row_len == 0 {
        return out;
    }
    let mut columns = vec![T::default(); (x1 - x0) * BLOCK * PW];
    let mut columns_out = vec![T::default(); cols.len() * BLOCK * PW];
    let weights = T::weights(taps);
    let filters = filters(taps, &weights, cols, x0);
    let mut lines = Vec::with_capacity(BLOCK);
    for (first, dst) in rows.step_by(BLOCK).zip(out.chunks_mut(BLOCK * row_len)) {
        let count = dst.len() / row_len;
        let lane = count * PW;
        // columns[x - x0] holds column x of every row of the block.
        lines.clear();
        lines.extend(
            (first..first + count).map(|y| &src.row(y)[(x0 - src.col0) * CH..(x1 - src.col0) * CH]),
        );
        let columns = &mut columns[..(x1 - x0) * lane];
        T::rows_to_columns::<CH, PW>(&lines, columns, lane);
        let view = Plane {
            data: columns,
            stride: lane,
            row0: x0,
            base: 0,
            col0: 0,
            cols: count,
            channels: PW,
        };
        let columns_out = &mut columns_out[..filters.len() * lane];
        vertical_into(&view, &filters, columns_out);
        T::columns_to_rows::<CH, PW>(columns_out, lane, dst, row_len);
    }
    out
}

/// Vertical pass: output rows `rows` (of the full output height), every sample of
/// the rows `src` holds.
fn vertical<T: Sample>(src: &Plane<'_, T>, taps: &Taps, rows: std::ops::Range<usize>) -> Vec<T> {
    let weights = T::weights(taps);
    let filters = filters(taps, &weights, rows.clone(), src.row0);
    let mut out = vec![T::default(); rows.len() * src.cols * src.channels];
    vertical_into(src, &filters, &mut out);
    out
}

/// Per output row of `rows`: the first source row it reads, counted from `row0`, and
/// the weights of the source rows from there on.
fn filters<'a, A>(
    taps: &Taps,
    weights: &'a [A],
    rows: std::ops::Range<usize>,
    row0: usize,
) -> Vec<(usize, &'a [A])> {
    rows.map(|yy| {
        let (first, count) = taps.bound(yy);
        (
            first - row0,
            &weights[(yy - taps.first) * taps.ksize..][..count],
        )
    })
    .collect()
}

/// `vertical` into `out`, with the `filters` of the output rows.
fn vertical_into<T: Sample>(src: &Plane<'_, T>, filters: &[(usize, &[T::Acc])], out: &mut [T]) {
    let pass = Pass {
        src: &src.data[(src.col0 - src.base) * src.channels..],
        stride: src.stride,
        row_len: src.cols * src.channels,
        filters,
    };
    if pass.row_len > 0 {
        T::convolve(&pass, out);
    }
}

/// Pillow's two-pass bicubic resize of `src` (`w` x `h`, `channels` interleaved
/// samples per pixel) to `out_w` x `out_h`, computing only `win`.
fn resize_two_pass<T: Sample>(
    src: &[T],
    (w, h): (usize, usize),
    channels: usize,
    (out_w, out_h): (usize, usize),
    win: Window,
) -> Vec<T> {
    let cols = win.left..win.left + win.width;
    let rows = win.top..win.top + win.height;
    let horiz = (out_w != w).then(|| Taps::bicubic(w, out_w, cols.clone()));
    let vert = (out_h != h).then(|| Taps::bicubic(h, out_h, rows.clone()));
    let whole = Plane {
        data: src,
        stride: w * channels,
        row0: 0,
        base: 0,
        col0: 0,
        cols: w,
        channels,
    };
    if vertical_first((w, h), (out_w, out_h)) {
        // Only the source columns the horizontal taps of `win` read.
        let (c0, c1) = horiz
            .as_ref()
            .map_or((cols.start, cols.end), |t| t.span(cols.start, win.width));
        let window = Plane {
            col0: c0,
            cols: c1 - c0,
            ..whole
        };
        let Some(vt) = &vert else {
            unreachable!("vertical-first implies a vertical pass")
        };
        let tmp = vertical(&window, vt, rows.clone());
        let tmp = Plane {
            data: &tmp,
            stride: (c1 - c0) * channels,
            row0: rows.start,
            base: c0,
            col0: c0,
            cols: c1 - c0,
            channels,
        };
        return match &horiz {
            Some(ht) => horizontal(&tmp, ht, rows, cols),
            None => tmp.data.to_vec(),
        };
    }
    // Horizontal first: only the source rows the vertical taps of `win` read.
    let (r0, r1) = vert
        .as_ref()
        .map_or((rows.start, rows.end), |t| t.span(rows.start, win.height));
    let tmp = match &horiz {
        Some(ht) => horizontal(&whole, ht, r0..r1, cols),
        None => {
            let mut out = Vec::with_capacity((r1 - r0) * win.width * channels);
            for y in r0..r1 {
                let line = whole.row(y);
                out.extend_from_slice(
                    &line[win.left * channels..(win.left + win.width) * channels],
                );
            }
            out
        }
    };
    let tmp = Plane {
        data: &tmp,
        stride: win.width * channels,
        row0: r0,
        base: win.left,
        col0: win.left,
        cols: win.width,
        channels,
    };
    match &vert {
        Some(vt) => vertical(&tmp, vt, rows),
        None => tmp.data.to_vec(),
    }
}

/// Bicubic resize of an interleaved 8-bit image (`channels` per pixel) to
/// `out_w` x `out_h`, returning only `win` (packed, `win.width * channels` per row).
pub fn bicubic_u8(
    src: &[u8],
    size: (usize, usize),
    channels: usize,
    out: (usize, usize),
    win: Window,
) -> Vec<u8> {
    resize_two_pass(src, size, channels, out, win)
}

/// Bicubic resize of a 16-bit grayscale ("I;16") image with double-precision weights,
/// as Pillow's 16bpc path does; returns only `win`.
pub fn bicubic_u16(
    src: &[u16],
    size: (usize, usize),
    out: (usize, usize),
    win: Window,
) -> Vec<u16> {
    resize_two_pass(src, size, 1, out, win)
}

/// Nearest-neighbour resize of a one-byte-per-pixel image as Pillow does it for "P"
/// and "1" images (`ImagingScaleAffine`: running f64 source positions, truncated);
/// returns only `win`. Out-of-range positions give 0, as Pillow's fill does.
pub fn nearest_u8(
    src: &[u8],
    (w, h): (usize, usize),
    (out_w, out_h): (usize, usize),
    win: Window,
) -> Vec<u8> {
    if (out_w, out_h) == (w, h) {
        let mut out = Vec::with_capacity(win.width * win.height);
        for y in win.top..win.top + win.height {
            out.extend_from_slice(&src[y * w + win.left..y * w + win.left + win.width]);
        }
        return out;
    }
    let positions = |in_size: usize, out_size: usize, first: usize, count: usize| {
        let step = (in_size as f32 as f64) / out_size as f64;
        let mut pos = step * 0.5;
        let mut out = Vec::with_capacity(count);
        for i in 0..first + count {
            if i >= first {
                // Pillow's COORD: negative -> -1, else truncate.
                let v = if pos < 0.0 { -1 } else { pos as i64 };
                out.push((v >= 0 && (v as usize) < in_size).then_some(v as usize));
            }
            pos += step;
        }
        out
    };
    let xs = positions(w, out_w, win.left, win.width);
    let ys = positions(h, out_h, win.top, win.height);
    let mut out = Vec::with_capacity(win.width * win.height);
    for y in ys {
        for x in &xs {
            out.push(match (y, x) {
                (Some(y), Some(x)) => src[y * w + x],
                _ => 0,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(w: usize, h: usize) -> Window {
        Window {
            left: 0,
            top: 0,
            width: w,
            height: h,
        }
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (i, o) in [(640, 448), (256, 336), (1000, 7), (3, 336)] {
            let taps = Taps::bicubic(i, o, 0..o);
            let kk = taps.fixed();
            for xx in 0..o {
                let s: i32 = kk[xx * taps.ksize..(xx + 1) * taps.ksize].iter().sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= taps.ksize as i32,
                    "{i}->{o} at {xx}"
                );
            }
        }
    }

    #[test]
    fn window_taps_equal_the_same_rows_of_full_taps() {
        for (i, o, range) in [(640, 448, 56..392), (3, 336, 100..336), (1000, 7, 2..5)] {
            let full = Taps::bicubic(i, o, 0..o);
            let part = Taps::bicubic(i, o, range.clone());
            assert_eq!(full.ksize, part.ksize);
            for xx in range {
                assert_eq!(full.bound(xx), part.bound(xx));
                let k = full.ksize;
                assert_eq!(
                    full.weights[xx * k..][..k],
                    part.weights[(xx - part.first) * k..][..k]
                );
            }
        }
    }

    #[test]
    fn thin_image_needs_taps_for_the_window_only() {
        // 1 x 65535 resized to 336 x 22,019,760: taps for the whole long axis would
        // take about a gigabyte; the 336-row window needs a few kilobytes.
        let src = vec![200u8; 65535];
        let (ow, oh) = (336, 22_019_760);
        let win = Window {
            left: 0,
            top: (oh - 336) / 2,
            width: 336,
            height: 336,
        };
        let vert = Taps::bicubic(65535, oh, win.top..win.top + win.height);
        assert_eq!(vert.weights.len(), 336 * vert.ksize);
        let out = bicubic_u8(&src, (1, 65535), 1, (ow, oh), win);
        assert!(out.len() == 336 * 336 && out.iter().all(|&v| v == 200));
    }

    #[test]
    fn constant_images_stay_constant() {
        let src = vec![77u8; 50 * 30 * 3];
        let out = bicubic_u8(&src, (50, 30), 3, (336, 201), full(336, 201));
        assert!(out.iter().all(|&v| v == 77));
        let out16 = bicubic_u16(&vec![300u16; 20 * 10], (20, 10), (7, 3), full(7, 3));
        assert!(out16.iter().all(|&v| v == 300));
    }

    #[test]
    fn nearest_picks_source_pixels() {
        let src: Vec<u8> = (0..12).collect();
        let out = nearest_u8(&src, (4, 3), (8, 6), full(8, 6));
        assert_eq!(&out[..8], &[0, 0, 1, 1, 2, 2, 3, 3]);
        assert_eq!(&out[40..], &[8, 8, 9, 9, 10, 10, 11, 11]);
    }

    #[test]
    fn sixteen_bit_results_round_and_clip_like_pillow() {
        assert_eq!(<u16 as Sample>::finish(-3.2), 0);
        assert_eq!(<u16 as Sample>::finish(70000.0), 65535);
        assert_eq!(<u16 as Sample>::finish(999.5), 1000);
    }

    #[test]
    fn simd_convolution_matches_the_scalar_one() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (in_size, out_size) in [(480, 336), (256, 336), (1280, 448), (9, 4)] {
            let taps = Taps::bicubic(in_size, out_size, 0..out_size);
            let weights = taps.fixed();
            let filters = filters(&taps, &weights, 0..out_size, 0);
            for row_len in [1, 5, 31, 32, 33, 63, 64, 100, 1441] {
                let stride = row_len + 3;
                let src: Vec<u8> = (0..in_size * stride).map(|_| noise() as u8).collect();
                let pass = Pass {
                    src: &src,
                    stride,
                    row_len,
                    filters: &filters,
                };
                let mut fast = vec![0u8; out_size * row_len];
                let mut plain = vec![0u8; out_size * row_len];
                <u8 as Sample>::convolve(&pass, &mut fast);
                convolve_lanes(&pass, &mut plain);
                assert_eq!(fast, plain, "{in_size}->{out_size}, {row_len} lanes");
                convolve_blocked::<u8, 32>(&pass, &mut fast);
                assert_eq!(fast, plain, "portable, {row_len} lanes");
            }
        }
    }

    #[test]
    fn pass_order_follows_pillow_13() {
        assert!(vertical_first((338, 808), (336, 803)));
        assert!(!vertical_first((338, 400), (336, 397)));
        assert!(!vertical_first((640, 480), (448, 336)));
        assert!(vertical_first((800, 338), (803, 336)));
        assert!(!vertical_first((256, 256), (336, 336)));
    }

    #[test]
    fn window_equals_crop_in_both_pass_orders() {
        let cases = [
            ((37, 23, 61, 40), (9, 5, 30, 31)),
            ((37, 23, 61, 40), (3, 5, 30, 20)),
            ((40, 90, 38, 60), (3, 5, 30, 20)),
        ];
        for ((w, h, ow, oh), (left, top, width, height)) in cases {
            let src: Vec<u8> = (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect();
            let whole = bicubic_u8(&src, (w, h), 3, (ow, oh), full(ow, oh));
            let win = Window {
                left,
                top,
                width,
                height,
            };
            let part = bicubic_u8(&src, (w, h), 3, (ow, oh), win);
            for y in 0..win.height {
                let a = &whole[((y + win.top) * ow + win.left) * 3..][..win.width * 3];
                assert_eq!(&part[y * win.width * 3..][..win.width * 3], a);
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use std::time::{Duration, Instant};

    /// The fastest of 7 rounds of 20 calls, per call: another process may share
    /// the core, and the minimum is the least disturbed estimate.
    fn best<R>(mut f: impl FnMut() -> R) -> Duration {
        (0..7)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..20 {
                    std::hint::black_box(f());
                }
                t.elapsed() / 20
            })
            .min()
            .unwrap_or_default()
    }

    fn photo(w: usize, h: usize) -> Vec<u8> {
        (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect()
    }

    #[test]
    #[ignore = "timing probe, run with --release --ignored --nocapture"]
    fn time_photo_resize() {
        for (w, h) in [(640, 480), (480, 640), (256, 256), (1280, 960)] {
            let src = photo(w, h);
            let (ow, oh) = if w >= h {
                (336 * w / h, 336)
            } else {
                (336, 336 * h / w)
            };
            let win = Window {
                left: (ow - 336) / 2,
                top: (oh - 336) / 2,
                width: 336,
                height: 336,
            };
            let t = best(|| bicubic_u8(&src, (w, h), 3, (ow, oh), win));
            eprintln!("resize {w}x{h} -> {ow}x{oh} -> crop: {t:?}");
        }
        let (w, h) = (640, 480);
        let src = photo(w, h);
        let hz = Taps::bicubic(w, 448, 56..392);
        let whole = Plane {
            data: &src,
            stride: w * 3,
            row0: 0,
            base: 0,
            col0: 0,
            cols: w,
            channels: 3,
        };
        let t = best(|| horizontal(&whole, &hz, 0..480, 56..392));
        eprintln!("  horizontal pass of 640x480: {t:?}");
        let vt = Taps::bicubic(h, 336, 0..336);
        let tmp = horizontal(&whole, &hz, 0..480, 56..392);
        let rows = Plane {
            data: &tmp,
            stride: 336 * 3,
            row0: 0,
            base: 0,
            col0: 0,
            cols: 336,
            channels: 3,
        };
        let t = best(|| vertical(&rows, &vt, 0..336));
        eprintln!("  vertical pass of 640x480: {t:?}");
    }
}
