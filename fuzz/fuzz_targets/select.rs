//! The aligner's choice from arbitrary flattened candidate lists.
//! Invariants: malformed arrays are errors, never panics; on well-formed ones every
//! choice is valid (indices in order and in range, at most k, no image twice where
//! the reuse policy forbids it, nor an image the episode has already shown).
#![no_main]

use std::collections::HashSet;

use _core::fuzzing::{select, FlatMoments, Moment, Outcome, Params, Reuse, Shown};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    episodes: Vec<u64>,
    ks: Vec<i64>,
    offsets: Vec<i64>,
    ids: Vec<u8>,
    scores: Vec<f32>,
    vectors: Vec<f32>,
    dim: u8,
    reuse: u8,
    threshold: f32,
    min_score: f32,
    used: Vec<u8>,
    shown_episodes: Vec<u64>,
    shown_ids: Vec<u8>,
    shown_vectors: Vec<f32>,
}

fn params<'a>(input: &Input, dim: usize, shown: Shown<'a>) -> Params<'a> {
    Params {
        dim,
        reuse: [Reuse::Episode, Reuse::Global, Reuse::None][usize::from(input.reuse % 3)],
        threshold: input.threshold,
        min_score: input.min_score,
        used: input.used.iter().map(|&u| u64::from(u)).collect(),
        shown,
    }
}

fn cycle<T: Copy>(values: &[T], n: usize, default: T) -> Vec<T> {
    (0..n)
        .map(|i| {
            values
                .get(i % values.len().max(1))
                .copied()
                .unwrap_or(default)
        })
        .collect()
}

fn check(moments: &[Moment<'_>], params: &Params) {
    let choices = select(moments, params);
    assert_eq!(choices.len(), moments.len());
    let shown = params.shown;
    let mut global: HashSet<u64> = params.used.iter().copied().collect();
    if params.reuse == Reuse::Global {
        global.extend(shown.ids.iter().copied());
    }
    let mut episode: (Option<u64>, HashSet<u64>) = (None, HashSet::new());
    for (m, c) in moments.iter().zip(&choices) {
        if episode.0 != Some(m.episode) {
            let earlier = shown.episodes.iter().zip(shown.ids);
            let here = earlier.filter(|(e, _)| **e == m.episode).map(|(_, id)| *id);
            episode = (Some(m.episode), here.collect());
        }
        assert!(c.picked.len() <= m.k);
        assert!(c.picked.windows(2).all(|w| w[0] < w[1]));
        assert!(c.picked.iter().all(|&i| i < m.ids.len()));
        assert_eq!(c.outcome == Outcome::Chosen, c.picked.len() >= m.k);
        let mut here = HashSet::new();
        for &i in &c.picked {
            let id = m.ids[i];
            assert!(here.insert(id), "image {id} picked twice for one moment");
            match params.reuse {
                Reuse::Episode => assert!(episode.1.insert(id), "image {id} twice in an episode"),
                Reuse::Global => assert!(global.insert(id), "image {id} reused"),
                Reuse::None => {}
            }
        }
    }
}

fuzz_target!(|input: Input| {
    // The arrays as given: mostly inconsistent, which must be an error.
    let dim = usize::from(input.dim);
    let raw_ids: Vec<u64> = input.ids.iter().map(|&i| u64::from(i)).collect();
    let raw_shown_ids: Vec<u64> = input.shown_ids.iter().map(|&i| u64::from(i)).collect();
    let raw_shown = Shown {
        episodes: &input.shown_episodes,
        ids: &raw_shown_ids,
        vectors: &input.shown_vectors,
    };
    // Shown arrays the binding would refuse (`Shown::check`) never reach `select`.
    let raw_shown = if raw_shown.check(dim).is_ok() {
        raw_shown
    } else {
        Shown::default()
    };
    let raw = FlatMoments {
        episodes: &input.episodes,
        ks: &input.ks,
        offsets: &input.offsets,
        ids: &raw_ids,
        scores: &input.scores,
        vectors: &input.vectors,
        dim,
    };
    if let Ok(moments) = raw.moments() {
        check(&moments, &params(&input, dim, raw_shown));
    }

    // The same values made consistent, so the choice itself runs on every input.
    let dim = 1 + dim % 8;
    let n_moments = input.episodes.len().min(32);
    let counts: Vec<usize> = cycle(&input.ids, n_moments, 0)
        .iter()
        .map(|&c| usize::from(c % 9))
        .collect();
    let mut offsets = vec![0i64];
    for c in &counts {
        offsets.push(offsets[offsets.len() - 1] + *c as i64);
    }
    let total = counts.iter().sum::<usize>();
    let ids: Vec<u64> = cycle(&input.ids, total, 0)
        .iter()
        .map(|&i| u64::from(i % 16))
        .collect();
    let ks: Vec<i64> = cycle(&input.ks, n_moments, 1)
        .iter()
        .map(|k| (k.unsigned_abs() % 5) as i64)
        .collect();
    let flat = FlatMoments {
        episodes: &cycle(&input.episodes, n_moments, 0)
            .iter()
            .map(|e| e % 4)
            .collect::<Vec<_>>(),
        ks: &ks,
        offsets: &offsets,
        ids: &ids,
        scores: &cycle(&input.scores, total, 0.5),
        vectors: &cycle(&input.vectors, total * dim, 1.0),
        dim,
    };
    let moments = flat
        .moments()
        .unwrap_or_else(|e| panic!("consistent arrays refused: {e}"));
    let n_shown = input.shown_ids.len().min(16);
    let shown_episodes: Vec<u64> = cycle(&input.shown_episodes, n_shown, 0)
        .iter()
        .map(|e| e % 4)
        .collect();
    let shown_ids: Vec<u64> = cycle(&input.shown_ids, n_shown, 0)
        .iter()
        .map(|&i| u64::from(i % 16))
        .collect();
    let shown_vectors = cycle(&input.shown_vectors, n_shown * dim, 1.0);
    let shown = Shown {
        episodes: &shown_episodes,
        ids: &shown_ids,
        vectors: &shown_vectors,
    };
    assert!(shown.check(dim).is_ok());
    check(&moments, &params(&input, dim, shown));
});
