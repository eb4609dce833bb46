//! Data-parallel training: every rank (process) holds the whole model, takes its shard of every
//! batch, and the gradients are summed over the ranks before the one optimizer step that all
//! ranks then take alike, so that the parameters stay identical everywhere.
//!
//! The collective itself is never ours: [`Collective`] is the one seam, implemented by MPI
//! (`mpi` feature, [`mpi::MpiCollective`]: Open MPI or any other MPI through the `mpi` crate),
//! by [`Local`] for a single process, and by [`ThreadGroup`] (ranks as threads of one process,
//! for tests and for trying a setup without MPI).
//!
//! What makes a data-parallel run equal to a single process with the same global batch:
//! - every rank draws the *global* batch with the same generator (so the data order, and a
//!   checkpoint's data state, do not depend on the number of ranks: a run resumes at any world
//!   size) and keeps its rows of it ([`Shard::rows`]);
//! - the global loss is the token-weighted mean of the shards' losses, so each rank's backward
//!   is seeded with its share `n_rank / n_total` of the tokens and the *sum* of the ranks'
//!   gradients is the gradient of the global loss;
//! - the sums go through [`GradReducer`]: gradients in fixed buckets (last parameters first,
//!   the order in which the backward finishes them), each bucket's sum started as soon as the
//!   backward has finished all of its gradients, while the earlier layers' backward still runs.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::{Error, Result};

#[cfg(feature = "mpi")]
pub mod mpi;

/// Variables set by the launchers of the common MPIs (Open MPI, MPICH/Hydra and PMI-based
/// ones, PMIx): their presence means this process was started as a rank.
const LAUNCHER_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "MPI_LOCALNRANKS",
];

/// Whether this process was started by an MPI launcher (`mpirun`, `mpiexec`, `srun`).
pub fn launched_by_mpirun() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// The number of ranks the launcher started, where its variables say (Open MPI, PMI).
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// The part of each global batch one rank trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    /// The whole batch: a single process.
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };

    pub fn is_whole(&self) -> bool {
        self.world == 1
    }

    /// The rows of a global batch of `n` that this shard takes: contiguous, and sizes that
    /// differ by at most one (the first `n % world` ranks take one more). Empty when `n` is
    /// smaller than the world (a short length bucket of a translation run).
    pub fn rows(&self, n: usize) -> std::ops::Range<usize> {
        let (base, extra) = (n / self.world, n % self.world);
        let start = self.rank * base + self.rank.min(extra);
        let len = base + usize::from(self.rank < extra);
        start..start + len
    }

    /// What a task returns for a shard with no rows: a loss of 0 over 0 tokens, which the
    /// trainer weighs by 0 and runs no backward for.
    pub fn empty_loss(device: &Device) -> Result<(Tensor, usize)> {
        Ok((Tensor::zeros((), DType::F32, device)?, 0))
    }
}

/// Numbers to sum over the ranks.
#[derive(Debug, Clone, PartialEq)]
pub enum Buffer {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Buffer {
    pub fn len(&self) -> usize {
        match self {
            Buffer::F32(v) => v.len(),
            Buffer::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of payload.
    pub fn bytes(&self) -> usize {
        match self {
            Buffer::F32(v) => 4 * v.len(),
            Buffer::F64(v) => 8 * v.len(),
        }
    }

    fn add(&mut self, other: &Buffer) -> Result<()> {
        match (self, other) {
            (Buffer::F32(a), Buffer::F32(b)) if a.len() == b.len() => {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b)
            }
            (Buffer::F64(a), Buffer::F64(b)) if a.len() == b.len() => {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b)
            }
            (a, b) => {
                return Err(Error::msg(format!(
                    "data parallel: ranks summed different buffers ({} and {} values, or \
                     different types); they run different models or configs",
                    a.len(),
                    b.len()
                )))
            }
        }
        Ok(())
    }
}

/// A sum started with [`Collective::start_sum`].
pub trait PendingSum: Send {
    /// Blocks until the sum over every rank is there.
    fn wait(self: Box<Self>) -> Result<Buffer>;
}

/// A sum that was complete when it started.
struct Done(Buffer);

impl PendingSum for Done {
    fn wait(self: Box<Self>) -> Result<Buffer> {
        Ok(self.0)
    }
}

/// The ranks of a data-parallel job and the collective operations between them.
///
/// Every rank must make the same calls in the same order (as with MPI's collectives).
pub trait Collective: Send + Sync {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;

    fn world_size(&self) -> usize;

    /// Starts summing `buffer` elementwise over every rank; the sum comes back from the
    /// returned handle's `wait`. Several sums may be outstanding at once.
    fn start_sum(&self, buffer: Buffer) -> Result<Box<dyn PendingSum + '_>>;

    /// `buffer` summed over every rank.
    fn sum(&self, buffer: Buffer) -> Result<Buffer> {
        self.start_sum(buffer)?.wait()
    }

    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;

    /// Lets outstanding sums advance (MPI moves a non-blocking collective on only while the
    /// process is inside an MPI call); called between the backward's ops.
    fn progress(&self) {}

    /// Ends every rank of the job at once with exit status `code`: for an error on one rank,
    /// which would otherwise leave the others waiting in their next collective.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }

    /// What runs the job, for messages ("MPI (Open MPI v4.1.4)").
    fn describe(&self) -> String;

    /// This rank's part of every batch.
    fn shard(&self) -> Shard {
        Shard {
            rank: self.rank(),
            world: self.world_size(),
        }
    }
}

/// A single process: every sum is its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct Local;

impl Collective for Local {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn start_sum(&self, buffer: Buffer) -> Result<Box<dyn PendingSum + '_>> {
        Ok(Box::new(Done(buffer)))
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        Ok(vec![value])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "a single process".into()
    }
}

/// Ranks as threads of one process (one `ThreadGroup` per thread, from [`ThreadGroup::new`]):
/// the same arithmetic as a multi-process job, without MPI. Sums are blocking and add the
/// ranks' buffers in rank order, so every rank gets the same bits.
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<GroupShared>,
}

struct GroupShared {
    world: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Option<Buffer>>>,
    values: Mutex<Vec<u64>>,
}

impl ThreadGroup {
    /// One handle per rank of a group of `world` threads.
    pub fn new(world: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(GroupShared {
            world,
            barrier: Barrier::new(world),
            slots: Mutex::new(vec![None; world]),
            values: Mutex::new(vec![0; world]),
        });
        (0..world)
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn start_sum(&self, buffer: Buffer) -> Result<Box<dyn PendingSum + '_>> {
        let s = &self.shared;
        lock(&s.slots)[self.rank] = Some(buffer);
        s.barrier.wait();
        let sum = {
            let slots = lock(&s.slots);
            let mut it = slots
                .iter()
                .map(|b| b.as_ref().expect("every rank filled its slot"));
            let mut sum = it.next().expect("world >= 1").clone();
            it.try_for_each(|b| sum.add(b)).map(|()| sum)
        };
        // Nobody overwrites a slot before every rank has read them all.
        s.barrier.wait();
        lock(&s.slots)[self.rank] = None;
        Ok(Box::new(Done(sum?)))
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let s = &self.shared;
        lock(&s.values)[self.rank] = value;
        s.barrier.wait();
        let all = lock(&s.values).clone();
        s.barrier.wait();
        Ok(all)
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
    fn describe(&self) -> String {
        format!("{} threads", self.shared.world)
    }
}

/// Target size of a gradient bucket. Small enough that the first sums start while most of
/// the backward is still to run, large enough that the per-call latency of the collective
/// (tens of microseconds through shared memory, more across a network) stays small against the
/// transfer; PyTorch's DistributedDataParallel uses 25 MB for models a hundred times larger.
pub const BUCKET_BYTES: usize = 1 << 20;

/// Sums the gradients of one model over the ranks, bucket by bucket.
pub struct GradReducer {
    comm: Arc<dyn Collective>,
    vars: Vec<Var>,
    /// The var indices of each bucket, last parameters first.
    buckets: Vec<Vec<usize>>,
    /// For each var: its bucket and the offset of its first element in it.
    place: Vec<(usize, usize)>,
    /// Gradient elements per bucket.
    lens: Vec<usize>,
    dtype: DType,
}

impl GradReducer {
    /// Buckets for `vars` (a model's parameters, in creation order) of about
    /// [`BUCKET_BYTES`] each. The parameters must share one dtype, f32 or f64.
    pub fn new(comm: Arc<dyn Collective>, vars: &[Var]) -> Result<Self> {
        let dtype = vars.first().map_or(DType::F32, |v| v.dtype());
        if !matches!(dtype, DType::F32 | DType::F64) || vars.iter().any(|v| v.dtype() != dtype) {
            return Err(Error::msg(format!(
                "data parallel: the parameters must all be f32 or all f64 (the first is {dtype:?})"
            )));
        }
        let elem = dtype.size_in_bytes();
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut lens: Vec<usize> = Vec::new();
        let mut place = vec![(0, 0); vars.len()];
        for i in (0..vars.len()).rev() {
            let n = vars[i].elem_count();
            let full = lens
                .last()
                .is_none_or(|&l| l > 0 && (l + n) * elem > BUCKET_BYTES);
            if full {
                buckets.push(Vec::new());
                lens.push(0);
            }
            let b = buckets.len() - 1;
            place[i] = (b, lens[b]);
            buckets[b].push(i);
            lens[b] += n;
        }
        Ok(GradReducer {
            comm,
            vars: vars.to_vec(),
            buckets,
            place,
            lens,
            dtype,
        })
    }

    pub fn num_buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Bytes this rank hands the collective per optimizer step: every gradient, one presence
    /// flag per parameter, and the three numbers of [`GradReducer::sum_scalars`].
    pub fn bytes_per_step(&self) -> usize {
        let elem = self.dtype.size_in_bytes();
        self.lens.iter().sum::<usize>() * elem + self.vars.len() * elem + 3 * 8
    }

    /// The three numbers every micro-batch sums before its backward: tokens, tokens × loss,
    /// and a stop request.
    pub fn sum_scalars(&self, tokens: usize, loss: f64, stop: bool) -> Result<(f64, f64, bool)> {
        let Buffer::F64(s) = self.comm.sum(Buffer::F64(vec![
            tokens as f64,
            tokens as f64 * loss,
            f64::from(u8::from(stop)),
        ]))?
        else {
            return Err(Error::msg("data parallel: the scalar sum changed type"));
        };
        Ok((s[0], s[1], s[2] > 0.0))
    }

    /// A reduction for one optimizer step.
    pub fn begin(&self) -> Reduction<'_> {
        Reduction {
            reducer: self,
            parts: vec![None; self.vars.len()],
            present: vec![false; self.vars.len()],
            missing: self.buckets.iter().map(Vec::len).collect(),
            next: 0,
            pending: Vec::with_capacity(self.buckets.len()),
        }
    }
}

/// The gradients of one step on their way to the sum: [`Reduction::add`] them as they come,
/// then [`Reduction::finish`].
pub struct Reduction<'a> {
    reducer: &'a GradReducer,
    parts: Vec<Option<Tensor>>,
    /// Which vars this rank has a gradient for.
    present: Vec<bool>,
    /// Gradients each bucket still waits for.
    missing: Vec<usize>,
    /// The next bucket to start: buckets start in order on every rank, as the collective
    /// requires, whatever order their gradients arrive in.
    next: usize,
    pending: Vec<Box<dyn PendingSum + 'a>>,
}

impl<'a> Reduction<'a> {
    /// This rank's final gradient of var `i` (its index in the reducer's vars).
    pub fn add(&mut self, i: usize, grad: Tensor) -> Result<()> {
        let r = self.reducer;
        if grad.dims() != r.vars[i].dims() {
            return Err(Error::shape(
                format!("data parallel: gradient of parameter {i}"),
                format!("{:?}", r.vars[i].dims()),
                grad.dims(),
            ));
        }
        if std::mem::replace(&mut self.present[i], true) {
            return Err(Error::msg(format!(
                "data parallel: parameter {i} got two gradients in one step"
            )));
        }
        let grad = grad.to_dtype(r.dtype)?;
        self.parts[i] = Some(grad);
        let b = r.place[i].0;
        self.missing[b] -= 1;
        while self.next < r.buckets.len() && self.missing[self.next] == 0 {
            self.start(self.next)?;
        }
        r.comm.progress();
        Ok(())
    }

    /// Every gradient of `grads` (a whole step's, e.g. after accumulation).
    pub fn add_all(&mut self, grads: &GradStore) -> Result<()> {
        for (i, v) in self.reducer.vars.iter().enumerate() {
            if let Some(g) = grads.get(v) {
                self.add(i, g.clone())?;
            }
        }
        Ok(())
    }

    fn start(&mut self, b: usize) -> Result<()> {
        /// The bucket's gradients (zeros where this rank has none; each released as soon as
        /// it is copied), then one flag per var: how many ranks gave it a gradient (a var no
        /// rank reached stays absent, as in a single process, so the optimizer skips it).
        fn flat<T: candle_core::WithDType + From<u8>>(
            red: &mut Reduction<'_>,
            vars: &[usize],
            total: usize,
        ) -> Result<Vec<T>> {
            let mut out = Vec::with_capacity(total);
            for &i in vars {
                match red.parts[i].take() {
                    Some(g) => out.extend(g.flatten_all()?.to_vec1::<T>()?),
                    None => out.resize(out.len() + red.reducer.vars[i].elem_count(), T::zero()),
                }
            }
            out.extend(vars.iter().map(|&i| T::from(u8::from(red.present[i]))));
            Ok(out)
        }
        let r = self.reducer;
        let vars = &r.buckets[b];
        let total = r.lens[b] + vars.len();
        let buffer = match r.dtype {
            DType::F64 => Buffer::F64(flat(self, vars, total)?),
            _ => Buffer::F32(flat(self, vars, total)?),
        };
        self.pending.push(r.comm.start_sum(buffer)?);
        self.next = b + 1;
        Ok(())
    }

    /// Starts the buckets still waiting (a var this rank has no gradient for counts as
    /// zeros), waits for every sum, and returns the summed gradients.
    pub fn finish(mut self) -> Result<GradStore> {
        let r = self.reducer;
        while self.next < r.buckets.len() {
            self.start(self.next)?;
        }
        let mut store = GradStore::default();
        for (b, pending) in self.pending.into_iter().enumerate() {
            let sum = pending.wait()?;
            let vars = &r.buckets[b];
            if sum.len() != r.lens[b] + vars.len() {
                return Err(Error::msg(format!(
                    "data parallel: bucket {b} came back with {} values instead of {}; the \
                     ranks run different models",
                    sum.len(),
                    r.lens[b] + vars.len()
                )));
            }
            for (k, &i) in vars.iter().enumerate() {
                let var = &r.vars[i];
                let (off, n) = (r.place[i].1, var.elem_count());
                let g = match &sum {
                    Buffer::F32(v) => summed(v, off, n, r.lens[b] + k, var)?,
                    Buffer::F64(v) => summed(v, off, n, r.lens[b] + k, var)?,
                };
                if let Some(g) = g {
                    store.insert(var.as_tensor(), g);
                }
            }
        }
        Ok(store)
    }
}

/// The gradient of `var` in a summed bucket `v` (its `n` values at `off`), or `None` when its
/// flag at `flag` says no rank had one.
fn summed<T: candle_core::WithDType>(
    v: &[T],
    off: usize,
    n: usize,
    flag: usize,
    var: &Var,
) -> Result<Option<Tensor>> {
    if v[flag] == T::zero() {
        return Ok(None);
    }
    Ok(Some(Tensor::from_slice(
        &v[off..off + n],
        var.shape(),
        var.device(),
    )?))
}

/// A hash of the parameters' exact values (FNV-1a over their bits, in order), to check that
/// every rank holds the same model.
pub fn params_hash(vars: &[Var]) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in vars {
        // f32 → f64 is exact, so one path serves every float dtype.
        for x in v.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()? {
            h ^= x.to_bits();
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    Ok(h)
}

/// Errors when the ranks' parameters differ (by [`params_hash`]) at `step`.
pub fn check_in_sync(comm: &dyn Collective, vars: &[Var], step: u64) -> Result<()> {
    if comm.world_size() == 1 {
        return Ok(());
    }
    let hashes = comm.all_gather_u64(params_hash(vars)?)?;
    if hashes.iter().any(|&h| h != hashes[0]) {
        let list: Vec<String> = hashes
            .iter()
            .enumerate()
            .map(|(r, h)| format!("rank {r}: {h:016x}"))
            .collect();
        return Err(Error::msg(format!(
            "data parallel: the ranks' parameters differ at step {step} ({}); every rank must \
             run the same binary, config and data (a different tokenizer or corpus on one \
             rank, or a non-deterministic op, would do this)",
            list.join(", ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
