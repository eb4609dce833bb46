//! Importers for weights saved by other frameworks.

pub mod hf_bert;
pub mod pytorch;
