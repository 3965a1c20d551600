//! Choosing images for image-sharing moments without reuse or near-duplicates.
//!
//! For each moment, in order, candidates (already sorted by score, best first) are
//! taken greedily. A candidate is skipped when
//! - its image is already used (in the episode, or anywhere in the run, by policy),
//! - it is a near duplicate (cosine >= threshold) of a better candidate of the same
//!   moment (clip-retrieval's rule: keep the best of each near-duplicate group),
//! - it is a near duplicate of an image already chosen in the episode (unless reuse
//!   is allowed at all).
//!
//! An episode may start with images it has already shown (a conversation's earlier
//! turns, see [`Shown`]): they count as used in it and as chosen, so neither they nor
//! their near duplicates are chosen again (unless reuse is allowed at all).
//!
//! Scanning stops at the first candidate under `min_score`. Each moment ends `Chosen`
//! (all of its `k` images found), `BelowThreshold` (the next usable candidate scored
//! too low) or `Exhausted` (the candidate list ran out: the caller may fetch more).

use std::collections::{HashMap, HashSet};

/// Which earlier choices make an image unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Not twice in one episode.
    Episode,
    /// Not twice in the whole run.
    Global,
    /// No constraint.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Chosen,
    BelowThreshold,
    Exhausted,
}

/// One moment's candidates: `ids[i]` identifies the image (equal ids = same image),
/// `scores[i]` is non-increasing, `vectors` holds one unit row of `dim` per candidate.
pub struct Moment<'a> {
    pub episode: u64,
    pub k: usize,
    pub ids: &'a [u64],
    pub scores: &'a [f32],
    pub vectors: &'a [f32],
}

pub struct Params<'a> {
    pub dim: usize,
    pub reuse: Reuse,
    pub threshold: f32,
    pub min_score: f32,
    /// Images already used before these moments (counts for `Reuse::Global`).
    pub used: Vec<u64>,
    /// Images episodes have already shown before these moments.
    pub shown: Shown<'a>,
}

/// Images already shown, per episode: image `i` (id `ids[i]`, unit row `i` of `vectors`,
/// `dim` values per row) was shown in episode `episodes[i]`.
#[derive(Default, Clone, Copy)]
pub struct Shown<'a> {
    pub episodes: &'a [u64],
    pub ids: &'a [u64],
    pub vectors: &'a [f32],
}

impl Shown<'_> {
    /// Why the arrays do not describe shown images of dimension `dim`, if they do not.
    pub fn check(&self, dim: usize) -> Result<(), String> {
        let n = self.ids.len();
        if self.episodes.len() != n || n.checked_mul(dim) != Some(self.vectors.len()) {
            return Err(
                "shown_episodes, shown_ids and shown_vectors must have one row per shown image \
                 (of the candidates' dimension)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Positions of the shown images of every episode.
    fn by_episode(&self) -> HashMap<u64, Vec<usize>> {
        let mut out: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, &e) in self.episodes.iter().enumerate() {
            out.entry(e).or_default().push(i);
        }
        out
    }
}

/// Candidate lists as the aligner passes them, flattened: moment `m` (of episode
/// `episodes[m]`, wanting `ks[m]` images) owns candidates `offsets[m]..offsets[m + 1]`
/// of `ids`, `scores` and the rows of `vectors` (`dim` values per row).
pub struct FlatMoments<'a> {
    pub episodes: &'a [u64],
    pub ks: &'a [i64],
    pub offsets: &'a [i64],
    pub ids: &'a [u64],
    pub scores: &'a [f32],
    pub vectors: &'a [f32],
    pub dim: usize,
}

impl<'a> FlatMoments<'a> {
    /// The moments, or why the arrays do not describe any.
    pub fn moments(&self) -> Result<Vec<Moment<'a>>, String> {
        let total = self.ids.len();
        let rows_ok =
            self.scores.len() == total && total.checked_mul(self.dim) == Some(self.vectors.len());
        if !rows_ok {
            return Err("ids, scores and vectors must have one row per candidate".into());
        }
        if self.dim == 0 && total > 0 {
            return Err("vectors must have at least one column".into());
        }
        let n = self.episodes.len();
        if self.offsets.len() != n + 1 || self.ks.len() != n {
            return Err("offsets must have one more entry than episodes and ks".into());
        }
        if self.ks.iter().any(|&k| k < 0) {
            return Err("ks must not be negative".into());
        }
        let in_range = |o: i64| usize::try_from(o).ok().filter(|&o| o <= total);
        let mut moments = Vec::with_capacity(n);
        for (m, pair) in self.offsets.windows(2).enumerate() {
            let (Some(a), Some(b)) = (in_range(pair[0]), in_range(pair[1])) else {
                return Err("offsets must be non-decreasing and within the candidates".into());
            };
            if a > b {
                return Err("offsets must be non-decreasing and within the candidates".into());
            }
            moments.push(Moment {
                episode: self.episodes[m],
                k: self.ks[m] as usize,
                ids: &self.ids[a..b],
                scores: &self.scores[a..b],
                vectors: &self.vectors[a * self.dim..b * self.dim],
            });
        }
        Ok(moments)
    }
}

/// What was chosen for one moment: indices into its candidate list, best first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub picked: Vec<usize>,
    pub outcome: Outcome,
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

/// The same lanes compiled for AVX2 (one 8-wide register instead of two 4-wide ones);
/// the arithmetic per lane is identical, so results do not depend on the CPU.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// Eight independent partial sums, so the compiler can keep them in vector lanes.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for lane in 0..8 {
            acc[lane] += x[lane] * y[lane];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Episode state carried from one moment to the next. Episodes share few images, so
/// a vector scanned linearly beats a hash set; buffers are reused across episodes.
#[derive(Default)]
struct Episode {
    id: Option<u64>,
    used: Vec<u64>,
    chosen: Vec<f32>,
}

/// Choose images for `moments`, in order. Moments of one episode must be adjacent.
pub fn select(moments: &[Moment<'_>], params: &Params<'_>) -> Vec<Choice> {
    let d = params.dim;
    let mut episode = Episode::default();
    let mut used_globally: HashSet<u64> = params.used.iter().copied().collect();
    let shown = params.shown;
    // Slices of equal length by `Shown::check`; `get` keeps a bad caller from panicking.
    let shown_row = |i: usize| shown.vectors.get(i * d..(i + 1) * d).unwrap_or(&[]);
    if params.reuse == Reuse::Global {
        used_globally.extend(shown.ids.iter().copied());
    }
    let shown_of = shown.by_episode();
    let mut out = Vec::with_capacity(moments.len());
    for m in moments {
        if episode.id != Some(m.episode) {
            episode.id = Some(m.episode);
            episode.used.clear();
            episode.chosen.clear();
            for &i in shown_of.get(&m.episode).map_or(&[][..], Vec::as_slice) {
                episode.used.push(shown.ids[i]);
                episode.chosen.extend_from_slice(shown_row(i));
            }
        }
        let n = m
            .ids
            .len()
            .min(m.scores.len())
            .min(m.vectors.len() / d.max(1));
        let row = |i: usize| &m.vectors[i * d..(i + 1) * d];
        let mut picked = Vec::new();
        let mut outcome = Outcome::Exhausted;
        for i in 0..n {
            if picked.len() >= m.k {
                outcome = Outcome::Chosen;
                break;
            }
            if m.scores[i] < params.min_score {
                outcome = Outcome::BelowThreshold;
                break;
            }
            let id = m.ids[i];
            let used = match params.reuse {
                Reuse::Episode => episode.used.contains(&id),
                Reuse::Global => used_globally.contains(&id),
                Reuse::None => false,
            };
            if used || picked.iter().any(|&p| m.ids[p] == id) {
                continue;
            }
            let v = row(i);
            // With reuse allowed, showing an image again is fine, and so is a near copy.
            let repeats = params.reuse != Reuse::None
                && episode
                    .chosen
                    .chunks_exact(d.max(1))
                    .any(|c| dot(c, v) >= params.threshold);
            if repeats || (0..i).any(|j| dot(row(j), v) >= params.threshold) {
                continue;
            }
            picked.push(i);
            episode.used.push(id);
            if params.reuse == Reuse::Global {
                used_globally.insert(id);
            }
            episode.chosen.extend_from_slice(v);
        }
        if picked.len() >= m.k {
            outcome = Outcome::Chosen;
        }
        out.push(Choice { picked, outcome });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(reuse: Reuse) -> Params<'static> {
        Params {
            dim: 2,
            reuse,
            threshold: 0.94,
            min_score: 0.2,
            used: Vec::new(),
            shown: Shown::default(),
        }
    }

    #[test]
    fn images_an_episode_has_shown_and_their_near_duplicates_are_not_chosen() {
        // candidate 0 was shown in episode 1, candidate 1 is a near copy of another
        // image episode 1 showed; episode 2 showed nothing
        let v = [1.0, 0.0, 0.0, 1.0, 0.6, 0.8];
        let m = |episode| Moment {
            episode,
            k: 1,
            ids: &[7, 8, 9],
            scores: &[0.9, 0.8, 0.7],
            vectors: &v,
        };
        let shown_vectors = [1.0, 0.0, 0.0, 0.999];
        let shown = Shown {
            episodes: &[1, 1],
            ids: &[7, 100],
            vectors: &shown_vectors,
        };
        for (reuse, want) in [
            (Reuse::Episode, vec![vec![2], vec![0]]),
            (Reuse::Global, vec![vec![2], vec![1]]),
            (Reuse::None, vec![vec![0], vec![0]]),
        ] {
            let p = Params {
                shown,
                ..params(reuse)
            };
            let got = select(&[m(1), m(2)], &p);
            let picks: Vec<_> = got.iter().map(|c| c.picked.clone()).collect();
            assert_eq!(picks, want, "{reuse:?}");
        }
        assert!(shown.check(2).is_ok());
        let short = Shown { ids: &[7], ..shown };
        assert!(short
            .check(2)
            .unwrap_err()
            .contains("one row per shown image"));
        assert!(shown.check(3).is_err());
    }

    #[test]
    fn no_reuse_within_an_episode_but_across_episodes() {
        let v = [1.0, 0.0, 0.0, 1.0];
        let m = |episode| Moment {
            episode,
            k: 1,
            ids: &[7, 8],
            scores: &[0.9, 0.8],
            vectors: &v,
        };
        let got = select(&[m(1), m(1), m(1), m(2)], &params(Reuse::Episode));
        let picks: Vec<_> = got.iter().map(|c| c.picked.clone()).collect();
        assert_eq!(picks, vec![vec![0], vec![1], vec![], vec![0]]);
        assert_eq!(got[2].outcome, Outcome::Exhausted);
        let global = select(&[m(1), m(2), m(3)], &params(Reuse::Global));
        assert_eq!(global[2].picked, Vec::<usize>::new());
    }

    #[test]
    fn near_duplicates_of_better_candidates_and_chosen_images_are_skipped() {
        // candidate 1 is a near duplicate of candidate 0; candidate 2 is distinct
        let v = [1.0, 0.0, 0.999, 0.0447, 0.0, 1.0];
        let m = Moment {
            episode: 1,
            k: 2,
            ids: &[1, 2, 3],
            scores: &[0.9, 0.85, 0.5],
            vectors: &v,
        };
        let got = select(&[m], &params(Reuse::Episode));
        assert_eq!(got[0].picked, vec![0, 2]);
        assert_eq!(got[0].outcome, Outcome::Chosen);
    }

    #[test]
    fn flat_arrays_that_describe_no_moments_are_errors() {
        let (ids, scores, vectors) = ([1u64, 2], [0.9f32, 0.8], [1.0f32, 0.0, 0.0, 1.0]);
        let flat =
            |offsets: &'static [i64], ks: &'static [i64], dim: usize, rows: usize| FlatMoments {
                episodes: &[0],
                ks,
                offsets,
                ids: &ids,
                scores: &scores,
                vectors: &vectors[..rows * dim],
                dim,
            };
        let good = flat(&[0, 2], &[1], 2, 2).moments().unwrap();
        assert_eq!((good.len(), good[0].ids.len(), good[0].k), (1, 2, 1));
        for (offsets, ks, dim, rows, why) in [
            // a negative offset used to be read as 0, silently
            (&[-1i64, 2][..], &[1i64][..], 2, 2, "offsets"),
            (&[0, 3], &[1], 2, 2, "offsets"),
            (&[2, 1], &[1], 2, 2, "offsets"),
            (&[0, 2, 2], &[1], 2, 2, "offsets"),
            // a negative k used to be read as 0
            (&[0, 2], &[-1], 2, 2, "ks"),
            (&[0, 2], &[1], 2, 1, "one row per candidate"),
            // no columns: every candidate used to be skipped as if the list were empty
            (&[0, 2], &[1], 0, 2, "at least one column"),
        ] {
            let err = flat(offsets, ks, dim, rows).moments().err();
            assert!(
                err.as_deref().is_some_and(|e| e.contains(why)),
                "{offsets:?} {ks:?}: {err:?}"
            );
        }
    }

    #[test]
    fn below_threshold_stops_the_scan() {
        let v = [1.0, 0.0, 0.0, 1.0];
        let m = Moment {
            episode: 1,
            k: 1,
            ids: &[1, 2],
            scores: &[0.1, 0.05],
            vectors: &v,
        };
        let got = select(&[m], &params(Reuse::None));
        assert!(got[0].picked.is_empty());
        assert_eq!(got[0].outcome, Outcome::BelowThreshold);
    }
}
