//! Python bindings of the starkret Rust core (`starkret._core`).
//!
//! This file only registers functions and classes; every concept lives in its
//! own module (see DESIGN.md section 3) with its own unit tests.

use pyo3::prelude::*;

mod cpu;

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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(available_threads, m)?)?;
    Ok(())
}
