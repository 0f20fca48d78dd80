//! Model families: what each architecture reads from a file and which ops its layers record.
//! A family is one file here plus a row in [`FAMILIES`]; the engine keeps the buffers, step
//! packing and readback, and records whatever ops the family built.

mod gemma3;
mod llama;

use crate::config::ModelConfig;
use crate::error::Result;
use crate::layer::{LayerBuilder, LayerOp};

/// One architecture.
pub trait Family: Sync {
    /// GGUF's `general.architecture`.
    fn name(&self) -> &'static str;

    /// Settings GGUF leaves implicit for this architecture (llama.cpp's per-architecture
    /// defaults), applied after the generic metadata is read.
    fn adjust_gguf_config(&self, _config: &mut ModelConfig) {}

    /// A layer's tensors beyond the nine every family has (norms before attention and MLP,
    /// Q/K/V/O, gate/up/down), with their shapes.
    fn extra_layer_tensors(&self, _config: &ModelConfig) -> Vec<(&'static str, Vec<usize>)> {
        Vec::new()
    }

    /// The factor the token embeddings are scaled by.
    fn embedding_scale(&self, _config: &ModelConfig) -> f32 {
        1.0
    }

    /// The ops of layer `b.layer`, in order.
    fn layer_ops(&self, b: &LayerBuilder<'_>) -> Result<Vec<LayerOp>>;
}

/// Every family tandem runs.
pub static FAMILIES: &[&dyn Family] = &[&llama::Llama, &gemma3::Gemma3];

/// The family of a GGUF architecture name.
pub fn family(architecture: &str) -> Option<&'static dyn Family> {
    FAMILIES.iter().copied().find(|f| f.name() == architecture)
}
