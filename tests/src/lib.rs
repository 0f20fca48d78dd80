//! Shared helpers of the cross-crate tests: the default model, the GPU, the reference files.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Deserialize;
use tandem_core::{GpuContext, HostModel};

/// The default model, fetched into the cache if missing. Panics (failing the test) when it cannot
/// be had: these tests never skip.
pub fn default_model() -> &'static HostModel {
    static MODEL: OnceLock<HostModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = tandem_node::models::ensure_model(&tandem_node::models::DEFAULT_MODEL).expect("default model available");
        HostModel::load(&path).expect("default model loads")
    })
}

/// The synthetic `tiny` model (two small layers, seeded Q4_0 weights, a 512-token vocabulary), for
/// tests of the machinery around the model: batching, chunking, the prefix cache, preemption and
/// K/V transfer promise the same tokens whatever the weights, and the real model's cost on
/// lavapipe would buy no more correctness there.
pub fn tiny_model() -> &'static HostModel {
    static MODEL: OnceLock<HostModel> = OnceLock::new();
    // Q4_0 and seed 11: in Q4_1 (seed 7) every prompt tried continued with one repeated token,
    // and in Q4_0 some seeds settle on one token for some of these tests' prompts; the tests
    // assert that theirs vary (`assert_varied`).
    MODEL.get_or_init(|| tandem_core::synthetic::synthetic_model("tiny", tandem_core::WeightFormat::Q4_0, 11).expect("tiny model"))
}

/// Fails unless `tokens` hold two different ids: runs compared for equality say little when the
/// model repeats one token whatever it is given.
pub fn assert_varied(tokens: &[u32]) {
    let distinct: std::collections::HashSet<&u32> = tokens.iter().collect();
    assert!(distinct.len() > 1, "the tiny model's tokens vary, so equal runs say something: {tokens:?}");
}

/// A prompt for the tiny model: `text`'s bytes as token ids (all inside its vocabulary).
pub fn tiny_tokens(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Gemma 3 270M Q4_K_M (`gemma3-270m`), fetched into the cache if missing.
pub fn gemma3_model() -> &'static HostModel {
    static MODEL: OnceLock<HostModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = tandem_node::models::ensure_model(&tandem_node::models::GEMMA3_270M).expect("gemma3-270m available");
        HostModel::load(&path).expect("gemma3-270m loads")
    })
}

/// The GPU adapter the tests run on (`TANDEM_ADAPTER` picks one). Fails, never skips, without one.
pub fn gpu() -> &'static GpuContext {
    static GPU: OnceLock<GpuContext> = OnceLock::new();
    GPU.get_or_init(|| {
        let wanted = std::env::var("TANDEM_ADAPTER").ok();
        GpuContext::new(wanted.as_deref()).expect("a GPU adapter (install mesa-vulkan-drivers for lavapipe)")
    })
}

/// `$TANDEM_REFERENCE_DIR`, else `shared/reference` beside the checkout (or inside it).
pub fn reference_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TANDEM_REFERENCE_DIR") {
        return d.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let inside = root.join("shared/reference");
    if inside.is_dir() { inside } else { root.join("../shared/reference") }
}

/// One position's top logits.
#[derive(Debug, Deserialize)]
pub struct TopLogits {
    pub top_ids: Vec<u32>,
    pub top_logits: Vec<f32>,
}

/// One prompt of a reference file.
#[derive(Debug, Deserialize)]
pub struct ReferencePrompt {
    pub name: String,
    pub text: String,
    pub special: bool,
    pub tokens: Vec<u32>,
    pub positions: Vec<TopLogits>,
    pub greedy_tokens: Vec<u32>,
    #[serde(default)]
    pub greedy_margins: Vec<f32>,
    #[serde(default)]
    pub chat_user: Option<String>,
    /// Greedy steps before the first near-tie or batch disagreement (Gemma 3's reference).
    #[serde(default)]
    pub usable_steps: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct ReferenceFile {
    prompts: Vec<ReferencePrompt>,
}

/// The prompts of `smollm2-135m-q4_1.{kind}.json` (`kind` is `llamacpp` or `f64`).
pub fn reference(kind: &str) -> Vec<ReferencePrompt> {
    reference_file(&format!("smollm2-135m-q4_1.{kind}.json"))
}

/// The prompts of reference file `name`.
pub fn reference_file(name: &str) -> Vec<ReferencePrompt> {
    let path = reference_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file: ReferenceFile = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.prompts
}
