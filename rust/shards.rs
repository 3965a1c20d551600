//! webdataset shards (tar files as written by img2dataset) read as samples.
//!
//! The reader yields, in file order, either a [`Sample`] (one key's image plus
//! its caption and metadata) or a [`ShardIssue`] saying what was wrong and
//! where. Bad input never panics and never ends the run: a truncated or corrupt
//! shard gives up its complete samples and one issue, then the next shard is read.
//! Shards may be gzip-compressed (`.tar.gz`, `.tgz`, or any name: the magic
//! bytes decide); nothing is ever extracted to disk.
//!
//! Grouping follows webdataset (`webdataset.tariterators`): a member's key is its
//! path up to the first dot of its basename (`a/b.c.d.jpg` is key `a/b`,
//! extension `c.d.jpg`), the extension is lowercased, and *adjacent* members with
//! the same key form one sample. Unlike webdataset:
//! - a key that comes back later in the same shard is not yielded again: it is
//!   an issue (`duplicate key: K (already in this shard)`) and its members are
//!   skipped (the same key in two shards is left to the caller);
//! - a repeated extension inside one sample is an issue (the first member is
//!   kept) instead of an exception;
//! - links, devices, fifos and sparse files (`unsupported member: ...`) and
//!   members whose name gives no key or extension are issues, not silently
//!   skipped; directories are skipped silently, as is every basename starting
//!   with `__` (not only top-level `__name__` entries).
//!
//! A shard is truncated when it ends inside a header or a member, and also when
//! it ends on a block boundary without the end-of-archive marker (tarfile and
//! webdataset accept that silently, but every writer emits the marker and an
//! interrupted buffered writer often stops exactly there). When a member is cut
//! short, its sample is dropped and named in the issue. When a header breaks
//! (cut, bad checksum, bad size, bad pax record) or the marker is missing, every
//! member read so far was whole, so the sample in progress is kept, and the issue
//! names no sample, only the key after which reading stopped.
//!
//! ```no_run
//! use _core::shards::{ReaderOptions, ShardItem, ShardReader};
//! let patterns = vec!["cc12m/{00000..01242}.tar".to_string()];
//! for item in ShardReader::from_patterns(&patterns, ReaderOptions::default())? {
//!     match item {
//!         ShardItem::Sample(s) => println!("{} {} bytes", s.key, s.image.len()),
//!         ShardItem::Issue(i) => eprintln!("{}: {}", i.shard, i.reason),
//!     }
//! }
//! # Ok::<(), _core::shards::ShardError>(())
//! ```

mod patterns;
pub mod tarstream;

use std::any::Any;
use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::{self, JoinHandle};

use flate2::bufread::GzDecoder;

pub use patterns::{expand_braces, expand_shard_paths, ShardError};
use tarstream::{MemberHeader, MemberKind, TarError, TarStream};

/// Largest member kept in memory unless configured otherwise (64 MiB).
pub const DEFAULT_MAX_MEMBER_BYTES: u64 = 64 << 20;

/// Extensions (the last dot-separated part, lowercased) that make a member the
/// sample's image. The first such member wins. Formats are never sniffed here:
/// img2dataset names every member `.jpg` whatever its bytes are, so the decoder
/// looks at the bytes.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "jxl",
];

const CAPTION_EXTENSION: &str = "txt";
const JSON_EXTENSION: &str = "json";
const READ_BUFFER_BYTES: usize = 1 << 20;

/// One webdataset sample: an image and what img2dataset stores beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// File name of the shard the sample came from.
    pub shard: String,
    /// webdataset key: member path up to the first dot of the basename.
    pub key: String,
    /// Extension of the image member, lowercased (`jpg`, `png`, `c.d.jpg`).
    pub image_ext: String,
    pub image: Vec<u8>,
    /// The `.txt` member, decoded as UTF-8 (invalid bytes replaced).
    pub caption: Option<String>,
    /// The `.json` member as raw text (invalid UTF-8 replaced), whether or not it parses.
    pub json: Option<String>,
    /// `"url"` of the JSON object, when it is one and has a string there.
    pub url: Option<String>,
    /// `"width"` of the JSON object, when it is a non-negative integer that fits.
    pub width: Option<u32>,
    /// `"height"` of the JSON object, when it is a non-negative integer that fits.
    pub height: Option<u32>,
}

/// Something in a shard that could not become a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIssue {
    /// File name of the shard.
    pub shard: String,
    /// The sample concerned, or for a shard cut short the sample in progress
    /// (else the last one read); `None` when no key applies.
    pub key: Option<String>,
    pub reason: String,
}

/// What a shard reader yields, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardItem {
    Sample(Sample),
    Issue(ShardIssue),
}

/// Limits applied while reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderOptions {
    /// Image, caption and JSON members larger than this are skipped (streamed
    /// past, never held) and reported as "member too large".
    pub max_member_bytes: u64,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self {
            max_member_bytes: DEFAULT_MAX_MEMBER_BYTES,
        }
    }
}

/// Splits a member path into webdataset's (key, lowercased extension).
///
/// `None` for paths webdataset ignores: no dot in the basename, or no key.
/// The key must end in at least one character other than a dot since the last
/// `/` before that (webdataset's `^((?:.*/|)[^.]+)[.]([^/]*)$`), so `d/.x.jpg`
/// has key `d/` but `.x.jpg` and `d.e/.x.jpg` have none.
pub fn split_member_name(path: &str) -> Option<(&str, String)> {
    let base_start = path.rfind('/').map_or(0, |slash| slash + 1);
    let dot = base_start + path[base_start..].find('.')?;
    if dot == base_start {
        // An empty basename part: the key is the directory, slash included,
        // which must then hold no dot of its own.
        let dir = &path[..base_start];
        let last_dir = dir[..dir.len().saturating_sub(1)]
            .rfind('/')
            .map_or(dir, |slash| &dir[slash + 1..]);
        if dir.is_empty() || last_dir.contains('.') {
            return None;
        }
    }
    Some((&path[..dot], path[dot + 1..].to_lowercase()))
}

// ==== One shard ====

/// The samples of one tar stream, from any buffered reader (a file, memory, a socket).
///
/// A gzip stream (recognised by its magic bytes, whatever the file is called)
/// is decompressed on the fly; bzip2, xz and zstd streams are reported as
/// unsupported.
pub struct ShardSamples<R: BufRead> {
    stream: TarStream<Decompressed<R>>,
    shard: String,
    max_member_bytes: u64,
    current: Option<PartialSample>,
    last_key: Option<String>,
    /// Every key started in this shard, to catch one that comes back later.
    seen: HashSet<String>,
    ready: VecDeque<ShardItem>,
    finished: bool,
}

/// The members of the sample being assembled.
struct PartialSample {
    key: String,
    /// The key was seen earlier in this shard: its members are skipped.
    duplicate: bool,
    extensions: Vec<String>,
    image: Option<(String, Vec<u8>)>,
    /// The image member was reported (too large), so the sample is already accounted for.
    image_reported: bool,
    caption: Option<Vec<u8>>,
    json: Option<Vec<u8>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Image,
    Caption,
    Json,
    Ignored,
}

/// Where a tar error struck, which decides what happens to the sample in progress.
enum Break {
    /// Inside the data of a member of the sample in progress: that sample is
    /// missing bytes, so it is dropped and named.
    InSample(TarError),
    /// In a header, a padding or a member outside any sample: every member
    /// of the sample in progress was read whole, so it is kept.
    BetweenMembers(TarError),
}

/// The bytes of a shard file, decompressed when they are gzip.
pub enum Decompressed<R: BufRead> {
    Plain(R),
    Gzip(GzipMembers<R>),
}

/// The gzip members of a stream one after another, as `cat a.gz b.gz` makes
/// them (Python's gzip reads them so too). Each member's checksum and length
/// are checked when it ends. Bytes after a member that do not start another
/// one (zero padding, junk) end the stream: tarfile never reads past the
/// end-of-archive marker either, and a tar cut short by them is reported as such.
pub struct GzipMembers<R: BufRead> {
    decoder: Option<GzDecoder<R>>,
}

impl<R: BufRead> GzipMembers<R> {
    pub fn new(inner: R) -> Self {
        Self {
            decoder: Some(GzDecoder::new(inner)),
        }
    }
}

impl<R: BufRead> Read for GzipMembers<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            let Some(decoder) = self.decoder.as_mut() else {
                return Ok(0);
            };
            let n = decoder.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            // This member ended whole; does another one follow?
            let Some(decoder) = self.decoder.take() else {
                return Ok(0);
            };
            let mut inner = decoder.into_inner();
            if inner.fill_buf()?.first() == Some(&0x1f) {
                self.decoder = Some(GzDecoder::new(inner));
            }
        }
    }
}

impl<R: BufRead> Read for Decompressed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Plain(inner) => inner.read(buf),
            Self::Gzip(decoder) => decoder.read(buf).map_err(gzip_error),
        }
    }
}

/// A gzip decoder error, worded for a failure record.
fn gzip_error(err: io::Error) -> io::Error {
    match err.kind() {
        io::ErrorKind::Interrupted => err,
        io::ErrorKind::UnexpectedEof => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "truncated gzip stream: it ends before its trailer",
        ),
        _ => io::Error::new(
            io::ErrorKind::InvalidData,
            format!("corrupt gzip stream: {err}"),
        ),
    }
}

/// Compressions recognised by their magic bytes; only gzip is read.
const MAGIC: &[(&[u8], &str)] = &[
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
];

/// How much of a gzip stream is read after the end-of-archive marker to reach
/// (and check) its trailer; tar writers pad to 10 KiB, so this is plenty.
const MAX_GZIP_TAIL_BYTES: u64 = 1 << 20;

impl<R: BufRead> ShardSamples<R> {
    /// Reads `reader` as one tar shard; `shard` names it in samples and issues.
    pub fn new(mut reader: R, shard: impl Into<String>, options: &ReaderOptions) -> Self {
        let compression = match reader.fill_buf() {
            Ok(head) => MAGIC
                .iter()
                .find(|(magic, _)| head.starts_with(magic))
                .map(|&(_, name)| Ok(name)),
            Err(err) => Some(Err(err)),
        };
        let input = match compression {
            Some(Ok("gzip")) => Decompressed::Gzip(GzipMembers::new(reader)),
            _ => Decompressed::Plain(reader),
        };
        let mut samples = Self {
            stream: TarStream::new(input),
            shard: shard.into(),
            max_member_bytes: options.max_member_bytes,
            current: None,
            last_key: None,
            seen: HashSet::new(),
            ready: VecDeque::new(),
            finished: false,
        };
        match compression {
            Some(Ok("gzip")) | None => {}
            Some(Ok(name)) => {
                let reason = format!("unsupported format: {name}-compressed shard");
                samples.push_issue(None, reason);
                samples.finished = true;
            }
            Some(Err(err)) => {
                samples.push_issue(None, format!("read error: {err}"));
                samples.finished = true;
            }
        }
        samples
    }

    fn step(&mut self) {
        match self.stream.next_member() {
            Ok(Some(member)) => match self.add_member(&member) {
                Ok(()) => {}
                Err(Break::InSample(err)) => self.stop_in_sample(&err),
                Err(Break::BetweenMembers(err)) => self.stop_between_members(&err),
            },
            Ok(None) => {
                self.flush();
                self.finished = true;
                if let Err(err) = self.check_gzip_trailer() {
                    self.stop_between_members(&err);
                }
            }
            Err(err) => self.stop_between_members(&err),
        }
    }

    fn add_member(&mut self, member: &MemberHeader) -> Result<(), Break> {
        let outside = |stream: &mut TarStream<_>| stream.skip_data().map_err(Break::BetweenMembers);
        let split = split_member_name(&member.path);
        match &member.kind {
            MemberKind::Regular => {}
            // webdataset skips directories too; they are part of ordinary tars.
            MemberKind::Directory => return outside(&mut self.stream),
            other => {
                let target = match other {
                    MemberKind::Symlink(t) | MemberKind::HardLink(t) => format!(" -> '{t}'"),
                    _ => String::new(),
                };
                let reason = format!("unsupported member: {other} '{}'{target}", member.path);
                self.push_issue(split.map(|(key, _)| key.to_owned()), reason);
                return outside(&mut self.stream);
            }
        }
        let basename = member.path.rsplit('/').next().unwrap_or_default();
        if basename.starts_with("__") {
            return outside(&mut self.stream);
        }
        let Some((key, ext)) = split else {
            let reason = if basename.contains('.') {
                format!("member without a key: '{}'", member.path)
            } else {
                format!("member without extension: '{}'", member.path)
            };
            self.push_issue(None, reason);
            return outside(&mut self.stream);
        };
        if self.current.as_ref().is_none_or(|c| c.key != key) {
            self.flush();
            let duplicate = !self.seen.insert(key.to_owned());
            if duplicate {
                let reason = format!("duplicate key: {key} (already in this shard)");
                self.push_issue(Some(key.to_owned()), reason);
            }
            self.current = Some(PartialSample::new(key, duplicate));
        }
        let inside = |stream: &mut TarStream<_>| stream.skip_data().map_err(Break::InSample);
        let Some(sample) = self.current.as_mut() else {
            return inside(&mut self.stream);
        };
        if sample.duplicate {
            return inside(&mut self.stream);
        }
        if sample.extensions.contains(&ext) {
            let reason = format!(
                "duplicate extension '{ext}' (member '{}'); the first is kept",
                member.path
            );
            self.push_issue(Some(key.to_owned()), reason);
            return inside(&mut self.stream);
        }
        let role = sample.role_of(&ext);
        sample.extensions.push(ext.clone());
        if role == Role::Ignored {
            return inside(&mut self.stream);
        }
        if member.size > self.max_member_bytes {
            if role == Role::Image {
                sample.image_reported = true;
            }
            let reason = format!(
                "member too large: '{}' is {} bytes, the limit is {}",
                member.path, member.size, self.max_member_bytes
            );
            self.push_issue(Some(key.to_owned()), reason);
            return inside(&mut self.stream);
        }
        let data = self.stream.read_data().map_err(Break::InSample)?;
        let Some(sample) = self.current.as_mut() else {
            return Ok(());
        };
        match role {
            Role::Image => sample.image = Some((ext, data)),
            Role::Caption => sample.caption = Some(data),
            Role::Json => sample.json = Some(data),
            Role::Ignored => {}
        }
        Ok(())
    }

    /// Ends the sample in progress: it becomes a sample or an issue.
    fn flush(&mut self) {
        let Some(partial) = self.current.take() else {
            return;
        };
        self.last_key = Some(partial.key.clone());
        if partial.duplicate {
            // Reported when it started.
        } else if partial.image.is_some() {
            let sample = partial.into_sample(&self.shard);
            self.ready.push_back(ShardItem::Sample(sample));
        } else if !partial.image_reported {
            let reason = format!("no image member (has: {})", partial.extensions.join(", "));
            self.push_issue(Some(partial.key), reason);
        }
    }

    /// Gives up on the rest of this shard after a member cut short: the sample
    /// it belongs to is incomplete, so it is dropped and named in the issue.
    fn stop_in_sample(&mut self, err: &TarError) {
        let key = self.current.take().map(|partial| partial.key);
        let reason = match &key {
            Some(key) => format!("{err}; sample '{key}' dropped"),
            None => err.to_string(),
        };
        self.push_issue(key, reason);
        self.finished = true;
    }

    /// Gives up on the rest of this shard after a broken header. Every member
    /// of the sample in progress was read whole, so it is kept; the issue
    /// names no sample, only where in the shard reading stopped.
    fn stop_between_members(&mut self, err: &TarError) {
        self.flush();
        let reason = match &self.last_key {
            Some(key) => format!("{err} (after key '{key}')"),
            None => format!("{err} (before any sample)"),
        };
        self.push_issue(None, reason);
        self.finished = true;
    }

    /// After the end-of-archive marker of a gzip shard, reads on to the gzip
    /// trailer so that a wrong checksum or a cut stream is still reported.
    fn check_gzip_trailer(&mut self) -> Result<(), TarError> {
        let Decompressed::Gzip(decoder) = self.stream.get_mut() else {
            return Ok(());
        };
        let mut tail = decoder.take(MAX_GZIP_TAIL_BYTES);
        io::copy(&mut tail, &mut io::sink())
            .map(drop)
            .map_err(|err| TarError::Io(gzip_error(err)))
    }

    fn push_issue(&mut self, key: Option<String>, reason: String) {
        self.ready.push_back(ShardItem::Issue(ShardIssue {
            shard: self.shard.clone(),
            key,
            reason,
        }));
    }
}

impl<R: BufRead> Iterator for ShardSamples<R> {
    type Item = ShardItem;

    fn next(&mut self) -> Option<ShardItem> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(item);
            }
            if self.finished {
                return None;
            }
            self.step();
        }
    }
}

impl PartialSample {
    fn new(key: &str, duplicate: bool) -> Self {
        Self {
            key: key.to_owned(),
            duplicate,
            extensions: Vec::new(),
            image: None,
            image_reported: false,
            caption: None,
            json: None,
        }
    }

    fn role_of(&self, ext: &str) -> Role {
        // webdataset's decoders dispatch on the last part (`seg.png` decodes as png).
        let last = ext.rsplit('.').next().unwrap_or(ext);
        if IMAGE_EXTENSIONS.contains(&last) {
            if self.image.is_none() && !self.image_reported {
                Role::Image
            } else {
                Role::Ignored
            }
        } else if ext == CAPTION_EXTENSION {
            Role::Caption
        } else if ext == JSON_EXTENSION {
            Role::Json
        } else {
            Role::Ignored
        }
    }

    fn into_sample(self, shard: &str) -> Sample {
        let (image_ext, image) = self.image.unwrap_or_default();
        let json = self
            .json
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        let meta = json.as_deref().map(JsonMeta::parse).unwrap_or_default();
        Sample {
            shard: shard.to_owned(),
            key: self.key,
            image_ext,
            image,
            caption: self
                .caption
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
            json,
            url: meta.url,
            width: meta.width,
            height: meta.height,
        }
    }
}

/// The fields of img2dataset's JSON that callers use directly.
#[derive(Default)]
struct JsonMeta {
    url: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
}

impl JsonMeta {
    /// Invalid JSON, or JSON that is not an object, has no fields (and is still kept raw).
    fn parse(text: &str) -> Self {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_str(text) else {
            return Self::default();
        };
        let dimension = |name: &str| {
            map.get(name)
                .and_then(serde_json::Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        Self {
            url: map
                .get("url")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            width: dimension("width"),
            height: dimension("height"),
        }
    }
}

// ==== Many shards ====

/// Samples of many shard files, one after another, in the order given.
///
/// A shard that cannot be opened, or breaks off, yields an issue and the
/// reader goes on with the next one.
pub struct ShardReader {
    paths: std::vec::IntoIter<PathBuf>,
    options: ReaderOptions,
    current: Option<ShardSamples<BufReader<File>>>,
    /// The file `current` reads, for the message of a panic.
    current_path: Option<PathBuf>,
    /// Test hook: the prefetch thread panics on reaching this key.
    debug_panic_at: Option<String>,
}

impl ShardReader {
    /// Reads `paths` as they are (no pattern expansion).
    pub fn new(paths: Vec<PathBuf>, options: ReaderOptions) -> Self {
        Self {
            paths: paths.into_iter(),
            options,
            current: None,
            current_path: None,
            debug_panic_at: None,
        }
    }

    /// Expands `patterns` with [`expand_shard_paths`] and reads the result.
    pub fn from_patterns(patterns: &[String], options: ReaderOptions) -> Result<Self, ShardError> {
        Ok(Self::new(expand_shard_paths(patterns)?, options))
    }

    /// Makes the prefetch thread panic when it reaches sample `key` (tests only).
    #[cfg(test)]
    pub(crate) fn panicking_at(mut self, key: &str) -> Self {
        self.debug_panic_at = Some(key.to_owned());
        self
    }

    /// Moves reading to a background thread that stays up to `capacity` items
    /// ahead, so file I/O and parsing overlap with the consumer's work.
    ///
    /// A panic on that thread (a bug) is caught and yielded as an `Err` naming
    /// the shard being read, never taken for the end of the data.
    pub fn prefetch(mut self, capacity: usize) -> io::Result<Prefetched> {
        if self.debug_panic_at.is_none() {
            self.debug_panic_at = debug_panic_key("shard-reader");
        }
        let (sender, items) = sync_channel(capacity);
        let worker = thread::Builder::new()
            .name("starkret-shards".into())
            .spawn(move || loop {
                let next = panic::catch_unwind(AssertUnwindSafe(|| {
                    let item = self.next();
                    if let (Some(key), Some(ShardItem::Sample(sample))) =
                        (&self.debug_panic_at, &item)
                    {
                        assert!(
                            sample.key != *key,
                            "debug panic at key '{key}' (STARKRET_DEBUG_PANIC)"
                        );
                    }
                    item
                }));
                let message = match next {
                    Ok(Some(item)) => Ok(item),
                    Ok(None) => break,
                    Err(payload) => Err(ReaderPanicked {
                        shard: self.current_path.as_ref().map(|p| p.display().to_string()),
                        message: panic_message(payload.as_ref()),
                    }),
                };
                let failed = message.is_err();
                // Stop after a panic, or when the consumer hung up.
                if sender.send(message).is_err() || failed {
                    break;
                }
            })?;
        Ok(Prefetched {
            items,
            worker: Some(worker),
        })
    }
}

impl Iterator for ShardReader {
    type Item = ShardItem;

    fn next(&mut self) -> Option<ShardItem> {
        loop {
            if let Some(item) = self.current.as_mut().and_then(Iterator::next) {
                return Some(item);
            }
            self.current = None;
            let path = self.paths.next()?;
            self.current_path = Some(path.clone());
            match File::open(&path) {
                Ok(file) => {
                    let reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
                    self.current =
                        Some(ShardSamples::new(reader, shard_name(&path), &self.options));
                }
                Err(err) => {
                    return Some(ShardItem::Issue(ShardIssue {
                        shard: shard_name(&path),
                        key: None,
                        reason: format!("cannot open shard '{}': {err}", path.display()),
                    }));
                }
            }
        }
    }
}

fn shard_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// The shard reader's thread panicked (a bug): what came after is unknown,
/// so the data must not be taken as complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderPanicked {
    /// The shard file being read, when one was.
    pub shard: Option<String>,
    pub message: String,
}

impl fmt::Display for ReaderPanicked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.shard {
            Some(shard) => write!(
                f,
                "shard reader thread panicked while reading '{shard}': {}",
                self.message
            ),
            None => write!(f, "shard reader thread panicked: {}", self.message),
        }
    }
}

impl std::error::Error for ReaderPanicked {}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// Test hook, read once per reader: `STARKRET_DEBUG_PANIC=<component>:<key>`
/// makes that background thread (`shard-reader` or `batch-feeder`) panic when it
/// reaches sample `key`, to check that a panic surfaces as an error.
pub(crate) fn debug_panic_key(component: &str) -> Option<String> {
    let value = std::env::var("STARKRET_DEBUG_PANIC").ok()?;
    let (name, key) = value.split_once(':')?;
    (name == component).then(|| key.to_owned())
}

/// The items of a [`ShardReader`], read ahead on a background thread.
///
/// Dropping it stops the thread after the item it is reading.
pub struct Prefetched {
    items: Receiver<Result<ShardItem, ReaderPanicked>>,
    worker: Option<JoinHandle<()>>,
}

impl Iterator for Prefetched {
    type Item = Result<ShardItem, ReaderPanicked>;

    /// The next item; after an `Err`, the iteration ends.
    fn next(&mut self) -> Option<Self::Item> {
        if let Ok(item) = self.items.recv() {
            return Some(item);
        }
        // The channel closes when the worker ends. Panics are caught inside it,
        // but should one escape, it must not look like the end of the data either.
        let payload = self.worker.take()?.join().err()?;
        Some(Err(ReaderPanicked {
            shard: None,
            message: panic_message(payload.as_ref()),
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tar archive of `members` (path, bytes), as the tests of this module tree build it.
    pub(crate) fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, path, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn read(bytes: &[u8], max_member_bytes: u64) -> Vec<ShardItem> {
        let options = ReaderOptions { max_member_bytes };
        ShardSamples::new(bytes, "s.tar", &options).collect()
    }

    fn keys_and_issues(items: &[ShardItem]) -> Vec<String> {
        items
            .iter()
            .map(|item| match item {
                ShardItem::Sample(s) => s.key.clone(),
                ShardItem::Issue(i) => format!("! {:?} {}", i.key, i.reason),
            })
            .collect()
    }

    fn samples(items: Vec<ShardItem>) -> Vec<Sample> {
        items
            .into_iter()
            .filter_map(|item| match item {
                ShardItem::Sample(s) => Some(s),
                ShardItem::Issue(_) => None,
            })
            .collect()
    }

    #[test]
    fn member_names_split_like_webdataset() {
        assert_eq!(
            split_member_name("a/b.c.d.JPG"),
            Some(("a/b", "c.d.jpg".into()))
        );
        assert_eq!(
            split_member_name("x.y/0001.txt"),
            Some(("x.y/0001", "txt".into()))
        );
        assert_eq!(
            split_member_name("d/.hidden.jpg"),
            Some(("d/", "hidden.jpg".into()))
        );
        assert_eq!(split_member_name("README"), None);
        assert_eq!(split_member_name("x.y/README"), None);
        assert_eq!(split_member_name(".jpg"), None);
        assert_eq!(
            split_member_name("a/b/.x.jpg"),
            Some(("a/b/", "x.jpg".into()))
        );
        assert_eq!(split_member_name("a.b/.x.jpg"), None);
    }

    #[test]
    fn adjacent_members_group_into_samples_with_caption_and_metadata() {
        let json = br#"{"url": "http://x/1.jpg", "width": 640, "height": 480, "key": "0001"}"#;
        let bytes = tar_of(&[
            ("0001.jpg", b"img1"),
            ("0001.txt", b"a dog"),
            ("0001.json", json),
            ("0001.npy", b"ignored"),
            ("d/0002.PNG", b"img2"),
            ("a/b.c.d.jpg", b"img3"),
        ]);
        let got = samples(read(&bytes, DEFAULT_MAX_MEMBER_BYTES));
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0],
            Sample {
                shard: "s.tar".into(),
                key: "0001".into(),
                image_ext: "jpg".into(),
                image: b"img1".to_vec(),
                caption: Some("a dog".into()),
                json: Some(String::from_utf8(json.to_vec()).unwrap()),
                url: Some("http://x/1.jpg".into()),
                width: Some(640),
                height: Some(480),
            }
        );
        assert_eq!(
            (got[1].key.as_str(), got[1].image_ext.as_str()),
            ("d/0002", "png")
        );
        assert_eq!(got[1].caption, None);
        assert_eq!(
            (got[2].key.as_str(), got[2].image_ext.as_str()),
            ("a/b", "c.d.jpg")
        );
    }

    #[test]
    fn links_devices_and_dotless_names_are_issues_directories_and_double_underscores_skipped() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_size(data.len() as u64);
            if kind.is_symlink() {
                header.set_link_name("0001.jpg").unwrap();
            }
            builder.append_data(&mut header, path, data).unwrap();
        };
        add("__key__.json", tar::EntryType::Regular, b"{}");
        add("0001", tar::EntryType::Directory, b"");
        add("0001.jpg", tar::EntryType::Regular, b"img");
        add("0001.png", tar::EntryType::Symlink, b"");
        add("0001/__meta.txt", tar::EntryType::Regular, b"meta");
        add("README", tar::EntryType::Regular, b"readme");
        add("x.y/.jpg", tar::EntryType::Regular, b"no key");
        add("fifo.jpg", tar::EntryType::Fifo, b"");
        add("0002.jpg", tar::EntryType::Regular, b"img2");
        let bytes = builder.into_inner().unwrap();
        let items = read(&bytes, DEFAULT_MAX_MEMBER_BYTES);
        assert_eq!(
            keys_and_issues(&items),
            [
                r#"! Some("0001") unsupported member: symlink '0001.png' -> '0001.jpg'"#,
                "! None member without extension: 'README'",
                "! None member without a key: 'x.y/.jpg'",
                r#"! Some("fifo") unsupported member: fifo 'fifo.jpg'"#,
                "0001",
                "0002"
            ]
        );
    }

    #[test]
    fn a_sample_without_an_image_is_an_issue_listing_its_members() {
        let bytes = tar_of(&[("0001.txt", b"t"), ("0001.json", b"{}"), ("0002.jpg", b"i")]);
        let items = read(&bytes, DEFAULT_MAX_MEMBER_BYTES);
        assert_eq!(
            keys_and_issues(&items),
            [r#"! Some("0001") no image member (has: txt, json)"#, "0002"]
        );
    }

    #[test]
    fn a_repeated_extension_is_reported_and_the_first_member_kept() {
        let bytes = tar_of(&[("0001.jpg", b"first"), ("0001.jpg", b"second")]);
        let items = read(&bytes, DEFAULT_MAX_MEMBER_BYTES);
        assert_eq!(items.len(), 2);
        assert!(
            matches!(&items[0], ShardItem::Issue(i) if i.reason.starts_with("duplicate extension 'jpg'"))
        );
        assert_eq!(samples(items)[0].image, b"first");
    }

    #[test]
    fn a_key_that_comes_back_later_in_the_shard_is_a_duplicate_and_skipped() {
        let bytes = tar_of(&[
            ("a.jpg", b"1"),
            ("b.jpg", b"2"),
            ("a.jpg", b"again"),
            ("a.txt", b"late"),
            ("c.jpg", b"3"),
            ("b.txt", b"late too"),
        ]);
        let items = read(&bytes, DEFAULT_MAX_MEMBER_BYTES);
        assert_eq!(
            keys_and_issues(&items),
            [
                "a",
                "b",
                r#"! Some("a") duplicate key: a (already in this shard)"#,
                "c",
                r#"! Some("b") duplicate key: b (already in this shard)"#,
            ]
        );
        assert_eq!(samples(items)[0].image, b"1");
    }

    #[test]
    fn a_member_cut_short_drops_its_sample_a_broken_header_keeps_it() {
        let bytes = tar_of(&[
            ("0001.jpg", &[1u8; 600]),
            ("0001.txt", b"one"),
            ("0002.jpg", &[2u8; 600]),
            ("0002.txt", b"two"),
            ("0003.jpg", &[3u8; 600]),
        ]);
        let third_header = 5120;
        let items = read(&bytes[..third_header + 512 + 100], DEFAULT_MAX_MEMBER_BYTES);
        assert_eq!(
            keys_and_issues(&items),
            [
                "0001",
                "0002",
                "! Some(\"0003\") truncated tar: cut inside member '0003.jpg' (100 of 600 bytes); \
                 sample '0003' dropped",
            ]
        );
        // Every member of 0002 was read whole before the cut header: 0002 is kept.
        for (cut, why) in [
            (200, "truncated tar: cut inside the header at byte 5120"),
            (
                0,
                "truncated tar: ends at byte 5120 without an end-of-archive marker",
            ),
        ] {
            let items = read(&bytes[..third_header + cut], DEFAULT_MAX_MEMBER_BYTES);
            let issue = format!("! None {why} (after key '0002')");
            assert_eq!(keys_and_issues(&items), ["0001", "0002", issue.as_str()]);
        }
        // So is a sample before a corrupt header (here a bad checksum).
        let mut bytes = bytes;
        bytes[third_header] ^= 1;
        let items = read(&bytes, DEFAULT_MAX_MEMBER_BYTES);
        assert_eq!(
            keys_and_issues(&items),
            [
                "0001",
                "0002",
                "! None corrupt tar: bad header checksum at byte 5120 (after key '0002')"
            ]
        );
    }

    #[test]
    fn gzip_shards_are_read_by_their_magic_and_other_compressions_named() {
        use std::io::Write;
        let plain = tar_of(&[("a.jpg", b"1"), ("a.txt", b"one"), ("b.jpg", b"2")]);
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&plain).unwrap();
        let packed = encoder.finish().unwrap();
        assert_eq!(
            read(&packed, DEFAULT_MAX_MEMBER_BYTES),
            read(&plain, DEFAULT_MAX_MEMBER_BYTES)
        );
        // Zero padding or junk after the last member ends the stream quietly;
        // members one after another are one stream.
        for tail in [&[0u8; 512][..], b"junk"] {
            let mut padded = packed.clone();
            padded.extend_from_slice(tail);
            assert_eq!(
                read(&padded, DEFAULT_MAX_MEMBER_BYTES),
                read(&plain, DEFAULT_MAX_MEMBER_BYTES)
            );
        }
        // Every cut of the gzip stream is one issue, never a panic, and keeps
        // only whole samples.
        for cut in 0..packed.len() {
            let items = read(&packed[..cut], DEFAULT_MAX_MEMBER_BYTES);
            let issues: Vec<_> = keys_and_issues(&items)
                .into_iter()
                .filter(|k| k.starts_with('!'))
                .collect();
            assert_eq!(issues.len(), 1, "cut at {cut}: {items:?}");
            assert!(
                issues[0].contains(" truncated ") || issues[0].contains(" corrupt "),
                "cut at {cut}: {issues:?}"
            );
        }
        let items = read(b"\xfd7zXZ\x00\x00garbage", DEFAULT_MAX_MEMBER_BYTES);
        assert_eq!(
            keys_and_issues(&items),
            ["! None unsupported format: xz-compressed shard"]
        );
    }

    #[test]
    fn unicode_keys_and_invalid_utf8_captions_survive() {
        let long = format!("{}/猫.jpg", "ü".repeat(80));
        let bytes = tar_of(&[
            ("größe/猫.jpg", b"i"),
            ("größe/猫.txt", b"caf\xe9 \xf0\x9f\x90\x88"),
            (long.as_str(), b"j"),
        ]);
        let got = samples(read(&bytes, DEFAULT_MAX_MEMBER_BYTES));
        assert_eq!(got[0].key, "größe/猫");
        assert_eq!(got[0].caption.as_deref(), Some("caf\u{fffd} 🐈"));
        assert_eq!(got[1].key, format!("{}/猫", "ü".repeat(80)));
    }

    #[test]
    fn an_oversized_member_is_reported_once_and_never_held() {
        let big = vec![0u8; 300];
        let bytes = tar_of(&[
            ("0001.jpg", &big),
            ("0001.txt", b"dropped with its image"),
            ("0002.jpg", b"small"),
            ("0002.txt", &big),
            ("0002.bin", &big),
        ]);
        let items = read(&bytes, 100);
        assert_eq!(
            keys_and_issues(&items),
            [
                r#"! Some("0001") member too large: '0001.jpg' is 300 bytes, the limit is 100"#,
                r#"! Some("0002") member too large: '0002.txt' is 300 bytes, the limit is 100"#,
                "0002",
            ]
        );
        assert_eq!(samples(items)[0].caption, None);
    }

    #[test]
    fn invalid_json_is_kept_raw_without_fields() {
        for json in [
            &b"{not json"[..],
            b"[1, 2]",
            br#"{"url": 3, "width": -1, "height": 1e99}"#,
        ] {
            let bytes = tar_of(&[("k.jpg", b"i"), ("k.json", json)]);
            let got = samples(read(&bytes, DEFAULT_MAX_MEMBER_BYTES));
            assert_eq!(got[0].json.as_deref().map(str::as_bytes), Some(json));
            assert_eq!(
                (got[0].url.as_deref(), got[0].width, got[0].height),
                (None, None, None)
            );
        }
    }

    #[test]
    fn garbage_input_is_reported_not_fatal() {
        for bytes in [&b""[..], &[0xffu8; 1500][..], &[b'1'; 512][..]] {
            let items = read(bytes, DEFAULT_MAX_MEMBER_BYTES);
            assert_eq!(items.len(), 1);
            assert!(matches!(&items[0], ShardItem::Issue(i) if i.key.is_none()));
        }
    }

    #[test]
    fn hostile_sizes_and_flipped_bytes_never_panic() {
        let mut header = tar::Header::new_gnu();
        header.set_path("a.jpg").unwrap();
        header.set_size(u64::MAX);
        header.set_cksum();
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 700]);
        let items = read(&bytes, DEFAULT_MAX_MEMBER_BYTES);
        assert!(
            matches!(&items[..], [ShardItem::Issue(a), ShardItem::Issue(b)]
            if a.reason.starts_with("member too large") && b.reason.starts_with("truncated tar"))
        );

        let good = tar_of(&[
            ("0001.jpg", &[1u8; 600]),
            ("0001.txt", b"t"),
            ("0002.jpg", b"i"),
        ]);
        for position in (0..good.len()).step_by(5) {
            for value in [0x00, 0x30, 0xff] {
                let mut bytes = good.clone();
                bytes[position] = value;
                assert!(read(&bytes, 1000).len() <= 4);
            }
        }
    }

    #[test]
    fn the_reader_goes_on_after_a_missing_or_truncated_shard_and_prefetch_agrees() {
        let dir = std::env::temp_dir().join(format!("starkret-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = tar_of(&[("a.jpg", b"1"), ("b.jpg", b"2")]);
        std::fs::write(dir.join("0.tar"), &good[..512 * 3]).unwrap();
        std::fs::write(dir.join("2.tar"), &good).unwrap();
        let paths = ["0.tar", "1.tar", "2.tar"].map(|n| dir.join(n)).to_vec();
        let direct: Vec<_> = ShardReader::new(paths.clone(), ReaderOptions::default()).collect();
        let shards_and_keys: Vec<_> = direct
            .iter()
            .map(|item| match item {
                ShardItem::Sample(s) => format!("{} {}", s.shard, s.key),
                ShardItem::Issue(i) => {
                    let words: Vec<_> = i.reason.split(' ').take(2).collect();
                    format!("{} ! {}", i.shard, words.join(" "))
                }
            })
            .collect();
        assert_eq!(
            shards_and_keys,
            [
                "0.tar a",
                "0.tar ! truncated tar:",
                "1.tar ! cannot open",
                "2.tar a",
                "2.tar b"
            ]
        );
        let prefetched: Vec<_> = ShardReader::new(paths.clone(), ReaderOptions::default())
            .prefetch(1)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(prefetched, direct);

        // A panic on the prefetch thread is an error naming the shard, and the end.
        let items: Vec<_> = ShardReader::new(paths, ReaderOptions::default())
            .panicking_at("b")
            .prefetch(1)
            .unwrap()
            .collect();
        assert_eq!(items.len(), 5);
        assert_eq!(
            items[..4],
            direct[..4].iter().cloned().map(Ok).collect::<Vec<_>>()
        );
        let Err(failed) = &items[4] else {
            panic!("expected an error, got {:?}", items[4]);
        };
        assert_eq!(failed.shard, Some(dir.join("2.tar").display().to_string()));
        assert!(failed.to_string().starts_with(&format!(
            "shard reader thread panicked while reading '{}': debug panic at key 'b'",
            dir.join("2.tar").display()
        )));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
