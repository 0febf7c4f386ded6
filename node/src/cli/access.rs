//! Identity and private-swarm flags shared by every network command, and
//! `nomoat swarm-key` and `nomoat peer-id`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use libp2p::PeerId;
use nomoat_node::net::access::{self, Access, SwarmKey};
use nomoat_node::net::NetConfig;

/// Who a node is and whom it lets in.
#[derive(Debug, Clone, Args)]
pub(crate) struct AccessArgs {
    /// The node's identity key file, made (mode 0600) if missing, so its
    /// peer id lasts across restarts. Servers and relays default to
    /// $NOMOAT_HOME/node.key (a second node on the machine then gets a new
    /// identity per run); other commands to a new identity per run.
    #[arg(long)]
    identity: Option<PathBuf>,
    /// A private swarm's key file (`nomoat swarm-key FILE` makes one). Only
    /// nodes that hold it can connect: over TCP by libp2p's pnet, over QUIC
    /// by a proof of the key before any protocol runs.
    #[arg(long)]
    swarm_key: Option<PathBuf>,
    /// Connect only with this peer id (repeatable), both ways and over
    /// every transport. Every peer of the swarm this node talks to must be
    /// listed, bootstrap peers included.
    #[arg(long)]
    allow_peer: Vec<PeerId>,
}

impl AccessArgs {
    /// `cfg` with this identity and access; `lasting` gives a node the
    /// identity of `$NOMOAT_HOME` when no file is named.
    pub(crate) fn config(&self, mut cfg: NetConfig, lasting: bool) -> Result<NetConfig> {
        cfg.keypair = match &self.identity {
            Some(path) => Some(access::identity(path)?),
            None if lasting => {
                let home = nomoat_node::catalog::home();
                let key = access::node_identity(&home)?;
                if key.is_none() {
                    eprintln!(
                        "another node on this machine holds {}: this one gets a new peer id \
                         each run (pass --identity FILE for a lasting one)",
                        home.join(access::IDENTITY_FILE).display()
                    );
                }
                key
            }
            None => None,
        };
        cfg.access = Access {
            swarm_key: self.swarm_key.as_deref().map(SwarmKey::read).transpose()?,
            allow: self.allow_peer.clone(),
        };
        Ok(cfg)
    }
}

/// `nomoat swarm-key FILE`: writes a new swarm key and prints its
/// fingerprint.
pub(crate) fn swarm_key(path: &Path) -> Result<()> {
    let key = SwarmKey::create(path)?;
    println!("{}", key.fingerprint());
    eprintln!(
        "wrote a new swarm key to {} (fingerprint above). Copy it to every member, \
         keep it private, and pass --swarm-key {} to each node.",
        path.display(),
        path.display()
    );
    Ok(())
}

/// `nomoat peer-id`: prints the peer id of an identity file (made if
/// missing), and that of the API node `serve --api` runs beside it.
pub(crate) fn peer_id(identity: Option<PathBuf>, json: bool) -> Result<()> {
    let path = identity.unwrap_or_else(|| nomoat_node::catalog::home().join(access::IDENTITY_FILE));
    let key = access::identity(&path)?;
    let peer = key.public().to_peer_id();
    let api = access::api_identity(&key).public().to_peer_id();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "identity": path.display().to_string(),
                "peer_id": peer.to_string(),
                "api_peer_id": api.to_string(),
            })
        );
    } else {
        println!("{peer}");
        eprintln!(
            "the identity in {}; `serve --api` runs its API node as {api}",
            path.display()
        );
    }
    Ok(())
}
