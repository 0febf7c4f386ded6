//! `nomoat bench api`: streamed chat completions through a demo swarm's
//! gateway, against the local engine in the same run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use nomoat_node::engine::{
    ChatMessage, ChatTokenizer, GenerateOptions, LocalModel, ModelFile, SamplingParams, WeightMode,
};
use nomoat_node::gateway::model_name;
use nomoat_node::gateway::{self, http, wait_covered};
use tokio_util::sync::CancellationToken;

use super::median;
use crate::cli::demo::{local_swarm_gateway, remove_peer_homes, start_servers, COVERAGE_TIMEOUT};

#[derive(Debug, Args)]
pub(crate) struct BenchApiArgs {
    /// The model.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Numbers of concurrent clients to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    clients: Vec<usize>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Server processes in the local swarm.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// Compute threads of every participant (each server and the local
    /// engine).
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// The chat question each client asks.
    #[arg(long, default_value = "Tell me about the history of Paris.")]
    prompt: String,
}

/// One client's figures: time to first token, tokens, decode tokens/s.
#[derive(Debug, Clone, Copy)]
struct ClientRun {
    ttft_s: f64,
    tokens: usize,
    decode_tps: f64,
    start: Instant,
    end: Instant,
}

async fn api_client(addr: SocketAddr, body: String) -> Result<ClientRun> {
    let start = Instant::now();
    let mut first = None;
    let mut last = start;
    let mut tokens = 0usize;
    let (status, err) = http::stream_events(
        addr,
        "/v1/chat/completions",
        body.as_bytes(),
        Duration::from_secs(600),
        |data| {
            if data == "[DONE]" {
                return false;
            }
            let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                if !t.is_empty() {
                    first.get_or_insert_with(Instant::now);
                    last = Instant::now();
                }
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
            true
        },
    )
    .await?;
    anyhow::ensure!(status == 200, "the API answered {status}: {err}");
    let first = first.context("no text came back")?;
    Ok(ClientRun {
        ttft_s: (first - start).as_secs_f64(),
        tokens,
        decode_tps: tokens.saturating_sub(1) as f64 / (last - first).as_secs_f64().max(1e-9),
        start,
        end: last,
    })
}

pub(crate) async fn bench_api(args: BenchApiArgs) -> Result<()> {
    let path = nomoat_node::catalog::resolve(&args.model, true)?;
    let file = ModelFile::open(&path)?;
    let tokenizer = ChatTokenizer::from_model(&file)?;
    let name = model_name(&args.model);
    let prompt = tokenizer
        .encode(&tokenizer.chat_prompt(&[ChatMessage::new("user", args.prompt.clone())]))?;
    let opts = GenerateOptions {
        max_tokens: args.tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: tokenizer.stop_ids().to_vec(),
    };
    // The local engine first, in this process, with the same prompt.
    let local = LocalModel::load_whole(&file, WeightMode::Fast)?;
    let local_run = || -> Result<(f64, f64, usize)> {
        let (out, stats) = local.generate(&prompt, &opts, |_| Ok(true))?;
        Ok((
            stats.prompt_time.as_secs_f64(),
            stats.decode_tokens_per_sec(),
            out.len(),
        ))
    };
    // Warm-up (first touches of the weights, thread pools), then measured.
    local_run()?;
    let (l1_ttft, l1_tps, local_tokens) = local_run()?;
    eprintln!(
        "local: time to first token {:.1} ms, {l1_tps:.1} tokens/s ({local_tokens} tokens)",
        l1_ttft * 1e3
    );
    let servers = args.servers.max(1);
    let (model_id, procs) = start_servers(&path, servers, args.threads)?;
    let shutdown = CancellationToken::new();
    let (gw, net) = local_swarm_gateway(&path, name.clone(), &procs, &model_id, &shutdown).await?;
    let result = async {
        wait_covered(&gw, COVERAGE_TIMEOUT).await?;
        let (listener, addr) = gateway::bind("127.0.0.1:0".parse()?).await?;
        tokio::spawn(gateway::serve(gw.clone(), listener, shutdown.clone()));
        let body = serde_json::json!({
            "model": name,
            "messages": [{"role": "user", "content": args.prompt}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0,
            "max_tokens": args.tokens,
        })
        .to_string();
        // Warm-up: connections, routes and caches.
        api_client(addr, body.clone()).await?;
        let mut rows = Vec::new();
        for &c in &args.clients {
            let c = c.max(1);
            let runs: Vec<ClientRun> = futures::future::try_join_all(
                (0..c).map(|_| api_client(addr, body.clone())),
            )
            .await?;
            let t0 = runs.iter().map(|r| r.start).min().context("a client")?;
            let t1 = runs.iter().map(|r| r.end).max().context("a client")?;
            let total: usize = runs.iter().map(|r| r.tokens).sum();
            let ttft = median(runs.iter().map(|r| r.ttft_s).collect());
            let per_client = median(runs.iter().map(|r| r.decode_tps).collect());
            let aggregate = total as f64 / (t1 - t0).as_secs_f64().max(1e-9);
            println!(
                "API, {c} client(s): time to first token {:.1} ms (median), {per_client:.1} tokens/s per client, {aggregate:.1} tokens/s in all ({total} tokens)",
                ttft * 1e3
            );
            rows.push(serde_json::json!({
                "clients": c,
                "ttft_ms_median": ttft * 1e3,
                "decode_tokens_per_s_per_client": per_client,
                "tokens_per_s_aggregate": aggregate,
                "tokens": total,
            }));
        }
        anyhow::Ok(rows)
    }
    .await;
    shutdown.cancel();
    net.shutdown().await;
    drop(procs);
    remove_peer_homes(servers);
    let rows = result?;
    // The local engine again, so that machine noise hits both alike.
    let (l2_ttft, l2_tps, _) = local_run()?;
    let (l_ttft, l_tps) = ((l1_ttft + l2_ttft) / 2.0, (l1_tps + l2_tps) / 2.0);
    println!(
        "local generate: time to first token {:.1} ms, {l_tps:.1} tokens/s (mean of a run before and after)",
        l_ttft * 1e3
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "api",
            "model": args.model,
            "servers": args.servers,
            "threads_per_process": args.threads,
            "max_tokens": args.tokens,
            "local": {"ttft_ms": l_ttft * 1e3, "decode_tokens_per_s": l_tps, "tokens": local_tokens},
            "api": rows,
        })
    );
    Ok(())
}
