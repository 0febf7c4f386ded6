//! Weight sharing: models as manifests and BLAKE3-verified chunks.
//!
//! * [`import`](mod@import): a GGUF file or safetensors directory into the
//!   [`store`](crate::store).
//! * [`adapter`]: LoRA adapters (PEFT or GGUF) into the store, and out.
//! * [`serve`]: answers `/nomoat/weights/1` from the store.
//! * [`fetch`]: fetches a manifest and the chunks of a span from peers.
//! * [`model`]: a model id's weights on this node, completed from peers,
//!   and the model file opened from them.

pub mod adapter;
pub mod fetch;
pub mod import;
pub mod model;
pub mod serve;

pub use adapter::{import_adapter, open_adapter, store_adapter, AdapterError, AdapterImport};
pub use import::{import, ImportError, ImportReport};
pub use model::{open_for_generate, ModelError, StoreModel};

/// Whether `--model` names a model id (64 hex digits) rather than a file,
/// a directory or a catalog name.
pub fn parse_model_id(spec: &str) -> Option<nomoat_protocol::Hash> {
    if std::path::Path::new(spec).exists() {
        return None;
    }
    nomoat_protocol::Hash::from_hex(spec).ok()
}

/// The id of a model file: BLAKE3 of its bytes, hex.
pub fn model_file_id(path: &std::path::Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for f in files {
            hasher.update(
                f.file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or_default(),
            );
            hasher.update_reader(std::fs::File::open(&f)?)?;
        }
    } else {
        hasher.update_reader(std::fs::File::open(path)?)?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}
