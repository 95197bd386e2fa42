//! `runner demo`: a complete turn on a throw-away root with the built-in
//! fake agent, explaining itself as it goes. The first thing a newcomer runs.

use std::time::Duration;

use tokio::sync::watch;

use crate::ctx::Ctx;
use crate::error::{Result, usage};
use crate::ops;
use crate::report;
use crate::turn::{self, AbortRequest, TurnRequest};

pub async fn run(json: bool) -> Result<i32> {
    let dir = std::env::temp_dir().join(format!(
        "runner-demo-{}-{}",
        std::process::id(),
        crate::os::random_alnum(4)
    ));
    let ctx = Ctx::new(&dir, json)?;
    let exe = std::env::current_exe()
        .map_err(|e| usage(format!("cannot find the runner binary: {e}")))?;
    let exe = exe.display().to_string();
    let say = |s: &str| {
        if !json {
            println!("\n== {s}");
        }
    };
    say(&format!("A throw-away root: {}", dir.display()));
    ops::init(&ctx, None)?;
    let worktree = dir.join("worktree");
    crate::root::private_dir(&worktree)?;
    say(
        "Registering a lead and a builder. The builder's CLI is the built-in fake agent\n   (`runner fake-agent --demo`), which speaks Claude Code's stream-json protocol.",
    );
    for (name, cap, parent, args) in [
        ("lead", "lead", None, vec![exe.clone(), "fake-agent".into()]),
        (
            "builder-1",
            "builder",
            Some("lead".to_string()),
            vec![exe.clone(), "fake-agent".into(), "--demo".into()],
        ),
    ] {
        let s = ops::agent_add(
            &ctx,
            ops::AddRequest {
                name: name.into(),
                capability: Some(cap.into()),
                parent,
                task: Some("DEMO-1".into()),
                worktree: Some(worktree.clone()),
                runtime: None,
                model: None,
                recover: false,
                command: Some(args),
                host: None,
            },
        )?;
        if !json {
            eprintln!(
                "   {} ({}, parent {}) → state {}",
                s.agent_name,
                s.capability,
                s.parent_agent.as_deref().unwrap_or("-"),
                s.state
            );
        }
    }
    say("The lead mails the builder its task (runner mail send).");
    let id = ops::mail_send(
        &ctx,
        ops::SendRequest {
            from: "lead".into(),
            to: "builder-1".into(),
            kind: "dispatch".into(),
            subject: "Make the greeting configurable".into(),
            body: "Read GREETING from the environment; keep the tests green. Report worker_done when finished.".into(),
            priority: "normal".into(),
            payload: None,
            thread: None,
            force: false,
        },
    )?;
    if !json {
        eprintln!("   {id}");
    }
    say(
        "One turn of builder-1 (runner turn --agent builder-1): lease, claim the mail, spawn, stream\n   events into SQLite, watch for stalls, detect the worker_done mail, settle by compare-and-swap.",
    );
    let (_tx, rx) = watch::channel(AbortRequest::None);
    let req = TurnRequest {
        agent: "builder-1".into(),
        wait: Duration::from_secs(5),
        progress: if json {
            None
        } else {
            Some(report::progress_printer("builder-1"))
        },
        ..Default::default()
    };
    let summary = turn::run(&ctx, req, rx).await?;
    let status = ops::status(&ctx, None)?;
    let inbox = ops::mail_list(
        &ctx,
        crate::store::mail::ListFilter {
            to: Some("lead".into()),
            limit: 10,
            ..Default::default()
        },
    )?;
    if json {
        report::json(
            &serde_json::json!({"root": dir, "turn": summary, "status": status, "lead_inbox": inbox}),
        );
        return Ok(summary.exit_code);
    }
    say("The turn's summary:");
    report::turn_summary(&summary);
    say("runner status:");
    report::status(&status);
    say("The lead's inbox (runner mail list --to lead): the builder's worker_done.");
    report::mail(&inbox);
    say("Look around:");
    let r = dir.display();
    eprintln!("   runner --root {r} events --agent builder-1");
    eprintln!("   runner --root {r} turns");
    eprintln!("   ls {r}/logs/builder-1/*/   (stdout.ndjson, stderr.log, runner.log)");
    Ok(summary.exit_code)
}
