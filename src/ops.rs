//! The library functions behind the simple commands: `init`, `agent add`,
//! `agent show`, `mail send|list|check`, `status`, `turns`, `events`.
//! Each validates its input completely before writing anything (SPEC §10.2)
//! and returns data for `report` to print.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::capability;
use crate::clock;
use crate::ctx::Ctx;
use crate::error::{Result, usage};
use crate::lease::{self, LeaseInfo};
use crate::root::check_name;
use crate::runtime::RUNTIMES;
use crate::state::State;
use crate::store::Backend;
use crate::store::events::{self as ev, EventFilter, StoredEvent};
use crate::store::mail::{self as mailstore, ListFilter, Message, NewMessage};
use crate::store::schema::{MAIL_TYPES, PRIORITIES};
use crate::store::sessions::{self, NewSession, Session};
use crate::store::turns::{self, TurnRow};

/// `runner init [--store URL [--save]]`: creates (or migrates) the store;
/// with `save`, records its URL as `[store] url` in config.toml.
pub fn init(ctx: &Ctx, save: Option<String>) -> Result<crate::report::Initialized> {
    ctx.store()?;
    ctx.events()?;
    if let Some(url) = &save {
        save_store_url(&ctx.root.dir.join("config.toml"), url, &ctx.config.store)?;
    }
    Ok(crate::report::Initialized {
        root: ctx.root.dir.clone(),
        store: ctx.config.store.describe(),
        saved: save.is_some(),
    })
}

/// Appends a `[store]` table to config.toml; a file that already has one is
/// left alone (the user edits it), so nothing of theirs is rewritten.
fn save_store_url(path: &Path, url: &str, backend: &Backend) -> Result<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(usage(format!("cannot read {}: {e}", path.display()))),
    };
    if existing.lines().any(|l| l.trim() == "[store]") {
        return Err(usage(format!(
            "{} already has a [store] table: edit it there (nothing written)",
            path.display()
        )));
    }
    let mut text = existing;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let quoted = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    text.push_str(&format!("\n[store]\nurl = {}\n", quoted(url)));
    if let Backend::Postgres { schema, .. } = backend
        && schema != crate::config::DEFAULT_SCHEMA
    {
        text.push_str(&format!("schema = {}\n", quoted(schema)));
    }
    // It may hold a password: created 0600 like the databases.
    crate::store::create_private_file(path)?;
    std::fs::write(path, text).map_err(|e| usage(format!("cannot write {}: {e}", path.display())))
}

pub struct AddRequest {
    pub name: String,
    /// Required for a new agent; with `recover`, what is not given is kept.
    pub capability: Option<String>,
    pub parent: Option<String>,
    pub task: Option<String>,
    pub worktree: Option<PathBuf>,
    pub runtime: Option<String>,
    pub model: Option<String>,
    pub recover: bool,
    pub command: Option<Vec<String>>,
    /// Fleet mode: `--host H` or `*` (default: this host for a new agent,
    /// the agent's own with `--recover`).
    pub host: Option<String>,
}

pub fn agent_add(ctx: &Ctx, req: AddRequest) -> Result<Session> {
    check_name(&req.name)?;
    if let Some(p) = &req.parent {
        check_name(p)?;
    }
    if let Some(h) = &req.host {
        crate::hosts::check_host_flag(ctx, h)?;
    }
    // `--recover` keeps what it is not told to change: capability, runtime
    // and command, worktree, task (parent, model and session id as well).
    let kept = if req.recover {
        sessions::get(&ctx.store()?.conn, &req.name)?
    } else {
        None
    };
    let capability = match (&req.capability, &kept) {
        (Some(c), _) => c.clone(),
        (None, Some(k)) => k.capability.clone(),
        (None, None) if req.recover => {
            return Err(usage(format!(
                "agent {} does not exist; add it with --capability, without --recover",
                req.name
            )));
        }
        (None, None) => return Err(usage("--capability is required for a new agent")),
    };
    capability::load(&ctx.root.dir, &capability)?;
    let mut command = req.command.clone();
    let mut runtime_flag = req.runtime.clone();
    if let Some(k) = &kept
        && runtime_flag.is_none()
        && command.is_none()
    {
        runtime_flag = Some(k.runtime.clone());
        command = k.runtime_command.clone();
    }
    let runtime = match (&runtime_flag, &command) {
        (Some(r), Some(_)) if r != "command" => {
            return Err(usage(format!(
                "--command implies --runtime command, not '{r}'"
            )));
        }
        (_, Some(c)) if c.is_empty() => return Err(usage("--command needs a program")),
        (_, Some(_)) => "command".to_string(),
        (Some(r), None) if r == "command" => {
            return Err(usage("--runtime command needs --command PROG [ARG...]"));
        }
        (Some(r), None) => r.clone(),
        (None, None) => "claude".to_string(),
    };
    if !RUNTIMES.contains(&runtime.as_str()) {
        return Err(usage(format!(
            "unknown runtime '{runtime}'; use one of {}",
            RUNTIMES.join(", ")
        )));
    }
    let cwd = std::env::current_dir()
        .map_err(|e| usage(format!("cannot read the current directory: {e}")))?;
    let worktree = match (&req.worktree, &kept) {
        (Some(w), _) => cwd.join(w),
        (None, Some(k)) => PathBuf::from(&k.worktree_path),
        (None, None) => cwd,
    };
    if !worktree.is_dir() {
        return Err(usage(format!(
            "worktree {} is not a directory",
            worktree.display()
        )));
    }
    let mut store = ctx.store()?;
    let depth = match &req.parent {
        Some(p) => sessions::get(&store.conn, p)?
            .map(|s| s.depth + 1)
            .unwrap_or(1),
        None => 0,
    };
    let ns = NewSession {
        agent_name: req.name.clone(),
        capability,
        worktree_path: worktree.display().to_string(),
        task_id: req
            .task
            .clone()
            .or_else(|| kept.as_ref().map(|k| k.task_id.clone()))
            .unwrap_or_default(),
        parent_agent: req.parent.clone(),
        depth,
        runtime,
        runtime_command: command,
        model: req.model.clone(),
        now: clock::now(),
    };
    // The row and its host in one transaction: a new agent is never seen
    // unpinned. `--recover` keeps the agent's host unless `--host` is given.
    let host = match (&req.host, req.recover) {
        (Some(h), _) => Some(h.clone()),
        (None, false) if store.conn.is_pg() => Some(ctx.config.host_id.clone()),
        (None, _) => None,
    };
    store.tx("registering the agent", |tx| {
        match sessions::get(tx, &req.name)? {
            None if req.recover => {
                return Ok(Err(usage(format!(
                    "agent {} does not exist; add it without --recover",
                    req.name
                ))));
            }
            None => sessions::insert(tx, &ns)?,
            Some(existing) if !req.recover => {
                return Ok(Err(usage(format!(
                    "agent {} already exists (state {}); pick another name, or --recover a completed or zombie agent",
                    existing.agent_name, existing.state
                ))));
            }
            Some(existing) => {
                if !sessions::recover(tx, &ns)? {
                    return Ok(Err(usage(format!(
                        "agent {} is {}: only a completed or zombie agent can be recovered",
                        existing.agent_name, existing.state
                    ))));
                }
            }
        }
        if let Some(h) = &host {
            crate::store::hosts::set_agent_host(tx, &req.name, h)?;
        }
        Ok(Ok(()))
    })??;
    // The root's other stores exist once an agent does: creating a
    // database (its journal, WAL and fsyncs) is setup, not a turn's work.
    if !store.conn.is_pg() {
        crate::store::events::open(&ctx.root.dir)?;
        crate::store::metrics::create(&ctx.root.dir)?;
    }
    sessions::get(&store.conn, &req.name)?
        .ok_or_else(|| crate::error::Error::Internal("agent vanished".into()))
}

#[derive(Debug, Serialize)]
pub struct AgentView {
    #[serde(flatten)]
    pub session: Session,
    pub running: Option<LeaseInfo>,
    pub due_mail: i64,
    pub pending_mail: i64,
    pub last_turn: Option<TurnRow>,
    pub cost_usd: f64,
    /// Fleet mode: the agent's host (`*` when floating); absent on SQLite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

pub fn agent_show(ctx: &Ctx, name: &str) -> Result<AgentView> {
    check_name(name)?;
    let store = ctx.store()?;
    let s = sessions::get(&store.conn, name)?
        .ok_or_else(|| usage(format!("unknown agent '{name}'; see runner status")))?;
    let host = if store.conn.is_pg() {
        Some(
            crate::store::hosts::agent_host(&store.conn, name)?
                .unwrap_or_else(|| crate::hosts::ANY.into()),
        )
    } else {
        None
    };
    view(ctx, &store, s, host)
}

fn view(
    ctx: &Ctx,
    store: &crate::store::Store,
    s: Session,
    host: Option<String>,
) -> Result<AgentView> {
    let lock = ctx.root.lock_path(&s.agent_name);
    let running = if lease::is_held(&lock) {
        Some(lease::read_info(&lock).unwrap_or_default())
    } else {
        None
    };
    let now = clock::now();
    let due = mailstore::due_count(&store.conn, &s.agent_name, &now)?;
    let pending = mailstore::pending_count(&store.conn, &s.agent_name)?;
    Ok(AgentView {
        running,
        due_mail: due,
        pending_mail: pending,
        last_turn: turns::last_finished(&store.conn, &s.agent_name)?,
        cost_usd: turns::total_cost(&store.conn, &s.agent_name)?,
        host,
        session: s,
    })
}

pub fn status(ctx: &Ctx, agent: Option<&str>) -> Result<Vec<AgentView>> {
    let store = ctx.store()?;
    let list = match agent {
        Some(a) => {
            check_name(a)?;
            vec![
                sessions::get(&store.conn, a)?
                    .ok_or_else(|| usage(format!("unknown agent '{a}'")))?,
            ]
        }
        None => sessions::list(&store.conn)?,
    };
    let hosts = crate::hosts::agent_hosts(ctx)?;
    list.into_iter()
        .map(|s| {
            let host = hosts.as_ref().map(|h| {
                h.get(&s.agent_name)
                    .cloned()
                    .unwrap_or_else(|| crate::hosts::ANY.into())
            });
            view(ctx, &store, s, host)
        })
        .collect()
}

pub struct SendRequest {
    pub from: String,
    pub to: String,
    pub kind: String,
    pub subject: String,
    pub body: String,
    pub priority: String,
    pub payload: Option<String>,
    pub thread: Option<String>,
    pub force: bool,
}

pub fn mail_send(ctx: &Ctx, req: SendRequest) -> Result<String> {
    check_name(&req.from)?;
    check_name(&req.to)?;
    if !MAIL_TYPES.contains(&req.kind.as_str()) {
        return Err(usage(format!(
            "unknown mail type '{}'; use one of {}",
            req.kind,
            MAIL_TYPES.join(", ")
        )));
    }
    if !PRIORITIES.contains(&req.priority.as_str()) {
        return Err(usage(format!(
            "unknown priority '{}'; use one of {}",
            req.priority,
            PRIORITIES.join(", ")
        )));
    }
    if let Some(p) = &req.payload
        && let Err(e) = serde_json::from_str::<serde_json::Value>(p)
    {
        return Err(usage(format!("--payload is not valid JSON: {e}")));
    }
    let store = ctx.store()?;
    if !req.force
        && let Some(s) = sessions::get(&store.conn, &req.to)?
        && s.state().is_some_and(State::is_finished)
    {
        return Err(usage(format!(
            "agent {} is {}: it will not read mail (use --force to send anyway)",
            req.to, s.state
        )));
    }
    let turn_id = std::env::var("RUNNER_TURN_ID")
        .ok()
        .filter(|t| !t.is_empty());
    let m = NewMessage {
        from_agent: req.from,
        to_agent: req.to,
        subject: req.subject,
        body: req.body,
        kind: req.kind,
        priority: req.priority,
        thread_id: req.thread,
        payload: req.payload,
        turn_id,
    };
    // Fleet mode: mail an agent sends from inside a turn is that turn's
    // write, fenced by its lease (SPEC §12.3): refused (exit 75) once the
    // fleet took the turn over.
    let fenced_turn = m.turn_id.clone().filter(|_| store.conn.is_pg());
    let mut store = store;
    Ok(store.tx("sending mail", |tx| {
        if let Some(t) = &fenced_turn
            && !crate::store::leases::turn_is_current(tx, t)?
        {
            return Err(crate::store::StoreError::LeaseLost {
                agent: m.from_agent.clone(),
                token: 0,
                context: format!("this mail was sent: turn {t} no longer holds its lease"),
            });
        }
        mailstore::insert(tx, &m, &clock::now())
    })?)
}

pub fn mail_list(ctx: &Ctx, f: ListFilter) -> Result<Vec<Message>> {
    for n in [&f.to, &f.from].into_iter().flatten() {
        check_name(n)?;
    }
    let store = ctx.store()?;
    Ok(mailstore::list(&store.conn, &f)?)
}

/// `mail list` with, in fleet mode, each message's host: its recipient's
/// (where it will be delivered; `*` for a floating or unknown agent).
pub fn mail_list_hosts(ctx: &Ctx, f: ListFilter) -> Result<Vec<crate::report::MailRow>> {
    let rows = mail_list(ctx, f)?;
    let hosts = crate::hosts::agent_hosts(ctx)?;
    Ok(rows
        .into_iter()
        .map(|m| crate::report::MailRow {
            host: hosts.as_ref().map(|h| {
                h.get(&m.to_agent)
                    .cloned()
                    .unwrap_or_else(|| crate::hosts::ANY.into())
            }),
            message: m,
        })
        .collect())
}

pub fn mail_check(ctx: &Ctx, agent: &str) -> Result<Vec<Message>> {
    check_name(agent)?;
    let store = ctx.store()?;
    Ok(mailstore::check(&store.conn, agent, &clock::now())?)
}

pub fn turns(ctx: &Ctx, agent: Option<&str>, limit: i64) -> Result<Vec<TurnRow>> {
    if let Some(a) = agent {
        check_name(a)?;
    }
    let store = ctx.store()?;
    Ok(turns::list(&store.conn, agent, limit.max(0))?)
}

pub fn events(ctx: &Ctx, f: &EventFilter) -> Result<Vec<StoredEvent>> {
    if let Some(a) = &f.agent {
        check_name(a)?;
    }
    let conn = ctx.events()?;
    Ok(ev::list(&conn, f)?)
}
