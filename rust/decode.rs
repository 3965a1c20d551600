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
    /// Over a size bound other than `max_pixels`; the text says which.
    TooLargeFor(String),
    /// A recognised format in a variant that neither this decoder nor Pillow reads
    /// (a 12-bit JPEG): a failure, not a fallback.
    Unsupported(String),
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
            DecodeError::TooLargeFor(detail) => write!(f, "too large: {detail}"),
            DecodeError::Corrupt(detail) => write!(f, "corrupt: {detail}"),
            DecodeError::Fallback(detail) | DecodeError::Unsupported(detail) => {
                write!(f, "unsupported format: {detail}")
            }
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

/// A TurboJPEG decompressor for one image.
///
/// libjpeg keeps quantisation and Huffman tables in the decompressor from one image to
/// the next (for "abbreviated" JPEG streams), and TurboJPEG never resets a handle after
/// an error. A handle shared between images therefore lets one image change how the
/// next decodes: a JPEG without its DQT decodes with an earlier image's tables, and a
/// header error can leave the handle failing every later image. Each image gets its
/// own handle, dropped with it; creating one costs about a microsecond.
struct TjHandle(*mut c_void);

impl TjHandle {
    fn new() -> Result<TjHandle, DecodeError> {
        // SAFETY: plain constructor; a null result is handled below.
        let handle = unsafe { tjInitDecompress() };
        if handle.is_null() {
            return Err(DecodeError::Corrupt(
                "libjpeg-turbo could not create a decompressor".into(),
            ));
        }
        Ok(TjHandle(handle))
    }

    /// The last call's error: whether it was only a warning, and libjpeg's message.
    ///
    /// TurboJPEG 2.x reports any call during which a warning was emitted as a
    /// warning, even when a fatal error followed (its flag is never cleared), but its
    /// message is the fatal error's in that case (for warnings alone it is the first
    /// warning's). So a failure counts as a warning only if its message is one of
    /// libjpeg's warning messages.
    fn error(&self) -> (bool, String) {
        // SAFETY: the handle is valid for the lifetime of self; the returned string is
        // owned by the handle and copied before the next call.
        let (flagged, text) = unsafe {
            let flagged = tjGetErrorCode(self.0) == TJERR_WARNING;
            let msg = tjGetErrorStr2(self.0);
            let text = if msg.is_null() {
                String::from("unknown libjpeg-turbo error")
            } else {
                CStr::from_ptr(msg).to_string_lossy().into_owned()
            };
            (flagged, text)
        };
        (flagged && is_libjpeg_warning(&text), text)
    }

    fn header(&self, data: &[u8]) -> Result<JpegHeader, DecodeError> {
        let size = c_ulong::try_from(data.len())
            .map_err(|_| DecodeError::Corrupt("JPEG larger than the decoder can address".into()))?;
        let (mut w, mut h, mut sub, mut cs) = (0, 0, 0, 0);
        // SAFETY: data outlives the call; the out-pointers are valid locals.
        let rc = unsafe {
            tjDecompressHeader3(
                self.0,
                data.as_ptr(),
                size,
                &mut w,
                &mut h,
                &mut sub,
                &mut cs,
            )
        };
        if rc != 0 {
            // A warning ("N extraneous bytes before marker") still fills in the
            // header, and Pillow decodes such files: only errors stop here.
            let (warning, msg) = self.error();
            if !warning || msg.contains("Premature end") {
                return Err(classify_jpeg_error(&msg));
            }
        }
        Ok(JpegHeader {
            width: usize::try_from(w).unwrap_or(0),
            height: usize::try_from(h).unwrap_or(0),
            colorspace: cs,
        })
    }
}

/// Whether `msg` is one of libjpeg's warning (JWRN_*) messages, after which decoding
/// goes on (and Pillow decodes the image).
fn is_libjpeg_warning(msg: &str) -> bool {
    const WARNINGS: [&str; 7] = [
        "Corrupt JPEG data",
        "Premature end of JPEG file",
        "Inconsistent progression sequence",
        "Invalid SOS parameters for sequential JPEG",
        "Unknown Adobe color transform code",
        "Warning: unknown JFIF revision number",
        "Application transferred too many scanlines",
    ];
    WARNINGS.iter().any(|w| msg.starts_with(w))
}

impl Drop for TjHandle {
    fn drop(&mut self) {
        // SAFETY: created by tjInitDecompress (never null, see `new`), destroyed once.
        unsafe {
            tjDestroy(self.0);
        }
    }
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

/// Most scans a JPEG may have. Baseline files have one scan per component group,
/// libjpeg's and mozjpeg's progressive scripts use 6 to about 20, and libjpeg-turbo's
/// own fuzzers cap scans at 500. Every scan makes libjpeg walk all of its
/// component's blocks, so thousands of (nearly empty) scans are a cheap way to make
/// a small file cost seconds or minutes of CPU: they are refused instead.
pub const MAX_JPEG_SCANS: usize = 500;

/// Scans times pixels a JPEG may cost: each scan is a pass over all of its
/// component's blocks, so large images get fewer scans than [`MAX_JPEG_SCANS`]. 2^33
/// is about a second of decoding; it allows 500 scans up to 17 megapixels.
pub const JPEG_SCAN_PIXEL_BUDGET: u64 = 1 << 33;

/// Fewest scans allowed at any size: more than any progressive script in use.
pub const MIN_JPEG_SCAN_LIMIT: usize = 64;

/// Most scans a `w` x `h` JPEG may have: [`MAX_JPEG_SCANS`], fewer for images over
/// 17 megapixels (64 at Pillow's 179-megapixel bomb limit).
pub fn scan_limit(w: usize, h: usize) -> usize {
    let pixels = (w as u64).saturating_mul(h as u64).max(1);
    let by_budget = usize::try_from(JPEG_SCAN_PIXEL_BUDGET / pixels).unwrap_or(usize::MAX);
    by_budget.clamp(MIN_JPEG_SCAN_LIMIT, MAX_JPEG_SCANS)
}

/// What a walk over a JPEG's marker segments finds, without decoding anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct JpegLayout {
    /// SOS markers seen.
    scans: usize,
    /// The first frame header's marker (0xC0..=0xCF) and sample precision.
    frame: Option<(u8, u8)>,
    /// Width and height in the first frame header.
    frame_size: Option<(usize, usize)>,
    /// Whether an EOI marker was reached.
    eoi: bool,
}

/// Walk the marker segments of `data` (which starts with SOI), skipping entropy-coded
/// data (where 0xFF is followed by a stuffed 0x00 or an RSTn marker), up to EOI or the
/// end of the data. Stops early once more than `MAX_JPEG_SCANS` scans are seen.
fn jpeg_layout(data: &[u8]) -> JpegLayout {
    let mut layout = JpegLayout::default();
    let n = data.len();
    let mut pos = 2;
    loop {
        // Bytes before the next marker are "extraneous": libjpeg skips them with a
        // warning. Any number of 0xFF fill bytes may precede a marker.
        while pos < n && data[pos] != 0xFF {
            pos += 1;
        }
        while pos < n && data[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = data.get(pos) else {
            return layout;
        };
        pos += 1;
        match marker {
            0xD9 => {
                layout.eoi = true;
                return layout;
            }
            // Markers without a length field (0x00 is not a marker: skip it as data).
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let Some(len) = data
            .get(pos..pos + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
        else {
            return layout;
        };
        let body = data
            .get(pos + 2..(pos + len as usize).min(n))
            .unwrap_or_default();
        let is_frame = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_frame && layout.frame.is_none() {
            if let Some(&precision) = body.first() {
                layout.frame = Some((marker, precision));
            }
            if let Some(b) = body.get(1..5) {
                let h = u16::from_be_bytes([b[0], b[1]]) as usize;
                let w = u16::from_be_bytes([b[2], b[3]]) as usize;
                layout.frame_size = Some((w, h));
            }
        }
        pos += (len as usize).max(2);
        if marker == 0xDA {
            layout.scans += 1;
            if layout.scans > MAX_JPEG_SCANS {
                return layout;
            }
            pos = skip_entropy_data(data, pos);
        }
    }
}

/// The position of the first marker after entropy-coded data starting at `pos` (or
/// the end of the data): the 0xFF of a marker that is neither a stuffed 0x00 nor RSTn.
fn skip_entropy_data(data: &[u8], mut pos: usize) -> usize {
    while pos < data.len() {
        match data[pos..].iter().position(|&b| b == 0xFF) {
            None => return data.len(),
            Some(at) => pos += at,
        }
        match data.get(pos + 1) {
            None => return data.len(),
            Some(0x00 | 0xD0..=0xD7) => pos += 2,
            // A fill byte: the marker (or stuffing) follows it.
            Some(0xFF) => pos += 1,
            Some(_) => return pos,
        }
    }
    data.len()
}

/// Header facts libjpeg-turbo does not report well: scan bombs, precisions other
/// than 8 bits, data that ends before the frame header.
fn check_jpeg_layout(layout: &JpegLayout) -> Result<(), DecodeError> {
    if layout.scans > MAX_JPEG_SCANS {
        return Err(DecodeError::Corrupt(format!(
            "JPEG has more than {MAX_JPEG_SCANS} scans (limit {MAX_JPEG_SCANS})"
        )));
    }
    if let Some((w, h)) = layout.frame_size {
        let limit = scan_limit(w, h);
        if layout.scans > limit {
            return Err(DecodeError::Corrupt(format!(
                "JPEG has {} scans (limit {limit} for {w}x{h} pixels)",
                layout.scans
            )));
        }
    }
    match layout.frame {
        // Pillow's decoder reads 8-bit samples only (libjpeg-turbo's 12- and 16-bit
        // paths are separate APIs), so it fails on these too.
        Some((_, precision @ (12 | 16))) => {
            Err(DecodeError::Unsupported(format!("{precision}-bit JPEG")))
        }
        Some((_, precision)) if precision != 8 => Err(DecodeError::Corrupt(format!(
            "JPEG frame header gives a sample precision of {precision} bits"
        ))),
        None if !layout.eoi => Err(DecodeError::Truncated(
            "JPEG data ends before its frame header".into(),
        )),
        _ => Ok(()),
    }
}

/// Read a JPEG's header with a fresh decompressor.
pub fn jpeg_header(data: &[u8]) -> Result<JpegHeader, DecodeError> {
    let layout = jpeg_layout(data);
    check_jpeg_layout(&layout)?;
    let header = TjHandle::new()?.header(data)?;
    checked_header(header, &layout)
}

/// A header libjpeg accepted but that has no pixels (a tables-only stream).
fn checked_header(header: JpegHeader, layout: &JpegLayout) -> Result<JpegHeader, DecodeError> {
    if header.width == 0 || header.height == 0 {
        return Err(match layout.frame {
            None => DecodeError::Corrupt("JPEG has no frame header".into()),
            Some(_) => DecodeError::Corrupt(format!(
                "JPEG frame header gives zero size ({}x{})",
                header.width, header.height
            )),
        });
    }
    Ok(header)
}

fn classify_jpeg_error(msg: &str) -> DecodeError {
    if msg.contains("Premature end") || msg.contains("insufficient data") {
        DecodeError::Truncated(format!("JPEG: {msg}"))
    } else if msg.contains("Unsupported JPEG process") {
        // Lossless and hierarchical JPEGs: Pillow's newer libjpeg-turbo may decode
        // them, so the reference decides.
        DecodeError::Fallback(format!("JPEG: {msg}"))
    } else if msg.contains("Unsupported color conversion") {
        DecodeError::Unsupported(format!("JPEG: {msg}"))
    } else {
        DecodeError::Corrupt(format!("JPEG: {msg}"))
    }
}

fn decode_jpeg(data: &[u8], max_pixels: u64, scale: JpegScale) -> Result<Decoded, DecodeError> {
    let layout = jpeg_layout(data);
    check_jpeg_layout(&layout)?;
    if !layout.eoi && layout.scans != 1 {
        // libjpeg reads every scan of a multi-scan JPEG, up to EOI, before the first
        // output row, so Pillow's decoder runs out of data and reports the file as
        // truncated (libjpeg's memory source here would invent an EOI and warn).
        return Err(DecodeError::Truncated(if layout.scans == 0 {
            "JPEG data ends before its first scan".into()
        } else {
            "JPEG data ends before its last scan does".into()
        }));
    }
    // A single scan without EOI is truncated where libjpeg runs out of data (its
    // first warning says so, below); Pillow stops after the last row and does not
    // need the EOI otherwise.
    let header = checked_header(TjHandle::new()?.header(data)?, &layout)?;
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
    // A second handle: TurboJPEG 2.x never clears a handle's warning flag, so after
    // a header warning a fatal decode error would read as a warning.
    let tj = TjHandle::new()?;
    // SAFETY: `out` holds width*height*channels bytes, which is what TurboJPEG writes
    // for these dimensions and pixel format with pitch 0 (= packed rows).
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
        // Pillow fails on data that ends early ("image file is truncated") but, like
        // libjpeg, decodes through other recoverable corruption.
        if msg.contains("Premature end of JPEG file") {
            return Err(DecodeError::Truncated(format!("JPEG: {msg}")));
        }
        if !warning {
            return Err(classify_jpeg_error(&msg));
        }
    }
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
        other => DecodeError::Corrupt(format!("PNG: {}", tidy_png_message(other.to_string()))),
    }
}

/// Pillow's largest decompressed iCCP, zTXt or iTXt payload (`MAX_TEXT_CHUNK`).
const PNG_MAX_TEXT_CHUNK: usize = 1 << 20;
/// Pillow's budget for all text of one PNG (`MAX_TEXT_MEMORY`).
const PNG_MAX_TEXT_MEMORY: usize = 64 * PNG_MAX_TEXT_CHUNK;

/// A chunk type for messages: its four letters, or escaped bytes when not letters.
fn chunk_name(cid: &[u8]) -> String {
    cid.iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}

/// Inflate a zlib stream up to `limit` bytes: `Some(len)` of what it gives (a broken
/// stream gives what came out before the break, as Python's zlib does), `None` if it
/// holds more than `limit` bytes.
fn inflated_len(data: &[u8], limit: usize) -> Option<usize> {
    use miniz_oxide::inflate::{decompress_to_vec_zlib_with_limit, TINFLStatus};
    match decompress_to_vec_zlib_with_limit(data, limit) {
        Ok(out) => Some(out.len()),
        Err(e) if e.status == TINFLStatus::HasMoreOutput => None,
        Err(e) => Some(e.output.len()),
    }
}

/// Where Pillow reads a PNG's chunks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PngPart {
    /// `Image.open`: every chunk is checked, checksums included.
    Header,
    /// After the image data (`load_end`): handlers run, checksums are not checked.
    Trailer,
}

/// The checks Pillow makes on a PNG's chunks that the `png` crate does not make the
/// same way, so that PNGs Pillow rejects are rejected here too: checksums of the
/// chunks before the image data (Pillow ignores those of IDAT and later chunks, the
/// `png` crate checks all of them), compression methods and decompressed sizes of
/// iCCP and text chunks (text bombs), APNG frame sequence numbers and frame bounds.
///
/// Also returns the repairs that make the `png` crate accept what Pillow accepts.
fn check_png_chunks(data: &[u8]) -> Result<PngRepairs, DecodeError> {
    let corrupt = |msg: String| Err(DecodeError::Corrupt(format!("PNG: {msg}")));
    let mut repairs = PngRepairs::default();
    let mut pos = 8;
    let mut part = PngPart::Header;
    let mut text_memory = 0usize;
    let mut seq: Option<u32> = None;
    let mut size = (0u64, 0u64);
    let mut animated = false;
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    // End of the last IDAT body: Pillow has the whole image once its data is read and
    // stops without complaint where the data after it (CRC, chunks, IEND) is cut.
    let mut image_end = None;
    while pos < data.len() {
        let Some(head) = data.get(pos..pos + 8) else {
            repairs.end_image_at = image_end;
            return Ok(repairs);
        };
        let length = be32(&head[..4]) as usize;
        let cid = &head[4..8];
        if !cid.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_') {
            if part == PngPart::Header {
                return corrupt(format!("chunk type '{}' is not a name", chunk_name(cid)));
            }
            return Ok(repairs);
        }
        let chunk_start = pos;
        let start = pos + 8;
        pos = start.saturating_add(length).saturating_add(4);
        if cid == b"IEND" || (part == PngPart::Trailer && cid == b"fcTL" && animated) {
            if pos > data.len() {
                repairs.end_image_at = image_end;
            }
            return Ok(repairs);
        }
        if cid == b"IDAT" {
            part = PngPart::Trailer;
            if start + length > data.len() {
                // Cut inside the image data: Pillow decodes it if the rows are all
                // there (zlib checks the Adler-32 only once it reaches it).
                repairs.cut_idat = Some(chunk_start);
                return Ok(repairs);
            }
            image_end = Some(start + length);
            if pos >= data.len() {
                repairs.end_image_at = image_end;
                return Ok(repairs);
            }
            continue;
        }
        // The rest is for the `png` crate to report as truncated.
        let Some(body) = data.get(start..start + length) else {
            return Ok(repairs);
        };
        let name = chunk_name(cid);
        match cid {
            b"IHDR" => {
                if length < 13 {
                    return corrupt("IHDR chunk is too short".into());
                }
                size = (be32(&body[..4]) as u64, be32(&body[4..8]) as u64);
                if body[10] != 0 {
                    // Pillow does not read the compression method (only 0 exists).
                    repairs.ihdr_compression = Some(start + 10);
                }
                if body[11] != 0 {
                    return corrupt(format!("unknown filter method {}", body[11]));
                }
            }
            b"PLTE" if length == 0 => {
                // Pillow reads an empty palette as all black.
                repairs.empty_plte = Some(start - 8);
            }
            b"iCCP" => {
                let split = body.iter().position(|&b| b == 0).unwrap_or(body.len());
                let Some(&method) = body.get(split + 1) else {
                    return corrupt("iCCP chunk has no compression method".into());
                };
                if method != 0 {
                    return corrupt(format!("unknown compression method {method} in iCCP chunk"));
                }
                if inflated_len(&body[split + 2..], PNG_MAX_TEXT_CHUNK).is_none() {
                    return corrupt("iCCP profile decompresses to more than 1 MiB".into());
                }
            }
            b"tEXt" => {
                if let Some(split) = body.iter().position(|&b| b == 0) {
                    if split > 0 {
                        text_memory += body.len() - split - 1;
                    }
                }
            }
            b"zTXt" => {
                let split = body.iter().position(|&b| b == 0).unwrap_or(body.len());
                let value = body.get(split + 1..).unwrap_or_default();
                let method = value.first().copied().unwrap_or(0);
                if method != 0 {
                    return corrupt(format!("unknown compression method {method} in zTXt chunk"));
                }
                let Some(len) =
                    inflated_len(value.get(1..).unwrap_or_default(), PNG_MAX_TEXT_CHUNK)
                else {
                    return corrupt("zTXt text decompresses to more than 1 MiB".into());
                };
                if split > 0 {
                    text_memory += len;
                }
            }
            b"iTXt" => {
                // keyword \0 flag method language \0 translated keyword \0 text
                let fields = body
                    .iter()
                    .position(|&b| b == 0)
                    .and_then(|k| body.get(k + 1..))
                    .filter(|r| r.len() >= 2);
                if let Some(r) = fields {
                    let (flag, method, rest) = (r[0], r[1], &r[2..]);
                    let mut parts = rest.splitn(3, |&b| b == 0);
                    let (_lang, _tk, text) = (parts.next(), parts.next(), parts.next());
                    if let Some(text) = text {
                        if flag != 0 && method == 0 {
                            match inflated_len(text, PNG_MAX_TEXT_CHUNK) {
                                None => {
                                    return corrupt(
                                        "iTXt text decompresses to more than 1 MiB".into(),
                                    )
                                }
                                Some(len) => text_memory += len,
                            }
                        } else if flag == 0 {
                            text_memory += text.len();
                        }
                    }
                }
            }
            b"acTL" => {
                if length < 8 {
                    return corrupt("APNG acTL chunk is too short".into());
                }
                let frames = be32(body);
                animated = frames > 1 && frames <= 0x8000_0000;
            }
            b"fcTL" | b"fdAT" => {
                let short = if cid == b"fcTL" { 26 } else { 4 };
                if length < short {
                    return corrupt(format!("APNG {name} chunk is too short"));
                }
                let n = be32(body);
                if seq.map_or(n != 0 || cid == b"fdAT", |s| n != s.wrapping_add(1)) {
                    return corrupt("APNG contains frame sequence errors".into());
                }
                seq = Some(n);
                if cid == b"fcTL" {
                    let (w, h) = (be32(&body[4..]) as u64, be32(&body[8..]) as u64);
                    let (x, y) = (be32(&body[12..]) as u64, be32(&body[16..]) as u64);
                    if x + w > size.0 || y + h > size.1 {
                        return corrupt("APNG contains invalid frames".into());
                    }
                } else {
                    // Frame data: Pillow's image data starts here when it has no IDAT.
                    part = PngPart::Trailer;
                }
            }
            _ => {}
        }
        if text_memory > PNG_MAX_TEXT_MEMORY {
            return corrupt(format!(
                "text chunks hold more than {} MiB",
                PNG_MAX_TEXT_MEMORY >> 20
            ));
        }
        if part == PngPart::Trailer && pos >= data.len() {
            // The last chunk after the image data is complete but its CRC or the
            // IEND is missing: Pillow stops reading there.
            repairs.end_image_at = image_end;
            return Ok(repairs);
        }
        if part == PngPart::Header {
            match data.get(start + length..start + length + 4) {
                Some(crc) if be32(crc) != crc32(cid, body) => {
                    return corrupt(format!("bad checksum in {name} chunk"));
                }
                None => {
                    return Err(DecodeError::Truncated(format!(
                        "PNG {name} chunk ends early"
                    )))
                }
                _ => {}
            }
        }
    }
    Ok(repairs)
}

/// Changes to a PNG's bytes after which the `png` crate decodes it as Pillow does.
#[derive(Debug, Default, PartialEq, Eq)]
struct PngRepairs {
    /// Offset of a nonzero IHDR compression method byte, to be set to 0.
    ihdr_compression: Option<usize>,
    /// Offset of an empty PLTE chunk, to be given one black entry.
    empty_plte: Option<usize>,
    /// The image data is complete up to here, what follows is cut: end the file there.
    end_image_at: Option<usize>,
    /// The data ends inside the IDAT chunk starting here: end it with the data.
    cut_idat: Option<usize>,
}

/// An IEND chunk, preceded by the (unchecked) CRC of the chunk before it.
const CRC_AND_IEND: &[u8; 16] = b"\0\0\0\0\0\0\0\0IEND\xAE\x42\x60\x82";

impl PngRepairs {
    fn apply<'a>(&self, data: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        if *self == PngRepairs::default() {
            return std::borrow::Cow::Borrowed(data);
        }
        let mut out = data.to_vec();
        if let Some(at) = self.ihdr_compression {
            out[at] = 0;
        }
        if let Some(end) = self.end_image_at {
            out.truncate(end);
            out.extend_from_slice(CRC_AND_IEND);
        }
        if let Some(at) = self.cut_idat {
            let len = (data.len() - at - 8) as u32;
            out[at..at + 4].copy_from_slice(&len.to_be_bytes());
            out.extend_from_slice(CRC_AND_IEND);
        }
        if let Some(at) = self.empty_plte {
            // Checksums are not checked by the crate (see `decode_png`).
            out.splice(at..at + 12, *b"\0\0\0\x03PLTE\0\0\0\0\0\0\0");
        }
        std::borrow::Cow::Owned(out)
    }
}

/// A `png` crate message without the crate's debug formatting of chunk types
/// (`ChunkType { type: IDAT, critical: true, ... }` becomes `IDAT`).
fn tidy_png_message(msg: String) -> String {
    const OPEN: &str = "ChunkType { type: ";
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg.as_str();
    while let Some(at) = rest.find(OPEN) {
        out.push_str(&rest[..at]);
        let after = &rest[at + OPEN.len()..];
        let name_end = after.find(',').unwrap_or(after.len());
        out.push_str(&after[..name_end]);
        rest = after.find('}').map_or("", |close| &after[close + 1..]);
    }
    out.push_str(rest);
    // fdeflate's error names: "Corrupt deflate stream. InvalidCodeLengthRepeat"
    const DEFLATE: &str = "Corrupt deflate stream. ";
    if let Some(name) = out.strip_prefix(DEFLATE) {
        let mut words = String::new();
        for c in name.trim_end_matches('.').chars() {
            if c.is_ascii_uppercase() && !words.is_empty() {
                words.push(' ');
            }
            words.push(c.to_ascii_lowercase());
        }
        return format!("image data is not valid deflate data ({words})");
    }
    out
}

fn crc32(cid: &[u8], body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(cid);
    hasher.update(body);
    hasher.finalize()
}

fn decode_png(data: &[u8], max_pixels: u64) -> Result<Decoded, DecodeError> {
    let repairs = check_png_chunks(data)?;
    let repaired = repairs.apply(data);
    let Some(_) = repairs.cut_idat else {
        return read_png(&repaired, max_pixels, false);
    };
    // The file ends inside the image data. Pillow decodes it if every row is there;
    // zlib checks the Adler-32 only if the data reaches it (a mismatch is corrupt).
    match read_png(&repaired, max_pixels, false) {
        Err(DecodeError::Corrupt(msg)) if msg.contains("(wrong checksum)") => {
            Err(DecodeError::Corrupt(msg))
        }
        Err(_) => read_png(&repaired, max_pixels, true)
            .map_err(|_| DecodeError::Truncated("PNG data ends inside the image data".into())),
        done => done,
    }
}

fn read_png(data: &[u8], max_pixels: u64, ignore_adler32: bool) -> Result<Decoded, DecodeError> {
    // Checksums of the chunks before the image data and ancillary chunks were
    // checked the way Pillow checks them (`check_png_chunks`). Like Pillow (zlib),
    // the crate checks the image data's Adler-32 but not the IDAT CRCs, and it must
    // not keep ICC profiles or text in memory (a 1 MB file can hold a 1 GB profile).
    let mut options = png::DecodeOptions::default();
    options.set_ignore_adler32(ignore_adler32);
    options.set_ignore_crc(true);
    options.set_ignore_iccp_chunk(true);
    options.set_ignore_text_chunk(true);
    let mut decoder = png::Decoder::new_with_options(Cursor::new(data), options);
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

    #[test]
    fn jpeg_layout_skips_stuffing_and_restart_markers() {
        // SOI, SOF0 (8-bit, 2x3), SOS, entropy data holding FF00 and RST0, a second
        // SOS, EOI.
        let mut data = vec![0xFF, 0xD8];
        data.extend([0xFF, 0xC0, 0, 11, 8, 0, 3, 0, 2, 1, 1, 0x11, 0]);
        data.extend([0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0]);
        data.extend([0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0, 0x56, 0xFF, 0xFF, 0xDA]);
        data.extend([0, 8, 1, 1, 0, 0, 63, 0, 0x78, 0xFF, 0xD9]);
        let layout = jpeg_layout(&data);
        assert_eq!(layout.scans, 2);
        assert_eq!(layout.frame, Some((0xC0, 8)));
        assert_eq!(layout.frame_size, Some((2, 3)));
        assert!(layout.eoi);
        // cut anywhere: never a panic, never an EOI
        for cut in 0..data.len() - 1 {
            assert!(!jpeg_layout(&data[..cut]).eoi, "cut at {cut}");
        }
    }

    #[test]
    fn jpeg_with_too_many_scans_is_refused() {
        let mut data = vec![0xFF, 0xD8, 0xFF, 0xC2, 0, 11, 8, 0, 3, 0, 2, 1, 1, 0x11, 0];
        for _ in 0..=MAX_JPEG_SCANS {
            data.extend([0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0, 0x00]);
        }
        data.extend([0xFF, 0xD9]);
        assert_eq!(
            decode(&data, 1 << 20, JpegScale::NONE),
            Err(DecodeError::Corrupt(format!(
                "JPEG has more than {MAX_JPEG_SCANS} scans (limit {MAX_JPEG_SCANS})"
            )))
        );
    }

    #[test]
    fn large_jpegs_get_fewer_scans() {
        assert_eq!(scan_limit(2, 3), MAX_JPEG_SCANS);
        assert_eq!(scan_limit(4096, 4096), 512.min(MAX_JPEG_SCANS));
        assert_eq!(scan_limit(8192, 8192), 128);
        assert_eq!(scan_limit(13_000, 13_000), MIN_JPEG_SCAN_LIMIT);
        let layout = JpegLayout {
            scans: 129,
            frame: Some((0xC2, 8)),
            frame_size: Some((8192, 8192)),
            eoi: true,
        };
        assert_eq!(
            check_jpeg_layout(&layout),
            Err(DecodeError::Corrupt(
                "JPEG has 129 scans (limit 128 for 8192x8192 pixels)".into()
            ))
        );
    }

    #[test]
    fn png_messages_lose_the_crates_debug_formatting() {
        let msg = "CRC error: expected 0x0 have 0x1 while decoding ChunkType { type: IDAT, \
                   critical: true, private: false, reserved: false, safecopy: false } chunk."
            .to_string();
        assert_eq!(
            tidy_png_message(msg),
            "CRC error: expected 0x0 have 0x1 while decoding IDAT chunk."
        );
        assert_eq!(tidy_png_message("plain".into()), "plain");
        assert_eq!(
            tidy_png_message("Corrupt deflate stream. WrongChecksum".into()),
            "image data is not valid deflate data (wrong checksum)"
        );
    }
}
