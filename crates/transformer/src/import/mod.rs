//! Importers for weights saved by other frameworks.

pub mod pytorch;
