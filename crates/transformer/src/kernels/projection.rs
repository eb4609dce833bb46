//! A sub-layer's output projection as one autograd node:
//! `out = [x +] dropout_out(dropout_in(act(h)) Wᵀ [+ b])`.
//!
//! In a composed graph every intermediate stays alive until the backward ends: the
//! activation's output (d_ff wide in the feed-forward), the product before the bias, and the
//! projection before the residual sum, none of which the backward needs. This node keeps only
//! its inputs (h, W and x are kept by their other consumers anyway) and recomputes the cheap
//! element-wise part, act and the dropout masks, in its backward. Case B of issue 5 keeps
//! 12 instead of 18 (B·T·d_model)-sized tensors per layer.
//!
//! The forward value is computed with ordinary candle ops on detached inputs before the node
//! is made; the custom op's forward only hands it over. A candle custom op takes at most three
//! tensors, so [`project`] with both a bias and a residual adds the residual in a second node.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::bf16::{product, product_t, t_product, Precision};
use super::dropout::{dropout, dropout_add};
use super::gelu::{gelu_erf, gelu_erf_backward};
use super::{with_data, Float, Stash, PAR_MIN_ELEMS};
use crate::autograd::ops::{self, Output};

/// The activation applied to `h` before the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Identity,
    Relu,
    /// Exact GELU (the fused kernel's).
    GeluErf,
}

/// What surrounds the product: activation, dropout inside (on the activation) and outside (on
/// the product, before the residual sum), each as (p, seed) for the counter-based mask.
#[derive(Debug, Clone, Copy)]
pub struct Projection {
    pub act: Act,
    pub dropout_in: Option<(f64, u64)>,
    pub dropout_out: Option<(f64, u64)>,
}

impl Projection {
    /// dropout_in(act(h)), without a graph.
    fn hidden(&self, h: &Tensor) -> Result<Tensor> {
        let a = match self.act {
            Act::Identity => h.clone(),
            Act::Relu => h.relu()?,
            Act::GeluErf => gelu_erf(h)?,
        };
        match self.dropout_in {
            Some((p, seed)) => dropout(&a, p, seed),
            None => Ok(a),
        }
    }
}

/// `[x +] dropout_out(dropout_in(act(h)) Wᵀ [+ b])` as one node (two with both `b` and `x`).
///
/// # Shapes
/// `h`: (..., F), `w`: (C, F), `b`: (C,), `x`: (..., C) → (..., C)
pub fn project(
    h: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    x: Option<&Tensor>,
    cfg: Projection,
) -> Result<Tensor> {
    if let (Some(b), Some(x)) = (b, x) {
        let z = project(
            h,
            w,
            Some(b),
            None,
            Projection {
                dropout_out: None,
                ..cfg
            },
        )?;
        return match cfg.dropout_out {
            Some((p, seed)) => dropout_add(x, &z, p, seed),
            None => ops::add(x, &z),
        };
    }
    let (c, f) = w.dims2()?;
    let h_dims = h.dims();
    if h_dims.last() != Some(&f) {
        candle_core::bail!("projection: h is {h_dims:?}, weight is ({c}, {f})");
    }
    let mut out_dims = h_dims.to_vec();
    *out_dims.last_mut().unwrap() = c;
    if let Some(x) = x {
        if x.dims() != out_dims.as_slice() {
            candle_core::bail!(
                "projection: residual is {:?}, output {out_dims:?}",
                x.dims()
            );
        }
    }
    // The value, from detached inputs: no node holds these intermediates (and no tape
    // records them). The backward's products take the forward's precision.
    let precision = super::bf16::current();
    let n = h.elem_count() / f;
    let value = crate::autograd::paused(|| -> Result<Tensor> {
        let a = cfg.hidden(&h.detach().contiguous()?)?.reshape((n, f))?;
        let mut z = product_t(&a, &w.detach(), precision)?;
        drop(a);
        if let Some(b) = b {
            z = z.broadcast_add(&b.detach())?;
        }
        let z = z.reshape(out_dims)?;
        let value = match (x, cfg.dropout_out) {
            (Some(x), Some((p, seed))) => dropout_add(&x.detach(), &z, p, seed)?,
            (Some(x), None) => (x.detach() + z)?,
            (None, Some((p, seed))) => dropout(&z, p, seed)?,
            (None, None) => z,
        };
        Ok(value)
    })?;
    let op = ProjectOp {
        cfg,
        precision,
        value: Stash::new(value),
    };
    match (x, b) {
        (Some(x), None) => ops::apply_op3(x, h, w, op, Output::Unused),
        (None, Some(b)) => ops::apply_op3(h, w, b, op, Output::Unused),
        (None, None) => ops::apply_op2(h, w, op, Output::Unused),
        (Some(_), Some(_)) => unreachable!("split above"),
    }
}

struct ProjectOp {
    cfg: Projection,
    precision: Precision,
    value: Stash,
}

impl ProjectOp {
    /// (dh, dW, db): the gradients of everything but the residual, whose gradient is `grad`.
    fn grads(
        &self,
        h: &Tensor,
        w: &Tensor,
        with_bias: bool,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        // Detached, or the gradients computed from them would be graph nodes holding the
        // forward graph (and the recomputed activation) alive as long as the gradients live.
        let (h, w) = (&h.detach(), &w.detach());
        let (c, f) = w.dims2()?;
        let n = h.elem_count() / f;
        let g = grad.contiguous()?.reshape((n, c))?;
        let gz = match self.cfg.dropout_out {
            Some((p, seed)) => dropout(&g, p, seed)?,
            None => g,
        };
        let h2 = h.contiguous()?.reshape((n, f))?;
        let dw = {
            let a = self.cfg.hidden(&h2)?;
            t_product(&gz, &a, self.precision)?
        };
        let db = if with_bias { Some(gz.sum(0)?) } else { None };
        let mut da = product(&gz, w, self.precision)?;
        drop(gz);
        if let Some((p, seed)) = self.cfg.dropout_in {
            da = dropout(&da, p, seed)?;
        }
        let dh = match self.cfg.act {
            Act::Identity => da,
            Act::Relu => relu_backward(&h2, &da)?,
            Act::GeluErf => gelu_erf_backward(&h2, &da)?,
        };
        Ok((dh.reshape(h.shape())?, dw, db))
    }
}

impl CustomOp2 for ProjectOp {
    fn name(&self) -> &'static str {
        "fused-projection"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.take()
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dh, dw, _) = self.grads(h, w, false, grad)?;
        Ok((Some(dh), Some(dw)))
    }
}

impl CustomOp3 for ProjectOp {
    fn name(&self) -> &'static str {
        "fused-projection"
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

    /// Inputs are (x, h, W) with a residual, (h, W, b) with a bias.
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if a3.rank() == 1 {
            let (dh, dw, db) = self.grads(a1, a2, true, grad)?;
            Ok((Some(dh), Some(dw), db))
        } else {
            let (dh, dw, _) = self.grads(a2, a3, false, grad)?;
            Ok((Some(grad.clone()), Some(dh), Some(dw)))
        }
    }
}

/// dy where h > 0, else 0 (PyTorch's `threshold_backward`).
fn relu_backward(h: &Tensor, dy: &Tensor) -> Result<Tensor> {
    fn run<T: Float>(h: &[T], dy: &[T]) -> Vec<T> {
        let f = |(&x, &g): (&T, &T)| if x > T::ZERO { g } else { T::ZERO };
        if h.len() >= PAR_MIN_ELEMS {
            h.par_iter().zip(dy.par_iter()).map(f).collect()
        } else {
            h.iter().zip(dy).map(f).collect()
        }
    }
    match h.dtype() {
        DType::F32 => {
            let v = with_data::<f32, _>(h, |hs| with_data::<f32, _>(dy, |gs| Ok(run(hs, gs))))?;
            Tensor::from_vec(v, h.shape(), h.device())
        }
        _ => {
            let v = with_data::<f64, _>(h, |hs| with_data::<f64, _>(dy, |gs| Ok(run(hs, gs))))?;
            Tensor::from_vec(v, h.shape(), h.device())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::max_diff;
    use crate::rng::Rng;
    use candle_core::{Device, Var};

    fn randn(rng: &mut Rng, dims: &[usize]) -> Var {
        Var::from_tensor(&crate::kernels::tests::randn(rng, dims, DType::F64)).unwrap()
    }

    /// The same function from ordinary ops (and the same dropout masks).
    fn composed(
        h: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        x: Option<&Tensor>,
        cfg: Projection,
    ) -> Tensor {
        let a = match cfg.act {
            Act::Identity => h.clone(),
            Act::Relu => h.relu().unwrap(),
            // The kernel, tested against finite differences (candle's f64 erf backward is
            // off by about 1e-6).
            Act::GeluErf => gelu_erf(h).unwrap(),
        };
        let a = match cfg.dropout_in {
            Some((p, s)) => dropout(&a, p, s).unwrap(),
            None => a,
        };
        let mut z = a.broadcast_matmul(&w.t().unwrap()).unwrap();
        if let Some(b) = b {
            z = z.broadcast_add(b).unwrap();
        }
        let z = match cfg.dropout_out {
            Some((p, s)) => dropout(&z, p, s).unwrap(),
            None => z,
        };
        match x {
            Some(x) => (x + z).unwrap(),
            None => z,
        }
    }

    #[test]
    fn matches_composed_value_and_gradients() {
        let mut rng = Rng::new(3);
        // 2·40·24 rows·inputs: above the parallel threshold in the element-wise parts.
        let (bsz, t, f, c) = (2, 40, 24, 6);
        let acts = [Act::Identity, Act::Relu, Act::GeluErf];
        let drops = [None, Some((0.3, 17u64))];
        for act in acts {
            for dropout_in in drops {
                for dropout_out in drops {
                    for (with_b, with_x) in
                        [(false, false), (true, false), (false, true), (true, true)]
                    {
                        let cfg = Projection {
                            act,
                            dropout_in,
                            dropout_out,
                        };
                        let h = randn(&mut rng, &[bsz, t, f]);
                        let w = randn(&mut rng, &[c, f]);
                        let b = randn(&mut rng, &[c]);
                        let x = randn(&mut rng, &[bsz, t, c]);
                        let g = randn(&mut rng, &[bsz, t, c]);
                        let bo = with_b.then_some(b.as_tensor());
                        let xo = with_x.then_some(x.as_tensor());
                        let case = format!("{cfg:?} bias {with_b} residual {with_x}");
                        let fused = project(&h, &w, bo, xo, cfg).unwrap();
                        let reference = composed(&h, &w, bo, xo, cfg);
                        let d = max_diff(&fused, &reference);
                        assert!(d < 1e-12, "{case}: value differs by {d}");
                        let gf = (fused * g.as_tensor())
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .backward()
                            .unwrap();
                        let gr = (reference * g.as_tensor())
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .backward()
                            .unwrap();
                        let mut vars = vec![("h", &h), ("w", &w)];
                        if with_b {
                            vars.push(("b", &b));
                        }
                        if with_x {
                            vars.push(("x", &x));
                        }
                        for (name, v) in vars {
                            let a = gf
                                .get(v)
                                .unwrap_or_else(|| panic!("{case}: no grad for {name}"));
                            let r = gr.get(v).unwrap();
                            let d = max_diff(a, r);
                            assert!(d < 1e-10, "{case}: d{name} differs by {d}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn f32_runs_and_bad_shapes_are_errors() {
        let mut rng = Rng::new(5);
        let h = randn(&mut rng, &[3, 8]).to_dtype(DType::F32).unwrap();
        let w = randn(&mut rng, &[4, 8]).to_dtype(DType::F32).unwrap();
        let cfg = Projection {
            act: Act::GeluErf,
            dropout_in: None,
            dropout_out: None,
        };
        let y = project(&h, &w, None, None, cfg).unwrap();
        assert_eq!(y.dims(), &[3, 4]);
        let want = composed(&h, &w, None, None, cfg);
        assert!(max_diff(&y, &want) < 1e-5);
        assert!(project(&h, &w.t().unwrap(), None, None, cfg).is_err());
        let x = Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(project(&h, &w, None, Some(&x), cfg).is_err());
    }
}
