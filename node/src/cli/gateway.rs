//! `nomoat gateway`: the OpenAI-compatible API, dashboard and metrics, in
//! front of a swarm or of the whole model on this machine.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use libp2p::Multiaddr;
use nomoat_node::engine::{ChatTokenizer, LocalModel, WeightMode};
use nomoat_node::gateway::{
    self, model_name, open_model, swarm_gateway, Backend, Gateway, GatewayConfig, DEFAULT_API_ADDR,
    DEFAULT_MAX_CONCURRENT,
};
use nomoat_node::shutdown::shutdown_signal;
use tokio_util::sync::CancellationToken;

/// `nomoat gateway`.
#[derive(Debug, Args)]
pub(crate) struct GatewayArgs {
    /// A catalog name, a .gguf file or a safetensors directory: the gateway
    /// holds its tokenizer and head (the whole model without --swarm).
    #[arg(long, env = "NOMOAT_MODEL")]
    model: String,
    /// Run the blocks on the swarm reached through this peer (repeatable;
    /// an address ending in /p2p/PEER_ID). Without it the gateway runs the
    /// whole model itself.
    #[arg(long)]
    swarm: Vec<Multiaddr>,
    /// Address of the HTTP API and dashboard (port 0: any free port).
    #[arg(long, default_value = DEFAULT_API_ADDR)]
    api: SocketAddr,
    /// The model name clients use (default: the --model value, or the file's
    /// name without extension).
    #[arg(long)]
    name: Option<String>,
    /// fast, compact, exact or f32 (see `nomoat generate --help`).
    #[arg(long, default_value = "fast")]
    weights: WeightMode,
    /// Requests generating at once; more get 429.
    #[arg(long, default_value_t = DEFAULT_MAX_CONCURRENT)]
    max_concurrent: usize,
    /// Seconds a swarm step may take before the failing hop is reported.
    #[arg(long, default_value_t = 30.0)]
    step_timeout: f64,
    /// Address of the gateway's own peer-to-peer node (repeatable). The
    /// default, every interface on any free port, reaches other machines.
    #[arg(long, default_values = nomoat_node::net::DEFAULT_LISTEN)]
    listen: Vec<Multiaddr>,
    /// The dtype hidden states travel in to and from the swarm: f32, f16,
    /// bf16 or q8 (see `nomoat generate --help`).
    #[arg(long, default_value = "f32", value_parser = crate::parse_wire_dtype)]
    wire_dtype: nomoat_protocol::DType,
    /// Spot checks of the swarm's work (see `nomoat generate --help`). In
    /// async mode a streamed answer caught on a lie ends with an error
    /// (its text cannot be taken back); strict sends only checked text.
    #[arg(long, default_value_t = nomoat_node::client::verify::VerifyMode::Async)]
    verify: nomoat_node::client::verify::VerifyMode,
    #[command(flatten)]
    keys: ApiKeyArgs,
    #[command(flatten)]
    access: crate::cli::access::AccessArgs,
}

/// The API keys of a gateway.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ApiKeyArgs {
    /// A key clients must send to /v1 as `Authorization: Bearer KEY`
    /// (repeatable). Without any key the API is open to whoever reaches
    /// --api.
    #[arg(long)]
    api_key: Vec<String>,
    /// A file of API keys, one per line (blank lines and `#` comments are
    /// skipped).
    #[arg(long)]
    api_key_file: Option<std::path::PathBuf>,
}

impl ApiKeyArgs {
    /// Every key given, from the flags and the file.
    pub(crate) fn keys(&self) -> Result<Vec<String>> {
        let mut keys = self.api_key.clone();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the API keys in {}", path.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        Ok(keys)
    }
}

/// Warns when an API without keys listens beyond this machine.
pub(crate) fn warn_if_open(addr: SocketAddr, keys: &[String]) {
    if keys.is_empty() && !addr.ip().is_loopback() {
        eprintln!(
            "warning: the API on {addr} has no key: anyone who can reach it can generate \
             (and see the dashboard); set --api-key or NOMOAT_API_KEY"
        );
    }
}

/// Prints the gateway's JSON line: API, dashboard and metrics URLs.
fn print_urls(addr: SocketAddr, model: &str) -> Result<()> {
    let hello = serde_json::json!({
        "api": format!("http://{addr}/v1"),
        "dashboard": format!("http://{addr}/"),
        "metrics": format!("http://{addr}/metrics"),
        "model": model,
    });
    println!("{hello}");
    std::io::stdout().flush()?;
    Ok(())
}

pub(crate) async fn run_gateway(args: GatewayArgs) -> Result<()> {
    let name = args.name.clone().unwrap_or_else(|| model_name(&args.model));
    let keys = args.keys.keys()?;
    warn_if_open(args.api, &keys);
    let shutdown = CancellationToken::new();
    let cfg = |c: GatewayConfig| {
        c.with_max_concurrent(args.max_concurrent)
            .with_step_timeout(Duration::from_secs_f64(args.step_timeout.max(0.1)))
            .with_wire_dtype(args.wire_dtype)
            .with_verify(args.verify)
            .with_api_keys(keys.clone())
    };
    let cfg = cfg(GatewayConfig::new(name.clone()));
    let net_cfg = args.access.config(
        nomoat_node::net::NetConfig {
            listen: args.listen.clone(),
            ..Default::default()
        },
        false,
    )?;
    let (file, model_id) = open_model(&args.model, &args.swarm, &net_cfg).await?;
    let hidden = file.config().hidden_size;
    if hidden % args.wire_dtype.block_len() != 0 {
        anyhow::bail!(
            "--wire-dtype {}: the model's hidden size {hidden} is not a multiple of {}; use f16",
            args.wire_dtype,
            args.wire_dtype.block_len()
        );
    }
    let (gw, net) = if args.swarm.is_empty() {
        // Adapters imported here for this model can run on it.
        let cfg = match nomoat_node::store::ChunkStore::open(&nomoat_node::catalog::home()) {
            Ok(store) => {
                let base_id = match &model_id {
                    Some(id) => id.clone(),
                    None => nomoat_node::weights::model_file_id(file.path())?,
                };
                cfg.with_adapters(store, base_id)
            }
            Err(_) => cfg,
        };
        let tokenizer = ChatTokenizer::from_model(&file)?;
        let weights = args.weights;
        let model = tokio::task::block_in_place(|| LocalModel::load_whole(&file, weights))?;
        let gw = Gateway::new(
            cfg,
            Backend::Local(Arc::new(model)),
            tokenizer,
            file.config().clone(),
            shutdown.clone(),
        );
        (gw, None)
    } else {
        let (gw, net) = swarm_gateway(
            &file,
            model_id.context("a swarm's model has an id")?,
            cfg,
            args.swarm.clone(),
            net_cfg,
            args.weights,
            shutdown.clone(),
        )
        .await?;
        match gw.refresh().await {
            Ok(g) if g.is_empty() => eprintln!("the swarm covers every block"),
            Ok(g) => eprintln!(
                "the swarm does not serve blocks {} yet: requests get 503 until it does",
                nomoat_node::client::ranges_text(&g)
            ),
            Err(e) => eprintln!("the swarm did not answer yet ({e}); retrying in the background"),
        }
        (gw, Some(net))
    };
    let (listener, addr) = gateway::bind(args.api).await?;
    print_urls(addr, &name)?;
    let server = tokio::spawn(gateway::serve(gw, listener, shutdown.clone()));
    shutdown_signal().await;
    eprintln!("shutting down");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    if let Some(net) = net {
        net.shutdown().await;
    }
    Ok(())
}
