//! Optimizer, learning-rate schedules, losses, training loop, metrics and checkpoints.

pub mod clip;
pub mod loss;
pub mod optim;
pub mod schedule;

pub use clip::{clip_grad_norm, grad_norm, GradAccumulator};
pub use loss::{cross_entropy, CrossEntropyConfig};
pub use optim::{AdamW, AdamWConfig, AdamWState};
pub use schedule::LrSchedule;
