//! Weight sharing: models as manifests and BLAKE3-verified chunks.
//!
//! * [`store`]: the content-addressed store under `$NOMOAT_HOME/store`.
//! * [`import`](mod@import): a GGUF file or safetensors directory into the store.
//! * [`serve`]: answers `/nomoat/weights/1` from the store.
//! * [`fetch`]: fetches a manifest and the chunks of a span from peers.

pub mod background;
pub mod fetch;
pub mod import;
pub mod serve;
pub mod store;

pub use import::{import, ImportError, ImportReport};
pub use store::{ChunkStore, StoreError, VerifyReport};

/// Whether `--model` names a model id (64 hex digits) rather than a file,
/// a directory or a catalog name.
pub fn parse_model_id(spec: &str) -> Option<nomoat_protocol::Hash> {
    if std::path::Path::new(spec).exists() {
        return None;
    }
    nomoat_protocol::Hash::from_hex(spec).ok()
}
