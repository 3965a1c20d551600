//! Exact batched inner-product top-k over a row-major float16 or float32 database.
//!
//! The database is scanned in blocks of rows that are widened to f32 into a small
//! scratch buffer (zero-padded to a multiple of the SIMD width), and every block is
//! multiplied with all queries of the batch by a register-blocked micro-kernel
//! (`MR` queries x `NR` rows per tile). One pass over the database therefore serves
//! the whole batch: for a few queries the scan is bound by memory bandwidth and the
//! database is read once; for hundreds of queries it is bound by FMA throughput and
//! each loaded row is reused from registers across `MR` queries.
//!
//! Determinism: every (query, row) score is computed by the same sequence of
//! operations whatever the tile it falls in or the thread that computes it, and hits
//! are ranked by a total order (score descending, then id ascending), so results do
//! not depend on the number of threads.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::ops::Range;

use rayon::prelude::*;

use crate::cpu;

/// The rows of a database as they lie in memory (a numpy array or a memory map).
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    /// IEEE float16 values given as their bits.
    F16Bits(&'a [u16]),
}

impl Rows<'_> {
    fn len(&self) -> usize {
        match self {
            Rows::F32(v) => v.len(),
            Rows::F16Bits(v) => v.len(),
        }
    }
}

/// A database of `n` rows of dimension `d`, borrowed.
#[derive(Clone, Copy)]
pub struct Database<'a> {
    pub(crate) rows: Rows<'a>,
    pub(crate) n: usize,
    pub(crate) d: usize,
}

impl<'a> Database<'a> {
    pub fn new(rows: Rows<'a>, d: usize) -> Result<Self, String> {
        if d == 0 {
            return Err("the dimension must be at least 1".into());
        }
        if !rows.len().is_multiple_of(d) {
            return Err(format!(
                "{} values do not make whole rows of dimension {d}",
                rows.len()
            ));
        }
        Ok(Self {
            rows,
            n: rows.len() / d,
            d,
        })
    }
}

/// Row ids that must not be returned, applied inside the scan: ids left out for every
/// query (`global`, sorted once) and one list per query, together or alone. An id is
/// excluded for a query when it is in either, so a large global list (e.g. recorded near
/// duplicates) is never copied into each query's list.
#[derive(Debug, Clone, Default)]
pub struct Exclude<'a> {
    /// Sorted, without repeats: a lookup is a binary search.
    global: Cow<'a, [i64]>,
    /// One sorted list per query.
    per_query: Option<Vec<Vec<i64>>>,
}

impl Exclude<'static> {
    /// No exclusions.
    pub const NOTHING: Exclude<'static> = Exclude {
        global: Cow::Borrowed(&[]),
        per_query: None,
    };

    /// The same ids for every query (sorted once here).
    #[cfg(test)]
    pub fn global(mut ids: Vec<i64>) -> Self {
        ids.sort_unstable();
        ids.dedup();
        Exclude {
            global: Cow::Owned(ids),
            per_query: None,
        }
    }

    /// One list of ids per query.
    #[cfg(test)]
    pub fn per_query(lists: Vec<Vec<i64>>) -> Self {
        Exclude::NOTHING.with_per_query(lists)
    }
}

impl<'a> Exclude<'a> {
    /// The same ids for every query, borrowed when they are already sorted without
    /// repeats (the Python side keeps them so: one pass to check, no copy, no sort).
    pub fn global_borrowed(ids: &'a [i64]) -> Self {
        let global = if ids.windows(2).all(|w| w[0] < w[1]) {
            Cow::Borrowed(ids)
        } else {
            let mut owned = ids.to_vec();
            owned.sort_unstable();
            owned.dedup();
            Cow::Owned(owned)
        };
        Exclude {
            global,
            per_query: None,
        }
    }

    /// These exclusions plus one list of ids per query.
    pub fn with_per_query(self, lists: Vec<Vec<i64>>) -> Self {
        let lists = lists
            .into_iter()
            .map(|mut ids| {
                ids.sort_unstable();
                ids.dedup();
                ids
            })
            .collect();
        Exclude {
            global: self.global,
            per_query: Some(lists),
        }
    }

    /// An error unless the per-query lists (if any) are one per query.
    pub(crate) fn check(&self, q: usize) -> Result<(), String> {
        match &self.per_query {
            Some(lists) if lists.len() != q => Err(format!(
                "exclude has {} per-query lists for {q} queries",
                lists.len()
            )),
            _ => Ok(()),
        }
    }

    #[inline]
    pub(crate) fn contains(&self, query: usize, id: i64) -> bool {
        (!self.global.is_empty() && self.global.binary_search(&id).is_ok())
            || self
                .per_query
                .as_ref()
                .is_some_and(|lists| lists[query].binary_search(&id).is_ok())
    }
}

/// `q` rows of `k` results: scores descending, ids (-1 and score -inf where fewer
/// than `k` rows were eligible).
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    pub scores: Vec<f32>,
    pub ids: Vec<i64>,
    pub q: usize,
    pub k: usize,
}

// ==== Ranking ====

#[derive(Clone, Copy, Debug)]
pub(crate) struct Hit {
    pub(crate) score: f32,
    pub(crate) id: i64,
}

/// NaN ranks below every number (tied with -inf, then by id), so the order is total.
#[inline]
fn rank_key(score: f32) -> f32 {
    if score.is_nan() {
        f32::NEG_INFINITY
    } else {
        score
    }
}

#[inline]
fn better(a: &Hit, b: &Hit) -> bool {
    let (x, y) = (rank_key(a.score), rank_key(b.score));
    x > y || (x == y && a.id < b.id)
}

fn order(a: &Hit, b: &Hit) -> Ordering {
    if better(a, b) {
        Ordering::Less
    } else if better(b, a) {
        Ordering::Greater
    } else {
        Ordering::Equal
    }
}

/// The best `k` hits seen so far: a binary heap with the worst kept hit at the root.
pub(crate) struct Best {
    k: usize,
    pub(crate) heap: Vec<Hit>,
    /// A hit whose rank key is below this cannot enter; -inf until the heap is full.
    pub(crate) floor: f32,
    /// Counting instead of ranking: hits admitted (scores above a fixed floor).
    counting: bool,
    count: u64,
}

impl Best {
    pub(crate) fn new(k: usize, capacity: usize) -> Self {
        Self {
            k,
            heap: Vec::with_capacity(k.min(capacity)),
            floor: f32::NEG_INFINITY,
            counting: false,
            count: 0,
        }
    }

    /// Counts the rows scoring strictly above `threshold` (NaN scores never count).
    fn counter(threshold: f32) -> Self {
        Self {
            k: 0,
            heap: Vec::new(),
            floor: next_up(threshold),
            counting: true,
            count: 0,
        }
    }

    #[inline]
    pub(crate) fn admits(&self, score: f32) -> bool {
        rank_key(score) >= self.floor
    }

    pub(crate) fn push(&mut self, hit: Hit) {
        if self.counting {
            self.count += 1;
            return;
        }
        if self.heap.len() < self.k {
            self.heap.push(hit);
            let mut i = self.heap.len() - 1;
            while i > 0 {
                let parent = (i - 1) / 2;
                if !better(&self.heap[parent], &self.heap[i]) {
                    break;
                }
                self.heap.swap(parent, i);
                i = parent;
            }
        } else if better(&hit, &self.heap[0]) {
            self.heap[0] = hit;
            let len = self.heap.len();
            let mut i = 0;
            loop {
                let (l, r) = (2 * i + 1, 2 * i + 2);
                let mut worst = i;
                if l < len && better(&self.heap[worst], &self.heap[l]) {
                    worst = l;
                }
                if r < len && better(&self.heap[worst], &self.heap[r]) {
                    worst = r;
                }
                if worst == i {
                    break;
                }
                self.heap.swap(i, worst);
                i = worst;
            }
        } else {
            return;
        }
        if self.heap.len() == self.k {
            self.floor = rank_key(self.heap[0].score);
        }
    }
}

/// The smallest f32 above `x` (`x` itself for NaN and +inf), so that `>= next_up(x)`
/// means `> x`.
fn next_up(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let bits = x.to_bits();
    f32::from_bits(if x > 0.0 { bits + 1 } else { bits - 1 })
}

/// The best `k` of `hits` in rank order, padded with (-inf, -1) to exactly `k`.
pub(crate) fn write_row(mut hits: Vec<Hit>, k: usize, scores: &mut [f32], ids: &mut [i64]) {
    hits.sort_unstable_by(order);
    hits.truncate(k);
    for (i, (s, id)) in scores.iter_mut().zip(ids.iter_mut()).enumerate() {
        match hits.get(i) {
            Some(hit) => {
                *s = hit.score;
                *id = hit.id;
            }
            None => {
                *s = f32::NEG_INFINITY;
                *id = -1;
            }
        }
    }
}

// ==== Search ====

/// Zero padding to this many values per row serves every SIMD width used below.
pub(crate) const PAD: usize = 16;
/// Rows widened per block: the block stays in L2 while every query tile passes over it.
const BLOCK_BYTES: usize = 256 * 1024;
/// Smallest share of rows given to one task, so small searches are not split to dust.
const MIN_CHUNK_ROWS: usize = 256;

/// One part of the database scanned for the whole batch.
#[derive(Clone, Copy)]
struct Job<'a> {
    /// q rows of `dp` values, zero-padded.
    queries: &'a [f32],
    q: usize,
    dp: usize,
    db: Database<'a>,
    /// Global id of the part's first row (ids run on across the parts, in order).
    base: usize,
    exclude: &'a Exclude<'a>,
}

/// The exact top-`k` rows of `db` by inner product with each of the `q` queries
/// (`queries` is q x d, row-major), on `threads` workers (0 = all cores): one part
/// of [`search_parts`] (the tests' single-database form).
#[cfg(test)]
pub fn search(
    queries: &[f32],
    db: &Database<'_>,
    k: usize,
    exclude: &Exclude,
    threads: usize,
) -> Result<TopK, String> {
    search_parts(queries, std::slice::from_ref(db), k, exclude, threads)
}

/// The exact top-`k` rows of several parts searched as one database: the rows of
/// `parts[0]` get ids `0..n0`, those of `parts[1]` the next ids, and so on.
///
/// The parts are cut into shares of rows that workers take in turn; each worker
/// keeps one running top-`k` per query and the workers' lists are merged pairwise at
/// the end, so memory is O(threads x q x k) whatever the number of parts.
pub fn search_parts(
    queries: &[f32],
    parts: &[Database<'_>],
    k: usize,
    exclude: &Exclude,
    threads: usize,
) -> Result<TopK, String> {
    if k == 0 {
        return Err("k must be at least 1".into());
    }
    let q = query_count(queries, parts)?;
    if q.checked_mul(k)
        .is_none_or(|len| len > isize::MAX as usize / 8)
    {
        return Err(format!("{q} queries x k={k} results do not fit in memory"));
    }
    let total: usize = parts.iter().map(|p| p.n).sum();
    let fresh = || -> Vec<Best> { (0..q).map(|_| Best::new(k, total)).collect() };
    let best = scan_parts(queries, parts, exclude, threads, fresh)?;
    let mut scores = vec![0f32; q * k];
    let mut ids = vec![0i64; q * k];
    let rows = scores.chunks_exact_mut(k).zip(ids.chunks_exact_mut(k));
    for (qi, (s, i)) in rows.enumerate() {
        let hits = best.get(qi).map(|b| b.heap.clone()).unwrap_or_default();
        write_row(hits, k, s, i);
    }
    Ok(TopK { scores, ids, q, k })
}

/// For each query, how many rows of the parts score strictly above its threshold (the
/// rank of an image among all others, as retrieval metrics need), with the same
/// kernel and the same arithmetic as [`search_parts`].
pub fn count_above(
    queries: &[f32],
    parts: &[Database<'_>],
    thresholds: &[f32],
    exclude: &Exclude,
    threads: usize,
) -> Result<Vec<u64>, String> {
    let q = query_count(queries, parts)?;
    if thresholds.len() != q {
        return Err(format!("{} thresholds for {q} queries", thresholds.len()));
    }
    let fresh = || -> Vec<Best> { thresholds.iter().map(|&t| Best::counter(t)).collect() };
    let best = scan_parts(queries, parts, exclude, threads, fresh)?;
    Ok((0..q).map(|i| best.get(i).map_or(0, |b| b.count)).collect())
}

/// The number of queries, once the parts and the queries are checked to agree.
pub(crate) fn query_count(queries: &[f32], parts: &[Database<'_>]) -> Result<usize, String> {
    let Some(first) = parts.first() else {
        return Err("the database has no parts".into());
    };
    let d = first.d;
    if let Some((i, p)) = parts.iter().enumerate().find(|(_, p)| p.d != d) {
        return Err(format!(
            "part {i} has rows of dimension {}, part 0 of {d}",
            p.d
        ));
    }
    if !queries.len().is_multiple_of(d) {
        return Err(format!(
            "{} query values do not make whole rows of dimension {d}",
            queries.len()
        ));
    }
    Ok(queries.len() / d)
}

/// Scans every part for the whole batch. The parts are cut into shares of rows that
/// workers take in turn; each worker keeps one running list per query (from `fresh`)
/// and the workers' lists are merged pairwise at the end, so memory is
/// O(threads x q x k) whatever the number of parts.
fn scan_parts<F>(
    queries: &[f32],
    parts: &[Database<'_>],
    exclude: &Exclude,
    threads: usize,
    fresh: F,
) -> Result<Vec<Best>, String>
where
    F: Fn() -> Vec<Best> + Sync + Send,
{
    let q = query_count(queries, parts)?;
    let d = parts[0].d;
    exclude.check(q)?;
    let dp = d.div_ceil(PAD) * PAD;
    let mut padded = vec![0f32; q * dp];
    for (dst, src) in padded.chunks_exact_mut(dp).zip(queries.chunks_exact(d)) {
        dst[..d].copy_from_slice(src);
    }
    let pool = cpu::pool(threads)?;
    let workers = pool.current_num_threads();
    let total: usize = parts.iter().map(|p| p.n).sum();
    let chunk = total.div_ceil(workers * 4).max(MIN_CHUNK_ROWS);
    let mut shares: Vec<(Job<'_>, Range<usize>)> = Vec::new();
    let mut base = 0;
    for part in parts {
        let job = Job {
            queries: &padded,
            q,
            dp,
            db: *part,
            base,
            exclude,
        };
        shares.extend(
            (0..part.n)
                .step_by(chunk)
                .map(|s| (job, s..(s + chunk).min(part.n))),
        );
        base += part.n;
    }
    Ok(pool.install(|| {
        shares
            .into_par_iter()
            .fold(&fresh, |mut best, (job, rows)| {
                scan(&job, rows, &mut best);
                best
            })
            .reduce(Vec::new, merge_best)
    }))
}

/// Two workers' running top lists as one (either may be empty: no share scanned).
pub(crate) fn merge_best(mut a: Vec<Best>, b: Vec<Best>) -> Vec<Best> {
    if a.is_empty() {
        return b;
    }
    for (into, from) in a.iter_mut().zip(b) {
        into.count += from.count;
        for hit in from.heap {
            into.push(hit);
        }
    }
    a
}

/// Exact merge of per-part results: `scores` and `ids` are q x m (several parts' top
/// lists side by side, ids already global, -1 for padding); returns the top `k`.
pub fn merge(scores: &[f32], ids: &[i64], q: usize, m: usize, k: usize) -> Result<TopK, String> {
    if k == 0 {
        return Err("k must be at least 1".into());
    }
    if scores.len() != q * m || ids.len() != q * m {
        return Err(format!("scores and ids must both hold {q} x {m} values"));
    }
    let mut out_scores = vec![f32::NEG_INFINITY; q * k];
    let mut out_ids = vec![-1i64; q * k];
    if m == 0 {
        return Ok(TopK {
            scores: out_scores,
            ids: out_ids,
            q,
            k,
        });
    }
    let rows = out_scores
        .chunks_exact_mut(k)
        .zip(out_ids.chunks_exact_mut(k));
    let inputs = scores.chunks_exact(m).zip(ids.chunks_exact(m));
    for ((s_out, i_out), (s_in, i_in)) in rows.zip(inputs) {
        let hits = s_in
            .iter()
            .zip(i_in)
            .filter(|(_, &id)| id >= 0)
            .map(|(&score, &id)| Hit { score, id })
            .collect();
        write_row(hits, k, s_out, i_out);
    }
    Ok(TopK {
        scores: out_scores,
        ids: out_ids,
        q,
        k,
    })
}

/// One share of the rows with the widest SIMD path this CPU has. The choice depends
/// only on the CPU, so every share of one search computes scores the same way.
fn scan(job: &Job<'_>, rows: Range<usize>, best: &mut [Best]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("f16c") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { scan_avx512(job, rows, best) };
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            // SAFETY: as above.
            return unsafe { scan_avx2(job, rows, best) };
        }
    }
    scan_rows::<Portable, 4, 4>(job, rows, best)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn scan_avx512(job: &Job<'_>, rows: Range<usize>, best: &mut [Best]) {
    // 4 x 6 accumulators + 6 rows + 1 query = 31 of the 32 zmm registers.
    scan_rows::<x86::Avx512, 4, 6>(job, rows, best)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scan_avx2(job: &Job<'_>, rows: Range<usize>, best: &mut [Best]) {
    // 2 x 4 accumulators + 4 rows + 1 query fit the 16 ymm registers.
    scan_rows::<x86::Avx2, 2, 4>(job, rows, best)
}

/// Batches up to this size stream rows straight from the database into the kernel
/// (memory-bound: the prefetcher sees one continuous read); larger batches widen a
/// block of rows once and reuse it, from L2, for every query tile (compute-bound).
const STREAM_MAX_QUERIES: usize = 48;

#[inline(always)]
fn scan_rows<I: Isa, const MR: usize, const NR: usize>(
    job: &Job<'_>,
    rows: Range<usize>,
    best: &mut [Best],
) {
    if job.q <= STREAM_MAX_QUERIES {
        match job.db.rows {
            Rows::F32(v) => stream::<I, f32, MR, NR>(job, v, rows, best),
            Rows::F16Bits(v) => stream::<I, u16, MR, NR>(job, v, rows, best),
        }
    } else {
        blocked::<I, MR, NR>(job, rows, best);
    }
}

// ==== Scoring chosen rows ====

/// The scores of chosen rows of `db` (`rows`, local row numbers) for one query, bit for
/// bit those the scan computes (same ISA, same kernel, same order of operations): what
/// a first pass that narrows the rows down re-ranks with (`rust/q8.rs`). `query` holds
/// `d` values zero-padded to a multiple of [`PAD`].
pub(crate) fn rescore(query: &[f32], db: &Database<'_>, rows: &[usize], out: &mut [f32]) {
    assert!(query.len() == db.d.div_ceil(PAD) * PAD && out.len() >= rows.len());
    assert!(rows.iter().all(|&r| r < db.n));
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("f16c") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { rescore_avx512(query, db, rows, out) };
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            // SAFETY: as above.
            return unsafe { rescore_avx2(query, db, rows, out) };
        }
    }
    rescore_rows::<Portable>(query, db, rows, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn rescore_avx512(query: &[f32], db: &Database<'_>, rows: &[usize], out: &mut [f32]) {
    rescore_rows::<x86::Avx512>(query, db, rows, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rescore_avx2(query: &[f32], db: &Database<'_>, rows: &[usize], out: &mut [f32]) {
    rescore_rows::<x86::Avx2>(query, db, rows, out)
}

#[inline(always)]
fn rescore_rows<I: Isa>(query: &[f32], db: &Database<'_>, rows: &[usize], out: &mut [f32]) {
    match db.rows {
        Rows::F32(v) => rescore_elem::<I, f32>(query, v, db.d, rows, out),
        Rows::F16Bits(v) => rescore_elem::<I, u16>(query, v, db.d, rows, out),
    }
}

/// One row at a time as the streaming scan reads it (stride and length `d`, the tail
/// loaded partially), so the score is the scan's.
#[inline(always)]
fn rescore_elem<I: Isa, E: Elem>(
    query: &[f32],
    values: &[E],
    d: usize,
    rows: &[usize],
    out: &mut [f32],
) {
    let dp = query.len();
    for (i, (&r, o)) in rows.iter().zip(out.iter_mut()).enumerate() {
        let row = &values[r * d..(r + 1) * d];
        // Scattered rows defeat the hardware prefetcher: fetch the row after next while
        // this one is scored (the re-rank of the int8 first pass waits on memory).
        if let Some(&next) = rows.get(i + 2) {
            let ahead = &values[next * d..(next + 1) * d];
            let start = ahead.as_ptr().cast::<i8>();
            for off in (0..std::mem::size_of_val(ahead)).step_by(64) {
                // SAFETY: `off` stays inside `ahead`; a prefetch has no other effect.
                unsafe { I::prefetch(start.add(off)) };
            }
        }
        // SAFETY: `query` holds dp values (a multiple of every lane count), `row` d
        // values; the CPU supports I's features.
        *o = unsafe { tile::<I, E, 1, 1>(query.as_ptr(), row.as_ptr(), d, d, dp, 0) }[0][0];
    }
}

/// Rows-outer order: each tile of NR database rows is read once, from memory, and
/// scored against every query of the batch while it sits in L1.
#[inline(always)]
fn stream<I: Isa, E: Elem, const MR: usize, const NR: usize>(
    job: &Job<'_>,
    values: &[E],
    rows: Range<usize>,
    best: &mut [Best],
) {
    let d = job.db.d;
    let mut start = rows.start;
    while start < rows.end {
        let count = NR.min(rows.end - start);
        let tile_rows = RowTile {
            values: &values[start * d..(start + count) * d],
            stride: d,
            len: d,
            // Streaming rows in lockstep defeats the hardware prefetcher; fetch the
            // tile after next while this one is scored.
            ahead: 2 * NR * d,
            first_id: job.base + start,
            count,
        };
        for_query_tiles::<I, E, MR, NR>(job, &tile_rows, best);
        start += count;
    }
}

/// Blocked order: a block of rows is widened into an L2-sized scratch buffer once
/// and every query tile passes over it, so each loaded row serves MR queries from
/// registers and the whole batch from cache.
#[inline(always)]
fn blocked<I: Isa, const MR: usize, const NR: usize>(
    job: &Job<'_>,
    rows: Range<usize>,
    best: &mut [Best],
) {
    let dp = job.dp;
    let block = (BLOCK_BYTES / (dp * 4)).max(NR) / NR * NR;
    let mut scratch = vec![0f32; block * dp];
    let mut start = rows.start;
    while start < rows.end {
        let count = block.min(rows.end - start);
        widen_block::<I>(&job.db, start, count, dp, &mut scratch);
        let mut qi = 0;
        while qi < job.q {
            let mr = MR.min(job.q - qi);
            for r0 in (0..count).step_by(NR) {
                let n_rows = NR.min(count - r0);
                let tile_rows = RowTile {
                    values: &scratch[r0 * dp..(r0 + n_rows) * dp],
                    stride: dp,
                    len: dp,
                    ahead: 0,
                    first_id: job.base + start + r0,
                    count: n_rows,
                };
                one_query_tile::<I, f32, MR, NR>(job, &tile_rows, qi, mr, &mut best[qi..qi + mr]);
            }
            qi += mr;
        }
        start += count;
    }
}

/// Up to NR rows of `len` values, `stride` apart (zero beyond `len` up to `dp`).
struct RowTile<'a, E> {
    values: &'a [E],
    stride: usize,
    len: usize,
    /// Prefetch this many values ahead of each load (0: none).
    ahead: usize,
    first_id: usize,
    count: usize,
}

#[inline(always)]
fn for_query_tiles<I: Isa, E: Elem, const MR: usize, const NR: usize>(
    job: &Job<'_>,
    rows: &RowTile<'_, E>,
    best: &mut [Best],
) {
    let mut qi = 0;
    while qi < job.q {
        let mr = MR.min(job.q - qi);
        one_query_tile::<I, E, MR, NR>(job, rows, qi, mr, &mut best[qi..qi + mr]);
        qi += mr;
    }
}

#[inline(always)]
fn one_query_tile<I: Isa, E: Elem, const MR: usize, const NR: usize>(
    job: &Job<'_>,
    rows: &RowTile<'_, E>,
    qi: usize,
    mr: usize,
    best: &mut [Best],
) {
    match (mr, rows.count == NR) {
        (1, true) => score_tile::<I, E, 1, NR>(job, rows, qi, best),
        (2, true) => score_tile::<I, E, 2, NR>(job, rows, qi, best),
        (3, true) => score_tile::<I, E, 3, NR>(job, rows, qi, best),
        (_, true) => score_tile::<I, E, MR, NR>(job, rows, qi, best),
        // The last rows of a range: one row at a time, same arithmetic per score.
        _ => {
            for r in 0..rows.count {
                let one = RowTile {
                    values: &rows.values[r * rows.stride..],
                    stride: rows.stride,
                    len: rows.len,
                    ahead: 0,
                    first_id: rows.first_id + r,
                    count: 1,
                };
                for m in 0..mr {
                    score_tile::<I, E, 1, 1>(job, &one, qi + m, &mut best[m..m + 1]);
                }
            }
        }
    }
}

/// Scores queries `qi..qi + M` against the NR rows of `rows` and offers the hits.
#[inline(always)]
fn score_tile<I: Isa, E: Elem, const M: usize, const NR: usize>(
    job: &Job<'_>,
    rows: &RowTile<'_, E>,
    qi: usize,
    best: &mut [Best],
) {
    let dp = job.dp;
    let queries = &job.queries[qi * dp..(qi + M) * dp];
    assert!(rows.values.len() >= (NR - 1) * rows.stride + rows.len.min(dp));
    // SAFETY: `queries` holds M rows of dp values (dp a multiple of every lane
    // count) and `rows` NR rows of `len` values `stride` apart, as asserted; the
    // CPU supports I's features.
    let scores = unsafe {
        tile::<I, E, M, NR>(
            queries.as_ptr(),
            rows.values.as_ptr(),
            rows.stride,
            rows.len,
            dp,
            rows.ahead,
        )
    };
    for (m, (row, best)) in scores.iter().zip(best.iter_mut()).enumerate() {
        for (c, &score) in row.iter().enumerate() {
            if !best.admits(score) {
                continue;
            }
            let id = (rows.first_id + c) as i64;
            if !job.exclude.contains(qi + m, id) {
                best.push(Hit { score, id });
            }
        }
    }
}

/// Copies (and widens) `count` rows from `start` into `scratch` with stride `dp`.
#[inline(always)]
fn widen_block<I: Isa>(
    db: &Database<'_>,
    start: usize,
    count: usize,
    dp: usize,
    scratch: &mut [f32],
) {
    let d = db.d;
    for (r, dst) in scratch.chunks_exact_mut(dp).take(count).enumerate() {
        let at = (start + r) * d;
        match db.rows {
            Rows::F32(v) => dst[..d].copy_from_slice(&v[at..at + d]),
            // SAFETY: `widen` is only called from functions compiled for I's features.
            Rows::F16Bits(v) => unsafe { I::widen(&v[at..at + d], &mut dst[..d]) },
        }
        dst[d..].fill(0.0);
    }
}

/// M x NR dot products: each accumulates lane-wise in order over the padded
/// dimension `dp` and is then summed across lanes, the same way whatever the tile
/// shape or the layout the rows come from, so every score is bit-identical.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn tile<I: Isa, E: Elem, const M: usize, const NR: usize>(
    queries: *const f32,
    rows: *const E,
    stride: usize,
    len: usize,
    dp: usize,
    ahead: usize,
) -> [[f32; NR]; M] {
    let mut acc = [[I::zero(); NR]; M];
    let full = len / I::LANES * I::LANES;
    let mut j = 0;
    while j < full {
        let mut r = [I::zero(); NR];
        for c in 0..NR {
            let p = rows.add(c * stride + j);
            // Once per 64-byte line; a hint never faults, so running past the end
            // of the rows is harmless.
            if ahead > 0 && (j * size_of::<E>()).is_multiple_of(64) {
                I::prefetch(p.wrapping_add(ahead).cast());
            }
            r[c] = E::load::<I>(p);
        }
        step::<I, M, NR>(&mut acc, &r, queries, j, dp);
        j += I::LANES;
    }
    while j < dp {
        let mut r = [I::zero(); NR];
        let count = len.saturating_sub(j).min(I::LANES);
        for c in 0..NR {
            r[c] = E::load_partial::<I>(rows.add(c * stride + j), count);
        }
        step::<I, M, NR>(&mut acc, &r, queries, j, dp);
        j += I::LANES;
    }
    let mut out = [[0f32; NR]; M];
    for m in 0..M {
        for c in 0..NR {
            out[m][c] = I::sum(acc[m][c]);
        }
    }
    out
}

#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn step<I: Isa, const M: usize, const NR: usize>(
    acc: &mut [[I::V; NR]; M],
    r: &[I::V; NR],
    queries: *const f32,
    j: usize,
    dp: usize,
) {
    for m in 0..M {
        let qv = I::load(queries.add(m * dp + j));
        for c in 0..NR {
            acc[m][c] = I::fma(r[c], qv, acc[m][c]);
        }
    }
}

/// A database value type: f32, or f16 given as its bits.
trait Elem: Copy + Default {
    unsafe fn load<I: Isa>(p: *const Self) -> I::V;
    /// `count` values (0 to LANES), the rest of the lanes zero.
    #[inline(always)]
    unsafe fn load_partial<I: Isa>(p: *const Self, count: usize) -> I::V {
        let mut buf = [Self::default(); 16];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), count);
        Self::load::<I>(buf.as_ptr())
    }
}

impl Elem for f32 {
    #[inline(always)]
    unsafe fn load<I: Isa>(p: *const f32) -> I::V {
        I::load(p)
    }
}

impl Elem for u16 {
    #[inline(always)]
    unsafe fn load<I: Isa>(p: *const u16) -> I::V {
        I::load_f16(p)
    }
}

// ==== Kernels for other modules (near-duplicate search) ====

/// Zero padding of the rows [`dot_block`] takes: a multiple of every SIMD width.
pub(crate) const ROW_PAD: usize = PAD;

impl Database<'_> {
    /// Number of rows.
    pub(crate) fn len(&self) -> usize {
        self.n
    }

    /// Row dimension.
    pub(crate) fn dim(&self) -> usize {
        self.d
    }

    /// Row `i` widened to f32 into `dst[..d]` (the rest of `dst` is left as it is).
    pub(crate) fn widen_row(&self, i: usize, dst: &mut [f32]) {
        let d = self.d;
        let at = i * d;
        match self.rows {
            Rows::F32(v) => dst[..d].copy_from_slice(&v[at..at + d]),
            Rows::F16Bits(v) => {
                for (o, &h) in dst[..d].iter_mut().zip(&v[at..at + d]) {
                    *o = f16_to_f32(h);
                }
            }
        }
    }
}

/// Every dot product of the rows of `a` with the rows of `b` (f32 rows of `dp` values,
/// `dp` a multiple of [`ROW_PAD`], zero-padded) into `out` (`a` rows x `b` rows,
/// row-major), with the scan's kernel and the same arithmetic per score.
pub(crate) fn dot_block(a: &[f32], b: &[f32], dp: usize, out: &mut [f32]) {
    if dp == 0 || !dp.is_multiple_of(PAD) {
        return;
    }
    let (na, nb) = (a.len() / dp, b.len() / dp);
    if out.len() < na * nb {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("f16c") {
            // SAFETY: the CPU supports the features the function is compiled for.
            return unsafe { dots_avx512(a, b, dp, out) };
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            // SAFETY: as above.
            return unsafe { dots_avx2(a, b, dp, out) };
        }
    }
    dots::<Portable, 4, 4>(a, b, dp, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn dots_avx512(a: &[f32], b: &[f32], dp: usize, out: &mut [f32]) {
    dots::<x86::Avx512, 4, 6>(a, b, dp, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_avx2(a: &[f32], b: &[f32], dp: usize, out: &mut [f32]) {
    dots::<x86::Avx2, 2, 4>(a, b, dp, out)
}

#[inline(always)]
fn dots<I: Isa, const MR: usize, const NR: usize>(
    a: &[f32],
    b: &[f32],
    dp: usize,
    out: &mut [f32],
) {
    let (na, nb) = (a.len() / dp, b.len() / dp);
    // A block of `b` stays in L2 while every tile of `a` rows passes over it.
    let block = (BLOCK_BYTES / (dp * 4)).max(NR) / NR * NR;
    for b0 in (0..nb).step_by(block) {
        let b1 = (b0 + block).min(nb);
        let mut i = 0;
        while i < na {
            let mr = MR.min(na - i);
            let mut j = b0;
            while j < b1 {
                let nr = NR.min(b1 - j);
                if mr == MR && nr == NR {
                    // SAFETY: rows i..i+MR of `a` and j..j+NR of `b` hold dp values each.
                    let s = unsafe {
                        tile::<I, f32, MR, NR>(
                            a[i * dp..].as_ptr(),
                            b[j * dp..].as_ptr(),
                            dp,
                            dp,
                            dp,
                            0,
                        )
                    };
                    for (m, row) in s.iter().enumerate() {
                        out[(i + m) * nb + j..(i + m) * nb + j + NR].copy_from_slice(row);
                    }
                } else {
                    for m in 0..mr {
                        for c in 0..nr {
                            // SAFETY: one row of `a` and one of `b`, dp values each.
                            let s = unsafe {
                                tile::<I, f32, 1, 1>(
                                    a[(i + m) * dp..].as_ptr(),
                                    b[(j + c) * dp..].as_ptr(),
                                    dp,
                                    dp,
                                    dp,
                                    0,
                                )
                            };
                            out[(i + m) * nb + j + c] = s[0][0];
                        }
                    }
                }
                j += nr;
            }
            i += mr;
        }
    }
}

// ==== SIMD ====

/// The few vector operations the kernel needs. Implementations are `inline(always)`
/// so they compile into the `target_feature` function that instantiates the kernel.
trait Isa {
    type V: Copy;
    const LANES: usize;
    unsafe fn zero() -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    /// LANES float16 values (bits), widened.
    unsafe fn load_f16(p: *const u16) -> Self::V;
    /// `a * b + acc`
    unsafe fn fma(a: Self::V, b: Self::V, acc: Self::V) -> Self::V;
    unsafe fn sum(v: Self::V) -> f32;
    /// Hint that the cache line at `p` will be read soon.
    unsafe fn prefetch(p: *const i8);
    /// float16 bits to f32, exactly.
    unsafe fn widen(src: &[u16], dst: &mut [f32]);
}

/// Plain Rust for any CPU; LLVM vectorises the 8-lane arrays with the baseline SIMD
/// (SSE2, NEON). Multiply and add are not fused, as the baseline may lack FMA.
struct Portable;

impl Isa for Portable {
    type V = [f32; 8];
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> [f32; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> [f32; 8] {
        p.cast::<[f32; 8]>().read_unaligned()
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> [f32; 8] {
        let bits = p.cast::<[u16; 8]>().read_unaligned();
        bits.map(f16_to_f32)
    }
    #[inline(always)]
    unsafe fn fma(a: [f32; 8], b: [f32; 8], acc: [f32; 8]) -> [f32; 8] {
        let mut out = acc;
        for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
            *o += x * y;
        }
        out
    }
    #[inline(always)]
    unsafe fn prefetch(_: *const i8) {}
    #[inline(always)]
    unsafe fn sum(v: [f32; 8]) -> f32 {
        ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
    }
    #[inline(always)]
    unsafe fn widen(src: &[u16], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f16_to_f32(s);
        }
    }
}

/// IEEE binary16 to binary32 (exact: every f16 value is an f32 value).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match exp {
        0 => {
            // Zero or subnormal: man * 2^-24, exact in f32.
            let magnitude = man as f32 * (1.0 / 16_777_216.0);
            return f32::from_bits(magnitude.to_bits() | sign);
        }
        31 => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{f16_to_f32, Isa};
    use std::arch::x86_64::*;

    pub struct Avx2;

    impl Isa for Avx2 {
        type V = __m256;
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, acc: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, acc)
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const i8) {
            _mm_prefetch::<_MM_HINT_T0>(p)
        }
        #[inline(always)]
        unsafe fn sum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
        #[inline(always)]
        unsafe fn widen(src: &[u16], dst: &mut [f32]) {
            let n = src.len().min(dst.len());
            let mut i = 0;
            while i + 8 <= n {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                i += 8;
            }
            for j in i..n {
                dst[j] = f16_to_f32(src[j]);
            }
        }
    }

    pub struct Avx512;

    impl Isa for Avx512 {
        type V = __m512;
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, acc: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, acc)
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const i8) {
            _mm_prefetch::<_MM_HINT_T0>(p)
        }
        #[inline(always)]
        unsafe fn sum(v: __m512) -> f32 {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            Avx2::sum(_mm256_add_ps(lo, hi))
        }
        #[inline(always)]
        unsafe fn widen(src: &[u16], dst: &mut [f32]) {
            let n = src.len().min(dst.len());
            let mut i = 0;
            while i + 16 <= n {
                let h = _mm256_loadu_si256(src.as_ptr().add(i).cast());
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
                i += 16;
            }
            Avx2::widen(&src[i..n], &mut dst[i..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: f64 dot products are not bit-equal to f32 ones, so the reference
    /// ranks with the kernel's own scores and checks those against f64 separately.
    fn brute(queries: &[f32], rows: &[f32], d: usize, k: usize, skip: &[i64]) -> Vec<Vec<i64>> {
        let n = rows.len() / d;
        queries
            .chunks_exact(d)
            .map(|q| {
                let mut hits: Vec<(f64, i64)> = (0..n)
                    .filter(|&i| !skip.contains(&(i as i64)))
                    .map(|i| {
                        let r = &rows[i * d..(i + 1) * d];
                        let s: f64 = q.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum();
                        (s, i as i64)
                    })
                    .collect();
                hits.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
                hits.into_iter().take(k).map(|h| h.1).collect()
            })
            .collect()
    }

    fn data(n: usize, d: usize, seed: u64) -> Vec<f32> {
        // Integers in [-8, 8): dot products are exact in f32, so rankings are exact.
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n * d)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) % 16) as f32 - 8.0
            })
            .collect()
    }

    /// The f16 bits of values from `data` (integers in [-8, 8), all exact in f16).
    fn to_f16(values: &[f32]) -> Vec<u16> {
        let code = |v: f32| (0..0x7c00u16).find(|&h| f16_to_f32(h) == v.abs()).unwrap();
        let table: Vec<u16> = (-8..8)
            .map(|v| code(v as f32) | if v < 0 { 0x8000 } else { 0 })
            .collect();
        values.iter().map(|&v| table[(v + 8.0) as usize]).collect()
    }

    #[test]
    fn matches_brute_force_for_odd_dimensions_and_batches() {
        for &d in &[1, 7, 16, 33, 100] {
            for &q in &[1, 2, 5, 9] {
                let rows = data(700, d, d as u64);
                let queries = data(q, d, 99);
                let db = Database::new(Rows::F32(&rows), d).unwrap();
                let got = search(&queries, &db, 5, &Exclude::NOTHING, 2).unwrap();
                let want = brute(&queries, &rows, d, 5, &[]);
                for (qi, w) in want.iter().enumerate() {
                    assert_eq!(
                        &got.ids[qi * 5..qi * 5 + 5],
                        &w[..],
                        "d={d} q={q} qi={qi} {:?}",
                        &queries
                    );
                }
            }
        }
    }

    #[test]
    fn streamed_and_blocked_scans_give_identical_scores() {
        // Random-ish non-integer data, so any difference in arithmetic would show.
        for &d in &[7, 33, 64] {
            let rows: Vec<f32> = data(900, d, 11).iter().map(|v| v * 0.37 + 0.011).collect();
            let bits = to_f16(&data(900, d, 11));
            let queries: Vec<f32> = data(STREAM_MAX_QUERIES + 13, d, 12)
                .iter()
                .map(|v| v * 0.29)
                .collect();
            for db in [Rows::F32(&rows), Rows::F16Bits(&bits)] {
                let db = Database::new(db, d).unwrap();
                let blocked = search(&queries, &db, 9, &Exclude::NOTHING, 2).unwrap();
                let streamed = search(&queries[..5 * d], &db, 9, &Exclude::NOTHING, 1).unwrap();
                assert_eq!(&blocked.ids[..45], &streamed.ids[..]);
                let a: Vec<u32> = blocked.scores[..45].iter().map(|s| s.to_bits()).collect();
                let b: Vec<u32> = streamed.scores.iter().map(|s| s.to_bits()).collect();
                assert_eq!(a, b, "d={d}");
            }
        }
    }

    #[test]
    fn float16_rows_give_the_float32_results() {
        let d = 33;
        let rows = data(500, d, 3);
        let bits = to_f16(&rows);
        let queries = data(4, d, 4);
        let a = search(
            &queries,
            &Database::new(Rows::F32(&rows), d).unwrap(),
            7,
            &Exclude::NOTHING,
            1,
        )
        .unwrap();
        let b = search(
            &queries,
            &Database::new(Rows::F16Bits(&bits), d).unwrap(),
            7,
            &Exclude::NOTHING,
            1,
        )
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn k_beyond_the_rows_is_padded() {
        let rows = data(3, 4, 1);
        let db = Database::new(Rows::F32(&rows), 4).unwrap();
        let got = search(&[1.0, 0.0, 0.0, 0.0], &db, 5, &Exclude::NOTHING, 1).unwrap();
        assert_eq!(&got.ids[3..], &[-1, -1]);
        assert!(got.scores[3..].iter().all(|s| *s == f32::NEG_INFINITY));
    }

    #[test]
    fn exclusions_apply_inside_the_scan() {
        let d = 8;
        let rows = data(300, d, 5);
        let queries = data(2, d, 6);
        let db = Database::new(Rows::F32(&rows), d).unwrap();
        let first = search(&queries, &db, 3, &Exclude::NOTHING, 1).unwrap();
        let skip = vec![first.ids[0], first.ids[1]];
        let got = search(&queries, &db, 3, &Exclude::global(skip.clone()), 1).unwrap();
        let want = brute(&queries, &rows, d, 3, &skip);
        assert_eq!(&got.ids[..3], &want[0][..]);
        let per = Exclude::per_query(vec![vec![], (0..300).collect()]);
        let got = search(&queries, &db, 3, &per, 1).unwrap();
        assert_eq!(&got.ids[..3], &first.ids[..3]);
        assert_eq!(&got.ids[3..], &[-1, -1, -1]);
    }

    #[test]
    fn global_and_per_query_exclusions_together_equal_their_union_per_query() {
        let d = 8;
        let n = 400;
        let rows = data(n, d, 11);
        let queries = data(3, d, 12);
        let db = Database::new(Rows::F32(&rows), d).unwrap();
        // unsorted with a repeat: copied and sorted; sorted: borrowed as is
        let unsorted: Vec<i64> = (0..n as i64)
            .rev()
            .filter(|r| r % 3 == 0)
            .chain([3])
            .collect();
        let sorted: Vec<i64> = (0..n as i64).filter(|r| r % 3 == 0).collect();
        let lists: Vec<Vec<i64>> = vec![
            vec![],
            (0..n as i64).filter(|r| r % 2 == 0).collect(),
            (0..n as i64).collect(),
        ];
        let union: Vec<Vec<i64>> = lists
            .iter()
            .map(|l| sorted.iter().chain(l).copied().collect())
            .collect();
        let want = search(&queries, &db, n, &Exclude::per_query(union), 2).unwrap();
        for global in [&unsorted, &sorted] {
            let both = Exclude::global_borrowed(global).with_per_query(lists.clone());
            for threads in [1, 3] {
                let got = search(&queries, &db, n, &both, threads).unwrap();
                assert_eq!(got, want);
            }
        }
        // the last query has nothing left: all padding
        assert!(want.ids[2 * n..].iter().all(|&id| id == -1));
        let short = Exclude::global_borrowed(&sorted).with_per_query(vec![vec![]]);
        assert!(search(&queries, &db, 3, &short, 1).is_err());
    }

    #[test]
    fn ties_rank_lower_ids_first_whatever_the_threads() {
        let d = 5;
        let one = data(1, d, 7);
        let rows: Vec<f32> = one.iter().copied().cycle().take(2000 * d).collect();
        let db = Database::new(Rows::F32(&rows), d).unwrap();
        for threads in [1, 2, 3] {
            let got = search(&one, &db, 4, &Exclude::NOTHING, threads).unwrap();
            assert_eq!(got.ids, vec![0, 1, 2, 3]);
        }
    }

    #[test]
    fn merge_of_parts_equals_the_whole() {
        let d = 12;
        let rows = data(1000, d, 8);
        let queries = data(3, d, 9);
        let whole = search(
            &queries,
            &Database::new(Rows::F32(&rows), d).unwrap(),
            6,
            &Exclude::NOTHING,
            2,
        )
        .unwrap();
        let (a, b) = rows.split_at(400 * d);
        let pa = search(
            &queries,
            &Database::new(Rows::F32(a), d).unwrap(),
            6,
            &Exclude::NOTHING,
            1,
        )
        .unwrap();
        let pb = search(
            &queries,
            &Database::new(Rows::F32(b), d).unwrap(),
            6,
            &Exclude::NOTHING,
            1,
        )
        .unwrap();
        let (mut scores, mut ids) = (Vec::new(), Vec::new());
        for qi in 0..3 {
            scores.extend_from_slice(&pa.scores[qi * 6..qi * 6 + 6]);
            scores.extend_from_slice(&pb.scores[qi * 6..qi * 6 + 6]);
            ids.extend_from_slice(&pa.ids[qi * 6..qi * 6 + 6]);
            ids.extend(pb.ids[qi * 6..qi * 6 + 6].iter().map(|i| i + 400));
        }
        assert_eq!(merge(&scores, &ids, 3, 12, 6).unwrap(), whole);
    }

    #[test]
    fn parts_searched_together_equal_the_concatenation() {
        let d = 9;
        let rows = data(1500, d, 21);
        let bits = to_f16(&rows);
        let queries = data(STREAM_MAX_QUERIES + 5, d, 22);
        let whole = Database::new(Rows::F32(&rows), d).unwrap();
        // uneven parts, an empty one, float16 and float32 mixed
        let cuts = [0, 300, 300, 301, 1100, 1500];
        let parts: Vec<Database<'_>> = cuts
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let r = if i % 2 == 0 {
                    Rows::F32(&rows[w[0] * d..w[1] * d])
                } else {
                    Rows::F16Bits(&bits[w[0] * d..w[1] * d])
                };
                Database::new(r, d).unwrap()
            })
            .collect();
        let skip: Vec<i64> = vec![0, 299, 300, 301, 1099, 1100, 1499];
        for exclude in [Exclude::NOTHING, Exclude::global(skip.clone())] {
            for threads in [1, 2, 3] {
                for q in [3, queries.len() / d] {
                    let qs = &queries[..q * d];
                    let want = search(qs, &whole, 8, &exclude, 1).unwrap();
                    let got = search_parts(qs, &parts, 8, &exclude, threads).unwrap();
                    assert_eq!(got, want, "threads={threads} q={q}");
                }
            }
        }
        assert!(search_parts(&queries, &[], 3, &Exclude::NOTHING, 1).is_err());
        let other = Database::new(Rows::F32(&rows[..8 * 10]), 8).unwrap();
        assert!(search_parts(&queries[..d], &[whole, other], 3, &Exclude::NOTHING, 1).is_err());
    }

    #[test]
    fn counts_above_thresholds_equal_brute_force_counts() {
        let d = 11;
        let rows = data(900, d, 31);
        let queries = data(5, d, 32);
        let (a, b) = rows.split_at(350 * d);
        let parts = [
            Database::new(Rows::F32(a), d).unwrap(),
            Database::new(Rows::F32(b), d).unwrap(),
        ];
        // integer data: scores are exact, and thresholds equal to scores test ">"
        let thresholds: Vec<f32> = (0..5).map(|i| (i as f32 - 2.0) * 7.0).collect();
        let skip = vec![3i64, 400, 899];
        let got = count_above(
            &queries,
            &parts,
            &thresholds,
            &Exclude::global(skip.clone()),
            2,
        );
        let want: Vec<u64> = queries
            .chunks_exact(d)
            .zip(&thresholds)
            .map(|(q, &t)| {
                (0..900)
                    .filter(|i| !skip.contains(&(*i as i64)))
                    .filter(|&i| {
                        let r = &rows[i * d..(i + 1) * d];
                        q.iter().zip(r).map(|(x, y)| x * y).sum::<f32>() > t
                    })
                    .count() as u64
            })
            .collect();
        assert_eq!(got.unwrap(), want);
        assert_eq!(next_up(-0.0), f32::from_bits(1));
        assert!(next_up(1.0) > 1.0 && next_up(-1.0) > -1.0);
    }

    #[test]
    fn f16_conversion_covers_special_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7c00), f32::INFINITY);
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn bad_arguments_are_errors() {
        let rows = [0f32; 6];
        assert!(Database::new(Rows::F32(&rows), 4).is_err());
        assert!(Database::new(Rows::F32(&rows), 0).is_err());
        let db = Database::new(Rows::F32(&rows), 3).unwrap();
        assert!(search(&[0.0; 3], &db, 0, &Exclude::NOTHING, 1).is_err());
        assert!(search(&[0.0; 4], &db, 1, &Exclude::NOTHING, 1).is_err());
        assert!(search(&[0.0; 3], &db, 1, &Exclude::per_query(vec![]), 1).is_err());
    }
}
