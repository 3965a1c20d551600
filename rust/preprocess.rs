//! CLIP image preprocessing, bit-exact with open_clip's transform on PIL images.
//!
//! The reference is `Resize(size, BICUBIC)` of the shortest side, `CenterCrop(size)`,
//! then `convert("RGB")`, `ToTensor` and `Normalize`. Each step is reproduced in the
//! order and the pixel mode Pillow uses (see `decode` and `resample`). Normalisation
//! goes through a per-channel 256-entry table the caller computes as torchvision does,
//! so normalised values equal the reference's to the last bit by construction.

use std::sync::{Arc, Weak};

use rayon::prelude::*;

use crate::cpu;
use crate::decode::{self, DecodeError, Decoded, JpegScale, Pixels};
use crate::resample::{self, Window};

/// `exact` reproduces the reference bit for bit; `fast` lets libjpeg-turbo downscale
/// large JPEGs in the DCT domain first (a small, documented deviation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Exact,
    Fast,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exact" => Ok(Mode::Exact),
            "fast" => Ok(Mode::Fast),
            other => Err(format!("mode must be 'exact' or 'fast', got {other:?}")),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Side of the square output (336 for ViT-L/14@336).
    pub size: usize,
    pub mode: Mode,
    /// Images with more pixels are refused before any pixel is decoded.
    pub max_pixels: u64,
}

/// torchvision's `Resize(size)` output for a `w` x `h` image: the short side becomes
/// `size`, the long side `int(size * long / short)`.
pub fn resized_dims(w: usize, h: usize, size: usize) -> (usize, usize) {
    let long_of = |short: usize, long: usize| ((size * long) as f64 / short as f64) as usize;
    if w <= h {
        (size, long_of(w, h))
    } else {
        (long_of(h, w), size)
    }
}

/// Most pixels the resized image (before the center crop) may have.
///
/// Only the crop window is computed here, so this bound is not about memory in Rust;
/// it keeps degenerate images (a 1 x 65535 strip resizes to 336 x 22,019,760) from
/// costing the Pillow fallback, which resizes the whole image, gigabytes, and keeps
/// both paths refusing the same images. 2^26 pixels admit aspect ratios up to about
/// 594:1 at 336 px. Python's `preprocess.MAX_RESIZED_PIXELS` is the same number.
pub const MAX_RESIZED_PIXELS: u64 = 1 << 26;

/// Refuse an image whose resize to `size` would exceed [`MAX_RESIZED_PIXELS`].
pub fn check_resize(w: usize, h: usize, size: usize) -> Result<(), DecodeError> {
    let (rw, rh) = resized_dims(w, h, size);
    if (rw as u64).saturating_mul(rh as u64) > MAX_RESIZED_PIXELS {
        return Err(DecodeError::TooLargeFor(format!(
            "{w}x{h} resizes to {rw}x{rh}, over {MAX_RESIZED_PIXELS} pixels"
        )));
    }
    Ok(())
}

/// torchvision's `CenterCrop(size)` offsets: `int(round((dim - size) / 2))`, where
/// Python's round sends halves to even.
pub fn center_window(w: usize, h: usize, size: usize) -> Window {
    let offset = |dim: usize| ((dim.saturating_sub(size)) as f64 / 2.0).round_ties_even() as usize;
    Window {
        left: offset(w),
        top: offset(h),
        width: size,
        height: size,
    }
}

#[inline]
fn muldiv255(a: u8, b: u8) -> u8 {
    let t = a as u32 * b as u32 + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// Pillow's "RGBA" -> "RGBa" (and "LA" -> "La"): colour channels times alpha / 255.
fn premultiply(data: &mut [u8], channels: usize) {
    for px in data.chunks_exact_mut(channels) {
        let alpha = px[channels - 1];
        for v in &mut px[..channels - 1] {
            *v = muldiv255(*v, alpha);
        }
    }
}

/// Pillow's "RGBa" -> "RGBA": undo the premultiplication with integer division.
fn unpremultiply(data: &mut [u8], channels: usize) {
    for px in data.chunks_exact_mut(channels) {
        let alpha = px[channels - 1] as u32;
        if alpha != 0 && alpha != 255 {
            for v in &mut px[..channels - 1] {
                *v = ((255 * *v as u32) / alpha).min(255) as u8;
            }
        }
    }
}

fn gray_to_rgb(gray: impl Iterator<Item = u8>, n: usize) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(n * 3);
    for v in gray {
        rgb.extend_from_slice(&[v, v, v]);
    }
    rgb
}

/// Decode, resize, center-crop and convert one image: `size * size * 3` RGB bytes.
pub fn rgb_crop(data: &[u8], opts: &Options) -> Result<Vec<u8>, DecodeError> {
    let scale = match (opts.mode, decode::sniff(data)) {
        (Mode::Fast, decode::Format::Jpeg) => match decode::jpeg_header(data) {
            Ok(h) => JpegScale::for_target(h.width, h.height, opts.size),
            Err(e) => return Err(e),
        },
        _ => JpegScale::NONE,
    };
    let image = decode::decode(data, opts.max_pixels, scale)?;
    check_resize(image.width, image.height, opts.size)?;
    Ok(resize_crop_rgb(image, opts.size))
}

/// The reference's Resize + CenterCrop + convert("RGB") on a decoded image. Memory
/// and work follow the crop window (see `resample`); callers bound the resized size
/// with [`check_resize`].
pub fn resize_crop_rgb(image: Decoded, size: usize) -> Vec<u8> {
    let Decoded {
        width,
        height,
        pixels,
    } = image;
    let src = (width, height);
    let dst = resized_dims(width, height, size);
    let win = center_window(dst.0, dst.1, size);
    let n = size * size;
    match pixels {
        Pixels::Bytes { channels: 3, data } => resample::bicubic_u8(&data, src, 3, dst, win),
        Pixels::Bytes { channels: 1, data } => {
            let gray = resample::bicubic_u8(&data, src, 1, dst, win);
            gray_to_rgb(gray.into_iter(), n)
        }
        Pixels::Bytes { channels, mut data } => {
            // "LA" and "RGBA" are resized premultiplied, converted back, then the
            // alpha is dropped by convert("RGB"). Pillow skips all of that when the
            // size does not change.
            let resizes = src != dst;
            if resizes {
                premultiply(&mut data, channels);
            }
            let mut out = resample::bicubic_u8(&data, src, channels, dst, win);
            if resizes {
                unpremultiply(&mut out, channels);
            }
            if channels == 2 {
                gray_to_rgb(out.chunks_exact(2).map(|p| p[0]), n)
            } else {
                out.chunks_exact(channels)
                    .flat_map(|p| [p[0], p[1], p[2]])
                    .collect()
            }
        }
        Pixels::Palette { indices, palette } => {
            let idx = resample::nearest_u8(&indices, src, dst, win);
            idx.iter().flat_map(|&i| palette[i as usize]).collect()
        }
        Pixels::Bilevel(data) => {
            let bits = resample::nearest_u8(&data, src, dst, win);
            gray_to_rgb(bits.into_iter(), n)
        }
        Pixels::Gray16(data) => {
            let wide = resample::bicubic_u16(&data, src, dst, win);
            // Pillow's "I;16" -> "RGB" clips at 255 rather than scaling.
            gray_to_rgb(wide.into_iter().map(|v| v.min(255) as u8), n)
        }
    }
}

/// [`rgb_crop`], with a panic (a bug, but one that a crafted file could reach) turned
/// into this input's failure instead of ending the whole batch.
fn crop_isolated(data: &[u8], opts: &Options) -> Result<Vec<u8>, DecodeError> {
    std::panic::catch_unwind(|| rgb_crop(data, opts)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(DecodeError::Corrupt(format!(
            "the decoder failed on this input (internal error: {what})"
        )))
    })
}

/// Outcome of one input of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Ok,
    /// Could not be processed; the reason starts with a short category
    /// (`empty`, `not an image`, `truncated`, `too large`, `corrupt`,
    /// `unsupported format`).
    Failed(String),
    /// A format or mode without a bit-exact path here: preprocess it with Pillow.
    Fallback(String),
}

/// A new output buffer of `len` values, backed by huge pages where the kernel gives
/// them (see [`cpu::prefer_huge_pages`]). Streams recycle these through a
/// [`PixelPool`] rather than faulting in a fresh one per batch.
fn fresh<T: Copy + Default>(len: usize) -> Vec<T> {
    let mut pixels = vec![T::default(); len];
    cpu::prefer_huge_pages(&mut pixels);
    pixels
}

/// Preprocess every input on `threads` threads into `out`, which holds at least
/// `inputs.len() * plane` values; `write` turns one RGB crop (`size * size * 3` bytes,
/// HWC) into the `plane` output values of one image. Returns how many planes were
/// written (the `Ok` inputs, in input order, at the front of `out`) and the status of
/// every input. Values after those planes are unspecified.
pub fn batch_into<T, W>(
    inputs: &[&[u8]],
    opts: &Options,
    threads: usize,
    plane: usize,
    out: &mut [T],
    write: W,
) -> Result<(usize, Vec<Status>), String>
where
    T: Copy + Send + Sync,
    W: Fn(&[u8], &mut [T]) + Send + Sync,
{
    let need = inputs.len() * plane;
    if out.len() < need {
        return Err(format!(
            "the output holds {} values, {} inputs need {need}",
            out.len(),
            inputs.len()
        ));
    }
    let pixels = &mut out[..need];
    let work = || {
        pixels
            .par_chunks_mut(plane.max(1))
            .zip(inputs.par_iter())
            .map(|(slot, data)| match crop_isolated(data, opts) {
                Ok(rgb) => {
                    write(&rgb, slot);
                    Status::Ok
                }
                Err(DecodeError::Fallback(why)) => Status::Fallback(why),
                Err(err) => Status::Failed(err.to_string()),
            })
            .collect::<Vec<_>>()
    };
    let statuses = cpu::pool(threads)?.install(work);
    // Move the successful planes together, keeping input order.
    let mut kept = 0;
    for (i, status) in statuses.iter().enumerate() {
        if *status == Status::Ok {
            if kept != i {
                pixels.copy_within(i * plane..(i + 1) * plane, kept * plane);
            }
            kept += 1;
        }
    }
    Ok((kept, statuses))
}

/// What a batch's pixels are written as.
#[derive(Clone)]
pub enum Output {
    /// Normalised float32 values through a per-channel table, CHW.
    F32(Box<[[f32; 256]; 3]>),
    /// Normalised float16 values (as their bits) through a per-channel table, CHW.
    F16(Box<[[u16; 256]; 3]>),
    /// The uint8 RGB crop, HWC.
    U8,
}

/// Pixels of one batch (one plane per input whose status is `Ok`, in input order), or
/// a pooled buffer whose first values are a batch.
pub enum BatchPixels {
    F32(Vec<f32>),
    F16(Vec<u16>),
    U8(Vec<u8>),
}

impl BatchPixels {
    /// A new buffer of `len` values of `output`'s element type.
    fn fresh(output: &Output, len: usize) -> BatchPixels {
        match output {
            Output::F32(_) => BatchPixels::F32(fresh(len)),
            Output::F16(_) => BatchPixels::F16(fresh(len)),
            Output::U8 => BatchPixels::U8(fresh(len)),
        }
    }

    /// Number of values held.
    pub fn len(&self) -> usize {
        match self {
            BatchPixels::F32(v) => v.len(),
            BatchPixels::F16(v) => v.len(),
            BatchPixels::U8(v) => v.len(),
        }
    }

    /// Whether this buffer holds values of `output`'s element type.
    fn fits(&self, output: &Output) -> bool {
        matches!(
            (self, output),
            (BatchPixels::F32(_), Output::F32(_))
                | (BatchPixels::F16(_), Output::F16(_))
                | (BatchPixels::U8(_), Output::U8)
        )
    }

    fn as_mut(&mut self) -> PixelsMut<'_> {
        match self {
            BatchPixels::F32(v) => PixelsMut::F32(v),
            BatchPixels::F16(v) => PixelsMut::F16(v),
            BatchPixels::U8(v) => PixelsMut::U8(v),
        }
    }

    fn truncate(&mut self, len: usize) {
        match self {
            BatchPixels::F32(v) => v.truncate(len),
            BatchPixels::F16(v) => v.truncate(len),
            BatchPixels::U8(v) => v.truncate(len),
        }
    }
}

/// Where a batch is written: a caller's buffer of one of the output element types.
pub enum PixelsMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [u16]),
    U8(&'a mut [u8]),
}

/// Preprocess `inputs` into a fresh buffer, with the element type and writer chosen
/// by `output`: one plane per input whose status is `Ok`, in input order.
pub fn batch_as(
    inputs: &[&[u8]],
    opts: &Options,
    threads: usize,
    output: &Output,
) -> Result<(BatchPixels, Vec<Status>), String> {
    let plane = 3 * opts.size * opts.size;
    let mut pixels = BatchPixels::fresh(output, inputs.len() * plane);
    let (kept, statuses) = batch_as_into(inputs, opts, threads, output, pixels.as_mut())?;
    pixels.truncate(kept * plane);
    Ok((pixels, statuses))
}

/// [`batch_into`] with the writer chosen by `output`, into `out` (whose element type
/// must be `output`'s): returns the number of planes written and every input's status.
pub fn batch_as_into(
    inputs: &[&[u8]],
    opts: &Options,
    threads: usize,
    output: &Output,
    out: PixelsMut<'_>,
) -> Result<(usize, Vec<Status>), String> {
    let plane = 3 * opts.size * opts.size;
    match (output, out) {
        (Output::F32(lut), PixelsMut::F32(out)) => {
            batch_into(inputs, opts, threads, plane, out, |rgb, o| {
                write_normalised(rgb, o, lut)
            })
        }
        (Output::F16(lut), PixelsMut::F16(out)) => {
            batch_into(inputs, opts, threads, plane, out, |rgb, o| {
                write_normalised(rgb, o, lut)
            })
        }
        (Output::U8, PixelsMut::U8(out)) => {
            batch_into(inputs, opts, threads, plane, out, |rgb, o: &mut [u8]| {
                o.copy_from_slice(rgb)
            })
        }
        _ => Err("the output buffer's element type does not match the output kind".into()),
    }
}

// ==== Output buffers recycled across the batches of a stream ====

/// Output buffers a stream reuses: a batch's buffer comes back here once its last
/// user lets go of it (see [`Pooled`]), so a long stream stops faulting in (and the
/// kernel stops zeroing) fresh memory for every batch. A buffer is only ever taken
/// from the free list, never while a [`Pooled`] still holds it.
pub struct PixelPool {
    free: std::sync::Mutex<Vec<BatchPixels>>,
    /// Most free buffers kept; more returned ones are freed.
    keep: usize,
}

impl PixelPool {
    pub fn new(keep: usize) -> Arc<PixelPool> {
        Arc::new(PixelPool {
            free: std::sync::Mutex::new(Vec::new()),
            keep,
        })
    }

    fn free_list(&self) -> std::sync::MutexGuard<'_, Vec<BatchPixels>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A buffer of at least `len` values of `output`'s type: the smallest free one
    /// that fits, else a fresh one.
    pub fn take(self: &Arc<Self>, output: &Output, len: usize) -> Pooled {
        let reused = {
            let mut free = self.free_list();
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.fits(output) && b.len() >= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        Pooled {
            pixels: Some(reused.unwrap_or_else(|| BatchPixels::fresh(output, len))),
            used: 0,
            home: Arc::downgrade(self),
        }
    }
}

/// One batch's pixels in a [`PixelPool`] buffer: the first `used` values are the
/// batch. Dropping it hands the buffer back to its pool (if the pool still exists).
pub struct Pooled {
    pixels: Option<BatchPixels>,
    used: usize,
    home: Weak<PixelPool>,
}

impl Pooled {
    /// The whole buffer (the batch is its first [`Pooled::used`] values).
    pub fn buffer(&self) -> &BatchPixels {
        self.pixels
            .as_ref()
            .expect("a Pooled holds its buffer until dropped")
    }

    /// Number of values that belong to the batch.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Preprocess `inputs` into this buffer as [`batch_as_into`]; the written planes
    /// become the batch.
    pub fn fill(
        &mut self,
        inputs: &[&[u8]],
        opts: &Options,
        threads: usize,
        output: &Output,
    ) -> Result<Vec<Status>, String> {
        let plane = 3 * opts.size * opts.size;
        let pixels = self
            .pixels
            .as_mut()
            .expect("a Pooled holds its buffer until dropped");
        let (kept, statuses) = batch_as_into(inputs, opts, threads, output, pixels.as_mut())?;
        self.used = kept * plane;
        Ok(statuses)
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let (Some(pixels), Some(pool)) = (self.pixels.take(), self.home.upgrade()) else {
            return;
        };
        let mut free = pool.free_list();
        if free.len() < pool.keep {
            free.push(pixels);
        }
    }
}

/// Write an RGB crop as normalised CHW values through per-channel lookup tables.
pub fn write_normalised<T: Copy>(rgb: &[u8], out: &mut [T], lut: &[[T; 256]; 3]) {
    let n = rgb.len() / 3;
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        r[i] = lut[0][px[0] as usize];
        g[i] = lut[1][px[1] as usize];
        b[i] = lut[2][px[2] as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_dims_follow_torchvision() {
        assert_eq!(resized_dims(640, 480, 336), (448, 336));
        assert_eq!(resized_dims(480, 640, 336), (336, 448));
        assert_eq!(resized_dims(4000, 40, 336), (33600, 336));
        assert_eq!(resized_dims(1, 1, 336), (336, 336));
        assert_eq!(resized_dims(500, 333, 336), (504, 336));
    }

    #[test]
    fn center_window_rounds_half_to_even() {
        // (339 - 336) / 2 = 1.5 -> 2; (341 - 336) / 2 = 2.5 -> 2
        assert_eq!(center_window(339, 336, 336).left, 2);
        assert_eq!(center_window(341, 336, 336).left, 2);
        assert_eq!(center_window(336, 337, 336).top, 0);
    }

    #[test]
    fn muldiv255_matches_exact_rounding() {
        for a in 0..=255u32 {
            for b in [0u32, 1, 128, 254, 255] {
                let want = ((a * b) as f64 / 255.0).round() as u32;
                assert_eq!(muldiv255(a as u8, b as u8) as u32, want);
            }
        }
    }

    #[test]
    fn batch_keeps_order_and_reports_failures() {
        let opts = Options {
            size: 4,
            mode: Mode::Exact,
            max_pixels: 1 << 20,
        };
        let inputs: Vec<&[u8]> = vec![b"", b"<html></html>", b"\x00\x01junk"];
        let mut out = vec![0u8; 3 * 48];
        let (kept, statuses) = batch_into(&inputs, &opts, 2, 48, &mut out, |rgb, o| {
            o.copy_from_slice(rgb)
        })
        .unwrap();
        assert_eq!(kept, 0);
        assert!(matches!(&statuses[0], Status::Failed(r) if r.starts_with("empty")));
        assert!(matches!(&statuses[1], Status::Failed(r) if r.starts_with("not an image")));
        assert!(matches!(&statuses[2], Status::Fallback(_)));
    }

    #[test]
    fn batch_into_refuses_a_short_output() {
        let opts = Options {
            size: 4,
            mode: Mode::Exact,
            max_pixels: 1 << 20,
        };
        let inputs: Vec<&[u8]> = vec![b"", b""];
        let mut out = vec![0u8; 48];
        let err = batch_into(&inputs, &opts, 1, 48, &mut out, |_, _| {}).unwrap_err();
        assert!(err.contains("2 inputs need 96"), "{err}");
    }

    fn address(pooled: &Pooled) -> usize {
        match pooled.buffer() {
            BatchPixels::F32(v) => v.as_ptr() as usize,
            BatchPixels::F16(v) => v.as_ptr() as usize,
            BatchPixels::U8(v) => v.as_ptr() as usize,
        }
    }

    #[test]
    fn a_pooled_buffer_is_reused_only_after_it_is_dropped() {
        let pool = PixelPool::new(2);
        let first = pool.take(&Output::U8, 100);
        let second = pool.take(&Output::U8, 100);
        assert_ne!(
            address(&first),
            address(&second),
            "handed out twice while held"
        );
        let at = address(&first);
        drop(first);
        let third = pool.take(&Output::U8, 80);
        assert_eq!(address(&third), at, "a returned buffer that fits is reused");
        // a buffer of another element type or too small is never handed out
        let wide = pool.take(&Output::U8, 1000);
        assert_ne!(address(&wide), address(&second));
        drop(second);
        assert!(matches!(
            pool.take(&Output::F16(Box::new([[0; 256]; 3])), 10)
                .buffer(),
            BatchPixels::F16(_)
        ));
    }

    #[test]
    fn a_pool_keeps_at_most_its_bound_and_outlives_nothing() {
        let pool = PixelPool::new(1);
        let held: Vec<Pooled> = (0..3).map(|_| pool.take(&Output::U8, 10)).collect();
        drop(held);
        assert_eq!(pool.free_list().len(), 1);
        let orphan = pool.take(&Output::U8, 10);
        drop(pool);
        drop(orphan); // its pool is gone: the buffer is simply freed
    }

    #[test]
    fn pooled_fill_matches_a_fresh_batch() {
        let opts = Options {
            size: 8,
            mode: Mode::Exact,
            max_pixels: 1 << 20,
        };
        let mut png = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut png, 3, 2);
            encoder.set_color(png::ColorType::Rgb);
            let mut writer = encoder.write_header().unwrap();
            writer
                .write_image_data(&[
                    9, 200, 30, 40, 50, 60, 70, 80, 90, 1, 2, 3, 250, 128, 7, 77, 66, 55,
                ])
                .unwrap();
        }
        let inputs: Vec<&[u8]> = vec![&png, b"", &png];
        let (fresh, want) = batch_as(&inputs, &opts, 1, &Output::U8).unwrap();
        let pool = PixelPool::new(1);
        // dirty a buffer first: reuse must not depend on the buffer starting zeroed
        let mut dirty = pool.take(&Output::U8, 3 * 192);
        if let Some(BatchPixels::U8(v)) = dirty.pixels.as_mut() {
            v.fill(0xAB);
        }
        drop(dirty);
        let mut pooled = pool.take(&Output::U8, 3 * 192);
        let got = pooled.fill(&inputs, &opts, 1, &Output::U8).unwrap();
        assert_eq!(got, want);
        let (BatchPixels::U8(fresh), BatchPixels::U8(reused)) = (fresh, pooled.buffer()) else {
            panic!("uint8 output expected");
        };
        assert_eq!(pooled.used(), 2 * 192);
        assert_eq!(&reused[..pooled.used()], &fresh[..]);
    }
}
