//! Moving pixels between rows and columns, for the horizontal resampling pass.
//!
//! The horizontal pass runs as a vertical one on a block of rows turned into columns
//! (see `resample::horizontal`), so each block is transposed in and out. Pixels are
//! `CH` samples in the rows and `PW >= CH` samples in the columns: three-byte pixels
//! travel as four so that one 32-bit move carries a pixel, and eight rows of eight
//! such words are transposed with AVX2 shuffles where the CPU has them.

/// Writes pixel `x` of `lines[r]` to `out[x * stride + r * PW..][..PW]`. With
/// `PW > CH` the extra samples are the next pixel's (or, for the last pixel,
/// `T::default()`): whatever they hold, their results are overwritten later.
pub fn rows_to_columns<T: Copy + Default, const CH: usize, const PW: usize>(
    lines: &[&[T]],
    out: &mut [T],
    stride: usize,
) {
    for (r, line) in lines.iter().enumerate() {
        line_to_column::<T, CH, PW>(line, r, out, stride, 0);
    }
}

/// Row `dst[r * row_len..][..row_len]` gets samples `columns[x * stride + r * PW..]`
/// (the first `CH` of each `PW`) for every pixel `x`: the inverse of
/// `rows_to_columns`.
pub fn columns_to_rows<T: Copy, const CH: usize, const PW: usize>(
    columns: &[T],
    stride: usize,
    dst: &mut [T],
    row_len: usize,
) {
    for (r, row) in dst.chunks_exact_mut(row_len).enumerate() {
        column_to_row::<T, CH, PW>(columns, stride, r, row, 0);
    }
}

/// `rows_to_columns` for bytes, with AVX2 where the CPU has it.
pub fn rows_to_columns_u8<const CH: usize, const PW: usize>(
    lines: &[&[u8]],
    out: &mut [u8],
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if PW == 4 && (CH == 3 || CH == 4) && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        let done = unsafe { avx2::rows_to_columns::<CH>(lines, out, stride) };
        let grouped = lines.len() / 8 * 8;
        for (r, line) in lines.iter().enumerate() {
            let from = if r < grouped { done } else { 0 };
            line_to_column::<u8, CH, PW>(line, r, out, stride, from);
        }
        return;
    }
    rows_to_columns::<u8, CH, PW>(lines, out, stride)
}

/// `columns_to_rows` for bytes, with AVX2 where the CPU has it.
pub fn columns_to_rows_u8<const CH: usize, const PW: usize>(
    columns: &[u8],
    stride: usize,
    dst: &mut [u8],
    row_len: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if PW == 4 && (CH == 3 || CH == 4) && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        let done = unsafe { avx2::columns_to_rows::<CH>(columns, stride, dst, row_len) };
        let grouped = dst.len() / row_len / 8 * 8;
        for (r, row) in dst.chunks_exact_mut(row_len).enumerate() {
            let from = if r < grouped { done } else { 0 };
            column_to_row::<u8, CH, PW>(columns, stride, r, row, from);
        }
        return;
    }
    columns_to_rows::<u8, CH, PW>(columns, stride, dst, row_len)
}

/// `rows_to_columns` for line `r`, pixels `from..`.
fn line_to_column<T: Copy + Default, const CH: usize, const PW: usize>(
    line: &[T],
    r: usize,
    out: &mut [T],
    stride: usize,
    from: usize,
) {
    let mut x = from;
    if PW > CH {
        for px in line[from * CH..].windows(PW).step_by(CH) {
            out[x * stride + r * PW..][..PW].copy_from_slice(px);
            x += 1;
        }
    }
    for px in line[x * CH..].chunks_exact(CH) {
        let mut padded = [T::default(); PW];
        padded[..CH].copy_from_slice(px);
        out[x * stride + r * PW..][..PW].copy_from_slice(&padded);
        x += 1;
    }
}

/// `columns_to_rows` for row `r`, pixels `from..`. Pixels are written as `PW`
/// samples in increasing order, so each extra sample is overwritten by the next
/// pixel; the last pixel of the row is written exactly.
fn column_to_row<T: Copy, const CH: usize, const PW: usize>(
    columns: &[T],
    stride: usize,
    r: usize,
    row: &mut [T],
    from: usize,
) {
    let width = row.len() / CH;
    let column = |x: usize| &columns[x * stride + r * PW..][..PW];
    let whole = if PW > CH {
        width.saturating_sub(1)
    } else {
        width
    };
    for x in from..whole {
        row[x * CH..][..PW].copy_from_slice(column(x));
    }
    for x in whole.max(from)..width {
        row[x * CH..][..CH].copy_from_slice(&column(x)[..CH]);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Bytes read to load eight `CH`-byte pixels as eight words.
    const fn load_len(ch: usize) -> usize {
        if ch == 3 {
            28
        } else {
            32
        }
    }

    /// `rows_to_columns` for every full group of eight lines and the first pixels
    /// whose loads stay inside the line; returns how many pixels per line that is.
    #[target_feature(enable = "avx2")]
    pub unsafe fn rows_to_columns<const CH: usize>(
        lines: &[&[u8]],
        out: &mut [u8],
        stride: usize,
    ) -> usize {
        let len = lines.first().map_or(0, |line| line.len());
        let read = load_len(CH);
        if len < read {
            return 0;
        }
        let groups = (len - read) / (8 * CH) + 1;
        for (g, eight) in lines.chunks_exact(8).enumerate() {
            for x in (0..groups).map(|i| i * 8) {
                let mut words = [_mm256_setzero_si256(); 8];
                for (w, line) in words.iter_mut().zip(eight) {
                    *w = load_words::<CH>(&line[x * CH..][..read]);
                }
                for (j, column) in transpose8x8(words).iter().enumerate() {
                    let dst = &mut out[(x + j) * stride + g * 32..][..32];
                    // SAFETY: `dst` holds the 32 bytes written.
                    unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), *column) };
                }
            }
        }
        groups * 8
    }

    /// `columns_to_rows` for every full group of eight rows and of eight pixels;
    /// returns how many pixels per row that is.
    #[target_feature(enable = "avx2")]
    pub unsafe fn columns_to_rows<const CH: usize>(
        columns: &[u8],
        stride: usize,
        dst: &mut [u8],
        row_len: usize,
    ) -> usize {
        let groups = row_len / CH / 8;
        for g in 0..dst.len() / row_len / 8 {
            for x in (0..groups).map(|i| i * 8) {
                let mut words = [_mm256_setzero_si256(); 8];
                for (j, w) in words.iter_mut().enumerate() {
                    let src = &columns[(x + j) * stride + g * 32..][..32];
                    // SAFETY: `src` holds the 32 bytes read.
                    *w = unsafe { _mm256_loadu_si256(src.as_ptr().cast()) };
                }
                for (k, row) in transpose8x8(words).iter().enumerate() {
                    let at = (g * 8 + k) * row_len + x * CH;
                    store_words::<CH>(&mut dst[at..][..8 * CH], *row);
                }
            }
        }
        groups * 8
    }

    /// Eight `CH`-byte pixels from `bytes` (`load_len(CH)` long) as eight words.
    #[target_feature(enable = "avx2")]
    fn load_words<const CH: usize>(bytes: &[u8]) -> __m256i {
        let p = bytes.as_ptr();
        if CH == 4 {
            // SAFETY: `bytes` is 32 long.
            return unsafe { _mm256_loadu_si256(p.cast()) };
        }
        // SAFETY: `bytes` is 28 long: pixels 0-3 from byte 0 and 4-7 from byte 12.
        let (lo, hi) = unsafe { (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(12).cast())) };
        let both = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi);
        let spread = _mm256_setr_epi8(
            0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1, //
            0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
        );
        _mm256_shuffle_epi8(both, spread)
    }

    /// Stores eight words as eight `CH`-byte pixels: exactly `bytes`, `8 * CH` long.
    #[target_feature(enable = "avx2")]
    fn store_words<const CH: usize>(bytes: &mut [u8], words: __m256i) {
        let p = bytes.as_mut_ptr();
        if CH == 4 {
            // SAFETY: `bytes` is 32 long.
            unsafe { _mm256_storeu_si256(p.cast(), words) };
            return;
        }
        let pack = _mm256_setr_epi8(
            0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1, //
            0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,
        );
        let packed = _mm256_shuffle_epi8(words, pack);
        let joined = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 3, 7));
        // SAFETY: `bytes` is 24 long: 16 bytes, then 8 from offset 16.
        unsafe {
            _mm_storeu_si128(p.cast(), _mm256_castsi256_si128(joined));
            _mm_storel_epi64(p.add(16).cast(), _mm256_extracti128_si256::<1>(joined));
        }
    }

    /// Transposes an 8x8 matrix of 32-bit words held one row per register.
    #[target_feature(enable = "avx2")]
    fn transpose8x8(a: [__m256i; 8]) -> [__m256i; 8] {
        let t0 = _mm256_unpacklo_epi32(a[0], a[1]);
        let t1 = _mm256_unpackhi_epi32(a[0], a[1]);
        let t2 = _mm256_unpacklo_epi32(a[2], a[3]);
        let t3 = _mm256_unpackhi_epi32(a[2], a[3]);
        let t4 = _mm256_unpacklo_epi32(a[4], a[5]);
        let t5 = _mm256_unpackhi_epi32(a[4], a[5]);
        let t6 = _mm256_unpacklo_epi32(a[6], a[7]);
        let t7 = _mm256_unpackhi_epi32(a[6], a[7]);
        let u0 = _mm256_unpacklo_epi64(t0, t2);
        let u1 = _mm256_unpackhi_epi64(t0, t2);
        let u2 = _mm256_unpacklo_epi64(t1, t3);
        let u3 = _mm256_unpackhi_epi64(t1, t3);
        let u4 = _mm256_unpacklo_epi64(t4, t6);
        let u5 = _mm256_unpackhi_epi64(t4, t6);
        let u6 = _mm256_unpacklo_epi64(t5, t7);
        let u7 = _mm256_unpackhi_epi64(t5, t7);
        [
            _mm256_permute2x128_si256::<0x20>(u0, u4),
            _mm256_permute2x128_si256::<0x20>(u1, u5),
            _mm256_permute2x128_si256::<0x20>(u2, u6),
            _mm256_permute2x128_si256::<0x20>(u3, u7),
            _mm256_permute2x128_si256::<0x31>(u0, u4),
            _mm256_permute2x128_si256::<0x31>(u1, u5),
            _mm256_permute2x128_si256::<0x31>(u2, u6),
            _mm256_permute2x128_si256::<0x31>(u3, u7),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift).
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    fn both_ways<const CH: usize, const PW: usize>(rows: usize, width: usize) {
        let data = noise(rows * width * CH, (rows * 1000 + width) as u64);
        let lines: Vec<&[u8]> = data.chunks_exact(width * CH).collect();
        let stride = rows * PW;
        let mut fast = vec![0u8; width * stride];
        let mut plain = vec![0u8; width * stride];
        rows_to_columns_u8::<CH, PW>(&lines, &mut fast, stride);
        rows_to_columns::<u8, CH, PW>(&lines, &mut plain, stride);
        // Only the first CH samples of each column word carry pixel data.
        for (i, (f, p)) in fast.iter().zip(&plain).enumerate() {
            if i % PW < CH {
                assert_eq!(f, p, "{rows}x{width} (CH {CH}) to columns at {i}");
            }
        }
        let mut back = vec![0u8; data.len()];
        columns_to_rows_u8::<CH, PW>(&fast, stride, &mut back, width * CH);
        assert_eq!(back, data, "{rows}x{width} (CH {CH}) back to rows");
        let mut back_plain = vec![0u8; data.len()];
        columns_to_rows::<u8, CH, PW>(&plain, stride, &mut back_plain, width * CH);
        assert_eq!(back_plain, data);
    }

    #[test]
    fn simd_transposes_match_the_scalar_ones() {
        for rows in [1, 7, 8, 9, 16, 17, 24] {
            for width in [1, 2, 8, 9, 10, 11, 15, 16, 17, 33, 100] {
                both_ways::<3, 4>(rows, width);
                both_ways::<4, 4>(rows, width);
                both_ways::<1, 1>(rows, width);
                both_ways::<2, 2>(rows, width);
            }
        }
    }
}
