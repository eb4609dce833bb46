//! `LN(x) Wᵀ`, a layer norm (or RMS norm) without bias followed by a linear layer without bias
//! (a pre-norm sub-layer's first step in GPT- and Llama-style models), as one autograd node that recomputes the
//! norm in its backward. The graph then keeps `x` (the residual stream, kept anyway) instead
//! of the norm's output: one (B·T·d_model) tensor less per sub-layer.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::bf16::{product, product_t, t_product, Precision};
use super::layer_norm::{norm, norm_backward, Centre};
use super::Stash;

/// `layer_norm(x, gamma, no bias, eps) · Wᵀ`.
///
/// # Shapes
/// `x`: (..., C), `gamma`: (C,), `w`: (C_out, C) → (..., C_out)
pub fn norm_linear(x: &Tensor, gamma: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    norm_linear_with(x, gamma, w, eps, Centre::Mean)
}

/// `rms_norm(x, gamma, eps) · Wᵀ`.
///
/// # Shapes
/// `x`: (..., C), `gamma`: (C,), `w`: (C_out, C) → (..., C_out)
pub fn rms_norm_linear(x: &Tensor, gamma: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    norm_linear_with(x, gamma, w, eps, Centre::None)
}

fn norm_linear_with(
    x: &Tensor,
    gamma: &Tensor,
    w: &Tensor,
    eps: f64,
    centre: Centre,
) -> Result<Tensor> {
    let (c_out, c) = w.dims2()?;
    if x.dims().last() != Some(&c) || gamma.dims() != [c] {
        candle_core::bail!(
            "norm-linear: x {:?}, norm weight {:?}, linear weight ({c_out}, {c})",
            x.dims(),
            gamma.dims()
        );
    }
    let n = x.elem_count() / c;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().unwrap() = c_out;
    // Computed aside from any tape: the node below is the only one. The backward's products
    // take the forward's precision.
    let precision = super::bf16::current();
    let value = crate::autograd::paused(|| -> Result<Tensor> {
        let normed = norm(&x.detach(), &gamma.detach(), None, eps, centre)?.reshape((n, c))?;
        product_t(&normed, &w.detach(), precision)?.reshape(out_dims)
    })?;
    let op = NormLinear {
        eps,
        centre,
        precision,
        value: Stash::new(value),
    };
    use crate::autograd::ops;
    ops::apply_op3(&ops::contiguous(x)?, gamma, w, op, ops::Output::Unused)
}

struct NormLinear {
    eps: f64,
    centre: Centre,
    precision: Precision,
    value: Stash,
}

impl CustomOp3 for NormLinear {
    fn name(&self) -> &'static str {
        "fused-norm-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.take()
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: gradients built from graph tensors would keep the graph alive.
        let (x, gamma, w) = (x.detach(), gamma.detach(), w.detach());
        let (c_out, c) = w.dims2()?;
        let n = x.elem_count() / c;
        let x2 = x.reshape((n, c))?;
        let g = grad.contiguous()?.reshape((n, c_out))?;
        let dw = {
            let normed = norm(&x2, &gamma, None, self.eps, self.centre)?;
            t_product(&g, &normed, self.precision)?
        };
        let d_normed = product(&g, &w, self.precision)?;
        let (dx, dgamma, _) = norm_backward(&x2, &gamma, &d_normed, self.eps, self.centre)?;
        Ok((Some(dx.reshape(x.shape())?), Some(dgamma), Some(dw)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::max_diff;
    use crate::rng::Rng;
    use candle_core::{DType, Var};

    fn randn(rng: &mut Rng, dims: &[usize]) -> Var {
        Var::from_tensor(&crate::kernels::tests::randn(rng, dims, DType::F64)).unwrap()
    }

    #[test]
    fn matches_norm_then_matmul_in_value_and_gradients() {
        let mut rng = Rng::new(9);
        let (b, t, c, c_out) = (3, 70, 12, 20);
        let x = randn(&mut rng, &[b, t, c]);
        let gamma = randn(&mut rng, &[c]);
        let w = randn(&mut rng, &[c_out, c]);
        let g = randn(&mut rng, &[b, t, c_out]);
        let fused = norm_linear(&x, &gamma, &w, 1e-5).unwrap();
        let composed = crate::nn::norm::layer_norm_composed(&x, &gamma, None, 1e-5)
            .unwrap()
            .broadcast_matmul(&w.t().unwrap())
            .unwrap();
        assert!(max_diff(&fused, &composed) < 1e-12);
        let gf = (fused * g.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (composed * g.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("gamma", &gamma), ("w", &w)] {
            let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(d < 1e-10, "d{name} differs by {d}");
        }
        // Bad shapes are errors, not panics.
        assert!(norm_linear(&x, &gamma, &w.t().unwrap(), 1e-5).is_err());
    }

    #[test]
    fn rms_variant_matches_rms_norm_then_matmul() {
        let mut rng = Rng::new(10);
        let (b, t, c, c_out) = (2, 33, 12, 20);
        let x = randn(&mut rng, &[b, t, c]);
        let gamma = randn(&mut rng, &[c]);
        let w = randn(&mut rng, &[c_out, c]);
        let g = randn(&mut rng, &[b, t, c_out]);
        let fused = rms_norm_linear(&x, &gamma, &w, 1e-6).unwrap();
        let composed = crate::nn::norm::rms_norm_composed(&x, &gamma, 1e-6)
            .unwrap()
            .broadcast_matmul(&w.t().unwrap())
            .unwrap();
        assert!(max_diff(&fused, &composed) < 1e-12);
        let grads = |y: Tensor| {
            (y * g.as_tensor())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (gf, gc) = (grads(fused), grads(composed));
        for (name, v) in [("x", &x), ("gamma", &gamma), ("w", &w)] {
            let d = max_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(d < 1e-10, "d{name} differs by {d}");
        }
    }
}
