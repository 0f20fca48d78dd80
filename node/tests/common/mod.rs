//! Separate `tandem serve` processes on loopback, for the multi-process tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const MODEL: &str = "smollm2-135m";

pub struct Node {
    pub child: Child,
    pub http: String,
    pub peer_id: String,
    pub mesh: Arc<Mutex<Vec<String>>>,
}

impl Node {
    /// Starts `tandem serve` (wrapped in `prefix`, e.g. `ip netns exec NS`) and waits for its
    /// HTTP address, peer id and first mesh address.
    pub fn spawn(prefix: &[&str], args: &[&str], dir: &std::path::Path, name: &str) -> Node {
        Node::spawn_env(prefix, args, &[], dir, name)
    }

    /// `spawn` with extra environment variables for the child.
    pub fn spawn_env(prefix: &[&str], args: &[&str], env: &[(&str, &str)], dir: &std::path::Path, name: &str) -> Node {
        let bin = env!("CARGO_BIN_EXE_tandem");
        let identity = dir.join(format!("{name}.key"));
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .arg("serve")
            .args(if args.contains(&"--context") { &[][..] } else { &["--context", "512"][..] })
            .args(if args.contains(&"--kv-memory") { &[][..] } else { &["--kv-memory", "64MiB"][..] })
            .args(["--identity", identity.to_str().expect("utf-8 path")])
            // These tests hold nodes to the deterministic mode's promises: split == colocated, a
            // failover continues the very same tokens.
            .arg("--deterministic")
            .args(args)
            .env("TANDEM_LOG", "info,tandem_node::serve::kv=debug,libp2p=warn,wgpu_core=warn,wgpu_hal=warn,naga=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file"))
            .spawn()
            .expect("tandem serve starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let mesh = Arc::new(Mutex::new(Vec::new()));
        let addrs = mesh.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("tandem: mesh listening on ") {
                    addrs.lock().expect("lock").push(a.to_string());
                }
                let _ = tx.send(line);
            }
        });
        let (mut http, mut peer_id) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while http.is_none() || peer_id.is_none() || mesh.lock().expect("lock").is_empty() {
            let line =
                rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).unwrap_or_else(|_| panic!("{name} announces itself"));
            if let Some(a) = line.strip_prefix("tandem: listening on ") {
                http = Some(a.to_string());
            }
            if let Some(p) = line.strip_prefix("tandem: peer id ") {
                peer_id = Some(p.to_string());
            }
        }
        Node { child, http: http.unwrap_or_default(), peer_id: peer_id.unwrap_or_default(), mesh }
    }

    pub fn start(args: &[&str], dir: &std::path::Path, name: &str) -> Node {
        Node::start_env(args, &[], dir, name)
    }

    /// `start` with extra environment variables for the child.
    pub fn start_env(args: &[&str], env: &[(&str, &str)], dir: &std::path::Path, name: &str) -> Node {
        let mut all = vec!["--http", "127.0.0.1:0", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"];
        all.extend_from_slice(args);
        Node::spawn_env(&[], &all, env, dir, name)
    }

    /// Its log so far, without terminal colours.
    pub fn plain_log(&self, dir: &std::path::Path, name: &str) -> String {
        let raw = self.log(dir, name);
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                // An escape sequence runs to its final letter.
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    pub fn addr(&self) -> String {
        self.mesh.lock().expect("lock")[0].clone()
    }

    pub async fn get(&self, path: &str) -> Value {
        reqwest::get(format!("{}{path}", self.http)).await.expect("GET").json().await.expect("JSON")
    }

    pub async fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if let Ok(r) = reqwest::get(format!("{}/health", self.http)).await
                && r.status() == 200
            {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(180), "{} gets ready", self.http);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Peer ids this node sees with a direct connection and a complete ad (a model, unless an
    /// observer), itself included.
    pub async fn sees(&self) -> Vec<String> {
        let v = self.get("/v1/cluster").await;
        let mut ids: Vec<String> = v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .filter(|n| n["connected"] == true && (n["role"] == "observer" || n["models"].as_array().is_some_and(|m| !m.is_empty())))
            .map(|n| n["peer_id"].as_str().unwrap_or_default().to_string())
            .collect();
        ids.sort();
        ids
    }

    pub async fn wait_until_sees(&self, want: &[&Node], within: Duration) {
        let mut want: Vec<String> = want.iter().map(|n| n.peer_id.clone()).collect();
        want.sort();
        let start = Instant::now();
        loop {
            let got = self.sees().await;
            if got == want {
                return;
            }
            assert!(start.elapsed() < within, "{} sees {got:?}, wants {want:?}\n{:#}", self.peer_id, self.get("/v1/cluster").await);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The text of its log so far.
    pub fn log(&self, dir: &std::path::Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let r = reqwest::Client::new().post(format!("{}{path}", self.http)).json(&body).send().await.expect("POST");
        r.json().await.expect("JSON")
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.http)).await.expect("metrics").text().await.expect("text");
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The output of `child` once it exits; after `limit` it is killed and the test fails, naming
/// `what` was expected to end.
pub fn output_within(mut child: Child, limit: Duration, what: &str) -> std::process::Output {
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// A greedy streamed completion through `node`: its text, or the error status and body.
pub async fn complete(node: &Node, prompt: &str) -> Result<String, (u16, String)> {
    let body = json!({ "model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": true });
    let resp = reqwest::Client::new().post(format!("{}/v1/completions", node.http)).json(&body).send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    if status != 200 {
        return Err((status, text));
    }
    let mut out = String::new();
    let mut done = false;
    for data in text.split("\n\n").filter_map(|e| e.trim().strip_prefix("data: ")) {
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).expect("JSON chunk");
        if v.get("error").is_some() {
            return Err((502, data.to_string()));
        }
        out.push_str(v["choices"][0]["text"].as_str().unwrap_or_default());
    }
    assert!(done, "the stream ends with [DONE]");
    Ok(out)
}
