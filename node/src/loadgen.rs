//! `tandem bench serve`: an open-loop load generator for any OpenAI-compatible server. Requests
//! arrive as a Poisson process at a given rate (or all at once), stream their completions, and
//! the report gives throughput, TTFT and TPOT percentiles and SLO attainment (the share of
//! requests that meet both a TTFT and a TPOT bound, as in DistServe).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};

/// One load level.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub url: String,
    pub model: String,
    /// Requests per second; None sends them all at once.
    pub rate: Option<f64>,
    pub requests: usize,
    /// Mean prompt length in words (about one token each); lengths are uniform in ±50%.
    pub prompt_words: usize,
    /// Output tokens per request (the server is asked to ignore end-of-sequence tokens).
    pub output_tokens: usize,
    /// (prompt words, output tokens) pairs to draw from instead, e.g. from a trace.
    pub lengths: Vec<(usize, usize)>,
    pub slo_ttft: Duration,
    pub slo_tpot: Duration,
    pub seed: u64,
}

/// What one request saw.
#[derive(Clone, Debug, Default)]
struct Sample {
    ok: bool,
    ttft: Duration,
    tpot: Option<Duration>,
    e2e: Duration,
    prompt_tokens: usize,
    output_tokens: usize,
}

/// Percentiles in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// The report of one load level.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LoadReport {
    pub rate: Option<f64>,
    pub requests: usize,
    pub failed: usize,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub output_tokens_per_s: f64,
    pub mean_prompt_tokens: f64,
    pub ttft_ms: Percentiles,
    pub tpot_ms: Percentiles,
    pub e2e_ms: Percentiles,
    /// Share of requests with TTFT and TPOT both within the bounds.
    pub slo_attainment: f64,
}

const WORDS: &[&str] = &[
    "time", "river", "stone", "light", "house", "garden", "music", "window", "forest", "market", "winter", "bridge", "letter", "silver",
    "orange", "doctor", "island", "engine", "circle", "mirror", "summer", "paper", "castle", "animal", "planet", "school", "ocean",
    "friend",
];

fn prompt(rng: &mut impl Rng, words: usize) -> String {
    // A number first, so no two prompts share a prefix the server could cache.
    let mut s = format!("{}", rng.random_range(0..1_000_000_000u64));
    for _ in 0..words.saturating_sub(1) {
        s.push(' ');
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s
}

pub(crate) fn percentiles(mut v: Vec<f64>) -> Percentiles {
    if v.is_empty() {
        return Percentiles::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Percentiles { p50: at(0.5), p90: at(0.9), p99: at(0.99) }
}

async fn one(client: reqwest::Client, url: String, body: Value) -> Sample {
    let start = Instant::now();
    let Ok(resp) = client.post(&url).json(&body).send().await else { return Sample::default() };
    if !resp.status().is_success() {
        return Sample::default();
    }
    let mut first = None;
    let mut last = start;
    let mut usage = None;
    let mut buf = String::new();
    let mut bytes = resp.bytes_stream();
    while let Some(chunk) = bytes.next().await {
        let Ok(chunk) = chunk else { return Sample::default() };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
            if v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
            }
            if v["usage"].is_object() {
                usage = Some(v["usage"].clone());
            }
        }
    }
    let Some(first) = first else { return Sample::default() };
    let output_tokens = usage.as_ref().and_then(|u| u["completion_tokens"].as_u64()).unwrap_or(0) as usize;
    let prompt_tokens = usage.as_ref().and_then(|u| u["prompt_tokens"].as_u64()).unwrap_or(0) as usize;
    Sample {
        ok: true,
        ttft: first - start,
        tpot: (output_tokens > 1).then(|| (last - first) / (output_tokens as u32 - 1)),
        e2e: last - start,
        prompt_tokens,
        output_tokens,
    }
}

/// Runs one load level and reports it.
pub async fn run(spec: &LoadSpec) -> LoadReport {
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let client = reqwest::Client::new();
    let url = format!("{}/v1/completions", spec.url.trim_end_matches('/'));
    let start = Instant::now();
    let mut at = Duration::ZERO;
    let mut tasks = Vec::with_capacity(spec.requests);
    for _ in 0..spec.requests {
        if let Some(rate) = spec.rate {
            // Exponential gaps make a Poisson process.
            let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
            at += Duration::from_secs_f64(-u.ln() / rate);
        }
        let (words, output_tokens) = if spec.lengths.is_empty() {
            let lo = (spec.prompt_words / 2).max(1);
            (rng.random_range(lo..=spec.prompt_words + spec.prompt_words / 2), spec.output_tokens)
        } else {
            spec.lengths[rng.random_range(0..spec.lengths.len())]
        };
        let body = json!({
            "model": spec.model, "prompt": prompt(&mut rng, words), "max_tokens": output_tokens.max(1),
            "temperature": 0, "stream": true, "stream_options": { "include_usage": true }, "ignore_eos": true,
        });
        let (client, url) = (client.clone(), url.clone());
        let due = start + at;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            one(client, url, body).await
        }));
    }
    let mut samples = Vec::with_capacity(tasks.len());
    for t in tasks {
        samples.push(t.await.unwrap_or_default());
    }
    let duration = start.elapsed().as_secs_f64();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let met = ok.iter().filter(|s| s.ttft <= spec.slo_ttft && s.tpot.is_none_or(|t| t <= spec.slo_tpot)).count();
    LoadReport {
        rate: spec.rate,
        requests: spec.requests,
        failed: samples.len() - ok.len(),
        duration_s: duration,
        request_throughput: ok.len() as f64 / duration,
        output_tokens_per_s: ok.iter().map(|s| s.output_tokens).sum::<usize>() as f64 / duration,
        mean_prompt_tokens: ok.iter().map(|s| s.prompt_tokens as f64).sum::<f64>() / ok.len().max(1) as f64,
        ttft_ms: percentiles(ok.iter().map(|s| ms(s.ttft)).collect()),
        tpot_ms: percentiles(ok.iter().filter_map(|s| s.tpot.map(ms)).collect()),
        e2e_ms: percentiles(ok.iter().map(|s| ms(s.e2e)).collect()),
        // Failed requests miss the SLO.
        slo_attainment: met as f64 / samples.len().max(1) as f64,
    }
}

/// Reads a lengths file: one `PROMPT_WORDS OUTPUT_TOKENS` pair per line (spaces or a comma
/// between them; `#` starts a comment).
pub fn read_lengths(path: &std::path::Path) -> anyhow::Result<Vec<(usize, usize)>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let nums: Vec<usize> = line
            .split([',', ' ', '\t'])
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{}:{}: {e} (want `PROMPT_WORDS OUTPUT_TOKENS`)", path.display(), i + 1))?;
        match nums[..] {
            [p, o] if p > 0 && o > 0 => out.push((p, o)),
            _ => anyhow::bail!("{}:{}: want two positive numbers, `PROMPT_WORDS OUTPUT_TOKENS`", path.display(), i + 1),
        }
    }
    anyhow::ensure!(!out.is_empty(), "{} holds no lengths", path.display());
    Ok(out)
}

/// The model a server offers first (`GET /v1/models`).
pub async fn first_model(url: &str) -> anyhow::Result<String> {
    let v: Value = reqwest::get(format!("{}/v1/models", url.trim_end_matches('/'))).await?.json().await?;
    v["data"][0]["id"].as_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("{url}/v1/models lists no model"))
}

/// A table row per load level.
pub fn table(reports: &[LoadReport], spec: &LoadSpec) -> String {
    let mut out = format!(
        "{:>8} {:>5} {:>8} {:>9} {:>23} {:>23} {:>8}\n",
        "rate/s",
        "fail",
        "req/s",
        "out tok/s",
        "TTFT p50/p90/p99 ms",
        "TPOT p50/p90/p99 ms",
        format!("SLO {}/{}", spec.slo_ttft.as_millis(), spec.slo_tpot.as_millis()),
    );
    for r in reports {
        let rate = r.rate.map(|r| format!("{r:.2}")).unwrap_or_else(|| "burst".into());
        let p = |p: &Percentiles| format!("{:.0}/{:.0}/{:.0}", p.p50, p.p90, p.p99);
        out.push_str(&format!(
            "{rate:>8} {:>5} {:>8.2} {:>9.1} {:>23} {:>23} {:>7.1}%\n",
            r.failed,
            r.request_throughput,
            r.output_tokens_per_s,
            p(&r.ttft_ms),
            p(&r.tpot_ms),
            r.slo_attainment * 100.0
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_files_are_read_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("lengths.txt");
        std::fs::write(&good, "# prompt output\n128 64\n512,16\n\n").expect("write");
        assert_eq!(read_lengths(&good).expect("reads"), vec![(128, 64), (512, 16)]);
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, "128\n").expect("write");
        assert!(read_lengths(&bad).expect_err("one number").to_string().contains("bad.txt:1"));
    }

    #[test]
    fn percentiles_pick_ranked_values() {
        let p = percentiles((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99), (51.0, 90.0, 99.0));
        assert_eq!(percentiles(vec![]), Percentiles::default());
    }
}
