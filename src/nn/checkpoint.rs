//! Safetensors checkpoints. A training checkpoint holds the weights under their PyTorch-style
//! names, the AdamW moments under `optim.m.<name>` / `optim.v.<name>`, and in the metadata the
//! model and training configs, the step, the optimiser step count and the rng state. A weights
//! export holds the weights only. Matrices are stored [in, out] (x · W), as JAX does.

use super::tensor::ParamTable;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::Path;

fn to_bytes(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() * 4);
    for v in x {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Named f32 buffers laid out by `table`, plus string metadata.
pub fn save(
    path: &Path,
    table: &ParamTable,
    buffers: &[(&str, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (prefix, buf) in buffers {
        for info in &table.infos {
            let name = if prefix.is_empty() {
                info.name.clone()
            } else {
                format!("{prefix}{}", info.name)
            };
            owned.push((
                name,
                info.shape.clone(),
                to_bytes(&buf[info.offset..info.offset + info.len]),
            ));
        }
    }
    let views = owned
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))
        .with_context(|| format!("serialising {}", path.display()))?;
    drop(owned);
    // A crash never leaves a half-written checkpoint under its name.
    crate::atomic::write(path, &bytes, true).with_context(|| format!("writing {}", path.display()))
}

/// Buffers in the order of the requested prefixes, and the string metadata.
pub type Loaded = (Vec<Vec<f32>>, HashMap<String, String>);

/// Reads the buffers named `prefix + name` for every tensor of `table`, and the metadata.
pub fn load(path: &Path, table: &ParamTable, prefixes: &[&str]) -> Result<Loaded> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("parsing {}", path.display()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st =
        SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", path.display()))?;
    let mut out = Vec::new();
    for prefix in prefixes {
        let mut buf = vec![0.0f32; table.total];
        for info in &table.infos {
            let name = format!("{prefix}{}", info.name);
            let t = st
                .tensor(&name)
                .map_err(|_| anyhow!("checkpoint {} lacks tensor `{name}`", path.display()))?;
            if t.dtype() != Dtype::F32 || t.shape() != info.shape.as_slice() {
                bail!(
                    "checkpoint {}: tensor `{name}` is {:?} {:?}, expected F32 {:?}",
                    path.display(),
                    t.dtype(),
                    t.shape(),
                    info.shape
                );
            }
            for (dst, chunk) in buf[info.offset..info.offset + info.len]
                .iter_mut()
                .zip(t.data().chunks_exact(4))
            {
                *dst = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        out.push(buf);
    }
    Ok((out, metadata))
}
