//! Real swarms over loopback TCP in one process: discovery through a bootstrap peer and Kademlia,
//! ads and load reports in each other's views, a private mesh refusing a node with another key,
//! and a framed stream between two nodes.

use std::time::Duration;

use tandem_mesh::{
    CapabilityAd, FrameLimits, FramedStream, LoadReport, Mesh, MeshConfig, MeshHandle, MeshSecret, Multiaddr, Role, StreamProtocol,
};

fn config(secret: Option<&MeshSecret>, bootstrap: Vec<Multiaddr>) -> MeshConfig {
    let mut cfg = MeshConfig::new(libp2p_identity_keypair());
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")];
    cfg.bootstrap = bootstrap;
    cfg.secret = secret.copied();
    cfg.mdns = false;
    cfg
}

fn libp2p_identity_keypair() -> libp2p::identity::Keypair {
    libp2p::identity::Keypair::generate_ed25519()
}

async fn start(cfg: MeshConfig) -> (MeshHandle, Multiaddr) {
    let mesh = Mesh::start(cfg).expect("mesh starts");
    let mut rx = mesh.listening();
    let addr = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(a) = rx.borrow().first().cloned() {
                return a;
            }
            rx.changed().await.expect("listening");
        }
    })
    .await
    .expect("listens");
    let full = addr.with(libp2p::multiaddr::Protocol::P2p(mesh.peer_id()));
    mesh.set_capability(CapabilityAd { role: Role::Both, version: "test".into(), ..Default::default() }).await.expect("ad");
    (mesh, full)
}

/// Waits until `mesh` holds ads of `n` nodes (itself included), all directly connected.
async fn wait_for(mesh: &MeshHandle, n: usize) -> bool {
    for _ in 0..100 {
        let snap = mesh.snapshot();
        if snap.nodes.iter().filter(|x| x.role.is_some() && x.connected).count() >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_find_each_other_through_one_bootstrap_peer() {
    let (b, b_addr) = start(config(None, vec![])).await;
    let (c, _) = start(config(None, vec![b_addr.clone()])).await;
    // A is told of B only; it must learn of C (Kademlia, or C's ad relayed by B).
    let (a, _) = start(config(None, vec![b_addr])).await;
    for (name, m) in [("a", &a), ("b", &b), ("c", &c)] {
        assert!(wait_for(m, 3).await, "{name} sees all three: {:#?}", m.snapshot().nodes);
    }
    c.publish_load(LoadReport { running: 7, kv_blocks_total: 10, ..Default::default() }).await.expect("load");
    let mut seen = false;
    for _ in 0..50 {
        let snap = a.snapshot();
        if snap.nodes.iter().any(|n| n.peer_id == c.peer_id().to_string() && n.load.as_ref().is_some_and(|l| l.running == 7)) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "a sees c's load report");
    // C leaves gracefully: the others forget it at once, with a `left` event.
    c.leave("test over").await.expect("leave");
    let mut gone = false;
    for _ in 0..30 {
        let snap = a.snapshot();
        if !snap.nodes.iter().any(|n| n.peer_id == c.peer_id().to_string()) {
            gone = snap.events.iter().any(|e| e.peer_id == c.peer_id().to_string() && format!("{:?}", e.kind) == "Left");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "a forgot c after its leaving message: {:#?}", a.snapshot().events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_connect_over_quic() {
    let quic = |bootstrap| {
        let mut cfg = config(None, bootstrap);
        cfg.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr")];
        cfg
    };
    let (b, b_addr) = start(quic(vec![])).await;
    assert!(b_addr.to_string().contains("/quic-v1/"), "{b_addr}");
    let (a, _) = start(quic(vec![b_addr])).await;
    assert!(wait_for(&a, 2).await && wait_for(&b, 2).await, "a and b see each other over QUIC");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_mesh_refuses_quic_addresses() {
    let key = MeshSecret::parse(&"11".repeat(32), "test").expect("key");
    let mut cfg = config(Some(&key), vec![]);
    cfg.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("addr")];
    let e = Mesh::start(cfg).expect_err("pnet has no QUIC");
    assert!(e.to_string().contains("TCP only"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_mesh_secret_cannot_join() {
    let key = MeshSecret::parse(&"11".repeat(32), "test").expect("key");
    let other = MeshSecret::parse(&"22".repeat(32), "test").expect("key");
    let (b, b_addr) = start(config(Some(&key), vec![])).await;
    let (good, _) = start(config(Some(&key), vec![b_addr.clone()])).await;
    let (bad, _) = start(config(Some(&other), vec![b_addr.clone()])).await;
    let (open, _) = start(config(None, vec![b_addr])).await;
    assert!(wait_for(&good, 2).await, "same key joins");
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (name, m) in [("wrong key", &bad), ("no key", &open)] {
        assert_eq!(m.snapshot().nodes.len(), 1, "{name}: sees only itself");
    }
    assert_eq!(b.snapshot().nodes.len(), 2, "b sees only the node with its key: {:#?}", b.snapshot().nodes);
    assert!(b.snapshot().events.iter().any(|e| format!("{:?}", e.kind) == "Refused"), "b's log says it refused someone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framed_streams_carry_messages_and_trailers_between_nodes() {
    const PROTO: StreamProtocol = StreamProtocol::new("/tandem/test/1");
    let limits = FrameLimits { max_frame: 1 << 20, read_timeout: Duration::from_secs(5), write_timeout: Duration::from_secs(5) };
    let (b, b_addr) = start(config(None, vec![])).await;
    let (a, _) = start(config(None, vec![b_addr])).await;
    assert!(wait_for(&a, 2).await);
    let mut incoming = b.accept(PROTO).expect("accept");
    let server = tokio::spawn(async move {
        use futures_util::StreamExt;
        let (_peer, stream) = incoming.next().await.expect("a stream");
        let mut s = FramedStream::new(stream, limits);
        let mut got = Vec::new();
        while let Some(f) = s.recv().await.expect("clean frames") {
            got.push(f);
        }
        s.send(&[got.len() as u8]).await.expect("reply");
        s.finish().await.expect("trailer");
        got
    });
    let stream = a.open_stream(b.peer_id(), PROTO).await.expect("open");
    let mut s = FramedStream::new(stream, limits);
    s.send(b"x").await.expect("send");
    s.send(&vec![1u8; 1 << 20]).await.expect("send 1 MiB");
    s.finish().await.expect("finish");
    assert_eq!(s.recv().await.expect("reply"), Some(vec![2]));
    assert_eq!(s.recv().await.expect("trailer"), None);
    assert_eq!(server.await.expect("server").len(), 2);
}
