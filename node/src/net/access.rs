//! Who may connect: a node's lasting identity, a private swarm's key and
//! an allow-list of peer ids.
//!
//! * An **identity** is a node's libp2p key in a file of its own (mode
//!   0600), so its peer id survives restarts and can be named in others'
//!   allow-lists.
//! * A **swarm key** makes a private swarm. Over TCP it is libp2p's pnet:
//!   every byte after the first nonce is encrypted with it, so an outsider
//!   cannot even finish the noise handshake. pnet cannot wrap QUIC (QUIC
//!   owns its UDP packets), so a QUIC connection is held back from the
//!   swarm until both ends have proved they know the key (see `prove`): no
//!   behaviour, and no nomoat protocol, sees the connection before then.
//! * An **allow-list** admits only the peer ids it names, over every
//!   transport (libp2p's `allow_block_list`, which refuses a connection
//!   before any protocol runs on it).

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt};
use libp2p::core::muxing::{StreamMuxerBox, StreamMuxerExt};
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::core::{ConnectedPoint, Endpoint};
use libp2p::identity::Keypair;
use libp2p::{noise, pnet, tcp, yamux, PeerId, Transport};

/// How long the swarm-key proof on a new QUIC connection may take.
pub const PROOF_TIMEOUT: Duration = Duration::from_secs(10);
/// The file name of a node's identity in `$NOMOAT_HOME`.
pub const IDENTITY_FILE: &str = "node.key";

/// The first bytes of a swarm-key proof, naming the protocol.
const PROOF_MAGIC: [u8; 16] = *b"nomoat/psk/1\0\0\0\0";
/// The context of the proof key derived from a swarm key.
const PROOF_CONTEXT: &str = "nomoat 2026-12 swarm key proof over QUIC";

/// Why an identity or a swarm key could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file holds no identity or swarm key.
    #[error("{path} is not a {what}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// "nomoat identity" or "swarm key".
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// Others may read the file.
    #[error(
        "{path} can be read by other users (mode {mode:o}): run `chmod 600 {path}`, \
         or make a new one if others may have copied it"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// `create` found a file already there.
    #[error("{0} already exists; pick another path or remove it first")]
    Exists(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> AccessError + '_ {
    move |source| AccessError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Refuses a secret file that users other than its owner can read.
fn check_private(path: &Path, file: &File) -> Result<(), AccessError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = file.metadata().map_err(io_err(path))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(AccessError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    let _ = (path, file);
    Ok(())
}

/// Writes `bytes` to a new file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), AccessError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            AccessError::Exists(path.to_path_buf())
        } else {
            io_err(path)(e)
        }
    })?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Reads a secret file of at most `max` bytes, refusing it if others can
/// read it.
fn read_private(path: &Path, max: u64) -> Result<Vec<u8>, AccessError> {
    let f = File::open(path).map_err(io_err(path))?;
    check_private(path, &f)?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(&f, max + 1), &mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() as u64 > max {
        return Err(AccessError::Invalid {
            path: path.to_path_buf(),
            what: "nomoat key file",
            reason: format!("longer than {max} bytes"),
        });
    }
    Ok(bytes)
}

/// Reads the identity in `path`.
pub fn read_identity(path: &Path) -> Result<Keypair, AccessError> {
    let bytes = read_private(path, 4096)?;
    Keypair::from_protobuf_encoding(&bytes).map_err(|e| AccessError::Invalid {
        path: path.to_path_buf(),
        what: "nomoat identity",
        reason: e.to_string(),
    })
}

/// Reads the identity in `path`, or makes a new Ed25519 one there (mode
/// 0600) if there is no file.
pub fn identity(path: &Path) -> Result<Keypair, AccessError> {
    match read_identity(path) {
        Err(AccessError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| AccessError::Invalid {
                    path: path.to_path_buf(),
                    what: "nomoat identity",
                    reason: e.to_string(),
                })?;
            match write_private(path, &bytes) {
                Ok(()) => Ok(key),
                // Another process made it first: use that one.
                Err(AccessError::Exists(_)) => read_identity(path),
                Err(e) => Err(e),
            }
        }
        other => other,
    }
}

/// Identity files this process holds locked, so that no second node on
/// the machine takes the same peer id.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// The lasting identity of a node in `home` ([`IDENTITY_FILE`], made on
/// first use), locked for this process. `None` when another running node
/// holds it: two nodes with one peer id would cut each other off, so the
/// second gets a fresh identity for the run.
pub fn node_identity(home: &Path) -> Result<Option<Keypair>, AccessError> {
    let path = home.join(IDENTITY_FILE);
    let key = identity(&path)?;
    let f = File::open(&path).map_err(io_err(&path))?;
    match f.try_lock() {
        Ok(()) => {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(f);
            Ok(Some(key))
        }
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

/// The identity of the API node that `nomoat serve --api` runs beside a
/// server (a node cannot open streams to itself), derived from the
/// server's: it lasts as long as the server's does, and a server admits it
/// whatever its allow-list says.
pub fn api_identity(server: &Keypair) -> Keypair {
    let secret = server
        .derive_secret(b"nomoat api node")
        .unwrap_or_else(rand::random);
    Keypair::ed25519_from_bytes(secret).unwrap_or_else(|_| Keypair::generate_ed25519())
}

/// A private swarm's pre-shared key: 32 random bytes, in the key file
/// format of libp2p's pnet (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex
/// digits), which go-libp2p and IPFS use too.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SwarmKey(pnet::PreSharedKey);

impl std::fmt::Debug for SwarmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        write!(f, "SwarmKey({})", self.fingerprint())
    }
}

impl SwarmKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self(pnet::PreSharedKey::new(rand::random()))
    }

    /// Parses a key file's text.
    pub fn parse(text: &str) -> Result<Self, pnet::KeyParseError> {
        text.parse().map(Self)
    }

    /// Reads a key file, refusing one that others can read.
    pub fn read(path: &Path) -> Result<Self, AccessError> {
        let bytes = read_private(path, 1024)?;
        let text = String::from_utf8_lossy(&bytes);
        Self::parse(&text).map_err(|e| AccessError::Invalid {
            path: path.to_path_buf(),
            what: "swarm key",
            reason: format!("{e} (make one with `nomoat swarm-key FILE`)"),
        })
    }

    /// Makes a new key and writes it to a new file (mode 0600).
    pub fn create(path: &Path) -> Result<Self, AccessError> {
        let key = Self::generate();
        write_private(path, key.0.to_key_file().as_bytes())?;
        Ok(key)
    }

    /// A fingerprint that tells keys apart without revealing them (the
    /// same as go-libp2p's).
    pub fn fingerprint(&self) -> String {
        self.0.fingerprint().to_string()
    }

    /// The key of the QUIC proof, derived so that it is never the pnet key.
    fn proof_key(&self) -> [u8; 32] {
        // The raw bytes are reachable only through the key file text.
        let text = self.0.to_key_file();
        blake3::derive_key(PROOF_CONTEXT, text.as_bytes())
    }
}

/// Who a node lets in.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The private swarm's key; `None` for an open swarm.
    pub swarm_key: Option<SwarmKey>,
    /// Only these peers may connect (both ways); empty admits anyone
    /// (who has the swarm key, where there is one).
    pub allow: Vec<PeerId>,
}

impl Access {
    /// Whether the node admits only some peers.
    pub fn is_private(&self) -> bool {
        self.swarm_key.is_some() || !self.allow.is_empty()
    }
}

/// The transport output every nomoat transport yields.
pub(crate) type Connection = (PeerId, StreamMuxerBox);

/// TCP with noise and yamux, behind pnet when there is a swarm key.
pub(crate) fn tcp_transport(
    key: &Keypair,
    swarm_key: Option<SwarmKey>,
) -> Result<Boxed<Connection>, Box<dyn std::error::Error + Send + Sync>> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let noise = noise::Config::new(key)?;
    Ok(match swarm_key {
        None => tcp
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .boxed(),
        Some(k) => tcp
            .and_then(move |socket, _| pnet::PnetConfig::new(k.0).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .boxed(),
    })
}

/// QUIC; with a swarm key, a connection reaches the swarm only once both
/// ends have proved they hold the key.
pub(crate) fn quic_transport(key: &Keypair, swarm_key: Option<SwarmKey>) -> Boxed<Connection> {
    let quic = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(key));
    let local = key.public().to_peer_id();
    match swarm_key {
        None => quic
            .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)))
            .boxed(),
        Some(k) => {
            let proof_key = k.proof_key();
            quic.and_then(move |(peer, conn), endpoint| {
                admit_quic(conn, endpoint, proof_key, local, peer)
            })
            .boxed()
        }
    }
}

/// Runs the proof on a new QUIC connection's first stream.
fn admit_quic(
    mut conn: libp2p::quic::Connection,
    endpoint: ConnectedPoint,
    key: [u8; 32],
    local: PeerId,
    remote: PeerId,
) -> BoxFuture<'static, io::Result<Connection>> {
    // The end that is QUIC's client opens the stream (under hole punching
    // the dialer may take the listener's part).
    let opener = matches!(
        endpoint,
        ConnectedPoint::Dialer {
            role_override: Endpoint::Dialer,
            ..
        }
    );
    async move {
        let run = async {
            let mut stream = if opener {
                futures::future::poll_fn(|cx| conn.poll_outbound_unpin(cx)).await
            } else {
                futures::future::poll_fn(|cx| conn.poll_inbound_unpin(cx)).await
            }
            .map_err(io::Error::other)?;
            prove(&mut stream, &key, local, remote, opener).await?;
            let _ = stream.close().await;
            io::Result::Ok(())
        };
        match tokio::time::timeout(PROOF_TIMEOUT, run).await {
            Ok(Ok(())) => Ok((remote, StreamMuxerBox::new(conn))),
            Ok(Err(e)) => {
                tracing::debug!(%remote, "QUIC peer refused: {e}");
                Err(e)
            }
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{remote} did not prove the swarm key within {PROOF_TIMEOUT:?}"),
            )),
        }
    }
    .boxed()
}

/// The tag one end of a proof sends: a keyed hash of both nonces and both
/// peer ids, under the end's role, so no tag can be replayed on another
/// connection, by another peer or in the other direction.
fn tag(
    key: &[u8; 32],
    role: &[u8],
    nonces: (&[u8; 32], &[u8; 32]),
    opener: PeerId,
    acceptor: PeerId,
) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(role);
    h.update(nonces.0);
    h.update(nonces.1);
    for p in [opener, acceptor] {
        let b = p.to_bytes();
        h.update(&(b.len() as u32).to_le_bytes());
        h.update(&b);
    }
    h.finalize()
}

/// The swarm-key proof, both ends: the opener sends the magic and its
/// nonce; the acceptor answers its nonce and tag; the opener checks that
/// tag and sends its own, which the acceptor checks. Each end learns that
/// the other holds the key and nothing else. Fails with
/// `PermissionDenied` on a wrong tag.
pub(crate) async fn prove<S>(
    stream: &mut S,
    key: &[u8; 32],
    local: PeerId,
    remote: PeerId,
    opener: bool,
) -> io::Result<()>
where
    S: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    let denied = |what: &str| io::Error::new(io::ErrorKind::PermissionDenied, what.to_string());
    let mine: [u8; 32] = rand::random();
    let mut theirs = [0u8; 32];
    let mut got = [0u8; 32];
    if opener {
        let mut hello = PROOF_MAGIC.to_vec();
        hello.extend_from_slice(&mine);
        stream.write_all(&hello).await?;
        stream.flush().await?;
        stream.read_exact(&mut theirs).await?;
        stream.read_exact(&mut got).await?;
        let want = tag(key, b"acceptor", (&mine, &theirs), local, remote);
        if want != blake3::Hash::from_bytes(got) {
            return Err(denied("the peer does not hold this swarm's key"));
        }
        let own = tag(key, b"opener", (&mine, &theirs), local, remote);
        stream.write_all(own.as_bytes()).await?;
        stream.flush().await?;
    } else {
        let mut magic = [0u8; PROOF_MAGIC.len()];
        stream.read_exact(&mut magic).await?;
        if magic != PROOF_MAGIC {
            return Err(denied("the peer sent no swarm-key proof"));
        }
        stream.read_exact(&mut theirs).await?;
        let own = tag(key, b"acceptor", (&theirs, &mine), remote, local);
        let mut answer = mine.to_vec();
        answer.extend_from_slice(own.as_bytes());
        stream.write_all(&answer).await?;
        stream.flush().await?;
        stream.read_exact(&mut got).await?;
        let want = tag(key, b"opener", (&theirs, &mine), remote, local);
        if want != blake3::Hash::from_bytes(got) {
            return Err(denied("the peer does not hold this swarm's key"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs both ends of a proof over an in-memory pipe.
    async fn run(a: [u8; 32], b: [u8; 32]) -> (io::Result<()>, io::Result<()>) {
        let (x, y) = tokio::io::duplex(1024);
        let (mut x, mut y) = (
            tokio_util::compat::TokioAsyncReadCompatExt::compat(x),
            tokio_util::compat::TokioAsyncReadCompatExt::compat(y),
        );
        let (p, q) = (PeerId::random(), PeerId::random());
        // Each end drops its stream when done, as a refused connection does.
        tokio::join!(
            async move { prove(&mut x, &a, p, q, true).await },
            async move { prove(&mut y, &b, q, p, false).await }
        )
    }

    #[tokio::test]
    async fn the_proof_admits_the_same_key_and_refuses_another() {
        let k = SwarmKey::generate().proof_key();
        let (a, b) = run(k, k).await;
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
        let other = SwarmKey::generate().proof_key();
        let (a, b) = run(k, other).await;
        assert_eq!(a.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        // The acceptor never gets a tag from an opener that gave up.
        assert!(b.is_err());
    }

    #[test]
    fn key_files_round_trip_and_stay_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swarm.key");
        let k = SwarmKey::create(&path).unwrap();
        assert_eq!(SwarmKey::read(&path).unwrap(), k);
        assert!(matches!(
            SwarmKey::create(&path),
            Err(AccessError::Exists(_))
        ));
        assert!(!format!("{k:?}").contains(&k.0.to_key_file()[30..]));
        let id = dir.path().join("id.key");
        let a = identity(&id).unwrap();
        let b = identity(&id).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                read_identity(&id),
                Err(AccessError::Exposed { .. })
            ));
            std::fs::write(
                dir.path().join("bad.key"),
                "/key/swarm/psk/1.0.0/\n/base16/\nzz",
            )
            .unwrap();
            std::fs::set_permissions(
                dir.path().join("bad.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            assert!(matches!(
                SwarmKey::read(&dir.path().join("bad.key")),
                Err(AccessError::Invalid { .. })
            ));
        }
    }

    #[test]
    fn the_api_identity_lasts_with_the_servers() {
        let server = Keypair::generate_ed25519();
        let a = api_identity(&server).public().to_peer_id();
        assert_eq!(a, api_identity(&server).public().to_peer_id());
        assert_ne!(a, server.public().to_peer_id());
    }

    #[test]
    fn a_second_node_in_one_home_gets_its_own_identity() {
        let dir = tempfile::tempdir().unwrap();
        let first = node_identity(dir.path()).unwrap();
        assert!(first.is_some());
        assert!(node_identity(dir.path()).unwrap().is_none());
    }
}
