//! Bad model files give clear errors that name the file and the tensor; the Hugging Face export
//! of the default model loads back with the same tokens and logits.

use std::path::Path;

use tandem_core::hf_export::{ExportDtype, export_hf};
use tandem_core::tensor::ggml_type_id;
use tandem_core::{Engine, EngineConfig, Error, GgufFile, GgufTensorOut, HostModel, KvDtype, write_gguf};
use tandem_tests::{default_model, gpu};

/// HF F32 weights are the dequantized GGUF weights; only kernel arithmetic differs.
const HF_F32_LOGIT_TOLERANCE: f32 = 2e-3;

fn default_gguf() -> GgufFile {
    GgufFile::open(&default_model().path).expect("opens")
}

/// Rewrites the default model with `edit` applied to its tensor list.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, u32, Vec<usize>, Vec<u8>)>)) -> std::path::PathBuf {
    let file = default_gguf();
    let mut tensors: Vec<(String, u32, Vec<usize>, Vec<u8>)> =
        file.tensors.iter().map(|t| (t.name.clone(), ggml_type_id(t.format), t.shape.clone(), t.bytes.as_slice().to_vec())).collect();
    edit(&mut tensors);
    let out: Vec<GgufTensorOut<'_>> =
        tensors.iter().map(|(n, ty, s, b)| GgufTensorOut { name: n, ggml_type: *ty, shape: s, bytes: b }).collect();
    let path = dir.join("edited.gguf");
    write_gguf(&path, &file.metadata, &out).expect("writes");
    path
}

#[test]
fn a_rewritten_model_loads_identically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = rewrite(dir.path(), |_| {});
    let m = HostModel::load(&path).expect("loads");
    assert_eq!(m.config, default_model().config);
    assert_eq!(m.tensors.len(), default_model().tensors.len());
}

#[test]
fn truncated_and_corrupt_gguf_files_name_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = std::fs::read(&default_model().path).expect("reads");
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("writes");
    match HostModel::load(&cut) {
        Err(Error::Tensor { path, tensor, reason }) => {
            assert_eq!(path, cut);
            assert!(!tensor.is_empty());
            assert!(reason.contains("truncated"), "{reason}");
        }
        other => panic!("expected a tensor error, got {other:?}"),
    }
    let header = dir.path().join("header.gguf");
    std::fs::write(&header, &bytes[..1000]).expect("writes");
    let e = HostModel::load(&header).expect_err("fails");
    assert!(matches!(e, Error::Gguf { .. }) && e.to_string().contains("header.gguf"), "{e}");
    let magic = dir.path().join("magic.gguf");
    std::fs::write(&magic, b"GGML not really a model").expect("writes");
    assert!(HostModel::load(&magic).expect_err("fails").to_string().contains("bad magic"));
    let missing = dir.path().join("absent.gguf");
    assert!(matches!(HostModel::load(&missing), Err(Error::Io { .. })));
}

#[test]
fn unsupported_missing_and_misshapen_tensors_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let iq2 = rewrite(dir.path(), |ts| ts[5].1 = 16);
    match HostModel::load(&iq2) {
        Err(Error::UnsupportedTensorType { type_name, tensor, .. }) => {
            assert_eq!(type_name, "IQ2_XXS");
            assert!(!tensor.is_empty());
        }
        other => panic!("expected an unsupported-type error, got {other:?}"),
    }
    // A K-quant whose rows are not whole super-blocks of 256 (SmolLM2's 576-wide rows).
    let q4k = rewrite(dir.path(), |ts| ts[5].1 = 12);
    let err = HostModel::load(&q4k).expect_err("576 columns are not whole Q4_K blocks").to_string();
    assert!(err.contains("q4_k"), "{err}");
    let missing = rewrite(dir.path(), |ts| ts.retain(|t| t.0 != "blk.3.ffn_up.weight"));
    assert!(matches!(HostModel::load(&missing), Err(Error::MissingTensor { tensor, .. }) if tensor == "blk.3.ffn_up.weight"));
    let reshaped = rewrite(dir.path(), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "blk.0.attn_k.weight").expect("attn_k");
        t.2 = vec![t.2[0], t.2[1] / 3];
        t.3.truncate(t.3.len() / 3);
    });
    assert!(matches!(HostModel::load(&reshaped), Err(Error::ShapeMismatch { tensor, .. }) if tensor == "blk.0.attn_k.weight"));
}

#[test]
fn hugging_face_export_loads_back_with_the_same_tokens_and_logits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = default_model();
    export_hf(gguf, dir.path(), ExportDtype::F32).expect("exports");
    let hf = HostModel::load(dir.path()).expect("loads the HF directory");
    assert_eq!(hf.config.n_layers, gguf.config.n_layers);
    let text = "<|im_start|>user\nThe capital of France is 1234 Ünïcödé<|im_end|>";
    let ids = gguf.tokenizer.encode(text, true).expect("encodes");
    assert_eq!(hf.tokenizer.encode(text, true).expect("encodes"), ids);
    assert_eq!(hf.tokenizer.encode(text, false).expect("encodes"), gguf.tokenizer.encode(text, false).expect("encodes"));
    assert_eq!(hf.tokenizer.chat_template, gguf.tokenizer.chat_template);

    // Deterministic mode and an f32 K/V cache: f32 activations for both files, so their logits
    // differ only by how the weights are read (the default mode's 8-bit activations serve
    // quantized weights only, and an f16 cache turns the read's last-bit differences into whole
    // f16 steps).
    let cfg = EngineConfig { max_batch_tokens: 64, context_length: 128, deterministic: true, kv_dtype: KvDtype::F32, ..Default::default() };
    let prompt = gguf.tokenizer.encode("The capital of France is", false).expect("encodes");
    let logits = |m: &HostModel| {
        let mut e = Engine::new(gpu(), m, &cfg).expect("engine");
        let seq = e.create_sequence();
        e.forward_logits(seq, &prompt).expect("logits")
    };
    let (a, b) = (logits(gguf), logits(&hf));
    for (pos, (x, y)) in a.iter().zip(&b).enumerate() {
        let worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(worst <= HF_F32_LOGIT_TOLERANCE, "position {pos}: logits differ by {worst} (tolerance {HF_F32_LOGIT_TOLERANCE})");
        assert_eq!(tandem_core::cpu_ref::argmax(x), tandem_core::cpu_ref::argmax(y));
    }

    // A damaged safetensors file names itself.
    let st = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&st).expect("exists").len();
    let f = std::fs::OpenOptions::new().write(true).open(&st).expect("opens");
    f.set_len(len - 1000).expect("truncates");
    match HostModel::load(dir.path()) {
        Err(Error::Safetensors { path, .. }) => assert_eq!(path, st),
        other => panic!("expected a safetensors error, got {other:?}"),
    }
}

/// A node that fetched only a span's tensors holds a file with holes for the rest; the manifest's
/// content addresses stand in for the missing bytes, and give the whole file's identity only when
/// they are the true ones.
#[test]
fn a_file_holding_only_a_spans_tensors_has_the_whole_files_identity_through_its_manifest() {
    use std::os::unix::fs::FileExt;
    let whole = default_model();
    let manifest = whole.manifest().expect("a GGUF file has a manifest");
    manifest.check().expect("our own manifest is well formed");
    assert_eq!(manifest.file_size, std::fs::metadata(&whole.path).expect("stat").len());
    let bytes = std::fs::read(&whole.path).expect("reads");
    let dir = tempfile::tempdir().expect("tempdir");
    let sparse = dir.path().join("span.gguf");
    let file = std::fs::File::create(&sparse).expect("creates");
    file.set_len(manifest.file_size).expect("sized");
    let names = tandem_core::content::span_tensors(
        whole.tensors.keys().map(String::as_str),
        whole.config.n_layers,
        whole.config.tied_embeddings,
        10..20,
    );
    assert!(names.iter().all(|n| !n.starts_with("blk.0.") && n != "token_embd.weight"), "{names:?}");
    let regions = std::iter::once(&manifest.header).chain(manifest.tensors.iter().filter(|r| names.contains(&r.name)));
    for r in regions {
        file.write_all_at(&bytes[r.offset as usize..(r.offset + r.len) as usize], r.offset).expect("writes");
    }
    drop(file);
    let partial = HostModel::load(&sparse).expect("the header is all a load reads");
    assert_eq!(partial.tensor("blk.0.attn_q.weight").expect("listed").bytes.as_slice().iter().max(), Some(&0), "a hole");
    let partial_identity = partial.clone().with_regions(manifest.tensor_regions()).expect("matches").identity();
    assert_eq!(partial_identity, whole.identity());
    assert_ne!(partial.identity(), whole.identity(), "hashing the holes gives another model");

    let mut lying = manifest.tensor_regions();
    lying.get_mut("blk.3.ffn_up.weight").expect("tensor").chunks[0][0] ^= 1;
    assert_ne!(partial.clone().with_regions(lying).expect("same layout").identity(), whole.identity());
    let mut moved = manifest.tensor_regions();
    moved.get_mut("blk.3.ffn_up.weight").expect("tensor").offset += 32;
    assert!(partial.with_regions(moved).is_err(), "a region elsewhere than the file's tensor");
}
