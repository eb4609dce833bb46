//! Learning-rate schedules.
//!
//! Every schedule maps the 0-based index of the optimizer step about to be taken (`step`, the
//! `it` of nanoGPT's training loop) to a learning rate. The JSON form is the one a training
//! config carries, e.g. `{"kind": "noam", "d_model": 512, "warmup_steps": 4000, "factor": 1.0}`.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A learning-rate schedule: `lr(step)` for the 0-based optimizer step `step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The same learning rate at every step.
    Constant {
        /// The learning rate.
        lr: f64,
    },
    /// Linear warmup then cosine decay, exactly as nanoGPT's `get_lr`:
    /// `lr * (step + 1) / (warmup_steps + 1)` while `step < warmup_steps`; `min_lr` once
    /// `step > decay_steps`; in between a half cosine from `lr` down to `min_lr`.
    WarmupCosine {
        /// The peak learning rate, reached at the end of the warmup (`learning_rate`).
        lr: f64,
        /// Number of warmup steps (`warmup_iters`).
        warmup_steps: u64,
        /// The step at which the decay reaches `min_lr`, counted from step 0, not from the end
        /// of the warmup (`lr_decay_iters`); must be greater than `warmup_steps`.
        decay_steps: u64,
        /// The learning rate after the decay (`min_lr`, nanoGPT uses `lr / 10`).
        min_lr: f64,
    },
    /// The schedule of "Attention Is All You Need" (Vaswani et al. 2017, section 5.3, eq. 3):
    /// `factor * d_model^-0.5 * min(s^-0.5, s * warmup_steps^-1.5)` with `s = step + 1`, i.e.
    /// the step number counted from 1. It rises linearly for `warmup_steps` steps, then decays as
    /// `s^-0.5`.
    Noam {
        /// The model width `d_model`.
        d_model: usize,
        /// Number of warmup steps (the paper uses 4000).
        warmup_steps: u64,
        /// A constant multiplier (the paper uses 1; the Annotated Transformer uses 1 or 2).
        factor: f64,
    },
}

impl LrSchedule {
    /// Checks that the schedule can be evaluated at every step (no division by zero, no negative
    /// or non-finite rate), naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        let check_lr = |field: &str, v: f64| {
            crate::validate::non_negative(&format!("schedule.{field}"), v).map(|_| ())
        };
        match *self {
            LrSchedule::Constant { lr } => check_lr("lr", lr),
            LrSchedule::WarmupCosine {
                lr,
                warmup_steps,
                decay_steps,
                min_lr,
            } => {
                check_lr("lr", lr)?;
                check_lr("min_lr", min_lr)?;
                // A min_lr above lr would make the "decay" climb.
                crate::validate::at_most("schedule.min_lr", min_lr, "schedule.lr", lr)?;
                if decay_steps <= warmup_steps {
                    return Err(Error::invalid(
                        format!("schedule.decay_steps ({decay_steps}) of warmup_cosine"),
                        format!("greater than warmup_steps ({warmup_steps})"),
                        decay_steps.to_string(),
                    ));
                }
                Ok(())
            }
            LrSchedule::Noam {
                d_model,
                warmup_steps,
                factor,
            } => {
                check_lr("factor", factor)?;
                if d_model == 0 {
                    return Err(Error::invalid("schedule.d_model of noam", "> 0", "0"));
                }
                if warmup_steps == 0 {
                    return Err(Error::invalid("schedule.warmup_steps of noam", "> 0", "0"));
                }
                Ok(())
            }
        }
    }

    /// The field that scales this schedule's learning rates (`schedule.lr`, or
    /// `schedule.factor` for noam): what to lower when training diverges.
    pub fn scale_field(&self) -> &'static str {
        match self {
            LrSchedule::Noam { .. } => "schedule.factor",
            _ => "schedule.lr",
        }
    }

    /// The learning rate for the 0-based optimizer step `step`. Call [`LrSchedule::validate`]
    /// once first: an invalid schedule gives NaN or infinity here rather than an error.
    pub fn lr(&self, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant { lr } => lr,
            LrSchedule::WarmupCosine {
                lr,
                warmup_steps,
                decay_steps,
                min_lr,
            } => {
                if step < warmup_steps {
                    return lr * (step + 1) as f64 / (warmup_steps + 1) as f64;
                }
                if step > decay_steps {
                    return min_lr;
                }
                let decay_ratio =
                    (step - warmup_steps) as f64 / (decay_steps - warmup_steps) as f64;
                let coeff = 0.5 * (1.0 + (std::f64::consts::PI * decay_ratio).cos());
                min_lr + coeff * (lr - min_lr)
            }
            LrSchedule::Noam {
                d_model,
                warmup_steps,
                factor,
            } => {
                let s = (step + 1) as f64;
                let w = warmup_steps as f64;
                factor * (d_model as f64).powf(-0.5) * s.powf(-0.5).min(s * w.powf(-1.5))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!(
            (a - b).abs() <= 1e-12 * b.abs().max(1e-12),
            "got {a}, expected {b}"
        );
    }

    #[test]
    fn constant() {
        let s = LrSchedule::Constant { lr: 3e-4 };
        s.validate().unwrap();
        assert_eq!(s.lr(0), 3e-4);
        assert_eq!(s.lr(1_000_000), 3e-4);
    }

    #[test]
    fn warmup_cosine_matches_nanogpt() {
        let s = LrSchedule::WarmupCosine {
            lr: 1.0,
            warmup_steps: 4,
            decay_steps: 12,
            min_lr: 0.1,
        };
        s.validate().unwrap();
        // Warmup: (it + 1) / (warmup + 1).
        close(s.lr(0), 1.0 / 5.0);
        close(s.lr(1), 2.0 / 5.0);
        close(s.lr(3), 4.0 / 5.0);
        // it == warmup: decay_ratio 0, the peak.
        close(s.lr(4), 1.0);
        // decay_ratio = (8 - 4) / 8 = 0.5: cos(pi/2) = 0, coeff 0.5 -> 0.1 + 0.5 * 0.9.
        close(s.lr(8), 0.55);
        // decay_ratio = (6 - 4) / 8 = 0.25: coeff = 0.5 * (1 + sqrt(2)/2).
        close(s.lr(6), 0.1 + 0.5 * (1.0 + 0.5f64.sqrt()) * 0.9);
        // it == decay_steps: coeff 0 -> min_lr; after it, min_lr.
        close(s.lr(12), 0.1);
        close(s.lr(13), 0.1);
        close(s.lr(1_000), 0.1);
    }

    #[test]
    fn noam_matches_paper() {
        let s = LrSchedule::Noam {
            d_model: 512,
            warmup_steps: 4000,
            factor: 1.0,
        };
        s.validate().unwrap();
        let d = 512f64.powf(-0.5);
        // step 0 is step_num 1: 1 * 4000^-1.5.
        close(s.lr(0), d * 4000f64.powf(-1.5));
        close(s.lr(99), d * 100.0 * 4000f64.powf(-1.5));
        // Peak at step_num == warmup, where both branches agree: 4000^-0.5.
        close(s.lr(3999), d / 4000f64.sqrt());
        assert!(s.lr(3998) < s.lr(3999) && s.lr(4000) < s.lr(3999));
        close(s.lr(15_999), d * 16_000f64.powf(-0.5));
        // The well-known peak value of the paper's base model: ~7.0e-4.
        assert!((s.lr(3999) - 6.9877e-4).abs() < 1e-7);
        let s2 = LrSchedule::Noam {
            d_model: 512,
            warmup_steps: 4000,
            factor: 2.0,
        };
        close(s2.lr(10), 2.0 * s.lr(10));
    }

    #[test]
    fn serde_round_trip_and_strictness() {
        let s: LrSchedule = serde_json::from_str(
            r#"{"kind": "warmup_cosine", "lr": 6e-4, "warmup_steps": 2000,
                "decay_steps": 600000, "min_lr": 6e-5}"#,
        )
        .unwrap();
        assert_eq!(
            s,
            LrSchedule::WarmupCosine {
                lr: 6e-4,
                warmup_steps: 2000,
                decay_steps: 600_000,
                min_lr: 6e-5
            }
        );
        let noam = LrSchedule::Noam {
            d_model: 512,
            warmup_steps: 4000,
            factor: 1.0,
        };
        let json = serde_json::to_string(&noam).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"noam","d_model":512,"warmup_steps":4000,"factor":1.0}"#
        );
        assert_eq!(serde_json::from_str::<LrSchedule>(&json).unwrap(), noam);
        // Unknown fields and kinds are errors, not silently ignored.
        assert!(
            serde_json::from_str::<LrSchedule>(r#"{"kind": "constant", "lr": 1.0, "x": 2}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<LrSchedule>(r#"{"kind": "linear", "lr": 1.0}"#).is_err());
    }

    #[test]
    fn validate_rejects_bad_schedules() {
        let bad = [
            LrSchedule::Constant { lr: -1.0 },
            LrSchedule::Constant { lr: f64::NAN },
            LrSchedule::WarmupCosine {
                lr: 1.0,
                warmup_steps: 10,
                decay_steps: 10,
                min_lr: 0.0,
            },
            LrSchedule::Noam {
                d_model: 512,
                warmup_steps: 0,
                factor: 1.0,
            },
            LrSchedule::Noam {
                d_model: 0,
                warmup_steps: 10,
                factor: 1.0,
            },
        ];
        for s in bad {
            let err = s.validate().unwrap_err();
            assert!(
                matches!(err, Error::Config(_) | Error::Invalid { .. }),
                "{s:?}: {err}"
            );
        }
    }
}
