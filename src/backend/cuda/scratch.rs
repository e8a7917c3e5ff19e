//! Per-op device scratch (the hi/lo halves of a cuBLAS product, split-K partial results, quest's
//! selection words) from buffers the backend keeps, instead of a stream-ordered allocation and
//! free per buffer: above 8 rows a decode layer took 10 of them, some 350 driver calls per step
//! of the 1B shape (docs/cuda.md, host cost per step). Every op runs in order on the backend's
//! one stream, so a buffer handed back when its op has enqueued its kernels can serve the next
//! op at once, exactly as the memory pool would have reused the freed memory.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::sync::{Arc, Mutex};

/// Buffers kept for reuse at most; beyond, the longest unused one is freed.
const KEEP: usize = 24;

/// The backend's spare scratch buffers.
#[derive(Debug, Default)]
pub struct ScratchCache {
    spare: Mutex<Vec<CudaSlice<u8>>>,
}

/// A scratch buffer lent to one op; back to the cache when dropped (after the op enqueued the
/// kernels that use it).
pub struct Scratch<'a> {
    cache: &'a ScratchCache,
    buf: Option<CudaSlice<u8>>,
    ptr: u64,
}

impl Scratch<'_> {
    /// The buffer's device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let mut spare = self.cache.spare.lock().unwrap_or_else(|e| e.into_inner());
            spare.push(buf);
            if spare.len() > KEEP {
                spare.remove(0); // freed in stream order
            }
        }
    }
}

impl ScratchCache {
    /// At least `bytes` bytes (rounded up to 256): the smallest spare buffer that holds them and
    /// is not more than twice as large, else a new allocation. Contents are whatever was there:
    /// every caller writes what it later reads.
    pub fn take(&self, stream: &Arc<CudaStream>, bytes: usize) -> Result<Scratch<'_>, String> {
        let bytes = bytes.max(1).next_multiple_of(256);
        let reused = {
            let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
            let best = spare
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= bytes && b.len() <= 2 * bytes)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            best.map(|i| spare.remove(i))
        };
        let buf = match reused {
            Some(b) => b,
            // SAFETY: scratch is written before it is read (see above).
            None => unsafe { stream.alloc::<u8>(bytes) }.map_err(|e| format!("{e:?}"))?,
        };
        let ptr = buf.device_ptr(stream).0;
        Ok(Scratch {
            cache: self,
            buf: Some(buf),
            ptr,
        })
    }

    /// Spare buffers held now.
    pub fn spare(&self) -> usize {
        self.spare.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
