//! The memory floor of the product-key expert layer (KERNELS.md (b)): the fewest global-memory
//! bytes a pass can move, as a pure function of the shape and the byte sizes, so that the goals
//! follow any change of T, C, k, d or N.
//!
//! Counting rules, reverse-engineered from (b)'s table (they reproduce every printed figure at
//! s = 2, 4, 6; see the tests). P = T·C·k (token, expert) pairs; a "row" is d elements;
//! R = rows touched (distinct pool rows the step routes to; all C·N rows at full T).
//! * Forward, streaming ("total"): gathered = P·2·d·pool (u and v rows once per pair);
//!   other = T·d·act (x read) + T·d·act (y written) + P·(index + score + saved).
//! * Backward, streaming: gathered = P·d·(2·act + pool) (x and dy rows per pair in the
//!   expert-centric pass, the u row per pair in the token-centric dx pass);
//!   other = R·2·d·pool (each touched u, v row read once) + R·2·d·grad (du, dv written once)
//!   + T·d·act (dx written) + P·(index + score + saved + bwd_extra).
//! * "Compulsory" (every tensor once: perfect on-chip reuse): forward R·2·d·pool + x + y +
//!   per-pair bytes; backward R·2·d·pool + x + dy + dx + R·2·d·grad + per-pair bytes.
//! * FLOPs: forward 4·P·d, backward 8·P·d (the table leaves the recomputed h = u·x out).
//! * The router (left out of (b), whose table is the expert part only; here when
//!   `logits_per_token` > 0): top-k forward reads the logits once and writes P·(index + score);
//!   its backward reads P·(index + score) (indices, dscores) and writes the dense dlogits.
//!
//! Where (b)'s text and table disagree or the text is silent:
//! * The table's "compulsory" column is computed with bf16 pools whatever the weight column
//!   (one figure per row, equal to the bf16 count), and it includes the per-pair metadata
//!   (8 and 36 B), which the text's definition ("each pool row read once, x/y/dy/dx once, grads
//!   written once") does not name.
//! * The text's 36 B/pair of backward metadata ("sort, dh, dg") is not itemised; KERNELS'
//!   preset spreads it as 8 B of index + g + saved a (as forward) + 28 B `bwd_extra`.
//! * The text's dense grad write ("zero rows included") is R = C·N here; at full T every row is
//!   touched, so the two agree; at a scaled-down T the report passes the real R.
//! * GB are 10^9 bytes, ms at 3.35·10^12 B/s.

/// The shape of one layer's step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloorShape {
    pub tokens: u64,
    pub channels: u64,
    pub k: u64,
    pub d: u64,
    /// Distinct pool rows the step routes to: read once, their gradients written once. C·N (one
    /// pool per channel) or N (PEER's shared pool) when every row is used.
    pub rows_touched: u64,
    /// Router logits per token (2·C·√N); 0 leaves the router out.
    pub logits_per_token: u64,
}

/// Byte sizes of the elements and of the per-pair data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloorBytes {
    /// x, y, dy, dx elements.
    pub act: u64,
    /// Pool (u, v) elements.
    pub pool: u64,
    /// Pool-gradient (du, dv) elements.
    pub grad: u64,
    /// Router logit (and dlogit) elements.
    pub logit: u64,
    pub index: u64,
    /// Router score (gate g) and its gradient.
    pub score: u64,
    /// Saved by the forward per pair, read back by the backward.
    pub saved: u64,
    /// Per pair in the backward beyond index, score and saved (dg written; KERNELS' sort and dh).
    pub bwd_extra: u64,
}

impl FloorBytes {
    /// KERNELS.md (b): bf16 activations, u16 indices, bf16 g, one f32 saved per pair, 36 B per
    /// pair in the backward, f32 grads; `pool` 2 (bf16 rows) or 4 (f32); bf16 logits.
    pub fn kernels_md(pool: u64) -> FloorBytes {
        FloorBytes {
            act: 2,
            pool,
            grad: 4,
            logit: 2,
            index: 2,
            score: 2,
            saved: 4,
            bwd_extra: 28,
        }
    }

    /// repro's layer today: f32 activations, logits, scores and grads, u32 indices, one f32
    /// saved per pair (a = u·x); the backward reads index, g and a and writes dg per pair.
    /// `pool` 4 (f32) or 2 (bf16 rows).
    pub fn repro(pool: u64) -> FloorBytes {
        FloorBytes {
            act: 4,
            pool,
            grad: 4,
            logit: 4,
            index: 4,
            score: 4,
            saved: 4,
            bwd_extra: 4,
        }
    }
}

/// One pass (forward or backward), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassFloor {
    /// Rows gathered once per pair.
    pub gathered: u64,
    /// Everything else, once.
    pub other: u64,
    /// Every tensor once.
    pub compulsory: u64,
    /// The router's top-k kernel of this pass (read and written once).
    pub router: u64,
    pub flops: u64,
}

impl PassFloor {
    /// The experts' streaming floor (the table's "total").
    pub fn total(&self) -> u64 {
        self.gathered + self.other
    }
    /// Experts and router.
    pub fn layer(&self) -> u64 {
        self.total() + self.router
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Floor {
    pub fwd: PassFloor,
    pub bwd: PassFloor,
}

pub fn floor(s: &FloorShape, b: &FloorBytes) -> Floor {
    let pairs = s.tokens * s.channels * s.k;
    let act_tensor = s.tokens * s.d * b.act;
    let pool_once = s.rows_touched * 2 * s.d * b.pool;
    let grads_once = s.rows_touched * 2 * s.d * b.grad;
    let fwd_pair = pairs * (b.index + b.score + b.saved);
    let bwd_pair = fwd_pair + pairs * b.bwd_extra;
    let logits = s.tokens * s.logits_per_token * b.logit;
    let routed = pairs * (b.index + b.score);
    Floor {
        fwd: PassFloor {
            gathered: pairs * 2 * s.d * b.pool,
            other: 2 * act_tensor + fwd_pair,
            compulsory: pool_once + 2 * act_tensor + fwd_pair,
            router: if s.logits_per_token > 0 {
                logits + routed
            } else {
                0
            },
            flops: 4 * pairs * s.d,
        },
        bwd: PassFloor {
            gathered: pairs * s.d * (2 * b.act + b.pool),
            other: pool_once + grads_once + act_tensor + bwd_pair,
            compulsory: pool_once + 3 * act_tensor + grads_once + bwd_pair,
            router: if s.logits_per_token > 0 {
                routed + logits
            } else {
                0
            },
            flops: 8 * pairs * s.d,
        },
    }
}

/// An H100 SXM's HBM bandwidth, GB/s (KERNELS.md).
pub const H100_GBS: f64 = 3350.0;

/// Seconds to move `bytes` at `gbs` GB/s.
pub fn seconds(bytes: u64, gbs: f64) -> f64 {
    bytes as f64 / (gbs * 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KERNELS.md (b)'s step: 64×1024 tokens, C = 16, k = 8, d = 128 s, N = (16 + 12 s)².
    fn kernels_shape(s: u64) -> FloorShape {
        let n = (16 + 12 * s) * (16 + 12 * s);
        FloorShape {
            tokens: 64 * 1024,
            channels: 16,
            k: 8,
            d: 128 * s,
            rows_touched: 16 * n,
            logits_per_token: 0,
        }
    }

    fn gb(b: u64) -> String {
        format!("{:.2}", b as f64 / 1e9)
    }

    fn ms(b: u64) -> String {
        format!("{:.2}", seconds(b, H100_GBS) * 1e3)
    }

    #[test]
    fn kernels_md_table_b() {
        assert_eq!(64 * 1024 * 16 * 8, 8_388_608);
        // s, then per pass: gathered f32, bf16, other f32, bf16, total f32, bf16, GFLOP,
        // floor ms f32, bf16, compulsory GB, ms; as printed in (b).
        #[rustfmt::skip]
        let table = [
            (2, ["17.18", "8.59", "0.13", "0.13", "17.31", "8.72", "8.6", "5.17", "2.60", "0.16", "0.05"],
                ["17.18", "12.88", "0.44", "0.41", "17.62", "13.30", "17.2", "5.26", "3.97", "0.48", "0.14"]),
            (4, ["34.36", "17.18", "0.20", "0.20", "34.56", "17.38", "17.2", "10.32", "5.19", "0.34", "0.10"],
                ["34.36", "25.77", "0.91", "0.77", "35.27", "26.54", "34.4", "10.53", "7.92", "0.91", "0.27"]),
            (6, ["51.54", "25.77", "0.27", "0.27", "51.81", "26.04", "25.8", "15.47", "7.77", "0.65", "0.19"],
                ["51.54", "38.65", "1.93", "1.54", "53.46", "40.20", "51.5", "15.96", "12.00", "1.75", "0.52"]),
        ];
        for (s, fwd, bwd) in table {
            let shape = kernels_shape(s);
            let f32 = floor(&shape, &FloorBytes::kernels_md(4));
            let bf16 = floor(&shape, &FloorBytes::kernels_md(2));
            for (want, a, b) in [(fwd, f32.fwd, bf16.fwd), (bwd, f32.bwd, bf16.bwd)] {
                let got = [
                    gb(a.gathered),
                    gb(b.gathered),
                    gb(a.other),
                    gb(b.other),
                    gb(a.total()),
                    gb(b.total()),
                    format!("{:.1}", b.flops as f64 / 1e9),
                    ms(a.total()),
                    ms(b.total()),
                    gb(b.compulsory),
                    ms(b.compulsory),
                ];
                assert_eq!(got, want.map(String::from), "s = {s}");
                assert_eq!(a.flops, b.flops);
                assert_eq!(a.router, 0);
            }
        }
        // The exact figure the note quotes.
        let s6 = floor(&kernels_shape(6), &FloorBytes::kernels_md(2));
        assert_eq!(s6.fwd.total(), 26_038_239_232);
    }

    #[test]
    fn repro_preset_by_hand() {
        // T = 4, C = 2, k = 2 (P = 16), d = 8, 10 rows touched, √N = 3 (12 logits a token).
        let shape = FloorShape {
            tokens: 4,
            channels: 2,
            k: 2,
            d: 8,
            rows_touched: 10,
            logits_per_token: 12,
        };
        let f = floor(&shape, &FloorBytes::repro(4));
        // Forward: u, v rows 16·2·8·4; x, y 4·8·4 each; idx, g, a 16·12.
        assert_eq!(f.fwd.gathered, 1024);
        assert_eq!(f.fwd.other, 128 + 128 + 192);
        // 10 rows of u and v once: 10·2·8·4 = 640.
        assert_eq!(f.fwd.compulsory, 640 + 256 + 192);
        // Logits 4·12·4 read, scores and indices 16·8 written.
        assert_eq!(f.fwd.router, 192 + 128);
        assert_eq!(f.fwd.flops, 4 * 16 * 8);
        // Backward: x, dy, u rows per pair 16·8·(4 + 4 + 4); pool 640 read, grads 640
        // written, dx 128, idx, g, a, dg 16·16.
        assert_eq!(f.bwd.gathered, 1536);
        assert_eq!(f.bwd.other, 640 + 640 + 128 + 256);
        assert_eq!(f.bwd.total(), 3200);
        assert_eq!(f.bwd.compulsory, 640 + 384 + 640 + 256);
        assert_eq!(f.bwd.router, 128 + 192);
        assert_eq!(f.bwd.layer(), 3520);
        // bf16 pools halve the rows read, not the grads.
        let h = floor(&shape, &FloorBytes::repro(2));
        assert_eq!(h.fwd.gathered, 512);
        assert_eq!(h.bwd.gathered, 16 * 8 * (4 + 4 + 2));
        assert_eq!(h.bwd.other, 320 + 640 + 128 + 256);
    }

    #[test]
    fn floors_never_exceed_streaming_and_scale_with_tokens() {
        for s in [2, 4, 6] {
            let shape = kernels_shape(s);
            for b in [FloorBytes::kernels_md(2), FloorBytes::repro(4)] {
                let f = floor(&shape, &b);
                // At full T every row is used hundreds of times: compulsory far below streaming.
                assert!(f.fwd.compulsory * 10 < f.fwd.total());
                assert!(f.bwd.compulsory * 10 < f.bwd.total());
                let half = floor(
                    &FloorShape {
                        tokens: shape.tokens / 2,
                        ..shape
                    },
                    &b,
                );
                assert_eq!(half.fwd.gathered * 2, f.fwd.gathered);
                assert_eq!(half.bwd.gathered * 2, f.bwd.gathered);
            }
        }
    }
}
