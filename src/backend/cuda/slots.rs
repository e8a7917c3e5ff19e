//! Host-side bookkeeping of where each KV block's data lives in the CUDA backend's device
//! memory. Pure integer code (no CUDA calls), unit-tested without a GPU.
//!
//! Block ids (`0..num_blocks`) belong to the KV pool; the store only holds data. On the device a
//! block id has up to two representations at once:
//! - an *exact* copy (bf16) in the exact slab (slab 0), while the block fills and until
//!   [`BlockMap::release_exact`] after the step that sealed it, so the rest of that step still
//!   reads exact values;
//! - a *sealed* copy (a quantized format) in one of the sealed slabs (`1..=n`, one per format,
//!   added on demand with [`BlockMap::add_slab`]).
//!
//! Storage is decoupled from block ids so that memory follows what is held: a sealed block costs
//! its sealed bytes only, instead of every id reserving room in every format. Each slab stores
//! fixed-size blocks in slots, grouped in chunks of `per_chunk` slots; device memory is allocated
//! a chunk at a time and given back when a chunk has no live slot. Allocation takes the lowest
//! free slot among allocated chunks (else the lowest unallocated chunk), so live data stays
//! packed in low chunks and emptied chunks can be returned.
//!
//! Nothing here touches the device: each call appends the [`Action`]s the caller must perform,
//! in order, on its stream. A chunk free is emitted as soon as the chunk empties; the device
//! frees in stream order, after the kernels already queued, so that is safe.

/// "No copy here" in a [`BlockLoc`], and the answer for out-of-range blocks.
pub const NO_SLOT: u32 = u32::MAX;

/// A device-side action the caller must perform, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Allocate chunk `chunk` of slab `slab` (holds slots chunk*per_chunk .. +per_chunk).
    AllocChunk { slab: usize, chunk: u32 },
    /// Free chunk `chunk` of slab `slab` (no live slot left in it).
    FreeChunk { slab: usize, chunk: u32 },
    /// Copy one block's bytes within slab `slab` from slot `src` to slot `dst`.
    Copy { slab: usize, src: u32, dst: u32 },
}

/// Slot allocation within one slab.
#[derive(Debug, Clone)]
pub struct SlotAlloc {
    per_chunk: u32,
    /// Per slot: holds live data.
    used: Vec<bool>,
    /// Per chunk: its live slots, `None` while it is not allocated.
    chunks: Vec<Option<u32>>,
    /// Per slot: the block id whose data it holds (meaningful while the slot is live), so
    /// [`SlotAlloc::compact`] can say whose data it moved.
    owner: Vec<u32>,
    live: usize,
    /// Chunks allocated (kept, so that the per-step [`SlotAlloc::compact`] check is O(1)).
    allocated: usize,
}

impl SlotAlloc {
    /// `per_chunk` must be a power of two and `max_slots` a multiple of it.
    pub fn new(per_chunk: u32, max_slots: u32) -> Self {
        assert!(per_chunk.is_power_of_two(), "per_chunk {per_chunk}");
        assert_eq!(max_slots % per_chunk, 0, "max_slots {max_slots}");
        let chunks = vec![None; (max_slots / per_chunk) as usize];
        let used = vec![false; max_slots as usize];
        Self {
            per_chunk,
            used,
            chunks,
            owner: vec![NO_SLOT; max_slots as usize],
            live: 0,
            allocated: 0,
        }
    }

    /// Takes the lowest free slot among allocated chunks, else allocates the lowest unallocated
    /// chunk, for block `owner`. Panics when every slot is live: a slab never needs more slots
    /// than block ids.
    pub fn alloc(&mut self, out: &mut Vec<Action>, slab: usize, owner: u32) -> u32 {
        let pc = self.per_chunk;
        let open = self.chunks.iter().position(|c| c.is_some_and(|n| n < pc));
        let unused = || self.chunks.iter().position(Option::is_none);
        let c = open
            .or_else(unused)
            .unwrap_or_else(|| panic!("slab {slab} full"));
        if self.chunks[c].is_none() {
            let chunk = c as u32;
            out.push(Action::AllocChunk { slab, chunk });
            self.allocated += 1;
        }
        let base = c * pc as usize;
        let slot = base + self.used[base..].iter().position(|u| !u).unwrap();
        self.used[slot] = true;
        self.owner[slot] = owner;
        self.chunks[c] = Some(self.chunks[c].unwrap_or(0) + 1);
        self.live += 1;
        slot as u32
    }

    /// Frees a live slot, and its chunk when that was the chunk's last live slot.
    pub fn free(&mut self, slot: u32, out: &mut Vec<Action>, slab: usize) {
        let live = self.used.get(slot as usize) == Some(&true);
        assert!(live, "slab {slab} slot {slot}: not live");
        self.used[slot as usize] = false;
        self.live -= 1;
        let chunk = slot / self.per_chunk;
        let n = self.chunks[chunk as usize].map_or(0, |n| n - 1);
        self.chunks[chunk as usize] = (n > 0).then_some(n);
        if n == 0 {
            out.push(Action::FreeChunk { slab, chunk });
            self.allocated -= 1;
        }
    }

    /// Keeps the slab's memory within one chunk of what its live slots need: when more chunks
    /// than `⌈live / per_chunk⌉ + 1` are allocated (frees scattered over many chunks leave
    /// each partly used), the live slots of the highest ones move into free slots of the
    /// lowest `⌈live / per_chunk⌉ + 1`, which always have room for them, and the emptied
    /// chunks are freed. Appends a [`Action::Copy`] per move to `moves` and the chunk frees to
    /// `frees` (the caller performs the copies first: their sources are in those chunks);
    /// returns `(owner, new slot)` per move. No copy reads a slot another one writes.
    pub fn compact(
        &mut self,
        slab: usize,
        moves: &mut Vec<Action>,
        frees: &mut Vec<Action>,
    ) -> Vec<(u32, u32)> {
        let pc = self.per_chunk as usize;
        let keep = self.live.div_ceil(pc) + 1;
        if self.allocated <= keep {
            return Vec::new();
        }
        let allocated: Vec<usize> = (0..self.chunks.len())
            .filter(|&c| self.chunks[c].is_some())
            .collect();
        let mut moved = Vec::new();
        for &c in allocated.iter().skip(keep) {
            for src in c * pc..(c + 1) * pc {
                if !self.used[src] {
                    continue;
                }
                let owner = self.owner[src];
                let mut grown = Vec::new();
                let dst = self.alloc(&mut grown, slab, owner);
                debug_assert!(grown.is_empty() && (dst as usize) < allocated[keep] * pc);
                moves.push(Action::Copy {
                    slab,
                    src: src as u32,
                    dst,
                });
                moved.push((owner, dst));
                self.free(src as u32, frees, slab);
            }
        }
        moved
    }

    pub fn live(&self) -> usize {
        self.live
    }
    pub fn chunks_allocated(&self) -> usize {
        self.allocated
    }
    pub fn per_chunk(&self) -> u32 {
        self.per_chunk
    }
}

/// Where block `b` lives: its slot in the exact slab and in sealed slab `slab` ([`NO_SLOT`]
/// when absent; `slab` is meaningful only when `sealed != NO_SLOT`, and 0 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLoc {
    pub exact: u32,
    pub sealed: u32,
    pub slab: u8,
}

const EMPTY: BlockLoc = BlockLoc {
    exact: NO_SLOT,
    sealed: NO_SLOT,
    slab: 0,
};

/// Every block id's slots, and the slabs (0: exact, 1..: sealed) they are allocated from.
#[derive(Debug, Clone)]
pub struct BlockMap {
    locs: Vec<BlockLoc>,
    slabs: Vec<SlotAlloc>,
}

impl BlockMap {
    /// `num_blocks` block ids; `exact_per_chunk` slots per chunk in the exact slab (slab 0).
    pub fn new(num_blocks: usize, exact_per_chunk: u32) -> Self {
        let locs = vec![EMPTY; num_blocks];
        let mut map = Self {
            locs,
            slabs: Vec::new(),
        };
        map.add_slab(exact_per_chunk);
        map
    }

    /// Adds a sealed slab of `per_chunk` slots per chunk; returns its index (1, 2, ...).
    pub fn add_slab(&mut self, per_chunk: u32) -> usize {
        assert!(self.slabs.len() <= u8::MAX as usize, "too many slabs");
        let max = self.locs.len().next_multiple_of(per_chunk as usize);
        assert!(max < NO_SLOT as usize, "too many blocks");
        self.slabs.push(SlotAlloc::new(per_chunk, max as u32));
        self.slabs.len() - 1
    }

    pub fn num_slabs(&self) -> usize {
        self.slabs.len()
    }

    pub fn loc(&self, block: u32) -> BlockLoc {
        self.locs.get(block as usize).copied().unwrap_or(EMPTY)
    }

    /// A token is about to be written at `offset` of `block` in `layer` (rope_and_store). The
    /// first write (`layer == 0 && offset == 0`) starts the block afresh, so its sealed copy is
    /// stale and freed; every write needs an exact slot (kept if the block has one). Returns the
    /// exact slot; [`NO_SLOT`] (no action) for an out-of-range block.
    pub fn write(&mut self, block: u32, layer: usize, offset: usize, out: &mut Vec<Action>) -> u32 {
        let b = block as usize;
        if b >= self.locs.len() {
            return NO_SLOT;
        }
        if layer == 0 && offset == 0 {
            self.free_sealed(b, out);
        }
        if self.locs[b].exact == NO_SLOT {
            self.locs[b].exact = self.slabs[0].alloc(out, 0, block);
        }
        self.locs[b].exact
    }

    /// Seals `block` into sealed slab `slab` (called for layer 0; the caller encodes every layer
    /// into the returned slot). A sealed copy in another slab is freed, one in the same slab is
    /// kept (re-sealing overwrites it). `None` (no action) when the block has no exact copy to
    /// seal from or is out of range. Returns `(exact_slot, sealed_slot)`.
    pub fn seal(&mut self, block: u32, slab: usize, out: &mut Vec<Action>) -> Option<(u32, u32)> {
        assert!((1..self.slabs.len()).contains(&slab), "slab {slab}");
        let b = block as usize;
        let exact = self.locs.get(b).map_or(NO_SLOT, |l| l.exact);
        if exact == NO_SLOT {
            return None;
        }
        if self.locs[b].slab as usize != slab {
            self.free_sealed(b, out);
        }
        if self.locs[b].sealed == NO_SLOT {
            self.locs[b].sealed = self.slabs[slab].alloc(out, slab, block);
            self.locs[b].slab = slab as u8;
        }
        Some((exact, self.locs[b].sealed))
    }

    /// After the step: frees the exact copy of each block that has a sealed copy (blocks
    /// without one keep their exact copy, it is their only data).
    pub fn release_exact(&mut self, blocks: &[u32], out: &mut Vec<Action>) {
        for &b in blocks {
            if self.loc(b).sealed != NO_SLOT {
                self.free_exact(b as usize, out);
            }
        }
    }

    /// Copy-on-write, pair by pair in order (so `a→b, b→c` gives `c` the new `b`): `dst`'s old
    /// copies are freed, then `dst` gets a slot in the same slab for each copy `src` has, with an
    /// [`Action::Copy`] each. Freeing first is safe: `src`'s slots are never freed here. Pairs
    /// out of range or with `src == dst` are skipped.
    pub fn copy(&mut self, pairs: &[(u32, u32)], out: &mut Vec<Action>) {
        let n = self.locs.len();
        for &(src, dst) in pairs {
            let (s, d) = (src as usize, dst as usize);
            if s >= n || d >= n || s == d {
                continue;
            }
            self.free_exact(d, out);
            self.free_sealed(d, out);
            let from = self.locs[s];
            if from.exact != NO_SLOT {
                self.locs[d].exact = self.copy_slot(0, from.exact, dst, out);
            }
            if from.sealed != NO_SLOT {
                let slab = from.slab as usize;
                self.locs[d].sealed = self.copy_slot(slab, from.sealed, dst, out);
                self.locs[d].slab = from.slab;
            }
        }
    }

    /// Live slots in slab `slab`.
    pub fn live(&self, slab: usize) -> usize {
        self.slabs[slab].live()
    }
    /// Allocated chunks in slab `slab`.
    pub fn chunks_allocated(&self, slab: usize) -> usize {
        self.slabs[slab].chunks_allocated()
    }

    /// The pool freed `blocks`: every copy they have is freed (out-of-range ids are skipped).
    pub fn forget(&mut self, blocks: &[u32], out: &mut Vec<Action>) {
        let n = self.locs.len();
        for &b in blocks.iter().filter(|&&b| (b as usize) < n) {
            self.free_exact(b as usize, out);
            self.free_sealed(b as usize, out);
        }
    }

    /// [`SlotAlloc::compact`] on every slab, the moved blocks' locations updated. Call between
    /// steps (a step's tables hold the slots it planned with); perform `moves` before `frees`.
    pub fn compact(&mut self, moves: &mut Vec<Action>, frees: &mut Vec<Action>) {
        for slab in 0..self.slabs.len() {
            for (owner, slot) in self.slabs[slab].compact(slab, moves, frees) {
                let l = &mut self.locs[owner as usize];
                if slab == 0 {
                    l.exact = slot;
                } else {
                    debug_assert_eq!(l.slab as usize, slab);
                    l.sealed = slot;
                }
            }
        }
    }

    fn copy_slot(&mut self, slab: usize, src: u32, owner: u32, out: &mut Vec<Action>) -> u32 {
        let dst = self.slabs[slab].alloc(out, slab, owner);
        out.push(Action::Copy { slab, src, dst });
        dst
    }
    fn free_exact(&mut self, b: usize, out: &mut Vec<Action>) {
        let slot = std::mem::replace(&mut self.locs[b].exact, NO_SLOT);
        if slot != NO_SLOT {
            self.slabs[0].free(slot, out, 0);
        }
    }
    fn free_sealed(&mut self, b: usize, out: &mut Vec<Action>) {
        let l = &mut self.locs[b];
        if l.sealed != NO_SLOT {
            self.slabs[l.slab as usize].free(l.sealed, out, l.slab as usize);
            (l.sealed, l.slab) = (NO_SLOT, 0);
        }
    }
}

#[cfg(test)]
#[path = "slots_tests.rs"]
mod tests;
