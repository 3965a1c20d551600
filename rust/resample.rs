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

/// Per-output-pixel filter taps along one axis.
struct Taps {
    /// Coefficients per output pixel, `ksize` each (unused tail is zero).
    ksize: usize,
    /// First input index and number of inputs per output pixel.
    bounds: Vec<(usize, usize)>,
    weights: Vec<f64>,
}

impl Taps {
    /// Pillow's `precompute_coeffs` for a full-range box (0, in_size).
    fn bicubic(in_size: usize, out_size: usize) -> Taps {
        let support_unit = 2.0;
        // Pillow passes the box as C floats; sizes are exact in f32 up to 2^24.
        let scale = (in_size as f32 as f64) / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = support_unit * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0.0f64; out_size * ksize];
        let inv = 1.0 / filterscale;
        for (xx, k) in weights.chunks_exact_mut(ksize).enumerate() {
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
            bounds,
            weights,
        }
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
        let start = self.bounds[first].0;
        let (last_min, last_count) = self.bounds[first + count - 1];
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
    type Weights;
    fn weights(taps: &Taps) -> Self::Weights;
    fn tap(w: &Self::Weights, i: usize) -> Self::Acc;
    fn zero() -> Self::Acc;
    fn add(acc: Self::Acc, v: Self, k: Self::Acc) -> Self::Acc;
    fn finish(acc: Self::Acc) -> Self;

    /// `acc[i] += row[i] * k` for every i: the hot loop of both passes.
    fn accumulate(acc: &mut [Self::Acc], row: &[Self], k: Self::Acc) {
        for (a, &p) in acc.iter_mut().zip(row) {
            *a = Self::add(*a, p, k);
        }
    }
}

impl Sample for u8 {
    type Acc = i32;
    type Weights = Vec<i32>;
    fn weights(taps: &Taps) -> Vec<i32> {
        taps.fixed()
    }
    #[inline]
    fn tap(w: &Vec<i32>, i: usize) -> i32 {
        w[i]
    }
    #[inline]
    fn zero() -> i32 {
        1 << (PRECISION_BITS - 1)
    }
    #[inline]
    fn add(acc: i32, v: u8, k: i32) -> i32 {
        acc + v as i32 * k
    }
    #[inline]
    fn finish(acc: i32) -> u8 {
        clip8(acc)
    }

    fn accumulate(acc: &mut [i32], row: &[u8], k: i32) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { accumulate_u8_avx2(acc, row, k) };
            return;
        }
        accumulate_u8(acc, row, k);
    }
}

#[inline(always)]
fn accumulate_u8(acc: &mut [i32], row: &[u8], k: i32) {
    for (a, &p) in acc.iter_mut().zip(row) {
        *a += p as i32 * k;
    }
}

/// The same loop compiled for AVX2 (8 lanes of 32-bit multiply-add), chosen at run
/// time so one binary serves every x86-64 CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn accumulate_u8_avx2(acc: &mut [i32], row: &[u8], k: i32) {
    accumulate_u8(acc, row, k)
}

impl Sample for u16 {
    type Acc = f64;
    type Weights = Vec<f64>;
    fn weights(taps: &Taps) -> Vec<f64> {
        taps.weights.clone()
    }
    #[inline]
    fn tap(w: &Vec<f64>, i: usize) -> f64 {
        w[i]
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
    // Rows go through in blocks small enough that a transposed block stays in L1.
    const BLOCK: usize = 16;
    let ch = src.channels;
    let (x0, x1) = taps.span(cols.start, cols.len());
    let row_len = cols.len() * ch;
    let mut out = vec![T::default(); rows.len() * row_len];
    let mut transposed = Vec::new();
    let mut first = rows.start;
    while first < rows.end {
        let block = first..(first + BLOCK).min(rows.end);
        let lane = block.len() * ch;
        // transposed[x - x0] holds column x of every row of the block.
        transposed.clear();
        transposed.resize((x1 - x0) * lane, T::default());
        let lines = block
            .clone()
            .map(|y| &src.row(y)[(x0 - src.col0) * ch..(x1 - src.col0) * ch]);
        match ch {
            1 => transpose::<T, 1>(lines, &mut transposed, lane),
            2 => transpose::<T, 2>(lines, &mut transposed, lane),
            3 => transpose::<T, 3>(lines, &mut transposed, lane),
            _ => transpose::<T, 4>(lines, &mut transposed, lane),
        }
        let columns = Plane {
            data: &transposed,
            stride: lane,
            row0: x0,
            base: 0,
            col0: 0,
            cols: block.len(),
            channels: ch,
        };
        let out_t = vertical(&columns, taps, cols.clone());
        let dst =
            &mut out[(block.start - rows.start) * row_len..(block.end - rows.start) * row_len];
        let back = out_t.chunks_exact(lane);
        match ch {
            1 => transpose::<T, 1>(back, dst, row_len),
            2 => transpose::<T, 2>(back, dst, row_len),
            3 => transpose::<T, 3>(back, dst, row_len),
            _ => transpose::<T, 4>(back, dst, row_len),
        }
        first = block.end;
    }
    out
}

/// Writes pixel `x` of line `r` to `out[x * stride + r * CH..]`: a transpose of
/// `CH`-sample pixels. The pixel size is a constant so each copy is one move.
fn transpose<'a, T: Copy + 'a, const CH: usize>(
    lines: impl Iterator<Item = &'a [T]>,
    out: &mut [T],
    stride: usize,
) {
    for (r, line) in lines.enumerate() {
        for (x, px) in line.chunks_exact(CH).enumerate() {
            let at = x * stride + r * CH;
            let dst: &mut [T; CH] = (&mut out[at..at + CH]).try_into().expect("CH samples");
            let src: &[T; CH] = px.try_into().expect("CH samples");
            *dst = *src;
        }
    }
}

/// Vertical pass: output rows `rows` (of the full output height), every sample of
/// the rows `src` holds.
fn vertical<T: Sample>(src: &Plane<'_, T>, taps: &Taps, rows: std::ops::Range<usize>) -> Vec<T> {
    let kk = T::weights(taps);
    let row_len = src.cols * src.channels;
    let mut out = vec![T::default(); rows.len() * row_len];
    let mut acc = vec![T::zero(); row_len];
    for (dst, yy) in out.chunks_exact_mut(row_len.max(1)).zip(rows) {
        let (ymin, count) = taps.bounds[yy];
        acc.fill(T::zero());
        for j in 0..count {
            T::accumulate(
                &mut acc,
                src.row(ymin + j),
                T::tap(&kk, yy * taps.ksize + j),
            );
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = T::finish(a);
        }
    }
    out
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
    let horiz = (out_w != w).then(|| Taps::bicubic(w, out_w));
    let vert = (out_h != h).then(|| Taps::bicubic(h, out_h));
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
            let taps = Taps::bicubic(i, o);
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
    fn constant_images_stay_constant() {
        let src = vec![77u8; 50 * 30 * 3];
        let out = bicubic_u8(&src, (50, 30), 3, (336, 201), full(336, 201));
        assert!(out.iter().all(|&v| v == 77));
        let out16 = bicubic_u16(&vec![300u16; 20 * 10], (20, 10), (7, 3), full(7, 3));
        assert!(out16.iter().all(|&v| v == 300));
    }

    #[test]
    fn window_equals_crop_of_full_resize() {
        let (w, h) = (37, 23);
        let src: Vec<u8> = (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect();
        let (ow, oh) = (61, 40);
        let whole = bicubic_u8(&src, (w, h), 3, (ow, oh), full(ow, oh));
        let win = Window {
            left: 9,
            top: 5,
            width: 30,
            height: 31,
        };
        let part = bicubic_u8(&src, (w, h), 3, (ow, oh), win);
        for y in 0..win.height {
            let a = &whole[((y + win.top) * ow + win.left) * 3..][..win.width * 3];
            assert_eq!(&part[y * win.width * 3..][..win.width * 3], a);
        }
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
    fn pass_order_follows_pillow_13() {
        assert!(vertical_first((338, 808), (336, 803)));
        assert!(!vertical_first((338, 400), (336, 397)));
        assert!(!vertical_first((640, 480), (448, 336)));
        assert!(vertical_first((800, 338), (803, 336)));
        assert!(!vertical_first((256, 256), (336, 336)));
    }

    #[test]
    fn window_equals_crop_in_both_pass_orders() {
        for (w, h, ow, oh) in [(37, 23, 61, 40), (40, 90, 38, 60)] {
            let src: Vec<u8> = (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect();
            let whole = bicubic_u8(&src, (w, h), 3, (ow, oh), full(ow, oh));
            let win = Window {
                left: 3,
                top: 5,
                width: 30,
                height: 20,
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

    #[test]
    #[ignore = "timing probe, run with --release --ignored --nocapture"]
    fn time_photo_resize() {
        let (w, h) = (640, 480);
        let src: Vec<u8> = (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect();
        let win = Window {
            left: 56,
            top: 0,
            width: 336,
            height: 336,
        };
        let t = std::time::Instant::now();
        for _ in 0..100 {
            std::hint::black_box(bicubic_u8(&src, (w, h), 3, (448, 336), win));
        }
        eprintln!("resize 640x480 -> crop: {:?} per image", t.elapsed() / 100);
        let hz = Taps::bicubic(w, 448);
        let whole = Plane {
            data: &src,
            stride: w * 3,
            row0: 0,
            base: 0,
            col0: 0,
            cols: w,
            channels: 3,
        };
        let t = std::time::Instant::now();
        for _ in 0..100 {
            std::hint::black_box(horizontal(&whole, &hz, 0..480, 56..392));
        }
        eprintln!("horizontal pass: {:?}", t.elapsed() / 100);
        let data = vec![7u8; 640 * 1440];
        let cols = Plane {
            data: &data,
            stride: 1440,
            row0: 0,
            base: 0,
            col0: 0,
            cols: 480,
            channels: 3,
        };
        let t = std::time::Instant::now();
        for _ in 0..100 {
            std::hint::black_box(vertical(&cols, &hz, 56..392));
        }
        eprintln!("vertical-style core: {:?}", t.elapsed() / 100);
        let mut acc = vec![0i32; 1440];
        let row = vec![3u8; 1440];
        let t = std::time::Instant::now();
        for _ in 0..100 * 2016 {
            <u8 as Sample>::accumulate(std::hint::black_box(&mut acc), &row, 5);
        }
        eprintln!("2016 accumulates: {:?}", t.elapsed() / 100);
    }
}
