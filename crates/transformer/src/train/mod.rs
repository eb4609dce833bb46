//! Optimizer, learning-rate schedules, losses, the training loop, metrics and checkpoints.

pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod eval;
pub mod images;
pub mod loss;
pub mod optim;
pub mod parallel;
pub mod pixels;
pub mod run;
pub mod schedule;
pub mod tasks;
pub mod trainer;

pub use clip::{clip_grad_norm, grad_norm, GradAccumulator};
pub use config::{DataConfig, RunConfig, TrainConfig};
pub use loss::{cross_entropy, CrossEntropyConfig};
pub use optim::{AdamW, AdamWConfig, AdamWState};
pub use schedule::LrSchedule;
pub use tasks::{
    seq2seq_loss, BucketSchedule, BucketedPairs, BucketedSeq2SeqTask, LmTask, PairSource,
    Seq2SeqTask,
};
pub use trainer::{
    loss_and_gradients, Evaluation, MetricRecord, Observer, RunSummary, Silent, Task, Trainer,
    TrainerSetup,
};
