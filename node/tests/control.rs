//! The console's side of the mesh against real nodes in separate processes: it joins as an
//! observer, sees the nodes and the traces of the requests they serve, and its signed orders flip
//! a node's role and drain it, but only with the mesh's secret.

mod common;

use std::time::{Duration, Instant};

use common::Node;
use serde_json::json;
use tandem_console::source::{SourceConfig, Update, send_order, start};
use tandem_console::state::{ClusterState, ControlOrder};
use tandem_mesh::{ControlCommand, ControlReply, MeshSecret, Role};

fn tiny_node(extra: &[&str], dir: &std::path::Path, name: &str) -> Node {
    let mut args = vec!["--model", "synthetic:tiny:q4_0", "--role", "both", "--context", "1024", "--kv-memory", "32MiB"];
    args.extend_from_slice(extra);
    Node::start(&args, dir, name)
}

/// Waits for the first update that `f` accepts.
fn wait_for<T>(updates: &std::sync::mpsc::Receiver<Update>, what: &str, mut f: impl FnMut(Update) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let u = updates.recv_timeout(left).unwrap_or_else(|_| panic!("no {what} within 60 s"));
        if let Some(t) = f(u) {
            return t;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_sees_the_mesh_and_commands_nodes_only_with_the_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("swarm.key");
    let secret = tandem_mesh::generate_secret(&key).expect("keygen");
    let key_arg = key.to_str().expect("utf-8 path");
    let a = tiny_node(&["--mesh-secret-file", key_arg], dir.path(), "a");
    let b = tiny_node(&["--mesh-secret-file", key_arg, "--peer", &a.addr()], dir.path(), "b");
    a.wait_ready().await;
    b.wait_ready().await;

    let (feed, info) = start(
        SourceConfig::Mesh { listen: vec![], peers: vec![a.addr().parse().expect("addr")], secret: Some(secret), mdns: false },
        || {},
    )
    .expect("console feed");
    assert!(info.can_control);
    let mut state = ClusterState::new(info);
    let t0 = Instant::now();
    // A node's capability ad (its models, its measured speed) and its load reports (its cache)
    // arrive as separate messages, so the snapshot waited for has both.
    wait_for(&feed.updates, "a snapshot with both nodes, a's speed and its cache", |u| match u {
        Update::Snapshot(s) => {
            state.apply(&s, t0.elapsed().as_secs_f64());
            let serving = state.nodes.values().filter(|n| !n.models.is_empty()).count();
            let reported = state.nodes.get(&a.peer_id).is_some_and(|n| n.kv_blocks_total > 0 && n.gflops > 0.0);
            (serving == 2 && reported).then_some(())
        }
        _ => None,
    });
    // The test nodes run --deterministic, which the console shows beside the model.
    assert_eq!(state.nodes[&a.peer_id].models, vec!["tiny (deterministic)".to_string()]);

    // A request served by b shows up in the console's timeline with its timings.
    let body = json!({ "model": "tiny", "prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 5, "temperature": 0, "ignore_eos": true });
    let r = reqwest::Client::new()
        .post(format!("{}/v1/completions", b.http))
        .header("x-tandem-placement", "local")
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let trace = wait_for(&feed.updates, "the request's trace", |u| match u {
        Update::Snapshot(s) => {
            state.apply(&s, t0.elapsed().as_secs_f64());
            state.traces.iter().find(|t| t.node == b.peer_id).cloned()
        }
        _ => None,
    });
    assert_eq!((trace.trace.prompt_tokens, trace.trace.output_tokens, trace.trace.outcome.as_str()), (8, 5, "length"));
    let [d0, d1] = trace.trace.decode;
    assert!(trace.trace.prefill[0] <= trace.trace.prefill[1] && trace.trace.prefill[1] <= d0 + 1e-6 && d0 <= d1, "{trace:?}");

    // A signed order flips a's role, and drains and undrains it.
    for (command, role, draining) in [
        (ControlCommand::SetRole { role: Role::Prefill }, Role::Prefill, false),
        (ControlCommand::Drain { drain: true }, Role::Prefill, true),
        (ControlCommand::Drain { drain: false }, Role::Prefill, false),
    ] {
        let order = ControlOrder { target: a.peer_id.clone(), command };
        feed.send(order.clone());
        let reply = wait_for(&feed.updates, "the node's answer", |u| match u {
            Update::Reply(o, r) if o == order => Some(r),
            _ => None,
        });
        assert_eq!(reply, Ok(ControlReply::Done { role, draining }), "{command}");
        let now = a.get("/v1/role").await;
        assert_eq!((now["role"].as_str(), now["draining"].as_bool()), (Some(role.to_string().as_str()), Some(draining)), "{command}");
    }
    // The flip shows in the view, and a's report of the commands in the console's log.
    wait_for(&feed.updates, "the role change and the commands in the console's view", |u| match u {
        Update::Snapshot(s) => {
            state.apply(&s, t0.elapsed().as_secs_f64());
            let reported = state.events.iter().filter(|e| e.kind == tandem_mesh::MeshEventKind::Control).count();
            (state.nodes[&a.peer_id].role == Some(Role::Prefill) && reported == 3).then_some(())
        }
        _ => None,
    });
    assert!(state.events.iter().any(|e| e.detail.starts_with("set role prefill on")), "{:?}", state.events);

    // Another secret cannot even connect to this mesh.
    let stranger = MeshSecret::parse(&"ab".repeat(32), "test").expect("secret");
    let (other, _) = start(
        SourceConfig::Mesh { listen: vec![], peers: vec![a.addr().parse().expect("addr")], secret: Some(stranger), mdns: false },
        || {},
    )
    .expect("console feed");
    let order = ControlOrder { target: a.peer_id.clone(), command: ControlCommand::Drain { drain: true } };
    other.send(order.clone());
    let reply = wait_for(&other.updates, "the failed delivery", |u| match u {
        Update::Reply(_, r) => Some(r),
        _ => None,
    });
    assert!(reply.is_err(), "{reply:?}");
    assert_eq!(a.get("/v1/role").await["draining"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_without_a_mesh_secret_refuses_every_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = tiny_node(&[], dir.path(), "open");
    a.wait_ready().await;
    let mut cfg = tandem_mesh::MeshConfig::new(tandem_mesh::Keypair::generate_ed25519());
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    cfg.bootstrap = vec![a.addr().parse().expect("addr")];
    cfg.mdns = false;
    let mesh = tandem_mesh::Mesh::start(cfg).expect("mesh");
    // Whatever key it was signed with, an open mesh's node takes no orders.
    let anyone = MeshSecret::parse(&"cd".repeat(32), "test").expect("secret");
    let order = ControlOrder { target: a.peer_id.clone(), command: ControlCommand::SetRole { role: Role::Decode } };
    let deadline = Instant::now() + Duration::from_secs(30);
    let reply = loop {
        match send_order(&mesh, &anyone, &order).await {
            Ok(r) => break r,
            Err(e) => assert!(Instant::now() < deadline, "never reached the node: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    match reply {
        ControlReply::Refused { message } => assert!(message.contains("no mesh secret"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(a.get("/v1/role").await["role"], "both");
}
