//! Measurement only, not shipped: a bfloat16 first pass (`vdpbf16ps`, AVX512_BF16)
//! against the int8 one, as issue 21 asks. Rows and queries are rounded to bf16
//! (subnormals flushed: the instruction treats them as zero), the bound is
//!
//! `E = (|r_q||x| + |q~||r_x| + gamma_n |q||x| + gamma_m |q~||x~| + tiny)(1 + 16u)`
//!
//! with `|x~| <= |x| + |r_x|` and `m` the lane's accumulation chain (one rounding per
//! pair element), so `alpha = |r_q| + gamma_n|q| + gamma_m|q~|`, `beta = |q~|(1 +
//! gamma_m)` and the scan of [`super`] keeps and re-ranks rows as for int8. The
//! `#[ignore]`d test prints kernel-only and end-to-end times in one process
//! (`cargo test --release --lib q8::bf16 -- --ignored --nocapture`); docs/index.md
//! has the numbers and why int8 was kept.

use std::arch::x86_64::*;
use std::time::Instant;

use rayon::prelude::*;

use super::*;

/// Dimensions summed per 32-bit lane by `vdpbf16ps`.
const PAIR: usize = 2;
/// f32 terms per row after a block's values: norm bound, residual-norm bound.
const TERMS16: usize = 2;

fn groups16(d: usize) -> usize {
    d.div_ceil(PAIR)
}

fn block_bytes16(d: usize) -> usize {
    groups16(d) * 64 + TERMS16 * BLOCK_ROWS * 4
}

/// bf16 bits of `v` (finite), round to nearest even, results below the normal range
/// flushed to zero (as `vdpbf16ps` reads them); None where it overflows.
fn to_bf16(v: f32) -> Option<u16> {
    let bits = v.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let h = rounded as u16;
    match h & 0x7f80 {
        0x7f80 => None,
        0 => Some(h & 0x8000),
        _ => Some(h),
    }
}

fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Rounds `x` to bf16 into `out`; returns (`|x|`, `|x - x~|`, `|x~|`) rounded up, or
/// infinite norms (and zeros) for a vector the bound does not cover.
fn round_vector(x: &[f32], out: &mut [u16], limit: f64) -> (f32, f32, f32) {
    out.fill(0);
    let special = (f32::INFINITY, f32::INFINITY, f32::INFINITY);
    if !x.iter().all(|v| v.is_finite()) {
        return special;
    }
    let norm2: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    if norm2.sqrt() > limit {
        return special;
    }
    let (mut r2, mut t2) = (0f64, 0f64);
    for (o, &v) in out.iter_mut().zip(x) {
        let Some(h) = to_bf16(v) else {
            return special;
        };
        *o = h;
        let t = f64::from(from_bf16(h));
        r2 += (f64::from(v) - t) * (f64::from(v) - t);
        t2 += t * t;
    }
    (sqrt_up(norm2), sqrt_up(r2), sqrt_up(t2))
}

/// The rows of `db` as bf16 blocks: 16 rows x 2 dimensions per 64 bytes, then per row
/// the norm and residual-norm bounds.
#[allow(clippy::needless_range_loop)]
pub(super) fn quantise_rows16(db: &Database<'_>) -> Vec<u8> {
    let (d, g) = (db.d, groups16(db.d));
    let bytes = block_bytes16(d);
    let mut out = vec![0u8; block_count(db.n) * bytes];
    out.par_chunks_mut(bytes)
        .enumerate()
        .for_each(|(b, block)| {
            let mut row = vec![0f32; d];
            let mut h = vec![0u16; d];
            let mut terms = [[0f32; BLOCK_ROWS]; TERMS16];
            for r in 0..BLOCK_ROWS {
                let i = b * BLOCK_ROWS + r;
                if i >= db.n {
                    break;
                }
                match db.rows {
                    Rows::F32(v) => row.copy_from_slice(&v[i * d..(i + 1) * d]),
                    Rows::F16Bits(v) => {
                        for (dst, &x) in row.iter_mut().zip(&v[i * d..(i + 1) * d]) {
                            *dst = topk::f16_to_f32(x);
                        }
                    }
                }
                let (norm, residual, _) = round_vector(&row, &mut h, MAX_ROW_NORM);
                for (j, &v) in h.iter().enumerate() {
                    let at = (j / PAIR) * 64 + r * 4 + (j % PAIR) * 2;
                    block[at..at + 2].copy_from_slice(&v.to_le_bytes());
                }
                terms[0][r] = norm;
                terms[1][r] = residual;
            }
            let tail = &mut block[g * 64..];
            for (chunk, v) in tail.chunks_exact_mut(4).zip(terms.iter().flatten()) {
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        });
    out
}

struct Queries16 {
    q: usize,
    g: usize,
    codes: Vec<u16>,
    alpha: Vec<f32>,
    beta: Vec<f32>,
    tiny: f32,
}

impl Queries16 {
    fn new(queries: &[f32], d: usize) -> Option<Self> {
        let (q, g) = (queries.len() / d, groups16(d));
        let mut codes = vec![0u16; q * g * PAIR];
        let (mut alpha, mut beta) = (vec![], vec![]);
        let dp = d.div_ceil(topk::PAD) * topk::PAD;
        let gamma = |n: usize| (n as f64) * U / (1.0 - (n as f64) * U);
        let (gn, gm) = (gamma(dp + 8), gamma(g * PAIR + 8));
        for (x, c) in queries
            .chunks_exact(d)
            .zip(codes.chunks_exact_mut(g * PAIR))
        {
            let (norm, residual, rounded) = round_vector(x, &mut c[..d], MAX_QUERY_NORM);
            if !norm.is_finite() {
                return None;
            }
            let (norm, residual, rounded) =
                (f64::from(norm), f64::from(residual), f64::from(rounded));
            alpha.push(up_f32(
                (residual + gn * norm + gm * rounded) * (1.0 + 4.0 * U),
            ));
            beta.push(up_f32(rounded * (1.0 + gm) * (1.0 + 4.0 * U)));
        }
        Some(Self {
            q,
            g,
            codes,
            alpha,
            beta,
            // every product and sum may be flushed to zero (2 per element)
            tiny: up_f32((2 * dp + 16) as f64 * 2f64.powi(-100)),
        })
    }
}

#[inline(always)]
unsafe fn bf16_tile<const M: usize, const B: usize>(
    blocks: *const u8,
    stride: usize,
    queries: *const u16,
    g: usize,
    out: &mut [[f32; BLOCK_ROWS]; MR * NB],
) {
    let mut acc = [[_mm512_setzero_ps(); B]; M];
    let qs = g * PAIR;
    for gi in 0..g {
        let mut r = [_mm512_setzero_si512(); B];
        for (b, rv) in r.iter_mut().enumerate() {
            *rv = _mm512_loadu_si512(blocks.add(b * stride + gi * 64).cast());
        }
        for (m, row) in acc.iter_mut().enumerate() {
            let word = queries
                .add(m * qs + gi * PAIR)
                .cast::<i32>()
                .read_unaligned();
            let qv: __m512bh = std::mem::transmute(_mm512_set1_epi32(word));
            for (a, rv) in row.iter_mut().zip(r.iter()) {
                *a = _mm512_dpbf16_ps(*a, std::mem::transmute::<__m512i, __m512bh>(*rv), qv);
            }
        }
    }
    for (m, row) in acc.iter().enumerate() {
        for (b, a) in row.iter().enumerate() {
            _mm512_storeu_ps(out[m * B + b].as_mut_ptr(), *a);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
unsafe fn tile16(
    mr: usize,
    nb: usize,
    blocks: *const u8,
    stride: usize,
    queries: *const u16,
    g: usize,
    out: &mut [[f32; BLOCK_ROWS]; MR * NB],
) {
    macro_rules! arms {
        ($($m:literal),*) => {
            match (mr, nb) {
                $(
                    ($m, 3) => bf16_tile::<$m, 3>(blocks, stride, queries, g, out),
                    ($m, 2) => bf16_tile::<$m, 2>(blocks, stride, queries, g, out),
                    ($m, _) => bf16_tile::<$m, 1>(blocks, stride, queries, g, out),
                )*
                _ => unreachable!(),
            }
        };
    }
    arms!(1, 2, 3, 4, 5, 6, 7, 8)
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma")]
unsafe fn scan16(
    qs: &Queries16,
    rows: &Database<'_>,
    codes: &[u8],
    blocks: Range<usize>,
    exclude: &Exclude,
    state: &mut State,
) {
    let (g, stride) = (qs.g, block_bytes16(rows.d));
    let mut out = [[0f32; BLOCK_ROWS]; MR * NB];
    let mut panel = blocks.start;
    while panel < blocks.end {
        let panel_end = (panel + PANEL_BLOCKS).min(blocks.end);
        let mut m0 = 0;
        while m0 < qs.q {
            let mr = MR.min(qs.q - m0);
            let mut b0 = panel;
            while b0 < panel_end {
                let nb = NB.min(panel_end - b0);
                let bytes = &codes[b0 * stride..(b0 + nb) * stride];
                let qc = &qs.codes[m0 * g * PAIR..(m0 + mr) * g * PAIR];
                tile16(mr, nb, bytes.as_ptr(), stride, qc.as_ptr(), g, &mut out);
                for m in 0..mr {
                    let qi = m0 + m;
                    for b in 0..nb {
                        let terms = &bytes[b * stride + g * 64..(b + 1) * stride];
                        let first = (b0 + b) * BLOCK_ROWS;
                        let valid = (rows.n - first).min(BLOCK_ROWS);
                        let theta = state.lower[qi].floor;
                        let (mut lower, mut upper) = ([0f32; BLOCK_ROWS], [0f32; BLOCK_ROWS]);
                        let mut mask = 0u32;
                        for r in 0..BLOCK_ROWS {
                            let a = out[m * nb + b][r];
                            let e = (qs.alpha[qi] * term(terms, 0, r)
                                + qs.beta[qi] * term(terms, 1, r)
                                + qs.tiny)
                                * INFLATE;
                            lower[r] = a - e;
                            upper[r] = a + e;
                            if r < valid && reaches(upper[r], theta) {
                                mask |= 1 << r;
                            }
                        }
                        if mask != 0 {
                            keep(qi, first, mask, &lower, &upper, exclude, state);
                        }
                    }
                }
                b0 += nb;
            }
            m0 += mr;
        }
        panel = panel_end;
    }
}

fn has_bf16() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16")
}

/// The exact top-k of one part through the bf16 first pass (None: float32 needed).
fn search16(
    queries: &[f32],
    rows: Database<'_>,
    codes: &[u8],
    k: usize,
    exclude: &Exclude,
) -> Option<Search> {
    let qs = Queries16::new(queries, rows.d)?;
    let blocks = block_count(rows.n);
    let chunk = blocks
        .div_ceil(rayon::current_num_threads() * 4)
        .max(PANEL_BLOCKS);
    let shares: Vec<Range<usize>> = (0..blocks)
        .step_by(chunk)
        .map(|s| s..(s + chunk).min(blocks))
        .collect();
    let state = shares
        .into_par_iter()
        .fold(
            || State::new(qs.q, k),
            |mut state, share| {
                // SAFETY: callers check `has_bf16`; `codes` holds whole blocks.
                unsafe { scan16(&qs, &rows, codes, share, exclude, &mut state) };
                state
            },
        )
        .reduce(|| State::new(0, k), State::merge);
    let (q, d) = (qs.q, rows.d);
    let mut scores = vec![0f32; q * k];
    let mut ids = vec![0i64; q * k];
    let mut reranked = vec![0u64; q];
    scores
        .par_chunks_mut(k)
        .zip(ids.par_chunks_mut(k))
        .zip(reranked.par_iter_mut())
        .zip(state.lower.into_par_iter().zip(state.kept))
        .enumerate()
        .for_each(|(qi, (((s, i), count), (lower, kept)))| {
            let query = &queries[qi * d..(qi + 1) * d];
            *count = rerank(query, &[rows], &[0], k, lower.floor, kept, s, i);
        });
    Some(Search {
        top: TopK { scores, ids, q, k },
        reranked,
        path: Path::Auto,
    })
}

fn same(a: &TopK, b: &TopK) -> bool {
    let bits = |t: &TopK| t.scores.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
    a.ids == b.ids && bits(a) == bits(b)
}

#[test]
fn bf16_first_pass_equals_the_float32_scan() {
    if !has_bf16() {
        return;
    }
    let d = 40;
    let base = tests::unit(tests::gaussian(300, d, 1), d);
    let mut rows = base.clone();
    rows.extend_from_slice(&base[..50 * d]);
    for i in 0..100 {
        let jitter = tests::gaussian(1, d, 50 + i);
        rows.extend(
            base[7 * d..8 * d]
                .iter()
                .zip(&jitter)
                .map(|(c, j)| c + j * 1e-4),
        );
    }
    rows.extend(std::iter::repeat_n(0.0, 5 * d));
    rows.extend(base[..20 * d].iter().map(|v| v * 3.0));
    rows.extend(base[..20 * d].iter().map(|v| v * 1e-20));
    let mut queries = tests::unit(tests::gaussian(30, d, 2), d);
    queries.extend_from_slice(&base[7 * d..8 * d]);
    let db = Database::new(Rows::F32(&rows), d).unwrap();
    let codes = quantise_rows16(&db);
    for k in [1, 10, 64, rows.len() / d + 3] {
        let want = topk::search_parts(&queries, &[db], k, &Exclude::NOTHING, 2).unwrap();
        let got = search16(&queries, db, &codes, k, &Exclude::NOTHING).unwrap();
        assert!(same(&got.top, &want), "k={k}");
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Kernel-only (one thread, an L2-resident block of 256 rows) and end-to-end (all
/// cores, `STARKRET_BF16_ROWS` rows, default 262,144 x 768 float16) times, int8 VNNI
/// and bf16 interleaved, medians.
#[test]
#[ignore]
fn measure_bf16_against_int8() {
    if !has_bf16() || !simd_support().0 {
        return;
    }
    let d = 768;
    let n: usize = std::env::var("STARKRET_BF16_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 18);
    let t0 = Instant::now();
    let rows32 = tests::unit(tests::gaussian(n, d, 11), d);
    let bits: Vec<u16> = rows32.iter().map(|&v| tests::f32_to_f16(v)).collect();
    drop(rows32);
    let db = Database::new(Rows::F16Bits(&bits), d).unwrap();
    let c8 = quantise_rows(&db, 0).unwrap();
    let c16 = quantise_rows16(&db);
    println!(
        "{n} x {d} rows ready in {:.1} s; int8 {} B/row, bf16 {} B/row",
        t0.elapsed().as_secs_f64(),
        block_bytes(d) / 16,
        block_bytes16(d) / 16
    );

    // ==== kernel only: 16 blocks (256 rows), 8 queries, one thread ====
    let blocks = 16;
    let q = tests::unit(tests::gaussian(MR, d, 5), d);
    let q8 = Queries::new(&q, d).unwrap();
    let q16 = Queries16::new(&q, d).unwrap();
    for mr in [1, MR] {
        let reps = 400 / mr;
        let (mut t8, mut t16) = (vec![], vec![]);
        let mut o8 = [[0i32; BLOCK_ROWS]; MR * NB];
        let mut o16 = [[0f32; BLOCK_ROWS]; MR * NB];
        let mut sink = 0f64;
        for _ in 0..9 {
            let t = Instant::now();
            for _ in 0..reps {
                for b0 in (0..blocks).step_by(NB) {
                    let nb = NB.min(blocks - b0);
                    unsafe {
                        tests::vnni_tile(
                            mr,
                            nb,
                            c8[b0 * block_bytes(d)..].as_ptr(),
                            block_bytes(d),
                            q8.codes.as_ptr(),
                            q8.g,
                            &q8.sums,
                            &mut o8,
                        )
                    };
                    sink += f64::from(o8[0][0]);
                }
            }
            t8.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for _ in 0..reps {
                for b0 in (0..blocks).step_by(NB) {
                    let nb = NB.min(blocks - b0);
                    unsafe {
                        tile16(
                            mr,
                            nb,
                            c16[b0 * block_bytes16(d)..].as_ptr(),
                            block_bytes16(d),
                            q16.codes.as_ptr(),
                            q16.g,
                            &mut o16,
                        )
                    };
                    sink += f64::from(o16[0][0]);
                }
            }
            t16.push(t.elapsed().as_secs_f64());
        }
        let macs = (reps * mr * blocks * BLOCK_ROWS * d) as f64;
        let (a, b) = (median(&mut t8), median(&mut t16));
        println!(
            "kernel {mr} queries x 256 rows (L2): int8 {:.1} GMAC/s, bf16 {:.1} GMAC/s, int8/bf16 {:.2}x (sink {})",
            macs / a / 1e9, macs / b / 1e9, b / a, sink as u8
        );
    }

    // ==== end to end: first pass + re-rank, all cores ====
    let part = Part::new(db, &c8).unwrap();
    for batch in [1usize, 16, 256, 1024] {
        let queries = tests::unit(tests::gaussian(batch, d, 100 + batch as u64), d);
        let k = 10;
        let want = topk::search_parts(&queries, &[db], k, &Exclude::NOTHING, 0).unwrap();
        let reps = if batch >= 256 { 3 } else { 7 };
        let (mut t8, mut t16) = (vec![], vec![]);
        let (mut r8, mut r16) = (vec![], vec![]);
        for rep in 0..reps {
            let mut run8 = || {
                let t = Instant::now();
                let got =
                    search_parts(&queries, &[part], k, &Exclude::NOTHING, 0, Path::Vnni).unwrap();
                t8.push(t.elapsed().as_secs_f64());
                assert!(same(&got.top, &want));
                r8 = got.reranked;
            };
            let mut run16 = || {
                let t = Instant::now();
                let got = search16(&queries, db, &c16, k, &Exclude::NOTHING).unwrap();
                t16.push(t.elapsed().as_secs_f64());
                assert!(same(&got.top, &want));
                r16 = got.reranked;
            };
            if rep % 2 == 0 {
                run8();
                run16();
            } else {
                run16();
                run8();
            }
        }
        let stats = |r: &mut Vec<u64>| {
            r.sort_unstable();
            (r[r.len() / 2], r[(r.len() * 99 / 100).min(r.len() - 1)])
        };
        let (a, b) = (median(&mut t8), median(&mut t16));
        let ((m8, p8), (m16, p16)) = (stats(&mut r8), stats(&mut r16));
        println!(
            "batch {batch}: int8 {:.1} q/s, bf16 {:.1} q/s, int8/bf16 {:.2}x; re-ranked/query median (p99): int8 {m8} ({p8}), bf16 {m16} ({p16})",
            batch as f64 / a, batch as f64 / b, b / a
        );
    }
}
