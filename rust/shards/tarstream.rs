//! Tar members one at a time from any byte stream, telling truncation apart.
//!
//! The `tar` crate's `Entries` iterator borrows its `Archive`, so it cannot live
//! in a plain struct iterator, and a member cut short at the end of a file reads
//! as a short member rather than an error. This reader parses the stream itself
//! (headers are decoded by `tar::Header`, sizes by [`parse_size_field`]), checks
//! every size against the bytes that really arrived, and never holds a member it
//! is asked to skip. Nothing is ever written to disk: members are bytes in memory
//! or skipped, and link targets are only reported.
//!
//! The entry points ([`TarStream`], [`parse_pax`], [`parse_size_field`]) are public
//! so that fuzz targets outside the crate can drive them.

use std::fmt;
use std::io::{self, Read};

const BLOCK: u64 = 512;
/// GNU long names and pax records are small; a bigger one is a corrupt or hostile shard.
const MAX_EXTENSION_BYTES: u64 = 1 << 20;
/// Members are read into a buffer that grows as bytes arrive, not one sized by the header.
const MAX_INITIAL_CAPACITY: u64 = 8 << 20;

/// One member header, its data not read yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHeader {
    pub path: String,
    pub size: u64,
    pub kind: MemberKind,
}

/// What a member is, from its type flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberKind {
    /// A regular file (type `0`, `\0` or the contiguous file `7`).
    Regular,
    Directory,
    /// A symbolic link and its target, as written (never followed).
    Symlink(String),
    /// A hard link and the member it names (never followed).
    HardLink(String),
    CharDevice,
    BlockDevice,
    Fifo,
    /// A GNU sparse file.
    Sparse,
    /// Any other type flag (GNU volume labels, vendor extensions).
    Other(u8),
}

impl MemberKind {
    pub fn is_regular(&self) -> bool {
        *self == Self::Regular
    }
}

impl fmt::Display for MemberKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Regular => f.write_str("regular file"),
            Self::Directory => f.write_str("directory"),
            Self::Symlink(_) => f.write_str("symlink"),
            Self::HardLink(_) => f.write_str("hard link"),
            Self::CharDevice => f.write_str("character device"),
            Self::BlockDevice => f.write_str("block device"),
            Self::Fifo => f.write_str("fifo"),
            Self::Sparse => f.write_str("sparse file"),
            Self::Other(flag) => write!(f, "type {:?}", char::from(*flag)),
        }
    }
}

/// Why a tar stream ended early.
#[derive(Debug)]
pub enum TarError {
    /// The stream ended inside a header or a member, or without an end-of-archive marker.
    Truncated(String),
    /// The bytes are not a valid tar stream.
    Corrupt(String),
    /// Reading the underlying stream failed.
    Io(io::Error),
}

impl fmt::Display for TarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated(detail) => write!(f, "truncated tar: {detail}"),
            Self::Corrupt(detail) => write!(f, "corrupt tar: {detail}"),
            // A decompressor under the stream says what is wrong itself
            // ("corrupt gzip stream: ..."); anything else is a plain read error.
            Self::Io(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ) =>
            {
                write!(f, "{err}")
            }
            Self::Io(err) => write!(f, "read error: {err}"),
        }
    }
}

/// A forward-only tar reader: `next_member`, then optionally `read_data` or
/// `skip_data` (the next `next_member` skips what is left either way).
pub struct TarStream<R> {
    inner: R,
    /// Bytes consumed so far, for error messages.
    offset: u64,
    /// Path of the member whose data comes next, for error messages.
    current: String,
    /// Data bytes of the current member not consumed yet.
    data_left: u64,
    /// Zero bytes after the current member up to the next block boundary.
    padding_left: u64,
}

impl<R: Read> TarStream<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            offset: 0,
            current: String::new(),
            data_left: 0,
            padding_left: 0,
        }
    }

    /// The stream under the tar reader (to read past the end-of-archive marker).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The next member's header (skipping what is left of the previous
    /// member), or `None` at the end-of-archive marker.
    ///
    /// An error here is about headers or padding, never about the data of a
    /// member that `read_data` / `skip_data` was called for.
    pub fn next_member(&mut self) -> Result<Option<MemberHeader>, TarError> {
        self.skip_rest()?;
        let mut long_path: Option<String> = None;
        let mut long_link: Option<String> = None;
        let mut pax = PaxRecords::default();
        loop {
            let header_offset = self.offset;
            let mut header = tar::Header::new_old();
            let got = self.fill(header.as_mut_bytes())?;
            if got == 0 {
                // GNU tar, bsdtar and Python's tarfile all write the marker; a stream
                // without it was almost always cut at a block boundary.
                return Err(TarError::Truncated(format!(
                    "ends at byte {header_offset} without an end-of-archive marker"
                )));
            }
            if got < BLOCK as usize {
                return Err(TarError::Truncated(format!(
                    "cut inside the header at byte {header_offset}"
                )));
            }
            if header.as_bytes().iter().all(|&b| b == 0) {
                if long_path.is_some() || long_link.is_some() || pax != PaxRecords::default() {
                    return Err(TarError::Corrupt(
                        "an extended header is not followed by its member".into(),
                    ));
                }
                return Ok(None);
            }
            check_checksum(&header, header_offset)?;
            let header_size = parse_size_field(&header.as_bytes()[124..136]).map_err(|reason| {
                TarError::Corrupt(format!("{reason} in the header at byte {header_offset}"))
            })?;
            let kind = header.entry_type();
            if kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions() {
                if header_size > MAX_EXTENSION_BYTES {
                    return Err(TarError::Corrupt(format!(
                        "extended header at byte {header_offset} claims {header_size} bytes"
                    )));
                }
                self.begin("(extended header)".into(), header_size);
                let data = self.read_data()?;
                self.skip_rest()?;
                if kind.is_pax_local_extensions() {
                    let records = parse_pax(&data).map_err(|reason| {
                        TarError::Corrupt(format!("pax header at byte {header_offset}: {reason}"))
                    })?;
                    pax.merge(records);
                } else {
                    let name = data.split(|&b| b == 0).next().unwrap_or_default();
                    let name = Some(String::from_utf8_lossy(name).into_owned());
                    if kind.is_gnu_longname() {
                        long_path = name;
                    } else {
                        long_link = name;
                    }
                }
                continue;
            }
            if kind.is_pax_global_extensions() {
                self.begin("(extended header)".into(), header_size);
                self.skip_rest()?;
                continue;
            }
            if kind.is_gnu_sparse() {
                self.skip_sparse_extension_blocks(&header)?;
            }
            let path = pax
                .path
                .or(long_path)
                .unwrap_or_else(|| String::from_utf8_lossy(&header.path_bytes()).into_owned());
            let link = || {
                pax.link.clone().or(long_link.clone()).unwrap_or_else(|| {
                    header
                        .link_name_bytes()
                        .map(|name| String::from_utf8_lossy(&name).into_owned())
                        .unwrap_or_default()
                })
            };
            // The raw flag: `tar::EntryType` reads NUL as '0', losing the v7 case.
            let kind = match header.as_bytes()[156] {
                // Old (v7) tars mark a directory with a trailing slash only
                // (tarfile reads it so too).
                b'\0' if path.ends_with('/') => MemberKind::Directory,
                b'0' | b'\0' | b'7' => MemberKind::Regular,
                b'1' => MemberKind::HardLink(link()),
                b'2' => MemberKind::Symlink(link()),
                b'3' => MemberKind::CharDevice,
                b'4' => MemberKind::BlockDevice,
                b'5' => MemberKind::Directory,
                b'6' => MemberKind::Fifo,
                b'S' => MemberKind::Sparse,
                other => MemberKind::Other(other),
            };
            let size = pax.size.unwrap_or(header_size);
            self.begin(path.clone(), size);
            return Ok(Some(MemberHeader { path, size, kind }));
        }
    }

    /// All data of the member returned by the last `next_member`. The caller
    /// bounds the memory: the buffer never exceeds the member's size, and
    /// grows only as bytes really arrive.
    pub fn read_data(&mut self) -> Result<Vec<u8>, TarError> {
        let size = self.data_left;
        let mut data = Vec::with_capacity(size.min(MAX_INITIAL_CAPACITY) as usize);
        let got = (&mut self.inner)
            .take(size)
            .read_to_end(&mut data)
            .map_err(TarError::Io)?;
        self.offset += got as u64;
        self.data_left = 0;
        if (got as u64) < size {
            return Err(self.cut_inside_data(got as u64, size));
        }
        Ok(data)
    }

    /// Streams past the data of the member returned by the last `next_member`.
    pub fn skip_data(&mut self) -> Result<(), TarError> {
        let size = self.data_left;
        let got =
            io::copy(&mut (&mut self.inner).take(size), &mut io::sink()).map_err(TarError::Io)?;
        self.offset += got;
        self.data_left = 0;
        if got < size {
            return Err(self.cut_inside_data(got, size));
        }
        Ok(())
    }

    /// Old GNU sparse members list their holes in extra blocks after the
    /// header, outside the member size.
    fn skip_sparse_extension_blocks(&mut self, header: &tar::Header) -> Result<(), TarError> {
        let mut extended = header.as_gnu().is_some_and(tar::GnuHeader::is_extended);
        while extended {
            let block_offset = self.offset;
            let mut block = tar::GnuExtSparseHeader::new();
            if self.fill(block.as_mut_bytes())? < BLOCK as usize {
                return Err(TarError::Truncated(format!(
                    "cut inside a sparse header at byte {block_offset}"
                )));
            }
            extended = block.is_extended();
        }
        Ok(())
    }

    fn begin(&mut self, path: String, size: u64) {
        self.current = path;
        self.data_left = size;
        self.padding_left = (BLOCK - size % BLOCK) % BLOCK;
    }

    /// Consumes the rest of the current member (data and padding) without keeping it.
    fn skip_rest(&mut self) -> Result<(), TarError> {
        let (data, padding) = (self.data_left, self.padding_left);
        // A hostile header can claim a size near u64::MAX; the copy then just hits EOF.
        let total = data.saturating_add(padding);
        if total == 0 {
            return Ok(());
        }
        let got =
            io::copy(&mut (&mut self.inner).take(total), &mut io::sink()).map_err(TarError::Io)?;
        self.offset += got;
        self.data_left = 0;
        self.padding_left = 0;
        if got < data {
            return Err(self.cut_inside_data(got, data));
        }
        if got < total {
            return Err(TarError::Truncated(format!(
                "cut inside the padding after member '{}'",
                self.current
            )));
        }
        Ok(())
    }

    fn cut_inside_data(&self, got: u64, size: u64) -> TarError {
        TarError::Truncated(format!(
            "cut inside member '{}' ({got} of {size} bytes)",
            self.current
        ))
    }

    /// Reads until `buf` is full or the stream ends; returns the bytes read.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, TarError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TarError::Io(e)),
            }
        }
        self.offset += filled as u64;
        Ok(filled)
    }
}

fn check_checksum(header: &tar::Header, header_offset: u64) -> Result<(), TarError> {
    let bytes = header.as_bytes();
    let recorded = header.cksum().ok();
    // The checksum field itself counts as eight spaces. Old writers summed signed
    // chars; tarfile and GNU tar accept either sum, so this does too.
    let field = 148..156;
    let (mut unsigned, mut signed) = (8 * 32u32, 8 * 32i64);
    for (i, &b) in bytes.iter().enumerate() {
        if !field.contains(&i) {
            unsigned += u32::from(b);
            signed += i64::from(b as i8);
        }
    }
    let matches = recorded.is_some_and(|r| r == unsigned || i64::from(r) == signed);
    if matches {
        Ok(())
    } else {
        Err(TarError::Corrupt(format!(
            "bad header checksum at byte {header_offset}"
        )))
    }
}

/// The 12-byte size field of a header: octal digits (up to a NUL, spaces
/// around them ignored, empty meaning 0, as tarfile reads it), or GNU base-256
/// (first byte 0x80 for a positive number, 0xff for a negative one).
pub fn parse_size_field(field: &[u8]) -> Result<u64, &'static str> {
    match field.first() {
        Some(0xff) => Err("negative member size"),
        Some(0x80) => field[1..].iter().try_fold(0u64, |value, &byte| {
            value
                .checked_mul(256)
                .map(|v| v | u64::from(byte))
                .ok_or("member size does not fit in 64 bits")
        }),
        _ => {
            let digits = field.split(|&b| b == 0).next().unwrap_or_default();
            let text = std::str::from_utf8(digits)
                .map_err(|_| "size field is not an octal number")?
                .trim_matches(|c: char| c == ' ');
            if text.is_empty() {
                return Ok(0);
            }
            u64::from_str_radix(text, 8).map_err(|_| "size field is not an octal number")
        }
    }
}

/// The pax records this reader uses; the others are ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PaxRecords {
    pub path: Option<String>,
    pub link: Option<String>,
    pub size: Option<u64>,
}

impl PaxRecords {
    /// Records of a later pax header win over those of an earlier one.
    fn merge(&mut self, later: PaxRecords) {
        self.path = later.path.or(self.path.take());
        self.link = later.link.or(self.link.take());
        self.size = later.size.or(self.size);
    }
}

/// Parses `"<len> <key>=<value>\n"` records; `len` counts the whole record, so
/// values may contain newlines.
pub fn parse_pax(mut data: &[u8]) -> Result<PaxRecords, &'static str> {
    let mut records = PaxRecords::default();
    while !data.is_empty() {
        let space = data
            .iter()
            .position(|&b| b == b' ')
            .ok_or("record without a length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("record length is not a number")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("record length does not match its text");
        }
        let record = &data[space + 1..len - 1];
        let equals = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or("record without '='")?;
        let (key, value) = (&record[..equals], &record[equals + 1..]);
        match key {
            b"path" => records.path = Some(String::from_utf8_lossy(value).into_owned()),
            b"linkpath" => records.link = Some(String::from_utf8_lossy(value).into_owned()),
            b"size" => {
                let size = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or("size is not a number")?;
                records.size = Some(size);
            }
            _ => {}
        }
        data = &data[len..];
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::tests::tar_of;

    fn all_members(bytes: &[u8]) -> (Vec<(String, Vec<u8>)>, Option<TarError>) {
        let mut stream = TarStream::new(bytes);
        let mut out = Vec::new();
        loop {
            match stream.next_member() {
                Ok(Some(m)) => match stream.read_data() {
                    Ok(data) => out.push((m.path, data)),
                    Err(e) => return (out, Some(e)),
                },
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[test]
    fn reads_members_and_long_names() {
        let long = format!("{}/x.jpg", "d".repeat(150));
        let bytes = tar_of(&[("a.jpg", b"abc"), (long.as_str(), b""), ("b.txt", b"hi")]);
        let (members, err) = all_members(&bytes);
        assert!(err.is_none());
        let names: Vec<_> = members.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(names, ["a.jpg", long.as_str(), "b.txt"]);
        assert_eq!(members[0].1, b"abc");
    }

    #[test]
    fn every_cut_point_is_reported_as_truncation() {
        let bytes = tar_of(&[("a.jpg", &[7u8; 700]), ("a.txt", b"caption")]);
        let end_of_members = 512 + 1024 + 512 + 512;
        for cut in 0..=end_of_members {
            let (_, err) = all_members(&bytes[..cut]);
            assert!(
                matches!(err, Some(TarError::Truncated(_))),
                "cut at {cut}: {err:?}"
            );
        }
        assert!(all_members(&bytes[..end_of_members + 512]).1.is_none());
    }

    #[test]
    fn old_gnu_sparse_members_skip_their_extension_blocks() {
        let mut header = tar::Header::new_gnu();
        header.set_path("s.bin").unwrap();
        header.set_entry_type(tar::EntryType::GNUSparse);
        header.set_size(3);
        header.as_gnu_mut().unwrap().isextended = [1];
        header.set_cksum();
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 512]); // extension block, not extended further
        bytes.extend_from_slice(b"abc");
        bytes.resize(bytes.len() + 509, 0);
        bytes.extend_from_slice(&tar_of(&[("b.jpg", b"i")]));
        let mut stream = TarStream::new(&bytes[..]);
        let sparse = stream.next_member().unwrap().unwrap();
        assert_eq!(
            (sparse.path.as_str(), sparse.kind),
            ("s.bin", MemberKind::Sparse)
        );
        assert_eq!(stream.next_member().unwrap().unwrap().path, "b.jpg");
    }

    #[test]
    fn a_bad_checksum_is_corruption() {
        let mut bytes = tar_of(&[("a.jpg", b"abc")]);
        bytes[0] = b'b';
        assert!(matches!(all_members(&bytes).1, Some(TarError::Corrupt(_))));
    }

    #[test]
    fn pax_records_set_path_and_size_and_may_hold_newlines() {
        let record = |k: &str, v: &str| {
            let body = format!(" {k}={v}\n");
            let mut len = body.len() + 1;
            while len != body.len() + len.to_string().len() {
                len = body.len() + len.to_string().len();
            }
            format!("{len}{body}")
        };
        let text =
            record("path", "ü/line\nbreak.jpg") + &record("size", "42") + &record("mtime", "1.5");
        let pax = parse_pax(text.as_bytes()).unwrap();
        assert_eq!(pax.path.as_deref(), Some("ü/line\nbreak.jpg"));
        assert_eq!(pax.size, Some(42));
        assert!(parse_pax(b"99 path=x\n").is_err());
        let link = parse_pax(record("linkpath", "../t.jpg").as_bytes()).unwrap();
        assert_eq!(link.link.as_deref(), Some("../t.jpg"));
    }

    #[test]
    fn size_fields_in_octal_and_base_256() {
        let field = |bytes: &[u8]| {
            let mut f = [0u8; 12];
            f[..bytes.len()].copy_from_slice(bytes);
            parse_size_field(&f)
        };
        assert_eq!(field(b"00000001750\0"), Ok(1000));
        assert_eq!(field(b"  1750 \0"), Ok(1000));
        assert_eq!(field(b""), Ok(0));
        assert_eq!(field(b"1750\0garbage"), Ok(1000));
        assert_eq!(field(b"12z"), Err("size field is not an octal number"));
        assert_eq!(field(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Ok(256));
        assert_eq!(
            field(&[0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err("member size does not fit in 64 bits")
        );
        // The old reader printed these as 18446744073709551615.
        assert_eq!(field(&[0xff; 12]), Err("negative member size"));
        assert_eq!(field(&[0xff, 0, 0, 0]), Err("negative member size"));
    }

    #[test]
    fn a_negative_size_is_reported_as_such() {
        let mut bytes = tar_of(&[("a.jpg", b"abc")]);
        bytes[124..136].copy_from_slice(&[0xff; 12]);
        let mut header = tar::Header::new_old();
        header.as_mut_bytes().copy_from_slice(&bytes[..512]);
        header.set_cksum();
        bytes[..512].copy_from_slice(header.as_bytes());
        let err = all_members(&bytes).1.unwrap().to_string();
        assert_eq!(
            err,
            "corrupt tar: negative member size in the header at byte 0"
        );
    }

    #[test]
    fn member_kinds_and_link_targets_are_reported_never_followed() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, link: Option<&str>| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_size(0);
            if let Some(link) = link {
                header.set_link_name(link).unwrap();
            }
            builder.append_data(&mut header, path, &b""[..]).unwrap();
        };
        add("s.jpg", tar::EntryType::Symlink, Some("/etc/passwd"));
        add("h.jpg", tar::EntryType::Link, Some("a.jpg"));
        add("c.jpg", tar::EntryType::Char, None);
        add("b.jpg", tar::EntryType::Block, None);
        add("f.jpg", tar::EntryType::Fifo, None);
        add("d", tar::EntryType::Directory, None);
        add("v.jpg", tar::EntryType::new(b'V'), None);
        let mut bytes = builder.into_inner().unwrap();
        // A v7 directory: type NUL and a trailing slash.
        let mut v7 = tar::Header::new_old();
        v7.as_old_mut().name[..6].copy_from_slice(b"v7dir/");
        v7.set_size(0);
        v7.as_mut_bytes()[156] = 0;
        v7.set_cksum();
        let end = bytes.len() - 1024;
        bytes.splice(end..end, v7.as_bytes().iter().copied());
        let mut stream = TarStream::new(&bytes[..]);
        let mut kinds = Vec::new();
        while let Some(member) = stream.next_member().unwrap() {
            kinds.push(member.kind.to_string());
            if let MemberKind::Symlink(target) | MemberKind::HardLink(target) = member.kind {
                kinds.push(target);
            }
        }
        assert_eq!(
            kinds,
            [
                "symlink",
                "/etc/passwd",
                "hard link",
                "a.jpg",
                "character device",
                "block device",
                "fifo",
                "directory",
                "type 'V'",
                "directory"
            ]
        );
    }

    #[test]
    fn data_cuts_come_from_read_or_skip_and_padding_cuts_from_the_next_header() {
        let bytes = tar_of(&[("a.jpg", &[7u8; 700]), ("b.jpg", b"b")]);
        let mut stream = TarStream::new(&bytes[..512 + 600]);
        stream.next_member().unwrap();
        assert!(matches!(stream.skip_data(), Err(TarError::Truncated(_))));
        let mut stream = TarStream::new(&bytes[..512 + 800]);
        stream.next_member().unwrap();
        assert_eq!(stream.read_data().unwrap().len(), 700);
        let err = stream.next_member().unwrap_err().to_string();
        assert_eq!(
            err,
            "truncated tar: cut inside the padding after member 'a.jpg'"
        );
    }
}
