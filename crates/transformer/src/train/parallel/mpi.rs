//! [`Collective`] over MPI (the `mpi` feature): Open MPI, MPICH or a vendor MPI, through the
//! `mpi` crate. `mpirun -np N transformer train …` starts the ranks; [`MpiCollective::from_env`]
//! tells whether this process is one of them.
//!
//! Gradient sums are MPI's non-blocking `MPI_Iallreduce` on buffers the pending sum owns (the
//! `mpi` crate's own non-blocking API ties buffers to a lexical scope, which a bucket started
//! in the middle of the backward and waited for after it does not fit); everything else is the
//! crate's blocking API. Errors are MPI's default, fatal: a failing call aborts the whole job.

use std::os::raw::c_int;
use std::sync::Mutex;

use mpi::raw::AsRaw;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

use super::{launched_by_mpirun, Buffer, Collective, PendingSum};
use crate::{Error, Result};

/// The world communicator of an MPI job. Holds MPI initialized: the last handle dropped
/// finalizes it.
pub struct MpiCollective {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    library: String,
    /// MPI is initialized with `MPI_THREAD_SERIALIZED`: calls may come from any thread, one
    /// at a time, which this lock ensures.
    calls: Mutex<()>,
    _universe: mpi::environment::Universe,
}

// SAFETY: the communicator is a handle into the MPI library, valid in every thread of the
// process once MPI is initialized with MPI_THREAD_SERIALIZED (checked in `from_env`), and every
// call through it holds `calls`, so no two threads are ever inside MPI at once.
unsafe impl Send for MpiCollective {}
unsafe impl Sync for MpiCollective {}

impl MpiCollective {
    /// MPI's world when this process was started by an MPI launcher, `None` otherwise (a plain
    /// single process: MPI is not initialized at all).
    pub fn from_env() -> Result<Option<Self>> {
        if !launched_by_mpirun() {
            return Ok(None);
        }
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| Error::msg("MPI was already initialized in this process"))?;
        if threading < mpi::Threading::Serialized {
            return Err(Error::msg(format!(
                "MPI gave thread support {threading:?}; data-parallel training needs at least \
                 Serialized (MPI_THREAD_SERIALIZED)"
            )));
        }
        let world = universe.world();
        let library = mpi::environment::library_version()
            .unwrap_or_default()
            .split([',', '\n'])
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        Ok(Some(MpiCollective {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            library,
            calls: Mutex::new(()),
            _universe: universe,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An `MPI_Iallreduce` in flight: the request and the two buffers it reads and writes, which
/// must not move or be freed until it completes (a `Vec`'s heap buffer does not move when the
/// `Vec` does).
struct MpiSum<'a> {
    comm: &'a MpiCollective,
    request: mpi::ffi::MPI_Request,
    _send: Buffer,
    recv: Buffer,
}

// SAFETY: the request is only used under the collective's call lock (see MpiCollective).
unsafe impl Send for MpiSum<'_> {}

impl PendingSum for MpiSum<'_> {
    fn wait(mut self: Box<Self>) -> Result<Buffer> {
        let _guard = self.comm.lock();
        // SAFETY: a live request from MPI_Iallreduce; errors abort (MPI_ERRORS_ARE_FATAL).
        unsafe {
            mpi::ffi::MPI_Wait(&mut self.request, mpi::ffi::RSMPI_STATUS_IGNORE);
        }
        drop(_guard);
        // The request is MPI_REQUEST_NULL now: the drop below has nothing left to wait for.
        Ok(std::mem::replace(&mut self.recv, Buffer::F32(Vec::new())))
    }
}

impl Drop for MpiSum<'_> {
    fn drop(&mut self) {
        // A sum dropped unfinished (an error elsewhere in the step) must not leave MPI writing
        // into freed memory.
        if self.request != unsafe { mpi::ffi::RSMPI_REQUEST_NULL } {
            let _guard = self.comm.lock();
            // SAFETY: as in `wait`; MPI_Wait sets the request to MPI_REQUEST_NULL.
            unsafe {
                mpi::ffi::MPI_Wait(&mut self.request, mpi::ffi::RSMPI_STATUS_IGNORE);
            }
        }
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn start_sum(&self, buffer: Buffer) -> Result<Box<dyn PendingSum + '_>> {
        let count = c_int::try_from(buffer.len()).map_err(|_| {
            Error::msg(format!(
                "data parallel: {} values in one MPI sum, more than MPI's int count allows",
                buffer.len()
            ))
        })?;
        let (send, mut recv, datatype) = match buffer {
            Buffer::F32(v) => {
                let n = v.len();
                (Buffer::F32(v), Buffer::F32(vec![0.0; n]), unsafe {
                    mpi::ffi::RSMPI_FLOAT
                })
            }
            Buffer::F64(v) => {
                let n = v.len();
                (Buffer::F64(v), Buffer::F64(vec![0.0; n]), unsafe {
                    mpi::ffi::RSMPI_DOUBLE
                })
            }
        };
        let send_ptr = match &send {
            Buffer::F32(v) => v.as_ptr().cast(),
            Buffer::F64(v) => v.as_ptr().cast(),
        };
        let recv_ptr = match &mut recv {
            Buffer::F32(v) => v.as_mut_ptr().cast(),
            Buffer::F64(v) => v.as_mut_ptr().cast(),
        };
        let mut request = unsafe { mpi::ffi::RSMPI_REQUEST_NULL };
        {
            let _guard = self.lock();
            // SAFETY: both buffers hold `count` elements of `datatype` and are owned by the
            // MpiSum returned below, which waits for the request before they are freed.
            unsafe {
                mpi::ffi::MPI_Iallreduce(
                    send_ptr,
                    recv_ptr,
                    count,
                    datatype,
                    mpi::ffi::RSMPI_SUM,
                    self.world.as_raw(),
                    &mut request,
                );
            }
        }
        Ok(Box::new(MpiSum {
            comm: self,
            request,
            _send: send,
            recv,
        }))
    }

    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        let _guard = self.lock();
        let mut all = vec![0u64; self.size];
        self.world.all_gather_into(&value, &mut all[..]);
        Ok(all)
    }

    fn barrier(&self) -> Result<()> {
        let _guard = self.lock();
        self.world.barrier();
        Ok(())
    }

    fn progress(&self) {
        let _guard = self.lock();
        // Any MPI call runs the progress engine; a probe for a message that never comes is
        // the cheapest one (collectives travel in a context of their own, never matched).
        let _ = self.world.any_process().immediate_probe();
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    fn describe(&self) -> String {
        format!("MPI ({}), {} ranks", self.library, self.size)
    }
}
