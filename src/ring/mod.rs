//! Hand-off of finished batches from a TX worker thread to its publisher task, and of
//! emptied buffers back.
//!
//! Two bounded lock-free queues (crossbeam `ArrayQueue`): `full` carries batches to the
//! publisher, `free` returns their buffers so the worker never allocates in steady state.
//! Every buffer is allocated once, in [`Ring::new`]. When `full` is full the worker drops the
//! batch and counts it; it never blocks. The publisher sleeps on a tokio `Notify`; the
//! worker wakes it once per batch (a permit is stored when nobody waits, so no wake-up is
//! lost). The worker thread and the publisher task are the only two users of one ring.

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_queue::ArrayQueue;
use tokio::sync::Notify;

use crate::codec::v1::BatchWriter;
use crate::route::RoutingKey;

/// A finished batch on its way to the broker.
pub struct OutBatch {
    pub writer: BatchWriter,
    pub key: RoutingKey,
    pub packets: u32,
    /// IP bytes carried (without frame overhead).
    pub bytes: u64,
    /// When the read burst that opened this batch started (ns since the epoch).
    pub read_ns: u64,
}

/// A batch taken off the ring. Its buffer goes back to the pool when this is dropped,
/// whatever happens to the publish (it may be cancelled by a failing connection).
pub struct Leased<'a> {
    ring: &'a Ring,
    batch: Option<OutBatch>,
}

impl Deref for Leased<'_> {
    type Target = OutBatch;
    fn deref(&self) -> &OutBatch {
        // invariant: `batch` is Some from construction until drop
        self.batch.as_ref().expect("leased batch present until drop")
    }
}

impl Drop for Leased<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.batch.take() {
            self.ring.give_buffer(b.writer);
        }
        self.ring.leased.fetch_sub(1, Ordering::Release);
    }
}

pub struct Ring {
    full: ArrayQueue<OutBatch>,
    free: ArrayQueue<BatchWriter>,
    ready: Notify,
    /// Batches the publisher has taken and not yet finished with.
    leased: AtomicUsize,
}

impl Ring {
    /// A ring of `slots` batches, with `slots + spare` buffers of `buffer_bytes` each
    /// (`spare` covers the batches a worker keeps open while it fills them).
    pub fn new(slots: usize, spare: usize, buffer_bytes: usize) -> Ring {
        let slots = slots.max(1);
        let buffers = slots + spare;
        let free = ArrayQueue::new(buffers);
        for _ in 0..buffers {
            // invariant: `free` was created with room for exactly `buffers` items
            let _ = free.push(BatchWriter::with_capacity(buffer_bytes));
        }
        Ring { full: ArrayQueue::new(slots), free, ready: Notify::new(), leased: AtomicUsize::new(0) }
    }

    /// An empty buffer for a new batch, if any is free.
    #[inline]
    pub fn take_buffer(&self) -> Option<BatchWriter> {
        self.free.pop()
    }

    /// Returns a buffer to the pool.
    #[inline]
    pub fn give_buffer(&self, writer: BatchWriter) {
        // Cannot overflow: only buffers taken from `free` come back.
        let _ = self.free.push(writer);
    }

    /// Hands a batch to the publisher; gives it back when the ring is full.
    // The batch comes back by value so its buffer can return to the pool: boxing it would
    // allocate per batch on the hot path.
    #[allow(clippy::result_large_err)]
    #[inline]
    pub fn push(&self, batch: OutBatch) -> Result<(), OutBatch> {
        self.full.push(batch)?;
        self.ready.notify_one();
        Ok(())
    }

    /// Batches waiting for the publisher or being published now.
    #[inline]
    pub fn pending(&self) -> usize {
        self.full.len() + self.leased.load(Ordering::Acquire)
    }

    /// Takes the next batch; its buffer returns to the pool when the lease drops.
    #[inline]
    pub fn pop(&self) -> Option<Leased<'_>> {
        let b = self.full.pop()?;
        self.leased.fetch_add(1, Ordering::AcqRel);
        Some(Leased { ring: self, batch: Some(b) })
    }

    /// Waits until a batch may be available.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }
}
