//! Shell completions and the man page, both generated from the clap
//! definitions in `cli` so they never drift from the real command line.
//!
//! Owns rendering only: `runner completions SHELL` and `runner man` print
//! what these return. The man page is one page: the top-level page clap
//! renders, then one section per visible subcommand (its synopsis,
//! description and options). Hidden commands (`fake-agent`) are left out.

use clap::CommandFactory;

use crate::cli::Cli;

/// The completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "runner", &mut out);
    out
}

/// Every visible subcommand path, e.g. `["agent", "add"]`, parents first.
pub fn subcommand_paths() -> Vec<Vec<String>> {
    fn walk(cmd: &clap::Command, prefix: &[String], out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let mut path = prefix.to_vec();
            path.push(sub.get_name().to_string());
            out.push(path.clone());
            walk(sub, &path, out);
        }
    }
    let mut out = Vec::new();
    walk(&Cli::command(), &[], &mut out);
    out
}

/// The roff man page `runner(1)`.
pub fn man_page() -> std::io::Result<Vec<u8>> {
    let mut cmd = Cli::command();
    cmd.build();
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    for path in subcommand_paths() {
        let mut sub = &cmd;
        for name in &path {
            sub = sub
                .find_subcommand(name)
                .expect("subcommand_paths walks this same tree");
        }
        let full = format!("runner {}", path.join(" "));
        let man = clap_mangen::Man::new(sub.clone().bin_name(&full));
        let mut section = Vec::new();
        man.render_synopsis_section(&mut section)?;
        man.render_description_section(&mut section)?;
        man.render_options_section(&mut section)?;
        out.extend_from_slice(format!(".SH \"{}\"\n", full.to_uppercase()).as_bytes());
        // The subcommand's own sections become subsections of its section.
        for line in String::from_utf8_lossy(&section).lines() {
            let line = match line.strip_prefix(".SH ") {
                Some(rest) => format!(".SS {rest}"),
                None => line.to_string(),
            };
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
    }
    Ok(out)
}
