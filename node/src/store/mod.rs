//! The content-addressed chunk store: the ground floor of weight sharing.
//!
//! * [`ChunkStore`]: chunks named by their BLAKE3 hash and manifests under
//!   `$NOMOAT_HOME/store`, verified before they are written.
//! * [`background`]: the low-priority threads that hash and write fetched
//!   chunks while the network and compute threads run.
//!
//! The store knows [`nomoat_protocol::Manifest`] and nothing above it: the
//! engine reads weights from it, and `weights/` fills it.

pub mod background;
mod chunks;

pub use chunks::{ChunkStore, StoreError, VerifyReport};
