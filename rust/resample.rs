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

    /// Input rows needed for outputs `first..first + count`.
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

/// Bicubic resize of an interleaved 8-bit image (`channels` per pixel) to
/// `out_w` x `out_h`, returning only `win` (packed, `win.width * channels` per row).
pub fn bicubic_u8(
    src: &[u8],
    (w, h): (usize, usize),
    channels: usize,
    (out_w, out_h): (usize, usize),
    win: Window,
) -> Vec<u8> {
    let need_h = out_w != w;
    let need_v = out_h != h;
    let vert = need_v.then(|| Taps::bicubic(h, out_h));
    let (row0, row1) = match &vert {
        Some(taps) => taps.span(win.top, win.height),
        None => (win.top, win.top + win.height),
    };
    let row_len = win.width * channels;
    let tmp = if need_h {
        horizontal_u8(src, w, channels, out_w, row0..row1, win)
    } else {
        let mut out = Vec::with_capacity((row1 - row0) * row_len);
        for y in row0..row1 {
            let start = (y * w + win.left) * channels;
            out.extend_from_slice(&src[start..start + row_len]);
        }
        out
    };
    match vert {
        Some(taps) => vertical_u8(&tmp, row_len, row0, &taps, win),
        None => tmp,
    }
}

fn horizontal_u8(
    src: &[u8],
    w: usize,
    channels: usize,
    out_w: usize,
    rows: std::ops::Range<usize>,
    win: Window,
) -> Vec<u8> {
    let taps = Taps::bicubic(w, out_w);
    let kk = taps.fixed();
    let row_len = win.width * channels;
    let mut out = vec![0u8; rows.len() * row_len];
    let half = 1i32 << (PRECISION_BITS - 1);
    for (dst, y) in out.chunks_exact_mut(row_len).zip(rows) {
        let line = &src[y * w * channels..(y + 1) * w * channels];
        for (i, xx) in (win.left..win.left + win.width).enumerate() {
            let (xmin, count) = taps.bounds[xx];
            let k = &kk[xx * taps.ksize..xx * taps.ksize + count];
            let px = &line[xmin * channels..(xmin + count) * channels];
            let o = &mut dst[i * channels..(i + 1) * channels];
            match channels {
                3 => {
                    let (mut s0, mut s1, mut s2) = (half, half, half);
                    for (p, &kv) in px.chunks_exact(3).zip(k) {
                        s0 += p[0] as i32 * kv;
                        s1 += p[1] as i32 * kv;
                        s2 += p[2] as i32 * kv;
                    }
                    o[0] = clip8(s0);
                    o[1] = clip8(s1);
                    o[2] = clip8(s2);
                }
                1 => {
                    let mut s = half;
                    for (&p, &kv) in px.iter().zip(k) {
                        s += p as i32 * kv;
                    }
                    o[0] = clip8(s);
                }
                _ => {
                    for c in 0..channels {
                        let mut s = half;
                        for (p, &kv) in px.chunks_exact(channels).zip(k) {
                            s += p[c] as i32 * kv;
                        }
                        o[c] = clip8(s);
                    }
                }
            }
        }
    }
    out
}

fn vertical_u8(tmp: &[u8], row_len: usize, row0: usize, taps: &Taps, win: Window) -> Vec<u8> {
    let kk = taps.fixed();
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; win.height * row_len];
    let mut acc = vec![0i32; row_len];
    for (dst, yy) in out
        .chunks_exact_mut(row_len)
        .zip(win.top..win.top + win.height)
    {
        let (ymin, count) = taps.bounds[yy];
        acc.fill(half);
        for (j, &kv) in kk[yy * taps.ksize..yy * taps.ksize + count]
            .iter()
            .enumerate()
        {
            let r = ymin - row0 + j;
            let line = &tmp[r * row_len..(r + 1) * row_len];
            for (a, &p) in acc.iter_mut().zip(line) {
                *a += p as i32 * kv;
            }
        }
        for (d, &a) in dst.iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
    out
}

/// Pillow's `ROUND_UP` for the 16-bit path: round half away from zero, then truncate.
#[inline]
fn round_up(v: f64) -> i32 {
    if v >= 0.0 {
        (v + 0.5) as i32
    } else {
        (v - 0.5) as i32
    }
}

/// Pillow stores a 16-bit result as two separately clipped bytes.
#[inline]
fn store16(v: i32) -> u16 {
    let lo = (v % 256).clamp(0, 255) as u16;
    let hi = (v >> 8).clamp(0, 255) as u16;
    lo | (hi << 8)
}

/// Bicubic resize of a 16-bit grayscale ("I;16") image, double-precision weights as
/// in Pillow's 16bpc path; returns only `win`.
pub fn bicubic_u16(
    src: &[u16],
    (w, h): (usize, usize),
    (out_w, out_h): (usize, usize),
    win: Window,
) -> Vec<u16> {
    let vert = (out_h != h).then(|| Taps::bicubic(h, out_h));
    let (row0, row1) = match &vert {
        Some(taps) => taps.span(win.top, win.height),
        None => (win.top, win.top + win.height),
    };
    let mut tmp = Vec::with_capacity((row1 - row0) * win.width);
    if out_w != w {
        let taps = Taps::bicubic(w, out_w);
        for y in row0..row1 {
            let line = &src[y * w..(y + 1) * w];
            for xx in win.left..win.left + win.width {
                let (xmin, count) = taps.bounds[xx];
                let k = &taps.weights[xx * taps.ksize..];
                let mut s = 0.0;
                for (j, &p) in line[xmin..xmin + count].iter().enumerate() {
                    s += p as f64 * k[j];
                }
                tmp.push(store16(round_up(s)));
            }
        }
    } else {
        for y in row0..row1 {
            tmp.extend_from_slice(&src[y * w + win.left..y * w + win.left + win.width]);
        }
    }
    let Some(taps) = vert else { return tmp };
    let mut out = Vec::with_capacity(win.width * win.height);
    for yy in win.top..win.top + win.height {
        let (ymin, count) = taps.bounds[yy];
        let k = &taps.weights[yy * taps.ksize..];
        for x in 0..win.width {
            let mut s = 0.0;
            for (j, &kv) in k.iter().enumerate().take(count) {
                s += tmp[(ymin - row0 + j) * win.width + x] as f64 * kv;
            }
            out.push(store16(round_up(s)));
        }
    }
    out
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
    fn store16_clips_bytes_like_pillow() {
        assert_eq!(store16(-3), 0);
        assert_eq!(store16(70000), (70000 % 256) as u16 | 0xFF00);
        assert_eq!(store16(1000), 1000);
    }
}
