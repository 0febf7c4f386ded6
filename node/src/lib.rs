//! nomoat node: everything a peer of the swarm runs, and the `nomoat` command.
//!
//! A node holds a contiguous span of a model's transformer blocks. The
//! [`engine`] runs any span `[a, b)` on its own and gives exactly what the
//! whole model gives; a client holds the [`engine::Head`] (token embedding,
//! final norm and LM head) and drives generation. Hidden states cross span
//! boundaries as [`nomoat_protocol::TensorFrame`]s, the encoding the network
//! carries. DESIGN.md opens with a map of these modules.
//!
//! * [`net`]: the one owner of the libp2p `Swarm`; everything else talks to
//!   the network through its [`net::NetHandle`].
//! * [`client`]: sessions along a route, failover and the token loop.
//! * [`server`]: one hop of a route, the executor thread and rebalancing.
//! * [`store`]: content-addressed chunks; [`weights`]: import, serve, fetch
//!   and opening a stored model.
//! * [`gateway`]: the OpenAI-compatible API, dashboard and metrics.
//! * [`node`](mod@node): a whole server assembled from these parts.
//! * `netbed` (Linux): the multi-host test bed of network namespaces that
//!   the tests and `nomoat bench wan` run on.

pub mod catalog;
pub mod client;
pub mod engine;
pub mod gateway;
pub mod metrics;
pub mod net;
#[cfg(target_os = "linux")]
pub mod netbed;
pub mod node;
pub mod process;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod weights;
