//! Python bindings of the starkret Rust core (`starkret._core`).
//!
//! This file only converts arguments and results and registers functions; every
//! concept lives in its own module (see docs/architecture.md, "Rust modules") with its
//! own unit tests.
//! All compute runs with the GIL released.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use numpy::{
    PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyOSError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

mod batches;
mod cpu;
mod decode;
mod dedup;
mod errors;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod keyindex;
mod neardup;
mod preprocess;
mod q8;
mod resample;
pub mod shards;
mod topk;
mod transpose;

/// The widest SIMD level detected on this CPU at run time (e.g. "avx2+fma").
#[pyfunction]
fn simd_level() -> &'static str {
    cpu::simd_level()
}

/// Number of logical CPUs the Rust thread pools use by default.
#[pyfunction]
fn available_threads() -> usize {
    cpu::available_threads()
}

// ==== Preprocessing ====

/// (ok input positions, [(position, reason)] failures, [(position, reason)] fallbacks)
type StatusLists = (Vec<i64>, Vec<(usize, String)>, Vec<(usize, String)>);

fn split_statuses(statuses: &[preprocess::Status]) -> StatusLists {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    let mut fallback = Vec::new();
    for (i, status) in statuses.iter().enumerate() {
        match status {
            preprocess::Status::Ok => ok.push(i as i64),
            preprocess::Status::Failed(why) => failed.push((i, why.clone())),
            preprocess::Status::Fallback(why) => fallback.push((i, why.clone())),
        }
    }
    (ok, failed, fallback)
}

fn options(size: usize, mode: &str, max_pixels: u64) -> PyResult<preprocess::Options> {
    if size == 0 {
        return Err(errors::invalid_input("size must be positive"));
    }
    let mode = mode.parse().map_err(errors::invalid_input)?;
    Ok(preprocess::Options {
        size,
        mode,
        max_pixels,
    })
}

fn table<T: numpy::Element + Copy + Default>(
    lut: &PyReadonlyArray2<'_, T>,
) -> PyResult<[[T; 256]; 3]> {
    let view = lut.as_array();
    if view.shape() != [3, 256] {
        return Err(errors::invalid_input(format!(
            "lut must have shape (3, 256), got {:?}",
            view.shape()
        )));
    }
    let mut out = [[T::default(); 256]; 3];
    for (c, row) in out.iter_mut().enumerate() {
        for (v, slot) in row.iter_mut().enumerate() {
            *slot = view[[c, v]];
        }
    }
    Ok(out)
}

/// The output kind asked for from Python, and the shape of one image in it.
fn output_spec(
    output: &str,
    size: usize,
    lut_f32: Option<PyReadonlyArray2<'_, f32>>,
    lut_f16: Option<PyReadonlyArray2<'_, u16>>,
) -> PyResult<(preprocess::Output, [usize; 3])> {
    let missing = || errors::invalid_input(format!("output={output:?} needs its lut"));
    Ok(match output {
        "float32" => (
            preprocess::Output::F32(Box::new(table(&lut_f32.ok_or_else(missing)?)?)),
            [3, size, size],
        ),
        "float16" => (
            preprocess::Output::F16(Box::new(table(&lut_f16.ok_or_else(missing)?)?)),
            [3, size, size],
        ),
        "uint8" => (preprocess::Output::U8, [size, size, 3]),
        other => {
            return Err(errors::invalid_input(format!(
                "output must be float32, float16 or uint8, got {other:?}"
            )))
        }
    })
}

/// Pixels as a numpy array of shape (n, *item_shape), without copying.
fn pixels_array<'py>(
    py: Python<'py>,
    pixels: preprocess::BatchPixels,
    n: usize,
    [a, b, c]: [usize; 3],
) -> PyResult<Bound<'py, PyAny>> {
    Ok(match pixels {
        preprocess::BatchPixels::F32(v) => {
            PyArray1::from_vec(py, v).reshape([n, a, b, c])?.into_any()
        }
        preprocess::BatchPixels::F16(v) => {
            PyArray1::from_vec(py, v).reshape([n, a, b, c])?.into_any()
        }
        preprocess::BatchPixels::U8(v) => {
            PyArray1::from_vec(py, v).reshape([n, a, b, c])?.into_any()
        }
    })
}

/// Owner of a stream batch's pooled pixel buffer: the numpy array handed out views
/// the buffer and keeps this object as its base, so the buffer returns to the stream's
/// pool only once no array (or view of one) refers to it any more.
#[pyclass(module = "starkret._core", name = "PixelBuffer", frozen)]
struct PyPixelBuffer {
    pooled: preprocess::Pooled,
}

fn pooled_view<'py, T: numpy::Element>(
    holder: &Bound<'py, PyPixelBuffer>,
    values: &[T],
    shape: [usize; 4],
) -> PyResult<Bound<'py, PyAny>> {
    let view = numpy::ndarray::ArrayView4::from_shape(shape, values)
        .map_err(|e| PyRuntimeError::new_err(format!("batch shape: {e}")))?;
    // SAFETY: `holder` owns the buffer `values` points into and never moves or frees
    // it while alive (the buffer goes back to the pool only when `holder` is dropped,
    // which the array, as its base object, prevents while it exists).
    Ok(unsafe { numpy::PyArray4::borrow_from_array(&view, holder.clone().into_any()) }.into_any())
}

/// A stream batch's pixels as a numpy array of shape (n, *item_shape) over its pooled
/// buffer, without copying.
fn pooled_array<'py>(
    py: Python<'py>,
    pooled: preprocess::Pooled,
    n: usize,
    [a, b, c]: [usize; 3],
) -> PyResult<Bound<'py, PyAny>> {
    let used = pooled.used();
    let holder = Bound::new(py, PyPixelBuffer { pooled })?;
    let shape = [n, a, b, c];
    match holder.get().pooled.buffer() {
        preprocess::BatchPixels::F32(v) => pooled_view(&holder, &v[..used], shape),
        preprocess::BatchPixels::F16(v) => pooled_view(&holder, &v[..used], shape),
        preprocess::BatchPixels::U8(v) => pooled_view(&holder, &v[..used], shape),
    }
}

/// A caller's output array, checked: C-contiguous, writeable, of the output's element
/// type, shaped (at least `n`, *item_shape).
fn output_slice<'a, 'py, T: numpy::Element>(
    out: &'a mut numpy::PyReadwriteArray<'py, T, numpy::ndarray::IxDyn>,
    n: usize,
    item_shape: [usize; 3],
) -> PyResult<&'a mut [T]> {
    let shape = out.shape().to_vec();
    if shape.len() != 4 || shape[1..] != item_shape || shape[0] < n {
        return Err(errors::invalid_input(format!(
            "out must have shape ({n} or more, {}, {}, {}), got {shape:?}",
            item_shape[0], item_shape[1], item_shape[2]
        )));
    }
    out.as_slice_mut()
        .map_err(|_| errors::invalid_input("out must be C-contiguous"))
}

/// Decode, resize, center-crop (and normalise) images without the GIL. `output` is
/// "float32" or "float16" (normalised through the given table; float16 as uint16 bits,
/// (n_ok, 3, size, size)) or "uint8" (the RGB crops, (n_ok, size, size, 3)). With
/// `out` (a writeable C-contiguous array of that element type and item shape, with at
/// least one row per image) the pixels are written there and `out[:n_ok]` is returned.
#[pyfunction]
#[pyo3(signature = (images, size, mode, output, max_pixels, lut_f32=None, lut_f16=None, threads=None, out=None))]
#[allow(clippy::too_many_arguments)]
fn preprocess_images<'py>(
    py: Python<'py>,
    images: Vec<Bound<'py, PyBytes>>,
    size: usize,
    mode: &str,
    output: &str,
    max_pixels: u64,
    lut_f32: Option<PyReadonlyArray2<'py, f32>>,
    lut_f16: Option<PyReadonlyArray2<'py, u16>>,
    threads: Option<usize>,
    out: Option<Bound<'py, PyAny>>,
) -> PyResult<(Bound<'py, PyAny>, StatusLists)> {
    let opts = options(size, mode, max_pixels)?;
    let (output, shape) = output_spec(output, size, lut_f32, lut_f16)?;
    let inputs: Vec<&[u8]> = images.iter().map(|b| b.as_bytes()).collect();
    let threads = threads.unwrap_or(0);
    let Some(out) = out else {
        let (pixels, statuses) = py
            .detach(|| preprocess::batch_as(&inputs, &opts, threads, &output))
            .map_err(PyRuntimeError::new_err)?;
        let lists = split_statuses(&statuses);
        let n = lists.0.len();
        return Ok((pixels_array(py, pixels, n, shape)?, lists));
    };
    let n = inputs.len();
    let wrong_type = || {
        errors::invalid_input(match &output {
            preprocess::Output::F32(_) => "out must be a float32 array",
            preprocess::Output::F16(_) => "out must be a uint16 array (float16 bits)",
            preprocess::Output::U8 => "out must be a uint8 array",
        })
    };
    let run = |target: preprocess::PixelsMut<'_>| {
        py.detach(|| preprocess::batch_as_into(&inputs, &opts, threads, &output, target))
            .map_err(PyRuntimeError::new_err)
    };
    let (kept, statuses) = match &output {
        preprocess::Output::F32(_) => {
            let array = out
                .cast::<numpy::PyArrayDyn<f32>>()
                .map_err(|_| wrong_type())?;
            let mut rw = array
                .try_readwrite()
                .map_err(|e| errors::invalid_input(format!("out: {e}")))?;
            run(preprocess::PixelsMut::F32(output_slice(&mut rw, n, shape)?))?
        }
        preprocess::Output::F16(_) => {
            let array = out
                .cast::<numpy::PyArrayDyn<u16>>()
                .map_err(|_| wrong_type())?;
            let mut rw = array
                .try_readwrite()
                .map_err(|e| errors::invalid_input(format!("out: {e}")))?;
            run(preprocess::PixelsMut::F16(output_slice(&mut rw, n, shape)?))?
        }
        preprocess::Output::U8 => {
            let array = out
                .cast::<numpy::PyArrayDyn<u8>>()
                .map_err(|_| wrong_type())?;
            let mut rw = array
                .try_readwrite()
                .map_err(|e| errors::invalid_input(format!("out: {e}")))?;
            run(preprocess::PixelsMut::U8(output_slice(&mut rw, n, shape)?))?
        }
    };
    let lists = split_statuses(&statuses);
    let rows = out.get_item(pyo3::types::PySlice::new(py, 0, kept as isize, 1))?;
    Ok((rows, lists))
}

/// Width and height of a JPEG or PNG from its header, or None for other formats.
#[pyfunction]
fn image_dimensions(data: &[u8]) -> Option<(usize, usize)> {
    decode::dimensions(data)
}

// ==== Shards ====

fn shard_error(err: shards::ShardError) -> PyErr {
    use shards::ShardError::*;
    let message = err.to_string();
    match err {
        InvalidPattern { .. } => errors::invalid_input(message),
        NoMatch { .. } | NotFound { .. } => errors::not_found(message),
        Unreadable { .. } => PyOSError::new_err(message),
    }
}

/// Expands shard patterns (paths, globs, brace ranges) into existing files, in order.
#[pyfunction]
fn expand_shard_paths(py: Python<'_>, patterns: Vec<String>) -> PyResult<Vec<PathBuf>> {
    py.detach(|| shards::expand_shard_paths(&patterns))
        .map_err(shard_error)
}

/// One webdataset sample: an image and what img2dataset stores beside it.
#[pyclass(module = "starkret._core", name = "Sample", frozen, get_all)]
struct PySample {
    shard: String,
    key: String,
    image_ext: String,
    image: Py<PyBytes>,
    caption: Option<String>,
    json: Option<String>,
    url: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
}

impl PySample {
    fn from_sample(py: Python<'_>, s: shards::Sample) -> PySample {
        PySample {
            image: PyBytes::new(py, &s.image).unbind(),
            shard: s.shard,
            key: s.key,
            image_ext: s.image_ext,
            caption: s.caption,
            json: s.json,
            url: s.url,
            width: s.width,
            height: s.height,
        }
    }
}

#[pymethods]
impl PySample {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        // Python's own repr of each field, so strings and None read as in Python.
        let repr = |value: Bound<'_, PyAny>| value.repr().map(|r| r.to_string());
        Ok(format!(
            "Sample(shard={}, key={}, image_ext={}, image=<{} bytes>, caption={}, url={})",
            repr(self.shard.as_str().into_pyobject(py)?.into_any())?,
            repr(self.key.as_str().into_pyobject(py)?.into_any())?,
            repr(self.image_ext.as_str().into_pyobject(py)?.into_any())?,
            self.image.bind(py).as_bytes().len(),
            repr(self.caption.as_deref().into_pyobject(py)?)?,
            repr(self.url.as_deref().into_pyobject(py)?)?,
        ))
    }
}

/// Shard samples read ahead on a Rust thread; yields `Sample` or an issue tuple.
#[pyclass(module = "starkret._core", name = "ShardReader", frozen)]
struct PyShardReader {
    items: Mutex<shards::Prefetched>,
}

#[pymethods]
impl PyShardReader {
    #[new]
    #[pyo3(signature = (paths, *, max_member_bytes, prefetch))]
    fn new(paths: Vec<PathBuf>, max_member_bytes: u64, prefetch: usize) -> PyResult<Self> {
        let options = shards::ReaderOptions { max_member_bytes };
        let items = shards::ShardReader::new(paths, options).prefetch(prefetch)?;
        Ok(Self {
            items: Mutex::new(items),
        })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// The next `Sample`, or a `(shard, key or None, reason)` tuple for an issue.
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        // A poisoned lock only means an earlier call panicked; the channel is still sound.
        let item = py.detach(|| {
            let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
            items.next()
        });
        let item = match item {
            None => return Ok(None),
            // The reader thread panicked: raise rather than end as if the data were done.
            Some(Err(failed)) => return Err(PyRuntimeError::new_err(failed.to_string())),
            Some(Ok(shards::ShardItem::Sample(s))) => {
                Py::new(py, PySample::from_sample(py, s))?.into_any()
            }
            Some(Ok(shards::ShardItem::Issue(i))) => (i.shard, i.key, i.reason)
                .into_pyobject(py)?
                .into_any()
                .unbind(),
        };
        Ok(Some(item))
    }
}

// ==== Shards to batches ====

/// Preprocessed batches straight from shards, prepared ahead on background threads.
/// Each item is a dict of columns (see `starkret.shards.preprocess_shards`).
#[pyclass(module = "starkret._core", name = "ShardBatches", frozen)]
struct PyShardBatches {
    batches: Mutex<batches::Batches>,
    item_shape: [usize; 3],
}

fn issue_tuple(issue: shards::ShardIssue) -> (String, Option<String>, String) {
    (issue.shard, issue.key, issue.reason)
}

#[pymethods]
impl PyShardBatches {
    #[new]
    #[pyo3(signature = (
        paths, *, size, mode, output, lut_f32=None, lut_f16=None, max_pixels,
        max_member_bytes, batch_size, per_shard, prefetch, threads=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        paths: Vec<PathBuf>,
        size: usize,
        mode: &str,
        output: &str,
        lut_f32: Option<PyReadonlyArray2<'_, f32>>,
        lut_f16: Option<PyReadonlyArray2<'_, u16>>,
        max_pixels: u64,
        max_member_bytes: u64,
        batch_size: usize,
        per_shard: bool,
        prefetch: usize,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        if batch_size == 0 {
            return Err(errors::invalid_input("batch_size must be positive"));
        }
        let (out, item_shape) = output_spec(output, size, lut_f32, lut_f16)?;
        let opts = batches::BatchOptions {
            preprocess: options(size, mode, max_pixels)?,
            output: out,
            batch_size,
            per_shard,
            prefetch,
            threads: threads.unwrap_or(0),
        };
        let reader = shards::ShardReader::new(paths, shards::ReaderOptions { max_member_bytes });
        let batches = batches::Batches::start(reader, opts)?;
        Ok(Self {
            batches: Mutex::new(batches),
            item_shape,
        })
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let next = py.detach(|| {
            let mut batches = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
            batches.next()
        });
        let batch = match next {
            None => return Ok(None),
            Some(Err(message)) => return Err(PyRuntimeError::new_err(message)),
            Some(Ok(batch)) => batch,
        };
        let n = batch.samples.len();
        let pixels = pooled_array(py, batch.pixels, n, self.item_shape)?;
        let out = PyDict::new(py);
        out.set_item("pixels", pixels)?;
        let samples = batch.samples;
        out.set_item(
            "key",
            samples.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(),
        )?;
        out.set_item(
            "shard",
            samples.iter().map(|s| s.shard.as_str()).collect::<Vec<_>>(),
        )?;
        out.set_item(
            "caption",
            samples
                .iter()
                .map(|s| s.caption.as_deref())
                .collect::<Vec<_>>(),
        )?;
        out.set_item(
            "url",
            samples.iter().map(|s| s.url.as_deref()).collect::<Vec<_>>(),
        )?;
        out.set_item(
            "json",
            samples
                .iter()
                .map(|s| s.json.as_deref())
                .collect::<Vec<_>>(),
        )?;
        out.set_item("width", samples.iter().map(|s| s.width).collect::<Vec<_>>())?;
        out.set_item(
            "height",
            samples.iter().map(|s| s.height).collect::<Vec<_>>(),
        )?;
        let failures: Vec<_> = batch.failures.into_iter().map(issue_tuple).collect();
        out.set_item("failures", failures)?;
        let mut fallbacks = Vec::with_capacity(batch.fallbacks.len());
        for f in batch.fallbacks {
            fallbacks.push((Py::new(py, PySample::from_sample(py, f.sample))?, f.format));
        }
        out.set_item("fallbacks", fallbacks)?;
        Ok(Some(out))
    }
}

// ==== Alignment: choosing images without reuse or near-duplicates ====

/// (picked candidate indices, flat; number picked per moment; outcome per moment:
/// 0 = chosen, 1 = below threshold, 2 = exhausted)
type Selection = (Vec<i64>, Vec<i64>, Vec<u8>);

/// Greedy per-moment choice over flattened candidate lists (see `rust/dedup.rs`).
/// Moment `m` owns candidates `offsets[m]..offsets[m + 1]`, sorted best first; image `i`
/// of `shown_*` was shown in episode `shown_episodes[i]` before these moments.
#[pyfunction]
#[pyo3(signature = (
    episodes, ks, offsets, ids, scores, vectors, *, reuse, threshold, min_score, used=None,
    shown_episodes=None, shown_ids=None, shown_vectors=None
))]
#[allow(clippy::too_many_arguments)]
fn select_images(
    py: Python<'_>,
    episodes: PyReadonlyArray1<'_, u64>,
    ks: PyReadonlyArray1<'_, i64>,
    offsets: PyReadonlyArray1<'_, i64>,
    ids: PyReadonlyArray1<'_, u64>,
    scores: PyReadonlyArray1<'_, f32>,
    vectors: PyReadonlyArray2<'_, f32>,
    reuse: &str,
    threshold: f32,
    min_score: f32,
    used: Option<PyReadonlyArray1<'_, u64>>,
    shown_episodes: Option<PyReadonlyArray1<'_, u64>>,
    shown_ids: Option<PyReadonlyArray1<'_, u64>>,
    shown_vectors: Option<PyReadonlyArray2<'_, f32>>,
) -> PyResult<Selection> {
    let reuse = match reuse {
        "episode" => dedup::Reuse::Episode,
        "global" => dedup::Reuse::Global,
        "none" => dedup::Reuse::None,
        other => {
            return Err(errors::invalid_input(format!(
                "reuse must be 'episode', 'global' or 'none', got {other:?}"
            )))
        }
    };
    let vectors = vectors.as_array();
    let flat = dedup::FlatMoments {
        episodes: episodes.as_slice()?,
        ks: ks.as_slice()?,
        offsets: offsets.as_slice()?,
        ids: ids.as_slice()?,
        scores: scores.as_slice()?,
        vectors: vectors
            .as_slice()
            .ok_or_else(|| errors::invalid_input("vectors must be C-contiguous"))?,
        dim: vectors.shape()[1],
    };
    let moments = flat.moments().map_err(errors::invalid_input)?;
    let used = match &used {
        Some(u) => u.as_slice()?.to_vec(),
        None => Vec::new(),
    };
    let shown = match (&shown_episodes, &shown_ids, &shown_vectors) {
        (None, None, None) => dedup::Shown::default(),
        (Some(episodes), Some(ids), Some(vectors)) => dedup::Shown {
            episodes: episodes.as_slice()?,
            ids: ids.as_slice()?,
            vectors: vectors
                .as_slice()
                .map_err(|_| errors::invalid_input("shown_vectors must be C-contiguous"))?,
        },
        _ => {
            return Err(errors::invalid_input(
                "give shown_episodes, shown_ids and shown_vectors together, or none of them",
            ))
        }
    };
    shown.check(flat.dim).map_err(errors::invalid_input)?;
    let params = dedup::Params {
        dim: flat.dim,
        reuse,
        threshold,
        min_score,
        used,
        shown,
    };
    let choices = py.detach(|| dedup::select(&moments, &params));
    let mut picked = Vec::new();
    let mut counts = Vec::with_capacity(choices.len());
    let mut outcomes = Vec::with_capacity(choices.len());
    // Validated above: every offset is a candidate position.
    for (choice, &start) in choices.iter().zip(flat.offsets) {
        picked.extend(choice.picked.iter().map(|&i| start + i as i64));
        counts.push(choice.picked.len() as i64);
        outcomes.push(match choice.outcome {
            dedup::Outcome::Chosen => 0,
            dedup::Outcome::BelowThreshold => 1,
            dedup::Outcome::Exhausted => 2,
        });
    }
    Ok((picked, counts, outcomes))
}

// ==== Top-k ====

/// Ids to leave out: one list for every query, one list per query, or both (an id
/// is left out for a query when either holds it). The global list is borrowed, not
/// copied, when it is sorted without repeats (as the Python side keeps it).
fn exclusion<'a>(
    global: Option<&'a PyReadonlyArray1<'_, i64>>,
    per_query: Option<Vec<PyReadonlyArray1<'_, i64>>>,
) -> PyResult<topk::Exclude<'a>> {
    let exclude = match global {
        Some(ids) => topk::Exclude::global_borrowed(ids.as_slice()?),
        None => topk::Exclude::NOTHING,
    };
    Ok(match per_query {
        Some(lists) => exclude.with_per_query(
            lists
                .iter()
                .map(|ids| Ok(ids.as_slice()?.to_vec()))
                .collect::<PyResult<_>>()?,
        ),
        None => exclude,
    })
}

type TopKArrays<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<i64>>);

fn topk_arrays(py: Python<'_>, result: topk::TopK) -> PyResult<TopKArrays<'_>> {
    let q = result.q;
    let scores = PyArray1::from_vec(py, result.scores).reshape([q, result.k])?;
    let ids = PyArray1::from_vec(py, result.ids).reshape([q, result.k])?;
    Ok((scores, ids))
}

/// A part's rows as the search reads them: float32, or float16 bits.
enum PartRows<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F16(PyReadonlyArray2<'py, u16>),
}

impl PartRows<'_> {
    /// (rows, dimension) of the part.
    fn shape(&self) -> (usize, usize) {
        let s = match self {
            PartRows::F32(a) => a.shape(),
            PartRows::F16(a) => a.shape(),
        };
        (s[0], s[1])
    }
}

fn part_arrays<'py>(parts: &[Bound<'py, PyAny>]) -> PyResult<Vec<PartRows<'py>>> {
    let mut arrays = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        if let Ok(a) = part.cast::<PyArray2<f32>>() {
            arrays.push(PartRows::F32(a.readonly()));
        } else if let Ok(a) = part.cast::<PyArray2<u16>>() {
            arrays.push(PartRows::F16(a.readonly()));
        } else {
            return Err(errors::invalid_type(format!(
                "part {i} must be a 2-D float32 array or float16 bits (uint16)"
            )));
        }
    }
    Ok(arrays)
}

/// The parts as databases, checked against the queries' dimension `d`.
fn part_databases<'a>(arrays: &'a [PartRows<'_>], d: usize) -> PyResult<Vec<topk::Database<'a>>> {
    let mut dbs = Vec::with_capacity(arrays.len());
    for array in arrays {
        let (rows, part_d) = match array {
            PartRows::F32(a) => (topk::Rows::F32(a.as_slice()?), a.shape()[1]),
            PartRows::F16(a) => (topk::Rows::F16Bits(a.as_slice()?), a.shape()[1]),
        };
        if part_d != d {
            return Err(errors::invalid_input(format!(
                "queries have dimension {d}, the database {part_d}"
            )));
        }
        dbs.push(topk::Database::new(rows, d).map_err(errors::invalid_input)?);
    }
    Ok(dbs)
}

/// Exact inner-product top-k over several parts searched as one database (ids run on
/// across the parts in order), in one pass on all cores with the GIL released.
#[pyfunction]
#[pyo3(signature = (queries, parts, k, *, exclude=None, exclude_per_query=None, threads=None))]
fn topk_search_parts<'py>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, f32>,
    parts: Vec<Bound<'py, PyAny>>,
    k: usize,
    exclude: Option<PyReadonlyArray1<'py, i64>>,
    exclude_per_query: Option<Vec<PyReadonlyArray1<'py, i64>>>,
    threads: Option<usize>,
) -> PyResult<TopKArrays<'py>> {
    let exclude = exclusion(exclude.as_ref(), exclude_per_query)?;
    let arrays = part_arrays(&parts)?;
    let dbs = part_databases(&arrays, queries.shape()[1])?;
    let q = queries.as_slice()?;
    let result = py
        .detach(|| topk::search_parts(q, &dbs, k, &exclude, threads.unwrap_or(0)))
        .map_err(errors::invalid_input)?;
    topk_arrays(py, result)
}

/// Per query, the number of rows of the parts scoring strictly above its threshold
/// (same kernel as the search).
#[pyfunction]
#[pyo3(signature = (queries, parts, thresholds, *, exclude=None, exclude_per_query=None, threads=None))]
fn count_above_parts<'py>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, f32>,
    parts: Vec<Bound<'py, PyAny>>,
    thresholds: PyReadonlyArray1<'py, f32>,
    exclude: Option<PyReadonlyArray1<'py, i64>>,
    exclude_per_query: Option<Vec<PyReadonlyArray1<'py, i64>>>,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray1<u64>>> {
    let exclude = exclusion(exclude.as_ref(), exclude_per_query)?;
    let arrays = part_arrays(&parts)?;
    let dbs = part_databases(&arrays, queries.shape()[1])?;
    let (q, t) = (queries.as_slice()?, thresholds.as_slice()?);
    let counts = py
        .detach(|| topk::count_above(q, &dbs, t, &exclude, threads.unwrap_or(0)))
        .map_err(errors::invalid_input)?;
    Ok(PyArray1::from_vec(py, counts))
}

/// Exact merge of top lists laid side by side: (q, m) scores and global ids (-1 = none).
#[pyfunction]
fn merge_topk<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    ids: PyReadonlyArray2<'py, i64>,
    k: usize,
) -> PyResult<TopKArrays<'py>> {
    if scores.shape() != ids.shape() {
        return Err(errors::invalid_input(format!(
            "scores {:?} and ids {:?} differ in shape",
            scores.shape(),
            ids.shape()
        )));
    }
    let [q, m] = [scores.shape()[0], scores.shape()[1]];
    let (s, i) = (scores.as_slice()?, ids.as_slice()?);
    let result = py
        .detach(|| topk::merge(s, i, q, m, k))
        .map_err(errors::invalid_input)?;
    topk_arrays(py, result)
}

// ==== Int8 first pass ====

/// The rows of one part in the int8 block format of `rust/q8.rs`: (blocks, bytes per
/// block) uint8, quantised on all cores with the GIL released.
#[pyfunction]
#[pyo3(signature = (rows, *, threads=None))]
fn q8_quantize<'py>(
    py: Python<'py>,
    rows: Bound<'py, PyAny>,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let arrays = part_arrays(std::slice::from_ref(&rows))?;
    let (n, d) = arrays[0].shape();
    let dbs = part_databases(&arrays, d)?;
    let db = dbs[0];
    let bytes = py
        .detach(|| q8::quantise_rows(&db, threads.unwrap_or(0)))
        .map_err(errors::invalid_input)?;
    let per_block = q8::block_bytes(d);
    PyArray1::from_vec(py, bytes).reshape([q8::block_count(n), per_block])
}

type Q8Result<'py> = (
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray1<u64>>,
    &'static str,
);

/// Exact top-k over several parts (as `topk_search_parts`) through the int8 first pass:
/// `codes[i]` is part i's block-format copy. Returns (scores, ids, rows re-ranked per
/// query, the first pass that ran).
#[pyfunction]
#[pyo3(signature = (queries, parts, codes, k, *, exclude=None, exclude_per_query=None, threads=None, first_pass="auto"))]
#[allow(clippy::too_many_arguments)]
fn q8_search_parts<'py>(
    py: Python<'py>,
    queries: PyReadonlyArray2<'py, f32>,
    parts: Vec<Bound<'py, PyAny>>,
    codes: Vec<PyReadonlyArray2<'py, u8>>,
    k: usize,
    exclude: Option<PyReadonlyArray1<'py, i64>>,
    exclude_per_query: Option<Vec<PyReadonlyArray1<'py, i64>>>,
    threads: Option<usize>,
    first_pass: &str,
) -> PyResult<Q8Result<'py>> {
    let path = q8::Path::parse(first_pass).map_err(errors::invalid_input)?;
    let exclude = exclusion(exclude.as_ref(), exclude_per_query)?;
    let arrays = part_arrays(&parts)?;
    let dbs = part_databases(&arrays, queries.shape()[1])?;
    if codes.len() != dbs.len() {
        return Err(errors::invalid_input(format!(
            "{} int8 copies for {} parts",
            codes.len(),
            dbs.len()
        )));
    }
    let mut q8_parts = Vec::with_capacity(dbs.len());
    for (i, (db, c)) in dbs.iter().zip(&codes).enumerate() {
        let part = q8::Part::new(*db, c.as_slice()?)
            .map_err(|e| errors::invalid_input(format!("part {i}: {e}")))?;
        q8_parts.push(part);
    }
    let q = queries.as_slice()?;
    let result = py
        .detach(|| q8::search_parts(q, &q8_parts, k, &exclude, threads.unwrap_or(0), path))
        .map_err(errors::invalid_input)?;
    let (scores, ids) = topk_arrays(py, result.top)?;
    Ok((
        scores,
        ids,
        PyArray1::from_vec(py, result.reranked),
        result.path.name(),
    ))
}

/// The int8 first pass this CPU runs by default: "vnni", "avx2" or "float32".
#[pyfunction]
fn q8_default_first_pass() -> &'static str {
    q8::default_path()
}

// ==== Near-duplicate pairs ====

/// The dimension of the rows of `parts` (all parts must agree; checked later).
fn parts_dim(arrays: &[PartRows<'_>]) -> PyResult<usize> {
    match arrays.first() {
        Some(part) => Ok(part.shape().1),
        None => Err(errors::invalid_input("the DB has no parts")),
    }
}

/// Per row of the parts: its nearest centroid and the others within `margin` of it
/// (at most `r`, best first, -1 padding), as an (n, r) int32 array.
#[pyfunction]
#[pyo3(signature = (parts, centroids, r, margin, *, threads=None))]
fn neardup_nearest_centroids<'py>(
    py: Python<'py>,
    parts: Vec<Bound<'py, PyAny>>,
    centroids: PyReadonlyArray2<'py, f32>,
    r: usize,
    margin: f32,
    threads: Option<usize>,
) -> PyResult<Bound<'py, PyArray2<i32>>> {
    let arrays = part_arrays(&parts)?;
    let dbs = part_databases(&arrays, centroids.shape()[1])?;
    let c = centroids.as_slice()?;
    let assigned = py
        .detach(|| neardup::nearest_centroids(&dbs, c, r, margin, threads.unwrap_or(0)))
        .map_err(errors::invalid_input)?;
    let n = assigned.len() / r.max(1);
    PyArray1::from_vec(py, assigned).reshape([n, r])
}

type PairArrays<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<f32>>,
    u64,
);

/// Pairs of rows sharing a cluster, at least one of them new, scoring >= threshold:
/// (a, b, scores, dot products computed), a < b global rows.
#[pyfunction]
#[pyo3(signature = (parts, assigned, is_new, threshold, *, threads=None))]
fn neardup_pairs<'py>(
    py: Python<'py>,
    parts: Vec<Bound<'py, PyAny>>,
    assigned: PyReadonlyArray2<'py, i32>,
    is_new: PyReadonlyArray1<'py, u8>,
    threshold: f32,
    threads: Option<usize>,
) -> PyResult<PairArrays<'py>> {
    let arrays = part_arrays(&parts)?;
    let dbs = part_databases(&arrays, parts_dim(&arrays)?)?;
    let r = assigned.shape()[1];
    let (a, fresh) = (assigned.as_slice()?, is_new.as_slice()?);
    let found = py
        .detach(|| neardup::pairs_in_clusters(&dbs, a, r, fresh, threshold, threads.unwrap_or(0)))
        .map_err(errors::invalid_input)?;
    Ok((
        PyArray1::from_vec(py, found.a),
        PyArray1::from_vec(py, found.b),
        PyArray1::from_vec(py, found.scores),
        found.compared,
    ))
}

/// Connected components of nodes 0..n joined by edges a[i] - b[i]: each node's label is
/// the smallest node of its component.
#[pyfunction]
fn connected_components<'py>(
    py: Python<'py>,
    a: PyReadonlyArray1<'py, i64>,
    b: PyReadonlyArray1<'py, i64>,
    n: usize,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let (x, y) = (a.as_slice()?, b.as_slice()?);
    let labels = py
        .detach(|| neardup::components(x, y, n))
        .map_err(errors::invalid_input)?;
    Ok(PyArray1::from_vec(py, labels))
}

// ==== Key index ====

/// Stable 64-bit hashes of `prefix + key` for each key (see `rust/keyindex.rs`).
#[pyfunction]
#[pyo3(signature = (keys, *, prefix=""))]
fn key_hashes<'py>(py: Python<'py>, keys: Vec<String>, prefix: &str) -> Bound<'py, PyArray1<u64>> {
    let p = prefix.as_bytes();
    let hashes: Vec<u64> = keys
        .iter()
        .map(|k| keyindex::key_hash(p, k.as_bytes()))
        .collect();
    PyArray1::from_vec(py, hashes)
}

/// The same hashes for an Arrow string array given as its offsets and data buffers.
#[pyfunction]
#[pyo3(signature = (offsets, data, *, prefix=""))]
fn string_hashes<'py>(
    py: Python<'py>,
    offsets: &Bound<'py, PyAny>,
    data: PyReadonlyArray1<'py, u8>,
    prefix: &str,
) -> PyResult<Bound<'py, PyArray1<u64>>> {
    let bytes = data.as_slice()?;
    let p = prefix.as_bytes();
    let hashes = if let Ok(o) = offsets.cast::<PyArray1<i32>>() {
        let o = o.readonly();
        let o = o.as_slice()?;
        py.detach(|| keyindex::hash_strings(p, o, bytes))
    } else if let Ok(o) = offsets.cast::<PyArray1<i64>>() {
        let o = o.readonly();
        let o = o.as_slice()?;
        py.detach(|| keyindex::hash_strings(p, o, bytes))
    } else {
        return Err(errors::invalid_type(
            "offsets must be a 1-D int32 or int64 array",
        ));
    }
    .map_err(errors::invalid_input)?;
    Ok(PyArray1::from_vec(py, hashes))
}

// ==== Module ====

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(available_threads, m)?)?;
    m.add_function(wrap_pyfunction!(preprocess_images, m)?)?;
    m.add_function(wrap_pyfunction!(image_dimensions, m)?)?;
    m.add_function(wrap_pyfunction!(expand_shard_paths, m)?)?;
    m.add_function(wrap_pyfunction!(merge_topk, m)?)?;
    m.add_function(wrap_pyfunction!(topk_search_parts, m)?)?;
    m.add_function(wrap_pyfunction!(count_above_parts, m)?)?;
    m.add("Q8_FORMAT_VERSION", q8::FORMAT_VERSION)?;
    m.add_function(wrap_pyfunction!(q8_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(q8_search_parts, m)?)?;
    m.add_function(wrap_pyfunction!(q8_default_first_pass, m)?)?;
    m.add_function(wrap_pyfunction!(neardup_nearest_centroids, m)?)?;
    m.add_function(wrap_pyfunction!(neardup_pairs, m)?)?;
    m.add_function(wrap_pyfunction!(connected_components, m)?)?;
    m.add_function(wrap_pyfunction!(key_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(string_hashes, m)?)?;
    m.add_class::<PySample>()?;
    m.add_class::<PyShardReader>()?;
    m.add_class::<PyShardBatches>()?;
    m.add_function(wrap_pyfunction!(select_images, m)?)?;
    Ok(())
}
