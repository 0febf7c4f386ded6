//! The swarm: networking, the executor, servers and clients.

pub mod client;
pub mod executor;
pub mod net;
pub mod process;
pub mod rebalance;
pub mod server;
pub mod wire;

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
