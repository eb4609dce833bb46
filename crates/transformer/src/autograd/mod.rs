//! Our reverse-mode engine for training: a tape of the forward's ops, visited once in reverse.
//!
//! candle's `Tensor::backward` walks the graph that every tracked op hangs on its output. That
//! graph cannot be walked or trimmed from outside candle (a tensor's op is crate-private), and
//! its backward adds every first gradient into a fresh zero tensor and keeps the whole forward
//! graph alive until it returns. This engine records instead:
//!
//! - [`record`] runs a forward pass with a tape installed on the calling thread. The ops of
//!   [`ops`] (candle's ops and our kernels' custom ops, wrapped) then compute on *detached*
//!   inputs, so candle builds no graph, and push one [`Node`] per op that has a tracked input
//!   (a parameter, or the output of an earlier node). A node holds exactly what its backward
//!   needs.
//! - [`Tape::backward`] pops the nodes last to first. Each node's output gradient is *moved*
//!   out of the store to its backward, and each input gradient is moved into place when it is
//!   the first, added out of place when it is the second (into a buffer the engine owns) and
//!   in place after that. A node is dropped as soon as its backward ran, which releases every
//!   activation that no earlier node needs.
//!
//! Without a tape the same functions are candle's ops (with candle's graph), so inference and
//! candle's `backward` keep working unchanged, and the tests compare the two engines.
//!
//! A gradient must never stop silently. So a float tensor that enters a wrapped op while a tape
//! records must be tracked, a parameter, older than the recording (a model's buffers: position
//! tables, RoPE's sines), or declared with [`constant`] (a mask made during the forward);
//! anything else was computed by an op outside [`ops`], and the op names itself in an error.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, TensorId, Var};

use crate::{Error, Result};

pub mod ops;
#[cfg(test)]
mod tests;

/// A node's backward: the output's gradient in, one gradient per recorded input out (`None`
/// where the input gets none).
type Backward = Box<dyn FnOnce(&Tensor) -> candle_core::Result<Vec<Option<Tensor>>>>;

/// One recorded op.
struct Node {
    name: &'static str,
    output: TensorId,
    /// The tracked inputs' ids, in the order the backward returns their gradients; `None` for
    /// an input that needs no gradient (a constant, a mask, token ids).
    inputs: Vec<Option<TensorId>>,
    backward: Backward,
}

/// The ops of one forward pass, and the tensors whose gradients they lead to.
pub struct Tape {
    nodes: Vec<Node>,
    /// Parameters and node outputs: the tensors a gradient flows to.
    tracked: HashSet<TensorId>,
    /// Tensors made during the recording that need no gradient ([`constant`]).
    constants: HashSet<TensorId>,
    /// The serial number of the first tensor made during the recording.
    start: usize,
    vars: Vec<Var>,
}

thread_local! {
    static TAPE: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

/// Removes the thread's tape when dropped, so that an error or a panic in the forward pass
/// never leaves a tape recording later ops.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        TAPE.with(|t| t.borrow_mut().take());
    }
}

/// Runs `forward` with a tape recording the ops that lead from `vars` (the trainable
/// parameters) to its outputs, and returns its result with the tape.
///
/// Not reentrant: a forward pass records on one tape.
pub fn record<R>(vars: &[Var], forward: impl FnOnce() -> Result<R>) -> Result<(R, Tape)> {
    if is_recording() {
        return Err(Error::msg("autograd::record: a tape is already recording"));
    }
    let probe = Tensor::zeros((), DType::U8, &candle_core::Device::Cpu)?;
    let tape = Tape {
        nodes: Vec::new(),
        tracked: vars.iter().map(|v| v.id()).collect(),
        constants: HashSet::new(),
        start: serial(probe.id()),
        vars: vars.to_vec(),
    };
    TAPE.with(|t| *t.borrow_mut() = Some(tape));
    let guard = Installed;
    let out = forward()?;
    let tape = TAPE
        .with(|t| t.borrow_mut().take())
        .expect("the tape installed above");
    drop(guard);
    Ok((out, tape))
}

/// Declares `t`, made during a recorded forward pass (a mask, a bias of zeros), as needing no
/// gradient. Outside a recording it does nothing. Returns `t`.
pub fn constant(t: Tensor) -> Tensor {
    TAPE.with(|tape| {
        if let Some(tape) = tape.borrow_mut().as_mut() {
            tape.constants.insert(t.id());
        }
    });
    t
}

/// candle numbers its tensors in order of creation but keeps the number private; its `Debug`
/// form is `TensorId(n)`. 0 (older than everything) if that form ever changes, which a test
/// would notice.
fn serial(id: TensorId) -> usize {
    let s = format!("{id:?}");
    s.strip_prefix("TensorId(")
        .and_then(|s| s.strip_suffix(')'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Runs `f` with the thread's tape (if any) set aside: for a fused op that computes its value
/// from detached inputs with functions that would otherwise record.
pub(crate) fn paused<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Tape>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(t) = self.0.take() {
                TAPE.with(|tape| *tape.borrow_mut() = Some(t));
            }
        }
    }
    let _restore = Restore(TAPE.with(|t| t.borrow_mut().take()));
    f()
}

/// True while [`record`] runs on this thread.
pub fn is_recording() -> bool {
    TAPE.with(|t| t.borrow().is_some())
}

impl Tape {
    /// Number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The recorded ops' names, in forward order (for tests and profiles).
    pub fn op_names(&self) -> Vec<&'static str> {
        self.nodes.iter().map(|n| n.name).collect()
    }

    /// The gradients of `loss` (a scalar recorded on this tape) with respect to the tape's
    /// parameters, as candle's `backward` returns them (keyed by the vars; a var that the loss
    /// does not depend on is absent). Consumes the tape: every node is dropped once its
    /// backward has run.
    pub fn backward(self, loss: &Tensor) -> Result<GradStore> {
        self.backward_scaled(loss, 1.0)
    }

    /// [`Tape::backward`] of `seed * loss` (a data-parallel rank's share of a global loss).
    pub fn backward_scaled(self, loss: &Tensor, seed: f64) -> Result<GradStore> {
        let vars = self.vars.clone();
        let mut store = GradStore::default();
        self.backward_streaming(loss, seed, |i, g| {
            store.insert(vars[i].as_tensor(), g);
            Ok(())
        })?;
        Ok(store)
    }

    /// The gradients of `seed * loss`, each handed to `ready(i, gradient)` (`i`: the var's
    /// index in the vars given to [`record`]) as soon as it is final, which is right after
    /// the backward of the first recorded op that read the var: the last parameters of the
    /// forward come first, while the backward of the earlier layers is still to run. That is
    /// what data-parallel training needs to start reducing gradients early. Vars the loss does
    /// not depend on are never handed over. Every gradient is contiguous.
    pub fn backward_streaming(
        mut self,
        loss: &Tensor,
        seed: f64,
        mut ready: impl FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        if !self.tracked.contains(&loss.id()) || self.vars.iter().any(|v| v.id() == loss.id()) {
            return Err(Error::msg(
                "autograd: the loss was not computed on this tape (an op outside \
                 autograd::ops, or a forward run without autograd::record)",
            ));
        }
        // due[n]: the vars whose gradient is final once node n's backward has run (the
        // earliest node that reads them).
        let var_index: HashMap<TensorId, usize> = self
            .vars
            .iter()
            .enumerate()
            .map(|(i, v)| (v.id(), i))
            .collect();
        let mut due: Vec<Vec<usize>> = vec![Vec::new(); self.nodes.len()];
        let mut seen = vec![false; self.vars.len()];
        for (n, node) in self.nodes.iter().enumerate() {
            for id in node.inputs.iter().flatten() {
                if let Some(&i) = var_index.get(id) {
                    if !seen[i] {
                        seen[i] = true;
                        due[n].push(i);
                    }
                }
            }
        }
        let mut grads: HashMap<TensorId, Grad> = HashMap::new();
        let one = loss.ones_like()?;
        // A seed of 1 is the plain gradient, bit for bit.
        let seed = if seed == 1.0 {
            one
        } else {
            one.affine(seed, 0.0)?
        };
        grads.insert(loss.id(), Grad::Shared(seed));
        while let Some(node) = self.nodes.pop() {
            let n = self.nodes.len();
            // No gradient reaches an op's output on an unused branch.
            if let Some(g) = grads.remove(&node.output) {
                let g = g.into_tensor();
                let name = node.name;
                let input_grads = (node.backward)(&g)
                    .map_err(|e| Error::msg(format!("autograd: backward of {name}: {e}")))?;
                drop(g);
                if input_grads.len() != node.inputs.len() {
                    return Err(Error::msg(format!(
                        "autograd: backward of {name} gave {} gradients for {} inputs",
                        input_grads.len(),
                        node.inputs.len()
                    )));
                }
                for (id, grad) in node.inputs.iter().zip(input_grads) {
                    if let (Some(id), Some(grad)) = (id, grad) {
                        accumulate(&mut grads, *id, grad)?;
                    }
                }
            }
            for &i in &due[n] {
                if let Some(g) = grads.remove(&self.vars[i].id()) {
                    // Contiguous, as candle's (summed into a fresh tensor) always are: the
                    // optimizer's fused step reads them as flat slices.
                    ready(i, g.into_tensor().contiguous()?)?;
                }
            }
        }
        Ok(())
    }
}

/// A gradient being summed.
enum Grad {
    /// As a backward returned it: possibly a view sharing storage with other gradients (the
    /// two inputs of a sum get the same tensor), so never written to.
    Shared(Tensor),
    /// A contiguous buffer this engine allocated (a sum of two gradients): later
    /// contributions are added into it in place.
    Owned(Tensor),
}

impl Grad {
    fn into_tensor(self) -> Tensor {
        match self {
            Grad::Shared(t) | Grad::Owned(t) => t,
        }
    }
}

fn accumulate(grads: &mut HashMap<TensorId, Grad>, id: TensorId, g: Tensor) -> Result<()> {
    let next = match grads.remove(&id) {
        None => Grad::Shared(g),
        Some(Grad::Owned(sum))
            if sum.is_contiguous()
                && g.is_contiguous()
                && sum.dims() == g.dims()
                && sum.dtype() == g.dtype()
                && matches!(sum.dtype(), DType::F32 | DType::F64)
                && sum.device().is_cpu() =>
        {
            sum.inplace_op2(&g, &AddAssign)?;
            Grad::Owned(sum)
        }
        Some(prev) => {
            let prev = prev.into_tensor();
            if prev.dims() != g.dims() {
                return Err(Error::msg(format!(
                    "autograd: gradients of shapes {:?} and {:?} for one tensor",
                    prev.dims(),
                    g.dims()
                )));
            }
            // A binary op writes a fresh contiguous buffer.
            Grad::Owned((prev + g)?)
        }
    };
    grads.insert(id, next);
    Ok(())
}

/// `dst += src` on the CPU (f32/f64, both contiguous).
struct AddAssign;

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "add-assign"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        fn add<T: candle_core::WithDType + std::ops::AddAssign>(
            d: &mut [T],
            dl: &Layout,
            s: &[T],
            sl: &Layout,
        ) -> candle_core::Result<()> {
            let Some((d0, d1)) = dl.contiguous_offsets() else {
                candle_core::bail!("add-assign: destination not contiguous");
            };
            let Some((s0, s1)) = sl.contiguous_offsets() else {
                candle_core::bail!("add-assign: source not contiguous");
            };
            for (d, s) in d[d0..d1].iter_mut().zip(&s[s0..s1]) {
                *d += *s;
            }
            Ok(())
        }
        match (dst, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => add(d, dl, s, sl),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => add(d, dl, s, sl),
            _ => candle_core::bail!("add-assign: f32 or f64 of one dtype"),
        }
    }
}

/// The inputs of one op while a tape records: their tape ids and detached copies.
pub(crate) struct Recording {
    ids: Vec<Option<TensorId>>,
    inputs: Vec<Tensor>,
}

impl Recording {
    /// `Some` when a tape records and at least one of `inputs` is tracked: the op must then
    /// compute on [`Recording::input`]s and end with [`Recording::finish`]. `None` means
    /// "run candle's op": no tape, or nothing to differentiate.
    pub(crate) fn of(name: &'static str, inputs: &[&Tensor]) -> candle_core::Result<Option<Self>> {
        TAPE.with(|t| {
            let t = t.borrow();
            let Some(tape) = t.as_ref() else {
                return Ok(None);
            };
            let mut ids = Vec::with_capacity(inputs.len());
            for (i, x) in inputs.iter().enumerate() {
                let tracked = tape.tracked.contains(&x.id());
                let foreign = !tracked
                    && !x.is_variable()
                    && x.dtype().is_float()
                    && (x.track_op()
                        || (serial(x.id()) > tape.start && !tape.constants.contains(&x.id())));
                if foreign {
                    candle_core::bail!(
                        "autograd: input {i} of {name} {:?} was computed by an op outside \
                         autograd::ops, so its gradient would be lost (declare a tensor that \
                         needs none with autograd::constant); train.engine = \"candle\" \
                         trains such a model",
                        x.dims()
                    );
                }
                ids.push(tracked.then(|| x.id()));
            }
            if ids.iter().all(Option::is_none) {
                return Ok(None);
            }
            Ok(Some(Recording {
                ids,
                inputs: inputs.iter().map(|x| x.detach()).collect(),
            }))
        })
    }

    /// Input `i`, detached: ops on it build no candle graph.
    pub(crate) fn input(&self, i: usize) -> &Tensor {
        &self.inputs[i]
    }

    /// Whether input `i` needs a gradient (its backward may skip the others').
    pub(crate) fn needs_grad(&self, i: usize) -> bool {
        self.ids[i].is_some()
    }

    /// Records the node that made `output` and marks `output` as tracked.
    pub(crate) fn finish(
        self,
        name: &'static str,
        output: Tensor,
        backward: impl FnOnce(&Tensor) -> candle_core::Result<Vec<Option<Tensor>>> + 'static,
    ) -> candle_core::Result<Tensor> {
        TAPE.with(|t| {
            let mut t = t.borrow_mut();
            let tape = t
                .as_mut()
                .ok_or_else(|| candle_core::Error::Msg("autograd: the tape went away".into()))?;
            if tape.tracked.contains(&output.id()) {
                // candle returned an input itself (a no-op reshape or copy): the gradient
                // reaches it directly.
                return Ok(output);
            }
            tape.tracked.insert(output.id());
            tape.nodes.push(Node {
                name,
                output: output.id(),
                inputs: self.ids,
                backward: Box::new(backward),
            });
            Ok(output)
        })
    }
}
