//! Storage for weight matrices ([`WeightBuf`], huge pages) and the KV pool ([`ZeroedBuf`],
//! [`ZeroedBytes`], small pages given back block by block).
//!
//! Decode streams every weight byte once per token. With 4 KiB pages that stream takes a TLB
//! miss every 4 KiB and the hardware prefetcher restarts at each page boundary; on the Zen 3 VM
//! we measured 12 GB/s per core that way against 14–18 GB/s from 2 MiB pages. Most matrices
//! of a small model are below 2 MiB (576×576 bf16 is 648 KiB), too small to get a huge page
//! of their own, so they are carved out of shared 32 MiB chunks (`madvise(MADV_HUGEPAGE)`);
//! each [`WeightBuf`] holds its chunk alive, and a chunk is unmapped when its last buffer goes.

use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

const CHUNK: usize = 32 << 20;
/// Requests above this get a mapping of their own (keeps the unused chunk tail small).
const OWN_MAPPING: usize = 8 << 20;
const ALIGN: usize = 64;

/// Owns the memory; accessed only through the base pointer taken once, from `&mut`.
enum Chunk {
    Map(#[allow(dead_code)] memmap2::MmapMut),
    /// Fallback when anonymous mapping fails: ordinary heap memory (8-byte aligned).
    Heap(#[allow(dead_code)] Box<[u64]>),
}

struct Current {
    chunk: Arc<Chunk>,
    base: NonNull<u8>,
    used: usize,
}

// SAFETY: `base` points into the mapping owned by `chunk`; regions handed out never overlap.
unsafe impl Send for Current {}

static CURRENT: Mutex<Option<Current>> = Mutex::new(None);

fn map(len: usize) -> (Arc<Chunk>, NonNull<u8>) {
    if let Ok(mut m) = memmap2::MmapMut::map_anon(len) {
        #[cfg(target_os = "linux")]
        let _ = m.advise(memmap2::Advice::HugePage); // best effort: THP may be off
        if let Some(base) = NonNull::new(m.as_mut_ptr()) {
            return (Arc::new(Chunk::Map(m)), base);
        }
    }
    let mut v = vec![0u64; len.div_ceil(8)].into_boxed_slice();
    let base = NonNull::new(v.as_mut_ptr() as *mut u8).expect("Box pointer is non-null");
    (Arc::new(Chunk::Heap(v)), base)
}

/// Read-only weight data of `T` in (ideally) huge-page memory. Cloning shares it.
pub struct WeightBuf<T> {
    _chunk: Option<Arc<Chunk>>,
    ptr: NonNull<T>,
    len: usize,
    _t: PhantomData<T>,
}

// SAFETY: the data is immutable after construction and `T` is plain data.
unsafe impl<T: Send + Sync> Send for WeightBuf<T> {}
unsafe impl<T: Send + Sync> Sync for WeightBuf<T> {}

impl<T: Copy> WeightBuf<T> {
    /// `len` elements, each written once by `fill` before the buffer is shared.
    pub fn build(len: usize, fill: impl FnOnce(&mut [T])) -> Self {
        assert!(std::mem::align_of::<T>() <= ALIGN);
        let bytes = len * std::mem::size_of::<T>();
        if bytes == 0 {
            fill(&mut []);
            return WeightBuf {
                _chunk: None,
                ptr: NonNull::dangling(),
                len: 0,
                _t: PhantomData,
            };
        }
        let (chunk, base) = carve(bytes);
        let ptr = base.cast::<T>();
        // SAFETY: `carve` returned `bytes` exclusive, aligned, zeroed bytes inside `chunk`.
        fill(unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len) });
        WeightBuf {
            _chunk: Some(chunk),
            ptr,
            len,
            _t: PhantomData,
        }
    }

    pub fn from_slice(src: &[T]) -> Self {
        Self::build(src.len(), |d| d.copy_from_slice(src))
    }
}

/// `bytes` fresh bytes at a 64-byte boundary, with the chunk that owns them.
fn carve(bytes: usize) -> (Arc<Chunk>, NonNull<u8>) {
    if bytes > OWN_MAPPING {
        return map(bytes);
    }
    let mut cur = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    let fits = cur.as_ref().is_some_and(|c| c.used + bytes <= CHUNK);
    if !fits {
        *cur = None; // the old chunk lives on in the buffers carved from it
    }
    let c = cur.get_or_insert_with(|| {
        let (chunk, base) = map(CHUNK);
        Current {
            chunk,
            base,
            used: 0,
        }
    });
    // SAFETY: used + bytes ≤ CHUNK, inside the mapping.
    let p = unsafe { NonNull::new_unchecked(c.base.as_ptr().add(c.used)) };
    c.used = (c.used + bytes).next_multiple_of(ALIGN);
    (c.chunk.clone(), p)
}

impl<T> Deref for WeightBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialized elements kept alive by `_chunk`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Clone for WeightBuf<T> {
    fn clone(&self) -> Self {
        WeightBuf {
            _chunk: self._chunk.clone(),
            ptr: self.ptr,
            len: self.len,
            _t: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for WeightBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WeightBuf[{} x {}]",
            self.len,
            std::any::type_name::<T>()
        )
    }
}

/// Zeroed, mutable f32 storage for the KV pool's exact blocks, in 4 KiB pages on purpose
/// (`MADV_NOHUGEPAGE`): a block's pages are given back when it is sealed or freed, and the
/// memory must follow those releases. A huge page would commit 2 MiB at the first write into
/// it (170 exact blocks of one layer for SmolLM2 when one is live), a release inside it would
/// split it and leave the other 2 MiB resident, and khugepaged would collapse a range with a
/// single live page back into a full huge page. Measured on the real model: one 496-token
/// request left 113 MiB of exact pages resident with huge pages, 0 without
/// (`docs/cpu-memory.md`). One block of one head is one 4 KiB page, so attention's TLB misses
/// cost one per page it streams in full. Untouched pages cost no memory until first written
/// (anonymous mappings are zero-filled on demand).
pub struct ZeroedBuf {
    mem: ZeroedMem,
    len: usize,
}

enum ZeroedMem {
    Map(memmap2::MmapMut),
    Heap(Vec<f32>),
}

impl ZeroedBuf {
    pub fn new(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<f32>();
        if bytes > 0 {
            if let Ok(m) = memmap2::MmapOptions::new()
                .len(bytes)
                .no_reserve_swap()
                .map_anon()
            {
                no_huge_pages(&m);
                return ZeroedBuf {
                    mem: ZeroedMem::Map(m),
                    len,
                };
            }
        }
        ZeroedBuf {
            mem: ZeroedMem::Heap(vec![0.0; len]),
            len,
        }
    }
}

impl Deref for ZeroedBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.mem {
            // SAFETY: the mapping is page-aligned, holds `len` f32s and lives as long as self.
            ZeroedMem::Map(m) => unsafe {
                std::slice::from_raw_parts(m.as_ptr() as *const f32, self.len)
            },
            ZeroedMem::Heap(v) => v,
        }
    }
}

impl std::ops::DerefMut for ZeroedBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        match &mut self.mem {
            // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
            ZeroedMem::Map(m) => unsafe {
                std::slice::from_raw_parts_mut(m.as_mut_ptr() as *mut f32, self.len)
            },
            ZeroedMem::Heap(v) => v,
        }
    }
}

impl ZeroedBuf {
    /// Gives the whole pages inside `range` (elements) back to the OS; they read as zero after.
    pub fn release(&mut self, range: std::ops::Range<usize>) {
        let size = std::mem::size_of::<f32>();
        release_pages(self.mem_bytes(), range.start * size..range.end * size);
    }

    fn mem_bytes(&mut self) -> Option<&mut memmap2::MmapMut> {
        match &mut self.mem {
            ZeroedMem::Map(m) => Some(m),
            ZeroedMem::Heap(_) => None,
        }
    }
}

/// Keeps transparent huge pages off a KV mapping (also where THP is `always`): its memory is
/// committed and given back per block, see [`ZeroedBuf`]. Best effort.
fn no_huge_pages(m: &memmap2::MmapMut) {
    #[cfg(target_os = "linux")]
    let _ = m.advise(memmap2::Advice::NoHugePage);
    #[cfg(not(target_os = "linux"))]
    let _ = m;
}

/// `madvise(MADV_DONTNEED)` on the whole pages inside `range` (bytes) of an anonymous private
/// mapping: they are freed and read as zero afterwards. Heap fallbacks keep their memory.
fn release_pages(map: Option<&mut memmap2::MmapMut>, range: std::ops::Range<usize>) {
    #[cfg(target_os = "linux")]
    if let Some(m) = map {
        const PAGE: usize = 4096;
        let (a, b) = (range.start.next_multiple_of(PAGE), range.end / PAGE * PAGE);
        if a < b && b <= m.len() {
            // SAFETY: the range is inside our own private anonymous mapping, and callers only
            // release bytes whose content they no longer need (zero-fill on next touch).
            let _ =
                unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (map, range);
}

/// Zeroed byte storage for sealed (compressed) KV blocks: reserved as address space only
/// (`MAP_NORESERVE`), committed page by page as blocks are written, and given back with
/// [`ZeroedBytes::release`] when a block leaves the arena.
pub struct ZeroedBytes {
    mem: Option<memmap2::MmapMut>,
    heap: Vec<u8>,
}

impl ZeroedBytes {
    pub fn new(len: usize) -> Self {
        if len > 0 {
            if let Ok(m) = memmap2::MmapOptions::new()
                .len(len)
                .no_reserve_swap()
                .map_anon()
            {
                no_huge_pages(&m);
                return ZeroedBytes {
                    mem: Some(m),
                    heap: Vec::new(),
                };
            }
        }
        ZeroedBytes {
            mem: None,
            heap: vec![0; len],
        }
    }

    /// Gives the whole pages inside `range` back to the OS (they read as zero after).
    pub fn release(&mut self, range: std::ops::Range<usize>) {
        release_pages(self.mem.as_mut(), range);
    }
}

impl Deref for ZeroedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.mem {
            Some(m) => m,
            None => &self.heap,
        }
    }
}

impl std::ops::DerefMut for ZeroedBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.mem {
            Some(m) => m,
            None => &mut self.heap,
        }
    }
}

impl std::fmt::Debug for ZeroedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZeroedBytes[{}]", self.len())
    }
}

impl std::fmt::Debug for ZeroedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZeroedBuf[{} x f32]", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_do_not_overlap_and_outlive_the_chunk_handle() {
        let a = WeightBuf::from_slice(&[1u16, 2, 3]);
        let b = WeightBuf::build(1000, |d: &mut [f32]| {
            d.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32)
        });
        let big = WeightBuf::build((OWN_MAPPING / 4) + 1, |d: &mut [f32]| d.fill(7.0));
        let c = a.clone();
        drop(a);
        assert_eq!(&c[..], &[1, 2, 3]);
        assert_eq!(b[999], 999.0);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(big.iter().all(|&v| v == 7.0));
        let e: WeightBuf<f32> = WeightBuf::from_slice(&[]);
        assert!(e.is_empty());
    }

    /// Pages of `len` bytes from `ptr` that are resident (mincore(2)).
    #[cfg(target_os = "linux")]
    fn resident_pages(ptr: *const u8, len: usize) -> usize {
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: `ptr` is the page-aligned start of a live mapping of at least `len` bytes.
        let rc = unsafe { libc::mincore(ptr as *mut libc::c_void, len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore");
        vec.iter().filter(|&&v| v & 1 != 0).count()
    }

    /// The KV arenas commit what is written and give back what is released, page by page:
    /// a transparent huge page would commit 2 MiB at the first write (where THP is on).
    #[cfg(target_os = "linux")]
    #[test]
    fn kv_arenas_commit_and_give_back_memory_page_by_page() {
        const MIB8: usize = 8 << 20;
        let mut z = ZeroedBuf::new(MIB8 / 4);
        assert_eq!(resident_pages(z.as_ptr() as *const u8, MIB8), 0);
        // Byte 4 MiB: the 2 MiB-aligned range around it lies inside the mapping.
        z[1 << 20] = 1.0;
        assert_eq!(resident_pages(z.as_ptr() as *const u8, MIB8), 1);
        z.release(0..MIB8 / 4);
        assert_eq!(resident_pages(z.as_ptr() as *const u8, MIB8), 0);
        assert_eq!(z[1 << 20], 0.0);

        let mut b = ZeroedBytes::new(MIB8);
        b[4 << 20] = 7;
        b[(4 << 20) + 5000] = 7;
        assert_eq!(resident_pages(b.as_ptr(), MIB8), 2);
        b.release(4 << 20..(4 << 20) + 4096);
        assert_eq!(resident_pages(b.as_ptr(), MIB8), 1);
        assert_eq!(b[(4 << 20) + 5000], 7);
    }

    #[test]
    fn zeroed_buf_is_zero_and_writable() {
        let mut z = ZeroedBuf::new(1 << 20);
        assert!(z.iter().all(|&v| v == 0.0));
        z[12345] = 3.0;
        assert_eq!(z[12345], 3.0);
        assert_eq!(z.as_ptr() as usize % ALIGN, 0);
        assert!(ZeroedBuf::new(0).is_empty());
    }
}
