//! Writes a model as a Hugging Face directory (config.json, model.safetensors in F16 or F32,
//! tokenizer.json, tokenizer_config.json), the way `convert_hf_to_gguf.py` would have read it.

use std::collections::HashMap;
use std::path::Path;

use half::f16;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::config::RopeLayout;
use crate::cpu_ref::dequantize;
use crate::error::{Error, Result};
use crate::model::{HostModel, hf_name};

/// Float type of the exported weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    F16,
    F32,
}

/// GGUF stores Q/K rows of each head permuted so RoPE pairs are adjacent; HF pairs (i, i + d/2).
/// Row (h, s * d/2 + i) of the HF tensor is row (h, 2i + s) of the GGUF tensor.
fn unpermute_rows(values: &[f32], n_heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..n_heads {
        for s in 0..2 {
            for i in 0..half {
                let dst = (h * head_dim + s * half + i) * cols;
                let src = (h * head_dim + 2 * i + s) * cols;
                out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
            }
        }
    }
    out
}

/// Exports `model` into `dir` (created if missing).
pub fn export_hf(model: &HostModel, dir: &Path, dtype: ExportDtype) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let c = &model.config;
    let mut names: Vec<&String> = model.tensors.keys().collect();
    names.sort();
    let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in names {
        let Some(hf) = hf_name(name) else { continue };
        let t = &model.tensors[name];
        let (rows, cols) = (t.rows(), t.cols());
        let mut values = dequantize(t.format, t.bytes.as_slice(), rows, cols);
        if c.rope_layout == RopeLayout::Adjacent {
            if name.ends_with("attn_q.weight") {
                values = unpermute_rows(&values, c.n_heads, c.head_dim, cols);
            } else if name.ends_with("attn_k.weight") {
                values = unpermute_rows(&values, c.n_kv_heads, c.head_dim, cols);
            }
        }
        let bytes: Vec<u8> = match dtype {
            ExportDtype::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            ExportDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let shape = if t.shape.len() == 1 { vec![cols] } else { vec![rows, cols] };
        blobs.push((hf, shape, bytes));
    }
    let st_dtype = match dtype {
        ExportDtype::F16 => Dtype::F16,
        ExportDtype::F32 => Dtype::F32,
    };
    let views: Vec<(String, TensorView<'_>)> = blobs
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(st_dtype, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Safetensors { path: dir.into(), reason: e.to_string() })
        })
        .collect::<Result<_>>()?;
    let st_path = dir.join("model.safetensors");
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &st_path).map_err(|e| Error::Safetensors { path: st_path, reason: e.to_string() })?;

    let tok = &model.tokenizer;
    let dtype_name = match dtype {
        ExportDtype::F16 => "float16",
        ExportDtype::F32 => "float32",
    };
    let mut cfg = c.clone();
    cfg.rope_layout = RopeLayout::Neox;
    write_json(&dir.join("config.json"), &cfg.to_hf_json(tok.bos_id, tok.eos_id, dtype_name))?;
    let tok_path = dir.join("tokenizer.json");
    let inner = tok.inner().ok_or_else(|| {
        Error::Tokenizer(format!("{}: SentencePiece vocabularies from GGUF are not exported as tokenizer.json yet", tok_path.display()))
    })?;
    inner.save(&tok_path, false).map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
    let token_text = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i));
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({
            "bos_token": token_text(tok.bos_id),
            "eos_token": token_text(tok.eos_id),
            "chat_template": tok.chat_template,
            "add_bos_token": false,
        }),
    )
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Config { path: path.into(), reason: e.to_string() })?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}
