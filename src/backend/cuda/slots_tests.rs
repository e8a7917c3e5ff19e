//! Unit tests of `slots.rs`: slot allocation, block life cycles, forget and compaction, and a
//! randomized check against a reference replayed from the emitted actions.

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
    (0..n).map(|_| a.alloc(out, 1, 0)).collect()
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
    (0..3).for_each(|_| _ = a.alloc(&mut out, 3, 0));
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

#[test]
fn forget_frees_and_compaction_packs_scattered_slots() {
    let (mut m, mut out) = (BlockMap::new(12, 2), Vec::new());
    for b in 0..12 {
        assert_eq!(m.write(b, 0, 0, &mut out), b);
    }
    out.clear();
    // One live slot left in each of the 6 chunks: nothing freed yet.
    m.forget(&[0, 2, 4, 6, 8, 10, 99], &mut out);
    assert_eq!(
        (&out[..], m.live(0), m.chunks_allocated(0)),
        (&[][..], 6, 6)
    );
    assert_eq!(at(&m, 4), (X, X, 0));
    // 6 live slots need 3 chunks; 4 are kept, the top two emptied into the lowest holes.
    let (mut moves, mut frees) = (Vec::new(), Vec::new());
    m.compact(&mut moves, &mut frees);
    assert_eq!(moves, [copy(0, 9, 0), copy(0, 11, 2)]);
    assert_eq!(frees, [free(0, 4), free(0, 5)]);
    assert_eq!(
        (at(&m, 9), at(&m, 11), at(&m, 7)),
        ((0, X, 0), (2, X, 0), (7, X, 0))
    );
    assert_eq!((m.live(0), m.chunks_allocated(0)), (6, 4));
    // Within one chunk of need: nothing more to do.
    let (mut moves, mut frees) = (Vec::new(), Vec::new());
    m.compact(&mut moves, &mut frees);
    assert!(moves.is_empty() && frees.is_empty());
    // A sealed slab too; forgetting a sealed block frees both its copies.
    m.add_slab(2);
    m.seal(7, 1, &mut out);
    out.clear();
    m.forget(&[7], &mut out);
    assert_eq!(out, [free(0, 3), free(1, 0)]);
    assert_eq!(at(&m, 7), (X, X, 0));
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

/// [`BlockMap::compact`], replayed moves first; then every slab is within one chunk of
/// what its live slots need.
fn compact(m: &mut BlockMap, dev: &mut Device, pc: &[u32], seen: &mut HashSet<(usize, u8)>) {
    let (mut moves, mut frees) = (Vec::new(), Vec::new());
    m.compact(&mut moves, &mut frees);
    replay(dev, pc, &moves, seen);
    replay(dev, pc, &frees, seen);
    for (slab, &p) in pc.iter().enumerate() {
        let need = m.live(slab).div_ceil(p as usize);
        assert!(m.chunks_allocated(slab) <= need + 1, "slab {slab}");
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
    let picks = |rng: &mut ChaCha8Rng, most: usize| -> Vec<u32> {
        (0..rng.random_range(0..most)).map(|_| pick(rng)).collect()
    };
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
            65..80 => {
                let list = picks(&mut rng, 5);
                m.release_exact(&list, &mut out);
                replay(&mut dev, &pc, &out, &mut seen);
                for &b in list.iter().filter(|&&b| b < N) {
                    if r[b as usize].1.is_some() {
                        r[b as usize].0 = None;
                    }
                }
                compact(&mut m, &mut dev, &pc, &mut seen);
            }
            80..88 => {
                let list = picks(&mut rng, 8);
                m.forget(&list, &mut out);
                replay(&mut dev, &pc, &out, &mut seen);
                for &b in list.iter().filter(|&&b| b < N) {
                    r[b as usize] = (None, None);
                }
                compact(&mut m, &mut dev, &pc, &mut seen);
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
