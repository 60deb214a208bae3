//! Hand-off of finished batches from a TX worker thread to its publisher task, and of
//! emptied buffers back.
//!
//! Two bounded lock-free queues (crossbeam `ArrayQueue`): `full` carries batches to the
//! publisher, `free` returns their buffers so the worker never allocates in steady state.
//! Every buffer is allocated once, in [`Ring::new`]. When `full` is full the worker drops the
//! batch and counts it; it never blocks. The publisher sleeps on a tokio `Notify`; the
//! worker wakes it once per batch (a permit is stored when nobody waits, so no wake-up is
//! lost). The worker thread and the publisher task are the only two users of one ring.

use crossbeam_queue::ArrayQueue;
use tokio::sync::Notify;

use crate::codec::v1::BatchWriter;
use crate::route::RoutingKey;

/// A finished batch on its way to the broker.
pub struct OutBatch {
    pub writer: BatchWriter,
    pub key: RoutingKey,
    pub packets: u32,
}

pub struct Ring {
    full: ArrayQueue<OutBatch>,
    free: ArrayQueue<BatchWriter>,
    ready: Notify,
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
        Ring { full: ArrayQueue::new(slots), free, ready: Notify::new() }
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
    #[inline]
    pub fn push(&self, batch: OutBatch) -> Result<(), OutBatch> {
        self.full.push(batch)?;
        self.ready.notify_one();
        Ok(())
    }

    #[inline]
    pub fn pop(&self) -> Option<OutBatch> {
        self.full.pop()
    }

    /// Waits until a batch may be available.
    pub async fn ready(&self) {
        self.ready.notified().await;
    }

    /// Wakes the publisher without a batch (used at shutdown).
    pub fn wake(&self) {
        self.ready.notify_one();
    }
}
