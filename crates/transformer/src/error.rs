//! The library's error type: every failure names what was wrong and where.

use std::path::PathBuf;

/// Errors returned by the library. Messages name the tensor, field or file at fault together
/// with the expected and actual values, so that a user can fix the input without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from candle (tensor op, device, dtype).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A tensor had the wrong rank or size.
    #[error("{what}: expected shape {expected}, got {actual:?}")]
    Shape {
        what: String,
        expected: String,
        actual: Vec<usize>,
    },

    /// A model or training configuration is invalid.
    #[error("invalid config: {0}")]
    Config(String),

    /// A configuration field or a flag holds a value it does not accept.
    #[error("invalid {field}: must be {expected}, got {actual}")]
    Invalid {
        field: String,
        expected: String,
        actual: String,
    },

    /// An input (token ids, a sequence, a source) outside what the model takes.
    #[error("{what}: expected {expected}, got {actual}")]
    Input {
        what: String,
        expected: String,
        actual: String,
    },

    /// A weight file does not match the model (missing, extra or mis-shaped tensors).
    #[error("weights {source_name}: {msg}")]
    Weights { source_name: String, msg: String },

    /// A path that is not what it must be (a model directory that is not one, a file that is
    /// missing from it).
    #[error("{path}: {problem}")]
    Path { path: PathBuf, problem: String },

    /// An I/O failure, with the path it concerned.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A JSON (de)serialization failure, with the file or thing it concerned.
    #[error("{what}: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },

    /// A tensor that must be finite (a parameter, an optimizer moment, a loss, logits) holds
    /// NaN or an infinity: the job stops instead of saving or decoding it.
    #[error("{what}: {tensor} is not finite (NaN or inf); {advice}")]
    NonFinite {
        /// Where it was found (`training stopped at step 12`, a checkpoint directory).
        what: String,
        /// The tensor (parameter or moment name, `the loss`).
        tensor: String,
        /// What was (not) done about it and the likely cause.
        advice: String,
    },

    /// Anything else, with a message that says what went wrong.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }

    pub fn shape(what: impl Into<String>, expected: impl Into<String>, actual: &[usize]) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.into(),
            actual: actual.to_vec(),
        }
    }

    /// A field, what it accepts, and what it held.
    pub fn invalid(
        field: impl Into<String>,
        expected: impl Into<String>,
        actual: impl Into<String>,
    ) -> Self {
        Error::Invalid {
            field: field.into(),
            expected: expected.into(),
            actual: actual.into(),
        }
    }

    /// The same error, said of `source` (a file the bad value came from): config and
    /// invalid-value errors name it first.
    pub fn in_source(self, source: &str) -> Self {
        match self {
            Error::Config(msg) => Error::Config(format!("{source}: {msg}")),
            Error::Invalid {
                field,
                expected,
                actual,
            } => Error::Invalid {
                field: format!("{source}: {field}"),
                expected,
                actual,
            },
            other => other,
        }
    }

    /// An input outside what the model takes: what it is, what is accepted, what it was.
    pub fn input(
        what: impl Into<String>,
        expected: impl Into<String>,
        actual: impl Into<String>,
    ) -> Self {
        Error::Input {
            what: what.into(),
            expected: expected.into(),
            actual: actual.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Return early with an [`Error::Msg`] built like `format!`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error::Msg(format!($($arg)*)))
    };
}
