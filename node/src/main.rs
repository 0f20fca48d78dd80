//! `tandem`: the headless node and command-line tool.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tandem_core::hf_export::{ExportDtype, export_hf};
use tandem_core::synthetic::synthetic_model;
use tandem_core::{ChatMessage, Engine, EngineConfig, GpuContext, HostModel, KvDtype, SamplingParams, WeightFormat};
use tandem_node::models::{DEFAULT_MODEL, ensure_model, known_model, resolve_model, sha256_file};

#[derive(Parser)]
#[command(name = "tandem", version, about = "A portable LLM inference node on WGSL kernels (wgpu).")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Manage model files.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Serve the model to many users over an OpenAI-compatible HTTP API.
    Serve(tandem_node::serve::ServeArgs),
    /// Measure prefill and decode speed.
    Bench(BenchArgs),
    /// List the GPU adapters wgpu can see.
    Adapters,
    /// Mesh secrets and identities.
    Mesh {
        #[command(subcommand)]
        command: MeshCommand,
    },
    /// A running node's role.
    Role {
        #[command(subcommand)]
        command: RoleCommand,
    },
}

#[derive(Subcommand)]
enum MeshCommand {
    /// Write a new mesh secret (swarm.key format) for `tandem serve --mesh-secret-file`.
    Keygen {
        /// Where to write it; an existing file is never overwritten.
        path: PathBuf,
    },
    /// Print the peer id of an identity key file (created if missing).
    Id {
        #[arg(long, env = "TANDEM_IDENTITY")]
        identity: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum RoleCommand {
    /// Pin a node's role (prefill, decode, both, observer) or hand it back to `auto`; the node
    /// drains its in-flight work first. Only from the node's own machine.
    Set {
        role: tandem_mesh::Role,
        /// The node's HTTP API.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        node: String,
    },
    /// Print a node's role.
    Get {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        node: String,
    },
}

fn role_command(command: RoleCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let resp = match command {
            RoleCommand::Set { role, node } => {
                client.post(format!("{}/v1/role", node.trim_end_matches('/'))).json(&serde_json::json!({ "role": role })).send().await
            }
            RoleCommand::Get { node } => client.get(format!("{}/v1/role", node.trim_end_matches('/'))).send().await,
        }
        .context("cannot reach the node")?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.context("the node's answer is not JSON")?;
        if !status.is_success() {
            bail!("{status}: {}", body["error"]["message"].as_str().unwrap_or("unknown error"));
        }
        println!("{}", serde_json::to_string(&body)?);
        Ok(())
    })
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// `smollm2-135m` (fetched into the cache if missing), a .gguf file or a Hugging Face directory.
    #[arg(long, default_value = DEFAULT_MODEL.id)]
    model: String,
    /// The prompt text.
    #[arg(long, required_unless_present = "prompt_file")]
    prompt: Option<OsString>,
    /// Read the prompt from a file instead.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long)]
    system: Option<String>,
    /// Parse special-token text such as `<|im_start|>` in a raw prompt as special tokens.
    #[arg(long)]
    special: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Nucleus sampling mass (1: all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Adapter index or name substring (see `tandem adapters`).
    #[arg(long, env = "TANDEM_ADAPTER")]
    adapter: Option<String>,
    /// Context length (0: the model's, capped at 8192).
    #[arg(long, default_value_t = 0)]
    context: usize,
    /// Batch-invariant kernels only (slower; see the README).
    #[arg(long)]
    deterministic: bool,
    /// How the K/V cache stores values: f16 (half the memory) or f32.
    #[arg(long, default_value_t = KvDtype::F16)]
    kv_dtype: KvDtype,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download a known model (`smollm2-135m`, the default, or `gemma3-270m`) into the cache if
    /// missing, and verify its sha256.
    Fetch {
        #[arg(default_value = DEFAULT_MODEL.id)]
        name: String,
    },
    /// Download from the Hugging Face Hub into the cache: `OWNER/REPO:FILE` (a GGUF file), or
    /// `OWNER/REPO` (its only GGUF file, or else its safetensors directory with config and
    /// tokenizer). Resumes an unfinished download, verifies every file the Hub gives a sha256
    /// (weights, GGUFs), and prints the path to pass as `--model`. `HF_TOKEN` authenticates.
    Pull {
        spec: String,
        /// The Hub's address.
        #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
        endpoint: String,
        /// A branch, tag or commit.
        #[arg(long, default_value = "main")]
        revision: String,
    },
    /// The known models and the cached model files: architecture, formats, size, K/V bytes per
    /// token.
    List,
    /// Print a model's architecture, shapes and tensors.
    Inspect {
        /// A .gguf file, a Hugging Face directory, or `smollm2-135m`.
        path: String,
        /// List every tensor.
        #[arg(long)]
        tensors: bool,
    },
    /// Write a model as a Hugging Face directory (config.json, model.safetensors, tokenizer.json).
    ExportHf {
        gguf: String,
        dir: PathBuf,
        #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
        dtype: String,
    },
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BenchArgs {
    #[command(subcommand)]
    load: Option<BenchCommand>,
    /// A model file (or `smollm2-135m`).
    #[arg(long, conflicts_with = "synthetic")]
    model: Option<String>,
    /// Seeded random weights with the shapes of: smollm2-135m, smollm2-1.7b, llama-3.2-1b, llama-3-8b.
    #[arg(long)]
    synthetic: Option<String>,
    /// Weight format of a synthetic model: q4_0, q4_1, q8_0, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, f16, bf16, f32.
    #[arg(long, default_value = "q4_1")]
    format: String,
    /// Decode steps per measurement.
    #[arg(long, default_value_t = 64)]
    steps: usize,
    #[arg(long, env = "TANDEM_ADAPTER")]
    adapter: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Batch-invariant kernels only (slower; see the README).
    #[arg(long)]
    deterministic: bool,
    /// How the K/V cache stores values: f16 (half the memory) or f32.
    #[arg(long, default_value_t = KvDtype::F16)]
    kv_dtype: KvDtype,
    /// Also time every kernel on the GPU (timestamp queries) for a 512- and a 128-token prefill
    /// and a decode step at contexts 128 and 1,024, with the GB/s and TFLOP/s each reaches.
    #[arg(long)]
    profile: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Load a running OpenAI-compatible server (tandem, llama-server, vLLM) with Poisson
    /// arrivals and report throughput, TTFT/TPOT percentiles and SLO attainment per rate.
    Serve(LoadArgs),
}

#[derive(clap::Args)]
struct LoadArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Model id (default: the first of GET /v1/models).
    #[arg(long)]
    model: Option<String>,
    /// Arrival rates in requests/s, one run each (a sweep); `burst` sends every request at once.
    #[arg(long, value_delimiter = ',', default_value = "burst")]
    rate: Vec<String>,
    /// Requests per rate.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Mean prompt length in words (about a token each), uniform within ±50%.
    #[arg(long, default_value_t = 128)]
    prompt_words: usize,
    /// Tokens generated per request (end-of-sequence ignored).
    #[arg(long, default_value_t = 64)]
    output_tokens: usize,
    /// Draw (prompt words, output tokens) from this file instead: one `WORDS TOKENS` pair a line.
    #[arg(long)]
    lengths: Option<PathBuf>,
    /// TTFT bound of the SLO, in ms.
    #[arg(long, default_value_t = 1000)]
    slo_ttft_ms: u64,
    /// TPOT bound of the SLO, in ms.
    #[arg(long, default_value_t = 100)]
    slo_tpot_ms: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn bench_serve(args: LoadArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let model = match args.model {
            Some(m) => m,
            None => tandem_node::loadgen::first_model(&args.url).await?,
        };
        let mut reports = Vec::new();
        let mut spec = tandem_node::loadgen::LoadSpec {
            url: args.url.clone(),
            model,
            rate: None,
            requests: args.requests,
            prompt_words: args.prompt_words,
            output_tokens: args.output_tokens,
            lengths: args.lengths.as_deref().map(tandem_node::loadgen::read_lengths).transpose()?.unwrap_or_default(),
            slo_ttft: std::time::Duration::from_millis(args.slo_ttft_ms),
            slo_tpot: std::time::Duration::from_millis(args.slo_tpot_ms),
            seed: args.seed,
        };
        for (level, rate) in args.rate.iter().enumerate() {
            // New prompts at every level: repeats would be served from the prefix cache.
            spec.seed = args.seed.wrapping_add(level as u64 * 1_000_003);
            spec.rate = match rate.as_str() {
                "burst" => None,
                r => Some(r.parse::<f64>().ok().filter(|r| *r > 0.0).with_context(|| format!("rate `{r}` is not a positive number"))?),
            };
            let report = tandem_node::loadgen::run(&spec).await;
            // Progress on stderr, one row per rate as it finishes.
            eprint!("{}", tandem_node::loadgen::table(std::slice::from_ref(&report), &spec));
            reports.push(report);
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&reports)?);
        } else {
            print!("{}", tandem_node::loadgen::table(&reports, &spec));
        }
        Ok(())
    })
}

fn init_logs(default: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG").unwrap_or_else(|_| default.into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json { logs.json().init() } else { logs.init() }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        init_logs("warn", false);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Model { command: ModelCommand::Fetch { name } } => {
            let model = known_model(&name).ok_or_else(|| tandem_node::models::FetchError::Unknown(name.clone()))?;
            let path = ensure_model(&model)?;
            let sum = sha256_file(&path)?;
            if sum != model.sha256 {
                bail!("{}: sha256 {sum} does not match {}; delete it and fetch again", path.display(), model.sha256);
            }
            println!("{}", path.display());
            Ok(())
        }
        Command::Model { command: ModelCommand::Inspect { path, tensors } } => inspect(&path, tensors),
        Command::Model { command: ModelCommand::Pull { spec, endpoint, revision } } => {
            let spec: tandem_node::models::HubSpec = spec.parse()?;
            let path = tandem_node::models::pull(&spec, &endpoint, &revision)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Model { command: ModelCommand::List } => list_models(),
        Command::Model { command: ModelCommand::ExportHf { gguf, dir, dtype } } => {
            let model = HostModel::load(&resolve_model(&gguf)?)?;
            let dtype = if dtype == "f32" { ExportDtype::F32 } else { ExportDtype::F16 };
            export_hf(&model, &dir, dtype)?;
            println!("wrote {}", dir.display());
            Ok(())
        }
        Command::Serve(args) => {
            let cfg = args.resolve()?;
            init_logs("info,wgpu_core=warn,wgpu_hal=warn,naga=warn,libp2p_kad=error", cfg.log_json);
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let result = runtime.block_on(tandem_node::serve::serve(cfg));
            // A model still loading on a blocking thread must not hold the exit.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
        Command::Bench(args) => bench(args),
        Command::Mesh { command: MeshCommand::Keygen { path } } => {
            let secret = tandem_mesh::generate_secret(&path)?;
            println!("wrote {} (fingerprint {}); give it to every node with --mesh-secret-file", path.display(), secret.fingerprint());
            Ok(())
        }
        Command::Mesh { command: MeshCommand::Id { identity } } => {
            let args = tandem_node::serve::ServeArgs { identity, ..Default::default() };
            let key = tandem_mesh::load_or_create_identity(&args.resolve()?.mesh.identity)?;
            println!("{}", key.public().to_peer_id());
            Ok(())
        }
        Command::Role { command } => role_command(command),
        Command::Adapters => {
            let all = tandem_core::list_adapters();
            if all.is_empty() {
                bail!(tandem_core::Error::NoAdapter { detail: String::new() });
            }
            for a in all {
                println!("{a}");
            }
            Ok(())
        }
    }
}

fn read_prompt(args: &GenerateArgs) -> anyhow::Result<String> {
    match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.to_str().map(str::to_string).context("the prompt is not valid UTF-8"),
        (None, Some(f)) => {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{}: not valid UTF-8 ({e})", f.display()))
        }
        (None, None) => bail!("give --prompt or --prompt-file"),
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let text = read_prompt(&args)?;
    let model = HostModel::load(&resolve_model(&args.model)?)?;
    let tok = &model.tokenizer;
    let prompt = if args.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(ChatMessage { role: "system".into(), content: s.clone() });
        }
        msgs.push(ChatMessage { role: "user".into(), content: text });
        tok.encode_prompt(&tok.apply_chat_template(&msgs, true)?, true)?
    } else {
        tok.encode_prompt(&text, args.special)?
    };
    let gpu = GpuContext::new(args.adapter.as_deref())?;
    let cfg =
        EngineConfig { context_length: args.context, deterministic: args.deterministic, kv_dtype: args.kv_dtype, ..Default::default() };
    let mut engine = Engine::new(&gpu, &model, &cfg)?;
    let sampling = SamplingParams { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
    let mut stream = tok.decode_stream(true);
    let mut stdout = std::io::stdout().lock();
    let stats = tandem_core::generate(&mut engine, &prompt, args.max_tokens, sampling, &tok.stop_ids, |id| {
        if !tok.stop_ids.contains(&id)
            && let Some(piece) = stream.push(id)?
        {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
        Ok(true)
    })?;
    let _ = writeln!(stdout);
    eprintln!(
        "adapter: {}\nprompt: {} tokens, prefill {:.1} tokens/s ({:.0} ms)\ngenerated: {} tokens, decode {:.1} tokens/s",
        gpu.adapter,
        stats.prompt_tokens,
        stats.prefill_tokens_per_s(),
        stats.prefill_time.as_secs_f64() * 1000.0,
        stats.generated_tokens,
        stats.decode_tokens_per_s(),
    );
    Ok(())
}

fn list_models() -> anyhow::Result<()> {
    let dir = tandem_node::models::cache_dir().join("models");
    println!("{:<14} {:<8} {:<20} {:>10} {:>14}  file", "name", "arch", "formats", "size", "K/V per token");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "gguf")).collect())
        .unwrap_or_default();
    files.sort();
    for known in tandem_node::models::KNOWN_MODELS {
        let path = tandem_node::models::cached_path(&known);
        if !files.contains(&path) {
            println!("{:<14} {:<8} {:<20} {:>10} {:>14}  not cached (`tandem model fetch {}`)", known.id, "-", "-", "-", "-", known.id);
        }
    }
    let mut entries: Vec<(String, PathBuf)> = files
        .into_iter()
        .map(|path| {
            let name = tandem_node::models::KNOWN_MODELS.iter().find(|k| tandem_node::models::cached_path(k) == path).map_or("-", |k| k.id);
            (name.to_string(), path)
        })
        .collect();
    entries.extend(pulled_models(&tandem_node::models::cache_dir().join("hub")));
    for (name, path) in entries {
        let described = if path.is_dir() { describe_hf_dir(&path) } else { describe_gguf(&path) };
        match described {
            Ok((arch, formats, kv)) => {
                let size = if path.is_dir() {
                    std::fs::read_dir(&path)
                        .map(|d| d.filter_map(|e| std::fs::metadata(e.ok()?.path()).ok()).map(|m| m.len()).sum())
                        .unwrap_or(0)
                } else {
                    std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
                };
                println!(
                    "{name:<14} {arch:<8} {formats:<20} {:>7.1} MB {:>11.1} KB  {}",
                    size as f64 / 1e6,
                    kv as f64 / 1e3,
                    path.display()
                );
            }
            Err(e) => println!("{name:<14} unreadable: {e:#}"),
        }
    }
    Ok(())
}

/// What `model pull` stored under `hub` (the Hub's cache layout): each snapshot's GGUF files, or
/// the snapshot itself where it is a Hugging Face directory, named OWNER/REPO.
fn pulled_models(hub: &std::path::Path) -> Vec<(String, PathBuf)> {
    let list = |dir: &std::path::Path| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
        v.sort();
        v
    };
    let mut out = Vec::new();
    for repo in list(hub) {
        let Some(name) = repo.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("models--")) else { continue };
        let name = name.replacen("--", "/", 1);
        for snapshot in list(&repo.join("snapshots")) {
            let files = list(&snapshot);
            if files.iter().any(|f| f.ends_with("config.json")) {
                out.push((name.clone(), snapshot));
            } else {
                out.extend(files.into_iter().filter(|f| f.extension().is_some_and(|x| x == "gguf")).map(|f| (name.clone(), f)));
            }
        }
    }
    out
}

/// A Hugging Face directory's architecture and f16 K/V bytes per token, from its config alone.
fn describe_hf_dir(dir: &std::path::Path) -> anyhow::Result<(String, String, u64)> {
    let config = dir.join("config.json");
    let c = tandem_core::ModelConfig::from_hf_json(&config, &std::fs::read_to_string(&config)?)?;
    let kv = c.kv_bytes_per_token(tandem_core::KvDtype::F16.bytes());
    Ok((c.architecture, "safetensors".into(), kv))
}

/// A GGUF's architecture, matrix formats and f16 K/V bytes per token, from its header alone.
fn describe_gguf(path: &std::path::Path) -> anyhow::Result<(String, String, u64)> {
    let file = tandem_core::GgufFile::open(path)?;
    let c = tandem_core::ModelConfig::from_gguf(&file)?;
    let mut formats: Vec<String> = file.tensors.iter().filter(|t| t.shape.len() > 1).map(|t| t.format.to_string()).collect();
    formats.sort();
    formats.dedup();
    let kv = c.kv_bytes_per_token(tandem_core::KvDtype::F16.bytes());
    Ok((c.architecture, formats.join(","), kv))
}

fn inspect(spec: &str, list_tensors: bool) -> anyhow::Result<()> {
    let path = resolve_model(spec)?;
    let model = HostModel::load(&path)?;
    let c = &model.config;
    println!("file: {}", path.display());
    println!("architecture: {}", c.architecture);
    println!(
        "layers: {}  hidden: {}  ffn: {}  heads: {} (kv {})  head_dim: {}",
        c.n_layers, c.hidden_size, c.ffn_size, c.n_heads, c.n_kv_heads, c.head_dim
    );
    println!("vocab: {}  context: {}  rope theta: {}  rms eps: {}", c.vocab_size, c.context_length, c.rope_theta, c.rms_eps);
    println!("output head: {}", if c.tied_embeddings { "tied to the embedding" } else { "separate" });
    let mut by_format: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    for t in model.tensors.values() {
        let e = by_format.entry(t.format.to_string()).or_default();
        e.0 += 1;
        e.1 += t.bytes.as_slice().len() as u64;
    }
    for (f, (n, bytes)) in &by_format {
        println!("tensors {f:>5}: {n:>4}  {:>9.2} MiB", *bytes as f64 / (1 << 20) as f64);
    }
    println!("weights: {:.2} MiB", model.weight_bytes() as f64 / (1 << 20) as f64);
    let tok = &model.tokenizer;
    println!(
        "tokenizer: {} tokens, bos {:?}, eos {:?}, chat template: {}",
        tok.vocab_size(),
        tok.bos_id,
        tok.eos_id,
        tok.chat_template.is_some()
    );
    if list_tensors {
        let mut names: Vec<_> = model.tensors.values().collect();
        names.sort_by(|a, b| a.name.cmp(&b.name));
        for t in names {
            println!("  {:<32} {:>5} {:?}  {} bytes", t.name, t.format.to_string(), t.shape, t.bytes.as_slice().len());
        }
    }
    Ok(())
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(BenchCommand::Serve(load)) = args.load {
        return bench_serve(load);
    }
    let model = match (&args.synthetic, &args.model) {
        (Some(name), _) => {
            let format: WeightFormat = args.format.parse().map_err(anyhow::Error::msg)?;
            synthetic_model(name, format, 42)?
        }
        (None, Some(spec)) => HostModel::load(&resolve_model(spec)?)?,
        (None, None) => HostModel::load(&resolve_model(DEFAULT_MODEL.id)?)?,
    };
    let gpu = GpuContext::new(args.adapter.as_deref())?;
    let cfg = EngineConfig {
        max_batch_tokens: 512,
        context_length: 2048,
        deterministic: args.deterministic,
        kv_dtype: args.kv_dtype,
        ..Default::default()
    };
    let mut engine = Engine::new(&gpu, &model, &cfg)?;
    let mut report = tandem_node::bench::run(&mut engine, model.path.display().to_string(), model.weight_bytes(), args.steps)?;
    if args.profile {
        report.profile = Some(tandem_node::bench::profile(&mut engine)?);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", tandem_node::bench::table(&report));
    }
    Ok(())
}
