//! The ops a recorded forward pass may use: candle's ops and our kernels' custom ops, each with
//! its backward. Without a tape each is exactly candle's op (candle's graph included).
//!
//! The backwards mirror candle's (`candle_core::backprop`) op by op, so that the two engines
//! give the same gradients; they differ in what is kept and in how gradients are summed.

use candle_core::shape::{Dim, ShapeWithOneHole};
use candle_core::{CustomOp1, CustomOp2, CustomOp3, Result, Shape, Tensor};

use super::Recording;

/// `x.reshape(shape)`.
pub fn reshape<S: ShapeWithOneHole>(x: &Tensor, shape: S) -> Result<Tensor> {
    let Some(rec) = Recording::of("reshape", &[x])? else {
        return x.reshape(shape);
    };
    let dims = x.dims().to_vec();
    let y = rec.input(0).reshape(shape)?;
    rec.finish("reshape", y, move |g| Ok(vec![Some(g.reshape(dims)?)]))
}

/// `x.transpose(d1, d2)`.
pub fn transpose<D1: Dim, D2: Dim>(x: &Tensor, d1: D1, d2: D2) -> Result<Tensor> {
    let Some(rec) = Recording::of("transpose", &[x])? else {
        return x.transpose(d1, d2);
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
        return x.contiguous();
    };
    let y = rec.input(0).contiguous()?;
    rec.finish("contiguous", y, |g| Ok(vec![Some(g.clone())]))
}

/// `x.narrow(dim, start, len)`.
pub fn narrow<D: Dim>(x: &Tensor, dim: D, start: usize, len: usize) -> Result<Tensor> {
    let Some(rec) = Recording::of("narrow", &[x])? else {
        return x.narrow(dim, start, len);
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
        return a + b;
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
        return a.broadcast_add(b);
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
        return x.affine(mul, add);
    };
    let y = rec.input(0).affine(mul, add)?;
    rec.finish("affine", y, move |g| Ok(vec![Some(g.affine(mul, 0.0)?)]))
}

/// `x.sum_all()`.
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    let Some(rec) = Recording::of("sum_all", &[x])? else {
        return x.sum_all();
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
        return a.matmul(b);
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
        return table.index_select(ids, dim);
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
        return x.apply_op1(op);
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
        return a.apply_op2(b, op);
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
        return a.apply_op3(b, c, op);
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
