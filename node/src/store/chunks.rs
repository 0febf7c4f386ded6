//! The content-addressed weight store under `$NOMOAT_HOME/store`.
//!
//! ```text
//! store/chunks/ab/abcdef...   one file per chunk, named by its BLAKE3 hash (hex)
//! store/manifests/<model id>  a manifest's canonical bytes
//! ```
//!
//! A chunk is hashed before it is written; it is written to a temporary file
//! in its final directory (past the page cache where the filesystem allows
//! `O_DIRECT`), flushed to disk, and renamed into place, so a crash leaves
//! either no chunk or a whole verified one (a temporary file starts with `.`
//! and is never read as a chunk). Stored chunks are trusted by the loader
//! and re-hashed on demand by [`ChunkStore::verify`].

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::store::background::thread_cpu_time;
use nomoat_protocol::{ChunkRef, Hash, Have, Manifest, MessageError, TensorRole};

/// Why the weight store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The disk is full.
    #[error("the disk is full while writing {path}: free some space, or set NOMOAT_HOME to a directory on a larger disk")]
    DiskFull {
        /// The file being written.
        path: PathBuf,
    },
    /// The store's directory cannot be written.
    #[error("cannot write {path} ({source}): make it writable, or set NOMOAT_HOME to a writable directory")]
    NotWritable {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Another I/O failure.
    #[error("weight store I/O on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Data does not hash to the name it was to be stored under.
    #[error("chunk data hashes to {got}, not {expected}: refused (nothing was stored)")]
    WrongHash {
        /// The name it came with.
        expected: Hash,
        /// Its hash.
        got: Hash,
    },
    /// The store has no manifest for a model id.
    #[error("model {0:#} is not in the weight store: import it with `nomoat import FILE`, or fetch it with `nomoat serve --model ID --bootstrap PEER`")]
    UnknownModel(Hash),
    /// A stored manifest does not decode (corrupt on disk).
    #[error("the stored manifest of {id} is corrupt ({source}): delete {path} and fetch or import it again")]
    BadManifest {
        /// The model id.
        id: Hash,
        /// Its file.
        path: PathBuf,
        /// Why.
        source: MessageError,
    },
}

fn io_error(path: &Path, source: std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    match source.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => StoreError::DiskFull { path },
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem | ErrorKind::NotADirectory => {
            StoreError::NotWritable { path, source }
        }
        _ => StoreError::Io { path, source },
    }
}

/// Makes temporary file names unique within the process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Creates `tmp`, writes `data` and flushes it to disk; `direct` writes past
/// the page cache.
fn write_file(tmp: &Path, data: &[u8], direct: bool) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if direct {
        return direct_io::write(tmp, data);
    }
    let _ = direct;
    let mut f = File::create(tmp)?;
    f.write_all(data)?;
    f.sync_data()
}

/// Whether a write failed because the filesystem does not do `O_DIRECT`.
fn refuses_direct_io(e: &std::io::Error) -> bool {
    #[cfg(target_os = "linux")]
    {
        e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = e;
        false
    }
}

/// Chunk writes past the page cache. A fetched chunk goes to disk once and
/// is read back once, when the span loads into the engine's own memory, so
/// a page-cache copy would only cost CPU (the copy in, the writeback) and
/// push out other pages. Measured on a 2-core VM, a durable 1 MiB chunk
/// write took about half the CPU this way (0.3-0.8 ms against 0.6-2.2 ms,
/// kernel writeback included).
#[cfg(target_os = "linux")]
mod direct_io {
    use std::cell::RefCell;
    use std::fs::OpenOptions;
    use std::io::{ErrorKind, IoSlice, Write};
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;

    /// `O_DIRECT` needs buffers, offsets and lengths aligned to the device's
    /// block; 4096 covers every common one.
    const ALIGN: usize = 4096;

    #[derive(Clone, Copy)]
    #[repr(C, align(4096))]
    struct Block([u8; ALIGN]);

    thread_local! {
        /// Each store thread's aligned buffer, reused chunk after chunk.
        static BUF: RefCell<Vec<Block>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn write(tmp: &Path, data: &[u8]) -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(tmp)?;
        BUF.with_borrow_mut(|buf| -> std::io::Result<()> {
            let n = data.len().div_ceil(ALIGN);
            if buf.len() < n {
                buf.resize(n, Block([0; ALIGN]));
            }
            for (b, c) in buf.iter_mut().zip(data.chunks(ALIGN)) {
                b.0[..c.len()].copy_from_slice(c);
                // The last block's padding is cut off below.
                b.0[c.len()..].fill(0);
            }
            let mut slices: Vec<IoSlice<'_>> =
                buf[..n].iter().map(|b| IoSlice::new(&b.0)).collect();
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                let written = f.write_vectored(rest)?;
                if written == 0 {
                    return Err(std::io::Error::from(ErrorKind::WriteZero));
                }
                IoSlice::advance_slices(&mut rest, written);
            }
            Ok(())
        })?;
        if !data.len().is_multiple_of(ALIGN) {
            f.set_len(data.len() as u64)?;
        }
        f.sync_data()
    }
}

/// The weight store: chunks and manifests by hash. Cheap to clone; every
/// method is blocking file I/O (call it from a blocking thread in async code).
#[derive(Debug, Clone)]
pub struct ChunkStore {
    root: PathBuf,
    /// Whether chunk writes still try `O_DIRECT` (cleared the first time
    /// the filesystem refuses it).
    direct: Arc<AtomicBool>,
}

/// What [`ChunkStore::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chunks of the manifest that are stored and hash right.
    pub good: usize,
    /// Chunks that were stored but did not hash right (now deleted).
    pub bad: Vec<Hash>,
    /// Chunks of the manifest that are not stored.
    pub missing: usize,
    /// Distinct chunks in the manifest.
    pub total: usize,
}

impl ChunkStore {
    /// The store under `home` (`$NOMOAT_HOME`), created if needed.
    pub fn open(home: &Path) -> Result<Self, StoreError> {
        let root = home.join("store");
        for d in [root.join("chunks"), root.join("manifests")] {
            fs::create_dir_all(&d).map_err(|e| io_error(&d, e))?;
        }
        Ok(Self {
            root,
            direct: Arc::new(AtomicBool::new(cfg!(target_os = "linux"))),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a chunk lives.
    pub fn chunk_path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Where a manifest lives.
    pub fn manifest_path(&self, id: &Hash) -> PathBuf {
        self.root.join("manifests").join(id.to_hex())
    }

    /// Whether a chunk is stored.
    pub fn has(&self, hash: &Hash) -> bool {
        self.chunk_path(hash).is_file()
    }

    /// Writes `data` to `path` atomically: temporary file in the same
    /// directory, flushed to disk, renamed into place. A chunk is written
    /// past the page cache (`O_DIRECT`) where the filesystem allows it.
    fn write_atomic(&self, path: &Path, data: &[u8], chunk: bool) -> Result<(), StoreError> {
        let dir = path.parent().unwrap_or(&self.root);
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = |direct: bool| match write_file(&tmp, data, direct) {
            // The fan-out directory is made on first use only.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                fs::create_dir_all(dir)?;
                write_file(&tmp, data, direct)
            }
            other => other,
        };
        let direct = chunk && self.direct.load(Ordering::Relaxed);
        let result = match write(direct) {
            Err(e) if direct && refuses_direct_io(&e) => {
                // Not on this filesystem (some network ones, tmpfs before
                // Linux 6.6): buffered from now on.
                self.direct.store(false, Ordering::Relaxed);
                let _ = fs::remove_file(&tmp);
                write(false)
            }
            other => other,
        }
        .and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(io_error(path, e));
        }
        Ok(())
    }

    /// Stores a chunk after checking that `data` hashes to `hash`. Returns
    /// whether it was new (a chunk already stored is not written again).
    pub fn put(&self, hash: &Hash, data: &[u8]) -> Result<bool, StoreError> {
        self.put_timed(hash, data).map(|(new, _)| new)
    }

    /// [`put`](Self::put), also returning the CPU time spent hashing.
    pub fn put_timed(
        &self,
        hash: &Hash,
        data: &[u8],
    ) -> Result<(bool, std::time::Duration), StoreError> {
        let (t, cpu) = (std::time::Instant::now(), thread_cpu_time());
        let got = Hash::of(data);
        // CPU time, not wall time: a low-priority thread may be preempted.
        let hashing = match (cpu, thread_cpu_time()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => t.elapsed(),
        };
        if got != *hash {
            return Err(StoreError::WrongHash {
                expected: *hash,
                got,
            });
        }
        let path = self.chunk_path(hash);
        if path.is_file() {
            return Ok((false, hashing));
        }
        self.write_atomic(&path, data, true)?;
        Ok((true, hashing))
    }

    /// Reads a stored chunk (`None` if it is not stored).
    pub fn get(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.chunk_path(hash);
        match fs::read(&path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path, e)),
        }
    }

    /// Appends a stored chunk to `out`; `false` if it is not stored.
    pub fn read_into(&self, hash: &Hash, out: &mut Vec<u8>) -> Result<bool, StoreError> {
        let path = self.chunk_path(hash);
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(out).map_err(|e| io_error(&path, e))?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error(&path, e)),
        }
    }

    /// Stores a manifest (its canonical bytes) and returns its id.
    pub fn put_manifest(&self, manifest: &Manifest) -> Result<Hash, StoreError> {
        let bytes = manifest.encode();
        let id = Hash::of(&bytes);
        let path = self.manifest_path(&id);
        if !path.is_file() {
            self.write_atomic(&path, &bytes, false)?;
        }
        Ok(id)
    }

    /// The manifest's canonical bytes, if stored (checked against the id).
    pub fn manifest_bytes(&self, id: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.manifest_path(id);
        match fs::read(&path) {
            Ok(b) if Hash::of(&b) == *id => Ok(Some(b)),
            Ok(b) => Err(StoreError::BadManifest {
                id: *id,
                path,
                source: MessageError::WrongHash {
                    what: "stored manifest",
                    expected: id.to_hex(),
                    got: Hash::of(&b).to_hex(),
                },
            }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path, e)),
        }
    }

    /// A stored manifest, checked against its id.
    pub fn manifest(&self, id: &Hash) -> Result<Manifest, StoreError> {
        let bytes = self
            .manifest_bytes(id)?
            .ok_or(StoreError::UnknownModel(*id))?;
        Manifest::decode(&bytes).map_err(|source| StoreError::BadManifest {
            id: *id,
            path: self.manifest_path(id),
            source,
        })
    }

    /// The chunks of `chunks` that are not stored.
    pub fn missing(&self, chunks: &[ChunkRef]) -> Vec<ChunkRef> {
        chunks
            .iter()
            .filter(|c| !self.has(&c.hash))
            .copied()
            .collect()
    }

    /// Which blocks (and whether the head) of `manifest` are stored entirely.
    pub fn have(&self, manifest: &Manifest) -> Have {
        let shared = manifest
            .tensors
            .iter()
            .filter(|t| t.role == TensorRole::Shared)
            .all(|t| t.chunks.iter().all(|h| self.has(h)));
        if !shared {
            return Have::default();
        }
        let mut complete = vec![true; manifest.num_blocks as usize];
        let mut head = true;
        for t in &manifest.tensors {
            let stored = || t.chunks.iter().all(|h| self.has(h));
            match t.role {
                TensorRole::Block(b) if complete[b as usize] && !stored() => {
                    complete[b as usize] = false;
                }
                r if r.is_head() && r != TensorRole::Shared && head && !stored() => {
                    head = false;
                }
                _ => {}
            }
        }
        Have {
            blocks: (0..manifest.num_blocks)
                .filter(|b| complete[*b as usize])
                .collect(),
            head,
        }
    }

    /// Re-hashes every stored chunk of a model; a chunk that does not hash
    /// right is deleted (it will be fetched again).
    pub fn verify(&self, id: &Hash) -> Result<VerifyReport, StoreError> {
        let manifest = self.manifest(id)?;
        let all = manifest.chunks_for(&(0..manifest.num_blocks), true);
        let mut report = VerifyReport {
            total: all.len(),
            ..VerifyReport::default()
        };
        for c in all {
            match self.get(&c.hash)? {
                None => report.missing += 1,
                Some(d) if d.len() == c.len as usize && Hash::of(&d) == c.hash => report.good += 1,
                Some(_) => {
                    let path = self.chunk_path(&c.hash);
                    fs::remove_file(&path).map_err(|e| io_error(&path, e))?;
                    report.bad.push(c.hash);
                }
            }
        }
        Ok(report)
    }

    /// Ids of every stored manifest.
    pub fn models(&self) -> Result<Vec<Hash>, StoreError> {
        let dir = self.root.join("manifests");
        let mut out: Vec<Hash> = fs::read_dir(&dir)
            .map_err(|e| io_error(&dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| Hash::from_hex(&e.file_name().to_string_lossy()).ok())
            .collect();
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_verified_before_they_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let data = b"some weights".to_vec();
        let h = Hash::of(&data);
        assert!(matches!(
            store.put(&Hash::of(b"other"), &data),
            Err(StoreError::WrongHash { .. })
        ));
        assert!(!store.has(&Hash::of(b"other")));
        assert!(store.put(&h, &data).unwrap());
        assert!(!store.put(&h, &data).unwrap(), "stored once");
        assert_eq!(store.get(&h).unwrap().unwrap(), data);
        // No temporary file is left behind.
        let dir = store.chunk_path(&h).parent().unwrap().to_path_buf();
        assert_eq!(fs::read_dir(dir).unwrap().count(), 1);
    }

    /// Every length a chunk can have (empty, shorter than a block, block
    /// edges, a whole chunk and a bit) reads back exactly, with no temporary
    /// file left, written past the page cache or through it, on the disk's
    /// filesystem and on tmpfs.
    #[test]
    fn chunks_of_any_length_read_back_exactly_on_any_filesystem() {
        let disk = tempfile::tempdir().unwrap();
        let mut homes = vec![disk.path().to_path_buf()];
        let shm = std::path::Path::new("/dev/shm");
        let tmpfs = shm.is_dir().then(|| tempfile::tempdir_in(shm).unwrap());
        homes.extend(tmpfs.iter().map(|t| t.path().to_path_buf()));
        for (home, direct) in homes.iter().flat_map(|h| [(h, true), (h, false)]) {
            let home = home.join(if direct { "direct" } else { "buffered" });
            let store = ChunkStore::open(&home).unwrap();
            // Buffered is what a filesystem without O_DIRECT gets.
            store.direct.store(direct, Ordering::Relaxed);
            for (i, len) in [0usize, 1, 4095, 4096, 4097, 1 << 20, (1 << 20) + 13]
                .into_iter()
                .enumerate()
            {
                let data: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
                let h = Hash::of(&data);
                assert!(store.put(&h, &data).unwrap(), "{} {len}", home.display());
                assert_eq!(
                    store.get(&h).unwrap().unwrap(),
                    data,
                    "{} {len}",
                    home.display()
                );
                let mut again = Vec::new();
                assert!(store.read_into(&h, &mut again).unwrap());
                assert_eq!(again, data);
                let left: Vec<_> = fs::read_dir(store.chunk_path(&h).parent().unwrap())
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
                    .collect();
                assert!(left.is_empty(), "temporary files left: {left:?}");
            }
        }
    }

    #[test]
    fn verify_finds_and_deletes_a_corrupt_chunk() {
        use nomoat_protocol::{ModelFormat, TensorEntry, MIN_CHUNK_BYTES};
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let data: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 100]).collect();
        let manifest = Manifest {
            format: ModelFormat::Gguf,
            chunk_size: MIN_CHUNK_BYTES,
            architecture: "llama".into(),
            num_blocks: 3,
            header: Vec::new(),
            tokenizer: Vec::new(),
            tokenizer_config: Vec::new(),
            tensors: data
                .iter()
                .enumerate()
                .map(|(i, d)| TensorEntry {
                    name: format!("blk.{i}.w"),
                    role: TensorRole::Block(i as u32),
                    dtype: "F32".into(),
                    shape: vec![25],
                    byte_len: 100,
                    chunks: vec![Hash::of(d)],
                })
                .collect(),
        };
        let id = store.put_manifest(&manifest).unwrap();
        for d in &data[..2] {
            store.put(&Hash::of(d), d).unwrap();
        }
        assert_eq!(store.have(&manifest).blocks, [0, 1]);
        // Damage block 1's chunk on disk.
        let bad = Hash::of(&data[1]);
        fs::write(store.chunk_path(&bad), b"rotten").unwrap();
        let r = store.verify(&id).unwrap();
        assert_eq!(
            (r.good, r.bad.clone(), r.missing, r.total),
            (1, vec![bad], 1, 3)
        );
        assert!(!store.has(&bad), "a corrupt chunk is deleted");
        assert_eq!(store.have(&manifest).blocks, [0]);
    }

    #[test]
    fn an_unwritable_store_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let err = ChunkStore::open(&file).unwrap_err();
        assert!(err.to_string().contains("NOMOAT_HOME"), "{err}");
    }
}
