//! Real `nomoat serve` processes with the real SmolLM2: three honest
//! servers of overlapping spans and a lying replica of the middle one. A
//! generation routed through the liar ends with the local text, the liar
//! is banned and off the route; a second client (a `nomoat gateway`
//! process), which never routes through the liar, learns of the ban from
//! the evidence the first one gossips, re-checked on its own chains; a
//! third client, which joins after, checks the liar from its first session
//! too.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use libp2p::{Multiaddr, PeerId};
use nomoat_node::client::verify::{VerifyMode, VerifyOptions};
use nomoat_node::client::{generate, RemoteSession, Stepper};
use nomoat_node::engine::{
    ChatMessage, ChatTokenizer, GenerateOptions, Head, LocalModel, ModelFile, SamplingParams,
    WeightMode,
};
use nomoat_protocol::{BlockRange, Hop};
use nomoat_tests::harness::{client_net, discover_n, Proc};

nomoat_tests::process_helpers!();

/// A SmolLM2 server at one thread.
fn server(blocks: &str, boot: Option<&str>, extra: &[&str]) -> Result<Proc> {
    smollm2_serve(blocks, boot, &[&["--threads", "1"], extra].concat())
}

fn hop(p: &Proc, start: u32, end: u32) -> Result<Hop> {
    Ok(Hop {
        peer_id: p.peer_id().parse::<PeerId>()?.to_bytes(),
        blocks: BlockRange { start, end },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_server_process_is_caught_and_the_text_stays_the_local_one() -> Result<()> {
    let path = nomoat_node::catalog::resolve("smollm2-135m", false)?;
    let file = ModelFile::open(&path)?;
    let model_id = nomoat_node::weights::model_file_id(&path)?;
    let tok = ChatTokenizer::from_model(&file)?;
    let prompt = tok.encode(&tok.chat_prompt(&[ChatMessage::new(
        "user",
        "Name three things a lighthouse keeper does every day.",
    )]))?;
    let opts = GenerateOptions {
        max_tokens: 40,
        sampling: SamplingParams::greedy(),
        stop_ids: Vec::new(),
    };
    let want = LocalModel::load_whole(&file, WeightMode::Fast)?
        .generate(&prompt, &opts, |_| Ok(true))?
        .0;

    let c = server("14..30", None, &[])?;
    let boot = c.addr();
    let a = server("0..16", Some(&boot), &[])?;
    let b = server("8..24", Some(&boot), &[])?;
    // Honest for its first 8 steps of every session, then noisy.
    let liar = server(
        "8..24",
        Some(&boot),
        &["--fault-compute", "perturb:0.3,after=8"],
    )?;
    let liar_id: PeerId = liar.peer_id().parse()?;
    let gateway = nomoat_tests::web::NomoatProc::spawn(
        &nomoat_bin()?,
        &[
            "gateway",
            "--model",
            "smollm2-135m",
            "--api",
            "127.0.0.1:0",
            "--swarm",
            &boot,
        ],
        Duration::from_secs(120),
    )?;
    let api = gateway.http_addr()?;
    let boot: Vec<Multiaddr> = vec![boot.parse()?];
    let head = Arc::new(Head::load(&file, WeightMode::Fast)?);
    let max_len = (prompt.len() + opts.max_tokens + 2) as u32;

    for round in 0..2 {
        // A new client each round: the second never met the liar.
        let net = client_net().await?;
        net.subscribe(&model_id).await;
        discover_n(&net, &boot, &model_id, 4).await?;
        let route = vec![hop(&a, 0, 8)?, hop(&liar, 8, 24)?, hop(&c, 24, 30)?];
        let mut session =
            RemoteSession::open(&net, &model_id, route, max_len, Duration::from_secs(60)).await?;
        session.set_verify(VerifyOptions::new(VerifyMode::Async));
        let mut stepper = Stepper::swarm(head.clone(), session);
        let mut got = Vec::new();
        let mut sink = Collect(&mut got);
        let (out, _) = generate(&mut stepper, &prompt, &opts, max_len as usize, &mut sink).await?;
        assert_eq!(
            tok.decode(&out, true)?,
            tok.decode(&want, true)?,
            "round {round}: the text must be the local one"
        );
        assert_eq!(got, want, "round {round}");
        assert!(net.is_banned(&liar_id), "round {round}: the liar is banned");
        for honest in [&a, &b, &c] {
            let p: PeerId = honest.peer_id().parse()?;
            assert!(
                !net.is_banned(&p),
                "round {round}: an honest server was banned"
            );
        }
        let remote = stepper.remote().expect("a swarm session");
        assert!(remote.route().iter().all(|(p, _)| *p != liar_id));
        stepper.close().await;
        net.shutdown().await;
        if round == 0 {
            gateway_learns_of_the_ban(api, liar_id, [&a, &b, &c]).await?;
        }
    }
    drop((a, b, c, liar, gateway));
    Ok(())
}

/// Waits until the gateway's swarm view shows the liar banned (from the
/// evidence alone: the gateway ran no session) and no honest server.
async fn gateway_learns_of_the_ban(
    api: std::net::SocketAddr,
    liar: PeerId,
    honest: [&Proc; 3],
) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let view = nomoat_node::gateway::http::request(
            api,
            "GET",
            "/api/swarm",
            None,
            Duration::from_secs(30),
        )
        .await?
        .json();
        let peers = view["peers"].as_array().cloned().unwrap_or_default();
        let banned = |p: &str| {
            peers
                .iter()
                .any(|v| v["peer_id"] == p && v["banned"] == true)
        };
        if banned(&liar.to_string()) {
            for h in honest {
                anyhow::ensure!(!banned(&h.peer_id()), "the gateway banned an honest server");
            }
            anyhow::ensure!(
                view["sessions"].as_array().is_some_and(Vec::is_empty),
                "the gateway ran sessions: {view}"
            );
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the gateway did not ban the liar from the evidence within 120 s: {view}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Collects tokens; takes back those after a rewind.
struct Collect<'a>(&'a mut Vec<u32>);

impl nomoat_node::client::TokenSink for Collect<'_> {
    async fn token(&mut self, id: u32) -> Result<bool, nomoat_node::client::StepError> {
        self.0.push(id);
        Ok(true)
    }

    async fn rewind(
        &mut self,
        keep: usize,
        _liar: PeerId,
    ) -> Result<(), nomoat_node::client::StepError> {
        self.0.truncate(keep);
        Ok(())
    }
}
