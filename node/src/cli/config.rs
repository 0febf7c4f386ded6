//! Flags from three places, strongest first: the command line, `NOMOAT_*`
//! environment variables, and a TOML config file (`--config FILE` or
//! `NOMOAT_CONFIG`).
//!
//! Every long flag `--some-flag` of every command reads the variable
//! `NOMOAT_SOME_FLAG` (`nomoat CMD --help` shows it). The file holds
//! defaults: top-level keys apply to every command that has the flag, a
//! table `[serve]`, `[gateway]`, `[bench.api]`... to that command only, and
//! its keys must be flags of it. Keys are flag names with `-` or `_`; a
//! flag's value is a string, number or boolean, a repeatable flag's an
//! array:
//!
//! ```toml
//! model = "smollm2-135m"
//!
//! [serve]
//! blocks = "0..10"
//! bootstrap = ["/ip4/192.0.2.1/udp/4001/quic-v1/p2p/12D3KooW..."]
//! mdns = true
//!
//! [gateway]
//! api = "127.0.0.1:8080"
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Command, CommandFactory, FromArgMatches};

use crate::Cli;

/// Parses the command line with environment variables and the config file.
pub(crate) fn parse() -> Result<Cli> {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let cmd = with_env(Cli::command());
    if let Some(path) = config_path(&args) {
        apply_file(&cmd, &mut args, &path)?;
    }
    let matches = cmd.get_matches_from(args);
    Ok(Cli::from_arg_matches(&matches)?)
}

/// The variable that mirrors `--long`.
pub(crate) fn env_name(long: &str) -> String {
    format!("NOMOAT_{}", long.to_uppercase().replace('-', "_"))
}

/// Gives every long flag without a variable its `NOMOAT_*` variable.
fn with_env(mut cmd: Command) -> Command {
    let flags: Vec<(String, String)> = cmd
        .get_arguments()
        .filter(|a| a.get_env().is_none())
        .filter_map(|a| Some((a.get_id().to_string(), a.get_long()?.to_string())))
        .collect();
    for (id, long) in flags {
        // clap keeps variable names as `&'static str`; a few dozen short
        // strings, made once per process.
        let name: &'static str = Box::leak(env_name(&long).into_boxed_str());
        cmd = cmd.mut_arg(id, |a| a.env(name));
    }
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for s in subs {
        cmd = cmd.mut_subcommand(s, with_env);
    }
    cmd
}

fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("NOMOAT_CONFIG").map(PathBuf::from)
}

/// The subcommand chain named on the command line, e.g. `["bench", "api"]`.
fn subcommand_path<'a>(cmd: &'a Command, args: &[OsString]) -> (Vec<String>, &'a Command) {
    let mut sub = cmd;
    let mut names = Vec::new();
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            it.next();
            continue;
        }
        if a.starts_with('-') {
            continue;
        }
        match sub.find_subcommand(a.as_ref()) {
            Some(s) => {
                names.push(s.get_name().to_string());
                sub = s;
            }
            None => break,
        }
    }
    (names, sub)
}

fn apply_file(cmd: &Command, args: &mut Vec<OsString>, path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let (names, sub) = subcommand_path(cmd, args);
    let mut settings: Vec<(String, toml::Value)> = Vec::new();
    // Top-level keys: for whichever command has the flag.
    for (k, v) in &table {
        if !v.is_table() && find_flag(sub, k).is_some() {
            settings.push((k.clone(), v.clone()));
        }
    }
    // The command's own table (nested for subcommands: [bench.api]).
    let mut section = Some(&table);
    for n in &names {
        section = section
            .and_then(|t| t.get(n))
            .and_then(toml::Value::as_table);
    }
    if let (Some(section), false) = (section, names.is_empty()) {
        for (k, v) in section {
            if v.is_table() {
                continue;
            }
            if find_flag(sub, k).is_none() {
                bail!(
                    "{}: `{k}` in [{}] is not a flag of `nomoat {}` (see `nomoat {} --help`)",
                    path.display(),
                    names.join("."),
                    names.join(" "),
                    names.join(" ")
                );
            }
            settings.retain(|(key, _)| key != k);
            settings.push((k.clone(), v.clone()));
        }
    }
    for (key, value) in settings {
        let Some(arg) = find_flag(sub, &key) else {
            continue;
        };
        let long = arg.get_long().unwrap_or_default().to_string();
        let given = args.iter().any(|a| {
            let a = a.to_string_lossy();
            a == format!("--{long}") || a.starts_with(&format!("--{long}="))
        });
        let in_env = arg.get_env().is_some_and(|e| std::env::var_os(e).is_some());
        if given || in_env {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        let values: Vec<toml::Value> = match value {
            toml::Value::Array(a) => a,
            v => vec![v],
        };
        for v in values {
            match (v, takes_value) {
                (toml::Value::Boolean(true), false) => args.push(format!("--{long}").into()),
                (toml::Value::Boolean(false), false) => {}
                (toml::Value::String(s), true) => {
                    args.push(format!("--{long}").into());
                    args.push(s.into());
                }
                (toml::Value::Table(_), _) | (toml::Value::Array(_), _) => {
                    bail!(
                        "{}: `{key}` must be a value or an array of values",
                        path.display()
                    )
                }
                (v, true) => {
                    args.push(format!("--{long}").into());
                    args.push(v.to_string().into());
                }
                (v, false) => bail!(
                    "{}: `{key}` is a switch: write `{key} = true`, not {v}",
                    path.display()
                ),
            }
        }
    }
    Ok(())
}

fn find_flag<'a>(cmd: &'a Command, key: &str) -> Option<&'a clap::Arg> {
    let long = key.replace('_', "-");
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn with_file(text: &str, argv: &[&str]) -> Result<Vec<String>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text)?;
        let cmd = with_env(Cli::command());
        let mut a = args(argv);
        apply_file(&cmd, &mut a, &path)?;
        Ok(a.iter().map(|s| s.to_string_lossy().into_owned()).collect())
    }

    #[test]
    fn file_values_become_flags_unless_given() -> Result<()> {
        let text = "model = \"m\"\nprompt = \"top\"\n[gateway]\napi = \"127.0.0.1:0\"\nswarm = [\"/ip4/127.0.0.1/udp/1/quic-v1\", \"/ip4/127.0.0.1/udp/2/quic-v1\"]\nmax_concurrent = 3\n[bench.api]\nclients = \"1,2\"\n";
        let a = with_file(text, &["nomoat", "gateway", "--api", "127.0.0.1:9"])?;
        if std::env::var_os("NOMOAT_MODEL").is_none() {
            assert!(a.windows(2).any(|w| w == ["--model", "m"]), "{a:?}");
        }
        assert!(!a.iter().any(|s| s == "--prompt"), "{a:?}");
        assert_eq!(a.iter().filter(|s| *s == "--api").count(), 1, "{a:?}");
        assert_eq!(a.iter().filter(|s| *s == "--swarm").count(), 2, "{a:?}");
        assert!(
            a.windows(2).any(|w| w == ["--max-concurrent", "3"]),
            "{a:?}"
        );
        let a = with_file(text, &["nomoat", "bench", "api"])?;
        assert!(a.windows(2).any(|w| w == ["--clients", "1,2"]), "{a:?}");
        let cli = Cli::try_parse_from(with_file(text, &["nomoat", "gateway"])?)?;
        assert!(matches!(cli.command, crate::Command::Gateway(_)));
        Ok(())
    }

    #[test]
    fn unknown_keys_and_bad_switches_are_errors() {
        let e = with_file("[serve]\nnope = 1\n", &["nomoat", "serve"]).unwrap_err();
        assert!(e.to_string().contains("`nope`"), "{e}");
        let e = with_file("[serve]\nmdns = \"yes\"\n", &["nomoat", "serve"]).unwrap_err();
        assert!(e.to_string().contains("switch"), "{e}");
        assert!(with_file("[serve\n", &["nomoat", "serve"]).is_err());
    }
}
