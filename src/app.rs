//! Dispatch: one library call per command, its result printed by
//! [`report::emit`] in the form asked for, and the exit code the result means.
//! `main` calls [`main`] and exits with what it returns.
//!
//! Invariant: every agent name on the command line is checked before the
//! root is opened (or created), so a bad name touches no file.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::cli::{
    AgentCmd, Cli, Command, EventsArgs, MailCmd, ServeArgs, StoreCmd, TurnArgs, WebArgs, read_text,
};
use crate::ctx::Ctx;
use crate::error::{Error, Result, exit_code};
use crate::hosts;
use crate::ops;
use crate::report::{self, emit};
use crate::serve;
use crate::store::events::EventFilter;
use crate::turn::{self, AbortRequest, TurnRequest, TurnSummary};

/// Runs a parsed command line; returns the process exit code.
pub async fn main(cli: Cli) -> i32 {
    let root = crate::ctx::absolute_root(&cli.root).unwrap_or_else(|_| cli.root.clone());
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            // A full or failing disk is said as what to do, naming the root.
            let e = e.under_root(&root);
            report::error(&e.to_string());
            exit_code(&e)
        }
    }
}

/// Writes generated text (completions, the man page) to stdout.
fn print_bytes(b: &[u8]) -> Result<i32> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(b)
        .and_then(|()| out.flush())
        .map_err(|e| crate::error::usage(format!("cannot write to stdout: {e}")))?;
    Ok(0)
}

async fn run(cli: Cli) -> Result<i32> {
    let json = cli.json;
    if let Command::FakeAgent(a) = cli.command {
        return Ok(crate::fake_agent::run(a));
    }
    if let Command::Demo = cli.command {
        return crate::demo::run(json).await;
    }
    match cli.command {
        Command::Completions { shell } => return print_bytes(&crate::manual::completions(shell)),
        Command::Man => {
            let page = crate::manual::man_page()
                .map_err(|e| Error::Internal(format!("rendering the man page: {e}")))?;
            return print_bytes(&page);
        }
        // Before `Ctx::new`: doctor creates nothing and reports a broken
        // config instead of refusing it.
        Command::Doctor => {
            let root = crate::ctx::absolute_root(&cli.root)?;
            return Ok(emit(&crate::doctor::run(&root).await, json));
        }
        _ => {}
    }
    for name in cli.command.agent_names() {
        crate::root::check_name(name)?;
    }
    let mut ctx = Ctx::new(&cli.root, json)?;
    if let Some(url) = &cli.store {
        ctx.config.set_store_url(url, "--store")?;
    }
    Ok(match cli.command {
        Command::Demo
        | Command::FakeAgent(_)
        | Command::Completions { .. }
        | Command::Man
        | Command::Doctor => unreachable!("handled above"),
        Command::Init(i) => emit(
            &ops::init(&ctx, i.save.then_some(cli.store).flatten())?,
            json,
        ),
        Command::Agent(AgentCmd::Add(a)) => emit(&ops::agent_add(&ctx, a.into())?, json),
        Command::Agent(AgentCmd::Show { name }) => emit(&ops::agent_show(&ctx, &name)?, json),
        // Fleet mode (SPEC §12.2): commands that run turns or sweeps
        // register this host; an agent pinned to another host is refused
        // right after its name is checked, before its state is read.
        Command::Turn(t) => {
            // One turn, then exit: its store connections are left to the exit.
            crate::store::exits_after_work();
            hosts::enter(&ctx, Some(&t.agent), true)?;
            emit(&run_turn(&ctx, t).await?, json)
        }
        Command::Nudge(n) => {
            hosts::enter(&ctx, Some(&n.agent), true)?;
            emit(
                &serve::nudge(&ctx, &n.agent, n.text, n.from, n.force).await?,
                json,
            )
        }
        Command::Stop(s) => {
            hosts::enter(&ctx, Some(&s.agent), false)?;
            emit(
                &crate::stop::stop(&ctx, &s.agent, s.grace, s.wait).await?,
                json,
            )
        }
        Command::Serve(s) => emit(&run_serve(&ctx, s).await?, json),
        Command::Hosts => emit(&hosts::list(&ctx)?, json),
        Command::Web(w) => run_web(&ctx, w).await?,
        Command::Sweep(s) => {
            if !s.dry_run {
                hosts::enter(&ctx, None, true)?;
            }
            let c = ctx.clone();
            let r = tokio::task::spawn_blocking(move || crate::sweep::sweep(&c, s.dry_run))
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
            emit(&r, json)
        }
        Command::Status(s) => emit(
            &report::StatusTable(ops::status(&ctx, s.agent.as_deref())?),
            json,
        ),
        Command::Turns(t) => emit(
            &report::TurnList(
                ops::turns(&ctx, t.agent.as_deref(), t.limit)?,
                hosts::fleet(&ctx),
            ),
            json,
        ),
        Command::Events(e) if e.follow => follow_events(&ctx, e).await?,
        Command::Events(e) => emit(&report::EventList(ops::events(&ctx, &e.into())?), json),
        Command::Mail(MailCmd::Send(m)) => emit(
            &report::Sent {
                id: ops::mail_send(&ctx, m.into_request()?)?,
            },
            json,
        ),
        Command::Mail(MailCmd::List(l)) => emit(
            &report::MailList(ops::mail_list_hosts(&ctx, l.into())?),
            json,
        ),
        Command::Mail(MailCmd::Check { agent }) => {
            emit(&report::MailBodies(ops::mail_check(&ctx, &agent)?), json)
        }
        Command::Store(StoreCmd::Migrate(m)) => {
            let root = ctx.root.dir.clone();
            if !root.join("sessions.db").exists() {
                return Err(crate::error::usage(format!(
                    "no runner store under {}: nothing to migrate (check --root)",
                    root.display()
                )));
            }
            let r = tokio::task::spawn_blocking(move || {
                crate::store::pg::copy::copy_root(&root, &m.to, &m.schema)
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
            emit(&r, json)
        }
    })
}

/// `runner turn`: `--message` (or its file) goes first, or is stored as mail
/// from `--from`; the turn is aborted by SIGINT/SIGTERM.
async fn run_turn(ctx: &Ctx, t: TurnArgs) -> Result<TurnSummary> {
    let mut message = match (&t.message, &t.message_file) {
        (Some(m), _) => Some(m.clone()),
        (None, Some(p)) => Some(read_text(p, "--message-file")?),
        (None, None) => None,
    };
    if let Some(from) = &t.from
        && let Some(text) = message.take()
    {
        ops::mail_send(
            ctx,
            ops::SendRequest {
                from: from.clone(),
                to: t.agent.clone(),
                kind: "status".into(),
                subject: "message".into(),
                body: text,
                priority: "normal".into(),
                payload: None,
                thread: None,
                force: false,
            },
        )?;
    }
    let wait = if t.no_wait {
        Duration::ZERO
    } else {
        t.wait.unwrap_or(Duration::from_secs(60))
    };
    let progress = (!ctx.json).then(|| report::progress_printer(&t.agent));
    let req = TurnRequest {
        agent: t.agent,
        message,
        no_mail: t.no_mail,
        wait,
        stall: t.stall,
        grace: t.grace,
        deadline: t.deadline,
        progress,
        finished_is_nothing: false,
    };
    turn::run(ctx, req, abort_on_signals()).await
}

/// `runner serve`: flags over configuration, until signalled.
async fn run_serve(ctx: &Ctx, s: ServeArgs) -> Result<serve::ServeReport> {
    let cfg = &ctx.config;
    let opts = serve::ServeOptions {
        poll: s.poll.unwrap_or(cfg.serve_poll),
        sweep_every: s.sweep_every.unwrap_or(cfg.sweep_every),
        max_concurrent: s.max_concurrent.unwrap_or(cfg.serve_max_concurrent).max(1),
        grace: s.grace.unwrap_or(cfg.grace),
        stall: s.stall,
        counters: crate::web::metrics::ServeCounters::default(),
    };
    // Dropped (and so stopped) when serve returns.
    let _web = match s.http.as_ref().or(cfg.serve_http.as_ref()) {
        Some(addr) => Some(crate::web::start(ctx, addr, Some(opts.counters.clone())).await?),
        None => None,
    };
    // Registered and beating while it serves; `stopped` on a clean exit.
    // Signals first: a SIGTERM right after the host shows online is counted.
    let signals = serve::signal_counter();
    let host = hosts::Serving::start(ctx)?;
    let rep = serve::serve(Arc::new(ctx.clone()), opts, signals).await?;
    host.stopped()?;
    Ok(rep)
}

/// `runner web`: the read-only dashboard and /metrics until SIGINT/SIGTERM.
async fn run_web(ctx: &Ctx, w: WebArgs) -> Result<i32> {
    let addr = w
        .http
        .or_else(|| ctx.config.serve_http.clone())
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let _web = crate::web::start(ctx, &addr, None).await?;
    let mut signals = serve::signal_counter();
    let _ = signals.changed().await;
    Ok(0)
}

/// `runner events --follow`: what is there, then every new event as it is
/// written (one JSON object per line with `--json`), until SIGINT/SIGTERM.
/// New rows are polled by id ([`crate::store::follow`]).
async fn follow_events(ctx: &Ctx, e: EventsArgs) -> Result<i32> {
    let print = |r: &crate::store::events::StoredEvent| {
        if ctx.json {
            report::json_line(r)
        } else {
            println!("{}", report::event_line(r))
        }
    };
    let f: EventFilter = e.into();
    // One connection for the whole follow: polling never reconnects (on
    // PostgreSQL a connect is a round trip and a migration check).
    let conn = ctx.events()?;
    // The end of the table first, so nothing written meanwhile is lost.
    let mut follow = crate::store::follow::Follow::start(&conn, f.clone())?;
    let first = ops::events(ctx, &f)?;
    first.iter().for_each(print);
    if let Some(l) = first.last() {
        follow.shown(l.id);
    }
    let mut signals = serve::signal_counter();
    let mut more = false;
    loop {
        if more {
            // A backlog: read on, but still stop when asked.
            if signals.has_changed().unwrap_or(false) {
                return Ok(0);
            }
        } else {
            tokio::select! {
                _ = signals.changed() => return Ok(0),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        let (new, m) = follow.poll(&conn, std::time::Instant::now())?;
        more = m;
        new.iter().for_each(print);
    }
}

/// First SIGINT/SIGTERM: abort with grace; second: kill at once.
pub fn abort_on_signals() -> watch::Receiver<AbortRequest> {
    let (tx, rx) = watch::channel(AbortRequest::None);
    let mut signals = serve::signal_counter();
    tokio::spawn(async move {
        while signals.changed().await.is_ok() {
            let n = *signals.borrow_and_update();
            let _ = tx.send(if n >= 2 {
                AbortRequest::Kill
            } else {
                AbortRequest::Graceful
            });
        }
    });
    rx
}
