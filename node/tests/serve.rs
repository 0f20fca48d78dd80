//! `tandem serve` as a separate process, driven over real HTTP: 32 concurrent streams give the
//! same text as one at a time, a client that leaves mid-stream frees its KV blocks, bad requests
//! get OpenAI-shaped 4xx errors while the server keeps serving, SIGTERM drains cleanly, and the
//! official `openai` Python package works against it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

const MODEL: &str = "smollm2-135m";

struct Server {
    child: Child,
    base: String,
    /// Holds the server's own identity: nodes on one machine may not share one.
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `tandem serve` on a free port and waits until the model is loaded.
    async fn start(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["serve", "--http", "127.0.0.1:0", "--context", "512", "--kv-memory", "64MiB", "--max-body", "64KiB"])
            .arg("--identity")
            .arg(dir.path().join("identity.key"))
            .args(["--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
            // Streams are compared alone and among 32: the deterministic mode's promise.
            .arg("--deterministic")
            .args(extra)
            .env("TANDEM_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("tandem serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("the listening line");
        let base =
            line.trim().strip_prefix("tandem: listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
        let server = Server { child, base, _dir: dir };
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/health", server.base)).send().await {
                if r.status() == 200 {
                    break;
                }
                assert_eq!(r.status(), 503, "not ready yet means 503");
            }
            assert!(start.elapsed() < Duration::from_secs(180), "the model loads");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics")).await.expect("metrics").text().await.expect("text");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("metric {name} in:\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prompts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{} is", i * 7 + 3)).collect()
}

/// Streams a greedy completion and returns its text and finish reason.
async fn stream_completion(client: &reqwest::Client, server: &Server, prompt: &str, max_tokens: u32) -> (String, String) {
    let body = json!({ "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true });
    let resp = client.post(server.url("/v1/completions")).json(&body).send().await.expect("request");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap_or_default().starts_with("text/event-stream"));
    let mut buf = String::new();
    let mut bytes = resp.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
    }
    let mut text = String::new();
    let mut finish = String::new();
    let mut done = false;
    for data in buf.split("\n\n").filter_map(|e| e.trim().strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).expect("JSON chunk");
        let choice = &v["choices"][0];
        text.push_str(choice["text"].as_str().unwrap_or_default());
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    assert!(done, "the stream ends with [DONE]");
    (text, finish)
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_two_concurrent_streams_match_one_at_a_time() {
    let server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    let prompts = prompts(32);
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(stream_completion(&client, &server, p, 4).await);
    }
    assert!(alone.iter().all(|(t, f)| !t.is_empty() && f == "length"), "{alone:?}");
    let together = futures_util::future::join_all(prompts.iter().map(|p| stream_completion(&client, &server, p, 4))).await;
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "request {i}: the same text alone and among 32 concurrent streams");
    }
    assert_eq!(server.metric("tandem_kv_blocks_used").await, 0.0, "every finished request gave its blocks back");
    assert_eq!(server.metric("tandem_requests_finished_total").await, 64.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_mid_stream_frees_its_blocks() {
    let server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    let body = json!({ "model": MODEL, "prompt": "Once upon a time, in a small village by the sea,", "max_tokens": 300, "temperature": 0, "stream": true });
    let resp = client.post(server.url("/v1/completions")).json(&body).send().await.expect("request");
    let mut bytes = resp.bytes_stream();
    let first = bytes.next().await.expect("a first chunk").expect("bytes");
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    // The metrics are published after each engine step, so they may lag the first chunk a little.
    let start = Instant::now();
    while server.metric("tandem_kv_blocks_used").await == 0.0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the running request holds blocks");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(bytes);
    let start = Instant::now();
    while server.metric("tandem_kv_blocks_used").await > 0.0 || server.metric("tandem_requests_running").await > 0.0 {
        assert!(start.elapsed() < Duration::from_secs(60), "the abandoned request is cancelled and its blocks freed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(server.metric("tandem_generated_tokens_total").await < 300.0, "generation stopped early");
}

async fn post(server: &Server, path: &str, body: reqwest::Body) -> (u16, Value) {
    let resp =
        reqwest::Client::new().post(server.url(path)).header("content-type", "application/json").body(body).send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors_and_the_server_keeps_serving() {
    let server = Server::start(&["--max-waiting", "2"]).await;
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("malformed JSON", "{\"model\": ".into(), 400, "parse"),
        ("unknown model", json!({ "model": "gpt-9", "prompt": "hi" }).to_string(), 404, "gpt-9"),
        ("negative max_tokens", json!({ "model": MODEL, "prompt": "hi", "max_tokens": -1 }).to_string(), 400, "max_tokens"),
        ("too long for the context", json!({ "model": MODEL, "prompt": "hi", "max_tokens": 100000 }).to_string(), 400, "context"),
        ("temperature out of range", json!({ "model": MODEL, "prompt": "hi", "temperature": 7 }).to_string(), 400, "temperature"),
        ("oversized body", json!({ "model": MODEL, "prompt": "a".repeat(100_000) }).to_string(), 413, "limit"),
        ("an empty list of prompts", json!({ "model": MODEL, "prompt": [] }).to_string(), 400, "empty"),
        ("an empty prompt", json!({ "model": MODEL, "prompt": "" }).to_string(), 400, "empty"),
    ];
    for (what, body, status, needle) in cases {
        let (got, v) = post(&server, "/v1/completions", body.into()).await;
        assert_eq!(got, status, "{what}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{what}: OpenAI error shape: {v}"));
        assert!(msg.to_lowercase().contains(needle), "{what}: {msg}");
        assert!(v["error"]["type"].is_string(), "{what}: {v}");
    }
    let (got, v) = post(&server, "/v1/chat/completions", json!({ "model": MODEL, "messages": [] }).to_string().into()).await;
    assert_eq!(got, 400, "empty messages: {v}");
    let resp = reqwest::get(server.url("/v1/nothing")).await.expect("request");
    assert_eq!(resp.status(), 404);
    // Every client error is the request's fault in OpenAI's terms, whatever its status.
    let resp = reqwest::Client::new().post(server.url("/v1/completions")).body("{}").send().await.expect("request");
    assert_eq!(resp.status(), 415, "no JSON content type");
    let v: Value = resp.json().await.expect("JSON");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    let resp = reqwest::get(server.url("/v1/completions")).await.expect("request");
    assert_eq!(resp.status(), 405, "GET on a POST route");
    let v: Value = resp.json().await.expect("an OpenAI-shaped body");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");

    // Still serving.
    let body = json!({ "model": MODEL, "messages": [{ "role": "user", "content": "What is the capital of France?" }], "max_tokens": 3, "temperature": 0 });
    let (got, v) = post(&server, "/v1/chat/completions", body.to_string().into()).await;
    assert_eq!(got, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["choices"][0]["message"]["content"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    // More requests than the queue takes at once: some get 429, none are lost or fail otherwise.
    let bodies: Vec<String> =
        prompts(12).into_iter().map(|p| json!({ "model": MODEL, "prompt": p, "max_tokens": 2, "temperature": 0 }).to_string()).collect();
    let results = futures_util::future::join_all(bodies.into_iter().map(|b| post(&server, "/v1/completions", b.into()))).await;
    let statuses: Vec<u16> = results.iter().map(|(s, _)| *s).collect();
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert!(statuses.contains(&429), "a full queue answers 429: {statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    let (_, v) = results.iter().find(|(s, _)| *s == 429).expect("a 429");
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_requests_then_exits() {
    let mut server = Server::start(&[]).await;
    let client = reqwest::Client::new();
    let body = json!({ "model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0 });
    let pending = tokio::spawn({
        let url = server.url("/v1/completions");
        async move { client.post(url).json(&body).send().await.expect("request").json::<Value>().await.expect("json") }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let v = pending.await.expect("the in-flight request completes");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    let start = Instant::now();
    loop {
        if let Some(code) = server.child.try_wait().expect("wait") {
            assert!(code.success(), "a clean exit: {code}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the server exits after draining");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_official_openai_python_client_works() {
    let python = std::env::var("TANDEM_PYTHON")
        .expect("TANDEM_PYTHON: a python with the `openai` package (scripts/test installs one into target/pyenv)");
    let server = Server::start(&[]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let base = server.url("/v1");
    let out = tokio::task::spawn_blocking(move || Command::new(python).args([script, &base, MODEL]).output().expect("python runs"))
        .await
        .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "openai client checks failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all openai client checks passed"), "{stdout}");
}
