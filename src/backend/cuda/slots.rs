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
    live: usize,
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
            live: 0,
        }
    }

    /// Takes the lowest free slot among allocated chunks, else allocates the lowest unallocated
    /// chunk. Panics when every slot is live: a slab never needs more slots than block ids.
    pub fn alloc(&mut self, out: &mut Vec<Action>, slab: usize) -> u32 {
        let pc = self.per_chunk;
        let open = self.chunks.iter().position(|c| c.is_some_and(|n| n < pc));
        let unused = || self.chunks.iter().position(Option::is_none);
        let c = open
            .or_else(unused)
            .unwrap_or_else(|| panic!("slab {slab} full"));
        if self.chunks[c].is_none() {
            let chunk = c as u32;
            out.push(Action::AllocChunk { slab, chunk });
        }
        let base = c * pc as usize;
        let slot = base + self.used[base..].iter().position(|u| !u).unwrap();
        self.used[slot] = true;
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
        }
    }

    pub fn live(&self) -> usize {
        self.live
    }
    pub fn chunks_allocated(&self) -> usize {
        self.chunks.iter().filter(|c| c.is_some()).count()
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
            self.locs[b].exact = self.slabs[0].alloc(out, 0);
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
            self.locs[b].sealed = self.slabs[slab].alloc(out, slab);
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
                self.locs[d].exact = self.copy_slot(0, from.exact, out);
            }
            if from.sealed != NO_SLOT {
                let slab = from.slab as usize;
                self.locs[d].sealed = self.copy_slot(slab, from.sealed, out);
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

    fn copy_slot(&mut self, slab: usize, src: u32, out: &mut Vec<Action>) -> u32 {
        let dst = self.slabs[slab].alloc(out, slab);
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
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::{HashMap, HashSet};

    /// "Absent", short enough for tables.
    const X: u32 = NO_SLOT;

    fn alloc(slab: usize, chunk: u32) -> Action {
        Action::AllocChunk { slab, chunk }
    }
    fn free(slab: usize, chunk: u32) -> Action {
        Action::FreeChunk { slab, chunk }
    }
    fn copy(slab: usize, src: u32, dst: u32) -> Action {
        Action::Copy { slab, src, dst }
    }
    /// (exact, sealed, slab) of `b`.
    fn at(m: &BlockMap, b: u32) -> (u32, u32, u8) {
        let l = m.loc(b);
        (l.exact, l.sealed, l.slab)
    }

    fn take(a: &mut SlotAlloc, out: &mut Vec<Action>, n: usize) -> Vec<u32> {
        (0..n).map(|_| a.alloc(out, 1)).collect()
    }

    #[test]
    fn slot_alloc_takes_lowest_free_slot_and_frees_empty_chunks() {
        let (mut a, mut out) = (SlotAlloc::new(2, 6), Vec::new());
        assert_eq!(take(&mut a, &mut out, 3), [0, 1, 2]);
        a.free(0, &mut out, 1);
        assert_eq!(take(&mut a, &mut out, 1), [0], "the hole, not slot 3");
        a.free(2, &mut out, 1);
        assert_eq!(out, [alloc(1, 0), alloc(1, 1), free(1, 1)]);
        out.clear();
        assert_eq!(take(&mut a, &mut out, 3), [2, 3, 4]);
        a.free(1, &mut out, 1);
        a.free(0, &mut out, 1);
        // Allocated chunk 2 has room: chunk 0 comes back only after it is full.
        assert_eq!(take(&mut a, &mut out, 2), [5, 0]);
        assert_eq!(out, [alloc(1, 1), alloc(1, 2), free(1, 0), alloc(1, 0)]);
        assert_eq!((a.live(), a.chunks_allocated(), a.per_chunk()), (5, 3, 2));
    }

    #[test]
    #[should_panic(expected = "slab 3 full")]
    fn slot_alloc_panics_when_full() {
        let (mut a, mut out) = (SlotAlloc::new(2, 2), Vec::new());
        (0..3).for_each(|_| _ = a.alloc(&mut out, 3));
    }

    #[test]
    fn block_life_cycle() {
        let (mut m, mut out) = (BlockMap::new(4, 2), Vec::new());
        assert_eq!((m.add_slab(2), m.num_slabs()), (1, 2));
        assert_eq!(m.write(3, 0, 0, &mut out), 0);
        assert_eq!(m.write(3, 0, 1, &mut out), 0);
        assert_eq!(m.write(3, 5, 0, &mut out), 0);
        assert_eq!(m.write(1, 0, 0, &mut out), 1);
        assert_eq!(m.write(4, 0, 0, &mut out), NO_SLOT);
        assert_eq!(m.seal(3, 1, &mut out), Some((0, 0)));
        assert_eq!(at(&m, 3), (0, 0, 1));
        assert_eq!(out, [alloc(0, 0), alloc(1, 0)]);
        out.clear();
        m.release_exact(&[3, 1, 9], &mut out); // 1 has no sealed copy: keeps its exact one
        assert_eq!((at(&m, 3), at(&m, 1)), ((X, 0, 1), (1, X, 0)));
        assert_eq!(m.seal(1, 1, &mut out), Some((1, 1)));
        m.release_exact(&[1], &mut out);
        assert_eq!(out, [free(0, 0)]);
        assert_eq!((m.live(0), m.chunks_allocated(0)), (0, 0));
        out.clear();
        // A later-layer write re-creates the exact copy and keeps the sealed one.
        assert_eq!(m.write(1, 1, 0, &mut out), 0);
        assert_eq!(at(&m, 1), (0, 1, 1));
        // Starting a block afresh frees its sealed copy: 3's leaves 1's in the chunk.
        assert_eq!(m.write(3, 0, 0, &mut out), 1);
        assert_eq!(out, [alloc(0, 0)]);
        assert_eq!(m.write(1, 0, 0, &mut out), 0);
        assert_eq!(out, [alloc(0, 0), free(1, 0)]);
        assert_eq!((at(&m, 1), at(&m, 3)), ((0, X, 0), (1, X, 0)));
        assert_eq!((m.live(0), m.live(1), m.chunks_allocated(1)), (2, 0, 0));
    }

    #[test]
    fn seal_moves_between_slabs_and_needs_an_exact_copy() {
        let (mut m, mut out) = (BlockMap::new(4, 2), Vec::new());
        assert_eq!((m.add_slab(2), m.add_slab(4), m.num_slabs()), (1, 2, 3));
        assert_eq!(m.seal(0, 1, &mut out), None);
        assert_eq!(m.seal(9, 1, &mut out), None);
        assert_eq!((&out[..], at(&m, 0)), (&[][..], (X, X, 0)));
        m.write(0, 0, 0, &mut out);
        assert_eq!(m.seal(0, 1, &mut out), Some((0, 0)));
        assert_eq!(
            m.seal(0, 1, &mut out),
            Some((0, 0)),
            "re-seal keeps its slot"
        );
        assert_eq!(m.seal(0, 2, &mut out), Some((0, 0)));
        assert_eq!(out, [alloc(0, 0), alloc(1, 0), free(1, 0), alloc(2, 0)]);
        assert_eq!((at(&m, 0), m.live(1), m.live(2)), ((0, 0, 2), 0, 1));
    }

    #[test]
    fn copy_frees_dst_first_and_chains() {
        let (mut m, mut out) = (BlockMap::new(8, 2), Vec::new());
        m.add_slab(2);
        for b in 0..3 {
            m.write(b, 0, 0, &mut out);
        }
        m.seal(0, 1, &mut out);
        m.seal(2, 1, &mut out);
        out.clear();
        // 2 (exact 2, alone in chunk 1; sealed 1) becomes a copy of 0 (exact 0, sealed 0).
        m.copy(&[(0, 2), (5, 5), (0, 9), (9, 0)], &mut out);
        let want = [free(0, 1), alloc(0, 1), copy(0, 0, 2), copy(1, 0, 1)];
        assert_eq!(out, want);
        assert_eq!((at(&m, 2), at(&m, 5)), ((2, 1, 1), (X, X, 0)));
        out.clear();
        // 1 (exact only) gets 2's copies, then 3 gets 1's new ones.
        m.copy(&[(2, 1), (1, 3)], &mut out);
        let want1 = [copy(0, 2, 1), alloc(1, 1), copy(1, 1, 2)];
        assert_eq!(out[..3], want1);
        assert_eq!(out[3..], [copy(0, 1, 3), copy(1, 2, 3)]);
        assert_eq!((at(&m, 1), at(&m, 3)), ((1, 2, 1), (3, 3, 1)));
        assert_eq!((m.live(0), m.live(1)), (4, 4));
    }

    /// The device as replayed from the actions alone: (slab, chunk) → per-slot content tag.
    type Device = HashMap<(usize, u32), Vec<Option<u64>>>;
    /// Per block: the content tag of its exact copy, and the (slab, tag) of its sealed one.
    type Reference = Vec<(Option<u64>, Option<(usize, u64)>)>;

    fn cell<'a>(dev: &'a mut Device, pc: &[u32], slab: usize, slot: u32) -> &'a mut Option<u64> {
        let chunk = dev.get_mut(&(slab, slot / pc[slab]));
        let chunk = chunk.unwrap_or_else(|| panic!("slab {slab} slot {slot}: no chunk"));
        &mut chunk[(slot % pc[slab]) as usize]
    }

    /// Applies `out` to `dev`; records (slab, kind) of each action in `seen`.
    fn replay(dev: &mut Device, pc: &[u32], out: &[Action], seen: &mut HashSet<(usize, u8)>) {
        for &a in out {
            match a {
                Action::AllocChunk { slab, chunk } => {
                    let fresh = vec![None; pc[slab] as usize];
                    assert!(dev.insert((slab, chunk), fresh).is_none(), "{a:?}");
                    seen.insert((slab, 0));
                }
                Action::FreeChunk { slab, chunk } => {
                    assert!(dev.remove(&(slab, chunk)).is_some(), "{a:?}");
                    seen.insert((slab, 1));
                }
                Action::Copy { slab, src, dst } => {
                    let tag = cell(dev, pc, slab, src).expect("copy of unwritten slot");
                    *cell(dev, pc, slab, dst) = Some(tag);
                    seen.insert((slab, 2));
                }
            }
        }
    }

    fn check(m: &BlockMap, r: &Reference, dev: &mut Device, pc: &[u32]) {
        let mut owned = vec![HashSet::new(); pc.len()];
        for (b, &(exact, sealed)) in r.iter().enumerate() {
            let l = m.loc(b as u32);
            let sealed_slab = (l.sealed != NO_SLOT).then_some(l.slab as usize);
            assert_eq!(l.exact != NO_SLOT, exact.is_some(), "block {b}");
            assert_eq!(sealed_slab, sealed.map(|s| s.0), "block {b}");
            let sealed = (l.slab as usize, l.sealed, sealed.map(|s| s.1));
            for (slab, slot, tag) in [(0, l.exact, exact), sealed] {
                let Some(tag) = tag else { continue };
                assert!(
                    owned[slab].insert(slot),
                    "slab {slab} slot {slot} owned twice"
                );
                assert_eq!(*cell(dev, pc, slab, slot), Some(tag), "block {b}");
            }
        }
        for (slab, slots) in owned.iter().enumerate() {
            let chunks: HashSet<u32> = dev.keys().filter(|k| k.0 == slab).map(|k| k.1).collect();
            assert_eq!(m.live(slab), slots.len());
            assert_eq!(m.chunks_allocated(slab), chunks.len());
            for c in chunks {
                let used = slots.iter().any(|s| s / pc[slab] == c);
                assert!(used, "slab {slab} chunk {c} allocated but empty");
            }
        }
    }

    #[test]
    fn random_operations_match_the_reference_and_the_replayed_device() {
        const N: u32 = 42;
        let pc = [4, 4, 2, 8];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut m = BlockMap::new(N as usize, pc[0]);
        pc[1..].iter().for_each(|&p| _ = m.add_slab(p));
        let mut r: Reference = vec![(None, None); N as usize];
        let (mut dev, mut seen, mut out) = (Device::new(), HashSet::new(), Vec::new());
        let pick = |rng: &mut ChaCha8Rng| rng.random_range(0..N + 2); // sometimes out of range
        for tag in 0..5000 {
            out.clear();
            let b = pick(&mut rng);
            let ok = b < N;
            match rng.random_range(0..100) {
                0..40 => {
                    let layer = [0, 0, 1, 2][rng.random_range(0..4)];
                    let offset = [0, 0, 1, 7][rng.random_range(0..4)];
                    let slot = m.write(b, layer, offset, &mut out);
                    replay(&mut dev, &pc, &out, &mut seen);
                    assert_eq!(slot, if ok { m.loc(b).exact } else { NO_SLOT });
                    if ok {
                        let rb = &mut r[b as usize];
                        if layer == 0 && offset == 0 {
                            rb.1 = None;
                        }
                        rb.0 = Some(tag);
                        *cell(&mut dev, &pc, 0, slot) = Some(tag);
                    }
                }
                40..65 => {
                    let slab = rng.random_range(1..pc.len());
                    let got = m.seal(b, slab, &mut out);
                    replay(&mut dev, &pc, &out, &mut seen);
                    assert_eq!(got.is_some(), ok && r[b as usize].0.is_some());
                    if let Some((exact, sealed)) = got {
                        assert_eq!(at(&m, b), (exact, sealed, slab as u8));
                        r[b as usize].1 = Some((slab, tag));
                        *cell(&mut dev, &pc, slab, sealed) = Some(tag);
                    }
                }
                65..85 => {
                    let list: Vec<u32> = (0..rng.random_range(0..5))
                        .map(|_| pick(&mut rng))
                        .collect();
                    m.release_exact(&list, &mut out);
                    replay(&mut dev, &pc, &out, &mut seen);
                    for &b in list.iter().filter(|&&b| b < N) {
                        if r[b as usize].1.is_some() {
                            r[b as usize].0 = None;
                        }
                    }
                }
                _ => {
                    let pairs: Vec<_> = (0..rng.random_range(0..5))
                        .map(|_| (pick(&mut rng), pick(&mut rng)))
                        .collect();
                    m.copy(&pairs, &mut out);
                    replay(&mut dev, &pc, &out, &mut seen);
                    for &(s, d) in pairs.iter().filter(|&&(s, d)| s < N && d < N) {
                        r[d as usize] = r[s as usize];
                    }
                }
            }
            check(&m, &r, &mut dev, &pc);
        }
        // Every kind of action happened in every slab.
        assert_eq!(seen.len(), pc.len() * 3, "{seen:?}");
    }
}
