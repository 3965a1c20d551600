//! Near-duplicate pairs over a whole DB: cluster the rows, then compare exactly inside
//! each cluster (SemDeDup's plan), so the cost is about n x clusters + n^2 / clusters
//! dot products instead of n^2.
//!
//! - [`nearest_centroids`]: every row goes to its nearest centroid and to every other
//!   centroid scoring within `margin` of the nearest (at most `r` in all), so a pair
//!   sitting on the border between two clusters still shares one of them.
//! - [`pairs_in_clusters`]: inside each cluster, every member marked new is compared
//!   with every other member (new rows among themselves and with the old ones; two
//!   old rows were compared by an earlier run), in blocks with the exact scan's kernel
//!   (`topk::dot_block`, float32 arithmetic on float16 rows widened exactly). A pair
//!   found in several clusters is reported once, by the lowest cluster both rows
//!   belong to, so the output needs no global de-duplication.
//! - [`components`]: connected components of the pairs (union-find), the groups.
//!
//! Rows are numbered globally across the parts, in order (part 0's rows first).

use rayon::prelude::*;

use crate::cpu;
use crate::topk::{dot_block, Database, ROW_PAD};

/// No cluster (padding of an assignment row; in column 0: the row is not assigned).
pub const NO_CLUSTER: i32 = -1;
/// Rows widened and scored against the centroids per task.
const ASSIGN_CHUNK: usize = 256;
/// Scores one compare block may hold (rows of the block x members of the cluster).
const BLOCK_SCORES: usize = 1 << 20;

/// Several parts seen as one table of rows with global numbers.
struct Table<'a> {
    parts: &'a [Database<'a>],
    /// starts[i] = global number of part i's first row; last = total.
    starts: Vec<usize>,
    d: usize,
}

impl<'a> Table<'a> {
    fn new(parts: &'a [Database<'a>]) -> Result<Self, String> {
        let Some(first) = parts.first() else {
            return Err("no rows: the DB has no parts".into());
        };
        let d = first.dim();
        let mut starts = vec![0usize];
        for (i, p) in parts.iter().enumerate() {
            if p.dim() != d {
                return Err(format!("part {i} has dimension {}, part 0 {d}", p.dim()));
            }
            starts.push(starts[i] + p.len());
        }
        Ok(Self { parts, starts, d })
    }

    fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    fn dp(&self) -> usize {
        self.d.div_ceil(ROW_PAD) * ROW_PAD
    }

    /// Global row `row` as f32 in `dst` (dp values, zero-padded).
    fn widen(&self, row: usize, dst: &mut [f32]) {
        let part = self.starts.partition_point(|&s| s <= row) - 1;
        self.parts[part].widen_row(row - self.starts[part], dst);
        dst[self.d..].fill(0.0);
    }
}

/// NaN ranks below every number.
fn key(score: f32) -> f32 {
    if score.is_nan() {
        f32::NEG_INFINITY
    } else {
        score
    }
}

/// Centroids (`c` x d, row-major) padded to `dp`.
fn padded(centroids: &[f32], d: usize, dp: usize) -> Result<Vec<f32>, String> {
    if !centroids.len().is_multiple_of(d) || centroids.is_empty() {
        return Err(format!(
            "{} centroid values do not make whole rows of dimension {d}",
            centroids.len()
        ));
    }
    let mut out = vec![0f32; centroids.len() / d * dp];
    for (dst, src) in out.chunks_exact_mut(dp).zip(centroids.chunks_exact(d)) {
        dst[..d].copy_from_slice(src);
    }
    Ok(out)
}

/// For every row of `parts` (global order), the clusters it joins: its nearest
/// centroid and each other one scoring at least `best - margin`, best first, at most
/// `r`; `n x r` cluster numbers padded with [`NO_CLUSTER`]. Ties go to the lower
/// centroid number.
pub fn nearest_centroids(
    parts: &[Database<'_>],
    centroids: &[f32],
    r: usize,
    margin: f32,
    threads: usize,
) -> Result<Vec<i32>, String> {
    if r == 0 {
        return Err("a row must join at least one cluster (r >= 1)".into());
    }
    if margin.is_nan() || margin < 0.0 {
        return Err(format!("margin must be >= 0, got {margin}"));
    }
    let table = Table::new(parts)?;
    let (d, dp, n) = (table.d, table.dp(), table.len());
    let cents = padded(centroids, d, dp)?;
    let c = cents.len() / dp;
    if c > i32::MAX as usize {
        return Err(format!("{c} centroids are too many"));
    }
    let mut out = vec![NO_CLUSTER; n * r];
    let pool = cpu::pool(threads)?;
    pool.install(|| {
        out.par_chunks_mut(ASSIGN_CHUNK * r)
            .enumerate()
            .for_each(|(chunk, dst)| {
                let start = chunk * ASSIGN_CHUNK;
                let rows = dst.len() / r;
                let mut buf = vec![0f32; rows * dp];
                for (i, row) in buf.chunks_exact_mut(dp).enumerate() {
                    table.widen(start + i, row);
                }
                let mut scores = vec![0f32; rows * c];
                dot_block(&buf, &cents, dp, &mut scores);
                let mut near: Vec<(f32, i32)> = Vec::new();
                for (row, out_row) in scores.chunks_exact(c).zip(dst.chunks_exact_mut(r)) {
                    let best = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(key(s)));
                    let floor = best - margin;
                    near.clear();
                    near.extend(
                        row.iter()
                            .enumerate()
                            .filter(|(_, &s)| key(s) >= floor)
                            .map(|(i, &s)| (key(s), i as i32)),
                    );
                    if near.is_empty() {
                        near.push((f32::NEG_INFINITY, 0)); // every score NaN: cluster 0
                    }
                    near.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                    for (o, &(_, cl)) in out_row.iter_mut().zip(near.iter().take(r)) {
                        *o = cl;
                    }
                }
            });
    });
    Ok(out)
}

/// Pairs of rows scoring at least the threshold: `a < b` (global rows), their scores.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pairs {
    pub a: Vec<i64>,
    pub b: Vec<i64>,
    pub scores: Vec<f32>,
    /// Dot products computed.
    pub compared: u64,
}

/// Every pair of rows that share a cluster, of which at least one is new, and whose dot
/// product is at least `threshold` (see the module doc). `assigned` is what
/// [`nearest_centroids`] returns (`n x r`), `is_new` one flag per row (non-zero: new).
pub fn pairs_in_clusters(
    parts: &[Database<'_>],
    assigned: &[i32],
    r: usize,
    is_new: &[u8],
    threshold: f32,
    threads: usize,
) -> Result<Pairs, String> {
    let table = Table::new(parts)?;
    let n = table.len();
    if r == 0 || assigned.len() != n * r {
        return Err(format!(
            "the assignment holds {} values for {n} rows x {r} clusters",
            assigned.len()
        ));
    }
    if is_new.len() != n {
        return Err(format!("{} new-row flags for {n} rows", is_new.len()));
    }
    if threshold.is_nan() {
        return Err("the threshold is NaN".into());
    }
    let mut clusters = 0usize;
    for (row, list) in assigned.chunks_exact(r).enumerate() {
        if list[0] < 0 {
            return Err(format!("row {row} belongs to no cluster"));
        }
        for &c in list {
            if c < NO_CLUSTER {
                return Err(format!("row {row}: cluster {c} is not a cluster number"));
            }
            clusters = clusters.max(c as usize + 1);
        }
    }
    let members = members(assigned, r, is_new, clusters);
    let mut work: Vec<usize> = (0..clusters)
        .filter(|&c| members.new[c] > 0 && members.len(c) > 1)
        .collect();
    // Largest first, so the last task to finish is a small one.
    work.sort_unstable_by_key(|&c| std::cmp::Reverse(members.new[c] * members.len(c)));
    let ctx = Context {
        table: &table,
        assigned,
        r,
        threshold,
        members: &members,
    };
    let pool = cpu::pool(threads)?;
    let found = pool.install(|| {
        work.par_iter()
            .fold(Pairs::default, |mut acc, &c| {
                ctx.compare_cluster(c, &mut acc);
                acc
            })
            .reduce(Pairs::default, |mut x, y| {
                x.a.extend(y.a);
                x.b.extend(y.b);
                x.scores.extend(y.scores);
                x.compared += y.compared;
                x
            })
    });
    Ok(found)
}

/// Each cluster's rows, new ones first (CSR layout).
struct Members {
    starts: Vec<usize>,
    rows: Vec<usize>,
    new: Vec<usize>,
}

impl Members {
    fn len(&self, c: usize) -> usize {
        self.starts[c + 1] - self.starts[c]
    }
    fn of(&self, c: usize) -> &[usize] {
        &self.rows[self.starts[c]..self.starts[c + 1]]
    }
}

fn members(assigned: &[i32], r: usize, is_new: &[u8], clusters: usize) -> Members {
    let mut sizes = vec![0usize; clusters];
    let mut new = vec![0usize; clusters];
    for (row, list) in assigned.chunks_exact(r).enumerate() {
        for &c in list.iter().filter(|&&c| c >= 0) {
            sizes[c as usize] += 1;
            if is_new[row] != 0 {
                new[c as usize] += 1;
            }
        }
    }
    let mut starts = vec![0usize; clusters + 1];
    for c in 0..clusters {
        starts[c + 1] = starts[c] + sizes[c];
    }
    // New rows fill each cluster from its start, old ones from after its new ones.
    let mut next_new: Vec<usize> = starts[..clusters].to_vec();
    let mut next_old: Vec<usize> = (0..clusters).map(|c| starts[c] + new[c]).collect();
    let mut rows = vec![0usize; starts[clusters]];
    for (row, list) in assigned.chunks_exact(r).enumerate() {
        for &c in list.iter().filter(|&&c| c >= 0) {
            let next = if is_new[row] != 0 {
                &mut next_new[c as usize]
            } else {
                &mut next_old[c as usize]
            };
            rows[*next] = row;
            *next += 1;
        }
    }
    Members { starts, rows, new }
}

struct Context<'a> {
    table: &'a Table<'a>,
    assigned: &'a [i32],
    r: usize,
    threshold: f32,
    members: &'a Members,
}

impl Context<'_> {
    /// The lowest cluster rows `x` and `y` both belong to.
    fn first_common(&self, x: usize, y: usize) -> i32 {
        let (lx, ly) = (
            &self.assigned[x * self.r..(x + 1) * self.r],
            &self.assigned[y * self.r..(y + 1) * self.r],
        );
        lx.iter()
            .filter(|&&c| c >= 0 && ly.contains(&c))
            .copied()
            .min()
            .unwrap_or(NO_CLUSTER)
    }

    fn compare_cluster(&self, c: usize, out: &mut Pairs) {
        let rows = self.members.of(c);
        let (m, fresh) = (rows.len(), self.members.new[c]);
        let dp = self.table.dp();
        let mut buf = vec![0f32; m * dp];
        for (dst, &row) in buf.chunks_exact_mut(dp).zip(rows) {
            self.table.widen(row, dst);
        }
        let step = (BLOCK_SCORES / m).clamp(4, 256);
        let mut scores = Vec::new();
        let mut s = 0;
        while s < fresh {
            let e = (s + step).min(fresh);
            // Rows s..e against every later member: the new rows after them and all old ones.
            let width = m - s;
            scores.resize((e - s) * width, 0.0);
            dot_block(&buf[s * dp..e * dp], &buf[s * dp..], dp, &mut scores);
            for i in s..e {
                let line = &scores[(i - s) * width..(i - s + 1) * width];
                out.compared += (m - i - 1) as u64;
                for (off, &score) in line.iter().enumerate().skip(i - s + 1) {
                    if score >= self.threshold {
                        let (x, y) = (rows[i], rows[s + off]);
                        if self.first_common(x, y) == c as i32 {
                            out.a.push(x.min(y) as i64);
                            out.b.push(x.max(y) as i64);
                            out.scores.push(score);
                        }
                    }
                }
            }
            s = e;
        }
    }
}

/// Connected components of the graph on nodes `0..n` with edges `a[i] - b[i]`: the
/// label of each node is the smallest node of its component.
pub fn components(a: &[i64], b: &[i64], n: usize) -> Result<Vec<i64>, String> {
    if a.len() != b.len() {
        return Err(format!("{} edge starts for {} edge ends", a.len(), b.len()));
    }
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for (&x, &y) in a.iter().zip(b) {
        let (Ok(x), Ok(y)) = (usize::try_from(x), usize::try_from(y)) else {
            return Err(format!("edge {x} - {y}: node numbers must be >= 0"));
        };
        if x >= n || y >= n {
            return Err(format!("edge {x} - {y}: nodes are numbered 0..{n}"));
        }
        let (rx, ry) = (root(&mut parent, x), root(&mut parent, y));
        // The smaller root wins, so a component's root is its smallest node.
        if rx < ry {
            parent[ry] = rx;
        } else if ry < rx {
            parent[rx] = ry;
        }
    }
    Ok((0..n).map(|x| root(&mut parent, x) as i64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topk::Rows;

    fn unit_rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut out = Vec::with_capacity(n * d);
        for _ in 0..n {
            let row: Vec<f32> = (0..d)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                })
                .collect();
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            out.extend(row.iter().map(|x| x / norm));
        }
        out
    }

    fn brute(rows: &[f32], d: usize, threshold: f32) -> Vec<(i64, i64)> {
        let n = rows.len() / d;
        let mut out = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                let s: f32 = (0..d).map(|k| rows[i * d + k] * rows[j * d + k]).sum();
                if s >= threshold {
                    out.push((i as i64, j as i64));
                }
            }
        }
        out
    }

    fn sorted(p: &Pairs) -> Vec<(i64, i64)> {
        let mut v: Vec<_> = p.a.iter().copied().zip(p.b.iter().copied()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn one_cluster_finds_what_brute_force_finds() {
        let d = 20;
        let mut rows = unit_rows(60, d, 1);
        // plant copies of rows 3 and 10 (slightly moved)
        for (src, dst) in [(3usize, 40usize), (10, 51), (10, 59)] {
            for k in 0..d {
                rows[dst * d + k] = rows[src * d + k] + if k == 0 { 0.01 } else { 0.0 };
            }
        }
        let db = Database::new(Rows::F32(&rows), d).unwrap();
        let parts = [db];
        let assigned = vec![0i32; 60];
        let found = pairs_in_clusters(&parts, &assigned, 1, &[1u8; 60], 0.9, 2).unwrap();
        let want = brute(&rows, d, 0.9);
        assert!(want.contains(&(3, 40)) && want.contains(&(51, 59)));
        // scores near the threshold may differ in the last bit from the f32 brute force
        let got = sorted(&found);
        assert_eq!(got, want);
        assert_eq!(found.compared, 60 * 59 / 2);
    }

    #[test]
    fn old_pairs_are_not_compared_again() {
        let d = 8;
        let mut rows = unit_rows(10, d, 2);
        let copy: Vec<f32> = rows[..d].to_vec();
        rows[5 * d..6 * d].copy_from_slice(&copy);
        rows[9 * d..10 * d].copy_from_slice(&copy);
        let db = Database::new(Rows::F32(&rows), d).unwrap();
        let mut is_new = [0u8; 10];
        is_new[9] = 1;
        let found = pairs_in_clusters(&[db], &[0i32; 10], 1, &is_new, 0.999, 1).unwrap();
        // (0, 5) is old x old: not compared; 9 pairs with both
        assert_eq!(sorted(&found), vec![(0, 9), (5, 9)]);
        assert_eq!(found.compared, 9);
    }

    #[test]
    fn a_pair_in_two_shared_clusters_is_reported_once() {
        let d = 4;
        let rows = [1.0f32, 0.0, 0.0, 0.0].repeat(2);
        let db = Database::new(Rows::F32(&rows), d).unwrap();
        let assigned = [0, 1, 1, 0];
        let found = pairs_in_clusters(&[db], &assigned, 2, &[1, 1], 0.5, 1).unwrap();
        assert_eq!(sorted(&found), vec![(0, 1)]);
    }

    #[test]
    fn nearest_centroids_keeps_those_within_the_margin() {
        let d = 2;
        let rows = [1.0f32, 0.0, 0.6, 0.8];
        let cents = [1.0f32, 0.0, 0.0, 1.0, 0.8, 0.6];
        let db = Database::new(Rows::F32(&rows), d).unwrap();
        let got = nearest_centroids(&[db], &cents, 3, 0.25, 1).unwrap();
        // row 0: 1.0 (c0), 0.8 (c2), 0.0 (c1: out of margin)
        assert_eq!(&got[..3], &[0, 2, NO_CLUSTER]);
        // row 1: 0.96 (c2), 0.8 (c1), 0.6 (c0: out)
        assert_eq!(&got[3..], &[2, 1, NO_CLUSTER]);
        let one = nearest_centroids(&[db], &cents, 1, 0.0, 1).unwrap();
        assert_eq!(one, vec![0, 2]);
    }

    #[test]
    fn components_label_by_smallest_node() {
        let labels = components(&[4, 1, 5], &[2, 2, 6], 7).unwrap();
        assert_eq!(labels, vec![0, 1, 1, 3, 1, 5, 5]);
        assert!(components(&[0], &[9], 3).is_err());
        assert!(components(&[-1], &[0], 3).is_err());
    }

    #[test]
    fn bad_assignments_are_errors_not_panics() {
        let rows = [1.0f32, 0.0];
        let db = Database::new(Rows::F32(&rows), 2).unwrap();
        assert!(pairs_in_clusters(&[db], &[-1], 1, &[1], 0.5, 1).is_err());
        assert!(pairs_in_clusters(&[db], &[0, 0], 1, &[1], 0.5, 1).is_err());
        assert!(pairs_in_clusters(&[db], &[-7], 1, &[1], 0.5, 1).is_err());
        assert!(nearest_centroids(&[db], &[1.0, 0.0, 0.0], 1, 0.0, 1).is_err());
    }
}
