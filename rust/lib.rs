//! Python bindings of the starkret Rust core (`starkret._core`).
//!
//! This file only converts arguments and results and registers functions; every
//! concept lives in its own module (see DESIGN.md section 3) with its own unit tests.
//! All compute runs with the GIL released.

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray2};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

mod cpu;
mod decode;
mod preprocess;
mod resample;

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
        return Err(PyValueError::new_err("size must be positive"));
    }
    let mode = mode.parse().map_err(PyValueError::new_err)?;
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
        return Err(PyValueError::new_err(format!(
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

/// Runs one preprocessing batch without the GIL and wraps the pixels as a numpy array
/// of shape (n_ok, *item_shape).
fn run_batch<'py, T, W>(
    py: Python<'py>,
    images: &[Bound<'py, PyBytes>],
    opts: preprocess::Options,
    threads: Option<usize>,
    item_shape: [usize; 3],
    write: W,
) -> PyResult<(Bound<'py, PyAny>, StatusLists)>
where
    T: numpy::Element + Copy + Default + Send + Sync,
    W: Fn(&[u8], &mut [T]) + Send + Sync,
{
    let inputs: Vec<&[u8]> = images.iter().map(|b| b.as_bytes()).collect();
    let plane = item_shape.iter().product();
    let threads = threads.unwrap_or(0);
    let batch = py
        .detach(|| preprocess::batch(&inputs, &opts, threads, plane, write))
        .map_err(PyRuntimeError::new_err)?;
    let lists = split_statuses(&batch.statuses);
    let n = lists.0.len();
    let array = PyArray1::from_vec(py, batch.pixels)
        .reshape([n, item_shape[0], item_shape[1], item_shape[2]])?
        .into_any();
    Ok((array, lists))
}

/// Decode, resize, center-crop and normalise images into (n_ok, 3, size, size) float32.
#[pyfunction]
#[pyo3(signature = (images, size, mode, lut, max_pixels, threads=None))]
fn preprocess_f32<'py>(
    py: Python<'py>,
    images: Vec<Bound<'py, PyBytes>>,
    size: usize,
    mode: &str,
    lut: PyReadonlyArray2<'py, f32>,
    max_pixels: u64,
    threads: Option<usize>,
) -> PyResult<(Bound<'py, PyAny>, StatusLists)> {
    let opts = options(size, mode, max_pixels)?;
    let lut = table(&lut)?;
    run_batch(
        py,
        &images,
        opts,
        threads,
        [3, size, size],
        move |rgb, out| preprocess::write_normalised(rgb, out, &lut),
    )
}

/// As `preprocess_f32`, with float16 values given and returned as their uint16 bits.
#[pyfunction]
#[pyo3(signature = (images, size, mode, lut, max_pixels, threads=None))]
fn preprocess_f16_bits<'py>(
    py: Python<'py>,
    images: Vec<Bound<'py, PyBytes>>,
    size: usize,
    mode: &str,
    lut: PyReadonlyArray2<'py, u16>,
    max_pixels: u64,
    threads: Option<usize>,
) -> PyResult<(Bound<'py, PyAny>, StatusLists)> {
    let opts = options(size, mode, max_pixels)?;
    let lut = table(&lut)?;
    run_batch(
        py,
        &images,
        opts,
        threads,
        [3, size, size],
        move |rgb, out| preprocess::write_normalised(rgb, out, &lut),
    )
}

/// The uint8 RGB crops before normalisation, (n_ok, size, size, 3).
#[pyfunction]
#[pyo3(signature = (images, size, mode, max_pixels, threads=None))]
fn preprocess_u8<'py>(
    py: Python<'py>,
    images: Vec<Bound<'py, PyBytes>>,
    size: usize,
    mode: &str,
    max_pixels: u64,
    threads: Option<usize>,
) -> PyResult<(Bound<'py, PyAny>, StatusLists)> {
    let opts = options(size, mode, max_pixels)?;
    run_batch(py, &images, opts, threads, [size, size, 3], |rgb, out| {
        out.copy_from_slice(rgb)
    })
}

/// Width and height of a JPEG or PNG from its header, or None for other formats.
#[pyfunction]
fn image_dimensions(data: &[u8]) -> Option<(usize, usize)> {
    decode::dimensions(data)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(available_threads, m)?)?;
    m.add_function(wrap_pyfunction!(preprocess_f32, m)?)?;
    m.add_function(wrap_pyfunction!(preprocess_f16_bits, m)?)?;
    m.add_function(wrap_pyfunction!(preprocess_u8, m)?)?;
    m.add_function(wrap_pyfunction!(image_dimensions, m)?)?;
    Ok(())
}
