//! What the emulator tests of the kernels share: launching with the race check on, the two
//! grids each kernel runs on, random inputs and comparisons.

use super::emu::{launch, Arg};
use super::LaunchDims;
use crate::nn::rng::Rng;

/// Runs a kernel on the emulator with the race check on; a failure fails the test.
pub fn go(name: &str, dims: LaunchDims, args: &mut [Arg]) {
    launch(name, dims.grid, dims.block, dims.shared_bytes, args, true)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
}

/// The launch function's dims, and the same with a grid of 2 blocks, so that the grid-stride
/// loops run past the grid as they do when a large shape meets the cap.
pub fn grids(d: LaunchDims) -> [LaunchDims; 2] {
    let mut small = d;
    small.grid[0] = 2;
    [d, small]
}

pub fn randn(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

pub fn below(rng: &mut Rng, n: usize) -> u32 {
    (rng.next_u64() % n as u64) as u32
}

pub fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// |got - want| <= 1e-5 · max(|want|, scale[i]): a kernel does its twin's f32 arithmetic in
/// other reduction orders and with its own exp/tanh, so each result is within a few ulp of the
/// terms that make it; `scale` is their magnitude where they may cancel (0 where a relative
/// bound holds).
pub fn close(got: &[f32], want: &[f32], scale: &[f32], case: &str) {
    assert_eq!(got.len(), want.len(), "{case}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-5 * w.abs().max(scale[i]);
        assert!((g - w).abs() <= tol, "{case}: element {i}: {g} against {w}");
    }
}
