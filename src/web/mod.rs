//! The HTTP side: `runner serve --http ADDR` and the standalone, read-only
//! `runner web --http ADDR`. Serves `/metrics` (Prometheus text), `/healthz`,
//! the dashboard `/`, a page per turn `/turn/<id>`, the chart `/chart.svg`,
//! the live feed `/live` (server-sent events) and the page's two assets,
//! shipped inside the binary.
//!
//! Invariants: it reads the store only through [`FleetViews`] (read-only
//! connections, never a write lock); it listens on a non-loopback address
//! only with an `[http] token`, and when a token is set every request
//! without it (bearer header, `?token=` or the cookie the latter sets) gets
//! 401; every response carries a strict Content-Security-Policy; the live
//! feed polls the store once a second only while at least one client is
//! connected, and not at all otherwise. Non-goal: writing anything.

pub mod metrics;
pub mod pages;

use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::clock;
use crate::ctx::Ctx;
use crate::error::{Result, usage};
use crate::root::{Root, valid_name};
use crate::store::StoreError;
use crate::store::views::{FleetViews, StoreViews};
use metrics::ServeCounters;

/// How often the live feed polls the store while someone watches.
pub const LIVE_POLL: Duration = Duration::from_secs(1);
/// Agents on the dashboard (in a turn first, then the most recently active).
const AGENTS_SHOWN: i64 = 50;
/// Recent turns on the dashboard.
const RECENT_TURNS: i64 = 25;
/// Events shown on a turn's page.
const TURN_EVENTS: i64 = 2000;
/// Bytes of `stderr.log` shown on a turn's page (its tail).
const STDERR_TAIL: u64 = 16 * 1024;
/// Finished turns drawn in the chart.
const CHART_TURNS: i64 = 5000;
const TOKEN_COOKIE: &str = "runner_token";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Errors of one request, each with its status code.
#[derive(Debug, thiserror::Error)]
enum WebError {
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
    #[error("not found")]
    NotFound,
    #[error("internal error: {0}")]
    Internal(String),
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let code = match self {
            WebError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            WebError::NotFound => StatusCode::NOT_FOUND,
            WebError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (code, plain(format!("{self}\n"))).into_response()
    }
}

fn plain(s: String) -> ([(header::HeaderName, &'static str); 1], String) {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], s)
}

/// The live feed: how many clients watch, and the latest snapshot.
struct Live {
    clients: AtomicUsize,
    wake: Notify,
    tx: watch::Sender<Arc<String>>,
    /// Store polls made for the feed (tests check it stays 0 when unwatched).
    polls: AtomicU64,
}

struct WebState {
    views: Arc<dyn FleetViews>,
    root: Root,
    token: Option<String>,
    serve: Option<ServeCounters>,
    live: Live,
}

/// A running HTTP server; dropping it stops the server and its poller.
pub struct WebHandle {
    pub addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for WebHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// `IP:PORT`, `localhost:PORT` or a bare `PORT` (loopback).
pub fn parse_addr(s: &str) -> std::result::Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let port = s.strip_prefix("localhost:").unwrap_or(s);
    port.parse::<u16>()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
        .map_err(|_| {
            format!("--http: '{s}' is not an address; expected IP:PORT (e.g. 127.0.0.1:8080), localhost:PORT or PORT")
        })
}

/// A non-loopback address needs a token: anyone who can reach it could
/// otherwise read every agent's output.
pub fn check_exposure(addr: &SocketAddr, token: Option<&str>) -> std::result::Result<(), String> {
    if addr.ip().is_loopback() || token.is_some() {
        Ok(())
    } else {
        Err(format!(
            "--http {addr} is not a loopback address: set [http] token in config.toml (or RUNNER_HTTP_TOKEN) to serve beyond this host"
        ))
    }
}

/// Checks the address, binds it and starts serving; prints the URL on stderr.
pub async fn start(ctx: &Ctx, addr: &str, serve: Option<ServeCounters>) -> Result<WebHandle> {
    let sock = parse_addr(addr).map_err(usage)?;
    let token = ctx.config.http_token.clone();
    check_exposure(&sock, token.as_deref()).map_err(usage)?;
    let listener = tokio::net::TcpListener::bind(sock)
        .await
        .map_err(|e| usage(format!("--http: cannot listen on {sock}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| usage(format!("--http: cannot listen on {sock}: {e}")))?;
    let (tx, _) = watch::channel(Arc::new(String::new()));
    let state = Arc::new(WebState {
        views: Arc::new(StoreViews::of(&ctx.root.dir, &ctx.config.store)),
        root: ctx.root.clone(),
        token,
        serve,
        live: Live {
            clients: AtomicUsize::new(0),
            wake: Notify::new(),
            tx,
            polls: AtomicU64::new(0),
        },
    });
    let app = router(state.clone());
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("http server stopped: {e}");
        }
    });
    let poller = tokio::spawn(live_poller(state));
    eprintln!(
        "{} http: listening on http://{bound}/ (dashboard /, /metrics, /healthz)",
        clock::now()
    );
    Ok(WebHandle {
        addr: bound,
        tasks: vec![server, poller],
    })
}

fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/turn/{id}", get(turn_page))
        .route("/chart.svg", get(chart))
        .route("/live", get(live))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .fallback(|| async { WebError::NotFound })
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Compares without an early exit, so timing does not reveal a prefix.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The token a request carries, and whether it came in the query string.
fn presented_token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<(&'a str, bool)> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some((t.trim(), false));
    }
    if let Some(t) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("token="))
    {
        return Some((t, true));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(TOKEN_COOKIE)?.strip_prefix('='))
        .map(|t| (t, false))
}

async fn auth(State(st): State<Arc<WebState>>, req: Request, next: Next) -> Response {
    let Some(want) = st.token.as_deref() else {
        return next.run(req).await;
    };
    let (ok, from_query) = match presented_token(req.headers(), req.uri().query()) {
        Some((t, q)) => (same_secret(t, want), q),
        None => (false, false),
    };
    if !ok {
        let mut res = (
            StatusCode::UNAUTHORIZED,
            plain("unauthorized: send the [http] token as `Authorization: Bearer <token>` or `?token=<token>`\n".into()),
        )
            .into_response();
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return res;
    }
    let mut res = next.run(req).await;
    if from_query {
        // The page's links, chart and live feed then need no token in the URL.
        // The token's characters are checked at load (config), so this is a valid header.
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{TOKEN_COOKIE}={want}; Path=/; HttpOnly; SameSite=Strict"
        )) {
            res.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    res
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, StoreError> + Send + 'static,
) -> std::result::Result<T, WebError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WebError::Internal(e.to_string()))?
        .map_err(WebError::from)
}

fn html(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

fn load_snapshot(views: &dyn FleetViews) -> std::result::Result<pages::Snapshot, StoreError> {
    let now = SystemTime::now();
    let ts = clock::format_ts(now);
    let (agents, total) = views.agents(AGENTS_SHOWN)?;
    Ok(pages::snapshot(
        &agents,
        total,
        views.mail(&ts)?,
        &views.recent_turns(RECENT_TURNS)?,
        now,
    ))
}

async fn dashboard(State(st): State<Arc<WebState>>) -> std::result::Result<Response, WebError> {
    let views = st.views.clone();
    let snap = blocking(move || load_snapshot(views.as_ref())).await?;
    Ok(html(pages::dashboard(
        &snap,
        &st.root.dir.display().to_string(),
    )))
}

/// The last `max` bytes of a file, lossily decoded; `None` if there is none.
fn tail(path: &Path, max: u64) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max))).ok()?;
    let mut buf = Vec::with_capacity(max.min(len) as usize);
    f.take(max).read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

async fn turn_page(
    State(st): State<Arc<WebState>>,
    UrlPath(id): UrlPath<String>,
) -> std::result::Result<Response, WebError> {
    if !pages::safe_id(&id) {
        return Err(WebError::NotFound);
    }
    let views = st.views.clone();
    let root = st.root.clone();
    let page = blocking(move || {
        let Some(t) = views.turn(&id)? else {
            return Ok(None);
        };
        let events = views.turn_events(&id, TURN_EVENTS)?;
        let stderr = if valid_name(&t.agent_name) {
            tail(
                &root
                    .turn_log_dir(&t.agent_name, &t.turn_id)
                    .join("stderr.log"),
                STDERR_TAIL,
            )
        } else {
            None
        };
        let stderr = stderr.unwrap_or_else(|| "(no stderr.log)".into());
        Ok(Some(pages::turn_page(
            &t,
            &events,
            TURN_EVENTS as usize,
            &stderr,
        )))
    })
    .await?;
    page.map(html).ok_or(WebError::NotFound)
}

async fn chart(State(st): State<Arc<WebState>>) -> std::result::Result<Response, WebError> {
    let views = st.views.clone();
    let points = blocking(move || views.turn_points(CHART_TURNS)).await?;
    let svg = pages::chart_svg(&points, SystemTime::now());
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

async fn metrics_text(State(st): State<Arc<WebState>>) -> std::result::Result<Response, WebError> {
    let views = st.views.clone();
    let totals = blocking(move || views.totals(&clock::now())).await?;
    let live = metrics::LiveStats {
        clients: st.live.clients.load(Ordering::SeqCst) as u64,
        polls: st.live.polls.load(Ordering::Relaxed),
    };
    let text = metrics::encode(totals, st.serve.as_ref(), live)
        .map_err(|e| WebError::Internal(format!("encoding metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response())
}

async fn healthz(State(st): State<Arc<WebState>>) -> Response {
    let views = st.views.clone();
    match blocking(move || views.health()).await {
        Ok(()) => plain("ok\n".into()).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, plain(format!("{e}\n"))).into_response(),
    }
}

/// Counts a live client for as long as its stream exists.
struct Watcher(Arc<WebState>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.live.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn live(State(st): State<Arc<WebState>>) -> impl IntoResponse {
    st.live.clients.fetch_add(1, Ordering::SeqCst);
    st.live.wake.notify_one();
    let mut rx = st.live.tx.subscribe();
    rx.mark_changed();
    let watcher = Watcher(st);
    let stream = futures_util::stream::unfold((rx, watcher), |(mut rx, w)| async move {
        loop {
            rx.changed().await.ok()?;
            let data = rx.borrow_and_update().clone();
            if !data.is_empty() {
                let ev = Event::default().event("snapshot").data(data.as_str());
                return Some((Ok::<_, Infallible>(ev), (rx, w)));
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Polls the store once per [`LIVE_POLL`] while a client watches, and
/// publishes the snapshot when it changed; sleeps on a notification otherwise.
async fn live_poller(st: Arc<WebState>) {
    let mut last = String::new();
    loop {
        while st.live.clients.load(Ordering::SeqCst) == 0 {
            st.live.wake.notified().await;
        }
        st.live.polls.fetch_add(1, Ordering::Relaxed);
        let views = st.views.clone();
        match blocking(move || load_snapshot(views.as_ref())).await {
            Ok(s) => {
                let json = serde_json::to_string(&s).unwrap_or_default();
                // `at` changes every poll; compare the rest.
                let key = serde_json::to_string(&(&s.agents, &s.agents_note, &s.mail, &s.turns))
                    .unwrap_or_default();
                if key != last {
                    last = key;
                    st.live.tx.send_replace(Arc::new(json));
                }
            }
            Err(e) => tracing::debug!("live poll: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(LIVE_POLL) => {}
            // A new client gets a fresh snapshot at once.
            _ = st.live.wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("8080").unwrap().to_string(), "127.0.0.1:8080");
        assert_eq!(
            parse_addr("localhost:9").unwrap().to_string(),
            "127.0.0.1:9"
        );
        assert_eq!(parse_addr("[::1]:9").unwrap().to_string(), "[::1]:9");
        assert!(parse_addr("example:80").is_err());
        let open = parse_addr("0.0.0.0:80").unwrap();
        assert!(check_exposure(&open, None).is_err());
        assert!(check_exposure(&open, Some("t")).is_ok());
        assert!(check_exposure(&parse_addr("[::1]:9").unwrap(), None).is_ok());
    }

    #[test]
    fn tokens_from_header_query_and_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(
            presented_token(&h, Some("a=1&token=xyz")),
            Some(("xyz", true))
        );
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("x=1; runner_token=abc"),
        );
        assert_eq!(presented_token(&h, None), Some(("abc", false)));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer def"),
        );
        assert_eq!(presented_token(&h, None), Some(("def", false)));
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }

    #[test]
    fn tail_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "0123456789").unwrap();
        assert_eq!(tail(&p, 4).unwrap(), "6789");
        assert_eq!(tail(&p, 100).unwrap(), "0123456789");
        assert!(tail(&dir.path().join("none"), 4).is_none());
    }
}
