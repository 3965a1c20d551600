//! Stable 64-bit hashes of image keys, for the on-disk key -> row index.
//!
//! `build-index` stores, per source, the sorted hashes of every key (and of every
//! `url:` key) with the row each came from; a lookup hashes the wanted keys here,
//! binary-searches the memory-mapped hashes and confirms each hit against the real
//! key, so a collision can cost a comparison but never return a wrong row. The hash
//! must not change between processes or versions (the index lives on disk): FNV-1a
//! over the UTF-8 bytes, then a SplitMix64 finaliser so that keys differing in their
//! last characters still spread over the whole 64-bit range.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

#[inline]
fn fnv(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= b as u64;
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

#[inline]
fn finish(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hash of `prefix` followed by `key` (the prefix is `url:` for Stark URL keys).
pub fn key_hash(prefix: &[u8], key: &[u8]) -> u64 {
    finish(fnv(fnv(FNV_OFFSET, prefix), key))
}

/// Hashes of the strings of an Arrow string array given as its raw buffers: string
/// `i` is `data[offsets[i]..offsets[i + 1]]`. Offsets out of order or past the data
/// are an error (the buffers come from a file).
pub fn hash_strings<O: Copy + TryInto<usize>>(
    prefix: &[u8],
    offsets: &[O],
    data: &[u8],
) -> Result<Vec<u64>, String> {
    let bound = |o: O| -> Result<usize, String> {
        o.try_into()
            .map_err(|_| "corrupt string offsets: a negative offset".to_string())
    };
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let (a, b) = (bound(w[0])?, bound(w[1])?);
        let bytes = data.get(a..b).ok_or_else(|| {
            format!(
                "corrupt string offsets: {a}..{b} outside {} bytes of data",
                data.len()
            )
        })?;
        out.push(key_hash(prefix, bytes));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_key_hash_like_their_concatenation() {
        assert_eq!(
            key_hash(b"url:", b"https://a/b.jpg"),
            key_hash(b"", b"url:https://a/b.jpg")
        );
        assert_ne!(key_hash(b"", b"cc12m/0001"), key_hash(b"", b"cc12m/0002"));
    }

    #[test]
    fn hashes_are_stable_across_versions() {
        // The index lives on disk: a change here must come with a format change.
        assert_eq!(key_hash(b"", b""), finish(FNV_OFFSET));
        assert_eq!(key_hash(b"", b"a"), finish(0xaf63_dc4c_8601_ec8c));
    }

    #[test]
    fn arrow_buffers_hash_each_string_and_reject_bad_offsets() {
        let data = b"abcdef";
        let got = hash_strings(b"", &[0i32, 2, 2, 6], data).unwrap();
        let want = vec![
            key_hash(b"", b"ab"),
            key_hash(b"", b""),
            key_hash(b"", b"cdef"),
        ];
        assert_eq!(got, want);
        assert!(hash_strings(b"", &[0i64, 7], data).is_err());
        assert!(hash_strings(b"", &[3i32, 1], data).is_err());
        assert!(hash_strings(b"", &[-1i32, 1], data).is_err());
    }
}
