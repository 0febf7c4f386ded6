//! nomoat node: the span engine, the model catalog and the `nomoat` command.
//!
//! A node holds a contiguous span of a model's transformer blocks. The
//! [`engine`] runs any span `[a, b)` on its own and gives exactly what the
//! whole model gives; a client holds the [`engine::Head`] (token embedding,
//! final norm and LM head) and drives generation. Hidden states cross span
//! boundaries as [`nomoat_protocol::TensorFrame`]s, the encoding the network
//! carries.

pub mod catalog;
pub mod engine;
pub mod gateway;
pub mod metrics;
pub mod swarm;
pub mod weights;
