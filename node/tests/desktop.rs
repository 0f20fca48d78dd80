//! The desktop app's window driven like a person would (egui_kittest), without a node running:
//! the orders it queues are what the runner carries out.

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use tandem_mesh::{AdapterAd, ClusterSnapshot, LoadReport, ModelAd, NodeSnapshot, Role, Speed};
use tandem_node::desktop::{ChatLine, ChatTarget, DesktopState, NodeStatus, Order, Settings, view};

fn harness(state: DesktopState) -> Harness<'static, DesktopState> {
    Harness::builder().with_size([1400.0, 860.0]).build_ui_state(|ui, s: &mut DesktopState| view(ui, s, &mut None), state)
}

fn me() -> ClusterSnapshot {
    ClusterSnapshot {
        self_id: "12D3KooWdesktop".into(),
        nodes: vec![NodeSnapshot {
            peer_id: "12D3KooWdesktop".into(),
            is_self: true,
            connected: true,
            last_heard_ms: 0,
            role: Some(Role::Both),
            auto_role: true,
            version: None,
            adapter: Some(AdapterAd {
                name: "Radeon RX 7900".into(),
                backend: "Vulkan".into(),
                device_type: "DiscreteGpu".into(),
                ..Default::default()
            }),
            speed: Some(Speed { gflops: 4000.0, gbps: 600.0 }),
            models: vec![ModelAd { id: "smollm2-135m".into(), fingerprint: "f".into(), parameters: 1, ..Default::default() }],
            http: None,
            addresses: vec![],
            load: Some(LoadReport { running: 2, kv_blocks_total: 100, kv_blocks_free: 75, ..Default::default() }),
            distrusted_models: vec![],
        }],
        links: vec![],
        events: vec![],
        chains: vec![],
    }
}

#[test]
fn start_shows_the_node_then_the_chat_sends_the_conversation() {
    let settings = Settings { role: Role::Decode, peers: "/ip4/10.0.0.2/tcp/4001".into(), ..Default::default() };
    let mut h = harness(DesktopState::new(settings.clone()));
    h.run_steps(2);
    h.get_by_label("stopped");
    h.get_by_label("Start").click();
    h.run_steps(2);
    assert_eq!(h.state().orders, vec![Order::Start(settings)]);
    assert_eq!(h.state().status, NodeStatus::Starting);
    h.state_mut().orders.clear();

    // The runner reports the node up, and its view of the mesh.
    {
        let s = h.state_mut();
        s.status = NodeStatus::Running;
        s.peer_id = Some("12D3KooWdesktop".into());
        s.cluster.apply(&me(), 0.0);
    }
    h.run_steps(2);
    h.get_by_label("Radeon RX 7900 (Vulkan, DiscreteGpu)");
    h.get_by_label("4000 GFLOP/s · 600 GB/s");
    h.get_by_label("25% of 100 blocks");

    h.get_by_label("through the mesh").click();
    h.run_steps(1);
    h.state_mut().input = "Hello there".into();
    h.get_by_label("Send").click();
    h.run_steps(2);
    let asked = vec![ChatLine { user: true, text: "Hello there".into() }];
    assert_eq!(h.state().orders, vec![Order::Chat { target: ChatTarget::Mesh, messages: asked }]);
    assert!(h.state().answering);
    h.state_mut().answer_piece("General ");
    h.state_mut().answer_piece("Kenobi.");
    h.state_mut().answer_done(None);
    h.run_steps(2);
    h.get_by_label("General Kenobi.");

    h.get_by_label("Stop").click();
    h.run_steps(2);
    assert_eq!(h.state().orders.last(), Some(&Order::Stop));
    assert_eq!(h.state().status, NodeStatus::Stopping);
}

#[test]
fn fetching_shows_its_progress_and_settings_survive_a_restart() {
    let mut s = DesktopState::new(Settings::default());
    s.status = NodeStatus::Fetching { step: "extracting".into(), done: 50_000_000, total: 200_000_000 };
    let mut h = harness(s);
    h.run_steps(2);
    h.get_by_label("50 MB of 200 MB");
    assert!(h.query_by_label("Start").is_some());

    /// eframe's storage, in memory.
    #[derive(Default)]
    struct Memory(std::collections::HashMap<String, String>);
    impl eframe::Storage for Memory {
        fn get_string(&self, key: &str) -> Option<String> {
            self.0.get(key).cloned()
        }
        fn set_string(&mut self, key: &str, value: String) {
            self.0.insert(key.into(), value);
        }
        fn remove_string(&mut self, key: &str) {
            self.0.remove(key);
        }
        fn flush(&mut self) {}
    }
    let chosen = Settings {
        model: "/models/llama.gguf".into(),
        role: Role::Prefill,
        mesh_secret_file: "/etc/tandem/swarm.key".into(),
        ..Default::default()
    };
    let mut storage = Memory::default();
    eframe::set_value(&mut storage, eframe::APP_KEY, &chosen);
    assert_eq!(eframe::get_value::<Settings>(&storage, eframe::APP_KEY), Some(chosen));
}
