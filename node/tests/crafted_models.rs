//! Hostile model files, crafted here (none is stored, so every parser bound gets a case), handed
//! to `tandem model inspect` in a real process with 1 GiB of address space: each gives a clear
//! error that names the file and the field, within seconds, with no panic and no memory blow-up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_core::{GgufTensorOut, MetaArray, MetaValue, write_gguf};

mod common;

/// A real model's worth of address space for a process that only reads a small file's header.
const ADDRESS_SPACE_KIB: u64 = 1 << 20;

/// `tandem model inspect PATH` with bounded memory and time: (success, stdout + stderr).
fn inspect(path: &Path) -> (bool, String) {
    let child = Command::new("bash")
        .args(["-c", &format!("ulimit -v {ADDRESS_SPACE_KIB} && exec \"$0\" model inspect \"$1\"")])
        .arg(env!("CARGO_BIN_EXE_tandem"))
        .arg(path)
        .env("TANDEM_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let out = common::output_within(child, Duration::from_secs(30), &format!("inspecting {}", path.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("panicked") && !text.contains("memory allocation"), "{}: {text}", path.display());
    assert!(out.status.code().is_some(), "{}: killed by a signal ({:?}): {text}", path.display(), out.status);
    (out.status.success(), text)
}

/// Inspecting `path` fails with a message that names the file and holds every one of `needles`.
fn refused(path: &Path, needles: &[&str]) {
    let (ok, text) = inspect(path);
    assert!(!ok, "{} was accepted: {text}", path.display());
    let name = path.file_name().and_then(|n| n.to_str()).expect("a file name");
    assert!(text.contains(name), "the error names the file {name}: {text}");
    for n in needles {
        assert!(text.contains(n), "the error mentions `{n}`: {text}");
    }
}

const D: usize = 32;
const VOCAB: usize = 4;

/// The metadata of a one-layer Llama model with a four-token vocabulary.
fn metadata() -> BTreeMap<String, MetaValue> {
    let mut m = BTreeMap::new();
    let u = |v: u32| MetaValue::U32(v);
    m.insert("general.architecture".into(), MetaValue::Str("llama".into()));
    m.insert("llama.embedding_length".into(), u(D as u32));
    m.insert("llama.attention.head_count".into(), u(1));
    m.insert("llama.block_count".into(), u(1));
    m.insert("llama.feed_forward_length".into(), u(D as u32));
    m.insert("llama.context_length".into(), u(64));
    m.insert("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into()));
    let tokens = ["a", "b", "c", "d"].map(String::from).to_vec();
    m.insert("tokenizer.ggml.tokens".into(), MetaValue::Array(MetaArray::Str(tokens)));
    m.insert("tokenizer.ggml.merges".into(), MetaValue::Array(MetaArray::Str(Vec::new())));
    m.insert("tokenizer.ggml.token_type".into(), MetaValue::Array(MetaArray::I32(vec![1; VOCAB])));
    m.insert("tokenizer.ggml.eos_token_id".into(), u(3));
    m
}

/// Writes a GGUF with `metadata` and every tensor of the one-layer model (f32 zeros).
fn gguf(dir: &Path, name: &str, metadata: &BTreeMap<String, MetaValue>) -> PathBuf {
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("token_embd.weight".into(), vec![D, VOCAB]), ("output_norm.weight".into(), vec![D])];
    for (what, shape) in [
        ("attn_norm", vec![D]),
        ("attn_q", vec![D, D]),
        ("attn_k", vec![D, D]),
        ("attn_v", vec![D, D]),
        ("attn_output", vec![D, D]),
        ("ffn_norm", vec![D]),
        ("ffn_gate", vec![D, D]),
        ("ffn_up", vec![D, D]),
        ("ffn_down", vec![D, D]),
    ] {
        shapes.push((format!("blk.0.{what}.weight"), shape));
    }
    let bytes: Vec<Vec<u8>> = shapes.iter().map(|(_, s)| vec![0u8; s.iter().product::<usize>() * 4]).collect();
    let tensors: Vec<GgufTensorOut<'_>> =
        shapes.iter().zip(&bytes).map(|((n, s), b)| GgufTensorOut { name: n, ggml_type: 0, shape: s, bytes: b }).collect();
    let path = dir.join(name);
    write_gguf(&path, metadata, &tensors).expect("writes");
    path
}

fn with(key: &str, value: MetaValue) -> BTreeMap<String, MetaValue> {
    let mut m = metadata();
    m.insert(key.into(), value);
    m
}

#[test]
fn the_crafted_base_model_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, text) = inspect(&gguf(dir.path(), "fine.gguf", &metadata()));
    assert!(ok, "{text}");
    assert!(text.contains("layers: 1"), "{text}");
}

#[test]
fn implausible_layer_counts_are_refused_before_anything_is_built_for_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    refused(&gguf(dir.path(), "hundred-million.gguf", &with("llama.block_count", MetaValue::U64(100_000_000))), &["layers", "100000000"]);
    refused(&gguf(dir.path(), "million.gguf", &with("llama.block_count", MetaValue::U32(1_000_000))), &["1000000 layers", "11 tensors"]);

    // The same from a Hugging Face config.json, beside an empty safetensors file.
    for (name, layers, needle) in [("hf-hundred-million", 100_000_000u64, "100000000"), ("hf-million", 1_000_000, "1000000 layers")] {
        let hf = dir.path().join(name);
        std::fs::create_dir(&hf).expect("dir");
        let config = serde_json::json!({
            "model_type": "llama", "vocab_size": VOCAB, "hidden_size": D, "num_hidden_layers": layers,
            "num_attention_heads": 1, "intermediate_size": D,
        });
        std::fs::write(hf.join("config.json"), config.to_string()).expect("config");
        let mut st = 8u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{}      ");
        std::fs::write(hf.join("model.safetensors"), st).expect("safetensors");
        refused(&hf, &[needle]);
    }
}

#[test]
fn tokenizer_fields_out_of_range_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Control tokens past the end of the vocabulary.
    let types = MetaValue::Array(MetaArray::I32(vec![1, 1, 1, 1, 3, 3]));
    refused(
        &gguf(dir.path(), "types.gguf", &with("tokenizer.ggml.token_type", types)),
        &["tokenizer.ggml.token_type", "6 entries", "4 tokens"],
    );
    let big = MetaValue::U64((1 << 32) + 1);
    refused(&gguf(dir.path(), "bos.gguf", &with("tokenizer.ggml.bos_token_id", big)), &["tokenizer.ggml.bos_token_id"]);
    refused(&gguf(dir.path(), "eos.gguf", &with("tokenizer.ggml.eos_token_id", MetaValue::U32(4))), &["tokenizer.ggml.eos_token_id"]);
    let strings = MetaValue::Array(MetaArray::U8(vec![1, 2, 3, 4]));
    refused(&gguf(dir.path(), "tokens.gguf", &with("tokenizer.ggml.tokens", strings)), &["tokenizer.ggml.tokens"]);
}

#[test]
fn non_finite_or_absurd_numbers_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nan = with("llama.attention.layer_norm_rms_epsilon", MetaValue::F32(f32::NAN));
    refused(&gguf(dir.path(), "nan-eps.gguf", &nan), &["epsilon", "NaN"]);
    let theta = with("llama.rope.freq_base", MetaValue::F32(f32::INFINITY));
    refused(&gguf(dir.path(), "inf-theta.gguf", &theta), &["RoPE"]);
}

#[test]
fn large_metadata_arrays_cost_what_the_file_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 64 MiB of byte arrays: one enum per byte would need 2 GiB, past this process's 1 GiB.
    let mut m = metadata();
    for i in 0..4 {
        m.insert(format!("junk.{i}"), MetaValue::Array(MetaArray::U8(vec![7; 16 << 20])));
    }
    let (ok, text) = inspect(&gguf(dir.path(), "byte-arrays.gguf", &m));
    assert!(ok, "{text}");
}

/// A GGUF header by hand: magic, version, tensor count, metadata count, then `rest`.
fn raw_gguf(dir: &Path, name: &str, tensors: u64, kvs: u64, rest: &[u8]) -> PathBuf {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&tensors.to_le_bytes());
    b.extend_from_slice(&kvs.to_le_bytes());
    b.extend_from_slice(rest);
    let path = dir.join(name);
    std::fs::write(&path, b).expect("writes");
    path
}

#[test]
fn counts_beyond_the_file_are_refused_before_allocating() {
    let dir = tempfile::tempdir().expect("tempdir");
    refused(&raw_gguf(dir.path(), "tensors.gguf", 1 << 24, 0, &[0; 64]), &["tensor count", "implausible"]);
    refused(&raw_gguf(dir.path(), "kvs.gguf", 0, u64::MAX, &[0; 64]), &["metadata count", "implausible"]);
    // One key holding an array of 2^24 u64 with no data behind it.
    let mut kv = Vec::new();
    kv.extend_from_slice(&3u64.to_le_bytes());
    kv.extend_from_slice(b"big");
    kv.extend_from_slice(&9u32.to_le_bytes());
    kv.extend_from_slice(&10u32.to_le_bytes());
    kv.extend_from_slice(&(1u64 << 24).to_le_bytes());
    refused(&raw_gguf(dir.path(), "array.gguf", 0, 1, &kv), &["`big`", "implausible"]);
}

#[test]
fn a_fifo_in_place_of_a_model_file_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mkfifo = |p: &Path| assert!(Command::new("mkfifo").arg(p).status().expect("mkfifo").success());
    let fifo = dir.path().join("pipe.gguf");
    mkfifo(&fifo);
    refused(&fifo, &["FIFO"]);
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).expect("dir");
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": D, "num_hidden_layers": 1,
        "num_attention_heads": 1, "intermediate_size": D,
    });
    std::fs::write(hf.join("config.json"), config.to_string()).expect("config");
    mkfifo(&hf.join("model.safetensors"));
    refused(&hf, &["model.safetensors", "FIFO"]);
}
