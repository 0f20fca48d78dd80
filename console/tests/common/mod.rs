//! Cluster snapshots of any size, shaped like real ones (the same structs the mesh fills).
#![allow(dead_code)]

use tandem_mesh::{
    AdapterAd, ClusterSnapshot, KvLinkRate, Link, LoadReport, MeshEvent, MeshEventKind, ModelAd, NodeSnapshot, RequestTrace, Role, Speed,
};

/// A peer id-like name for node `i` whose last six characters are unique.
pub fn peer(i: usize) -> String {
    format!("12D3KooWtestnode{i:06}")
}

pub fn role_of(i: usize) -> Role {
    match i % 10 {
        0..=2 => Role::Prefill,
        3..=7 => Role::Decode,
        8 => Role::Both,
        _ => Role::Observer,
    }
}

/// `n` nodes at second `t`: prefill nodes stream K/V to decode nodes, each decode node reports
/// one trace per second, node 1 reports a re-placement.
pub fn snapshot(n: usize, t: u64) -> ClusterSnapshot {
    let nodes = (0..n)
        .map(|i| {
            let role = role_of(i);
            let serving = role != Role::Observer;
            let prefill = (0..n).filter(|j| role_of(*j) == Role::Prefill).nth(i % 3);
            let load = LoadReport {
                peer_id: peer(i),
                running: if serving { (i % 7) as u64 } else { 0 },
                waiting: (i % 3) as u64,
                kv_blocks_total: if serving { 1000 } else { 0 },
                kv_blocks_free: if serving { 1000 - (i as u64 * 37 % 1000) } else { 0 },
                tokens_per_s: if serving { 10.0 + i as f64 } else { 0.0 },
                ttft_p50_ms: serving.then_some(100.0 + i as f64),
                kv_links: match (role, prefill) {
                    (Role::Decode, Some(p)) => {
                        vec![KvLinkRate { from: peer(p), bytes_per_s: 3e8, bytes: t * 50_000_000 * (1 + i as u64 % 2) }]
                    }
                    _ => vec![],
                },
                recent: if role == Role::Decode {
                    vec![RequestTrace {
                        id: t,
                        arrived_ms: 1_700_000_000_000 + t * 1000,
                        model: "smollm2-135m".into(),
                        prompt_tokens: 512,
                        output_tokens: 64,
                        queue_ms: 0.0,
                        prefill_peer: prefill.map(peer),
                        prefill: [0.0, 80.0 + i as f64],
                        kv: Some([10.0, 85.0 + i as f64]),
                        decode: [90.0 + i as f64, 90.0 + i as f64 + 63.0 * 20.0],
                        outcome: "length".into(),
                    }]
                } else {
                    vec![]
                },
                ..Default::default()
            };
            NodeSnapshot {
                peer_id: peer(i),
                is_self: i == n - 1,
                connected: true,
                last_heard_ms: 100,
                role: Some(role),
                auto_role: i % 4 == 0,
                version: Some("0.1.0".into()),
                adapter: Some(AdapterAd {
                    name: if i % 2 == 0 { "NVIDIA H100 80GB HBM3".into() } else { "llvmpipe (LLVM 15.0.6, 256 bits)".into() },
                    vendor: "0x10de".into(),
                    backend: "Vulkan".into(),
                    device_type: "DiscreteGpu".into(),
                    memory_bytes: Some(80 << 30),
                }),
                speed: Some(Speed { gflops: 100.0 + (i * 13 % 200) as f64, gbps: 50.0 + (i * 7 % 100) as f64 }),
                models: if serving {
                    vec![ModelAd { id: "smollm2-135m".into(), fingerprint: "f".into(), parameters: 1, ..Default::default() }]
                } else {
                    vec![]
                },
                http: Some(format!("http://127.0.0.1:{}", 8000 + i)),
                addresses: vec![],
                load: Some(load),
                distrusted_models: vec![],
            }
        })
        .collect();
    ClusterSnapshot {
        self_id: peer(n - 1),
        nodes,
        links: (1..n).map(|i| Link { a: peer(0), b: peer(i) }).collect(),
        events: vec![MeshEvent { at_ms: 1_700_000_000_000, kind: MeshEventKind::Joined, peer_id: peer(0), detail: "role prefill".into() }],
        chains: vec![],
    }
}
