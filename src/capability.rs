//! Capabilities (SPEC §4): the role of an agent, which mail ends its work,
//! and what a clean turn without that mail means.
//!
//! Owns parsing of the Markdown-with-TOML-front-matter files, the built-in
//! set compiled from the repository's `agents/` directory, and the override
//! rule (`<root>/capabilities/<name>.md` replaces or adds). Invariant: a bad
//! file is an error naming the file and the field, never a silent default.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    #[error("unknown capability '{name}'; known: {}", known.join(", "))]
    Unknown { name: String, known: Vec<String> },
    #[error("capability file {file}: {detail}")]
    Bad { file: String, detail: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnIdle {
    /// A clean turn without terminal mail ends the agent.
    Exit,
    /// It is waiting for mail.
    Wait,
}

#[derive(Debug, Clone)]
pub struct Capability {
    pub name: String,
    pub terminal_mail: Vec<String>,
    pub on_idle: OnIdle,
    pub stall_timeout: Option<Duration>,
    pub permission_mode: Option<String>,
    pub instructions: String,
}

pub const BUILTIN: [(&str, &str); 5] = [
    ("builder", include_str!("../agents/builder.md")),
    ("scout", include_str!("../agents/scout.md")),
    ("reviewer", include_str!("../agents/reviewer.md")),
    ("merger", include_str!("../agents/merger.md")),
    ("lead", include_str!("../agents/lead.md")),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FrontMatter {
    terminal_mail: Vec<String>,
    on_idle: String,
    stall_timeout: Option<String>,
    permission_mode: Option<String>,
}

/// Parses one capability file's text.
pub fn parse(name: &str, file: &str, text: &str) -> Result<Capability, CapabilityError> {
    let bad = |detail: String| CapabilityError::Bad {
        file: file.to_string(),
        detail,
    };
    let rest = text
        .strip_prefix("+++")
        .ok_or_else(|| bad("does not start with a '+++' front matter line".into()))?;
    let end = rest
        .find("\n+++")
        .ok_or_else(|| bad("front matter has no closing '+++' line".into()))?;
    let front = &rest[..end];
    let body = rest[end + 4..]
        .trim_start_matches(['\r', '\n'])
        .trim_end()
        .to_string();
    let fm: FrontMatter = toml::from_str(front).map_err(|e| bad(e.message().to_string()))?;
    let on_idle = match fm.on_idle.as_str() {
        "exit" => OnIdle::Exit,
        "wait" => OnIdle::Wait,
        other => {
            return Err(bad(format!(
                "on_idle = \"{other}\": expected \"exit\" or \"wait\""
            )));
        }
    };
    for t in &fm.terminal_mail {
        if !crate::store::schema::MAIL_TYPES.contains(&t.as_str()) {
            return Err(bad(format!("terminal_mail: unknown mail type \"{t}\"")));
        }
    }
    let stall_timeout = fm
        .stall_timeout
        .as_deref()
        .map(crate::clock::parse_duration)
        .transpose()
        .map_err(|e| bad(format!("stall_timeout: {e}")))?;
    Ok(Capability {
        name: name.to_string(),
        terminal_mail: fm.terminal_mail,
        on_idle,
        stall_timeout,
        permission_mode: fm.permission_mode,
        instructions: body,
    })
}

/// Names of every capability: built in plus the root's own.
pub fn known(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = BUILTIN.iter().map(|(n, _)| n.to_string()).collect();
    if let Ok(dir) = std::fs::read_dir(root.join("capabilities")) {
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "md")
                && let Some(stem) = p.file_stem().and_then(|s| s.to_str())
                && !names.iter().any(|n| n == stem)
            {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    names
}

/// Loads a capability: the root's file wins over the built-in one.
pub fn load(root: &Path, name: &str) -> Result<Capability, CapabilityError> {
    if crate::root::valid_name(name) {
        let file = root.join("capabilities").join(format!("{name}.md"));
        if let Ok(text) = std::fs::read_to_string(&file) {
            return parse(name, &file.display().to_string(), &text);
        }
    }
    match BUILTIN.iter().find(|(n, _)| *n == name) {
        Some((n, text)) => parse(n, &format!("agents/{n}.md (built in)"), text),
        None => Err(CapabilityError::Unknown {
            name: name.to_string(),
            known: known(root),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse() {
        for (n, text) in BUILTIN {
            let c = parse(n, n, text).unwrap();
            assert!(!c.terminal_mail.is_empty());
            assert!(!c.instructions.is_empty());
        }
        let lead = parse("lead", "lead", BUILTIN[4].1).unwrap();
        assert_eq!(lead.on_idle, OnIdle::Wait);
        assert_eq!(lead.terminal_mail, vec!["worker_done"]);
        let merger = parse("merger", "m", BUILTIN[3].1).unwrap();
        assert_eq!(merger.terminal_mail, vec!["merged", "merge_failed"]);
    }

    #[test]
    fn bad_files_name_the_field() {
        let e = parse(
            "x",
            "x.md",
            "+++\nterminal_mail = [\"worker_done\"]\non_idle = \"nap\"\n+++\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("on_idle"), "{e}");
        let e = parse(
            "x",
            "x.md",
            "+++\nterminal_mail = 3\non_idle = \"exit\"\n+++\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("x.md"), "{e}");
        let e = parse("x", "x.md", "no front matter").unwrap_err();
        assert!(e.to_string().contains("+++"), "{e}");
        let e = parse(
            "x",
            "x.md",
            "+++\nterminal_mail = []\non_idle = \"exit\"\nstall_timeout = \"3 parsecs\"\n+++\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("stall_timeout"), "{e}");
    }
}
