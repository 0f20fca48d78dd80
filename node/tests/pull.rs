//! `tandem model pull` against a Hugging Face Hub-shaped tree served from a local HTTP server
//! (no hub is reachable here): the repository listing at `/api/models/OWNER/REPO/revision/REV`
//! and files at `/OWNER/REPO/resolve/REV/FILE`, with the Hub's headers (`x-repo-commit`, the
//! etag: a sha256 for LFS files) and byte ranges.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A file of a served repository: its bytes and the etag the server gives (a sha256 for LFS
/// files, a 40-hex git id for small ones, as the Hub does).
struct HubFile {
    bytes: Vec<u8>,
    etag: String,
}

type Repos = HashMap<String, Vec<(String, HubFile)>>;

/// The served tree, the ranges asked for (repository, first byte), and ranges to fail once.
struct Hub {
    repos: Repos,
    asked: Mutex<Vec<(String, usize)>>,
    fail_once: Mutex<Vec<(String, usize)>>,
}

fn lfs(bytes: Vec<u8>) -> HubFile {
    let etag = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    HubFile { bytes, etag }
}

fn small(bytes: Vec<u8>) -> HubFile {
    HubFile { bytes, etag: "d1f2e3c4b5a69788796a5b4c3d2e1f0a1b2c3d4e".into() }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/families").join(name)).expect("fixture")
}

async fn hub(state: Arc<Hub>, uri: Uri, headers: HeaderMap) -> Response {
    let repos = &state.repos;
    let path = uri.path().trim_start_matches('/');
    if let Some(rest) = path.strip_prefix("api/models/") {
        let Some((repo, _rev)) = rest.split_once("/revision/") else { return StatusCode::NOT_FOUND.into_response() };
        let Some(files) = repos.get(repo) else { return StatusCode::NOT_FOUND.into_response() };
        let siblings: Vec<_> = files.iter().map(|(name, _)| serde_json::json!({ "rfilename": name })).collect();
        return axum::Json(serde_json::json!({ "sha": COMMIT, "siblings": siblings })).into_response();
    }
    let Some((repo, rest)) = path.split_once("/resolve/") else { return StatusCode::NOT_FOUND.into_response() };
    let Some((_rev, name)) = rest.split_once('/') else { return StatusCode::NOT_FOUND.into_response() };
    let Some((_, file)) = repos.get(repo).and_then(|files| files.iter().find(|(n, _)| n == name)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let len = file.bytes.len();
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|r| r.strip_prefix("bytes=")).and_then(|r| {
        let (a, b) = r.split_once('-')?;
        let a: usize = a.parse().ok()?;
        let b: usize = if b.is_empty() { len - 1 } else { b.parse::<usize>().ok()?.min(len - 1) };
        (a <= b).then_some((a, b))
    });
    let common =
        [("x-repo-commit", COMMIT.to_string()), ("x-linked-etag", format!("\"{}\"", file.etag)), ("etag", format!("\"{}\"", file.etag))];
    if let Some((a, b)) = range
        && b > a
    {
        state.asked.lock().expect("log").push((repo.to_string(), a));
        let mut fail = state.fail_once.lock().expect("failures");
        if let Some(i) = fail.iter().position(|(r, at)| r == repo && *at == a) {
            fail.remove(i);
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    }
    let mut response = match range {
        Some((a, b)) => {
            let mut r = (StatusCode::PARTIAL_CONTENT, file.bytes[a..=b].to_vec()).into_response();
            r.headers_mut().insert(header::CONTENT_RANGE, format!("bytes {a}-{b}/{len}").parse().expect("header"));
            r
        }
        None => (StatusCode::OK, file.bytes.clone()).into_response(),
    };
    for (k, v) in common {
        response.headers_mut().insert(k, v.parse().expect("header"));
    }
    response
}

/// Serves `hub` on a free local port for the life of the test process; returns its address.
fn serve(hub_state: Arc<Hub>) -> String {
    let repos = hub_state;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| hub(repos.clone(), uri, headers));
            axum::serve(listener, app).await.expect("serve");
        });
    });
    format!("http://{addr}")
}

fn tandem(cache: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("TANDEM_CACHE_DIR", cache)
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_TOKEN")
        .output()
        .expect("runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn pulled(out: &Output) -> PathBuf {
    assert!(out.status.success(), "pull failed: {}", text(&out.stderr));
    PathBuf::from(text(&out.stdout).trim())
}

#[test]
fn pull_fetches_gguf_files_and_safetensors_directories_and_verifies_them() {
    let gguf = fixture("qwen2-tiny.gguf");
    let mut repos = Repos::new();
    repos.insert(
        "tandem/qwen2-tiny-GGUF".into(),
        vec![("README.md".into(), small(b"# tiny\n".to_vec())), ("qwen2-tiny.gguf".into(), lfs(gguf.clone()))],
    );
    repos.insert(
        "tandem/qwen2-tiny".into(),
        vec![
            ("config.json".into(), small(fixture("qwen2-tiny-hf/config.json"))),
            ("tokenizer.json".into(), lfs(fixture("qwen2-tiny-hf/tokenizer.json"))),
            ("model.safetensors".into(), lfs(fixture("qwen2-tiny-hf/model.safetensors"))),
            ("pytorch_model.bin".into(), lfs(b"not read by tandem".to_vec())),
        ],
    );
    repos.insert("tandem/two".into(), vec![("a-Q4_K_M.gguf".into(), lfs(gguf.clone())), ("a-Q8_0.gguf".into(), lfs(gguf.clone()))]);
    // Served bytes that are not the ones the etag promises.
    let mut corrupt = lfs(gguf.clone());
    corrupt.bytes[100] ^= 0xff;
    repos.insert("tandem/corrupt".into(), vec![("x.gguf".into(), corrupt)]);
    // Three 10 MB download ranges, the third failing once.
    let big: Vec<u8> = (0..25_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    repos.insert("tandem/big".into(), vec![("big.gguf".into(), lfs(big.clone()))]);
    let state = Arc::new(Hub { repos, asked: Mutex::default(), fail_once: Mutex::new(vec![("tandem/big".into(), 20_000_000)]) });
    let endpoint = serve(state.clone());
    let cache = tempfile::tempdir().expect("tempdir");
    let pull = |spec: &str| tandem(cache.path(), &["model", "pull", spec, "--endpoint", &endpoint]);

    // A repository's one GGUF file, byte for byte, and a model tandem reads.
    let path = pulled(&pull("tandem/qwen2-tiny-GGUF"));
    assert!(path.starts_with(cache.path().join("hub")), "{}", path.display());
    assert_eq!(std::fs::read(&path).expect("pulled file"), gguf);
    let inspect = tandem(cache.path(), &["model", "inspect", path.to_str().expect("utf-8")]);
    assert!(inspect.status.success() && text(&inspect.stdout).contains("qwen2"), "{}", text(&inspect.stderr));
    // Pulled again, it comes from the cache.
    assert_eq!(pulled(&pull("tandem/qwen2-tiny-GGUF")), path);

    // A safetensors repository: its directory with config and tokenizer, nothing else.
    let dir = pulled(&pull("tandem/qwen2-tiny"));
    assert!(dir.is_dir(), "{}", dir.display());
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(dir.join(f).is_file(), "{f} missing in {}", dir.display());
    }
    assert!(!dir.join("pytorch_model.bin").exists(), "a file tandem does not read was pulled");
    let inspect = tandem(cache.path(), &["model", "inspect", dir.to_str().expect("utf-8")]);
    assert!(inspect.status.success() && text(&inspect.stdout).contains("qwen2"), "{}", text(&inspect.stderr));

    // Several GGUF files: the error names them; naming one pulls it.
    let out = pull("tandem/two");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("a-Q4_K_M.gguf") && err.contains("a-Q8_0.gguf") && err.contains("tandem/two:FILE"), "{err}");
    let path = pulled(&pull("tandem/two:a-Q8_0.gguf"));
    assert!(path.ends_with("a-Q8_0.gguf"), "{}", path.display());

    // Bytes that do not match the Hub's sha256: an error, and nothing left in the snapshot.
    let out = pull("tandem/corrupt:x.gguf");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("sha256"), "{}", text(&out.stderr));
    let snapshot = cache.path().join("hub/models--tandem--corrupt/snapshots").join(COMMIT).join("x.gguf");
    assert!(!snapshot.exists(), "a corrupt file stayed at {}", snapshot.display());

    // `model list` shows what was pulled, by repository.
    let list = tandem(cache.path(), &["model", "list"]);
    let listed = text(&list.stdout);
    assert!(list.status.success(), "{}", text(&list.stderr));
    for repo in ["tandem/qwen2-tiny-GGUF", "tandem/qwen2-tiny ", "tandem/two"] {
        let line = listed.lines().find(|l| l.starts_with(repo)).unwrap_or_else(|| panic!("{repo} not listed:\n{listed}"));
        assert!(line.contains("qwen2"), "{line}");
    }

    // An interrupted pull fails; the next one asks only for the ranges not yet stored.
    let out = pull("tandem/big:big.gguf");
    assert!(!out.status.success(), "the failing range did not fail the pull");
    let first: Vec<usize> = state.asked.lock().expect("log").drain(..).filter(|(r, _)| r == "tandem/big").map(|(_, a)| a).collect();
    assert_eq!(first, [0, 10_000_000, 20_000_000], "ranges asked by the first pull");
    let path = pulled(&pull("tandem/big:big.gguf"));
    let second: Vec<usize> = state.asked.lock().expect("log").drain(..).filter(|(r, _)| r == "tandem/big").map(|(_, a)| a).collect();
    assert_eq!(second, [20_000_000], "the second pull resumes at the failed range");
    assert!(std::fs::read(&path).expect("pulled file") == big, "the resumed file differs");

    // Missing repositories and malformed names get clear errors.
    let out = pull("tandem/missing");
    assert!(!out.status.success() && text(&out.stderr).contains("tandem/missing"), "{}", text(&out.stderr));
    for bad in ["nope", "a/b/c", "tandem/x:../../etc/passwd", "/x:y"] {
        let out = pull(bad);
        assert!(!out.status.success() && text(&out.stderr).contains("OWNER/REPO"), "{bad}: {}", text(&out.stderr));
    }
}
