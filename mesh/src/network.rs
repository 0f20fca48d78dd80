//! The swarm: one task owns it (as in libp2p's file-sharing example); everything else holds a
//! cloneable [`MeshHandle`] that sends commands over a bounded channel, reads the shared
//! [`ClusterView`], and opens or accepts direct streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use libp2p::core::transport::upgrade::Version;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, Transport, allow_block_list, connection_limits, gossipsub, identify, identity, kad, mdns,
    noise, ping, pnet, tcp, yamux,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::cluster::{ClusterSnapshot, ClusterView, MeshEventKind};
use crate::error::{Error, Result};
use crate::handshakes::{HandshakeLimit, TooManyHandshakes, ip_of};
use crate::lan::LanPeers;
use crate::messages::{CapabilityAd, GossipMessage, LoadReport, MAX_GOSSIP_BYTES};
use crate::refusals::{REPORT_EVERY, Refusals, Report};
use crate::secret::MeshSecret;

const ID_PROTOCOL: &str = "/tandem/id/1";
const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/tandem/kad/1");
const TOPIC: &str = "tandem/cluster/1";
/// Capability ads are re-sent this often even when nothing changed, so late joiners and peers
/// that missed one converge.
const AD_REFRESH: Duration = Duration::from_secs(10);
const REDIAL: Duration = Duration::from_secs(3);
const KAD_BOOTSTRAP: Duration = Duration::from_secs(30);
const OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// mDNS queries start every 0.5 s and back off by doubling to this (libp2p's default, 5 min, lets
/// two nodes whose first packets cross at start-up miss each other for minutes). A query is also
/// an announcement: every node answers it, the asker included, and answers go to the whole group.
const MDNS_QUERY_INTERVAL: Duration = Duration::from_secs(20);
/// How long others keep our mDNS record: a node that vanished is forgotten within it.
const MDNS_TTL: Duration = Duration::from_secs(60);

/// How a node joins the mesh.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    pub keypair: identity::Keypair,
    /// Listen addresses; empty for all interfaces on a free TCP port (and QUIC, unless private).
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start and whenever they are not connected, with or without `/p2p/ID`.
    pub bootstrap: Vec<Multiaddr>,
    /// A private mesh's pre-shared key (TCP only: QUIC has no pnet).
    pub secret: Option<MeshSecret>,
    /// The only peers allowed to connect, if not empty.
    pub allow: Vec<PeerId>,
    pub mdns: bool,
    /// Ping interval; a peer that misses pings for `ping_timeout` is disconnected.
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// A node not heard of for this long is dropped from the view.
    pub node_timeout: Duration,
}

impl MeshConfig {
    pub fn new(keypair: identity::Keypair) -> Self {
        MeshConfig {
            keypair,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            secret: None,
            allow: Vec::new(),
            mdns: true,
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(3),
            node_timeout: Duration::from_secs(6),
        }
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    allow: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    handshakes: HandshakeLimit,
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    gossipsub: gossipsub::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    mdns: Toggle<mdns::tokio::Behaviour>,
    stream: libp2p_stream::Behaviour,
}

enum Command {
    Capability(Box<CapabilityAd>),
    Load(Box<LoadReport>),
    Leave(String, oneshot::Sender<()>),
}

/// A handle on the running mesh.
#[derive(Clone)]
pub struct MeshHandle {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    view: Arc<RwLock<ClusterView>>,
    control: libp2p_stream::Control,
    listening: watch::Receiver<Vec<Multiaddr>>,
}

impl std::fmt::Debug for MeshHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshHandle").field("peer_id", &self.peer_id).finish()
    }
}

/// Starts meshes.
#[derive(Debug)]
pub struct Mesh;

fn is_quic(a: &Multiaddr) -> bool {
    a.iter().any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

fn behaviour(key: &identity::Keypair, cfg: &MeshConfig) -> std::result::Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer_id = key.public().to_peer_id();
    let gossip_cfg = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(500))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_BYTES + 1024)
        .build()?;
    let gossipsub = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_cfg)?;
    let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
    kad_cfg.set_query_timeout(Duration::from_secs(20));
    let mut kad = kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_cfg);
    // Without AutoNAT nothing confirms an external address, and kad would stay a client that no
    // one adds to their routing table.
    kad.set_mode(Some(kad::Mode::Server));
    let mdns_cfg = mdns::Config { query_interval: MDNS_QUERY_INTERVAL, ttl: MDNS_TTL, ..Default::default() };
    let mdns = if cfg.mdns { Some(mdns::tokio::Behaviour::new(mdns_cfg, peer_id)?) } else { None };
    let allow = (!cfg.allow.is_empty()).then(|| {
        let mut b = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
        for p in &cfg.allow {
            b.allow_peer(*p);
        }
        b
    });
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established_per_peer(Some(4))
        .with_max_pending_incoming(Some(64))
        .with_max_established(Some(1024));
    Ok(Behaviour {
        allow: allow.into(),
        handshakes: HandshakeLimit::default(),
        limits: connection_limits::Behaviour::new(limits),
        identify: identify::Behaviour::new(
            identify::Config::new(ID_PROTOCOL.into(), key.public())
                .with_agent_version(format!("tandem/{}", env!("CARGO_PKG_VERSION")))
                .with_push_listen_addr_updates(true),
        ),
        ping: ping::Behaviour::new(ping::Config::new().with_interval(cfg.ping_interval).with_timeout(cfg.ping_timeout)),
        gossipsub,
        kad,
        mdns: mdns.into(),
        stream: libp2p_stream::Behaviour::new(),
    })
}

fn build_swarm(cfg: &MeshConfig) -> Result<Swarm<Behaviour>> {
    let terr = |e: &dyn std::fmt::Display| Error::Transport(e.to_string());
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(60));
    let builder = libp2p::SwarmBuilder::with_existing_identity(cfg.keypair.clone()).with_tokio();
    let swarm = match cfg.secret {
        Some(MeshSecret { psk, .. }) => builder
            .with_other_transport(|key| {
                let noise = noise::Config::new(key)?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .and_then(move |socket, _| pnet::PnetConfig::new(psk).handshake(socket))
                        .upgrade(Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                        .timeout(Duration::from_secs(20)),
                )
            })
            .map_err(|e| terr(&e))?
            .with_behaviour(|key| behaviour(key, cfg))
            .map_err(|e| terr(&e))?
            .with_swarm_config(idle)
            .build(),
        None => builder
            .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
            .map_err(|e| terr(&e))?
            .with_quic()
            .with_behaviour(|key| behaviour(key, cfg))
            .map_err(|e| terr(&e))?
            .with_swarm_config(idle)
            .build(),
    };
    Ok(swarm)
}

impl Mesh {
    /// Starts the swarm task; returns once it listens (addresses arrive on
    /// [`MeshHandle::listening`]).
    pub fn start(cfg: MeshConfig) -> Result<MeshHandle> {
        let listen = if cfg.listen.is_empty() {
            let mut l: Vec<Multiaddr> =
                vec!["/ip4/0.0.0.0/tcp/0".parse().map_err(|e: libp2p::multiaddr::Error| Error::Transport(e.to_string()))?];
            if cfg.secret.is_none() {
                l.push("/ip4/0.0.0.0/udp/0/quic-v1".parse().map_err(|e: libp2p::multiaddr::Error| Error::Transport(e.to_string()))?);
            }
            l
        } else {
            cfg.listen.clone()
        };
        if cfg.secret.is_some()
            && let Some(a) = listen.iter().chain(&cfg.bootstrap).find(|a| is_quic(a))
        {
            return Err(Error::Address {
                addr: a.to_string(),
                message: "a private mesh (mesh secret) runs over TCP only: pnet has no QUIC".into(),
            });
        }
        let mut swarm = build_swarm(&cfg)?;
        for addr in &listen {
            swarm.listen_on(addr.clone()).map_err(|e| Error::Listen { addr: addr.to_string(), message: e.to_string() })?;
        }
        let topic = gossipsub::IdentTopic::new(TOPIC);
        swarm.behaviour_mut().gossipsub.subscribe(&topic).map_err(|e| Error::Transport(e.to_string()))?;
        let peer_id = *swarm.local_peer_id();
        let control = swarm.behaviour().stream.new_control();
        let view = Arc::new(RwLock::new(ClusterView::new(peer_id, cfg.node_timeout)));
        let (tx, rx) = mpsc::channel(64);
        let (listen_tx, listening) = watch::channel(Vec::new());
        if let Some(s) = &cfg.secret {
            tracing::info!(fingerprint = %s.fingerprint(), "private mesh: only peers with the same mesh secret can connect");
        }
        let task = SwarmTask {
            swarm,
            topic,
            view: view.clone(),
            commands: rx,
            listen_tx,
            bootstrap: cfg.bootstrap.clone(),
            own_ad: None,
            ad_due: false,
            last_ad: Instant::now(),
            left: false,
            allow: cfg.allow.clone(),
            refusals: Refusals::default(),
            lan: LanPeers::default(),
        };
        tokio::spawn(task.run());
        Ok(MeshHandle { peer_id, commands: tx, view, control, listening })
    }
}

impl MeshHandle {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The listen addresses, as they become known.
    pub fn listening(&self) -> watch::Receiver<Vec<Multiaddr>> {
        self.listening.clone()
    }

    /// The shared view (hold the lock briefly).
    pub fn view(&self) -> &Arc<RwLock<ClusterView>> {
        &self.view
    }

    pub fn snapshot(&self) -> ClusterSnapshot {
        match self.view.read() {
            Ok(v) => v.snapshot(),
            Err(p) => p.into_inner().snapshot(),
        }
    }

    /// Runs `f` on the view under its write lock.
    pub fn update_view<R>(&self, f: impl FnOnce(&mut ClusterView) -> R) -> R {
        match self.view.write() {
            Ok(mut v) => f(&mut v),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// Publishes this node's capability ad now (and re-sends it periodically); the mesh fills in
    /// the peer id and listen addresses.
    pub async fn set_capability(&self, ad: CapabilityAd) -> Result<()> {
        self.commands.send(Command::Capability(Box::new(ad))).await.map_err(|_| Error::Stopped)
    }

    /// Publishes a load report; the mesh fills in the peer id and connected peers.
    pub async fn publish_load(&self, load: LoadReport) -> Result<()> {
        self.commands.send(Command::Load(Box::new(load))).await.map_err(|_| Error::Stopped)
    }

    /// Tells the mesh this node is leaving (peers forget it at once) and stops publishing.
    pub async fn leave(&self, reason: &str) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Leave(reason.into(), tx)).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Opens a direct stream to `peer`.
    pub async fn open_stream(&self, peer: PeerId, protocol: StreamProtocol) -> Result<libp2p::Stream> {
        let mut control = self.control.clone();
        let err = |message: String| Error::OpenStream { peer: peer.to_string(), message };
        match tokio::time::timeout(OPEN_STREAM_TIMEOUT, control.open_stream(peer, protocol)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(err(e.to_string())),
            Err(_) => Err(err(format!("no stream within {OPEN_STREAM_TIMEOUT:?}"))),
        }
    }

    /// Inbound streams of `protocol` (once per protocol). Accept promptly: the swarm drops new
    /// streams while the accept loop lags.
    pub fn accept(&self, protocol: StreamProtocol) -> Result<libp2p_stream::IncomingStreams> {
        self.control.clone().accept(protocol).map_err(|e| Error::Transport(e.to_string()))
    }
}

struct SwarmTask {
    swarm: Swarm<Behaviour>,
    topic: gossipsub::IdentTopic,
    view: Arc<RwLock<ClusterView>>,
    commands: mpsc::Receiver<Command>,
    listen_tx: watch::Sender<Vec<Multiaddr>>,
    bootstrap: Vec<Multiaddr>,
    own_ad: Option<CapabilityAd>,
    ad_due: bool,
    last_ad: Instant,
    left: bool,
    allow: Vec<PeerId>,
    refusals: Refusals,
    lan: LanPeers,
}

/// Why one of our behaviours turned a connection away.
fn denial(cause: &libp2p::swarm::ConnectionDenied) -> String {
    if let Some(e) = cause.downcast_ref::<connection_limits::Exceeded>() {
        return format!("refused: {e}");
    }
    if let Some(e) = cause.downcast_ref::<TooManyHandshakes>() {
        return format!("refused: {e}");
    }
    "refused: not on the allow-list".into()
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| if let Protocol::P2p(id) = p { Some(id) } else { None })
}

fn is_loopback(addr: &Multiaddr) -> bool {
    ip_of(addr).is_some_and(|ip| ip.is_loopback())
}

fn is_unspecified(addr: &Multiaddr) -> bool {
    ip_of(addr).is_some_and(|ip| ip.is_unspecified())
}

impl SwarmTask {
    fn with_view<R>(&self, f: impl FnOnce(&mut ClusterView) -> R) -> R {
        match self.view.write() {
            Ok(mut v) => f(&mut v),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    async fn run(mut self) {
        self.dial_bootstrap();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last_redial = Instant::now();
        let mut last_kad = Instant::now();
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_event(event),
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    // Every handle is gone: the node is stopping.
                    None => break,
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    for peer in self.with_view(|v| v.expire(now)) {
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                    if now.duration_since(last_redial) >= REDIAL {
                        last_redial = now;
                        self.dial_bootstrap();
                        self.dial_known_nodes();
                        self.dial_mdns_peers();
                    }
                    if now.duration_since(last_kad) >= KAD_BOOTSTRAP && self.swarm.connected_peers().next().is_some() {
                        last_kad = now;
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                    if self.ad_due || now.duration_since(self.last_ad) >= AD_REFRESH {
                        self.publish_ad();
                    }
                    for report in self.refusals.due(now) {
                        self.report_refusal(report);
                    }
                }
            }
        }
        tracing::debug!("mesh task stopped");
    }

    /// One (local) event, which is also the one log line, for a source's refusals: its first,
    /// then one per window.
    fn report_refusal(&mut self, r: Report) {
        let detail = if r.count == 1 {
            format!("incoming connection failed: {}", r.detail)
        } else {
            format!("{} incoming connections failed in the last {} s; the latest: {}", r.count, REPORT_EVERY.as_secs(), r.detail)
        };
        self.with_view(|v| v.record(MeshEventKind::Refused, r.source, detail));
    }

    fn dial_bootstrap(&mut self) {
        let any_connected = self.swarm.connected_peers().next().is_some();
        for addr in self.bootstrap.clone() {
            let opts = match peer_of(&addr) {
                Some(p) if self.swarm.is_connected(&p) => continue,
                Some(p) => DialOpts::peer_id(p).addresses(vec![addr.clone()]).build(),
                // Without a peer id there is no telling which connection is this address's:
                // dial it while we have no connection at all.
                None if any_connected => continue,
                None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
            };
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%addr, error = %e, "cannot dial a bootstrap peer");
            }
        }
    }

    fn dial_mdns_peers(&mut self) {
        let swarm = &self.swarm;
        for (peer, addrs) in self.lan.due(Instant::now(), |p| swarm.is_connected(p)) {
            tracing::debug!(%peer, "redialling a peer found by mDNS");
            let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build());
        }
    }

    /// Dials nodes we hear of (through gossip relayed by others) but hold no connection to.
    fn dial_known_nodes(&mut self) {
        let me = *self.swarm.local_peer_id();
        let targets: Vec<(PeerId, Vec<Multiaddr>)> = self.with_view(|v| {
            v.nodes()
                .filter(|(p, n)| **p != me && !n.connected)
                .filter_map(|(p, n)| Some((*p, n.ad.as_ref()?.addresses.iter().filter_map(|a| a.parse().ok()).collect())))
                .collect()
        });
        for (peer, addrs) in targets {
            if !self.swarm.is_connected(&peer) && !addrs.is_empty() {
                let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build());
            }
        }
    }

    fn publish(&mut self, msg: &GossipMessage) {
        let bytes = match msg.encode() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a gossip message");
                return;
            }
        };
        match self.swarm.behaviour_mut().gossipsub.publish(self.topic.clone(), bytes) {
            Ok(_) | Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => tracing::debug!(error = %e, "gossip publish"),
        }
    }

    fn publish_ad(&mut self) {
        self.ad_due = false;
        self.last_ad = Instant::now();
        if self.left {
            return;
        }
        let Some(mut ad) = self.own_ad.clone() else { return };
        ad.peer_id = self.swarm.local_peer_id().to_string();
        ad.addresses = self
            .swarm
            .listeners()
            .filter(|a| !is_unspecified(a))
            .chain(self.swarm.external_addresses())
            .map(ToString::to_string)
            .take(16)
            .collect();
        ad.addresses.sort();
        ad.addresses.dedup();
        self.with_view(|v| v.set_own(Some(ad.clone()), None));
        self.publish(&GossipMessage::Capability(ad));
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Capability(ad) => {
                self.own_ad = Some(*ad);
                self.publish_ad();
            }
            Command::Load(load) => {
                if self.left {
                    return;
                }
                let mut load = *load;
                load.peer_id = self.swarm.local_peer_id().to_string();
                load.peers = self.swarm.connected_peers().map(ToString::to_string).take(512).collect();
                load.peers.sort();
                self.with_view(|v| v.set_own(None, Some(load.clone())));
                self.publish(&GossipMessage::Load(load));
            }
            Command::Leave(reason, done) => {
                let peer_id = self.swarm.local_peer_id().to_string();
                self.publish(&GossipMessage::Leaving { peer_id, reason });
                self.left = true;
                let _ = done.send(());
            }
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let me = *self.swarm.local_peer_id();
                tracing::info!(address = %address.clone().with(Protocol::P2p(me)), "mesh listening");
                self.listen_tx.send_modify(|l| l.push(address));
                self.ad_due = true;
            }
            SwarmEvent::ConnectionEstablished { peer_id, num_established, endpoint, .. } => {
                if num_established.get() == 1 {
                    tracing::info!(peer = %peer_id, address = %endpoint.get_remote_address(), "peer connected");
                }
                let now = Instant::now();
                self.lan.connected(&peer_id, now);
                self.with_view(|v| v.connected(peer_id, now));
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause, .. } => {
                let why = cause.map(|c| c.to_string()).unwrap_or_else(|| "closed".into());
                tracing::info!(peer = %peer_id, reason = %why, "peer disconnected");
                self.with_view(|v| v.disconnected(peer_id, &why));
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                let detail = match &error {
                    libp2p::swarm::ListenError::Denied { cause } => denial(cause),
                    e => format!("{e}; a peer with another mesh secret (or none) fails this way"),
                };
                tracing::debug!(from = %send_back_addr, "incoming connection failed: {detail}");
                if let Some(report) = self.refusals.refused(&send_back_addr, detail, Instant::now()) {
                    self.report_refusal(report);
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                let detail = match &error {
                    libp2p::swarm::DialError::Denied { cause } => denial(cause),
                    e => e.to_string(),
                };
                tracing::warn!(peer = ?peer_id, "cannot connect: {detail}");
                if let Some(p) = peer_id
                    && !self.allow.is_empty()
                    && !self.allow.contains(&p)
                {
                    self.with_view(|v| v.record(MeshEventKind::Refused, p, detail));
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour(event),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message { propagation_source, message_id, message }) => {
                let acceptance = match (message.source, GossipMessage::decode(&message.data)) {
                    (Some(source), Ok(msg)) => {
                        let now = Instant::now();
                        match self.with_view(|v| v.apply(source, msg, now)) {
                            Ok(()) => gossipsub::MessageAcceptance::Accept,
                            Err(e) => {
                                tracing::warn!(from = %source, error = %e, "gossip message refused");
                                gossipsub::MessageAcceptance::Reject
                            }
                        }
                    }
                    (source, Err(e)) => {
                        tracing::warn!(from = ?source, via = %propagation_source, error = %e, "malformed gossip message");
                        gossipsub::MessageAcceptance::Reject
                    }
                    (None, Ok(_)) => gossipsub::MessageAcceptance::Reject,
                };
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { .. }) => self.ad_due = true,
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocol_version != ID_PROTOCOL {
                    tracing::warn!(peer = %peer_id, protocol = %info.protocol_version, "not a tandem node: disconnecting");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                // Replace, never append: identify pushes come as often as a peer likes.
                let kad = &mut self.swarm.behaviour_mut().kad;
                kad.remove_peer(&peer_id);
                for addr in info.listen_addrs.into_iter().filter(|a| !is_unspecified(a)).take(8) {
                    kad.add_address(&peer_id, addr);
                }
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, addresses, .. })
                if peer != *self.swarm.local_peer_id() && !self.swarm.is_connected(&peer) =>
            {
                tracing::debug!(%peer, "learned of a peer through Kademlia");
                let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addresses.into_vec()).build());
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed { result: kad::QueryResult::GetClosestPeers(Ok(ok)), .. }) => {
                for p in ok.peers {
                    if p.peer_id != *self.swarm.local_peer_id() && !self.swarm.is_connected(&p.peer_id) && !p.addrs.is_empty() {
                        let _ = self.swarm.dial(DialOpts::peer_id(p.peer_id).addresses(p.addrs).build());
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
                // A loopback address from another host's mDNS answer points at ourselves.
                for (peer, addr) in found.into_iter().filter(|(_, a)| !is_loopback(a)) {
                    by_peer.entry(peer).or_default().push(addr);
                }
                for (peer, addrs) in by_peer {
                    // A node off our allow-list would only be refused, again and again.
                    if !self.allow.is_empty() && !self.allow.contains(&peer) {
                        tracing::debug!(%peer, "found a peer by mDNS that is not on the allow-list");
                        continue;
                    }
                    tracing::info!(%peer, ?addrs, "found a peer by mDNS");
                    for a in &addrs {
                        self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
                    }
                    self.lan.found(peer, &addrs, Instant::now());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(DialOpts::peer_id(peer).addresses(addrs).build());
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(gone)) => {
                for (peer, addr) in gone {
                    self.lan.expired(&peer, &addr);
                }
            }
            BehaviourEvent::Ping(ping::Event { peer, connection, result: Err(e) }) => {
                tracing::warn!(%peer, error = %e, "ping failed: closing the connection");
                self.swarm.close_connection(connection);
            }
            _ => {}
        }
    }
}

/// Bounds concurrent inbound streams, per peer and in all, so one peer cannot exhaust a node.
#[derive(Clone, Debug)]
pub struct StreamGate {
    counts: Arc<Mutex<(HashMap<PeerId, usize>, usize)>>,
    per_peer: usize,
    total: usize,
}

/// A place taken in a [`StreamGate`]; given back on drop.
#[derive(Debug)]
pub struct StreamPermit {
    gate: StreamGate,
    peer: PeerId,
}

impl StreamGate {
    pub fn new(per_peer: usize, total: usize) -> Self {
        StreamGate { counts: Arc::default(), per_peer, total }
    }

    /// A permit, or `None` when `peer` (or everyone together) has too many streams open.
    pub fn try_enter(&self, peer: PeerId) -> Option<StreamPermit> {
        let mut c = self.counts.lock().ok()?;
        let (per, total) = &mut *c;
        if *total >= self.total {
            return None;
        }
        let n = per.entry(peer).or_insert(0);
        if *n >= self.per_peer {
            return None;
        }
        *n += 1;
        *total += 1;
        Some(StreamPermit { gate: self.clone(), peer })
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Ok(mut c) = self.gate.counts.lock() {
            let (per, total) = &mut *c;
            *total = total.saturating_sub(1);
            if let Some(n) = per.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&self.peer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_gate_bounds_each_peer_and_the_total() {
        let gate = StreamGate::new(2, 3);
        let (a, b) = (PeerId::random(), PeerId::random());
        let a1 = gate.try_enter(a).expect("a 1");
        let _a2 = gate.try_enter(a).expect("a 2");
        assert!(gate.try_enter(a).is_none(), "per-peer bound");
        let _b1 = gate.try_enter(b).expect("b 1");
        assert!(gate.try_enter(b).is_none(), "total bound");
        drop(a1);
        assert!(gate.try_enter(b).is_some(), "a permit came back");
    }
}
