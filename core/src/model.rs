//! A model on the host: configuration, named tensors (with GGUF's canonical names) and tokenizer,
//! from a GGUF file or a Hugging Face directory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use sha2::{Digest as _, Sha256};

use crate::config::ModelConfig;
use crate::content::{Digest, MANIFEST_VERSION, Manifest, Region};
use crate::error::{Error, Result};
use crate::files::{MAX_JSON_BYTES, open_regular, read_text};
use crate::gguf::GgufFile;
use crate::tensor::{Backing, HostTensor, TensorBytes, WeightFormat, map_file};
use crate::tokenizer::TextTokenizer;

/// A loaded (memory-mapped) model.
#[derive(Debug, Clone)]
pub struct HostModel {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub tensors: HashMap<String, HostTensor>,
    pub tokenizer: TextTokenizer,
    /// Every tensor's content address, computed from its bytes when first asked for, or given
    /// by a manifest for a file that holds only some of them (`with_regions`). Code that
    /// changes `tensors` afterwards (tests) resets it.
    pub regions: OnceLock<Arc<BTreeMap<String, Region>>>,
}

/// The names of one layer's tensors.
pub fn layer_tensor(layer: usize, what: &str) -> String {
    format!("blk.{layer}.{what}.weight")
}

impl HostModel {
    /// Loads a `.gguf` file or a Hugging Face model directory.
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() { Self::load_hf_dir(path) } else { Self::load_gguf(path) }
    }

    /// Loads a GGUF file.
    pub fn load_gguf(path: &Path) -> Result<Self> {
        let mut file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let tensors: HashMap<String, HostTensor> = std::mem::take(&mut file.tensors).into_iter().map(|t| (t.name.clone(), t)).collect();
        check_tensors(path, &config, &tensors)?;
        let tokenizer = TextTokenizer::from_gguf(&file)?;
        Ok(HostModel { path: path.into(), config, tensors, tokenizer, regions: OnceLock::new() })
    }

    /// Loads `config.json`, `model.safetensors` (or shards listed in
    /// `model.safetensors.index.json`) and `tokenizer.json` from `dir`.
    pub fn load_hf_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = read_text(&cfg_path, MAX_JSON_BYTES)?;
        let config = ModelConfig::from_hf_json(&cfg_path, &text)?;
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = read_text(&index, MAX_JSON_BYTES)?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Safetensors { path: index.clone(), reason: e.to_string() })?;
            let map =
                v["weight_map"].as_object().ok_or_else(|| Error::Safetensors { path: index.clone(), reason: "no weight_map".into() })?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            names.sort();
            names.dedup();
            for n in &names {
                if n.contains('/') || n.contains("..") {
                    return Err(Error::Safetensors { path: index.clone(), reason: format!("shard name `{n}` leaves the directory") });
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors = HashMap::new();
        for (name, factors) in hf_rope_factors(&cfg_path, &text, &config)? {
            let bytes = factors.iter().flat_map(|f| f.to_le_bytes()).collect();
            let t =
                HostTensor { name: name.into(), format: WeightFormat::F32, shape: vec![factors.len()], bytes: TensorBytes::owned(bytes) };
            tensors.insert(name.into(), t);
        }
        let family = config.family();
        let offset = family.map_or(0.0, |f| f.hf_norm_offset());
        for file in files {
            for t in read_safetensors(&file)? {
                if let Some(name) = canonical_name(&t.name, family) {
                    let t = HostTensor { name: name.clone(), ..t };
                    let t = if offset != 0.0 && name.ends_with("norm.weight") { offset_vector(&t, offset) } else { t };
                    tensors.insert(name, t);
                }
            }
        }
        check_tensors(dir, &config, &tensors)?;
        let tokenizer = TextTokenizer::from_hf_dir(dir)?;
        Ok(HostModel { path: dir.into(), config, tensors, tokenizer, regions: OnceLock::new() })
    }

    /// A tensor by canonical name.
    pub fn tensor(&self, name: &str) -> Result<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), tensor: name.into() })
    }

    /// The output head (the embedding table when tied).
    pub fn output_head(&self) -> Result<&HostTensor> {
        if self.config.tied_embeddings { self.tensor("token_embd.weight") } else { self.tensor("output.weight") }
    }

    /// Weight bytes in the file's formats.
    pub fn weight_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.bytes.as_slice().len() as u64).sum()
    }

    /// Elements in every tensor (norm vectors included).
    pub fn parameter_count(&self) -> u64 {
        self.tensors.values().map(|t| t.shape.iter().map(|&d| d as u64).product::<u64>()).sum()
    }

    /// Every tensor's content address (its bytes' chunk digests), hashed on every core the first
    /// time (several GB/s) unless a manifest gave them.
    pub fn regions(&self) -> &BTreeMap<String, Region> {
        self.regions.get_or_init(|| {
            Arc::new(
                self.tensors
                    .iter()
                    .map(|(name, t)| (name.clone(), Region::of_bytes(name, t.bytes.offset() as u64, t.bytes.as_slice())))
                    .collect(),
            )
        })
    }

    /// Takes the tensors' content addresses from a manifest instead of hashing their bytes: for a
    /// file that holds only the tensors of a span (the rest are holes), fetched from peers. Each
    /// of the model's tensors must have its region, at its offset and of its length.
    pub fn with_regions(self, regions: BTreeMap<String, Region>) -> Result<Self> {
        let bad = |tensor: &str, reason: String| Error::Tensor { path: self.path.clone(), tensor: tensor.into(), reason };
        if regions.len() != self.tensors.len() {
            return Err(bad("", format!("the manifest lists {} tensors, the file {}", regions.len(), self.tensors.len())));
        }
        for (name, t) in &self.tensors {
            let r = regions.get(name).ok_or_else(|| bad(name, "not in the manifest".into()))?;
            if r.offset != t.bytes.offset() as u64 || r.len != t.bytes.as_slice().len() as u64 {
                return Err(bad(
                    name,
                    format!(
                        "the manifest places it at [{}, +{}), the file at [{}, +{}]",
                        r.offset,
                        r.len,
                        t.bytes.offset(),
                        t.bytes.as_slice().len()
                    ),
                ));
            }
        }
        let model = HostModel { regions: OnceLock::new(), ..self };
        let _ = model.regions.set(Arc::new(regions));
        Ok(model)
    }

    /// The model's identity: a sha256 over the configuration, every tensor's name, format, shape
    /// and content address (in name order), and the tokenizer (its serialized form, special
    /// tokens and chat template). The path is left out, so copies of one file at different
    /// places agree; any changed weight byte, shape or token changes it. It is what a node
    /// fetching weights from strangers trusts: every chunk it takes is checked against it.
    pub fn identity(&self) -> Digest {
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            // Length-prefixed, so no two different sequences of fields hash the same stream.
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        };
        field(b"tandem model identity v2");
        field(&json_bytes(&self.config));
        let regions = self.regions();
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            let t = &self.tensors[name];
            field(name.as_bytes());
            field(t.format.name().as_bytes());
            field(&t.shape.iter().flat_map(|&d| (d as u64).to_le_bytes()).collect::<Vec<u8>>());
            field(&regions.get(name).map_or([0; 32], Region::digest));
        }
        let tok = &self.tokenizer;
        field(&tok.identity_json());
        field(&json_bytes(&(tok.bos_id, tok.eos_id, &tok.stop_ids, &tok.chat_template)));
        hasher.finalize().into()
    }

    /// The identity in hex: how the catalog pins a model (`tandem model fetch` prints it).
    pub fn identity_hex(&self) -> String {
        hex::encode(self.identity())
    }

    /// The identity's first 16 hex digits: what capability ads carry, for nodes to check that
    /// they serve the same model before they exchange work or K/V.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.identity()[..8])
    }

    /// The content addresses of the GGUF file the model was mapped from: its header (every byte
    /// before the first tensor) and its tensors in file order. Other models (synthetic weights,
    /// Hugging Face directories) have none to share.
    pub fn manifest(&self) -> Result<Manifest> {
        let not_shareable =
            || Error::Config { path: self.path.clone(), reason: "only a model mapped from one GGUF file can be shared with peers".into() };
        let first = self.tensors.values().min_by_key(|t| t.bytes.offset()).ok_or_else(not_shareable)?;
        if !first.bytes.is_mapped() || self.path.is_dir() {
            return Err(not_shareable());
        }
        let file = first.bytes.backing();
        let header = Region::of_bytes("", 0, &file[..first.bytes.offset()]);
        let mut tensors: Vec<Region> = self.regions().values().cloned().collect();
        tensors.sort_by_key(|r| r.offset);
        Ok(Manifest { version: MANIFEST_VERSION, file_size: file.len() as u64, header, tensors })
    }
}

/// Every tensor the forward pass reads exists with the shape the configuration implies.
fn check_tensors(path: &Path, c: &ModelConfig, tensors: &HashMap<String, HostTensor>) -> Result<()> {
    // A layer is at least five tensors (Phi-3's fused ones): a file cannot hold more layers than
    // that allows, whatever its metadata claims (checked before anything is built per layer).
    if c.n_layers > tensors.len() / 5 {
        return Err(Error::Config {
            path: path.into(),
            reason: format!("the model claims {} layers but holds only {} tensors", c.n_layers, tensors.len()),
        });
    }
    let d = c.hidden_size;
    let mut fixed: Vec<(String, Vec<usize>)> =
        vec![("token_embd.weight".into(), vec![d, c.vocab_size]), ("output_norm.weight".into(), vec![d])];
    if !c.tied_embeddings {
        fixed.push(("output.weight".into(), vec![d, c.vocab_size]));
    }
    let per_layer = c.family().map(|f| f.layer_tensors(c)).unwrap_or_default();
    let layers = (0..c.n_layers).flat_map(|l| per_layer.iter().map(move |(what, shape)| (format!("blk.{l}.{what}"), shape.clone())));
    // Per-frequency RoPE factors, where the file has them: Llama 3's, or LongRoPE's pair.
    if tensors.contains_key("rope_freqs.weight") {
        fixed.push(("rope_freqs.weight".into(), vec![c.head_dim / 2]));
    }
    if tensors.contains_key("rope_factors_long.weight") || tensors.contains_key("rope_factors_short.weight") {
        fixed.push(("rope_factors_long.weight".into(), vec![c.head_dim / 2]));
        fixed.push(("rope_factors_short.weight".into(), vec![c.head_dim / 2]));
    }
    for (name, shape) in fixed.into_iter().chain(layers) {
        let t = tensors.get(&name).ok_or_else(|| Error::MissingTensor { path: path.into(), tensor: name.clone() })?;
        let got: Vec<usize> = t.shape.iter().copied().filter(|&s| s != 1 || shape.len() > 1).collect();
        let got = if got.is_empty() { vec![1] } else { got };
        if got != shape {
            return Err(Error::ShapeMismatch { path: path.into(), tensor: name, got: t.shape.clone(), expected: shape });
        }
        if shape.len() > 1 && t.format.row_bytes(t.cols()).is_none() {
            return Err(Error::Tensor {
                path: path.into(),
                tensor: name,
                reason: format!("{} columns do not fit {} blocks", t.cols(), t.format),
            });
        }
    }
    Ok(())
}

/// The per-frequency RoPE divisors a Hugging Face `rope_scaling` asks for, as the GGUF tensors
/// llama.cpp's converter writes: `rope_freqs` for `llama3` (Llama 3.1/3.2), computed as the
/// converter computes them, and `rope_factors_long`/`_short` for LongRoPE (`longrope`, `su`:
/// Phi-3's 128k-context checkpoints). None for other kinds (`ModelConfig::from_hf_json` reads or
/// refuses them).
fn hf_rope_factors(path: &Path, text: &str, c: &ModelConfig) -> Result<Vec<(&'static str, Vec<f32>)>> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Config { path: path.into(), reason: e.to_string() })?;
    let scaling = &v["rope_scaling"];
    let bad = |what: String| Error::Config { path: path.into(), reason: format!("rope_scaling: {what}") };
    match crate::config::rope_scaling_kind(scaling) {
        "llama3" => {
            let get = |k: &str, default: f64| scaling[k].as_f64().unwrap_or(default);
            let (factor, low, high) = (get("factor", 8.0), get("low_freq_factor", 1.0), get("high_freq_factor", 4.0));
            let old_context = get("original_max_position_embeddings", 8192.0);
            if !(factor > 0.0 && low > 0.0 && high > low && old_context > 0.0) {
                return Err(bad(format!("{scaling} has implausible values")));
            }
            let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
            let dim = c.head_dim;
            let factors = (0..dim / 2)
                .map(|i| {
                    let freq = 1.0 / c.rope_theta.powf(2.0 * i as f64 / dim as f64);
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let f = if wavelen < high_wavelen {
                        1.0
                    } else if wavelen > low_wavelen {
                        factor
                    } else {
                        let smooth = (old_context / wavelen - low) / (high - low);
                        1.0 / ((1.0 - smooth) / factor + smooth)
                    };
                    f as f32
                })
                .collect();
            Ok(vec![("rope_freqs.weight", factors)])
        }
        "longrope" | "su" => {
            let half = c.head_dim / 2;
            let factors = |key: &str| -> Result<Vec<f32>> {
                let a = scaling[key].as_array().ok_or_else(|| bad(format!("no `{key}` list")))?;
                let f: Vec<f32> = a.iter().filter_map(|x| x.as_f64()).map(|x| x as f32).collect();
                if f.len() != half || a.len() != half || !f.iter().all(|x| x.is_finite() && *x > 0.0) {
                    return Err(bad(format!("`{key}` is not {half} positive numbers")));
                }
                Ok(f)
            };
            Ok(vec![("rope_factors_long.weight", factors("long_factor")?), ("rope_factors_short.weight", factors("short_factor")?)])
        }
        _ => Ok(Vec::new()),
    }
}

/// The JSON of `value`. The types fingerprinted here report no serialization errors of their own
/// (serde_json writes non-finite floats as null), so an error cannot occur; were one to, its
/// message is hashed in place of the value rather than panicking.
fn json_bytes(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|e| format!("unserializable: {e}").into_bytes())
}

/// `t` (a vector) plus `offset` in every element, as f32.
fn offset_vector(t: &HostTensor, offset: f32) -> HostTensor {
    let values = crate::cpu_ref::dequantize_row(t.format, t.bytes.as_slice(), t.shape.iter().product());
    let bytes = values.iter().flat_map(|v| (v + offset).to_le_bytes()).collect();
    HostTensor { name: t.name.clone(), format: WeightFormat::F32, shape: t.shape.clone(), bytes: TensorBytes::owned(bytes) }
}

/// Maps a Hugging Face tensor name to GGUF's name: Llama's modules, and the family's own.
fn canonical_name(hf: &str, family: Option<&dyn crate::arch::Family>) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let what = family.and_then(|f| f.hf_module(module)).or_else(|| crate::arch::llama_hf_module(module))?;
    Some(format!("blk.{layer}.{what}.{kind}"))
}

/// The Hugging Face name of a canonical tensor name (inverse of [`canonical_name`]).
pub fn hf_name(canonical: &str) -> Option<String> {
    let fixed = match canonical {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = canonical.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let what = match rest.strip_suffix(".weight")? {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{what}.weight"))
}

/// Memory-maps a safetensors file and lists its tensors (HF names, GGUF-order shapes).
fn read_safetensors(path: &Path) -> Result<Vec<HostTensor>> {
    let file = open_regular(path)?;
    let backing = Arc::new(Backing::Mapped(map_file(&file, path)?));
    let bytes = backing.bytes();
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors { path: path.into(), reason: e.to_string() })?;
    let base = bytes.as_ptr() as usize;
    let mut out = Vec::new();
    for (name, view) in st.iter() {
        let format = match view.dtype() {
            safetensors::Dtype::F32 => WeightFormat::F32,
            safetensors::Dtype::F16 => WeightFormat::F16,
            safetensors::Dtype::BF16 => WeightFormat::Bf16,
            other => {
                return Err(Error::UnsupportedTensorType { path: path.into(), tensor: name.into(), type_name: format!("{other:?}") });
            }
        };
        let data = view.data();
        let start = data.as_ptr() as usize - base;
        let mut shape: Vec<usize> = view.shape().to_vec();
        shape.reverse();
        if shape.is_empty() {
            shape.push(1);
        }
        out.push(HostTensor { name: name.to_string(), format, shape, bytes: TensorBytes::new(backing.clone(), start, data.len()) });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::synthetic_model;

    fn smollm(seed: u64) -> HostModel {
        synthetic_model("smollm2-135m", WeightFormat::Q4_0, seed).expect("synthetic model")
    }

    #[test]
    fn the_fingerprint_is_sixteen_hex_digits_that_follow_weights_and_tokenizer_but_not_the_path() {
        let model = smollm(1);
        let fp = model.fingerprint();
        assert_eq!(fp.len(), 16, "{fp}");
        assert!(fp.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{fp}");
        assert_eq!(smollm(1).fingerprint(), fp, "same seed");
        assert_ne!(smollm(2).fingerprint(), fp, "different seed");

        let mut moved = model.clone();
        moved.path = "/elsewhere/copy.gguf".into();
        assert_eq!(moved.fingerprint(), fp, "the path is not part of the model");

        let mut one_byte = model.clone();
        let t = one_byte.tensors.get_mut("blk.17.ffn_down.weight").expect("tensor");
        let mut bytes = t.bytes.as_slice().to_vec();
        bytes[1000] ^= 0x10;
        t.bytes = TensorBytes::owned(bytes);
        one_byte.regions = OnceLock::new();
        assert_ne!(one_byte.fingerprint(), fp, "one weight byte changed");

        let mut tokenizer = model.clone();
        tokenizer.tokenizer = TextTokenizer::placeholder(model.config.vocab_size - 1).expect("tokenizer");
        assert_ne!(tokenizer.fingerprint(), fp, "another vocabulary");
        let mut template = model.clone();
        template.tokenizer.chat_template = Some("{{ messages }}".into());
        assert_ne!(template.fingerprint(), fp, "another chat template");
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_frequencies_and_divides_low_ones_by_the_factor() {
        let mut c = smollm(1).config;
        c.head_dim = 64;
        c.rope_theta = 500_000.0;
        let text = r#"{"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;
        let mut tensors = hf_rope_factors(Path::new("config.json"), text, &c).expect("parses");
        let (name, f) = tensors.pop().expect("scaling");
        assert_eq!(name, "rope_freqs.weight");
        assert_eq!(f.len(), 32);
        assert_eq!(f[0], 1.0, "the highest frequency is kept");
        assert_eq!(f[31], 32.0, "the lowest is divided by the factor");
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "{f:?}");
        assert!(hf_rope_factors(Path::new("config.json"), "{}", &c).expect("parses").is_empty());
        // Linear and YaRN are read with the configuration (`ModelConfig::from_hf_json`), which
        // refuses kinds tandem does not implement.
        let base = r#""model_type": "llama", "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 96, "max_position_embeddings": 256"#;
        let linear = format!(r#"{{{base}, "rope_scaling": {{"type": "linear", "factor": 4.0}}}}"#);
        let cfg = ModelConfig::from_hf_json(Path::new("config.json"), &linear).expect("linear");
        assert_eq!(cfg.rope_linear_factor, Some(4.0));
        let yarn = format!(r#"{{{base}, "rope_scaling": {{"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}}}"#);
        let cfg = ModelConfig::from_hf_json(Path::new("config.json"), &yarn).expect("yarn");
        let y = cfg.rope_yarn.expect("yarn settings");
        assert_eq!((y.factor, y.beta_fast, y.beta_slow, cfg.original_context()), (4.0, 32.0, 1.0, 64));
        let dynamic = format!(r#"{{{base}, "rope_scaling": {{"rope_type": "dynamic", "factor": 4.0}}}}"#);
        assert!(ModelConfig::from_hf_json(Path::new("config.json"), &dynamic).is_err(), "unsupported kinds are refused");
    }

    #[test]
    fn parameter_count_and_weight_bytes_sum_every_tensor() {
        let model = smollm(1);
        // SmolLM2-135M's published parameter count.
        assert_eq!(model.parameter_count(), 134_515_008);
        // Norms (30 layers x 2 x 576 + 576 elements) are f32; the rest Q4_0, 18 bytes per 32.
        let norms = 30 * 2 * 576 + 576;
        assert_eq!(model.weight_bytes(), (134_515_008 - norms) / 32 * 18 + norms * 4);
    }
}
