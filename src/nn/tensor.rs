//! Parameters live in one flat f32 buffer (gradients and optimiser moments mirror it), described
//! by a table of named tensors. One buffer keeps the optimiser, clipping and checkpoints simple.

use super::backend::{Buf, View, ViewMut};

#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Normal(f64),
    TruncatedNormal(f64),
}

#[derive(Clone, Debug)]
pub struct ParamInfo {
    /// PyTorch-style dotted name, e.g. `blocks.0.attn.wq`.
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    /// Weight decay applies (false for norm scales).
    pub decay: bool,
    pub init: Init,
}

/// A handle to one tensor inside the flat buffers.
#[derive(Clone, Copy, Debug)]
pub struct ParamId {
    pub offset: usize,
    pub len: usize,
}

impl ParamId {
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
    /// This tensor's run of a backend buffer.
    pub fn view<'a>(&self, buf: &'a Buf<f32>) -> View<'a, f32> {
        buf.range(self.range())
    }
    pub fn view_mut<'a>(&self, buf: &'a mut Buf<f32>) -> ViewMut<'a, f32> {
        buf.range_mut(self.range())
    }
    /// The same run of a view that starts where the buffer does.
    pub fn within<'a>(&self, v: View<'a, f32>) -> View<'a, f32> {
        v.range(self.range())
    }
    pub fn within_mut<'a>(&self, v: &'a mut ViewMut<'_, f32>) -> ViewMut<'a, f32> {
        v.rb().range(self.range())
    }
}

#[derive(Clone, Debug, Default)]
pub struct ParamTable {
    pub infos: Vec<ParamInfo>,
    pub total: usize,
}

impl ParamTable {
    pub fn add(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        init: Init,
        decay: bool,
    ) -> ParamId {
        let len = shape.iter().product();
        let id = ParamId {
            offset: self.total,
            len,
        };
        self.infos.push(ParamInfo {
            name: name.into(),
            shape: shape.to_vec(),
            offset: self.total,
            len,
            decay,
            init,
        });
        self.total += len;
        id
    }

    pub fn find(&self, name: &str) -> Option<&ParamInfo> {
        self.infos.iter().find(|p| p.name == name)
    }

    /// Fills `buf` following each tensor's init, in table order (deterministic for a seed).
    pub fn initialise(&self, buf: &mut [f32], rng: &mut super::rng::Rng) {
        for p in &self.infos {
            let dst = &mut buf[p.offset..p.offset + p.len];
            match p.init {
                Init::Zeros => dst.fill(0.0),
                Init::Ones => dst.fill(1.0),
                Init::Normal(std) => dst
                    .iter_mut()
                    .for_each(|x| *x = (rng.normal() * std) as f32),
                Init::TruncatedNormal(std) => dst
                    .iter_mut()
                    .for_each(|x| *x = rng.truncated_normal(std) as f32),
            }
        }
    }
}
