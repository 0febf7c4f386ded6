//! `nomoat generate`: one prompt, on this machine or through the swarm.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use libp2p::{Multiaddr, PeerId};
use nomoat_node::client::verify::{VerifyMode, VerifyOptions};
use nomoat_node::client::{RemoteSession, StepError, Stepper, TokenSink};
use nomoat_node::engine::{
    ChatMessage, ChatTokenizer, GenerateOptions, GenerationStats, Head, LocalModel, ModelFile,
    SamplingParams, TextStream, WeightMode, DEFAULT_MAX_TOKENS, DEFAULT_SEED, DEFAULT_TOP_P,
};
use nomoat_node::net::{self, NetConfig};
use nomoat_node::store::ChunkStore;
use nomoat_protocol::{BlockRange, Hash};

use crate::ModelArgs;

#[derive(Debug, Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (ChatML).
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: the model's own, if any).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = DEFAULT_TOP_P)]
    top_p: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Penalty for repeating recent tokens (1: none).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Subtracted once from the logit of every token already generated
    /// (OpenAI's presence_penalty; 0: none).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated
    /// (OpenAI's frequency_penalty; 0: none).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Run the blocks on a swarm reached through this peer (repeatable; an
    /// address ending in /p2p/PEER_ID); the head runs here.
    #[arg(long)]
    swarm: Vec<libp2p::Multiaddr>,
    /// Seconds a swarm step may take before the failing hop is reported.
    #[arg(long, default_value_t = 30.0)]
    step_timeout: f64,
    /// Find the swarm's servers on the local network with mDNS (with or
    /// instead of --swarm).
    #[arg(long)]
    mdns: bool,
    /// The dtype hidden states travel in between this node and the swarm's
    /// servers: f32, f16 (half the bytes), bf16 or q8 (8-bit blocks of 32,
    /// 0.27x the bytes). See DESIGN.md for each one's error.
    #[arg(long, default_value = "f32", value_parser = crate::parse_wire_dtype)]
    wire_dtype: nomoat_protocol::DType,
    /// A LoRA adapter id from `nomoat import-adapter`, applied to this
    /// generation.
    #[arg(long)]
    adapter: Option<String>,
    /// Spot checks of the swarm's work: off; async (tokens print as they
    /// come, a share of each server's work is re-run on others, and a
    /// caught lie rewinds the text to its first wrong token); or strict
    /// (every server's work is re-run, and a token prints only once
    /// checked).
    #[arg(long, default_value_t = VerifyMode::Async)]
    verify: VerifyMode,
    #[command(flatten)]
    access: crate::cli::access::AccessArgs,
}

/// `nomoat generate`: streams the text to stdout, the speeds to stderr.
pub(crate) fn generate(args: GenerateArgs) -> Result<()> {
    let rt = crate::runtime()?;
    // A catalog name or file opens here; a model id opens from the store,
    // fetching what is missing through --swarm.
    let net_cfg = args.access.config(
        NetConfig {
            mdns: args.mdns,
            ..NetConfig::default()
        },
        false,
    )?;
    let (file, model_id) = rt.block_on(nomoat_node::gateway::open_model(
        &args.model.model,
        &args.swarm,
        &net_cfg,
    ))?;
    // mDNS finds a swarm with no peer named: it still needs the model id.
    let model_id = match model_id {
        None if args.mdns => Some(nomoat_node::weights::model_file_id(file.path())?),
        id => id,
    };
    let tokenizer = ChatTokenizer::from_model(&file)?;
    let text = if args.chat {
        let mut messages = Vec::new();
        if let Some(sys) = &args.system {
            messages.push(ChatMessage::new("system", sys.clone()));
        }
        messages.push(ChatMessage::new("user", args.prompt.clone()));
        tokenizer.chat_prompt(&messages)
    } else {
        args.prompt.clone()
    };
    let prompt = tokenizer.encode(&text)?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repeat_penalty,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop_ids: tokenizer.stop_ids().to_vec(),
    };
    let step_timeout = Duration::from_secs_f64(args.step_timeout.max(0.1));
    let adapter = args
        .adapter
        .as_deref()
        .map(Hash::from_hex)
        .transpose()
        .context("--adapter takes an adapter id, 64 hex digits")?;
    let stepper = if args.swarm.is_empty() && !args.mdns {
        let model = Arc::new(LocalModel::load_whole(&file, args.model.weights)?);
        match adapter {
            Some(id) => {
                let base_id = match &model_id {
                    Some(m) => m.clone(),
                    None => nomoat_node::weights::model_file_id(file.path())?,
                };
                let store = ChunkStore::open(&nomoat_node::catalog::home())?;
                let w =
                    nomoat_node::weights::open_adapter(&store, &id, file.config(), &base_id, None)?;
                let session = model.new_session_with(model.adapter_parts(&w)?);
                Swarm::Local(Stepper::local_session(model, session))
            }
            None => Swarm::Local(Stepper::local(model)),
        }
    } else {
        rt.block_on(open_swarm(
            &args.swarm,
            model_id.as_deref().context("a swarm's model has an id")?,
            &file,
            args.model.weights,
            &prompt,
            &opts,
            step_timeout,
            net_cfg,
            args.wire_dtype,
            adapter,
            args.verify,
        ))?
    };
    let stats = rt.block_on(run(stepper, &tokenizer, &file, &prompt, &opts))?;
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s; decode: {} tokens, {:.1} tokens/s",
        stats.prompt_tokens,
        stats.prompt_tokens_per_sec(),
        stats.generated_tokens,
        stats.decode_tokens_per_sec()
    );
    Ok(())
}

/// How long `--mdns` listens for servers covering the model.
const MDNS_WAIT: Duration = Duration::from_secs(20);

/// The stepper of a generation, with the network node of a swarm one.
enum Swarm {
    Local(Stepper),
    Remote(Stepper, net::NetHandle),
}

/// Discovers the swarm through `bootstrap`, plans a route and opens a
/// session along it; the head runs here.
#[allow(clippy::too_many_arguments)]
async fn open_swarm(
    bootstrap: &[Multiaddr],
    model_id: &str,
    file: &ModelFile,
    weights: WeightMode,
    prompt: &[u32],
    opts: &GenerateOptions,
    step_timeout: Duration,
    net_cfg: NetConfig,
    wire: nomoat_protocol::DType,
    adapter: Option<Hash>,
    verify: VerifyMode,
) -> Result<Swarm> {
    let head = Arc::new(Head::load(file, weights)?);
    let mdns = net_cfg.mdns;
    let net = net::start(net_cfg).await?;
    if adapter.is_some() {
        // Servers that lack the adapter fetch their part from here.
        let store = ChunkStore::open(&nomoat_node::catalog::home())?;
        tokio::spawn(nomoat_node::weights::serve::serve_weights(
            net.clone(),
            store,
            nomoat_node::weights::serve::Fault::None,
            tokio_util::sync::CancellationToken::new(),
        ));
    }
    let n = file.config().num_blocks as u32;
    let max_len = file
        .config()
        .max_seq_len
        .min(prompt.len() + opts.max_tokens + 1) as u32;
    if mdns {
        let found = net::discover::wait_covered(&net, model_id, n, MDNS_WAIT).await;
        if !found {
            eprintln!(
                "mDNS found no servers covering the model within {MDNS_WAIT:?}; \
                 trying anyway (pass --swarm ADDR to name a peer)"
            );
        }
    }
    let mut session = match RemoteSession::discover_and_open(
        &net,
        bootstrap,
        model_id,
        n,
        max_len,
        step_timeout,
        adapter,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            net.shutdown().await;
            return Err(e.into());
        }
    };
    eprintln!("route: {}", describe_route(&session.route()));
    session.set_verify(VerifyOptions::new(verify));
    let stepper = match Stepper::swarm(head, session).with_wire_dtype(wire) {
        Ok(s) => s,
        Err(e) => {
            net.shutdown().await;
            return Err(anyhow::anyhow!("--wire-dtype {wire}: {e}; use f16 instead"));
        }
    };
    Ok(Swarm::Remote(stepper, net))
}

/// Runs the one token loop, writing text to stdout as it comes.
async fn run(
    swarm: Swarm,
    tokenizer: &ChatTokenizer,
    file: &ModelFile,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<GenerationStats> {
    let (mut stepper, net) = match swarm {
        Swarm::Local(s) => (s, None),
        Swarm::Remote(s, net) => (s, Some(net)),
    };
    let limit = file.config().max_seq_len;
    let mut write = Terminal {
        tokenizer,
        stream: TextStream::default(),
        ids: Vec::new(),
    };
    let result = nomoat_node::client::generate(&mut stepper, prompt, opts, limit, &mut write).await;
    println!();
    if let Some(session) = stepper.remote() {
        let c = session.check_summary();
        if session.verify_options().is_some() {
            eprintln!(
                "checks: {} of {} hops checked, {} positions re-run; every hop checked up to position {}",
                c.checked_hops, c.hops, c.shadow_positions, c.verified
            );
        }
    }
    if let Some(session) = stepper.remote() {
        for f in session.failovers() {
            eprintln!(
                "failover: hop {:?} ({}, blocks {}) replaced by {} after {}; took {:.0} ms \
                 (plan {:.0} ms, reopen {:.0} ms, replay of {} positions in {} steps {:.0} ms)",
                f.failed,
                f.failed_peers
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                f.blocks,
                describe_route(&f.replacement),
                f.cause,
                (f.plan + f.reopen + f.replay).as_secs_f64() * 1e3,
                f.plan.as_secs_f64() * 1e3,
                f.reopen.as_secs_f64() * 1e3,
                f.replayed_positions,
                f.replayed_steps,
                f.replay.as_secs_f64() * 1e3,
            );
        }
    }
    if let (Some(session), Some(net)) = (stepper.remote(), &net) {
        for (i, (peer, _)) in session.route().iter().enumerate() {
            eprintln!("{}", describe_path(i, peer, &net.connection_addrs(peer)));
        }
    }
    stepper.close().await;
    if let Some(net) = net {
        net.shutdown().await;
    }
    Ok(result?.1)
}

/// Prints tokens as text to stdout; a rewind prints a notice and goes on
/// from the last right token.
struct Terminal<'a> {
    tokenizer: &'a ChatTokenizer,
    stream: TextStream,
    ids: Vec<u32>,
}

impl TokenSink for Terminal<'_> {
    async fn token(&mut self, id: u32) -> Result<bool, StepError> {
        self.ids.push(id);
        let mut stdout = std::io::stdout().lock();
        Ok(self.stream.write_to(self.tokenizer, id, &mut stdout)?)
    }

    async fn rewind(&mut self, keep: usize, liar: PeerId) -> Result<(), StepError> {
        self.ids.truncate(keep);
        self.stream = TextStream::default();
        for &id in &self.ids {
            self.stream
                .write_to(self.tokenizer, id, &mut std::io::sink())?;
        }
        let text = self.tokenizer.decode(&self.ids, true).unwrap_or_default();
        println!(
            "\n[nomoat: {liar} was caught lying; the text after its token {keep} above was wrong. The text up to there, and on:]\n{text}"
        );
        Ok(())
    }
}

/// `path: hop I PEER direct|relayed via ADDR, ...`: how this node reached
/// a hop (every connection it had to it, oldest first).
fn describe_path(hop: usize, peer: &PeerId, addrs: &[Multiaddr]) -> String {
    let relayed = |a: &Multiaddr| {
        a.iter()
            .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit))
    };
    let kind = match (addrs.iter().any(|a| !relayed(a)), addrs.iter().any(relayed)) {
        (true, true) => "upgraded",
        (true, false) => "direct",
        (false, true) => "relayed",
        (false, false) => "unknown",
    };
    let via: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    format!("path: hop {hop} {peer} {kind} via {}", via.join(", "))
}

/// `peer (a..b) -> peer (b..c) -> ...`
pub(crate) fn describe_route(route: &[(PeerId, BlockRange)]) -> String {
    route
        .iter()
        .map(|(p, b)| format!("{p} ({b})"))
        .collect::<Vec<_>>()
        .join(" -> ")
}
