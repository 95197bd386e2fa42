//! The HTTP side (`runner web`, `runner serve --http`): status codes,
//! content types, token rules on loopback and non-loopback addresses, the
//! metrics text parsed back by a Prometheus parser, escaping of agent text,
//! the live feed's cost when nobody watches, and one test in a real headless
//! Chromium (the page updates live; a hostile event shows as text). The
//! roots are on the store under test (the views run on both), except where
//! a test is about the SQLite files themselves.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use crate::{TestRoot, wait_for};

const LONG: Duration = Duration::from_secs(60);
const TOKEN: &str = "s3cret-token-0123456789";
/// Shown by an agent; must reach every page as text.
const HOSTILE: &str =
    "<script>window.__pwned=1</script>\"><img src=x onerror=\"window.__pwned=2\">";

/// A running `runner web` or `runner serve --http`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    /// Lines of the server's stderr.
    stderr: Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `runner <args>` and waits for its "listening on" line.
fn start(t: &TestRoot, args: &[&str], env: &[(&str, &str)]) -> Server {
    let mut cmd = t.cmd(args);
    cmd.envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let (tx, rx) = channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Owned at once, so a panic below still kills the child.
    let mut server = Server {
        child,
        addr: String::new(),
        stderr: rx,
    };
    let until = Instant::now() + LONG;
    while server.addr.is_empty() {
        let left = until.saturating_duration_since(Instant::now());
        let line = server
            .stderr
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("runner {args:?} never said it was listening"));
        if let Some(rest) = line.split("listening on http://").nth(1) {
            server.addr = rest.split('/').next().unwrap().to_string();
        }
    }
    server
}

struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// One HTTP/1.1 GET with `Connection: close`.
fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // Read the head, then Content-Length bytes (some servers keep the
    // connection open whatever the request says), else to the end.
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "no HTTP response");
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut r = Resp {
        status,
        head,
        body: String::new(),
    };
    let mut raw = Vec::new();
    match r
        .header("content-length")
        .and_then(|n| n.parse::<u64>().ok())
    {
        Some(n) => reader.take(n).read_to_end(&mut raw).unwrap(),
        None => reader.read_to_end(&mut raw).unwrap(),
    };
    r.body = String::from_utf8_lossy(&raw).into_owned();
    assert_ne!(r.header("transfer-encoding").as_deref(), Some("chunked"));
    r
}

fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let r = get(addr, "/metrics", &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    prometheus_parse::Scrape::parse(r.body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of a counter or gauge sample, optionally with one label.
fn value(s: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .find(|x| label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name} is not a plain value: {other:?}"),
        })
}

fn metric(addr: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    value(&scrape(addr), name, label).unwrap_or_else(|| panic!("no {name} {label:?}"))
}

/// An agent whose one turn shows `HOSTILE` as text, as a tool argument and
/// on stderr, then stays silent for `silent_ms`.
fn hostile_agent(t: &TestRoot, name: &str, silent_ms: u64) {
    let lines = [
        serde_json::json!({"type":"assistant","message":{"content":[{"type":"text","text": HOSTILE}]}}),
        serde_json::json!({"type":"assistant","message":{"content":[{"type":"tool_use","id":"tu1","name":"Bash","input":{"command": HOSTILE}}]}}),
    ];
    let file = t.path().join(format!("{name}.ndjson"));
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, text).unwrap();
    let silent = silent_ms.to_string();
    t.agent(
        name,
        "builder",
        None,
        &[
            "--lines",
            "0",
            "--emit",
            file.to_str().unwrap(),
            "--stderr",
            HOSTILE,
            "--silent-ms",
            &silent,
        ],
    );
}

#[test]
fn endpoints_answer_with_their_status_and_content_type() {
    let t = TestRoot::new();
    t.agent(
        "a1",
        "builder",
        None,
        &["--lines", "2", "--tool-every", "1"],
    );
    t.mail("lead", "a1", "go");
    let turn = t.run(["turn", "--agent", "a1", "--json"]);
    turn.status(0);
    let turn_id = turn.json()["turn_id"].as_str().unwrap().to_string();
    let web = start(&t, &["web", "--http", "127.0.0.1:0"], &[]);
    let a = web.addr.as_str();

    let h = get(a, "/healthz", &[]);
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));
    let m = get(a, "/metrics", &[]);
    assert_eq!(
        m.header("content-type").as_deref(),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let page = get(a, "/", &[]);
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(page.body.contains(&turn_id), "the turn is listed");
    let tp = get(a, &format!("/turn/{turn_id}"), &[]);
    assert_eq!(tp.status, 200);
    assert!(
        tp.body.contains("tool_start"),
        "the timeline shows the tool call"
    );
    assert_eq!(get(a, "/turn/no-such-turn", &[]).status, 404);
    assert_eq!(get(a, "/turn/..%2F..%2Fetc", &[]).status, 404);
    assert_eq!(get(a, "/nothing-here", &[]).status, 404);
    let js = get(a, "/assets/app.js", &[]);
    assert_eq!(
        js.header("content-type").as_deref(),
        Some("text/javascript; charset=utf-8")
    );
    assert!(
        !js.body.contains("innerHTML"),
        "the script never writes markup"
    );
    let svg = get(a, "/chart.svg", &[]);
    assert_eq!(svg.header("content-type").as_deref(), Some("image/svg+xml"));
    assert!(svg.body.contains("1 turns"), "{}", svg.body);
    assert_eq!(get(a, "/assets/style.css", &[]).status, 200);

    // The metrics text, parsed back.
    let s = scrape(a);
    let outcome = t.last_turn("a1")["outcome"].as_str().unwrap().to_string();
    assert_eq!(
        value(&s, "runner_turns_total", Some(("outcome", &outcome))),
        Some(1.0)
    );
    assert_eq!(value(&s, "runner_mail", Some(("state", "due"))), Some(0.0));
    let state = t.state("a1");
    assert_eq!(
        value(&s, "runner_agents", Some(("state", &state))),
        Some(1.0)
    );
    let lines = t.i64("sessions.db", "SELECT lines FROM turns");
    assert_eq!(
        value(&s, "runner_lines_ingested_total", None),
        Some(lines as f64)
    );
    let hist = s
        .samples
        .iter()
        .find(|x| x.metric == "runner_turn_duration_seconds")
        .expect("the duration histogram");
    match &hist.value {
        prometheus_parse::Value::Histogram(b) => {
            assert_eq!(b.last().unwrap().count, 1.0, "{b:?}");
        }
        other => panic!("not a histogram: {other:?}"),
    }
    for name in [
        "runner_turns_total",
        "runner_cost_usd_total",
        "runner_mail",
        "runner_agents",
    ] {
        assert!(s.docs.contains_key(name), "HELP for {name}");
    }
    assert!(
        value(&s, "runner_serve_backoffs_total", None).is_none(),
        "serve-only"
    );
}

#[test]
fn live_feed_polls_only_while_watched() {
    let t = TestRoot::new();
    t.agent("a1", "builder", None, &[]);
    let web = start(&t, &["web", "--http", "127.0.0.1:0"], &[]);
    let a = web.addr.clone();
    // Page views and scrapes do not start the poller: observed over more
    // than two poll periods (an absence can only be watched for a while).
    for _ in 0..3 {
        assert_eq!(get(&a, "/", &[]).status, 200);
    }
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(metric(&a, "runner_http_live_polls_total", None), 0.0);
    let mut sse = TcpStream::connect(&a).unwrap();
    sse.set_read_timeout(Some(LONG)).unwrap();
    write!(
        sse,
        "GET /live HTTP/1.1\r\nHost: {a}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(sse.try_clone().unwrap());
    let mut head = String::new();
    let mut got = String::new();
    while !got.starts_with("data: ") {
        got.clear();
        assert!(reader.read_line(&mut got).unwrap() > 0, "the feed closed");
        head.push_str(&got);
    }
    assert!(head.contains("text/event-stream"), "{head}");
    assert!(head.contains("event: snapshot"), "{head}");
    let snap: serde_json::Value =
        serde_json::from_str(got.trim_start_matches("data: ").trim()).unwrap();
    assert_eq!(snap["agents"][0][0]["t"], "a1");
    assert_eq!(metric(&a, "runner_http_live_clients", None), 1.0);
    assert!(metric(&a, "runner_http_live_polls_total", None) >= 1.0);
    drop(reader);
    drop(sse);
    wait_for(LONG, "the client to be gone", || {
        metric(&a, "runner_http_live_clients", None) == 0.0
    });
    let polls = metric(&a, "runner_http_live_polls_total", None);
    // The poller stops within one period of the last client leaving
    // (observed over more than two periods).
    std::thread::sleep(Duration::from_millis(2500));
    let later = metric(&a, "runner_http_live_polls_total", None);
    assert!(later <= polls + 1.0, "still polling: {polls} then {later}");
}

#[test]
fn agent_text_shows_escaped_on_every_page() {
    let t = TestRoot::new();
    hostile_agent(&t, "evil", 0);
    t.mail("lead", "evil", "go");
    let turn = t.run(["turn", "--agent", "evil", "--json"]);
    let turn_id = turn.json()["turn_id"].as_str().unwrap().to_string();
    let web = start(&t, &["web", "--http", "127.0.0.1:0"], &[]);
    let page = get(&web.addr, &format!("/turn/{turn_id}"), &[]);
    assert_eq!(page.status, 200);
    assert!(!page.body.contains("<script>window"), "{}", page.body);
    assert!(!page.body.contains("<img"), "{}", page.body);
    let escaped = "&lt;script&gt;window.__pwned=1&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=";
    let shown = page.body.matches(escaped).count();
    assert!(
        shown >= 3,
        "text, tool argument and stderr: {shown} in {}",
        page.body
    );
    let dash = get(&web.addr, "/", &[]);
    assert!(!dash.body.contains("<img src=x"), "{}", dash.body);
}

#[test]
fn tokens_guard_every_request_and_non_loopback_needs_one() {
    let t = TestRoot::new();
    t.run(["init"]).status(0);
    t.run(["web", "--http", "0.0.0.0:0"])
        .status(2)
        .one_line_error("not a loopback address");
    t.run(["serve", "--http", "0.0.0.0:0"])
        .status(2)
        .one_line_error("[http] token");
    t.run(["web", "--http", "nowhere:80"])
        .status(2)
        .one_line_error("not an address");
    t.run_env(&[("RUNNER_HTTP_TOKEN", "short")], ["web"])
        .status(2)
        .one_line_error("http.token");

    // Loopback without a token: open.
    let open = start(&t, &["web", "--http", "127.0.0.1:0"], &[]);
    assert_eq!(get(&open.addr, "/healthz", &[]).status, 200);
    drop(open);

    // Any address with a token: every path needs it.
    for bind in ["127.0.0.1:0", "0.0.0.0:0"] {
        let web = start(
            &t,
            &["web", "--http", bind],
            &[("RUNNER_HTTP_TOKEN", TOKEN)],
        );
        let port = web.addr.rsplit(':').next().unwrap();
        let a = format!("127.0.0.1:{port}");
        for path in [
            "/",
            "/metrics",
            "/healthz",
            "/live",
            "/assets/app.js",
            "/turn/x",
        ] {
            let r = get(&a, path, &[]);
            assert_eq!(r.status, 401, "{bind}{path}");
            assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
        }
        let bearer = format!("Bearer {TOKEN}");
        assert_eq!(
            get(&a, "/metrics", &[("Authorization", &bearer)]).status,
            200
        );
        assert_eq!(
            get(
                &a,
                "/metrics",
                &[("Authorization", "Bearer wrong-token-0123456789")]
            )
            .status,
            401
        );
        let q = get(&a, &format!("/?token={TOKEN}"), &[]);
        assert_eq!(q.status, 200);
        let cookie = q
            .header("set-cookie")
            .expect("a cookie for the page's own requests");
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let pair = cookie.split(';').next().unwrap().to_string();
        assert_eq!(get(&a, "/chart.svg", &[("Cookie", &pair)]).status, 200);
        assert_eq!(get(&a, "/?token=nope", &[]).status, 401);
    }
}

#[test]
fn healthz_says_why_when_the_store_does_not_answer() {
    let t = TestRoot::sqlite();
    // No `init`: there is no store, and a read-only server must not make one.
    let web = start(&t, &["web", "--http", "127.0.0.1:0"], &[]);
    let h = get(&web.addr, "/healthz", &[]);
    assert_eq!(h.status, 503);
    assert!(h.body.contains("sessions.db"), "{}", h.body);
    assert_eq!(get(&web.addr, "/metrics", &[]).status, 503);
    assert_eq!(get(&web.addr, "/", &[]).status, 503);
    assert!(!t.root().join("sessions.db").exists());
    assert!(!t.root().join("events.db").exists());
}

#[test]
fn serve_http_counts_turns_and_sweeps() {
    let t = TestRoot::new();
    t.agent("a1", "builder", None, &[]);
    std::fs::write(
        t.root().join("config.toml"),
        "[serve]\nhttp = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let serve = start(
        &t,
        &[
            "serve",
            "--poll",
            "50ms",
            "--sweep-every",
            "100ms",
            "--grace",
            "1s",
        ],
        &[],
    );
    let a = serve.addr.clone();
    t.mail("lead", "a1", "go");
    wait_for(LONG, "a turn counted in /metrics", || {
        let s = scrape(&a);
        s.samples.iter().any(|x| x.metric == "runner_turns_total")
    });
    wait_for(LONG, "a second sweep", || {
        metric(&a, "runner_sweeps_total", None) >= 2.0
    });
    let s = scrape(&a);
    assert_eq!(value(&s, "runner_serve_backoffs_total", None), Some(0.0));
    assert!(value(&s, "runner_lease_waits_total", None).is_some());
    assert!(
        value(
            &s,
            "runner_sweep_repairs_total",
            Some(("kind", "orphan_turn"))
        )
        .is_some()
    );
    let mut child = serve;
    crate::signal(child.child.id(), nix::sys::signal::Signal::SIGINT);
    let until = Instant::now() + LONG;
    let status = loop {
        if let Some(s) = child.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "serve did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

// ---- A real browser -------------------------------------------------------

/// Chromium from `RUNNER_CHROMIUM` or the PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RUNNER_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| ["chromium", "chromium-browser", "google-chrome"].map(|n| d.join(n)))
        .find(|p| p.is_file())
}

/// Chromium driven over its DevTools protocol (one page, one websocket).
struct Browser {
    child: Child,
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    fn launch(bin: &PathBuf) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1200,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let err = child.stderr.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let until = Instant::now() + LONG;
        let port = loop {
            let line = rx
                .recv_timeout(until.saturating_duration_since(Instant::now()))
                .expect("chromium never printed its DevTools address");
            if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
                break rest.split('/').next().unwrap().to_string();
            }
        };
        let mut page_ws = None;
        wait_for(LONG, "chromium's page target", || {
            let list: serde_json::Value =
                serde_json::from_str(&get(&port, "/json/list", &[]).body).unwrap_or_default();
            page_ws = list.as_array().into_iter().flatten().find_map(|t| {
                (t["type"] == "page")
                    .then(|| t["webSocketDebuggerUrl"].as_str().map(String::from))?
            });
            page_ws.is_some()
        });
        let (ws, _) = tungstenite::connect(page_ws.unwrap()).expect("the DevTools websocket");
        Browser {
            child,
            ws,
            next_id: 0,
            _profile: profile,
        }
    }

    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = serde_json::json!({"id": id, "method": method, "params": params});
        self.ws
            .send(tungstenite::Message::text(msg.to_string()))
            .unwrap();
        loop {
            let m = self.ws.read().expect("DevTools closed");
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(m.to_text().unwrap_or(""))
                && v["id"] == id
            {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page; returns its value.
    fn eval(&mut self, expr: &str) -> serde_json::Value {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expr, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }

    fn wait_true(&mut self, what: &str, expr: &str) {
        let until = Instant::now() + LONG;
        while self.eval(expr) != serde_json::Value::Bool(true) {
            assert!(
                Instant::now() < until,
                "timed out waiting in the browser for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What the page must never have: a script that ran, or markup from an agent.
const NO_INJECTION: &str = "window.__pwned === undefined && document.querySelectorAll('img:not(#chart)').length === 0 \
    && document.querySelectorAll('script:not([src])').length === 0";

#[test]
fn browser_shows_a_new_turn_live_and_hostile_text_as_text() {
    let Some(bin) = chromium() else {
        // CI installs chromium (.ci/run): there its absence is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is missing in CI: .ci/run should have installed it"
        );
        let _ = writeln!(
            std::io::stderr(),
            "browser test DID NOT RUN: no chromium on PATH (apt-get install chromium, or set RUNNER_CHROMIUM)"
        );
        return;
    };
    let t = TestRoot::sqlite();
    hostile_agent(&t, "evil", 8000);
    let web = start(&t, &["web", "--http", "127.0.0.1:0"], &[]);
    let a = web.addr.clone();
    let mut b = Browser::launch(&bin);
    b.call(
        "Page.navigate",
        serde_json::json!({"url": format!("http://{a}/")}),
    );
    b.wait_true("the dashboard", "document.getElementById('turns') !== null && document.getElementById('live').textContent === 'live'");
    assert_eq!(
        b.eval("document.querySelectorAll('#turns tbody tr').length"),
        0
    );
    assert_eq!(metric(&a, "runner_http_live_clients", None), 1.0);

    // A turn started after the page opened.
    t.mail("lead", "evil", "go");
    let turn = t.spawn(["turn", "--agent", "evil", "--json"]);
    b.wait_true(
        "the new turn in the recent-turns table, without a reload",
        "document.querySelectorAll('#turns tbody tr').length === 1",
    );
    let hostile = serde_json::to_string(HOSTILE).unwrap();
    b.wait_true(
        "the agent's last event, as text",
        &format!("document.querySelector('#agents tbody').textContent.includes({hostile})"),
    );
    b.wait_true("no script of the agent's ran", NO_INJECTION);
    let out = crate::wait_child(turn, LONG);
    assert!(out.status.success(), "{out:?}");
    let turn_id: String =
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["turn_id"]
            .as_str()
            .unwrap()
            .into();
    b.wait_true(
        "the turn's outcome",
        &format!("document.querySelector('#turns tbody').textContent.includes('{turn_id}') && document.querySelector('#turns tbody td.ok') !== null"),
    );
    b.wait_true("navigation stays on the page", "location.pathname === '/'");

    // The turn's own page: timeline and stderr, as text.
    b.call(
        "Page.navigate",
        serde_json::json!({"url": format!("http://{a}/turn/{turn_id}")}),
    );
    b.wait_true(
        "the turn page",
        "document.getElementById('stderr') !== null",
    );
    b.wait_true(
        "stderr as text",
        &format!("document.getElementById('stderr').textContent.includes({hostile})"),
    );
    b.wait_true(
        "the tool argument as text",
        &format!("document.querySelector('#events tbody').textContent.includes({hostile})"),
    );
    b.wait_true("no script of the agent's ran", NO_INJECTION);
}
