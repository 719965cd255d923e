//! The reference stays true to the binary: every option `nudge --help` lists is in docs/configuration.md with
//! its environment variable and default, and the file lists no option the binary does not have.
mod common;

use std::collections::BTreeMap;

use common::*;

/// `--flag` → (environment variable, default) as `nudge --help` prints them.
fn options_in_help() -> BTreeMap<String, (String, Option<String>)> {
    let mut cmd = nudge_command(&[]);
    cmd.arg("--help");
    let (status, out, err) = run_with_deadline(cmd, SOON);
    assert!(status.success(), "nudge --help: {status}\n{err}");
    let mut options = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in out.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("--") {
            let flag: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            if flag != "help" && flag != "version" {
                current = Some(flag);
            }
            continue;
        }
        let Some(flag) = &current else { continue };
        if let Some(at) = trimmed.find("[env: ") {
            let env: String = trimmed[at + 6..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_' || c.is_ascii_digit())
                .collect();
            let default = trimmed.find("[default: ").map(|d| {
                let rest = &trimmed[d + 10..];
                rest[..rest.find(']').unwrap_or(rest.len())].to_owned()
            });
            options.insert(flag.clone(), (env, default));
            current = None;
        }
    }
    options
}

/// The options table of docs/configuration.md: `| `--flag` | `NUDGE_X` | default | meaning |`.
fn options_in_docs() -> BTreeMap<String, (String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md"))
        .expect("docs/configuration.md");
    let mut options = BTreeMap::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5 || !cells[1].starts_with("`--") {
            continue;
        }
        let flag = cells[1].trim_matches('`').trim_start_matches("--").to_owned();
        options.insert(flag, (cells[2].trim_matches('`').to_owned(), cells[3].trim_matches('`').to_owned()));
    }
    options
}

#[test]
fn every_option_in_help_is_documented_in_configuration_md_and_nothing_else_is() {
    let help = options_in_help();
    let docs = options_in_docs();
    assert!(help.len() > 20, "parsed too few options from --help: {help:?}");
    let missing: Vec<_> = help.keys().filter(|flag| !docs.contains_key(*flag)).collect();
    assert!(missing.is_empty(), "options in --help but not in docs/configuration.md: {missing:?}");
    let extra: Vec<_> = docs.keys().filter(|flag| !help.contains_key(*flag)).collect();
    assert!(extra.is_empty(), "options in docs/configuration.md that nudge does not have: {extra:?}");
    for (flag, (env, default)) in &help {
        let (doc_env, doc_default) = &docs[flag];
        assert_eq!(doc_env, env, "--{flag}: environment variable in docs/configuration.md");
        if let Some(default) = default {
            assert_eq!(doc_default, default, "--{flag}: default in docs/configuration.md");
        }
    }
}
