//! Dispatch: one library call per command, its result printed by `report`,
//! and the exit code. `main` calls [`main`] and exits with what it returns.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::cli::{AgentCmd, Cli, Command, MailCmd};
use crate::ctx::Ctx;
use crate::error::{Result, exit_code, usage};
use crate::ops;
use crate::report;
use crate::serve;
use crate::store::events::EventFilter;
use crate::store::mail::ListFilter;
use crate::turn::{self, AbortRequest, TurnRequest};

/// Runs a parsed command line; returns the process exit code.
pub async fn main(cli: Cli) -> i32 {
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            report::error(&e.to_string());
            exit_code(&e)
        }
    }
}

fn read_text(path: &std::path::Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| usage(format!("cannot read {what} {}: {e}", path.display())))
}

async fn run(cli: Cli) -> Result<i32> {
    let json = cli.json;
    if let Command::FakeAgent(a) = cli.command {
        return Ok(crate::fake_agent::run(a));
    }
    if let Command::Demo = cli.command {
        return crate::demo::run(json).await;
    }
    let ctx = Ctx::new(&cli.root, json)?;
    match cli.command {
        Command::Demo | Command::FakeAgent(_) => unreachable!("handled above"),
        Command::Init => {
            let dir = ops::init(&ctx)?;
            if json {
                report::json(&serde_json::json!({"root": dir}));
            } else {
                println!("initialized {}", dir.display());
            }
        }
        Command::Agent(AgentCmd::Add(a)) => {
            let s = ops::agent_add(
                &ctx,
                ops::AddRequest {
                    name: a.name,
                    capability: a.capability,
                    parent: a.parent,
                    task: a.task,
                    worktree: a.worktree,
                    runtime: a.runtime,
                    model: a.model,
                    recover: a.recover,
                    command: a.command,
                },
            )?;
            if json {
                report::json(&s);
            } else {
                println!(
                    "agent {} added ({}, runtime {}, state {})",
                    s.agent_name, s.capability, s.runtime, s.state
                );
            }
        }
        Command::Agent(AgentCmd::Show { name }) => {
            let v = ops::agent_show(&ctx, &name)?;
            if json {
                report::json(&v);
            } else {
                report::agent(&v);
            }
        }
        Command::Turn(t) => {
            let mut message = match (&t.message, &t.message_file) {
                (Some(m), _) => Some(m.clone()),
                (None, Some(p)) => Some(read_text(p, "--message-file")?),
                (None, None) => None,
            };
            crate::root::check_name(&t.agent)?;
            if let Some(from) = &t.from
                && let Some(text) = message.take()
            {
                ops::mail_send(
                    &ctx,
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
            let progress = if json {
                None
            } else {
                Some(report::progress_printer(&t.agent))
            };
            let req = TurnRequest {
                agent: t.agent.clone(),
                message,
                no_mail: t.no_mail,
                wait,
                stall: t.stall,
                grace: t.grace,
                deadline: t.deadline,
                progress,
            };
            let abort = abort_on_signals();
            let s = turn::run(&ctx, req, abort).await?;
            if json {
                report::json(&s);
            } else {
                report::turn_summary(&s);
            }
            return Ok(s.exit_code);
        }
        Command::Nudge(n) => {
            let r = serve::nudge(&ctx, &n.agent, n.text, n.from, n.force).await?;
            let code = r.turn.as_ref().map(|t| t.exit_code).unwrap_or(0);
            if json {
                report::json(&r);
            } else {
                println!("{}", r.message);
            }
            return Ok(code);
        }
        Command::Stop(s) => {
            let r = crate::stop::stop(&ctx, &s.agent, s.grace, s.wait).await?;
            if json {
                report::json(&r);
            } else {
                println!("{}", r.message);
            }
        }
        Command::Serve(s) => {
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
                Some(addr) => {
                    Some(crate::web::start(&ctx, addr, Some(opts.counters.clone())).await?)
                }
                None => None,
            };
            let signals = serve::signal_counter();
            let r = serve::serve(Arc::new(ctx.clone()), opts, signals).await?;
            if json {
                report::json(&r);
            } else {
                println!(
                    "serve: {} turn(s), {} sweep(s), {} interrupted",
                    r.turns, r.sweeps, r.interrupted
                );
            }
        }
        Command::Web(w) => {
            let addr = w
                .http
                .or_else(|| ctx.config.serve_http.clone())
                .unwrap_or_else(|| "127.0.0.1:8080".into());
            let _web = crate::web::start(&ctx, &addr, None).await?;
            let mut signals = serve::signal_counter();
            let _ = signals.changed().await;
        }
        Command::Sweep(s) => {
            let c = ctx.clone();
            let r = tokio::task::spawn_blocking(move || crate::sweep::sweep(&c, s.dry_run))
                .await
                .map_err(|e| crate::error::Error::Internal(e.to_string()))??;
            if json {
                report::json(&r);
            } else {
                println!(
                    "sweep{}: scanned {}, orphan turns {}, groups killed {}, claims retried {}, released {}, dead {}, states fixed {}, turns stopped {}, due agents {}, errors {}",
                    if r.dry_run { " (dry run)" } else { "" },
                    r.scanned,
                    r.orphan_turns,
                    r.groups_killed,
                    r.claims_retried,
                    r.claims_released,
                    r.claims_dead,
                    r.states_fixed,
                    r.turns_stopped,
                    r.due_agents,
                    r.errors
                );
                for e in &r.error_messages {
                    report::error(e);
                }
            }
        }
        Command::Status(s) => {
            let rows = ops::status(&ctx, s.agent.as_deref())?;
            if json {
                report::json(&rows);
            } else {
                report::status(&rows);
            }
        }
        Command::Turns(t) => {
            let rows = ops::turns(&ctx, t.agent.as_deref(), t.limit)?;
            if json {
                report::json(&rows);
            } else {
                report::turns(&rows);
            }
        }
        Command::Events(e) => {
            let mut f = EventFilter {
                agent: e.agent,
                turn: e.turn,
                event_type: e.event_type,
                after_id: 0,
                limit: e.limit,
            };
            let rows = ops::events(&ctx, &f)?;
            if e.follow {
                for r in &rows {
                    if json {
                        report::json_line(r)
                    } else {
                        println!("{}", report::event_line(r))
                    }
                }
                f.after_id = rows.last().map(|r| r.id).unwrap_or(0);
                if f.after_id == 0 {
                    f.after_id = -1;
                }
                f.limit = 1000;
                let mut signals = serve::signal_counter();
                loop {
                    tokio::select! {
                        _ = signals.changed() => break,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    let q = EventFilter {
                        after_id: f.after_id.max(0),
                        ..f.clone()
                    };
                    let q = if q.after_id == 0 {
                        EventFilter { after_id: 0, ..q }
                    } else {
                        q
                    };
                    let new = ops::events(&ctx, &EventFilter { limit: 1000, ..q })?;
                    let new: Vec<_> = new.into_iter().filter(|r| r.id > f.after_id).collect();
                    for r in &new {
                        if json {
                            report::json_line(r)
                        } else {
                            println!("{}", report::event_line(r))
                        }
                    }
                    if let Some(l) = new.last() {
                        f.after_id = l.id;
                    }
                }
            } else if json {
                report::json(&rows);
            } else {
                report::events(&rows);
            }
        }
        Command::Mail(MailCmd::Send(m)) => {
            let body = match (&m.body, &m.body_file) {
                (Some(b), _) => b.clone(),
                (None, Some(p)) => read_text(p, "--body-file")?,
                (None, None) => String::new(),
            };
            let id = ops::mail_send(
                &ctx,
                ops::SendRequest {
                    from: m.from,
                    to: m.to,
                    kind: m.kind,
                    subject: m.subject,
                    body,
                    priority: m.priority,
                    payload: m.payload,
                    thread: m.thread,
                    force: m.force,
                },
            )?;
            if json {
                report::json(&serde_json::json!({"id": id}));
            } else {
                println!("{id}");
            }
        }
        Command::Mail(MailCmd::List(l)) => {
            let rows = ops::mail_list(
                &ctx,
                ListFilter {
                    to: l.to,
                    from: l.from,
                    unread: l.unread,
                    dead: l.dead,
                    limit: l.limit,
                },
            )?;
            if json {
                report::json(&rows);
            } else {
                report::mail(&rows);
            }
        }
        Command::Mail(MailCmd::Check { agent }) => {
            let rows = ops::mail_check(&ctx, &agent)?;
            if json {
                report::json(&rows);
            } else {
                report::mail_bodies(&rows);
            }
        }
    }
    Ok(0)
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
