//! Numeric validation in one place: every config field and flag that takes a number is checked
//! through these helpers, so that each error names the field, the value and the allowed range
//! the same way ("invalid schedule.min_lr: must be at most schedule.lr = 0.001, got 0.01").
//! Library callers (run configs, decoding options) and the CLI's flags use the same checks;
//! new surfaces (GGUF options, audio, images, HTTP parameters) should too.
//!
//! The other half of numeric safety, finiteness of tensors (parameters, optimizer moments,
//! logits), is [`all_finite`] / [`check_finite_logits`]: a non-finite value must stop the job
//! with an error, never be written to disk or decoded as token 0.

use candle_core::{DType, Tensor};

use crate::{Error, Result};

/// The smallest temperature other than 0 that sampling accepts.
///
/// Sampling divides the logits by the temperature. Below this, the distribution is greedy to
/// within f32 rounding for any realistic logit gap, and dividing by ever smaller numbers only
/// risks overflowing `logits / T` to infinity (at 1e-38 and below, f32 logits of ordinary size
/// already do), which turns the softmax into NaN. 0 asks for greedy decoding explicitly.
pub const MIN_TEMPERATURE: f64 = 1e-4;

/// A number as an error message shows it: `1e-38` rather than 38 zeros, `1e300` rather than
/// 300 digits; ordinary values as Rust prints them (`0.001`, `NaN`, `inf`).
pub fn show(value: f64) -> String {
    let a = value.abs();
    if value.is_finite() && a != 0.0 && !(1e-4..1e16).contains(&a) {
        format!("{value:e}")
    } else {
        value.to_string()
    }
}

/// `value` must be finite (not NaN, not ±inf).
pub fn finite(field: &str, value: f64) -> Result<f64> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Error::invalid(field, "a finite number", show(value)))
    }
}

/// `value` must be finite and `> 0`.
pub fn positive(field: &str, value: f64) -> Result<f64> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(Error::invalid(field, "a finite number > 0", show(value)))
    }
}

/// `value` must be finite and `>= 0`.
pub fn non_negative(field: &str, value: f64) -> Result<f64> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(Error::invalid(field, "a finite number >= 0", show(value)))
    }
}

/// `value` must lie in `[lo, hi)` (a probability-like field: dropout, betas, smoothing).
pub fn in_half_open(field: &str, value: f64, lo: f64, hi: f64) -> Result<f64> {
    if value.is_finite() && value >= lo && value < hi {
        Ok(value)
    } else {
        Err(Error::invalid(
            field,
            format!("in [{lo}, {hi})"),
            show(value),
        ))
    }
}

/// `value` must lie in `(lo, hi]` (a fraction that may be whole: top_p, train_fraction).
pub fn in_open_closed(field: &str, value: f64, lo: f64, hi: f64) -> Result<f64> {
    if value.is_finite() && value > lo && value <= hi {
        Ok(value)
    } else {
        Err(Error::invalid(
            field,
            format!("in ({lo}, {hi}]"),
            show(value),
        ))
    }
}

/// A count that must be at least 1.
pub fn at_least_one(field: &str, value: u64) -> Result<u64> {
    if value >= 1 {
        Ok(value)
    } else {
        Err(Error::invalid(field, "at least 1", value.to_string()))
    }
}

/// A count in `[lo, hi]`: the upper bound keeps a typo (`batch_size = 1e9` written as an
/// integer) from becoming an allocation that takes the machine down instead of an error.
pub fn count_in(field: &str, value: u64, lo: u64, hi: u64) -> Result<u64> {
    if (lo..=hi).contains(&value) {
        Ok(value)
    } else {
        Err(Error::invalid(
            field,
            format!("in [{lo}, {hi}]"),
            value.to_string(),
        ))
    }
}

/// `small <= large` between two fields (e.g. `schedule.min_lr <= schedule.lr`).
pub fn at_most(field: &str, value: f64, bound_field: &str, bound: f64) -> Result<()> {
    if value <= bound {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("at most {bound_field} = {}", show(bound)),
            show(value),
        ))
    }
}

/// A sampling temperature: 0 (greedy) or at least [`MIN_TEMPERATURE`], and finite.
pub fn temperature(field: &str, value: f64) -> Result<f64> {
    if value == 0.0 || (value.is_finite() && value >= MIN_TEMPERATURE) {
        Ok(value)
    } else {
        Err(Error::invalid(
            field,
            format!(
                "0 (greedy) or a finite number >= {MIN_TEMPERATURE} (smaller temperatures \
                 overflow logits / temperature; use 0 for greedy decoding)"
            ),
            show(value),
        ))
    }
}

/// Every float in a TOML table (recursively) must be finite. TOML accepts `nan` and `inf`,
/// and JSON (which model configs go through) has no such values: serde turns them into `null`
/// and the error would say "invalid type: null" without naming the field.
pub fn toml_finite(prefix: &str, table: &toml::Table) -> Result<()> {
    fn walk(path: &str, v: &toml::Value) -> Result<()> {
        match v {
            toml::Value::Float(x) => finite(path, *x).map(|_| ()),
            toml::Value::Table(t) => {
                for (k, v) in t {
                    walk(&format!("{path}.{k}"), v)?;
                }
                Ok(())
            }
            toml::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(&format!("{path}[{i}]"), v)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        walk(&path, v)?;
    }
    Ok(())
}

/// Whether every element of `t` is finite, reduced on the tensor's device: `t - t` is 0 for a
/// finite element and NaN for NaN or ±inf, and a sum with one NaN in it is NaN.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if !t.dtype().is_float() {
        return Ok(true);
    }
    // `t - t` on purpose (clippy's eq_op): it is the finiteness test.
    #[allow(clippy::eq_op)]
    let zeros = (t - t)?;
    let s = zeros.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(s == 0.0)
}

/// The first of `tensors` (by name) holding a NaN or an infinity.
pub fn first_non_finite<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<Option<String>> {
    for (name, t) in tensors {
        if !all_finite(t)? {
            return Ok(Some(name.to_string()));
        }
    }
    Ok(None)
}

/// Logits (or log-probabilities) a decoder is about to choose from must not hold NaN or +inf;
/// -inf is a blocked token and allowed. Without this check NaN compares false everywhere and
/// argmax and sampling fall back to token 0: silent garbage instead of an error.
pub fn check_finite_logits(what: &str, logits: &[f32]) -> Result<()> {
    if let Some((i, x)) = logits
        .iter()
        .enumerate()
        .find(|(_, x)| x.is_nan() || **x == f32::INFINITY)
    {
        return Err(Error::msg(format!(
            "{what}: the model produced a non-finite logit ({x} for token {i}); its weights are \
             probably non-finite (a diverged training run) or overflow on this input"
        )));
    }
    if !logits.is_empty() && logits.iter().all(|x| *x == f32::NEG_INFINITY) {
        return Err(Error::msg(format!(
            "{what}: every token has probability 0 (all logits are -inf)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ranges_name_field_value_and_range() {
        let e = positive("optimizer.eps", 0.0).unwrap_err().to_string();
        assert!(e.contains("optimizer.eps") && e.contains("> 0") && e.contains("got 0"));
        let e = at_most("schedule.min_lr", 0.1, "schedule.lr", 0.01)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("schedule.min_lr") && e.contains("schedule.lr = 0.01"),
            "{e}"
        );
        assert!(in_half_open("model.dropout", f64::NAN, 0.0, 1.0).is_err());
        assert!(in_half_open("model.dropout", 0.5, 0.0, 1.0).is_ok());
        assert!(count_in("train.batch_size", 1 << 40, 1, 1 << 20).is_err());
    }

    #[test]
    fn temperature_is_zero_or_not_tiny() {
        assert!(temperature("t", 0.0).is_ok());
        assert!(temperature("t", 0.7).is_ok());
        for bad in [
            1e-38,
            1e-300,
            f64::MIN_POSITIVE,
            -1.0,
            f64::NAN,
            f64::INFINITY,
        ] {
            let e = temperature("--temperature", bad).unwrap_err().to_string();
            assert!(e.contains("--temperature") && e.contains("greedy"), "{e}");
        }
    }

    #[test]
    fn toml_non_finite_floats_are_named() {
        let t: toml::Table = "dropout = nan\n[x]\ny = [1.0, inf]".parse().unwrap();
        let e = toml_finite("model", &t).unwrap_err().to_string();
        assert!(e.contains("model.dropout") && e.contains("NaN"), "{e}");
        let t: toml::Table = "[x]\ny = [1.0, inf]".parse().unwrap();
        let e = toml_finite("model", &t).unwrap_err().to_string();
        assert!(e.contains("model.x.y[1]") && e.contains("inf"), "{e}");
    }

    #[test]
    fn finiteness_of_tensors_and_logits() -> Result<()> {
        let ok = Tensor::new(&[1.0f32, -2.0, 3e38], &Device::Cpu)?;
        assert!(all_finite(&ok)?);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = Tensor::new(&[1.0f32, bad], &Device::Cpu)?;
            assert!(!all_finite(&t)?, "{bad}");
        }
        let name = first_non_finite([("a", &ok), ("b", &Tensor::new(&[f32::NAN], &Device::Cpu)?)])?;
        assert_eq!(name.as_deref(), Some("b"));
        assert!(check_finite_logits("x", &[0.0, f32::NEG_INFINITY]).is_ok());
        assert!(check_finite_logits("x", &[0.0, f32::NAN]).is_err());
        assert!(check_finite_logits("x", &[f32::INFINITY]).is_err());
        assert!(check_finite_logits("x", &[f32::NEG_INFINITY]).is_err());
        Ok(())
    }
}
