//! The ops a recorded forward pass may use: candle's ops and our kernels' custom ops, each with
//! its backward. Without a tape each is exactly candle's op (candle's graph included).
//!
//! While a tape records, an op none of whose inputs is tracked is candle's op too, and its
//! output is declared a constant ([`super::constant`]): a mask or a position table sliced
//! during the forward.
//!
//! The backwards mirror candle's (`candle_core::backprop`) op by op, so that the two engines
//! give the same gradients; they differ in what is kept and in how gradients are summed.

use candle_core::shape::{Dim, ShapeWithOneHole};
use candle_core::{CustomOp1, CustomOp2, CustomOp3, Result, Shape, Tensor};

use super::Recording;

/// `x.reshape(shape)`.
pub fn reshape<S: ShapeWithOneHole>(x: &Tensor, shape: S) -> Result<Tensor> {
    let Some(rec) = Recording::of("reshape", &[x])? else {
        return x.reshape(shape).map(super::constant);
    };
    let dims = x.dims().to_vec();
    let y = rec.input(0).reshape(shape)?;
    rec.finish("reshape", y, move |g| Ok(vec![Some(g.reshape(dims)?)]))
}

/// `x.transpose(d1, d2)`.
pub fn transpose<D1: Dim, D2: Dim>(x: &Tensor, d1: D1, d2: D2) -> Result<Tensor> {
    let Some(rec) = Recording::of("transpose", &[x])? else {
        return x.transpose(d1, d2).map(super::constant);
    };
    let (d1, d2) = (
        d1.to_index(x.shape(), "transpose")?,
        d2.to_index(x.shape(), "transpose")?,
    );
    let y = rec.input(0).transpose(d1, d2)?;
    rec.finish("transpose", y, move |g| {
        Ok(vec![Some(g.transpose(d1, d2)?)])
    })
}

/// `x.t()`: the last two dimensions swapped.
pub fn t(x: &Tensor) -> Result<Tensor> {
    let rank = x.rank();
    if rank < 2 {
        candle_core::bail!("t: a tensor of rank {rank}");
    }
    transpose(x, rank - 2, rank - 1)
}

/// `x.contiguous()`.
pub fn contiguous(x: &Tensor) -> Result<Tensor> {
    if x.is_contiguous() {
        return Ok(x.clone());
    }
    let Some(rec) = Recording::of("contiguous", &[x])? else {
        return x.contiguous().map(super::constant);
    };
    let y = rec.input(0).contiguous()?;
    rec.finish("contiguous", y, |g| Ok(vec![Some(g.clone())]))
}

/// `x.narrow(dim, start, len)`.
pub fn narrow<D: Dim>(x: &Tensor, dim: D, start: usize, len: usize) -> Result<Tensor> {
    let Some(rec) = Recording::of("narrow", &[x])? else {
        return x.narrow(dim, start, len).map(super::constant);
    };
    let dim = dim.to_index(x.shape(), "narrow")?;
    let size = x.dims()[dim];
    let y = rec.input(0).narrow(dim, start, len)?;
    rec.finish("narrow", y, move |g| {
        let right = size - start - len;
        Ok(vec![Some(if start == 0 && right == 0 {
            g.clone()
        } else {
            g.pad_with_zeros(dim, start, right)?
        })])
    })
}

/// `a + b`, of one shape.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let Some(rec) = Recording::of("add", &[a, b])? else {
        return (a + b).map(super::constant);
    };
    let y = (rec.input(0) + rec.input(1))?;
    rec.finish("add", y, |g| Ok(vec![Some(g.clone()), Some(g.clone())]))
}

/// The gradient of a tensor of shape `to` broadcast to `g`'s shape: `g` summed over the
/// broadcast dimensions (candle's `Op::Broadcast` backward).
fn sum_to(g: &Tensor, to: &Shape) -> Result<Tensor> {
    if g.shape() == to {
        return Ok(g.clone());
    }
    let (node, arg) = (g.dims(), to.dims());
    let left = node.len() - arg.len();
    let mut sum_dims: Vec<usize> = (0..left).collect();
    for (i, (n, a)) in node[left..].iter().zip(arg).enumerate() {
        if n != a {
            sum_dims.push(i + left);
        }
    }
    let mut s = g.sum_keepdim(sum_dims.as_slice())?;
    for _ in 0..left {
        s = s.squeeze(0)?;
    }
    Ok(s)
}

/// `a.broadcast_add(b)`.
pub fn broadcast_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let Some(rec) = Recording::of("broadcast_add", &[a, b])? else {
        return a.broadcast_add(b).map(super::constant);
    };
    let (sa, sb) = (a.shape().clone(), b.shape().clone());
    let (na, nb) = (rec.needs_grad(0), rec.needs_grad(1));
    let y = rec.input(0).broadcast_add(rec.input(1))?;
    rec.finish("broadcast_add", y, move |g| {
        Ok(vec![
            na.then(|| sum_to(g, &sa)).transpose()?,
            nb.then(|| sum_to(g, &sb)).transpose()?,
        ])
    })
}

/// `x.affine(mul, add)`: `x · mul + add`.
pub fn affine(x: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    let Some(rec) = Recording::of("affine", &[x])? else {
        return x.affine(mul, add).map(super::constant);
    };
    let y = rec.input(0).affine(mul, add)?;
    rec.finish("affine", y, move |g| Ok(vec![Some(g.affine(mul, 0.0)?)]))
}

/// `x.sum_all()`.
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    let Some(rec) = Recording::of("sum_all", &[x])? else {
        return x.sum_all().map(super::constant);
    };
    let shape = x.shape().clone();
    let y = rec.input(0).sum_all()?;
    rec.finish("sum_all", y, move |g| {
        Ok(vec![Some(g.broadcast_as(shape)?)])
    })
}

/// `a.matmul(b)`. Keeps both inputs for the backward.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let Some(rec) = Recording::of("matmul", &[a, b])? else {
        return a.matmul(b).map(super::constant);
    };
    let (na, nb) = (rec.needs_grad(0), rec.needs_grad(1));
    let (a0, b0) = (rec.input(0).clone(), rec.input(1).clone());
    let y = a0.matmul(&b0)?;
    rec.finish("matmul", y, move |g| {
        let ga = if na { Some(g.matmul(&b0.t()?)?) } else { None };
        let gb = if nb { Some(a0.t()?.matmul(g)?) } else { None };
        Ok(vec![ga, gb])
    })
}

/// `table.index_select(ids, dim)`: rows of a table (an embedding lookup). Keeps the ids.
pub fn index_select<D: Dim>(table: &Tensor, ids: &Tensor, dim: D) -> Result<Tensor> {
    let Some(rec) = Recording::of("index_select", &[table, ids])? else {
        return table.index_select(ids, dim).map(super::constant);
    };
    let dim = dim.to_index(table.shape(), "index_select")?;
    let (shape, dtype, device) = (table.shape().clone(), table.dtype(), table.device().clone());
    let ids = rec.input(1).contiguous()?;
    let y = rec.input(0).index_select(&ids, dim)?;
    rec.finish("index_select", y, move |g| {
        let zeros = Tensor::zeros(shape, dtype, &device)?;
        Ok(vec![Some(zeros.index_add(&ids, g, dim)?), None])
    })
}

/// Whether a custom op's backward reads its output (`res`): the node then keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Kept,
    Unused,
}

/// What a custom op's backward gets as `res` when it does not read it.
fn placeholder(like: &Tensor) -> Result<Tensor> {
    Tensor::zeros(0, like.dtype(), like.device())
}

/// `x.apply_op1(op)`, with the op's own backward.
pub fn apply_op1<C: CustomOp1 + Send + Sync + 'static>(
    x: &Tensor,
    op: C,
    output: Output,
) -> Result<Tensor> {
    let Some(rec) = Recording::of(op.name(), &[x])? else {
        return x.apply_op1(op).map(super::constant);
    };
    let name = op.name();
    let x0 = rec.input(0).clone();
    let y = x0.apply_op1_no_bwd(&op)?;
    let res = match output {
        Output::Kept => y.clone(),
        Output::Unused => placeholder(&y)?,
    };
    rec.finish(name, y, move |g| Ok(vec![op.bwd(&x0, &res, g)?]))
}

/// `a.apply_op2(b, op)`, with the op's own backward.
pub fn apply_op2<C: CustomOp2 + Send + Sync + 'static>(
    a: &Tensor,
    b: &Tensor,
    op: C,
    output: Output,
) -> Result<Tensor> {
    let Some(rec) = Recording::of(op.name(), &[a, b])? else {
        return a.apply_op2(b, op).map(super::constant);
    };
    let name = op.name();
    let (a0, b0) = (rec.input(0).clone(), rec.input(1).clone());
    let y = a0.apply_op2_no_bwd(&b0, &op)?;
    let res = match output {
        Output::Kept => y.clone(),
        Output::Unused => placeholder(&y)?,
    };
    rec.finish(name, y, move |g| {
        let (ga, gb) = op.bwd(&a0, &b0, &res, g)?;
        Ok(vec![ga, gb])
    })
}

/// `a.apply_op3(b, c, op)`, with the op's own backward.
pub fn apply_op3<C: CustomOp3 + Send + Sync + 'static>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: C,
    output: Output,
) -> Result<Tensor> {
    let Some(rec) = Recording::of(op.name(), &[a, b, c])? else {
        return a.apply_op3(b, c, op).map(super::constant);
    };
    let name = op.name();
    let (a0, b0, c0) = (
        rec.input(0).clone(),
        rec.input(1).clone(),
        rec.input(2).clone(),
    );
    let y = a0.apply_op3_no_bwd(&b0, &c0, &op)?;
    let res = match output {
        Output::Kept => y.clone(),
        Output::Unused => placeholder(&y)?,
    };
    rec.finish(name, y, move |g| {
        let (ga, gb, gc) = op.bwd(&a0, &b0, &c0, &res, g)?;
        Ok(vec![ga, gb, gc])
    })
}

/// `x.permute(dims)`.
pub fn permute(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let Some(rec) = Recording::of("permute", &[x])? else {
        return x.permute(dims).map(super::constant);
    };
    // The inverse permutation takes the gradient back.
    let mut inverse = vec![0; dims.len()];
    for (i, &d) in dims.iter().enumerate() {
        inverse[d] = i;
    }
    let y = rec.input(0).permute(dims)?;
    rec.finish("permute", y, move |g| Ok(vec![Some(g.permute(inverse)?)]))
}

/// `x.squeeze(dim)` (a reshape).
pub fn squeeze<D: Dim>(x: &Tensor, dim: D) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "squeeze")?;
    let mut dims = x.dims().to_vec();
    if dims[dim] != 1 {
        return x.squeeze(dim);
    }
    dims.remove(dim);
    reshape(x, dims)
}

/// `Tensor::cat(xs, dim)`.
pub fn cat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let Some(rec) = Recording::of("cat", xs)? else {
        return Tensor::cat(xs, dim).map(super::constant);
    };
    let sizes: Vec<usize> = xs.iter().map(|x| x.dims()[dim]).collect();
    let needs: Vec<bool> = (0..xs.len()).map(|i| rec.needs_grad(i)).collect();
    let inputs: Vec<&Tensor> = (0..xs.len()).map(|i| rec.input(i)).collect();
    let y = Tensor::cat(&inputs, dim)?;
    rec.finish("cat", y, move |g| {
        let mut start = 0;
        let mut grads = Vec::with_capacity(sizes.len());
        for (&len, &need) in sizes.iter().zip(&needs) {
            grads.push(need.then(|| g.narrow(dim, start, len)).transpose()?);
            start += len;
        }
        Ok(grads)
    })
}

/// `x.broadcast_as(shape)`.
pub fn broadcast_as<S: Into<Shape>>(x: &Tensor, shape: S) -> Result<Tensor> {
    let Some(rec) = Recording::of("broadcast_as", &[x])? else {
        return x.broadcast_as(shape).map(super::constant);
    };
    let from = x.shape().clone();
    let y = rec.input(0).broadcast_as(shape)?;
    rec.finish("broadcast_as", y, move |g| {
        Ok(vec![Some(sum_to(g, &from)?)])
    })
}

/// `a - b`, of one shape.
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let Some(rec) = Recording::of("sub", &[a, b])? else {
        return (a - b).map(super::constant);
    };
    let y = (rec.input(0) - rec.input(1))?;
    rec.finish("sub", y, |g| Ok(vec![Some(g.clone()), Some(g.neg()?)]))
}

/// `a * b`, of one shape. Keeps both inputs.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let Some(rec) = Recording::of("mul", &[a, b])? else {
        return (a * b).map(super::constant);
    };
    let (na, nb) = (rec.needs_grad(0), rec.needs_grad(1));
    let (a0, b0) = (rec.input(0).clone(), rec.input(1).clone());
    let y = (&a0 * &b0)?;
    rec.finish("mul", y, move |g| {
        Ok(vec![
            na.then(|| g.mul(&b0)).transpose()?,
            nb.then(|| g.mul(&a0)).transpose()?,
        ])
    })
}

/// `a.broadcast_mul(b)`. Keeps both inputs.
pub fn broadcast_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let Some(rec) = Recording::of("broadcast_mul", &[a, b])? else {
        return a.broadcast_mul(b).map(super::constant);
    };
    let (na, nb) = (rec.needs_grad(0), rec.needs_grad(1));
    let (a0, b0) = (rec.input(0).clone(), rec.input(1).clone());
    let y = a0.broadcast_mul(&b0)?;
    rec.finish("broadcast_mul", y, move |g| {
        Ok(vec![
            na.then(|| sum_to(&g.broadcast_mul(&b0)?, a0.shape()))
                .transpose()?,
            nb.then(|| sum_to(&g.broadcast_mul(&a0)?, b0.shape()))
                .transpose()?,
        ])
    })
}

/// `x.silu()`: x·σ(x). Keeps its input and output.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    let Some(rec) = Recording::of("silu", &[x])? else {
        return x.silu().map(super::constant);
    };
    let x0 = rec.input(0).clone();
    let y = x0.silu()?;
    let y0 = y.clone();
    rec.finish("silu", y, move |g| {
        // candle's: σ(x)·(1 − y) + y.
        let sigmoid = (x0.neg()?.exp()? + 1.)?.recip()?;
        let d = ((&sigmoid * (1. - &y0)?)? + &y0)?;
        Ok(vec![Some((g * d)?)])
    })
}

/// `x.relu()`. Keeps its input.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    let Some(rec) = Recording::of("relu", &[x])? else {
        return x.relu().map(super::constant);
    };
    let x0 = rec.input(0).clone();
    let y = x0.relu()?;
    rec.finish("relu", y, move |g| {
        let d = x0.ge(&x0.zeros_like()?)?.to_dtype(x0.dtype())?;
        Ok(vec![Some((g * d)?)])
    })
}

/// `x.unsqueeze(dim)` (a reshape).
pub fn unsqueeze(x: &Tensor, dim: usize) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    if dim > dims.len() {
        return x.unsqueeze(dim);
    }
    dims.insert(dim, 1);
    reshape(x, dims)
}

/// `Tensor::stack(xs, dim)`: each unsqueezed at `dim`, then concatenated.
pub fn stack(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let xs = xs
        .iter()
        .map(|x| unsqueeze(x, dim))
        .collect::<Result<Vec<_>>>()?;
    cat(&xs.iter().collect::<Vec<_>>(), dim)
}
