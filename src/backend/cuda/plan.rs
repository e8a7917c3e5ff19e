//! Host-side planning of one batched attention call: which rows go to the decode kernel (one
//! query row per sequence, split along the context) and which to the prefill kernel (tiles of
//! rows of one sequence) and the flattened block tables they read (the decode split's length:
//! `split.rs`). Pure integer code, unit-tested without a GPU.

use crate::backend::AttnSeq;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct AttnPlan {
    /// `[n, 3]`: (qkv row, context length, offset in `tables`) per decode row.
    pub decode: Vec<u32>,
    /// `[tiles, 4]`: (first qkv row, rows, position of that row, offset in `tables`).
    pub tiles: Vec<u32>,
    /// Every sequence's block table, cut to the blocks its rows read.
    pub tables: Vec<u32>,
    /// Longest decode context.
    pub max_ctx: usize,
}

impl AttnPlan {
    pub fn decode_rows(&self) -> usize {
        self.decode.len() / 3
    }
    pub fn num_tiles(&self) -> usize {
        self.tiles.len() / 4
    }
}

/// Plans the sequences of `seqs` that `include` accepts (rows still count every sequence: row
/// numbers index the whole batch) for query groups of `group` heads: sequences of one row are
/// decode rows, the others are cut into tiles of `max(1, tile_queries / group)` rows.
pub fn plan(
    seqs: &[AttnSeq<'_>],
    group: usize,
    block_size: usize,
    tile_queries: usize,
    include: impl Fn(&AttnSeq<'_>) -> bool,
) -> AttnPlan {
    let mut p = AttnPlan::default();
    let tile_rows = (tile_queries / group.max(1)).max(1);
    let mut row = 0usize;
    for s in seqs {
        if !include(s) {
            row += s.rows;
            continue;
        }
        let end = s.start_pos + s.rows;
        let needed = end.div_ceil(block_size).min(s.block_table.len());
        let off = p.tables.len() as u32;
        p.tables.extend_from_slice(&s.block_table[..needed]);
        if s.rows == 1 {
            p.decode.extend([row as u32, end as u32, off]);
            p.max_ctx = p.max_ctx.max(end);
        } else {
            for r0 in (0..s.rows).step_by(tile_rows) {
                let n = tile_rows.min(s.rows - r0);
                p.tiles
                    .extend([(row + r0) as u32, n as u32, (s.start_pos + r0) as u32, off]);
            }
        }
        row += s.rows;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rows_and_prefill_tiles_are_separated() {
        let (t0, t1, t2) = ([7u32, 3, 9], [1u32], [4u32, 5, 6, 8]);
        let seqs = [
            AttnSeq {
                rows: 1,
                start_pos: 40,
                block_table: &t0,
                policy: crate::backend::kv_policy::KvPolicy::EXACT,
            },
            AttnSeq {
                rows: 20,
                start_pos: 0,
                block_table: &t1,
                policy: crate::backend::kv_policy::KvPolicy::EXACT,
            },
            AttnSeq {
                rows: 9,
                start_pos: 33,
                block_table: &t2,
                policy: crate::backend::kv_policy::KvPolicy::EXACT,
            },
        ];
        // group 4 → 8 rows per tile.
        let p = plan(&seqs, 4, 16, 32, |_| true);
        assert_eq!(p.decode, vec![0, 41, 0]);
        assert_eq!(p.max_ctx, 41);
        // 41 positions need 3 blocks; 20 need 2 but the table has 1 (the caller checks
        // coverage); 42 need 3 of 4.
        assert_eq!(p.tables, vec![7, 3, 9, 1, 4, 5, 6]);
        assert_eq!(
            p.tiles,
            vec![
                1, 8, 0, 3, 9, 8, 8, 3, 17, 4, 16, 3, // seq 1: rows 1..21
                21, 8, 33, 4, 29, 1, 41, 4, // seq 2: rows 21..30
            ]
        );
        assert_eq!((p.decode_rows(), p.num_tiles()), (1, 5));
        // Only the last sequence: its rows keep their batch numbers (21..30).
        let p = plan(&seqs, 4, 16, 32, |s| s.start_pos == 33);
        assert_eq!(p.decode, Vec::<u32>::new());
        assert_eq!(p.tables, vec![4, 5, 6]);
        assert_eq!(p.tiles, vec![21, 8, 33, 0, 29, 1, 41, 0]);
    }

    #[test]
    fn big_groups_still_get_one_row_per_tile() {
        let t = [0u32];
        let seqs = [AttnSeq {
            rows: 2,
            start_pos: 0,
            block_table: &t,
            policy: crate::backend::kv_policy::KvPolicy::EXACT,
        }];
        let p = plan(&seqs, 64, 16, 32, |_| true);
        assert_eq!(p.tiles, vec![0, 1, 0, 0, 1, 1, 1, 0]);
    }
}
