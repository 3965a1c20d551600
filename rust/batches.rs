//! Shards straight to preprocessed batches, on background threads.
//!
//! A feeder thread pulls samples from the shard reader (itself prefetching on its own
//! thread), cuts them into batches, preprocesses each batch on the worker pool and
//! hands finished batches over a bounded channel. While the caller consumes batch
//! N (typically: a GPU forward pass), batches N+1.. are being decoded. Image bytes
//! never cross into Python, except for the rare samples that need Pillow.
//!
//! A panic on either thread (a bug) is an `Err` item naming the shard, never
//! the end of the stream: a consumer that takes the end for "all data read"
//! (the embed pipeline marks its part done) must not be fooled.

use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::{self, JoinHandle};

use std::sync::Arc;

use crate::preprocess::{Options, Output, PixelPool, Pooled, Status};
use crate::shards::ShardReader;
use crate::shards::{debug_panic_key, panic_message, Prefetched, Sample, ShardIssue, ShardItem};

/// A sample that needs Pillow: its metadata, bytes, and the format that sent it there.
pub struct Fallback {
    pub sample: Sample,
    pub format: String,
}

/// One batch: `samples[i]` (image bytes dropped) describes pixel plane `i`. Its pixels
/// buffer goes back to the stream's pool when the last holder drops it.
pub struct Batch {
    pub pixels: Pooled,
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
///
/// An `Err` item ends the iteration: the data after it is unknown.
pub struct Batches {
    rx: Option<Receiver<Result<Batch, String>>>,
    feeder: Option<JoinHandle<()>>,
}

impl Batches {
    pub fn start(reader: ShardReader, opts: BatchOptions) -> std::io::Result<Batches> {
        Self::spawn(reader, opts, debug_panic_key("batch-feeder"))
    }

    /// `panic_at`: a test hook, the feeder panics on reaching that sample key.
    fn spawn(
        reader: ShardReader,
        opts: BatchOptions,
        panic_at: Option<String>,
    ) -> std::io::Result<Batches> {
        let items = reader.prefetch(opts.batch_size.clamp(64, 4096))?;
        let (tx, rx) = sync_channel(opts.prefetch.max(1));
        // Batches alive at once: those in the channel, the one being filled, and
        // what the consumer holds (the embed stream queues a few more); returned
        // buffers beyond this are freed.
        let pool = PixelPool::new(opts.prefetch.max(1) + POOL_SLACK);
        let feeder = thread::Builder::new()
            .name("starkret-batches".into())
            .spawn(move || {
                let mut feeder = Feeder {
                    tx,
                    opts,
                    pending: Vec::new(),
                    issues: Vec::new(),
                    shard: None,
                    panic_at,
                    pool,
                };
                let fed = panic::catch_unwind(AssertUnwindSafe(|| feeder.feed(items)));
                if let Err(payload) = fed {
                    let at = feeder
                        .shard
                        .as_ref()
                        .map(|shard| format!(" while reading '{shard}'"))
                        .unwrap_or_default();
                    let message = panic_message(payload.as_ref());
                    let _ = feeder
                        .tx
                        .send(Err(format!("batch feeder thread panicked{at}: {message}")));
                }
            })?;
        Ok(Batches {
            rx: Some(rx),
            feeder: Some(feeder),
        })
    }
}

/// The feeder thread's state.
struct Feeder {
    tx: SyncSender<Result<Batch, String>>,
    opts: BatchOptions,
    pending: Vec<Sample>,
    issues: Vec<ShardIssue>,
    /// The shard of the latest sample, to name it if something goes wrong.
    shard: Option<String>,
    panic_at: Option<String>,
    pool: Arc<PixelPool>,
}

/// Free output buffers a stream keeps beyond its prefetch depth: enough for the batch
/// being filled and the ones a consumer typically holds (the embed stream's queue and
/// submissions in flight).
const POOL_SLACK: usize = 4;

impl Feeder {
    /// Batches every item; returns early when the consumer is gone or the
    /// reader failed (after sending the error).
    fn feed(&mut self, items: Prefetched) {
        for item in items {
            let sample = match item {
                Ok(ShardItem::Sample(sample)) => sample,
                Ok(ShardItem::Issue(issue)) => {
                    self.issues.push(issue);
                    continue;
                }
                Err(failed) => {
                    let _ = self.tx.send(Err(failed.to_string()));
                    return;
                }
            };
            if self.shard.as_deref() != Some(sample.shard.as_str()) {
                self.shard = Some(sample.shard.clone());
            }
            if let Some(key) = &self.panic_at {
                assert!(
                    sample.key != *key,
                    "debug panic at key '{key}' (STARKRET_DEBUG_PANIC)"
                );
            }
            let new_shard = self.pending.last().is_some_and(|p| p.shard != sample.shard);
            if self.opts.per_shard && new_shard && !self.send_pending() {
                return; // the consumer is gone
            }
            self.pending.push(sample);
            if self.pending.len() >= self.opts.batch_size && !self.send_pending() {
                return;
            }
        }
        if !self.pending.is_empty() || !self.issues.is_empty() {
            self.send_pending();
        }
    }

    /// Preprocesses and sends the pending samples; false when the consumer is gone.
    fn send_pending(&mut self) -> bool {
        let batch = run(
            std::mem::take(&mut self.pending),
            &mut self.issues,
            &self.opts,
            &self.pool,
        );
        self.tx.send(batch).is_ok()
    }
}

impl Iterator for Batches {
    type Item = Result<Batch, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Ok(item) = self.rx.as_ref()?.recv() {
            return Some(item);
        }
        // The feeder is done. Its panics are caught and sent, but should one
        // escape, it must not look like the end of the data either.
        self.rx = None;
        let payload = self.feeder.take()?.join().err()?;
        Some(Err(format!(
            "batch feeder thread panicked: {}",
            panic_message(payload.as_ref())
        )))
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
    pool: &Arc<PixelPool>,
) -> Result<Batch, String> {
    let inputs: Vec<&[u8]> = samples.iter().map(|s| s.image.as_slice()).collect();
    let plane = 3 * opts.preprocess.size * opts.preprocess.size;
    let mut pixels = pool.take(&opts.output, inputs.len() * plane);
    let statuses = pixels.fill(&inputs, &opts.preprocess, opts.threads, &opts.output)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::{BatchPixels, Mode};
    use crate::shards::tests::tar_of;
    use crate::shards::ReaderOptions;
    use std::path::PathBuf;

    /// One shard of `n` samples (1x1 PNGs) in a fresh folder; returns its path.
    fn shard(name: &str, n: usize) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("starkret-batches-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut png = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut png, 1, 1);
            encoder.set_color(png::ColorType::Rgb);
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&[200, 10, 10]).unwrap();
        }
        let names: Vec<String> = (0..n).map(|i| format!("{i:04}.png")).collect();
        let members: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &png[..])).collect();
        let path = dir.join("s.tar");
        std::fs::write(&path, tar_of(&members)).unwrap();
        path
    }

    fn options() -> BatchOptions {
        BatchOptions {
            preprocess: Options {
                size: 4,
                mode: Mode::Exact,
                max_pixels: 1 << 20,
            },
            output: Output::U8,
            batch_size: 2,
            per_shard: true,
            prefetch: 1,
            threads: 1,
        }
    }

    /// Keys of the batches until the end or the first error.
    fn drain(batches: Batches) -> (Vec<String>, Option<String>) {
        let mut keys = Vec::new();
        for batch in batches {
            match batch {
                Ok(batch) => keys.extend(batch.samples.into_iter().map(|s| s.key)),
                Err(message) => return (keys, Some(message)),
            }
        }
        (keys, None)
    }

    #[test]
    fn all_samples_come_through_in_batches() {
        let path = shard("ok", 5);
        let reader = ShardReader::new(vec![path.clone()], ReaderOptions::default());
        let (keys, err) = drain(Batches::spawn(reader, options(), None).unwrap());
        assert_eq!(keys, ["0000", "0001", "0002", "0003", "0004"]);
        assert_eq!(err, None);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    fn address(batch: &Batch) -> usize {
        match batch.pixels.buffer() {
            BatchPixels::F32(v) => v.as_ptr() as usize,
            BatchPixels::F16(v) => v.as_ptr() as usize,
            BatchPixels::U8(v) => v.as_ptr() as usize,
        }
    }

    #[test]
    fn a_batch_buffer_is_never_reused_while_the_batch_is_held() {
        let path = shard("held", 12);
        let reader = ShardReader::new(vec![path.clone()], ReaderOptions::default());
        let held: Vec<Batch> = Batches::spawn(reader, options(), None)
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
        let mut addresses: Vec<usize> = held.iter().map(address).collect();
        addresses.sort_unstable();
        addresses.dedup();
        assert_eq!(
            addresses.len(),
            held.len(),
            "two live batches share a buffer"
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_stream_reuses_the_buffers_of_dropped_batches() {
        let path = shard("reuse", 40);
        let reader = ShardReader::new(vec![path.clone()], ReaderOptions::default());
        let mut seen = Vec::new();
        for batch in Batches::spawn(reader, options(), None).unwrap() {
            seen.push(address(&batch.unwrap())); // dropped at once
        }
        let mut distinct = seen.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(seen.len(), 20);
        assert!(distinct.len() <= 1 + 1 + POOL_SLACK, "{distinct:?}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_panic_in_the_feeder_is_an_error_naming_the_shard_not_the_end() {
        let path = shard("feeder", 5);
        let reader = ShardReader::new(vec![path.clone()], ReaderOptions::default());
        let batches = Batches::spawn(reader, options(), Some("0003".into())).unwrap();
        let (keys, err) = drain(batches);
        assert_eq!(keys, ["0000", "0001"]);
        let err = err.expect("the stream must end with an error");
        assert!(
            err.starts_with("batch feeder thread panicked while reading 's.tar': debug panic"),
            "{err}"
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_panic_in_the_shard_reader_reaches_the_batch_consumer() {
        let path = shard("reader", 5);
        let reader =
            ShardReader::new(vec![path.clone()], ReaderOptions::default()).panicking_at("0003");
        let (keys, err) = drain(Batches::spawn(reader, options(), None).unwrap());
        assert!(keys.len() <= 2, "{keys:?}");
        let err = err.expect("the stream must end with an error");
        let expected = format!(
            "shard reader thread panicked while reading '{}'",
            path.display()
        );
        assert!(err.starts_with(&expected), "{err}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
