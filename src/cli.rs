//! The command line (SPEC §10): clap types, and one library call per
//! command. No logic lives here beyond turning arguments into requests.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::clock::parse_duration;

fn dur(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

#[derive(Debug, Parser)]
#[command(
    name = "runner",
    version,
    about = "Runs coding agents one turn at a time, and leaves a durable record of every turn."
)]
pub struct Cli {
    /// The root directory (env RUNNER_ROOT; default .runner).
    #[arg(long, global = true, env = "RUNNER_ROOT", default_value = ".runner")]
    pub root: PathBuf,
    /// Where the tables live: `sqlite` (the files under the root) or a
    /// `postgres://` URL (env RUNNER_STORE_URL; config `[store] url`).
    #[arg(long, global = true, value_name = "URL")]
    pub store: Option<String>,
    /// Print one JSON document on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less logging.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Write the `--store` URL into the root's config.toml as `[store] url`.
    #[arg(long)]
    pub save: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// A complete turn on a throw-away root with the built-in fake agent.
    Demo,
    /// Create the root and its databases (or the PostgreSQL schema).
    Init(InitArgs),
    /// Register and inspect agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Run one turn of an agent.
    Turn(TurnArgs),
    /// Store a nudge as mail and run a turn if none is in flight.
    Nudge(NudgeArgs),
    /// Stop an agent: mark it completed and end its running turn.
    Stop(StopArgs),
    /// Run turns for every agent with due mail, and sweep, until signalled.
    Serve(ServeArgs),
    /// One repair pass over all agents.
    Sweep(SweepArgs),
    /// A read-only dashboard and /metrics over HTTP, for hosts without `serve`.
    Web(WebArgs),
    /// A table of agents.
    Status(StatusArgs),
    /// Fleet mode: the hosts sharing the store (id, state, last seen,
    /// running turns, version); on SQLite, this host alone (`local`).
    Hosts,
    /// Turn history.
    Turns(TurnsArgs),
    /// Events, oldest first.
    Events(EventsArgs),
    /// Send, list and check mail.
    #[command(subcommand)]
    Mail(MailCmd),
    /// Move the store: copy this root's tables into PostgreSQL.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Check the root, its stores, config, capabilities, agent CLIs and leftovers.
    Doctor,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout.
    Man,
    /// Test double speaking Claude's stream-json protocol.
    #[command(hide = true)]
    FakeAgent(crate::fake_agent::FakeArgs),
}

impl Command {
    /// Every agent name the command names (agents, parents, senders,
    /// recipients, filters): each is checked before the root is touched
    /// (SPEC §1), so a bad name never leaves a directory behind.
    pub fn agent_names(&self) -> Vec<&str> {
        let mut v: Vec<Option<&String>> = Vec::new();
        match self {
            Command::Agent(AgentCmd::Add(a)) => v.extend([Some(&a.name), a.parent.as_ref()]),
            Command::Agent(AgentCmd::Show { name }) => v.push(Some(name)),
            Command::Turn(t) => v.extend([Some(&t.agent), t.from.as_ref()]),
            Command::Nudge(n) => v.extend([Some(&n.agent), n.from.as_ref()]),
            Command::Stop(s) => v.push(Some(&s.agent)),
            Command::Status(s) => v.push(s.agent.as_ref()),
            Command::Turns(t) => v.push(t.agent.as_ref()),
            Command::Events(e) => v.push(e.agent.as_ref()),
            Command::Mail(MailCmd::Send(m)) => v.extend([Some(&m.from), Some(&m.to)]),
            Command::Mail(MailCmd::List(l)) => v.extend([l.to.as_ref(), l.from.as_ref()]),
            Command::Mail(MailCmd::Check { agent }) => v.push(Some(agent)),
            Command::Demo
            | Command::Init(_)
            | Command::Serve(_)
            | Command::Sweep(_)
            | Command::Web(_)
            | Command::Hosts
            | Command::Store(_)
            | Command::Doctor
            | Command::Completions { .. }
            | Command::Man
            | Command::FakeAgent(_) => {}
        }
        v.into_iter().flatten().map(String::as_str).collect()
    }
}

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// Register an agent (state booting). `--command PROG [ARG...]` comes last,
    /// takes every remaining argument and implies `--runtime command`.
    Add(AgentAddArgs),
    /// Show one agent in full.
    Show { name: String },
}

#[derive(Debug, Args)]
pub struct AgentAddArgs {
    pub name: String,
    /// Required for a new agent; `--recover` keeps the agent's own.
    #[arg(long, required_unless_present = "recover")]
    pub capability: Option<String>,
    #[arg(long)]
    pub parent: Option<String>,
    #[arg(long)]
    pub task: Option<String>,
    /// The agent's working directory (default: the current directory).
    #[arg(long)]
    pub worktree: Option<PathBuf>,
    /// claude, codex, gemini or command.
    #[arg(long)]
    pub runtime: Option<String>,
    #[arg(long)]
    pub model: Option<String>,
    /// Reset a completed or zombie agent to booting, keeping what is not given.
    #[arg(long)]
    pub recover: bool,
    /// Fleet mode: the host whose disk holds the worktree (default: this
    /// host), or '*' for a floating agent any host may run. Refused on the
    /// SQLite store, which is one host.
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    /// Set from `--command PROG [ARG...]`, which must come last: it takes
    /// every remaining argument (see [`split_command`]).
    #[arg(skip)]
    pub command: Option<Vec<String>>,
}

#[derive(Debug, Args, Clone)]
pub struct TurnArgs {
    #[arg(long)]
    pub agent: String,
    #[arg(long, conflicts_with = "message_file")]
    pub message: Option<String>,
    #[arg(long)]
    pub message_file: Option<PathBuf>,
    /// Store the message as mail from SENDER instead.
    #[arg(long)]
    pub from: Option<String>,
    /// Deliver only the message, not the agent's mail.
    #[arg(long)]
    pub no_mail: bool,
    #[arg(long, value_parser = dur, conflicts_with = "no_wait")]
    pub wait: Option<Duration>,
    #[arg(long)]
    pub no_wait: bool,
    #[arg(long, value_parser = dur)]
    pub stall: Option<Duration>,
    #[arg(long, value_parser = dur)]
    pub grace: Option<Duration>,
    #[arg(long, value_parser = dur)]
    pub deadline: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct NudgeArgs {
    #[arg(long)]
    pub agent: String,
    pub text: Option<String>,
    #[arg(long)]
    pub from: Option<String>,
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    #[arg(long)]
    pub agent: String,
    #[arg(long, value_parser = dur)]
    pub grace: Option<Duration>,
    #[arg(long, value_parser = dur)]
    pub wait: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[arg(long, value_parser = dur)]
    pub poll: Option<Duration>,
    #[arg(long, value_parser = dur)]
    pub sweep_every: Option<Duration>,
    #[arg(long)]
    pub max_concurrent: Option<usize>,
    #[arg(long, value_parser = dur)]
    pub grace: Option<Duration>,
    #[arg(long, value_parser = dur)]
    pub stall: Option<Duration>,
    /// Also serve the dashboard and /metrics on ADDR (IP:PORT, localhost:PORT
    /// or PORT; config `[serve] http`). Off by default.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
}

#[derive(Debug, Args)]
pub struct WebArgs {
    /// IP:PORT, localhost:PORT or PORT (default: `[serve] http`, else
    /// 127.0.0.1:8080). A non-loopback address needs `[http] token`.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub agent: Option<String>,
}

#[derive(Debug, Args)]
pub struct TurnsArgs {
    #[arg(long)]
    pub agent: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: i64,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[arg(long)]
    pub agent: Option<String>,
    #[arg(long)]
    pub turn: Option<String>,
    #[arg(long = "type")]
    pub event_type: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Subcommand)]
pub enum MailCmd {
    /// Send a message; prints its id.
    Send(MailSendArgs),
    /// List messages, newest first.
    List(MailListArgs),
    /// Print an agent's pending mail and mark it read.
    Check {
        #[arg(long)]
        agent: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Copy this root's sessions, turns, mail and events into an empty
    /// PostgreSQL schema (the SQLite files are left as they are).
    Migrate(StoreMigrateArgs),
}

#[derive(Debug, Args)]
pub struct StoreMigrateArgs {
    /// postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (libpq syntax).
    #[arg(long)]
    pub to: String,
    /// The schema to create and fill (env RUNNER_STORE_SCHEMA).
    #[arg(long, env = "RUNNER_STORE_SCHEMA", default_value = "runner")]
    pub schema: String,
}

#[derive(Debug, Args)]
pub struct MailSendArgs {
    #[arg(long)]
    pub from: String,
    #[arg(long)]
    pub to: String,
    #[arg(long = "type", default_value = "status")]
    pub kind: String,
    #[arg(long, default_value = "")]
    pub subject: String,
    #[arg(long, conflicts_with = "body_file")]
    pub body: Option<String>,
    #[arg(long)]
    pub body_file: Option<PathBuf>,
    #[arg(long, default_value = "normal")]
    pub priority: String,
    #[arg(long)]
    pub payload: Option<String>,
    #[arg(long)]
    pub thread: Option<String>,
    /// Send even to a completed or zombie recipient.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct MailListArgs {
    #[arg(long)]
    pub to: Option<String>,
    #[arg(long)]
    pub from: Option<String>,
    #[arg(long)]
    pub unread: bool,
    #[arg(long)]
    pub dead: bool,
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
}

/// Reads a text file named by a flag (`--message-file`, `--body-file`).
pub fn read_text(path: &std::path::Path, what: &str) -> crate::error::Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| crate::error::usage(format!("cannot read {what} {}: {e}", path.display())))
}

impl From<AgentAddArgs> for crate::ops::AddRequest {
    fn from(a: AgentAddArgs) -> Self {
        crate::ops::AddRequest {
            name: a.name,
            capability: a.capability,
            parent: a.parent,
            task: a.task,
            worktree: a.worktree,
            runtime: a.runtime,
            model: a.model,
            recover: a.recover,
            command: a.command,
            host: a.host,
        }
    }
}

impl From<EventsArgs> for crate::store::events::EventFilter {
    fn from(e: EventsArgs) -> Self {
        crate::store::events::EventFilter {
            agent: e.agent,
            turn: e.turn,
            event_type: e.event_type,
            after_id: 0,
            limit: e.limit,
        }
    }
}

impl From<MailListArgs> for crate::store::mail::ListFilter {
    fn from(l: MailListArgs) -> Self {
        crate::store::mail::ListFilter {
            to: l.to,
            from: l.from,
            unread: l.unread,
            dead: l.dead,
            limit: l.limit,
        }
    }
}

impl MailSendArgs {
    /// The request, with `--body-file` read.
    pub fn into_request(self) -> crate::error::Result<crate::ops::SendRequest> {
        let body = match (self.body, &self.body_file) {
            (Some(b), _) => b,
            (None, Some(p)) => read_text(p, "--body-file")?,
            (None, None) => String::new(),
        };
        Ok(crate::ops::SendRequest {
            from: self.from,
            to: self.to,
            kind: self.kind,
            subject: self.subject,
            body,
            priority: self.priority,
            payload: self.payload,
            thread: self.thread,
            force: self.force,
        })
    }
}

/// `agent add … --command PROG [ARG...]`: everything after `--command` (an
/// optional `--` first) is the agent's argv, never runner's own flags. Splits
/// it off before clap sees the rest.
pub fn split_command(
    args: Vec<std::ffi::OsString>,
) -> (Vec<std::ffi::OsString>, Option<Vec<String>>) {
    let is = |a: &std::ffi::OsString, s: &str| a.to_str() == Some(s);
    let Some(add) = args
        .windows(2)
        .position(|w| is(&w[0], "agent") && is(&w[1], "add"))
    else {
        return (args, None);
    };
    let Some(at) = args
        .iter()
        .skip(add + 2)
        .position(|a| is(a, "--command"))
        .map(|p| p + add + 2)
    else {
        return (args, None);
    };
    let mut rest = args;
    let cmd: Vec<String> = rest
        .split_off(at)
        .into_iter()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let cmd = match cmd.first().map(String::as_str) {
        Some("--") => cmd[1..].to_vec(),
        _ => cmd,
    };
    (rest, Some(cmd))
}

/// Parses the process's command line.
pub fn parse() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let (args, command) = split_command(std::env::args_os().collect());
    // `Cli::parse_from`, without dropping the parser at the end: freeing
    // its tree of subcommands and arguments was a fifth of the parse's
    // instructions (~130K), for a value that lives as long as the process.
    let mut parser = Cli::command();
    let mut matches = parser
        .try_get_matches_from_mut(args)
        .unwrap_or_else(|e| e.exit());
    let mut cli =
        Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.format(&mut parser).exit());
    std::mem::forget(matches);
    std::mem::forget(parser);
    if let Command::Agent(AgentCmd::Add(a)) = &mut cli.command {
        a.command = command;
    }
    cli
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn os(v: &[&str]) -> Vec<std::ffi::OsString> {
        v.iter().map(Into::into).collect()
    }

    #[test]
    fn command_takes_every_remaining_argument() {
        let (rest, cmd) = split_command(os(&[
            "runner",
            "agent",
            "add",
            "a",
            "--capability",
            "b",
            "--command",
            "prog",
            "--capability",
            "x",
        ]));
        assert_eq!(
            rest,
            os(&["runner", "agent", "add", "a", "--capability", "b"])
        );
        assert_eq!(cmd.unwrap(), ["prog", "--capability", "x"]);
        let (_, cmd) = split_command(os(&[
            "runner",
            "agent",
            "add",
            "a",
            "--command",
            "--",
            "-p",
        ]));
        assert_eq!(cmd.unwrap(), ["-p"]);
        let (rest, cmd) = split_command(os(&["runner", "turn", "--command"]));
        assert!(cmd.is_none());
        assert_eq!(rest.len(), 3);
        Cli::command().debug_assert();
    }
}
