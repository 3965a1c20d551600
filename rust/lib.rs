//! Python bindings of the starkret Rust core (`starkret._core`).
//!
//! This file only registers functions and classes; every concept lives in its
//! own module (see DESIGN.md section 3) with its own unit tests.

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

mod cpu;
pub mod shards;

/// The widest SIMD level detected on this CPU at run time (e.g. "avx2+fma").
#[pyfunction]
fn simd_level() -> &'static str {
    cpu::simd_level()
}

/// Number of logical CPUs the Rust thread pools will use by default.
#[pyfunction]
fn available_threads() -> usize {
    cpu::available_threads()
}

// ==== Shards ====

fn shard_error(err: shards::ShardError) -> PyErr {
    use shards::ShardError::*;
    let message = err.to_string();
    match err {
        InvalidPattern { .. } => PyValueError::new_err(message),
        NoMatch { .. } | NotFound { .. } => PyFileNotFoundError::new_err(message),
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
            Some(shards::ShardItem::Sample(s)) => {
                let sample = PySample {
                    image: PyBytes::new(py, &s.image).unbind(),
                    shard: s.shard,
                    key: s.key,
                    image_ext: s.image_ext,
                    caption: s.caption,
                    json: s.json,
                    url: s.url,
                    width: s.width,
                    height: s.height,
                };
                Py::new(py, sample)?.into_any()
            }
            Some(shards::ShardItem::Issue(i)) => (i.shard, i.key, i.reason)
                .into_pyobject(py)?
                .into_any()
                .unbind(),
        };
        Ok(Some(item))
    }
}

// ==== Module ====

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(available_threads, m)?)?;
    m.add_function(wrap_pyfunction!(expand_shard_paths, m)?)?;
    m.add_class::<PySample>()?;
    m.add_class::<PyShardReader>()?;
    Ok(())
}
