//! Mail across hosts (SPEC §12.4), on PostgreSQL only: every mail insert
//! issues `NOTIFY runner_mail` with the recipient; `serve` `LISTEN`s and
//! starts the recipient's turn at once, not at its next poll; a listener
//! whose connection is lost reconnects, re-`LISTEN`s and catches up. And
//! `events --follow` across hosts (§12.6): rows committed out of id order.
//!
//! Each serve here polls every 60 s, so mail delivered within seconds was
//! delivered because of a notification (or of the wake that follows a
//! reconnection). The `NOTIFY` channel is shared by
//! every schema of the database (other tests' mail wakes these serves too,
//! harmlessly), so the direct `NOTIFY` test uses a recipient of its own.

use std::process::Child;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use postgres::fallible_iterator::FallibleIterator;

use crate::{TestRoot, signal, wait_child, wait_for};

/// Serve with a poll far longer than any deadline below.
fn serve_slow_poll(t: &TestRoot) -> Child {
    let mut c = t.cmd([
        "serve",
        "--poll",
        "60s",
        "--sweep-every",
        "1h",
        "--grace",
        "300ms",
    ]);
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c.spawn().unwrap()
}

/// The backend pid of this root's serve listener, once it listens.
fn listener_pid(t: &TestRoot, admin: &mut postgres::Client) -> Option<i32> {
    let name = runner::store::pg::listen::application_name(&t.pg().unwrap().schema);
    admin
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .unwrap()
        .map(|r| r.get(0))
}

/// Stops serve with SIGINT and checks that it exits 0.
fn stop(child: Child) {
    signal(child.id(), Signal::SIGINT);
    let out = wait_child(child, Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(0),
        "serve: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serve_starts_a_notified_turn_at_once_not_at_the_next_poll() {
    let Some(t) = TestRoot::postgres() else {
        return;
    };
    // A lead waits for more mail after a turn.
    t.agent("b1", "lead", None, &[]);
    let child = serve_slow_poll(&t);
    let mut admin = t.pg().unwrap().client();
    wait_for(Duration::from_secs(20), "serve to listen", || {
        listener_pid(&t, &mut admin).is_some()
    });
    let t0 = Instant::now();
    let id = t.mail("orchestrator", "b1", "hello");
    wait_for(Duration::from_secs(15), "the mail to be delivered", || {
        t.mail_state(&id).0 == 1
    });
    assert!(t0.elapsed() < Duration::from_secs(60), "not by the poll");
    let turn = t.last_turn("b1");
    assert_eq!(turn["mail_ids"][0], id.as_str(), "{turn}");
    stop(child);
}

#[test]
fn a_listener_whose_connection_is_killed_reconnects_and_catches_up() {
    let Some(t) = TestRoot::postgres() else {
        return;
    };
    // A lead waits for more mail after a turn.
    t.agent("b1", "lead", None, &[]);
    let mut child = serve_slow_poll(&t);
    let mut admin = t.pg().unwrap().client();
    let mut first = None;
    wait_for(Duration::from_secs(20), "serve to listen", || {
        first = listener_pid(&t, &mut admin);
        first.is_some()
    });
    // Mail whose notification the listener never gets (written without
    // one, as if sent while it was down), due only after serve's first
    // passes: the wake that follows every reconnection finds it.
    let id = "msg-unnotified01";
    let due = std::time::SystemTime::now() + Duration::from_millis(1500);
    admin
        .execute(
            "INSERT INTO messages (id, from_agent, to_agent, subject, body, read, created_at, \
             process_after) VALUES ($1, 'orchestrator', 'b1', 'task', 'missed', 0, $2, $3)",
            &[&id, &runner::clock::now(), &runner::clock::format_ts(due)],
        )
        .unwrap();
    wait_for(Duration::from_secs(5), "the mail to be due", || {
        std::time::SystemTime::now() > due + Duration::from_millis(50)
    });
    let killed: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&first.unwrap()])
        .unwrap()
        .get(0);
    assert!(killed);
    wait_for(
        Duration::from_secs(15),
        "the missed mail to be delivered",
        || t.mail_state(id).0 == 1,
    );
    let mut second = None;
    wait_for(Duration::from_secs(15), "a new listening session", || {
        second = listener_pid(&t, &mut admin);
        second.is_some_and(|p| Some(p) != first)
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "serve is still running"
    );
    // And the new session listens: the next mail is notified, not polled.
    let id = t.mail("orchestrator", "b1", "after reconnecting");
    wait_for(
        Duration::from_secs(15),
        "the second mail to be delivered",
        || t.mail_state(&id).0 == 1,
    );
    stop(child);
}

#[test]
fn every_mail_insert_notifies_runner_mail_with_the_recipient() {
    let Some(t) = TestRoot::postgres() else {
        return;
    };
    let mut listener = t.pg().unwrap().client();
    listener.batch_execute("LISTEN runner_mail").unwrap();
    let to = format!("probe{}", std::process::id());
    t.mail("orchestrator", &to, "x");
    // The channel is the database's: skip other tests' notifications.
    let until = Instant::now() + Duration::from_secs(10);
    let mut got = None;
    while got.is_none() && Instant::now() < until {
        let mut n = listener.notifications();
        let mut it = n.timeout_iter(Duration::from_millis(200));
        while let Some(n) = it.next().unwrap() {
            if n.channel() == "runner_mail" && n.payload() == to {
                got = Some(n.payload().to_string());
                break;
            }
        }
    }
    assert_eq!(got.as_deref(), Some(to.as_str()), "no NOTIFY for {to}");
}

/// `events --follow` on PostgreSQL: a writer that drew a lower id but
/// commits after a newer row (two turns' event writers) is still shown,
/// in id order, and each row once.
#[test]
fn events_follow_shows_a_row_committed_after_a_newer_one() {
    let Some(t) = TestRoot::postgres() else {
        return;
    };
    t.run(["init"]).status(0);
    let pg = t.pg().unwrap();
    let insert = "INSERT INTO events (agent_name, event_type, data, created_at) \
                  VALUES ('w', 'custom', $1, '2026-01-01T00:00:00.000Z')";
    pg.client().execute(insert, &[&"before"]).unwrap();
    let mut f = t.spawn(["events", "--follow", "--json", "--agent", "w"]);
    let rx = crate::stdout_lines(&mut f);
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the existing row");
    assert!(first.contains("before"), "{first}");
    // The slow writer draws its id first and commits last.
    let mut slow = pg.client();
    let mut slow_tx = slow.transaction().unwrap();
    slow_tx.execute(insert, &[&"slow"]).unwrap();
    pg.client().execute(insert, &[&"fast"]).unwrap();
    // Two polls' time: a follow that does not wait for the slow writer
    // shows the newer row now, and never the slow one.
    let mut lines: Vec<String> = rx
        .recv_timeout(Duration::from_millis(400))
        .into_iter()
        .collect();
    slow_tx.commit().unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while lines.len() < 2 && Instant::now() < until {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
    }
    let data: Vec<&str> = lines
        .iter()
        .map(|l| {
            if l.contains("slow") {
                "slow"
            } else if l.contains("fast") {
                "fast"
            } else {
                "other"
            }
        })
        .collect();
    assert_eq!(data, ["slow", "fast"], "{lines:?}");
    signal(f.id(), Signal::SIGINT);
    assert_eq!(
        wait_child(f, Duration::from_secs(10)).status.code(),
        Some(0)
    );
}

/// The listener ends with its handle: serve leaves no session behind.
#[test]
fn a_dropped_listener_closes_its_session() {
    let Some(t) = TestRoot::postgres() else {
        return;
    };
    let pg = t.pg().unwrap();
    let listener = runner::store::pg::listen::Listener::start(&pg.url, &pg.schema);
    let mut admin = pg.client();
    wait_for(Duration::from_secs(20), "the listener to listen", || {
        listener_pid(&t, &mut admin).is_some()
    });
    drop(listener);
    wait_for(Duration::from_secs(5), "its session to end", || {
        listener_pid(&t, &mut admin).is_none()
    });
}
