//! webdataset shards (tar files as written by img2dataset) read as samples.
//!
//! The reader yields, in file order, either a [`Sample`] (one key's image plus
//! its caption and metadata) or a [`ShardIssue`] saying what was wrong and
//! where. Bad input never panics and never ends the run: a truncated or corrupt
//! shard gives up its complete samples and one issue, then the next shard is read.
//!
//! Grouping follows webdataset (`webdataset.tariterators`): a member's key is its
//! path up to the first dot of its basename (`a/b.c.d.jpg` is key `a/b`,
//! extension `c.d.jpg`), the extension is lowercased, and *adjacent* members with
//! the same key form one sample. A key that comes back after another key is a
//! new sample, yielded again, as webdataset does. Unlike webdataset, a repeated
//! extension inside one sample is an issue (the first member is kept) instead of
//! an exception, and every basename starting with `__` is skipped, not only
//! top-level `__name__` entries.
//!
//! A shard is truncated when it ends inside a header or a member, and also when
//! it ends on a block boundary without the end-of-archive marker (tarfile and
//! webdataset accept that silently, but every writer emits the marker and an
//! interrupted buffered writer often stops exactly there). The sample in progress
//! at the cut may lack members, so it is dropped and its key named in the issue.
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
mod tarstream;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::{self, JoinHandle};

pub use patterns::{expand_braces, expand_shard_paths, ShardError};
use tarstream::{MemberHeader, TarError, TarStream};

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
/// `None` for paths webdataset ignores: no dot in the basename, or an empty key.
pub fn split_member_name(path: &str) -> Option<(&str, String)> {
    let base_start = path.rfind('/').map_or(0, |slash| slash + 1);
    let dot = base_start + path[base_start..].find('.')?;
    if dot == 0 {
        return None;
    }
    Some((&path[..dot], path[dot + 1..].to_lowercase()))
}

// ==== One shard ====

/// The samples of one tar stream, from any reader (a file, memory, a socket).
pub struct ShardSamples<R> {
    stream: TarStream<R>,
    shard: String,
    max_member_bytes: u64,
    current: Option<PartialSample>,
    last_key: Option<String>,
    ready: VecDeque<ShardItem>,
    finished: bool,
}

/// The members of the sample being assembled.
struct PartialSample {
    key: String,
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

impl<R: Read> ShardSamples<R> {
    /// Reads `reader` as one tar shard; `shard` names it in samples and issues.
    pub fn new(reader: R, shard: impl Into<String>, options: &ReaderOptions) -> Self {
        Self {
            stream: TarStream::new(reader),
            shard: shard.into(),
            max_member_bytes: options.max_member_bytes,
            current: None,
            last_key: None,
            ready: VecDeque::new(),
            finished: false,
        }
    }

    fn step(&mut self) {
        match self.stream.next_member() {
            Ok(Some(member)) => {
                if let Err(err) = self.add_member(&member) {
                    self.stop(&err);
                }
            }
            Ok(None) => {
                self.flush();
                self.finished = true;
            }
            Err(err) => self.stop(&err),
        }
    }

    fn add_member(&mut self, member: &MemberHeader) -> Result<(), TarError> {
        if !member.regular {
            return Ok(());
        }
        let basename = member.path.rsplit('/').next().unwrap_or_default();
        if basename.starts_with("__") {
            return Ok(());
        }
        let Some((key, ext)) = split_member_name(&member.path) else {
            return Ok(());
        };
        if self.current.as_ref().is_none_or(|c| c.key != key) {
            self.flush();
            self.current = Some(PartialSample::new(key));
        }
        let Some(sample) = self.current.as_mut() else {
            return Ok(());
        };
        if sample.extensions.contains(&ext) {
            let reason = format!(
                "duplicate extension '{ext}' (member '{}'); the first is kept",
                member.path
            );
            self.push_issue(Some(key.to_owned()), reason);
            return Ok(());
        }
        let role = sample.role_of(&ext);
        sample.extensions.push(ext.clone());
        if role == Role::Ignored {
            return Ok(());
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
            return Ok(());
        }
        let data = self.stream.read_data()?;
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
        if partial.image.is_some() {
            let sample = partial.into_sample(&self.shard);
            self.ready.push_back(ShardItem::Sample(sample));
        } else if !partial.image_reported {
            let reason = format!("no image member (has: {})", partial.extensions.join(", "));
            self.push_issue(Some(partial.key), reason);
        }
    }

    /// Gives up on the rest of this shard. The sample in progress may be
    /// missing members, so it is dropped and named in the issue.
    fn stop(&mut self, err: &TarError) {
        let key = match self.current.take() {
            Some(partial) => Some(partial.key),
            None => self.last_key.clone(),
        };
        let reason = match &key {
            Some(key) => format!("{err} (last key '{key}')"),
            None => format!("{err} (before any sample)"),
        };
        self.push_issue(key, reason);
        self.finished = true;
    }

    fn push_issue(&mut self, key: Option<String>, reason: String) {
        self.ready.push_back(ShardItem::Issue(ShardIssue {
            shard: self.shard.clone(),
            key,
            reason,
        }));
    }
}

impl<R: Read> Iterator for ShardSamples<R> {
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
    fn new(key: &str) -> Self {
        Self {
            key: key.to_owned(),
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
}

impl ShardReader {
    /// Reads `paths` as they are (no pattern expansion).
    pub fn new(paths: Vec<PathBuf>, options: ReaderOptions) -> Self {
        Self {
            paths: paths.into_iter(),
            options,
            current: None,
        }
    }

    /// Expands `patterns` with [`expand_shard_paths`] and reads the result.
    pub fn from_patterns(patterns: &[String], options: ReaderOptions) -> Result<Self, ShardError> {
        Ok(Self::new(expand_shard_paths(patterns)?, options))
    }

    /// Moves reading to a background thread that stays up to `capacity` items
    /// ahead, so file I/O and parsing overlap with the consumer's work.
    pub fn prefetch(self, capacity: usize) -> io::Result<Prefetched> {
        let (sender, items) = sync_channel(capacity);
        let worker = thread::Builder::new()
            .name("starkret-shards".into())
            .spawn(move || {
                for item in self {
                    // The consumer hung up; stop reading.
                    if sender.send(item).is_err() {
                        break;
                    }
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
            let path = self.paths.next()?;
            match File::open(&path) {
                Ok(file) => {
                    let reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
                    self.current =
                        Some(ShardSamples::new(reader, shard_name(&path), &self.options));
                }
                Err(err) => {
                    self.current = None;
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

/// The items of a [`ShardReader`], read ahead on a background thread.
///
/// Dropping it stops the thread after the item it is reading.
pub struct Prefetched {
    items: Receiver<ShardItem>,
    worker: Option<JoinHandle<()>>,
}

impl Iterator for Prefetched {
    type Item = ShardItem;

    fn next(&mut self) -> Option<ShardItem> {
        if let Ok(item) = self.items.recv() {
            return Some(item);
        }
        // The channel closes when the worker ends; a panic there must not look
        // like the end of the data.
        let panic = self.worker.take()?.join().err()?;
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Some(ShardItem::Issue(ShardIssue {
            shard: String::new(),
            key: None,
            reason: format!("shard reader thread panicked: {message}"),
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
    fn double_underscore_members_directories_links_and_dotless_names_are_skipped() {
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
        add("0002.jpg", tar::EntryType::Regular, b"img2");
        let bytes = builder.into_inner().unwrap();
        let items = read(&bytes, DEFAULT_MAX_MEMBER_BYTES);
        assert_eq!(keys_and_issues(&items), ["0001", "0002"]);
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
    fn a_key_that_comes_back_later_is_a_new_sample() {
        let bytes = tar_of(&[("a.jpg", b"1"), ("b.jpg", b"2"), ("a.txt", b"late")]);
        let items = read(&bytes, DEFAULT_MAX_MEMBER_BYTES);
        assert_eq!(
            keys_and_issues(&items),
            ["a", "b", r#"! Some("a") no image member (has: txt)"#]
        );
    }

    #[test]
    fn a_truncated_tar_keeps_the_complete_samples_and_names_the_last_key() {
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
                "! Some(\"0003\") truncated tar: cut inside member '0003.jpg' (100 of 600 bytes) \
                 (last key '0003')",
            ]
        );
        // Cut in a header, the sample in progress may lack members: it is dropped and named.
        let items = read(&bytes[..third_header + 200], DEFAULT_MAX_MEMBER_BYTES);
        assert_eq!(
            keys_and_issues(&items),
            [
                "0001",
                "! Some(\"0002\") truncated tar: cut inside the header at byte 5120 (last key '0002')",
            ]
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
        let prefetched: Vec<_> = ShardReader::new(paths, ReaderOptions::default())
            .prefetch(1)
            .unwrap()
            .collect();
        assert_eq!(prefetched, direct);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
