//! Exact top-k with an 8-bit first pass: int8 copies of the rows, a proven error bound
//! per (query, row), and a float32 re-rank of the few rows the bound cannot rule out.
//!
//! **Format.** A part of `n` rows of dimension `d` is quantised into blocks of
//! [`BLOCK_ROWS`] rows (the last one padded with zero rows). A block holds the codes
//! in groups of four dimensions, `groups(d)` groups of 64 bytes (16 rows x 4 codes:
//! what one `vpdpbusd` lane sums), each code stored as `code + 128` (u8), and then
//! three f32 terms per row: the scale `s`, an upper bound of `|x|`, and an upper bound
//! of the residual `|x - s c|`. Codes are `round(x_i / s)` with `s = max|x_i| / 127`.
//!
//! **Bound.** For a query `q` (quantised the same way to `t c_q`, residual `r_q`) and a
//! row `x` (`s c_x`, residual `r_x`), with `D = c_q . c_x` computed exactly in integers:
//! `q.x - (t c_q).(s c_x) = r_q.x + (t c_q).r_x`, so by Cauchy-Schwarz
//! `|q.x - t s D| <= |r_q| |x| + |t c_q| |r_x|`. The score that counts is the float32
//! one the exact scan computes (`topk::rescore`), which differs from `q.x` by at most
//! `gamma_n |q| |x|` (`n` roundings in its longest accumulation chain), and `t s D` is
//! itself computed in f32 (three roundings, `<= 4u |A|`). All of it, plus a margin for
//! the rounding of the bound's own arithmetic and for underflow, gives `E` with
//! `A - E <= score <= A + E` for every row ([`bounds`]).
//!
//! **Search.** One pass over the codes keeps, per query, the `k` best lower bounds seen
//! (`theta` is the k-th) and every row whose upper bound reaches `theta` (exclusions
//! applied inside the scan). At least `k` eligible rows score `>= theta`, so every row
//! of the exact top-`k` has an upper bound `>= theta` and is kept; the kept rows are
//! re-scored with the scan's own float32 kernel and ranked by `topk`'s order, so ids,
//! scores and tie order are those of `topk::search_parts`, by construction.
//!
//! Kernels: AVX-512 VNNI (`vpdpbusd`, register-blocked `MR` queries x `NB` blocks,
//! panels of blocks reused from L2 by every query tile), AVX2 (`vpmaddubsw` on
//! `|c_q|` and `sign(c_x, c_q)`, which cannot saturate for codes in [-127, 127]) and
//! plain Rust; all give the same integers. Without VNNI or AVX2 the search is the
//! float32 scan itself.

use std::ops::Range;

use rayon::prelude::*;

use crate::cpu;
use crate::topk::{self, Best, Database, Exclude, Hit, Rows, TopK};

/// Rows per block: one 512-bit vector holds 4 dimensions of 16 rows.
pub const BLOCK_ROWS: usize = 16;
/// Dimensions summed per 32-bit lane by `vpdpbusd`.
const GROUP: usize = 4;
/// f32 terms per row after a block's codes: scale, norm bound, residual-norm bound.
const TERMS: usize = 3;
/// Version of the block format; readers refuse any other.
pub const FORMAT_VERSION: u32 = 1;
/// Codes are stored as `code + OFFSET` (u8), as `vpdpbusd` wants one unsigned side.
const OFFSET: i32 = 128;
/// Largest code magnitude: `|c_q| |c_x| * 2 <= 32258` keeps `vpmaddubsw` from saturating.
const MAX_CODE: f32 = 127.0;
/// Rows with a larger norm get an infinite bound (always re-ranked), and queries with a
/// larger norm go to the float32 scan: every product of the bound stays far from overflow.
const MAX_ROW_NORM: f64 = (1u64 << 60) as f64;
const MAX_QUERY_NORM: f64 = (1u64 << 40) as f64;
/// Largest dimension: f64 sums of squares keep a relative error below 2^-30, and
/// `vpdpbusd` sums (`255 * 127 * d`) stay within i32.
pub const MAX_DIM: usize = 1 << 16;
/// Unit roundoff of f32 (round to nearest).
const U: f64 = 1.0 / (1u64 << 24) as f64;

/// Dimension groups of a row: 64 bytes each per block.
pub fn groups(d: usize) -> usize {
    d.div_ceil(GROUP)
}

/// Bytes of one block of 16 rows of dimension `d`.
pub fn block_bytes(d: usize) -> usize {
    groups(d) * 64 + TERMS * BLOCK_ROWS * 4
}

/// Blocks holding `n` rows.
pub fn block_count(n: usize) -> usize {
    n.div_ceil(BLOCK_ROWS)
}

// ==== Quantising ====

/// A quantised vector's terms: its scale and upper bounds of its norm and residual norm.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Quantised {
    scale: f32,
    norm: f32,
    residual: f32,
}

/// Writes `codes[i] = round(x_i / s)` (in [-127, 127]) and returns the terms. A vector
/// with a value that is not finite, or too long, gets zero codes and infinite norms.
fn quantise(x: &[f32], codes: &mut [i8]) -> Quantised {
    codes.fill(0);
    let special = Quantised {
        scale: 0.0,
        norm: f32::INFINITY,
        residual: f32::INFINITY,
    };
    if !x.iter().all(|v| v.is_finite()) {
        return special;
    }
    let norm2: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    if norm2.sqrt() > MAX_ROW_NORM {
        return special;
    }
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = max / MAX_CODE;
    if scale > 0.0 {
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = (v / scale).round().clamp(-MAX_CODE, MAX_CODE) as i8;
        }
    }
    // Exact in f64: s * c has at most 32 significant bits, and x - s c spans few bits.
    let s = f64::from(scale);
    let residual2: f64 = x
        .iter()
        .zip(codes.iter())
        .map(|(&v, &c)| {
            let r = f64::from(v) - s * f64::from(c);
            r * r
        })
        .sum();
    Quantised {
        scale,
        norm: sqrt_up(norm2),
        residual: sqrt_up(residual2),
    }
}

/// An f32 at least `sqrt(sum2)`, where `sum2` is an f64 sum of at most [`MAX_DIM`]
/// squares (relative error below 2^-36, well inside the 2^-30 margin).
fn sqrt_up(sum2: f64) -> f32 {
    up_f32(sum2.sqrt() * (1.0 + 1.0 / (1u64 << 30) as f64))
}

/// The smallest f32 not below `v` (`v` finite and >= 0).
fn up_f32(v: f64) -> f32 {
    let f = v as f32;
    if f64::from(f) < v {
        f32::from_bits(f.to_bits() + 1)
    } else {
        f
    }
}

/// The rows of `db` in the block format (`block_count(n) * block_bytes(d)` bytes), on
/// `threads` workers (0 = all cores).
pub fn quantise_rows(db: &Database<'_>, threads: usize) -> Result<Vec<u8>, String> {
    if db.d > MAX_DIM {
        return Err(format!(
            "int8 copies support up to {MAX_DIM} dimensions, not {}",
            db.d
        ));
    }
    let bytes = block_bytes(db.d);
    let mut out = vec![0u8; block_count(db.n) * bytes];
    let pool = cpu::pool(threads)?;
    pool.install(|| {
        out.par_chunks_mut(bytes)
            .enumerate()
            .for_each(|(b, block)| quantise_block(db, b, block));
    });
    Ok(out)
}

fn quantise_block(db: &Database<'_>, b: usize, block: &mut [u8]) {
    let (d, g) = (db.d, groups(db.d));
    block[..g * 64].fill(OFFSET as u8);
    let mut row = vec![0f32; d];
    let mut codes = vec![0i8; d];
    let mut terms = [[0f32; BLOCK_ROWS]; TERMS];
    for r in 0..BLOCK_ROWS {
        let i = b * BLOCK_ROWS + r;
        if i >= db.n {
            break;
        }
        match db.rows {
            Rows::F32(v) => row.copy_from_slice(&v[i * d..(i + 1) * d]),
            Rows::F16Bits(v) => {
                for (dst, &h) in row.iter_mut().zip(&v[i * d..(i + 1) * d]) {
                    *dst = topk::f16_to_f32(h);
                }
            }
        }
        let t = quantise(&row, &mut codes);
        for (j, &c) in codes.iter().enumerate() {
            block[(j / GROUP) * 64 + r * GROUP + j % GROUP] = (i32::from(c) + OFFSET) as u8;
        }
        terms[0][r] = t.scale;
        terms[1][r] = t.norm;
        terms[2][r] = t.residual;
    }
    let tail = &mut block[g * 64..];
    for (chunk, v) in tail.chunks_exact_mut(4).zip(terms.iter().flatten()) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

// ==== Queries and the bound ====

/// The quantised batch: codes (`4 * groups` per query, zero-padded), and per query the
/// terms of the bound.
struct Queries {
    q: usize,
    g: usize,
    codes: Vec<i8>,
    /// `sum(c_q)`: what the u8 offset of the rows adds to a `vpdpbusd` sum, over 128.
    sums: Vec<i32>,
    scale: Vec<f32>,
    /// Multiplies the row's norm bound: `|r_q| + gamma_n |q|`, rounded up.
    alpha: Vec<f32>,
    /// Multiplies the row's residual bound: `|t c_q|`, rounded up.
    beta: Vec<f32>,
    /// Absolute margin for underflow in the scan and in the bound's arithmetic.
    tiny: f32,
}

/// `(1 + 16u)`: covers the rounding of the bound's own arithmetic (see [`bounds`]).
const INFLATE: f32 = 1.0 + 1.0 / (1u32 << 20) as f32;
/// `8u`: twice the error of `A = f32(D) * s * t` (three roundings, `<= 4u |A|`).
const A_ERROR: f32 = 1.0 / (1u32 << 21) as f32;

impl Queries {
    /// None when a query has a value that is not finite or is too long: the bound does
    /// not cover it, and the float32 scan serves the batch.
    fn new(queries: &[f32], d: usize) -> Option<Self> {
        let q = queries.len() / d;
        let g = groups(d);
        let mut codes = vec![0i8; q * g * GROUP];
        let (mut sums, mut scale, mut alpha, mut beta) = (vec![], vec![], vec![], vec![]);
        // The scan's longest accumulation: dp / lanes fused steps (or twice as many
        // unfused roundings on the portable path) and a log2(lanes) reduction; dp + 8
        // roundings bound them all.
        let dp = d.div_ceil(topk::PAD) * topk::PAD;
        let n = (dp + 8) as f64;
        let gamma = n * U / (1.0 - n * U);
        for (x, c) in queries
            .chunks_exact(d)
            .zip(codes.chunks_exact_mut(g * GROUP))
        {
            let t = quantise(x, &mut c[..d]);
            if !t.norm.is_finite() || f64::from(t.norm) > MAX_QUERY_NORM {
                return None;
            }
            let c2: f64 = c.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            sums.push(c.iter().map(|&v| i32::from(v)).sum());
            scale.push(t.scale);
            alpha.push(up_f32(
                (f64::from(t.residual) + gamma * f64::from(t.norm)) * (1.0 + 4.0 * U),
            ));
            beta.push(up_f32(f64::from(t.scale) * c2.sqrt() * (1.0 + 4.0 * U)));
        }
        Some(Self {
            q,
            g,
            codes,
            sums,
            scale,
            alpha,
            beta,
            tiny: up_f32((dp + 16) as f64 * 2f64.powi(-100)),
        })
    }
}

/// Lower and upper bounds of the float32 score of a row: `A = f32(D) * s * t`, `E` as
/// in the module comment, computed in f32 and inflated by `(1 + 16u)`, which covers
/// the six roundings of `E` and the final `A +- E`. A NaN bound (an infinite norm
/// times a zero query term) keeps the row (`!(ub < theta)`) and never raises `theta`.
#[inline(always)]
fn bounds(dot: i32, row: (f32, f32, f32), query: (f32, f32, f32), tiny: f32) -> (f32, f32) {
    let (s, norm, residual) = row;
    let (t, alpha, beta) = query;
    let a = dot as f32 * s * t;
    let e = ((alpha * norm + beta * residual) + (A_ERROR * a.abs() + tiny)) * INFLATE;
    (a - e, a + e)
}

// ==== Kernels ====

/// Queries per register tile, blocks per register tile, blocks per L2 panel.
const MR: usize = 8;
const NB: usize = 3;
const PANEL_BLOCKS: usize = 24;

/// `out[m * nb + b][lane] = c_q(m) . c_x(row lane of block b)` for `m < mr`, `b < nb`.
trait Kernel {
    #[allow(clippy::too_many_arguments)]
    /// # Safety
    /// `blocks` points at `nb` blocks `stride` bytes apart, each `g * 64` code bytes;
    /// `queries` at `mr` rows of `4 * g` codes; the CPU supports the kernel's features.
    unsafe fn tile(
        mr: usize,
        nb: usize,
        blocks: *const u8,
        stride: usize,
        queries: *const i8,
        g: usize,
        sums: &[i32],
        out: &mut [[i32; BLOCK_ROWS]; MR * NB],
    );

    /// Writes the [`bounds`] of a block's 16 rows and returns the lanes (bit `r` for row
    /// `r`) whose upper bound [`reaches`] `theta`. SIMD versions do the same f32
    /// operations in the same order (no fused multiply-add), so they give the same bits.
    ///
    /// # Safety
    /// `terms` holds a block's `TERMS * BLOCK_ROWS` f32 terms; the CPU supports the
    /// kernel's features.
    #[inline(always)]
    unsafe fn passing(
        dots: &[i32; BLOCK_ROWS],
        terms: &[u8],
        query: (f32, f32, f32),
        tiny: f32,
        theta: f32,
        lower: &mut [f32; BLOCK_ROWS],
        upper: &mut [f32; BLOCK_ROWS],
    ) -> u32 {
        let mut mask = 0;
        for (r, &dot) in dots.iter().enumerate() {
            let row = (term(terms, 0, r), term(terms, 1, r), term(terms, 2, r));
            (lower[r], upper[r]) = bounds(dot, row, query, tiny);
            if reaches(upper[r], theta) {
                mask |= 1 << r;
            }
        }
        mask
    }
}

/// Plain Rust, any CPU: the reference the SIMD kernels must equal.
struct Scalar;

impl Kernel for Scalar {
    unsafe fn tile(
        mr: usize,
        nb: usize,
        blocks: *const u8,
        stride: usize,
        queries: *const i8,
        g: usize,
        _sums: &[i32],
        out: &mut [[i32; BLOCK_ROWS]; MR * NB],
    ) {
        for m in 0..mr {
            let q = std::slice::from_raw_parts(queries.add(m * g * GROUP), g * GROUP);
            for b in 0..nb {
                let codes = std::slice::from_raw_parts(blocks.add(b * stride), g * 64);
                let mut acc = [0i32; BLOCK_ROWS];
                for (gi, group) in codes.chunks_exact(64).enumerate() {
                    for (r, a) in acc.iter_mut().enumerate() {
                        for j in 0..GROUP {
                            let c = i32::from(group[r * GROUP + j]) - OFFSET;
                            *a += c * i32::from(q[gi * GROUP + j]);
                        }
                    }
                }
                out[m * nb + b] = acc;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Kernel, A_ERROR, BLOCK_ROWS, GROUP, INFLATE, MR, NB, OFFSET, TERMS};
    use std::arch::x86_64::*;

    /// AVX-512 VNNI: rows are the unsigned side of `vpdpbusd`, each query group of four
    /// codes is broadcast to all 16 lanes; the offset is taken out once per tile.
    pub struct Vnni;

    #[inline(always)]
    unsafe fn vnni_tile<const M: usize, const B: usize>(
        blocks: *const u8,
        stride: usize,
        queries: *const i8,
        g: usize,
        sums: &[i32],
        out: &mut [[i32; BLOCK_ROWS]; MR * NB],
    ) {
        let mut acc = [[_mm512_setzero_si512(); B]; M];
        let qs = g * GROUP;
        for gi in 0..g {
            let mut r = [_mm512_setzero_si512(); B];
            for (b, rv) in r.iter_mut().enumerate() {
                *rv = _mm512_loadu_si512(blocks.add(b * stride + gi * 64).cast());
            }
            for (m, row) in acc.iter_mut().enumerate() {
                let word = queries
                    .add(m * qs + gi * GROUP)
                    .cast::<i32>()
                    .read_unaligned();
                let qv = _mm512_set1_epi32(word);
                for (a, rv) in row.iter_mut().zip(r.iter()) {
                    *a = _mm512_dpbusd_epi32(*a, *rv, qv);
                }
            }
        }
        for (m, row) in acc.iter().enumerate() {
            let offset = _mm512_set1_epi32(OFFSET * sums[m]);
            for (b, a) in row.iter().enumerate() {
                let v = _mm512_sub_epi32(*a, offset);
                _mm512_storeu_si512(out[m * B + b].as_mut_ptr().cast(), v);
            }
        }
    }

    impl Kernel for Vnni {
        #[inline(always)]
        unsafe fn tile(
            mr: usize,
            nb: usize,
            blocks: *const u8,
            stride: usize,
            queries: *const i8,
            g: usize,
            sums: &[i32],
            out: &mut [[i32; BLOCK_ROWS]; MR * NB],
        ) {
            macro_rules! arms {
                ($($m:literal),*) => {
                    match (mr, nb) {
                        $(
                            ($m, 3) => vnni_tile::<$m, 3>(blocks, stride, queries, g, sums, out),
                            ($m, 2) => vnni_tile::<$m, 2>(blocks, stride, queries, g, sums, out),
                            ($m, _) => vnni_tile::<$m, 1>(blocks, stride, queries, g, sums, out),
                        )*
                        _ => unreachable!("tiles have 1 to {MR} queries"),
                    }
                };
            }
            arms!(1, 2, 3, 4, 5, 6, 7, 8)
        }

        #[inline(always)]
        unsafe fn passing(
            dots: &[i32; BLOCK_ROWS],
            terms: &[u8],
            query: (f32, f32, f32),
            tiny: f32,
            theta: f32,
            lower: &mut [f32; BLOCK_ROWS],
            upper: &mut [f32; BLOCK_ROWS],
        ) -> u32 {
            assert!(terms.len() >= TERMS * BLOCK_ROWS * 4);
            // Little-endian f32s, as `term` reads them.
            let p = terms.as_ptr().cast::<f32>();
            let (s, norm, residual) = (
                _mm512_loadu_ps(p),
                _mm512_loadu_ps(p.add(BLOCK_ROWS)),
                _mm512_loadu_ps(p.add(2 * BLOCK_ROWS)),
            );
            let (t, alpha, beta) = query;
            let dot = _mm512_loadu_si512(dots.as_ptr().cast());
            let a = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), s), _mm512_set1_ps(t));
            let e = _mm512_mul_ps(
                _mm512_add_ps(
                    _mm512_add_ps(
                        _mm512_mul_ps(_mm512_set1_ps(alpha), norm),
                        _mm512_mul_ps(_mm512_set1_ps(beta), residual),
                    ),
                    _mm512_add_ps(
                        _mm512_mul_ps(_mm512_set1_ps(A_ERROR), _mm512_abs_ps(a)),
                        _mm512_set1_ps(tiny),
                    ),
                ),
                _mm512_set1_ps(INFLATE),
            );
            let up = _mm512_add_ps(a, e);
            _mm512_storeu_ps(lower.as_mut_ptr(), _mm512_sub_ps(a, e));
            _mm512_storeu_ps(upper.as_mut_ptr(), up);
            // `!(upper < theta)`: true for NaN, as `reaches`.
            u32::from(_mm512_cmp_ps_mask::<_CMP_NLT_UQ>(up, _mm512_set1_ps(theta)))
        }
    }

    /// AVX2: `vpmaddubsw(|c_q|, sign(c_x, c_q))` (products of codes in [-127, 127], so
    /// pairs never saturate), `vpmaddwd` with ones to i32; 8 rows per ymm half-block.
    pub struct Avx2;

    #[inline(always)]
    unsafe fn avx2_tile<const M: usize, const B: usize>(
        blocks: *const u8,
        stride: usize,
        queries: *const i8,
        g: usize,
        out: &mut [[i32; BLOCK_ROWS]; MR * NB],
    ) {
        let mut acc = [[[_mm256_setzero_si256(); 2]; B]; M];
        let flip = _mm256_set1_epi8(OFFSET as u8 as i8);
        let ones = _mm256_set1_epi16(1);
        let qs = g * GROUP;
        for gi in 0..g {
            let mut r = [[_mm256_setzero_si256(); 2]; B];
            for (b, rv) in r.iter_mut().enumerate() {
                let p = blocks.add(b * stride + gi * 64);
                // u8 code + 128, xor 128: the signed code.
                rv[0] = _mm256_xor_si256(_mm256_loadu_si256(p.cast()), flip);
                rv[1] = _mm256_xor_si256(_mm256_loadu_si256(p.add(32).cast()), flip);
            }
            for (m, row) in acc.iter_mut().enumerate() {
                let word = queries
                    .add(m * qs + gi * GROUP)
                    .cast::<i32>()
                    .read_unaligned();
                let qv = _mm256_set1_epi32(word);
                let qa = _mm256_abs_epi8(qv);
                for (a, rv) in row.iter_mut().zip(r.iter()) {
                    for h in 0..2 {
                        let p = _mm256_maddubs_epi16(qa, _mm256_sign_epi8(rv[h], qv));
                        a[h] = _mm256_add_epi32(a[h], _mm256_madd_epi16(p, ones));
                    }
                }
            }
        }
        for (m, row) in acc.iter().enumerate() {
            for (b, a) in row.iter().enumerate() {
                let dst = out[m * B + b].as_mut_ptr();
                _mm256_storeu_si256(dst.cast(), a[0]);
                _mm256_storeu_si256(dst.add(8).cast(), a[1]);
            }
        }
    }

    impl Kernel for Avx2 {
        #[inline(always)]
        unsafe fn tile(
            mr: usize,
            nb: usize,
            blocks: *const u8,
            stride: usize,
            queries: *const i8,
            g: usize,
            _sums: &[i32],
            out: &mut [[i32; BLOCK_ROWS]; MR * NB],
        ) {
            // 16 ymm registers: 2 queries x 2 blocks x 2 halves of accumulators.
            let mut m0 = 0;
            while m0 < mr {
                let m = 2.min(mr - m0);
                let mut b0 = 0;
                while b0 < nb {
                    let b = 2.min(nb - b0);
                    let mut part = [[0i32; BLOCK_ROWS]; MR * NB];
                    let (blk, qs) = (blocks.add(b0 * stride), queries.add(m0 * g * GROUP));
                    match (m, b) {
                        (2, 2) => avx2_tile::<2, 2>(blk, stride, qs, g, &mut part),
                        (2, _) => avx2_tile::<2, 1>(blk, stride, qs, g, &mut part),
                        (_, 2) => avx2_tile::<1, 2>(blk, stride, qs, g, &mut part),
                        _ => avx2_tile::<1, 1>(blk, stride, qs, g, &mut part),
                    }
                    for i in 0..m {
                        for j in 0..b {
                            out[(m0 + i) * nb + b0 + j] = part[i * b + j];
                        }
                    }
                    b0 += b;
                }
                m0 += m;
            }
        }
    }
}

// ==== Search ====

/// Which first pass to run: `Auto` picks the widest this CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Auto,
    Vnni,
    Avx2,
    Scalar,
    /// No first pass: the float32 scan of every row.
    Float32,
}

impl Path {
    pub fn parse(name: &str) -> Result<Self, String> {
        Ok(match name {
            "auto" => Path::Auto,
            "vnni" => Path::Vnni,
            "avx2" => Path::Avx2,
            "scalar" => Path::Scalar,
            "float32" => Path::Float32,
            _ => {
                return Err(format!(
                    "first pass must be auto, vnni, avx2, scalar or float32, not {name:?}"
                ))
            }
        })
    }

    /// The path that runs here, or an error for one this CPU cannot run.
    fn resolve(self) -> Result<Self, String> {
        let (vnni, avx2) = simd_support();
        match self {
            Path::Auto if vnni => Ok(Path::Vnni),
            Path::Auto if avx2 => Ok(Path::Avx2),
            Path::Auto => Ok(Path::Float32),
            Path::Vnni if !vnni => Err("this CPU has no AVX-512 VNNI".into()),
            Path::Avx2 if !avx2 => Err("this CPU has no AVX2".into()),
            other => Ok(other),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Path::Auto => "auto",
            Path::Vnni => "vnni",
            Path::Avx2 => "avx2",
            Path::Scalar => "scalar",
            Path::Float32 => "float32",
        }
    }
}

/// (AVX-512 VNNI, AVX2) on this CPU.
fn simd_support() -> (bool, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx2 = has!("avx2");
        (
            avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
            avx2,
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (false, false)
    }
}

/// The first pass this CPU runs by default.
pub fn default_path() -> &'static str {
    Path::Auto.resolve().map_or("float32", Path::name)
}

/// A part of the database: its rows (re-ranked from) and their block-format copy.
#[derive(Clone, Copy)]
pub struct Part<'a> {
    pub rows: Database<'a>,
    pub codes: &'a [u8],
}

impl<'a> Part<'a> {
    /// Checks that `codes` has the size the format gives `rows` (it is read from disk).
    pub fn new(rows: Database<'a>, codes: &'a [u8]) -> Result<Self, String> {
        let want = block_count(rows.n) * block_bytes(rows.d);
        if codes.len() != want {
            return Err(format!(
                "the int8 copy has {} bytes, {want} expected for {} rows of dimension {}: \
                 it is stale or damaged (rebuild it with `starkret build-index SOURCE`)",
                codes.len(),
                rows.n,
                rows.d
            ));
        }
        Ok(Self { rows, codes })
    }
}

/// The exact top-k and, per query, how many rows the float32 re-rank scored.
pub struct Search {
    pub top: TopK,
    pub reranked: Vec<u64>,
    pub path: Path,
}

/// A row kept by the first pass: its upper bound and global id.
#[derive(Clone, Copy)]
struct Kept {
    upper: f32,
    id: i64,
}

/// One worker's running state per query: the k best lower bounds, the kept rows.
struct State {
    lower: Vec<Best>,
    kept: Vec<Vec<Kept>>,
    /// Kept rows are filtered again by the current theta when a list reaches this.
    limit: Vec<usize>,
}

impl State {
    fn new(q: usize, k: usize) -> Self {
        Self {
            lower: (0..q).map(|_| Best::new(k, k)).collect(),
            kept: vec![Vec::new(); q],
            limit: vec![4 * k + 256; q],
        }
    }

    fn merge(mut self, other: State) -> State {
        if self.lower.is_empty() {
            return other;
        }
        if other.lower.is_empty() {
            return self;
        }
        for (qi, (lower, kept)) in other.lower.into_iter().zip(other.kept).enumerate() {
            for hit in lower.heap {
                self.lower[qi].push(hit);
            }
            self.kept[qi].extend(kept);
        }
        self
    }
}

/// The exact top-`k` of the parts searched as one database (ids run on across parts),
/// equal to `topk::search_parts` on the same rows, through the int8 first pass.
pub fn search_parts(
    queries: &[f32],
    parts: &[Part<'_>],
    k: usize,
    exclude: &Exclude,
    threads: usize,
    path: Path,
) -> Result<Search, String> {
    let rows: Vec<Database<'_>> = parts.iter().map(|p| p.rows).collect();
    let q = topk::query_count(queries, &rows)?;
    let path = path.resolve()?;
    let total: usize = rows.iter().map(|p| p.n).sum();
    let prepared = if path == Path::Float32 || k == 0 || rows[0].d > MAX_DIM {
        None
    } else {
        Queries::new(queries, rows[0].d)
    };
    let Some(prepared) = prepared else {
        let top = topk::search_parts(queries, &rows, k, exclude, threads)?;
        return Ok(Search {
            top,
            reranked: vec![total as u64; q],
            path: Path::Float32,
        });
    };
    exclude.check(q)?;
    if q.checked_mul(k)
        .is_none_or(|len| len > isize::MAX as usize / 8)
    {
        return Err(format!("{q} queries x k={k} results do not fit in memory"));
    }
    let pool = cpu::pool(threads)?;
    let mut state = pool.install(|| {
        first_pass(
            &prepared,
            parts,
            k,
            exclude,
            path,
            pool.current_num_threads(),
        )
    });
    if state.lower.is_empty() {
        state = State::new(q, k); // no rows at all
    }
    let d = rows[0].d;
    let mut scores = vec![0f32; q * k];
    let mut ids = vec![0i64; q * k];
    let mut reranked = vec![0u64; q];
    let bases: Vec<usize> = rows
        .iter()
        .scan(0, |at, p| {
            let base = *at;
            *at += p.n;
            Some(base)
        })
        .collect();
    pool.install(|| {
        scores
            .par_chunks_mut(k)
            .zip(ids.par_chunks_mut(k))
            .zip(reranked.par_iter_mut())
            .zip(state.lower.into_par_iter().zip(state.kept))
            .enumerate()
            .for_each(|(qi, (((s, i), count), (lower, kept)))| {
                let query = &queries[qi * d..(qi + 1) * d];
                *count = rerank(query, &rows, &bases, k, lower.floor, kept, s, i);
            });
    });
    Ok(Search {
        top: TopK { scores, ids, q, k },
        reranked,
        path,
    })
}

/// Scores the kept rows whose upper bound reaches `theta` with the scan's float32
/// kernel and writes the best `k`; returns how many rows it scored.
#[allow(clippy::too_many_arguments)]
fn rerank(
    query: &[f32],
    rows: &[Database<'_>],
    bases: &[usize],
    k: usize,
    theta: f32,
    mut kept: Vec<Kept>,
    scores: &mut [f32],
    ids: &mut [i64],
) -> u64 {
    kept.retain(|c| reaches(c.upper, theta));
    kept.sort_unstable_by_key(|c| c.id);
    let d = query.len();
    let mut padded = vec![0f32; d.div_ceil(topk::PAD) * topk::PAD];
    padded[..d].copy_from_slice(query);
    let mut best = Best::new(k, kept.len());
    let mut local = Vec::new();
    let mut out = Vec::new();
    let mut at = 0;
    for (p, (part, &base)) in rows.iter().zip(bases).enumerate() {
        let end = bases.get(p + 1).copied().unwrap_or(usize::MAX);
        local.clear();
        while at < kept.len() && (kept[at].id as usize) < end {
            local.push(kept[at].id as usize - base);
            at += 1;
        }
        if local.is_empty() {
            continue;
        }
        out.resize(local.len(), 0.0);
        topk::rescore(&padded, part, &local, &mut out);
        for (&r, &score) in local.iter().zip(&out) {
            best.push(Hit {
                score,
                id: (base + r) as i64,
            });
        }
    }
    topk::write_row(best.heap, k, scores, ids);
    kept.len() as u64
}

/// Shares of (part, blocks) scanned by the workers in turn; their states merged.
fn first_pass(
    queries: &Queries,
    parts: &[Part<'_>],
    k: usize,
    exclude: &Exclude,
    path: Path,
    workers: usize,
) -> State {
    let total: usize = parts.iter().map(|p| block_count(p.rows.n)).sum();
    let chunk = total.div_ceil(workers * 4).max(PANEL_BLOCKS);
    let mut shares: Vec<(usize, usize, Range<usize>)> = Vec::new();
    let mut base = 0;
    for (p, part) in parts.iter().enumerate() {
        let blocks = block_count(part.rows.n);
        shares.extend(
            (0..blocks)
                .step_by(chunk)
                .map(|s| (p, base, s..(s + chunk).min(blocks))),
        );
        base += part.rows.n;
    }
    let fresh = || State::new(queries.q, k);
    shares
        .into_par_iter()
        .fold(fresh, |mut state, (p, base, blocks)| {
            let share = Share {
                part: &parts[p],
                base,
                blocks,
            };
            scan(queries, &share, exclude, path, &mut state);
            state
        })
        .reduce(|| State::new(0, k), State::merge)
}

struct Share<'a> {
    part: &'a Part<'a>,
    /// Global id of the part's first row.
    base: usize,
    blocks: Range<usize>,
}

fn scan(queries: &Queries, share: &Share<'_>, exclude: &Exclude, path: Path, state: &mut State) {
    #[cfg(target_arch = "x86_64")]
    {
        if path == Path::Vnni {
            // SAFETY: `resolve` checked that the CPU has these features.
            return unsafe { scan_vnni(queries, share, exclude, state) };
        }
        if path == Path::Avx2 {
            // SAFETY: as above.
            return unsafe { scan_avx2(queries, share, exclude, state) };
        }
    }
    scan_with::<Scalar>(queries, share, exclude, state)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
unsafe fn scan_vnni(queries: &Queries, share: &Share<'_>, exclude: &Exclude, state: &mut State) {
    scan_with::<x86::Vnni>(queries, share, exclude, state)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scan_avx2(queries: &Queries, share: &Share<'_>, exclude: &Exclude, state: &mut State) {
    scan_with::<x86::Avx2>(queries, share, exclude, state)
}

/// Panels of blocks (kept in L2) x tiles of queries x tiles of blocks: each panel is
/// read from memory once for the whole batch.
#[inline(always)]
fn scan_with<K: Kernel>(
    queries: &Queries,
    share: &Share<'_>,
    exclude: &Exclude,
    state: &mut State,
) {
    let part = share.part;
    let (g, stride) = (queries.g, block_bytes(part.rows.d));
    let mut out = [[0i32; BLOCK_ROWS]; MR * NB];
    let (mut lower, mut upper) = ([0f32; BLOCK_ROWS], [0f32; BLOCK_ROWS]);
    let mut panel = share.blocks.start;
    while panel < share.blocks.end {
        let panel_end = (panel + PANEL_BLOCKS).min(share.blocks.end);
        let mut m0 = 0;
        while m0 < queries.q {
            let mr = MR.min(queries.q - m0);
            let mut b0 = panel;
            while b0 < panel_end {
                let nb = NB.min(panel_end - b0);
                let bytes = &part.codes[b0 * stride..(b0 + nb) * stride];
                let qcodes = &queries.codes[m0 * g * GROUP..(m0 + mr) * g * GROUP];
                // SAFETY: `bytes` holds nb whole blocks (`Part::new` checked the size),
                // `qcodes` mr queries of 4g codes; the caller checked the CPU.
                unsafe {
                    K::tile(
                        mr,
                        nb,
                        bytes.as_ptr(),
                        stride,
                        qcodes.as_ptr(),
                        g,
                        &queries.sums[m0..m0 + mr],
                        &mut out,
                    );
                }
                for m in 0..mr {
                    let qi = m0 + m;
                    let query = (queries.scale[qi], queries.alpha[qi], queries.beta[qi]);
                    for b in 0..nb {
                        let terms = &bytes[b * stride + g * 64..(b + 1) * stride];
                        let dots = &out[m * nb + b];
                        let theta = state.lower[qi].floor;
                        // SAFETY: `terms` is a whole block's terms; the caller checked the CPU.
                        let mask = unsafe {
                            K::passing(
                                dots,
                                terms,
                                query,
                                queries.tiny,
                                theta,
                                &mut lower,
                                &mut upper,
                            )
                        };
                        if mask == 0 {
                            continue; // the common case: no row of the block can matter
                        }
                        let first = share.base + (b0 + b) * BLOCK_ROWS;
                        let valid = (part.rows.n - (b0 + b) * BLOCK_ROWS).min(BLOCK_ROWS);
                        // Padding rows past `valid` are never kept.
                        let mask = mask & ((1u32 << valid) - 1);
                        keep(qi, first, mask, &lower, &upper, exclude, state);
                    }
                }
                b0 += nb;
            }
            m0 += mr;
        }
        panel = panel_end;
    }
}

/// Whether a row with upper bound `upper` may be in the top-k when the k-th best lower
/// bound is `theta`; a NaN bound may (it bounds nothing).
#[inline(always)]
fn reaches(upper: f32, theta: f32) -> bool {
    upper >= theta || upper.is_nan()
}

#[inline(always)]
fn term(terms: &[u8], which: usize, r: usize) -> f32 {
    let at = (which * BLOCK_ROWS + r) * 4;
    f32::from_le_bytes([terms[at], terms[at + 1], terms[at + 2], terms[at + 3]])
}

/// Calls of [`keep`] and lanes offered to it (measurement only).
#[cfg(test)]
static KEEP_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
#[cfg(test)]
static KEEP_LANES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Admits the lower bounds of a tile's rows in `mask` (bit `r` for row `r`) to query
/// `qi`'s `k` best and keeps the rows whose upper bound reaches theta (exclusions
/// applied). Out of line: the scan enters it for a small share of its tiles.
#[inline(never)]
fn keep(
    qi: usize,
    first: usize,
    mut mask: u32,
    lower: &[f32; BLOCK_ROWS],
    upper: &[f32; BLOCK_ROWS],
    exclude: &Exclude,
    state: &mut State,
) {
    #[cfg(test)]
    {
        use std::sync::atomic::Ordering::Relaxed;
        KEEP_CALLS.fetch_add(1, Relaxed);
        KEEP_LANES.fetch_add(u64::from(mask.count_ones()), Relaxed);
    }
    while mask != 0 {
        let r = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        if upper[r] < state.lower[qi].floor {
            continue;
        }
        let id = (first + r) as i64;
        if exclude.contains(qi, id) {
            continue;
        }
        // A NaN lower bound is not admitted (it ranks as -inf).
        if !lower[r].is_nan() && state.lower[qi].admits(lower[r]) {
            state.lower[qi].push(Hit {
                score: lower[r],
                id,
            });
        }
        if reaches(upper[r], state.lower[qi].floor) {
            let kept = &mut state.kept[qi];
            kept.push(Kept {
                upper: upper[r],
                id,
            });
            if kept.len() >= state.limit[qi] {
                let theta = state.lower[qi].floor;
                kept.retain(|c| reaches(c.upper, theta));
                state.limit[qi] = (2 * kept.len()).max(state.limit[qi]);
            }
        }
    }
}

/// Measurement only: a bfloat16 first pass against this one (docs/index.md).
#[cfg(all(test, target_arch = "x86_64"))]
#[path = "q8_bf16.rs"]
mod bf16;

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64) / (1u64 << 53) as f64
        }
    }

    pub(super) fn gaussian(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut u = rng(seed);
        (0..n * d)
            .map(|_| {
                let (a, b) = (u().max(1e-300), u());
                ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
            })
            .collect()
    }

    pub(super) fn unit(mut v: Vec<f32>, d: usize) -> Vec<f32> {
        for row in v.chunks_exact_mut(d) {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            if n > 0.0 {
                row.iter_mut().for_each(|x| *x /= n);
            }
        }
        v
    }

    fn paths() -> Vec<Path> {
        let (vnni, avx2) = simd_support();
        let mut p = vec![Path::Scalar];
        if avx2 {
            p.push(Path::Avx2);
        }
        if vnni {
            p.push(Path::Vnni);
        }
        p
    }

    /// The float32 score the scan computes, through the scan itself.
    fn scan_score(query: &[f32], row: &[f32]) -> f32 {
        let d = query.len();
        let db = Database::new(Rows::F32(row), d).unwrap();
        let mut padded = vec![0f32; d.div_ceil(topk::PAD) * topk::PAD];
        padded[..d].copy_from_slice(query);
        let mut out = [0f32];
        topk::rescore(&padded, &db, &[0], &mut out);
        out[0]
    }

    fn check_bound(query: &[f32], row: &[f32]) {
        let d = query.len();
        let qs = Queries::new(query, d).unwrap();
        let mut codes = vec![0i8; d];
        let t = quantise(row, &mut codes);
        let dot: i32 = codes
            .iter()
            .zip(&qs.codes)
            .map(|(&a, &b)| i32::from(a) * i32::from(b))
            .sum();
        let (lo, up) = bounds(
            dot,
            (t.scale, t.norm, t.residual),
            (qs.scale[0], qs.alpha[0], qs.beta[0]),
            qs.tiny,
        );
        let score = scan_score(query, row);
        assert!(
            lo <= score && score <= up,
            "score {score} outside [{lo}, {up}] (d={d})"
        );
    }

    #[test]
    fn the_bound_holds_on_adversarial_vectors() {
        for &d in &[1usize, 3, 16, 17, 100, 768] {
            let q = unit(gaussian(1, d, d as u64), d);
            let mut cases: Vec<Vec<f32>> = vec![
                q.clone(),                                             // the query itself
                q.iter().map(|v| -v).collect(),                        // its opposite
                vec![0.0; d],                                          // a zero row
                gaussian(1, d, 7).iter().map(|v| v * 1e4).collect(),   // long
                gaussian(1, d, 8).iter().map(|v| v * 1e-30).collect(), // tiny (subnormal products)
            ];
            // One large value and the rest just below half a quantisation step: the
            // residual is as large as it can be, and all aligned with the query.
            let mut spike = vec![0f32; d];
            spike[0] = 1.0;
            for (j, s) in spike.iter_mut().enumerate().skip(1) {
                *s = (0.5 - 1e-6) / 127.0 * q[j].signum();
            }
            cases.push(spike);
            // Values all at the rounding midpoint of their codes.
            cases.push((0..d).map(|j| (j as f32 % 127.0 + 0.5) / 127.0).collect());
            // Cancellation: large terms that sum to almost nothing.
            cases.push(
                (0..d)
                    .map(|j| if j % 2 == 0 { 1e3 } else { -1e3 })
                    .collect(),
            );
            for row in &cases {
                check_bound(&q, row);
                check_bound(row, &q);
                check_bound(row, row);
            }
            for seed in 0..200 {
                let row = gaussian(1, d, 100 + seed);
                let qq = gaussian(1, d, 900 + seed);
                check_bound(&qq, &row);
            }
        }
    }

    #[test]
    fn kernels_give_the_same_integers() {
        for &d in &[1usize, 5, 64, 130] {
            let n = 3 * BLOCK_ROWS + 5;
            let rows = gaussian(n, d, 3);
            let db = Database::new(Rows::F32(&rows), d).unwrap();
            let codes = quantise_rows(&db, 1).unwrap();
            let qv = gaussian(MR + 3, d, 4);
            let qs = Queries::new(&qv, d).unwrap();
            let stride = block_bytes(d);
            let g = groups(d);
            let mut want = [[0i32; BLOCK_ROWS]; MR * NB];
            // SAFETY: the buffers hold what `tile` reads.
            unsafe {
                Scalar::tile(
                    MR,
                    NB,
                    codes.as_ptr(),
                    stride,
                    qs.codes.as_ptr(),
                    g,
                    &qs.sums,
                    &mut want,
                );
            }
            // The reference of the reference: codes times codes, row by row.
            for (r, x) in rows.chunks_exact(d).take(NB * BLOCK_ROWS).enumerate() {
                let mut c = vec![0i8; d];
                quantise(x, &mut c);
                for m in 0..MR {
                    let qc = &qs.codes[m * g * GROUP..m * g * GROUP + d];
                    let dot: i32 = c
                        .iter()
                        .zip(qc)
                        .map(|(&a, &b)| i32::from(a) * i32::from(b))
                        .sum();
                    assert_eq!(want[m * NB + r / BLOCK_ROWS][r % BLOCK_ROWS], dot);
                }
            }
            #[cfg(target_arch = "x86_64")]
            for (mr, nb) in [(MR, NB), (1, 1), (3, 2), (5, 3)] {
                let mut sub = [[0i32; BLOCK_ROWS]; MR * NB];
                unsafe {
                    Scalar::tile(
                        mr,
                        nb,
                        codes.as_ptr(),
                        stride,
                        qs.codes.as_ptr(),
                        g,
                        &qs.sums,
                        &mut sub,
                    );
                }
                let (vnni, avx2) = simd_support();
                if avx2 {
                    let mut got = [[0i32; BLOCK_ROWS]; MR * NB];
                    unsafe {
                        avx2_tile(
                            mr,
                            nb,
                            codes.as_ptr(),
                            stride,
                            qs.codes.as_ptr(),
                            g,
                            &qs.sums,
                            &mut got,
                        )
                    };
                    assert_eq!(got[..mr * nb], sub[..mr * nb], "avx2 d={d} {mr}x{nb}");
                }
                if vnni {
                    let mut got = [[0i32; BLOCK_ROWS]; MR * NB];
                    unsafe {
                        vnni_tile(
                            mr,
                            nb,
                            codes.as_ptr(),
                            stride,
                            qs.codes.as_ptr(),
                            g,
                            &qs.sums,
                            &mut got,
                        )
                    };
                    assert_eq!(got[..mr * nb], sub[..mr * nb], "vnni d={d} {mr}x{nb}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx2_tile(
        mr: usize,
        nb: usize,
        b: *const u8,
        s: usize,
        q: *const i8,
        g: usize,
        sums: &[i32],
        out: &mut [[i32; BLOCK_ROWS]; MR * NB],
    ) {
        x86::Avx2::tile(mr, nb, b, s, q, g, sums, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn vnni_tile(
        mr: usize,
        nb: usize,
        b: *const u8,
        s: usize,
        q: *const i8,
        g: usize,
        sums: &[i32],
        out: &mut [[i32; BLOCK_ROWS]; MR * NB],
    ) {
        x86::Vnni::tile(mr, nb, b, s, q, g, sums, out)
    }

    fn same(a: &TopK, b: &TopK) -> bool {
        let bits = |t: &TopK| t.scores.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
        a.ids == b.ids && bits(a) == bits(b)
    }

    fn compare(queries: &[f32], rows: &[Database<'_>], k: usize, exclude: &Exclude, what: &str) {
        let codes: Vec<Vec<u8>> = rows
            .iter()
            .map(|db| quantise_rows(db, 2).unwrap())
            .collect();
        let parts: Vec<Part<'_>> = rows
            .iter()
            .zip(&codes)
            .map(|(db, c)| Part::new(*db, c).unwrap())
            .collect();
        let want = topk::search_parts(queries, rows, k, exclude, 2).unwrap();
        for path in paths() {
            for threads in [1, 3] {
                let got = search_parts(queries, &parts, k, exclude, threads, path).unwrap();
                assert!(
                    same(&got.top, &want),
                    "{what}: {path:?} threads={threads}\n{:?}\n{:?}",
                    got.top.ids,
                    want.ids
                );
            }
        }
    }

    #[test]
    fn results_equal_the_float32_scan_on_hard_inputs() {
        let d = 40;
        let base = unit(gaussian(300, d, 1), d);
        // exact duplicates, a tight cluster, zero rows, long and short rows
        let mut rows = base.clone();
        rows.extend_from_slice(&base[..50 * d]);
        let centre = &base[7 * d..8 * d];
        for i in 0..200 {
            let jitter = gaussian(1, d, 50 + i);
            rows.extend(centre.iter().zip(&jitter).map(|(c, j)| c + j * 1e-4));
        }
        rows.extend(std::iter::repeat_n(0.0, 5 * d));
        rows.extend(base[..20 * d].iter().map(|v| v * 3.0));
        rows.extend(base[20 * d..40 * d].iter().map(|v| v * 0.01));
        let n = rows.len() / d;
        let mut queries = unit(gaussian(13, d, 2), d);
        queries.extend_from_slice(centre);
        queries.extend_from_slice(&base[..d]);
        queries.extend(std::iter::repeat_n(0.0, d));
        let db = Database::new(Rows::F32(&rows), d).unwrap();
        for k in [1, 5, 10, 64] {
            compare(&queries, &[db], k, &Exclude::NOTHING, "hard");
        }
        compare(&queries, &[db], n + 7, &Exclude::NOTHING, "k beyond n");
        let skip: Vec<i64> = (0..n as i64).step_by(3).collect();
        compare(
            &queries,
            &[db],
            10,
            &Exclude::global(skip),
            "global exclusion",
        );
        let q = queries.len() / d;
        let lists: Vec<Vec<i64>> = (0..q)
            .map(|i| (0..n as i64).filter(|r| r % (i as i64 + 2) == 0).collect())
            .collect();
        compare(
            &queries,
            &[db],
            10,
            &Exclude::per_query(lists.clone()),
            "per-query exclusion",
        );
        let global: Vec<i64> = (0..n as i64).filter(|r| r % 5 == 1).collect();
        compare(
            &queries,
            &[db],
            10,
            &Exclude::global_borrowed(&global).with_per_query(lists),
            "global and per-query exclusion",
        );
        // many parts, float16 and float32, one empty
        let bits: Vec<u16> = rows.iter().map(|&v| f32_to_f16(v)).collect();
        let cuts = [0, 17, 17, 100, 333, 500, n];
        let parts: Vec<Database<'_>> = cuts
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let r = if i % 2 == 0 {
                    Rows::F16Bits(&bits[w[0] * d..w[1] * d])
                } else {
                    Rows::F32(&rows[w[0] * d..w[1] * d])
                };
                Database::new(r, d).unwrap()
            })
            .collect();
        compare(&queries, &parts, 10, &Exclude::NOTHING, "parts");
        // a batch large enough for full tiles and the blocked scan
        let many = unit(gaussian(70, d, 9), d);
        compare(&many, &[db], 10, &Exclude::NOTHING, "batch 70");
    }

    #[test]
    fn rows_that_are_not_finite_are_always_reranked() {
        let d = 8;
        let mut rows = unit(gaussian(100, d, 4), d);
        rows[3 * d] = f32::NAN;
        rows[5 * d + 1] = f32::INFINITY;
        rows[9 * d + 2] = f32::NEG_INFINITY;
        let db = Database::new(Rows::F32(&rows), d).unwrap();
        let queries = unit(gaussian(4, d, 5), d);
        compare(&queries, &[db], 5, &Exclude::NOTHING, "non-finite rows");
        let mut bad = queries.clone();
        bad[0] = f32::NAN;
        let codes = quantise_rows(&db, 1).unwrap();
        let part = Part::new(db, &codes).unwrap();
        let got = search_parts(&bad, &[part], 5, &Exclude::NOTHING, 1, Path::Auto).unwrap();
        assert_eq!(got.path, Path::Float32);
        let want = topk::search_parts(&bad, &[db], 5, &Exclude::NOTHING, 1).unwrap();
        assert!(same(&got.top, &want));
    }

    #[test]
    fn a_copy_of_the_wrong_size_is_refused() {
        let rows = vec![0f32; 20 * 4];
        let db = Database::new(Rows::F32(&rows), 4).unwrap();
        let codes = quantise_rows(&db, 1).unwrap();
        assert!(Part::new(db, &codes).is_ok());
        assert!(Part::new(db, &codes[1..]).is_err());
        assert!(Part::new(db, &[]).is_err());
        assert!(Path::parse("bf16").is_err());
    }

    /// Where the time of a large batch goes, one thread (`cargo test --release --lib
    /// q8::tests::measure_phases -- --ignored --nocapture`; `STARKRET_Q8_ROWS`, default
    /// 131,072 x 768 float16, batch `STARKRET_Q8_BATCH`, default 256): the whole search,
    /// its first pass, and the integer kernel alone over the same tiles in the same order.
    #[cfg(target_arch = "x86_64")]
    #[test]
    #[ignore]
    fn measure_phases() {
        use std::sync::atomic::Ordering::Relaxed;
        use std::time::Instant;
        if !simd_support().0 {
            return;
        }
        let env = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let (d, n, batch, k) = (
            768,
            env("STARKRET_Q8_ROWS", 1 << 17),
            env("STARKRET_Q8_BATCH", 256),
            10,
        );
        let rows32 = unit(gaussian(n, d, 11), d);
        let bits: Vec<u16> = rows32.iter().map(|&v| f32_to_f16(v)).collect();
        drop(rows32);
        let db = Database::new(Rows::F16Bits(&bits), d).unwrap();
        let codes = quantise_rows(&db, 0).unwrap();
        let part = Part::new(db, &codes).unwrap();
        let queries = unit(gaussian(batch, d, 100 + batch as u64), d);
        let qs = Queries::new(&queries, d).unwrap();
        let pool = cpu::pool(1).unwrap();
        let (mut total, mut first, mut kernel) = (vec![], vec![], vec![]);
        let mut sink = 0i64;
        let mut reranked = vec![];
        for _ in 0..5 {
            let t = Instant::now();
            let got = search_parts(&queries, &[part], k, &Exclude::NOTHING, 1, Path::Vnni).unwrap();
            total.push(t.elapsed().as_secs_f64());
            reranked = got.reranked;
            let t = Instant::now();
            let state =
                pool.install(|| first_pass(&qs, &[part], k, &Exclude::NOTHING, Path::Vnni, 1));
            first.push(t.elapsed().as_secs_f64());
            sink += state.kept.iter().map(|v| v.len() as i64).sum::<i64>();
            // The kernel alone: the same panels, query tiles and block tiles.
            let t = Instant::now();
            let (g, stride, blocks) = (qs.g, block_bytes(d), block_count(n));
            let mut out = [[0i32; BLOCK_ROWS]; MR * NB];
            let mut panel = 0;
            while panel < blocks {
                let panel_end = (panel + PANEL_BLOCKS).min(blocks);
                for m0 in (0..qs.q).step_by(MR) {
                    let mr = MR.min(qs.q - m0);
                    let mut b0 = panel;
                    while b0 < panel_end {
                        let nb = NB.min(panel_end - b0);
                        unsafe {
                            vnni_tile(
                                mr,
                                nb,
                                codes[b0 * stride..].as_ptr(),
                                stride,
                                qs.codes[m0 * g * GROUP..].as_ptr(),
                                g,
                                &qs.sums[m0..],
                                &mut out,
                            );
                        }
                        sink += i64::from(out[0][0]);
                        b0 += nb;
                    }
                }
                panel = panel_end;
            }
            kernel.push(t.elapsed().as_secs_f64());
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (t, f, kk) = (med(&mut total), med(&mut first), med(&mut kernel));
        reranked.sort_unstable();
        let (calls, lanes) = (KEEP_CALLS.load(Relaxed), KEEP_LANES.load(Relaxed));
        println!("keep entered {calls} times for {lanes} rows (all runs)");
        let macs = (batch * n * d) as f64;
        println!(
            "{n} x {d}, batch {batch}, one thread: total {:.3} s ({:.1} q/s), first pass {:.3} s, \
             kernel alone {:.3} s ({:.0} GMAC/s), bound+keep {:.3} s, re-rank+rest {:.3} s; \
             re-ranked/query median {} max {} (sink {})",
            t,
            batch as f64 / t,
            f,
            kk,
            macs / kk / 1e9,
            f - kk,
            t - f,
            reranked[reranked.len() / 2],
            reranked[reranked.len() - 1],
            sink % 7
        );
    }

    /// f32 to f16 bits, round to nearest even (test data: normal or zero, no overflow).
    pub(super) fn f32_to_f16(v: f32) -> u16 {
        let sign = ((v.to_bits() >> 16) & 0x8000) as u16;
        let a = v.abs();
        if a < 6.103_515_6e-5 {
            return sign | (a * 16_777_216.0).round_ties_even() as u16;
        }
        let bits = a.to_bits();
        let e = (bits >> 23) as i32 - 127;
        let m = bits & 0x7f_ffff;
        let mut h = (((e + 15) as u32) << 10) | (m >> 13);
        let rest = m & 0x1fff;
        if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
            h += 1;
        }
        sign | h as u16
    }
}
