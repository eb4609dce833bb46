//! Gradient clipping by global norm, and gradient accumulation over micro-batches.

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use crate::Result;

/// Added to the norm before dividing, as in PyTorch, so that a zero gradient cannot divide by 0.
const CLIP_EPS: f64 = 1e-6;

/// The global L2 norm of the gradients of `vars` found in `grads` (vars without a gradient
/// are skipped): `sqrt(sum over vars of sum(g^2))`, computed in f32 or wider whatever the
/// gradients' dtype, with a single device-to-host copy.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sums = Vec::with_capacity(vars.len());
    for var in vars {
        let Some(g) = grads.get(var) else { continue };
        // Sum half-precision gradients in f32; f32 and f64 in their own dtype.
        let g = match g.dtype() {
            DType::F64 | DType::F32 => g.clone(),
            _ => g.to_dtype(DType::F32)?,
        };
        sums.push(g.sqr()?.sum_all()?.to_dtype(DType::F64)?); // ()
    }
    if sums.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?;
    Ok(total.sqrt())
}

/// Scales the gradients of `vars` in `grads` so that their global L2 norm is at most
/// `max_norm`, as `torch.nn.utils.clip_grad_norm_`: with `total` the norm before clipping,
/// every gradient is multiplied by `max_norm / (total + 1e-6)` when that factor is below 1.
/// Returns `total`.
///
/// A non-finite `total` (an overflow or NaN in the backward pass) leaves the gradients as they
/// are: check `total.is_finite()` and skip the optimizer step, rather than clipping an
/// infinity to zeros and NaNs.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let total = grad_norm(grads, vars)?;
    if !total.is_finite() {
        return Ok(total);
    }
    let scale = max_norm / (total + CLIP_EPS);
    if scale < 1.0 {
        for var in vars {
            let Some(g) = grads.get(var) else { continue };
            let scaled = g.affine(scale, 0.0)?;
            grads.insert(var, scaled);
        }
    }
    Ok(total)
}

/// Averages the gradients of a fixed list of vars over several micro-batches, so that a large
/// batch can be processed in pieces (nanoGPT's `gradient_accumulation_steps`).
///
/// Only the vars' gradients are kept: the [`GradStore`] that `backward` returns also holds a
/// gradient for every intermediate tensor, which would otherwise stay alive across
/// micro-batches.
///
/// The result is the mean of the per-micro-batch gradients. It equals the gradient of the whole
/// batch when each micro-batch loss is a mean over the same number of tokens; with padding and
/// an ignore index, micro-batches with fewer real tokens weigh slightly more (as in nanoGPT).
#[derive(Debug)]
pub struct GradAccumulator {
    vars: Vec<Var>,
    /// Running sum per var, `None` until a micro-batch gave that var a gradient.
    sums: Vec<Option<Tensor>>,
    count: usize,
}

impl GradAccumulator {
    /// An empty accumulator for `vars` (the model's trainable parameters).
    pub fn new(vars: &[Var]) -> Self {
        GradAccumulator {
            vars: vars.to_vec(),
            sums: vec![None; vars.len()],
            count: 0,
        }
    }

    /// Adds one micro-batch's gradients. A var without a gradient in `grads` counts as a zero
    /// gradient for this micro-batch.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            let Some(g) = grads.get(var) else { continue };
            *sum = Some(match sum.take() {
                Some(s) => (s + g)?,
                None => g.detach(),
            });
        }
        self.count += 1;
        Ok(())
    }

    /// Number of micro-batches added since the last [`GradAccumulator::finish`].
    pub fn count(&self) -> usize {
        self.count
    }

    /// The mean gradient over the micro-batches added so far, keyed by the vars, and resets the
    /// accumulator for the next optimizer step. Vars that never received a gradient are absent
    /// (the optimizer then skips them). Empty if nothing was added.
    pub fn finish(&mut self) -> Result<GradStore> {
        let mut out = GradStore::default();
        let inv_count = 1.0 / self.count.max(1) as f64;
        for (var, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            let Some(s) = sum.take() else { continue };
            let mean = if self.count == 1 {
                s
            } else {
                s.affine(inv_count, 0.0)?
            };
            out.insert(var, mean);
        }
        self.count = 0;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn store(pairs: &[(&Var, &[f32])]) -> GradStore {
        let mut s = GradStore::default();
        for (var, g) in pairs {
            let t = Tensor::from_slice(g, var.dims(), &Device::Cpu).unwrap();
            s.insert(var, t);
        }
        s
    }

    fn values(grads: &GradStore, var: &Var) -> Vec<f32> {
        grads
            .get(var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn clips_to_max_norm_like_torch() {
        let a = Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        let b = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let c = Var::zeros(3, DType::F32, &Device::Cpu).unwrap(); // no gradient
                                                                  // Norm sqrt(9 + 16 + 0 + 0 + 144) = 13.
        let mut grads = store(&[(&a, &[3.0, 4.0, 0.0, 0.0]), (&b, &[0.0, 12.0])]);
        let vars = [a.clone(), b.clone(), c.clone()];
        let total = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!((total - 13.0).abs() < 1e-6);
        let scale = (1.0 / (13.0 + 1e-6)) as f32;
        let ga = values(&grads, &a);
        let gb = values(&grads, &b);
        for (got, want) in ga.iter().chain(&gb).zip([3.0, 4.0, 0.0, 0.0, 0.0, 12.0]) {
            assert!(
                (got - want * scale).abs() < 1e-7,
                "{got} vs {}",
                want * scale
            );
        }
        assert!(grads.get(&c).is_none());
        // Now the norm is (just under) 1: clipping at 2 changes nothing. (Clipping at 1 again
        // would scale by 1 / (1 + 1e-6) once more, as PyTorch does.)
        let total = clip_grad_norm(&mut grads, &vars, 2.0).unwrap();
        assert!((total - 1.0).abs() < 1e-6);
        assert_eq!(values(&grads, &a), ga);
    }

    #[test]
    fn below_max_norm_and_non_finite_are_left_alone() {
        let a = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let mut grads = store(&[(&a, &[0.3, 0.4])]);
        let total = clip_grad_norm(&mut grads, std::slice::from_ref(&a), 1.0).unwrap();
        assert!((total - 0.5).abs() < 1e-7);
        assert_eq!(values(&grads, &a), [0.3, 0.4]);

        let mut grads = store(&[(&a, &[f32::INFINITY, 1.0])]);
        let total = clip_grad_norm(&mut grads, std::slice::from_ref(&a), 1.0).unwrap();
        assert!(total.is_infinite());
        assert_eq!(values(&grads, &a), [f32::INFINITY, 1.0]);

        assert_eq!(grad_norm(&GradStore::default(), &[a]).unwrap(), 0.0);
    }

    #[test]
    fn accumulator_averages_micro_batches() {
        let a = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let b = Var::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let never = Var::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let mut acc = GradAccumulator::new(&[a.clone(), b.clone(), never.clone()]);
        acc.add(&store(&[(&a, &[1.0, 2.0]), (&b, &[6.0])])).unwrap();
        acc.add(&store(&[(&a, &[3.0, -2.0])])).unwrap(); // b: zero gradient here
        acc.add(&store(&[(&a, &[2.0, 3.0]), (&b, &[3.0])])).unwrap();
        assert_eq!(acc.count(), 3);
        let mean = acc.finish().unwrap();
        assert_eq!(values(&mean, &a), [2.0, 1.0]);
        assert_eq!(values(&mean, &b), [3.0]);
        assert!(mean.get(&never).is_none());

        // Reset after finish; a single micro-batch passes through unchanged.
        assert_eq!(acc.count(), 0);
        acc.add(&store(&[(&b, &[5.0])])).unwrap();
        let mean = acc.finish().unwrap();
        assert_eq!(values(&mean, &b), [5.0]);
        assert!(mean.get(&a).is_none());
    }

    /// Accumulating the gradients of two half-batch mean losses equals the gradient of the
    /// full-batch mean loss.
    #[test]
    fn accumulation_equals_full_batch_gradient() {
        let w = Var::new(&[0.5f64, -1.0, 2.0], &Device::Cpu).unwrap();
        let x = Tensor::new(
            &[
                [1.0f64, 2.0, 3.0],
                [0.0, -1.0, 1.0],
                [2.0, 2.0, -1.0],
                [1.0, 0.0, 0.5],
            ],
            &Device::Cpu,
        )
        .unwrap(); // (4, 3)
        let loss = |x: &Tensor| -> Tensor {
            // mean((x @ w)^2)
            x.broadcast_mul(&w)
                .unwrap()
                .sum(1)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
        };
        let full = loss(&x).backward().unwrap();
        let mut acc = GradAccumulator::new(std::slice::from_ref(&w));
        acc.add(&loss(&x.narrow(0, 0, 2).unwrap()).backward().unwrap())
            .unwrap();
        acc.add(&loss(&x.narrow(0, 2, 2).unwrap()).backward().unwrap())
            .unwrap();
        let mean = acc.finish().unwrap();
        let want: Vec<f64> = full.get(&w).unwrap().to_vec1().unwrap();
        let got: Vec<f64> = mean.get(&w).unwrap().to_vec1().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }
}
