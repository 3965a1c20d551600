//! Shards straight to preprocessed batches, on background threads.
//!
//! A feeder thread pulls samples from the shard reader (itself prefetching on its own
//! thread), cuts them into batches, preprocesses each batch on the worker pool and
//! hands finished batches over a bounded channel. While the caller consumes batch
//! N (typically: a GPU forward pass), batches N+1.. are being decoded. Image bytes
//! never cross into Python, except for the rare samples that need Pillow.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::{self, JoinHandle};

use crate::preprocess::{self, BatchPixels, Options, Output, Status};
use crate::shards::{Sample, ShardIssue, ShardItem, ShardReader};

/// A sample that needs Pillow: its metadata, bytes, and the format that sent it there.
pub struct Fallback {
    pub sample: Sample,
    pub format: String,
}

/// One batch: `samples[i]` (image bytes dropped) describes pixel plane `i`.
pub struct Batch {
    pub pixels: BatchPixels,
    pub samples: Vec<Sample>,
    pub failures: Vec<ShardIssue>,
    pub fallbacks: Vec<Fallback>,
}

#[derive(Clone)]
pub struct BatchOptions {
    pub preprocess: Options,
    pub output: Output,
    pub batch_size: usize,
    /// Never mix samples of two shards in one batch.
    pub per_shard: bool,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    pub threads: usize,
}

/// Iterator over finished batches; dropping it stops the background threads.
pub struct Batches {
    rx: Option<Receiver<Result<Batch, String>>>,
    feeder: Option<JoinHandle<()>>,
}

impl Batches {
    pub fn start(reader: ShardReader, opts: BatchOptions) -> std::io::Result<Batches> {
        let items = reader.prefetch(opts.batch_size.clamp(64, 4096))?;
        let (tx, rx) = sync_channel(opts.prefetch.max(1));
        let feeder = thread::Builder::new()
            .name("starkret-batches".into())
            .spawn(move || {
                let mut pending: Vec<Sample> = Vec::new();
                let mut issues: Vec<ShardIssue> = Vec::new();
                for item in items {
                    let sample = match item {
                        ShardItem::Sample(s) => s,
                        ShardItem::Issue(i) => {
                            issues.push(i);
                            continue;
                        }
                    };
                    let new_shard = pending.last().is_some_and(|p| p.shard != sample.shard);
                    if opts.per_shard && new_shard {
                        let batch = run(std::mem::take(&mut pending), &mut issues, &opts);
                        if tx.send(batch).is_err() {
                            return; // the consumer is gone
                        }
                    }
                    pending.push(sample);
                    if pending.len() >= opts.batch_size {
                        let batch = run(std::mem::take(&mut pending), &mut issues, &opts);
                        if tx.send(batch).is_err() {
                            return;
                        }
                    }
                }
                if !pending.is_empty() || !issues.is_empty() {
                    let _ = tx.send(run(pending, &mut issues, &opts));
                }
            })?;
        Ok(Batches {
            rx: Some(rx),
            feeder: Some(feeder),
        })
    }
}

impl Iterator for Batches {
    type Item = Result<Batch, String>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        // Closing the channel makes the feeder's next send fail, so it stops.
        self.rx.take();
        if let Some(feeder) = self.feeder.take() {
            let _ = feeder.join();
        }
    }
}

fn run(
    samples: Vec<Sample>,
    issues: &mut Vec<ShardIssue>,
    opts: &BatchOptions,
) -> Result<Batch, String> {
    let inputs: Vec<&[u8]> = samples.iter().map(|s| s.image.as_slice()).collect();
    let (pixels, statuses) =
        preprocess::batch_as(&inputs, &opts.preprocess, opts.threads, &opts.output)?;
    drop(inputs);
    let mut kept = Vec::new();
    let mut failures = std::mem::take(issues);
    let mut fallbacks = Vec::new();
    for (mut sample, status) in samples.into_iter().zip(statuses) {
        match status {
            Status::Ok => {
                sample.image = Vec::new();
                kept.push(sample);
            }
            Status::Failed(reason) => failures.push(ShardIssue {
                shard: sample.shard,
                key: Some(sample.key),
                reason,
            }),
            Status::Fallback(format) => fallbacks.push(Fallback { sample, format }),
        }
    }
    Ok(Batch {
        pixels,
        samples: kept,
        failures,
        fallbacks,
    })
}
