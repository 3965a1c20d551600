//! Errors crossing into Python as starkret's own exception classes (`starkret.errors`).
//!
//! Where the core rejects what a caller gave it (bad arguments, malformed data, a shard
//! pattern matching nothing), the message is raised as the matching `starkret.errors`
//! class, intact: `InvalidInputError` (also a `ValueError`), `InvalidTypeError` (also a
//! `TypeError`), `NotFoundError` (also a `FileNotFoundError`). Every one derives from
//! `StarkretError`, which the CLI turns into one line and exit status 2.
//!
//! The class is looked up when the error is raised, so this module needs nothing from
//! Python at import time; if `starkret.errors` cannot be imported (the extension loaded
//! on its own), the built-in class is raised instead, with the same message.

use pyo3::exceptions::{PyFileNotFoundError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyType;

/// The Python module holding the classes.
const MODULE: &str = "starkret.errors";

/// `message` as an instance of `starkret.errors.<class>`, else through `fallback`.
fn raise_as(class: &str, message: String, fallback: fn(String) -> PyErr) -> PyErr {
    Python::attach(|py| {
        let found = py
            .import(MODULE)
            .and_then(|module| module.getattr(class))
            .and_then(|value| value.cast_into::<PyType>().map_err(PyErr::from));
        match found {
            Ok(ty) => PyErr::from_type(ty, message),
            Err(_) => fallback(message),
        }
    })
}

/// Bad input: an argument out of range, malformed data (`InvalidInputError`).
pub fn invalid_input(message: impl Into<String>) -> PyErr {
    raise_as("InvalidInputError", message.into(), PyValueError::new_err)
}

/// An argument of the wrong type (`InvalidTypeError`).
pub fn invalid_type(message: impl Into<String>) -> PyErr {
    raise_as("InvalidTypeError", message.into(), PyTypeError::new_err)
}

/// A path the caller named does not exist, or a pattern matches nothing (`NotFoundError`).
pub fn not_found(message: impl Into<String>) -> PyErr {
    raise_as(
        "NotFoundError",
        message.into(),
        PyFileNotFoundError::new_err,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    // Whether or not `starkret` is importable here, the error is the built-in class
    // Python code catches, with the Rust message intact.
    #[test]
    fn errors_keep_their_builtin_class_and_message() {
        Python::initialize();
        Python::attach(|py| {
            let err = invalid_input("k must be at least 1");
            assert!(err.is_instance_of::<PyValueError>(py));
            assert_eq!(err.value(py).to_string(), "k must be at least 1");
            let err = invalid_type(String::from("part 0 must be a 2-D float32 array"));
            assert!(err.is_instance_of::<PyTypeError>(py));
            let err = not_found("shard file not found: 'x.tar'");
            assert!(err.is_instance_of::<PyFileNotFoundError>(py));
            assert_eq!(err.value(py).to_string(), "shard file not found: 'x.tar'");
        });
    }

    #[test]
    fn a_missing_class_falls_back_to_the_builtin() {
        Python::initialize();
        Python::attach(|py| {
            let err = raise_as("NoSuchClass", "why".into(), PyValueError::new_err);
            assert!(err.get_type(py).is(py.get_type::<PyValueError>()));
        });
    }
}
