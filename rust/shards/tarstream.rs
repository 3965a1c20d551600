//! Tar members one at a time from any byte stream, telling truncation apart.
//!
//! The `tar` crate's `Entries` iterator borrows its `Archive`, so it cannot live
//! in a plain struct iterator, and a member cut short at the end of a file reads
//! as a short member rather than an error. This reader parses the stream itself
//! (headers are decoded by `tar::Header`), checks every size against the bytes
//! that really arrived, and never holds a member it is asked to skip.

use std::fmt;
use std::io::{self, Read};

const BLOCK: u64 = 512;
/// GNU long names and pax records are small; a bigger one is a corrupt or hostile shard.
const MAX_EXTENSION_BYTES: u64 = 1 << 20;
/// Members are read into a buffer that grows as bytes arrive, not one sized by the header.
const MAX_INITIAL_CAPACITY: u64 = 8 << 20;

/// One member header, its data not read yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MemberHeader {
    pub path: String,
    pub size: u64,
    /// A regular file; directories, links, devices and sparse files are not.
    pub regular: bool,
}

/// Why a tar stream ended early.
#[derive(Debug)]
pub(super) enum TarError {
    /// The stream ended inside a header or a member, or without an end-of-archive marker.
    Truncated(String),
    /// The bytes are not a valid tar stream.
    Corrupt(String),
    /// Reading the underlying file failed.
    Io(io::Error),
}

impl fmt::Display for TarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated(detail) => write!(f, "truncated tar: {detail}"),
            Self::Corrupt(detail) => write!(f, "corrupt tar: {detail}"),
            Self::Io(err) => write!(f, "read error: {err}"),
        }
    }
}

/// A forward-only tar reader: `next_member`, then optionally `read_data`.
pub(super) struct TarStream<R> {
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

    /// The next member's header (skipping what is left of the previous
    /// member), or `None` at the end-of-archive marker.
    pub fn next_member(&mut self) -> Result<Option<MemberHeader>, TarError> {
        self.skip_rest()?;
        let mut long_path: Option<String> = None;
        let mut pax_size: Option<u64> = None;
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
                if long_path.is_some() || pax_size.is_some() {
                    return Err(TarError::Corrupt(
                        "an extended header is not followed by its member".into(),
                    ));
                }
                return Ok(None);
            }
            check_checksum(&header, header_offset)?;
            let header_size = header
                .entry_size()
                .map_err(|e| TarError::Corrupt(format!("header at byte {header_offset}: {e}")))?;
            let kind = header.entry_type();
            if kind.is_gnu_longname() || kind.is_pax_local_extensions() {
                if header_size > MAX_EXTENSION_BYTES {
                    return Err(TarError::Corrupt(format!(
                        "extended header at byte {header_offset} claims {header_size} bytes"
                    )));
                }
                self.begin("(extended header)".into(), header_size);
                let data = self.read_data()?;
                if kind.is_gnu_longname() {
                    let name = data.split(|&b| b == 0).next().unwrap_or_default();
                    long_path = Some(String::from_utf8_lossy(name).into_owned());
                } else {
                    let pax = parse_pax(&data).map_err(|reason| {
                        TarError::Corrupt(format!("pax header at byte {header_offset}: {reason}"))
                    })?;
                    long_path = pax.path.or(long_path);
                    pax_size = pax.size.or(pax_size);
                }
                continue;
            }
            if kind.is_pax_global_extensions() || kind.is_gnu_longlink() {
                self.begin("(extended header)".into(), header_size);
                self.skip_rest()?;
                continue;
            }
            if kind.is_gnu_sparse() {
                self.skip_sparse_extension_blocks(&header)?;
            }
            let path =
                long_path.unwrap_or_else(|| String::from_utf8_lossy(&header.path_bytes()).into());
            let size = pax_size.unwrap_or(header_size);
            self.begin(path.clone(), size);
            return Ok(Some(MemberHeader {
                path,
                size,
                regular: kind.is_file() || kind.is_contiguous(),
            }));
        }
    }

    /// All data of the member returned by the last `next_member`.
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
        self.skip_rest()?;
        Ok(data)
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

#[derive(Default)]
struct PaxRecords {
    path: Option<String>,
    size: Option<u64>,
}

/// Parses `"<len> <key>=<value>\n"` records; `len` counts the whole record, so
/// values may contain newlines.
fn parse_pax(mut data: &[u8]) -> Result<PaxRecords, &'static str> {
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
        assert_eq!((sparse.path.as_str(), sparse.regular), ("s.bin", false));
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
    }
}
