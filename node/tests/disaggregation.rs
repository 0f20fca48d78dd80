//! Disaggregated prefill and decode across separate `tandem serve` processes on loopback: an
//! entry node places requests split (prefill on P, K/V streamed layer by layer to D, decoded on
//! D), and the tokens equal a single node's for the short reference prompts; a long prompt transfers
//! completely; a decode node killed mid-generation, a prefill node killed mid-prefill, and a
//! decode node drained mid-generation all leave the client with the complete, identical text;
//! an entry node that vanishes leaves nothing behind.

mod common;

use std::time::{Duration, Instant};

use common::{MODEL, Node};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// The reference prompts' token ids (llama.cpp's tokenization).
fn reference_prompts() -> Vec<(String, Vec<u32>)> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = [root.join("shared/reference"), root.join("../shared/reference")].into_iter().find(|d| d.is_dir()).expect("shared/reference");
    let text = std::fs::read_to_string(dir.join("smollm2-135m-q4_1.llamacpp.json")).expect("reference file");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    v["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| {
            let ids = p["tokens"].as_array().expect("tokens").iter().map(|t| t.as_u64().expect("id") as u32).collect();
            (p["name"].as_str().unwrap_or_default().to_string(), ids)
        })
        .collect()
}

/// A streamed completion: its text, and its token count from the usage chunk. `during` runs
/// once, after `after` text chunks have arrived.
async fn stream<F: std::future::Future<Output = ()>>(
    node: &Node,
    mut body: Value,
    after: usize,
    during: impl FnOnce() -> F,
) -> (String, u64) {
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    let resp = reqwest::Client::new().post(format!("{}/v1/completions", node.http)).json(&body).send().await.expect("request");
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap_or_default());
    let mut bytes = resp.bytes_stream();
    let (mut buf, mut text, mut chunks, mut usage, mut done) = (String::new(), String::new(), 0, 0, false);
    let mut during = Some(during);
    while let Some(b) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&b.expect("stream")));
        while let Some(at) = buf.find("\n\n") {
            let event: String = buf.drain(..at + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).expect("JSON chunk");
            assert!(v.get("error").is_none(), "the stream failed: {v}");
            if let Some(t) = v["choices"][0]["text"].as_str() {
                text.push_str(t);
                chunks += 1;
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = n;
            }
            if chunks >= after
                && let Some(f) = during.take()
            {
                f().await;
            }
        }
    }
    assert!(done, "the stream ends with [DONE]");
    (text, usage)
}

fn greedy(prompt: &[u32], max_tokens: usize) -> Value {
    json!({ "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0 })
}

async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (layer, start, ready_ms, send_start_ms) of every K/V chunk a prefill node logged.
fn chunk_timings(log: &str) -> Vec<(String, usize, usize, f64, f64)> {
    let field = |line: &str, name: &str| -> Option<String> {
        let at = line.find(&format!("{name}="))? + name.len() + 1;
        Some(line[at..].split(|c: char| c.is_whitespace() || c == '\x1b').next()?.to_string())
    };
    log.lines()
        .filter(|l| l.contains("kv chunk sent"))
        .filter_map(|l| {
            let l = l.replace("\x1b[3m", "").replace("\x1b[0m", "").replace("\x1b[2m", "");
            Some((
                field(&l, "session")?,
                field(&l, "layer")?.parse().ok()?,
                field(&l, "start")?.parse().ok()?,
                field(&l, "ready_ms")?.parse().ok()?,
                field(&l, "send_start_ms")?.parse().ok()?,
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn split_requests_give_the_single_node_tokens_for_the_short_reference_prompts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Node::start(&["--role", "prefill", "--placement", "colocated"], dir.path(), "p");
    let d = Node::start(&["--role", "decode", "--peer", &p.addr()], dir.path(), "d");
    let e = Node::start(&["--role", "observer", "--placement", "split", "--peer", &p.addr(), "--peer", &d.addr()], dir.path(), "e");
    p.wait_ready().await;
    d.wait_ready().await;
    for n in [&p, &d, &e] {
        n.wait_until_sees(&[&p, &d, &e], Duration::from_secs(60)).await;
    }
    // All but the 235-token one, which would cost lavapipe minutes three times over; prompts of
    // several K/V chunks a layer cross the wire in `long_prompts_killed_nodes_drains_and_a_vanished_entry_node`.
    let prompts: Vec<_> = reference_prompts().into_iter().filter(|(_, ids)| ids.len() <= 64).collect();
    assert!(prompts.len() >= 5, "the short reference prompts");
    let mut split = Vec::new();
    for (name, ids) in &prompts {
        let (text, n) = stream(&e, greedy(ids, 6), usize::MAX, || async {}).await;
        assert_eq!(n, 6, "{name}: six tokens");
        split.push(text);
    }
    let prompt_tokens: usize = prompts.iter().map(|(_, ids)| ids.len()).sum();
    assert_eq!(d.metric("tandem_split_requests_total").await, prompts.len() as f64, "every request was split");
    assert_eq!(d.metric("tandem_kv_imported_tokens_total").await, prompt_tokens as f64, "D imported every prompt position");
    assert_eq!(p.metric("tandem_kv_exported_tokens_total").await, prompt_tokens as f64, "P computed and sent them");
    let received = d.metric("tandem_kv_received_bytes_total").await;
    assert_eq!(received, p.metric("tandem_kv_sent_bytes_total").await);
    // K and V travel as the caches hold them: f16 by default, half the bytes of f32.
    let kv_bytes_per_token = 2.0 * 30.0 * 3.0 * 64.0 * 2.0;
    assert_eq!(received, prompt_tokens as f64 * kv_bytes_per_token, "f16 K and V, every layer, every position");
    assert!(d.metric("tandem_kv_overlap_ratio_count").await >= prompts.len() as f64);

    // The same prompts on one node (P places them colocated).
    for ((name, ids), split_text) in prompts.iter().zip(&split) {
        let (text, _) = stream(&p, greedy(ids, 6), usize::MAX, || async {}).await;
        assert_eq!(&text, split_text, "{name}: split and single-node runs agree");
    }

    // The longest prompt again: D holds its full blocks now, so P computes and sends only the tail.
    let (name, long) = prompts.iter().max_by_key(|(_, ids)| ids.len()).expect("prompts");
    let before = d.metric("tandem_kv_received_bytes_total").await;
    let (again, _) = stream(&e, greedy(long, 6), usize::MAX, || async {}).await;
    assert_eq!(&again, &split[prompts.iter().position(|(n, _)| n == name).expect("index")]);
    let tail = (d.metric("tandem_kv_received_bytes_total").await - before) / kv_bytes_per_token;
    assert!(tail < 16.0, "{name}: only the positions after D's cached prefix cross ({tail} of {})", long.len());

    // Layer l's K/V was on its way before layer l + 1 had finished computing.
    let timings = chunk_timings(&p.log(dir.path(), "p"));
    let mut pairs = 0;
    let mut overlapped = 0;
    for a in &timings {
        if let Some(b) = timings.iter().find(|b| b.0 == a.0 && b.2 == a.2 && b.1 == a.1 + 1) {
            pairs += 1;
            overlapped += usize::from(a.4 < b.3);
        }
    }
    println!("K/V chunk pairs whose send began before the next layer was ready: {overlapped} of {pairs}");
    assert!(pairs >= 29 * prompts.len(), "every layer's chunks were logged: {pairs}");
    // lavapipe finishes a step's layers in bursts, so only some pairs show it here; on a GPU
    // nearly the whole transfer hides behind compute (scripts/bench-disagg-gpu).
    assert!(overlapped > 0, "sending overlaps compute: {overlapped} of {pairs}");
    let sessions: std::collections::HashSet<&String> = timings.iter().map(|t| &t.0).collect();
    let streamed = sessions
        .iter()
        .filter(|s| {
            let mine: Vec<_> = timings.iter().filter(|t| &&t.0 == *s).collect();
            let first_send = mine.iter().filter(|t| t.1 == 0).map(|t| t.4).fold(f64::MAX, f64::min);
            let last_ready = mine.iter().map(|t| t.3).fold(0.0, f64::max);
            first_send < last_ready
        })
        .count();
    println!("requests whose first layer left before their last layer was computed: {streamed} of {}", sessions.len());
    assert!(streamed > 0, "layers stream while later ones compute");

    // The cluster view carries the transfer figures.
    let cluster = e.get("/v1/cluster").await;
    let dn = cluster["nodes"].as_array().expect("nodes").iter().find(|n| n["peer_id"] == d.peer_id.as_str()).expect("d").clone();
    assert!(dn["load"]["kv_received_bytes"].as_f64().is_some_and(|b| b > 0.0), "{dn}");
    assert!(dn["load"]["split_requests"].as_u64().is_some_and(|n| n >= prompts.len() as u64), "{dn}");
}

// Q4_0: in Q4_1 the tiny model's random weights continued every prompt tried with one repeated token.
const TINY: &str = "synthetic:tiny:q4_0";

fn tiny(prompt: &[u32], max_tokens: usize) -> Value {
    json!({ "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true })
}

fn tiny_node(role: &str, extra: &[&str], dir: &std::path::Path, name: &str) -> Node {
    let mut args = vec!["--model", TINY, "--role", role, "--context", "2048", "--kv-memory", "64MiB", "--shutdown-grace", "20"];
    args.extend_from_slice(extra);
    Node::start(&args, dir, name)
}

/// Which of `nodes` is running a request now.
async fn running_on<'a>(nodes: &[&'a Node]) -> Option<&'a Node> {
    for n in nodes {
        if n.metric("tandem_requests_running").await > 0.0 {
            return Some(n);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn long_prompts_killed_nodes_drains_and_a_vanished_entry_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path();
    let p = tiny_node("prefill", &["--placement", "colocated"], path, "p");
    let d1 = tiny_node("decode", &["--peer", &p.addr()], path, "d1");
    let d2 = tiny_node("decode", &["--peer", &p.addr()], path, "d2");
    let e = Node::start(&["--role", "observer", "--placement", "split", "--peer", &p.addr()], path, "e");
    for n in [&p, &d1, &d2] {
        n.wait_ready().await;
    }
    for n in [&p, &d1, &d2, &e] {
        n.wait_until_sees(&[&p, &d1, &d2, &e], Duration::from_secs(60)).await;
    }

    // A 1,500-token prompt crosses completely, and decodes as on one node.
    let long: Vec<u32> = (0..1500u32).map(|i| (i * 7 + 3) % 500).collect();
    let (split_text, n) = stream(&e, tiny(&long, 16), usize::MAX, || async {}).await;
    assert_eq!(n, 16);
    let (single_text, _) = stream(&p, tiny(&long, 16), usize::MAX, || async {}).await;
    assert_eq!(split_text, single_text, "a long prompt split equals one node's run");
    let imported = d1.metric("tandem_kv_imported_tokens_total").await + d2.metric("tandem_kv_imported_tokens_total").await;
    assert_eq!(imported, 1500.0, "all 1,500 positions were imported");
    let bytes = d1.metric("tandem_kv_received_bytes_total").await + d2.metric("tandem_kv_received_bytes_total").await;
    // f16 K and V (the caches' dtype), every layer, every position.
    assert_eq!(bytes, 1500.0 * 2.0 * 2.0 * 64.0 * 2.0);

    // The uninterrupted run of a long generation.
    let prompt: Vec<u32> = (0..40u32).map(|i| (i * 13 + 5) % 500).collect();
    let (want, _) = stream(&p, tiny(&prompt, 1500), usize::MAX, || async {}).await;

    // kill -9 of the decode node mid-generation: the client still gets every token, once.
    let mut killed = None;
    let killed_ref = &mut killed;
    let (d1r, d2r) = (&d1, &d2);
    let (got, n) = stream(&e, tiny(&prompt, 1500), 20, move || async move {
        let victim = running_on(&[d1r, d2r]).await.expect("a decode node is running it");
        *killed_ref = Some(victim.peer_id.clone());
        let _ = std::process::Command::new("kill").args(["-9", &victim.child.id().to_string()]).status();
    })
    .await;
    assert_eq!(n, 1500);
    assert!(got == want, "after kill -9 of the decode node the text equals an uninterrupted run");
    let survivor = if killed.as_deref() == Some(d1.peer_id.as_str()) { &d2 } else { &d1 };
    assert!(
        survivor.metric("tandem_resumed_requests_total").await >= 1.0,
        "the other decode node resumed it\n{}",
        e.log(path, "e").lines().filter(|l| l.contains("WARN") || l.contains("contin")).collect::<Vec<_>>().join("\n")
    );

    // Drain the decode node mid-generation: its request moves, K/V and all, to the other decode
    // node, which continues it without prefilling again.
    let d3 = tiny_node("decode", &["--peer", &p.addr()], path, "d3");
    d3.wait_ready().await;
    wait_for("e sees d3", Duration::from_secs(30), async || e.sees().await.contains(&d3.peer_id)).await;
    wait_for("the survivor sees d3", Duration::from_secs(30), async || survivor.sees().await.contains(&d3.peer_id)).await;
    let computed_before =
        [survivor.metric("tandem_prefill_computed_tokens_total").await, d3.metric("tandem_prefill_computed_tokens_total").await];
    let have_before = [
        survivor.metric("tandem_kv_imported_tokens_total").await + survivor.metric("tandem_prefix_cache_hit_tokens_total").await,
        d3.metric("tandem_kv_imported_tokens_total").await + d3.metric("tandem_prefix_cache_hit_tokens_total").await,
    ];
    let mut drained = None;
    let drained_ref = &mut drained;
    let d3r = &d3;
    let (got, n) = stream(&e, tiny(&prompt, 1500), 20, move || async move {
        let on = running_on(&[survivor, d3r]).await.expect("a decode node is running it");
        let r = on.post("/v1/drain", json!({})).await;
        assert_eq!(r["moving"], true, "{r}");
        *drained_ref = Some(on);
    })
    .await;
    assert_eq!(n, 1500);
    assert!(got == want, "after a drain mid-generation the text equals an uninterrupted run");
    let from = drained.expect("drained a node");
    let (to, k) = if from.peer_id == d3.peer_id { (survivor, 0) } else { (&d3, 1) };
    assert_eq!(to.metric("tandem_migrated_in_requests_total").await, 1.0);
    let computed = to.metric("tandem_prefill_computed_tokens_total").await - computed_before[k];
    assert_eq!(computed, 0.0, "the new node prefilled nothing: it continued from the moved K/V");
    let have =
        to.metric("tandem_kv_imported_tokens_total").await + to.metric("tandem_prefix_cache_hit_tokens_total").await - have_before[k];
    assert!(have > prompt.len() as f64 + 20.0, "the new node took the prompt's and the generated tokens' K/V ({have})");
    assert_eq!(from.metric("tandem_migrated_out_requests_total").await, 1.0);
    from.post("/v1/drain", json!({ "drain": false })).await;

    // The prefill node stalls (SIGSTOP) as a request arrives: the decode node gives up on it and
    // prefills itself.
    let short = &long[..300];
    let (want_short, _) = stream(&p, tiny(short, 16), usize::MAX, || async {}).await;
    let _ = std::process::Command::new("kill").args(["-STOP", &p.child.id().to_string()]).status();
    let (got, _) = stream(&e, tiny(short, 16), usize::MAX, || async {}).await;
    assert_eq!(got, want_short, "with the prefill node gone, a decode node serves the request alone");
    let fallbacks = survivor.metric("tandem_split_fallbacks_total").await + d3.metric("tandem_split_fallbacks_total").await;
    println!("split fallbacks after the prefill node stalled: {fallbacks}");

    // The entry node vanishes mid-generation: the decode node frees everything.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let e_http = e.http.clone();
    let body = tiny(&prompt, 1500);
    let client = tokio::spawn(async move {
        let resp = reqwest::Client::new().post(format!("{e_http}/v1/completions")).json(&body).send().await;
        let _ = tx.send(());
        drop(resp);
    });
    wait_for("the request runs on a decode node", Duration::from_secs(60), async || running_on(&[survivor, d3r]).await.is_some()).await;
    let mut e = e;
    let _ = e.child.kill();
    let _ = e.child.wait();
    let _ = rx.await;
    let _ = client.await;
    for n in [survivor, &d3] {
        wait_for("the decode node frees the request", Duration::from_secs(30), async || {
            n.metric("tandem_requests_running").await == 0.0 && n.metric("tandem_kv_blocks_used").await == 0.0
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prefill_node_and_a_decode_node_of_different_adapter_types_pair_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path();
    // The same F16 weights; P reads them with WGSL f16, D (TANDEM_DISABLE_F16) from 32-bit words:
    // two kernel sets, as on an f16-capable GPU and one without.
    let model = ["--model", "synthetic:tiny:f16", "--context", "2048", "--kv-memory", "64MiB"];
    let p = Node::start(&[&model[..], &["--role", "prefill", "--placement", "colocated"]].concat(), path, "p");
    let d = Node::start_env(&[&model[..], &["--role", "decode", "--peer", &p.addr()]].concat(), &[("TANDEM_DISABLE_F16", "1")], path, "d");
    let e = Node::start(&["--role", "observer", "--placement", "split", "--peer", &p.addr(), "--peer", &d.addr()], path, "e");
    p.wait_ready().await;
    d.wait_ready().await;
    for n in [&p, &d, &e] {
        n.wait_until_sees(&[&p, &d, &e], Duration::from_secs(60)).await;
    }
    assert!(p.plain_log(path, "p").contains("f16=true"), "P runs the f16 kernels");
    assert!(d.plain_log(path, "d").contains("f16=false"), "D runs the f16-free kernels");

    let prompt: Vec<u32> = (0..300u32).map(|i| (i * 11 + 7) % 500).collect();
    let (text, n) = stream(&e, tiny(&prompt, 24), usize::MAX, || async {}).await;
    assert_eq!(n, 24, "the split request completed");
    assert!(!text.is_empty());
    assert_eq!(d.metric("tandem_split_requests_total").await, 1.0);
    assert_eq!(d.metric("tandem_kv_imported_tokens_total").await, 300.0, "D decoded from P's K/V");
    assert_eq!(d.metric("tandem_split_fallbacks_total").await, 0.0);
    // Each adapter type on its own: the f32 K/V on the wire is exact, so the split text differs
    // from D's own run only where the two kernel sets' prefill K/V differ in rounding.
    let (alone_p, _) = stream(&p, tiny(&prompt, 24), usize::MAX, || async {}).await;
    println!("split (f16 prefill, f16-free decode): {:?}\nP alone (f16): {:?}", text, alone_p);
}
