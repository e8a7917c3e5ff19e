//! Exact-layout tests of the CPU KV store: writes land in their block runs, copies carry every
//! layer, sizes.

use super::*;

const SHAPE: AttnShape = AttnShape {
    num_heads: 2,
    num_kv_heads: 2,
    head_dim: 2,
};

#[test]
fn store_writes_each_head_into_its_block_run() {
    // Block size 2, 3 blocks. Rows [q q q q | k0 k0 k1 k1 | v0 v0 v1 v1] at slots 5 and 0.
    let mut s = CpuKvStore::new(2, 3, 2, SHAPE);
    let qkv: Vec<f32> = (0..24).map(|i| i as f32).collect();
    s.store(1, &qkv, 2, &[5, 0]);
    let l = s.layer(1);
    // Slot 5 = block 2, offset 1: head 0 at ((2*2+0)*2+1)*2 = 18, head 1 at 22.
    assert_eq!(&l.k[18..20], &[4.0, 5.0]);
    assert_eq!(&l.k[22..24], &[6.0, 7.0]);
    assert_eq!(&l.v[18..20], &[8.0, 9.0]);
    assert_eq!(&l.v[22..24], &[10.0, 11.0]);
    // Slot 0: head 0 at 0, head 1 at 4.
    assert_eq!(&l.k[0..2], &[16.0, 17.0]);
    assert_eq!(&l.k[4..6], &[18.0, 19.0]);
    assert_eq!(&l.v[4..6], &[22.0, 23.0]);
    let written = [0, 1, 4, 5, 18, 19, 22, 23];
    for (i, &x) in l.k.iter().enumerate() {
        assert_eq!(x != 0.0, written.contains(&i), "k[{i}] = {x}");
    }
    assert!(s.layer(0).k.iter().all(|&v| v == 0.0));
    assert_eq!(s.view(1).k(2, 1, 1), &[6.0, 7.0]);
}

#[test]
fn copy_blocks_copies_every_layer_k_and_v() {
    let mut s = CpuKvStore::new(3, 4, 2, SHAPE);
    let n = 2 * SHAPE.kv_width();
    for l in 0..3 {
        let lkv = s.layer_mut(l);
        for i in 0..lkv.k.len() {
            lkv.k[i] = (l * 1000 + i) as f32;
            lkv.v[i] = -((l * 1000 + i) as f32);
        }
    }
    // Chain: 1 → 3, then 3 → 0 (sees the copied data, in order); an invalid pair is skipped
    // in release.
    let copies: &[(u32, u32)] = if cfg!(debug_assertions) {
        &[(1, 3), (3, 0)]
    } else {
        &[(1, 3), (9, 2), (3, 0)]
    };
    s.copy_blocks(copies);
    for l in 0..3 {
        let lkv = s.layer(l);
        for i in 0..n {
            let src = (l * 1000 + n + i) as f32;
            assert_eq!(lkv.k[3 * n + i], src, "layer {l} K");
            assert_eq!(lkv.v[3 * n + i], -src, "layer {l} V");
            assert_eq!(lkv.k[i], src);
            assert_eq!(lkv.v[i], -src);
            // Untouched blocks keep their data.
            assert_eq!(lkv.k[2 * n + i], (l * 1000 + 2 * n + i) as f32);
        }
    }
}

#[test]
fn store_skips_slots_past_capacity_in_release() {
    if cfg!(debug_assertions) {
        return; // the debug assertion is the intended behaviour there
    }
    let mut s = CpuKvStore::new(1, 1, 2, SHAPE);
    s.store(0, &[1.0; 12], 1, &[2]);
    assert!(s.layer(0).k.iter().all(|&v| v == 0.0));
}

#[test]
fn bytes_per_block() {
    // SmolLM2-135M: 30 layers, 3 KV heads of 64, 16 tokens: 30 · 2 · 16 · 192 · 4 bytes.
    let shape = AttnShape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
    };
    assert_eq!(CpuKvStore::bytes_per_block(30, 16, shape), 737_280);
}

#[test]
fn forget_gives_back_every_page_of_the_freed_blocks_only() {
    // Blocks of 16 tokens, 8 heads of 64, 4 layers: one block of one layer is 32 KiB exact
    // (K or V), 128 KiB sealed as bf16 and 8 KiB of key bounds over all layers: whole pages,
    // so released pages read as zero.
    let shape = AttnShape {
        num_heads: 8,
        num_kv_heads: 8,
        head_dim: 64,
    };
    let (layers, bs) = (4, 16);
    let mut s = CpuKvStore::new(layers, 3, bs, shape);
    let width = shape.qkv_width();
    let qkv: Vec<f32> = (0..3 * bs * width).map(|i| 1.0 + (i % 97) as f32).collect();
    let slots: Vec<u32> = (0..3 * bs as u32).collect();
    let seal = |b: u32, bounds: bool| Seal {
        block: b,
        pos: b * bs as u32,
        codec: Codec::Bf16,
        bounds,
    };
    for l in 0..layers {
        s.store(l, &qkv, 3 * bs, &slots);
        // Block 0 sealed with key bounds, block 2 sealed plain, block 1 left exact (a tail).
        s.seal(l, &[seal(0, true), seal(2, false)]);
    }
    s.release_exact(&[0, 2]);
    let n = s.block_len();
    let bb = s.sealed[0].block_bytes;
    let nonzero = |x: &[f32]| x.iter().any(|&v| v != 0.0);
    assert!(nonzero(&s.layer(1).k[n..2 * n]));
    assert!(s.sealed[0].data[..bb].iter().any(|&v| v != 0));
    assert!(s.bounds.as_ref().unwrap().iter().any(|&v| v != 0));

    s.forget(&[0, 1]);
    for l in 0..layers {
        let lkv = s.layer(l);
        assert!(
            !nonzero(&lkv.k[..2 * n]) && !nonzero(&lkv.v[..2 * n]),
            "layer {l}"
        );
    }
    assert!(s.sealed[0].data[..bb].iter().all(|&v| v == 0));
    let bounds = s.bounds.as_ref().unwrap();
    let bbb = s.bounds_block_bytes();
    assert!(bounds[..bbb].iter().all(|&v| v == 0));
    assert_eq!(s.sealed_codec(0), None);
    assert_eq!(s.sealed_codec(1), None);
    // Block 2 keeps its sealed data and still reads it.
    assert_eq!(s.sealed_codec(2), Some(Codec::Bf16));
    assert!(s.sealed[0].data[2 * bb..3 * bb].iter().any(|&v| v != 0));
    let mut k = vec![0f32; bs * 64];
    s.view(1).decode_k(2, 1, 0, bs, 2 * bs, &mut k);
    for (t, row) in k.chunks_exact(64).enumerate() {
        let src = &qkv[(2 * bs + t) * width + shape.q_width() + 64..][..64];
        for (c, (&got, &want)) in row.iter().zip(src).enumerate() {
            assert_eq!(
                got,
                half::bf16::from_f32(want).to_f32(),
                "token {t} channel {c}"
            );
        }
    }
}
