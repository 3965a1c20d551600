//! Image decoding into the pixel modes Pillow would produce for the same bytes.
//!
//! The reference preprocessing works on whatever mode `PIL.Image.open` gives ("L",
//! "RGB", "RGBA", "LA", "P", "1", "I;16"), and resizes each mode differently. So the
//! decoder keeps the mode instead of converting everything to RGB up front.
//!
//! JPEG goes through libjpeg-turbo's TurboJPEG API with its default settings (ISLOW
//! IDCT, fancy upsampling), which is what Pillow's libjpeg-turbo decoder does. PNG is
//! lossless, so the `png` crate gives the same samples as libpng; only the unpacking
//! into Pillow's modes needs care. Formats and modes without a bit-exact path here
//! (WebP, GIF, BMP, TIFF, CMYK JPEG, ...) are reported as `Fallback` so the caller
//! can hand them to Pillow itself.

use std::ffi::CStr;
use std::io::Cursor;
use std::os::raw::{c_char, c_int, c_ulong, c_void};

/// Pixels in one of Pillow's modes.
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    /// 8-bit interleaved samples: 1 = "L", 2 = "LA", 3 = "RGB", 4 = "RGBA".
    Bytes { channels: usize, data: Vec<u8> },
    /// "P": palette indices and a 256-entry RGB palette (missing entries are black).
    Palette {
        indices: Vec<u8>,
        palette: Vec<[u8; 3]>,
    },
    /// "1": one byte per pixel, 0 or 255.
    Bilevel(Vec<u8>),
    /// "I;16": 16-bit grayscale.
    Gray16(Vec<u16>),
}

/// A decoded image.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub width: usize,
    pub height: usize,
    pub pixels: Pixels,
}

/// Why an image could not be decoded here.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// Zero bytes.
    Empty,
    /// Not an image format at all (an HTML page, random bytes, ...).
    NotAnImage,
    /// The data ends before the image does.
    Truncated(String),
    /// More pixels than the caller allows (decompression-bomb guard).
    TooLarge {
        width: u64,
        height: u64,
        max_pixels: u64,
    },
    /// A recognised format whose data is broken.
    Corrupt(String),
    /// Format or mode without a bit-exact decoder here: decode it with Pillow instead.
    Fallback(String),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty: zero bytes"),
            DecodeError::NotAnImage => write!(f, "not an image: unrecognised data"),
            DecodeError::Truncated(detail) => write!(f, "truncated: {detail}"),
            DecodeError::TooLarge {
                width,
                height,
                max_pixels,
            } => write!(
                f,
                "too large: {width}x{height} exceeds max_pixels ({max_pixels})"
            ),
            DecodeError::Corrupt(detail) => write!(f, "corrupt: {detail}"),
            DecodeError::Fallback(detail) => write!(f, "unsupported format: {detail}"),
        }
    }
}

/// Container formats told apart by their first bytes (never by file extension:
/// img2dataset names every member `.jpg` whatever it holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    Gif,
    Webp,
    Bmp,
    Tiff,
    Unknown,
    Markup,
}

/// Identify the container format from the leading bytes.
pub fn sniff(data: &[u8]) -> Format {
    if data.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Format::Jpeg
    } else if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        Format::Png
    } else if data.starts_with(b"GIF87a") || data.starts_with(b"GIF89a") {
        Format::Gif
    } else if data.len() >= 12 && &data[..4] == b"RIFF" && &data[8..12] == b"WEBP" {
        Format::Webp
    } else if data.starts_with(b"BM") {
        Format::Bmp
    } else if data.starts_with(b"II*\0") || data.starts_with(b"MM\0*") {
        Format::Tiff
    } else if looks_like_markup(data) {
        Format::Markup
    } else {
        Format::Unknown
    }
}

/// HTML error pages and XML are the usual non-images in scraped datasets.
fn looks_like_markup(data: &[u8]) -> bool {
    let body = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    body.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'<' || b == b'{')
}

/// Decode `data` into Pillow's mode for it, refusing images over `max_pixels`.
///
/// `jpeg_scale` asks libjpeg-turbo to downscale in the DCT domain by `num/8`
/// (8 = full size); only the `fast` preprocessing mode passes anything else.
pub fn decode(data: &[u8], max_pixels: u64, jpeg_scale: JpegScale) -> Result<Decoded, DecodeError> {
    if data.is_empty() {
        return Err(DecodeError::Empty);
    }
    match sniff(data) {
        Format::Jpeg => decode_jpeg(data, max_pixels, jpeg_scale),
        Format::Png => decode_png(data, max_pixels),
        Format::Gif => Err(DecodeError::Fallback("GIF".into())),
        Format::Webp => Err(DecodeError::Fallback("WebP".into())),
        Format::Bmp => Err(DecodeError::Fallback("BMP".into())),
        Format::Tiff => Err(DecodeError::Fallback("TIFF".into())),
        Format::Markup => Err(DecodeError::NotAnImage),
        // Pillow knows more formats (PPM, TGA, ICO, ...): let it decide.
        Format::Unknown => Err(DecodeError::Fallback("unrecognised signature".into())),
    }
}

/// Width and height of the image without decoding pixels, where the format is known here.
pub fn dimensions(data: &[u8]) -> Option<(usize, usize)> {
    match sniff(data) {
        Format::Jpeg => jpeg_header(data).ok().map(|h| (h.width, h.height)),
        Format::Png => {
            let reader = png::Decoder::new(Cursor::new(data)).read_info().ok()?;
            let info = reader.info();
            Some((info.width as usize, info.height as usize))
        }
        _ => None,
    }
}

fn check_size(width: usize, height: usize, max_pixels: u64) -> Result<(), DecodeError> {
    let (w, h) = (width as u64, height as u64);
    if w == 0 || h == 0 {
        return Err(DecodeError::Corrupt(format!(
            "image has zero size ({w}x{h})"
        )));
    }
    if w.saturating_mul(h) > max_pixels {
        return Err(DecodeError::TooLarge {
            width: w,
            height: h,
            max_pixels,
        });
    }
    Ok(())
}

// ==== JPEG (TurboJPEG 2.x API, present in libjpeg-turbo 2.x and 3.x) ====

const TJPF_RGB: c_int = 0;
const TJPF_GRAY: c_int = 6;
const TJCS_RGB: c_int = 0;
const TJCS_YCBCR: c_int = 1;
const TJCS_GRAY: c_int = 2;
const TJERR_WARNING: c_int = 0;

#[link(name = "turbojpeg")]
extern "C" {
    fn tjInitDecompress() -> *mut c_void;
    fn tjDecompressHeader3(
        handle: *mut c_void,
        jpeg_buf: *const u8,
        jpeg_size: c_ulong,
        width: *mut c_int,
        height: *mut c_int,
        subsamp: *mut c_int,
        colorspace: *mut c_int,
    ) -> c_int;
    fn tjDecompress2(
        handle: *mut c_void,
        jpeg_buf: *const u8,
        jpeg_size: c_ulong,
        dst_buf: *mut u8,
        width: c_int,
        pitch: c_int,
        height: c_int,
        pixel_format: c_int,
        flags: c_int,
    ) -> c_int;
    fn tjGetErrorStr2(handle: *mut c_void) -> *mut c_char;
    fn tjGetErrorCode(handle: *mut c_void) -> c_int;
    fn tjDestroy(handle: *mut c_void) -> c_int;
}

/// One TurboJPEG decompressor per thread: creating one costs more than a small decode.
struct TjHandle(*mut c_void);

impl TjHandle {
    fn error(&self) -> (bool, String) {
        // SAFETY: the handle is valid for the lifetime of self; the returned string is
        // owned by the handle and copied before the next call.
        unsafe {
            let warning = tjGetErrorCode(self.0) == TJERR_WARNING;
            let msg = tjGetErrorStr2(self.0);
            let text = if msg.is_null() {
                String::from("unknown libjpeg-turbo error")
            } else {
                CStr::from_ptr(msg).to_string_lossy().into_owned()
            };
            (warning, text)
        }
    }
}

impl Drop for TjHandle {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by tjInitDecompress and destroyed once.
            unsafe {
                tjDestroy(self.0);
            }
        }
    }
}

thread_local! {
    static TJ: TjHandle = TjHandle(unsafe { tjInitDecompress() });
}

/// DCT-domain downscaling factor `num/8` for JPEG decoding (8 = none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegScale(pub u8);

impl JpegScale {
    pub const NONE: JpegScale = JpegScale(8);

    /// Scaled size as libjpeg computes it: ceil(size * num / 8).
    pub fn apply(self, size: usize) -> usize {
        (size * self.0 as usize).div_ceil(8)
    }

    /// The strongest of 1/8, 2/8, 4/8 that keeps the short side at least `target`, so
    /// the resampler still only ever shrinks; none for images under twice the target.
    pub fn for_target(width: usize, height: usize, target: usize) -> JpegScale {
        let short = width.min(height);
        for num in [1u8, 2, 4] {
            if JpegScale(num).apply(short) >= target {
                return JpegScale(num);
            }
        }
        JpegScale::NONE
    }
}

pub struct JpegHeader {
    pub width: usize,
    pub height: usize,
    colorspace: c_int,
}

fn with_tj<T>(f: impl FnOnce(&TjHandle) -> Result<T, DecodeError>) -> Result<T, DecodeError> {
    TJ.with(|tj| {
        if tj.0.is_null() {
            return Err(DecodeError::Corrupt(
                "libjpeg-turbo could not create a decompressor".into(),
            ));
        }
        f(tj)
    })
}

pub fn jpeg_header(data: &[u8]) -> Result<JpegHeader, DecodeError> {
    let size = c_ulong::try_from(data.len())
        .map_err(|_| DecodeError::Corrupt("JPEG larger than the decoder can address".into()))?;
    with_tj(|tj| {
        let (mut w, mut h, mut sub, mut cs) = (0, 0, 0, 0);
        // SAFETY: data outlives the call; the out-pointers are valid locals.
        let rc = unsafe {
            tjDecompressHeader3(tj.0, data.as_ptr(), size, &mut w, &mut h, &mut sub, &mut cs)
        };
        if rc != 0 {
            let (_, msg) = tj.error();
            return Err(classify_jpeg_header_error(&msg));
        }
        Ok(JpegHeader {
            width: usize::try_from(w).unwrap_or(0),
            height: usize::try_from(h).unwrap_or(0),
            colorspace: cs,
        })
    })
}

fn classify_jpeg_header_error(msg: &str) -> DecodeError {
    if msg.contains("Premature end") || msg.contains("insufficient data") {
        DecodeError::Truncated(format!("JPEG header: {msg}"))
    } else if msg.contains("precision") || msg.contains("Unsupported") {
        DecodeError::Fallback(format!("JPEG: {msg}"))
    } else {
        DecodeError::Corrupt(format!("JPEG header: {msg}"))
    }
}

fn decode_jpeg(data: &[u8], max_pixels: u64, scale: JpegScale) -> Result<Decoded, DecodeError> {
    let header = jpeg_header(data)?;
    check_size(header.width, header.height, max_pixels)?;
    let (format, channels) = match header.colorspace {
        TJCS_YCBCR | TJCS_RGB => (TJPF_RGB, 3),
        TJCS_GRAY => (TJPF_GRAY, 1),
        // CMYK/YCCK: Pillow inverts Adobe CMYK and converts with its own formula.
        _ => return Err(DecodeError::Fallback("CMYK JPEG".into())),
    };
    let width = scale.apply(header.width);
    let height = scale.apply(header.height);
    let mut out = vec![0u8; width * height * channels];
    let size = data.len() as c_ulong;
    with_tj(|tj| {
        // SAFETY: `out` holds width*height*channels bytes, which is what TurboJPEG
        // writes for these dimensions and pixel format with pitch 0 (= packed rows).
        let rc = unsafe {
            tjDecompress2(
                tj.0,
                data.as_ptr(),
                size,
                out.as_mut_ptr(),
                width as c_int,
                0,
                height as c_int,
                format,
                0,
            )
        };
        if rc != 0 {
            let (warning, msg) = tj.error();
            // Pillow fails on data that ends early ("image file is truncated") but,
            // like libjpeg, decodes through other recoverable corruption.
            if msg.contains("Premature end of JPEG file") {
                return Err(DecodeError::Truncated(format!("JPEG: {msg}")));
            }
            if !warning {
                return Err(DecodeError::Corrupt(format!("JPEG: {msg}")));
            }
        }
        Ok(())
    })?;
    Ok(Decoded {
        width,
        height,
        pixels: Pixels::Bytes {
            channels,
            data: out,
        },
    })
}

// ==== PNG ====

fn png_error(err: png::DecodingError) -> DecodeError {
    match err {
        png::DecodingError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            DecodeError::Truncated("PNG data ends early".into())
        }
        png::DecodingError::IoError(e) => DecodeError::Truncated(format!("PNG: {e}")),
        png::DecodingError::LimitsExceeded => {
            DecodeError::Corrupt("PNG chunk exceeds the decoder's memory limit".into())
        }
        other => DecodeError::Corrupt(format!("PNG: {other}")),
    }
}

fn decode_png(data: &[u8], max_pixels: u64) -> Result<Decoded, DecodeError> {
    let mut decoder = png::Decoder::new(Cursor::new(data));
    decoder.set_transformations(png::Transformations::IDENTITY);
    // The pixel budget is enforced below, before the frame buffer is allocated; this
    // limit only has to admit every image under it (8 bytes per pixel at most).
    decoder.set_limits(png::Limits {
        bytes: usize::try_from(max_pixels.saturating_mul(8).saturating_add(64 << 20))
            .unwrap_or(usize::MAX),
    });
    let mut reader = decoder.read_info().map_err(png_error)?;
    let info = reader.info();
    let (width, height) = (info.width as usize, info.height as usize);
    check_size(width, height, max_pixels)?;
    let color = info.color_type;
    let depth = info.bit_depth as u8;
    let palette = info.palette.as_ref().map(|p| p.to_vec());
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| DecodeError::Corrupt("PNG frame size overflows".into()))?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(png_error)?;
    let line = frame.line_size;
    let raw = RawPng {
        data: &buf,
        width,
        height,
        line,
    };
    let pixels = match (color, depth) {
        (png::ColorType::Grayscale, 1) => Pixels::Bilevel(raw.unpack_bits(1, |v| v * 255)),
        (png::ColorType::Grayscale, 2) => Pixels::Bytes {
            channels: 1,
            data: raw.unpack_bits(2, |v| v * 85),
        },
        (png::ColorType::Grayscale, 4) => Pixels::Bytes {
            channels: 1,
            data: raw.unpack_bits(4, |v| v * 17),
        },
        (png::ColorType::Grayscale, 8) => Pixels::Bytes {
            channels: 1,
            data: raw.packed(1),
        },
        (png::ColorType::Grayscale, 16) => Pixels::Gray16(raw.samples16()),
        (png::ColorType::Rgb, 8) => Pixels::Bytes {
            channels: 3,
            data: raw.packed(3),
        },
        // Pillow keeps the most significant byte of 16-bit samples ("RGB;16B").
        (png::ColorType::Rgb, 16) => Pixels::Bytes {
            channels: 3,
            data: raw.high_bytes(3),
        },
        (png::ColorType::GrayscaleAlpha, 8) => Pixels::Bytes {
            channels: 2,
            data: raw.packed(2),
        },
        // Pillow opens 16-bit gray+alpha as "RGBA" ("LA;16B"): gray copied to R, G, B.
        (png::ColorType::GrayscaleAlpha, 16) => Pixels::Bytes {
            channels: 4,
            data: raw
                .high_bytes(2)
                .chunks_exact(2)
                .flat_map(|la| [la[0], la[0], la[0], la[1]])
                .collect(),
        },
        (png::ColorType::Rgba, 8) => Pixels::Bytes {
            channels: 4,
            data: raw.packed(4),
        },
        (png::ColorType::Rgba, 16) => Pixels::Bytes {
            channels: 4,
            data: raw.high_bytes(4),
        },
        (png::ColorType::Indexed, 1 | 2 | 4 | 8) => Pixels::Palette {
            indices: if depth == 8 {
                raw.packed(1)
            } else {
                raw.unpack_bits(depth, |v| v)
            },
            palette: full_palette(palette.as_deref()),
        },
        (color, depth) => {
            return Err(DecodeError::Fallback(format!(
                "PNG {color:?} at {depth} bits"
            )))
        }
    };
    Ok(Decoded {
        width,
        height,
        pixels,
    })
}

fn full_palette(raw: Option<&[u8]>) -> Vec<[u8; 3]> {
    let mut palette = vec![[0u8; 3]; 256];
    if let Some(raw) = raw {
        for (entry, rgb) in palette.iter_mut().zip(raw.chunks_exact(3)) {
            *entry = [rgb[0], rgb[1], rgb[2]];
        }
    }
    palette
}

/// One decoded PNG frame as the `png` crate returns it: rows of `line` bytes.
struct RawPng<'a> {
    data: &'a [u8],
    width: usize,
    height: usize,
    line: usize,
}

impl RawPng<'_> {
    fn rows(&self) -> impl Iterator<Item = &[u8]> {
        self.data.chunks(self.line.max(1)).take(self.height)
    }

    fn packed(&self, channels: usize) -> Vec<u8> {
        let n = self.width * channels;
        let mut out = Vec::with_capacity(n * self.height);
        for row in self.rows() {
            out.extend_from_slice(&row[..n.min(row.len())]);
        }
        out.resize(n * self.height, 0);
        out
    }

    fn high_bytes(&self, channels: usize) -> Vec<u8> {
        let n = self.width * channels;
        let mut out = Vec::with_capacity(n * self.height);
        for row in self.rows() {
            out.extend(row.iter().step_by(2).take(n));
        }
        out.resize(n * self.height, 0);
        out
    }

    fn samples16(&self) -> Vec<u16> {
        let mut out = Vec::with_capacity(self.width * self.height);
        for row in self.rows() {
            out.extend(
                row.chunks_exact(2)
                    .take(self.width)
                    .map(|b| u16::from_be_bytes([b[0], b[1]])),
            );
        }
        out.resize(self.width * self.height, 0);
        out
    }

    fn unpack_bits(&self, bits: u8, map: impl Fn(u8) -> u8) -> Vec<u8> {
        let per_byte = 8 / bits as usize;
        let mask = (1u16 << bits) as u8 - 1;
        let mut out = Vec::with_capacity(self.width * self.height);
        for row in self.rows() {
            for x in 0..self.width {
                let byte = row.get(x / per_byte).copied().unwrap_or(0);
                let shift = 8 - bits as usize * (x % per_byte + 1);
                out.push(map((byte >> shift) & mask));
            }
        }
        out.resize(self.width * self.height, 0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(
        color: png::ColorType,
        depth: png::BitDepth,
        w: u32,
        h: u32,
        data: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(color);
            enc.set_depth(depth);
            if color == png::ColorType::Indexed {
                enc.set_palette(vec![10, 20, 30, 40, 50, 60]);
            }
            let mut writer = enc.write_header().unwrap();
            writer.write_image_data(data).unwrap();
        }
        out
    }

    #[test]
    fn sniffs_by_content_not_name() {
        assert_eq!(sniff(b"\xFF\xD8\xFF\xE0rest"), Format::Jpeg);
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\nrest"), Format::Png);
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Format::Webp);
        assert_eq!(sniff(b"  <!DOCTYPE html>"), Format::Markup);
        assert_eq!(sniff(b"\x00\x01garbage"), Format::Unknown);
    }

    #[test]
    fn empty_and_markup_are_specific_failures() {
        assert_eq!(
            decode(b"", 1 << 20, JpegScale::NONE),
            Err(DecodeError::Empty)
        );
        assert_eq!(
            decode(b"<html><body>404</body></html>", 1 << 20, JpegScale::NONE),
            Err(DecodeError::NotAnImage)
        );
    }

    #[test]
    fn png_modes_unpack_like_pillow() {
        let gray2 = png_bytes(
            png::ColorType::Grayscale,
            png::BitDepth::Two,
            4,
            1,
            &[0b00_01_10_11],
        );
        let decoded = decode(&gray2, 100, JpegScale::NONE).unwrap();
        assert_eq!(
            decoded.pixels,
            Pixels::Bytes {
                channels: 1,
                data: vec![0, 85, 170, 255]
            }
        );
        let bilevel = png_bytes(
            png::ColorType::Grayscale,
            png::BitDepth::One,
            3,
            1,
            &[0b101_00000],
        );
        assert_eq!(
            decode(&bilevel, 100, JpegScale::NONE).unwrap().pixels,
            Pixels::Bilevel(vec![255, 0, 255])
        );
        let rgb16 = png_bytes(
            png::ColorType::Rgb,
            png::BitDepth::Sixteen,
            1,
            1,
            &[1, 2, 3, 4, 5, 6],
        );
        assert_eq!(
            decode(&rgb16, 100, JpegScale::NONE).unwrap().pixels,
            Pixels::Bytes {
                channels: 3,
                data: vec![1, 3, 5]
            }
        );
        let pal = png_bytes(
            png::ColorType::Indexed,
            png::BitDepth::Four,
            2,
            1,
            &[0x01_u8 << 4 | 0x05],
        );
        match decode(&pal, 100, JpegScale::NONE).unwrap().pixels {
            Pixels::Palette { indices, palette } => {
                assert_eq!(indices, vec![1, 5]);
                assert_eq!(palette[1], [40, 50, 60]);
                assert_eq!(palette[5], [0, 0, 0]);
            }
            other => panic!("expected a palette image, got {other:?}"),
        }
    }

    #[test]
    fn truncated_png_and_pixel_budget() {
        let data = vec![7u8; 64 * 64 * 3];
        let png = png_bytes(png::ColorType::Rgb, png::BitDepth::Eight, 64, 64, &data);
        assert!(matches!(
            decode(&png[..png.len() / 2], 1 << 20, JpegScale::NONE),
            Err(DecodeError::Truncated(_))
        ));
        assert_eq!(
            decode(&png, 1000, JpegScale::NONE),
            Err(DecodeError::TooLarge {
                width: 64,
                height: 64,
                max_pixels: 1000
            })
        );
    }

    #[test]
    fn jpeg_scale_keeps_twice_the_target() {
        assert_eq!(JpegScale::for_target(1280, 960, 336), JpegScale(4));
        assert_eq!(JpegScale::for_target(640, 480, 336), JpegScale::NONE);
        assert_eq!(JpegScale::for_target(4000, 3000, 336), JpegScale(1));
        assert_eq!(JpegScale::for_target(256, 256, 336), JpegScale::NONE);
        assert_eq!(JpegScale(1).apply(9), 2);
    }

    #[test]
    fn garbage_after_jpeg_signature_is_an_error_not_a_crash() {
        let mut data = vec![0xFF, 0xD8, 0xFF, 0xE0];
        data.extend(std::iter::repeat_n(0x42, 100));
        assert!(decode(&data, 1 << 20, JpegScale::NONE).is_err());
    }
}
