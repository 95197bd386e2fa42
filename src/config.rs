//! Configuration (SPEC §9): `<root>/config.toml`, `RUNNER_<SECTION>_<KEY>`
//! environment variables, and flags, resolved with the precedence
//! flag > environment > capability file > config.toml > built-in default.
//!
//! Owns parsing and validation; a bad value is one error naming the file or
//! variable and the key. The capability layer only exists for
//! `stall_timeout` and `permission_mode`, so those keep their file and
//! environment values apart until a capability is known ([`Config::stall_for`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::store::Backend;

use crate::clock::{parse_duration, parse_size};

#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {key}: {detail}")]
pub struct ConfigError {
    pub source_name: String,
    pub key: String,
    pub detail: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    turn: Option<RawTurn>,
    retry: Option<RawRetry>,
    sweep: Option<RawSweep>,
    serve: Option<RawServe>,
    http: Option<RawHttp>,
    store: Option<RawStore>,
    host: Option<RawHost>,
    fleet: Option<RawFleet>,
    runtime: Option<BTreeMap<String, RawRuntime>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTurn {
    stall_timeout: Option<String>,
    grace: Option<String>,
    deadline: Option<String>,
    leak_timeout: Option<String>,
    result_exit_timeout: Option<String>,
    max_line: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_tries: Option<u32>,
    backoff_base: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    every: Option<String>,
    ceiling: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServe {
    poll: Option<String>,
    max_concurrent: Option<usize>,
    http: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<String>,
    schema: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    heartbeat: Option<String>,
    lease_ttl: Option<String>,
    grace: Option<String>,
    host_stale: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    bin: Option<String>,
    args: Option<Vec<String>>,
    env: Option<BTreeMap<String, String>>,
    permission_mode: Option<String>,
    unattended: Option<bool>,
}

/// Every key config.toml accepts, by section (`runtime` sections take
/// [`RUNTIME_KEYS`]). Kept next to the `Raw*` structs; a test checks that
/// the parser accepts each one.
pub const KNOWN_KEYS: [(&str, &[&str]); 8] = [
    (
        "turn",
        &[
            "stall_timeout",
            "grace",
            "deadline",
            "leak_timeout",
            "result_exit_timeout",
            "max_line",
        ],
    ),
    ("retry", &["max_tries", "backoff_base"]),
    ("sweep", &["every", "ceiling"]),
    ("serve", &["poll", "max_concurrent", "http"]),
    ("http", &["token"]),
    ("store", &["url", "schema"]),
    ("host", &["id"]),
    ("fleet", &["heartbeat", "lease_ttl", "grace", "host_stale"]),
];
pub const RUNTIME_KEYS: [&str; 5] = ["bin", "args", "env", "permission_mode", "unattended"];
pub const RUNTIME_NAMES: [&str; 3] = ["claude", "codex", "gemini"];

/// A key of config.toml that runner does not know, and the known key
/// closest to it (for "did you mean …").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    pub key: String,
    pub closest: Option<String>,
}

/// The dotted names of every key config.toml accepts.
pub fn known_keys() -> Vec<String> {
    let mut all: Vec<String> = KNOWN_KEYS
        .iter()
        .flat_map(|(sec, keys)| keys.iter().map(move |k| format!("{sec}.{k}")))
        .collect();
    for rt in RUNTIME_NAMES {
        all.extend(RUNTIME_KEYS.iter().map(|k| format!("runtime.{rt}.{k}")));
    }
    all
}

/// Keys of a parsed config.toml that runner does not know (the values
/// under `runtime.<name>.env` are the agent's environment, not keys).
pub fn unknown_keys(table: &toml::Table) -> Vec<UnknownKey> {
    let known = known_keys();
    let mut out = Vec::new();
    let mut flag = |key: String| {
        let closest = known
            .iter()
            .min_by_key(|k| edit_distance(k, &key))
            .filter(|k| edit_distance(k, &key) <= k.len() / 2)
            .cloned();
        out.push(UnknownKey { key, closest });
    };
    for (sec, v) in table {
        let Some(inner) = v.as_table() else {
            flag(sec.clone());
            continue;
        };
        if sec == "runtime" {
            for (rt, v) in inner {
                let Some(keys) = v
                    .as_table()
                    .filter(|_| RUNTIME_NAMES.contains(&rt.as_str()))
                else {
                    flag(format!("runtime.{rt}"));
                    continue;
                };
                for k in keys.keys().filter(|k| !RUNTIME_KEYS.contains(&k.as_str())) {
                    flag(format!("runtime.{rt}.{k}"));
                }
            }
            continue;
        }
        match KNOWN_KEYS.iter().find(|(s, _)| s == sec) {
            None => flag(sec.clone()),
            Some((_, keys)) => {
                for k in inner.keys().filter(|k| !keys.contains(&k.as_str())) {
                    flag(format!("{sec}.{k}"));
                }
            }
        }
    }
    out
}

/// Levenshtein distance between two short keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Settings of one agent CLI.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub bin: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub unattended: bool,
    /// From config.toml (the capability file beats it).
    pub permission_mode_file: Option<String>,
    /// From the environment (beats the capability file).
    pub permission_mode_env: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub stall_timeout_file: Option<Duration>,
    pub stall_timeout_env: Option<Duration>,
    pub grace: Duration,
    pub deadline: Duration,
    pub leak_timeout: Duration,
    /// How long the CLI may live on after its end-of-turn line (SPEC §6.5).
    pub result_exit_timeout: Duration,
    pub max_line: usize,
    pub max_tries: u32,
    pub backoff_base: Duration,
    pub sweep_every: Duration,
    pub sweep_ceiling: Duration,
    pub serve_poll: Duration,
    pub serve_max_concurrent: usize,
    /// `[serve] http`: the address `serve` answers HTTP on (off when unset).
    pub serve_http: Option<String>,
    /// `[http] token`: required by every HTTP request when set; needed to
    /// listen on a non-loopback address.
    pub http_token: Option<String>,
    pub claude: RuntimeConfig,
    pub codex: RuntimeConfig,
    pub gemini: RuntimeConfig,
    /// Where the tables live (`[store] url`/`schema`, `RUNNER_STORE_URL`,
    /// `--store`; SPEC §12.1).
    pub store: Backend,
    /// `[store] schema` / `RUNNER_STORE_SCHEMA`, kept for a URL set later.
    store_schema: String,
    /// `[host] id` / `RUNNER_HOST_ID` (default: the machine's hostname,
    /// made to fit the name pattern; SPEC §12.2).
    pub host_id: String,
    /// The fleet's timings (SPEC §12.3, §12.5).
    pub fleet: FleetConfig,
}

/// `[fleet]`: how often hosts and lease holders beat, how long a lease
/// lives unrenewed, how long the sweep waits past expiry, and when a
/// silent host is offline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FleetConfig {
    pub heartbeat: Duration,
    pub lease_ttl: Duration,
    pub grace: Duration,
    pub host_stale: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            heartbeat: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(60),
            grace: Duration::from_secs(60),
            host_stale: Duration::from_secs(60),
        }
    }
}

/// The machine's hostname made into a valid name (SPEC §1 pattern):
/// characters outside it become `-`, cut to 64; `host` when nothing is left.
pub fn default_host_id() -> String {
    let raw = crate::os::hostname();
    let mut id: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    id = id.trim_start_matches(['-', '_', '.']).to_string();
    id.truncate(64);
    if !crate::root::valid_name(&id) {
        return "host".into();
    }
    id
}

fn host_id(src: &str, v: &str) -> Result<String, ConfigError> {
    if crate::root::valid_name(v) {
        Ok(v.to_string())
    } else {
        Err(err(
            src,
            "host.id",
            format!(
                "invalid host id '{}': use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
                v.escape_debug()
            ),
        ))
    }
}

/// The default PostgreSQL schema (SPEC §12.1).
pub const DEFAULT_SCHEMA: &str = "runner";

pub const DEFAULT_STALL: Duration = Duration::from_secs(600);

impl Default for Config {
    fn default() -> Self {
        let rt = |bin: &str| RuntimeConfig {
            bin: bin.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            unattended: true,
            permission_mode_file: None,
            permission_mode_env: None,
        };
        Config {
            stall_timeout_file: None,
            stall_timeout_env: None,
            grace: Duration::from_secs(5),
            deadline: Duration::from_secs(2 * 3600),
            leak_timeout: Duration::from_secs(1),
            result_exit_timeout: Duration::from_secs(10),
            max_line: 16 << 20,
            max_tries: 5,
            backoff_base: Duration::from_secs(5),
            sweep_every: Duration::from_secs(30),
            sweep_ceiling: Duration::from_secs(30 * 60),
            serve_poll: Duration::from_secs(2),
            serve_max_concurrent: 4,
            serve_http: None,
            http_token: None,
            claude: rt("claude"),
            codex: rt("codex"),
            gemini: rt("gemini"),
            store: Backend::Sqlite,
            store_schema: DEFAULT_SCHEMA.into(),
            host_id: String::new(),
            fleet: FleetConfig::default(),
        }
    }
}

fn err(source_name: &str, key: &str, detail: impl Into<String>) -> ConfigError {
    ConfigError {
        source_name: source_name.into(),
        key: key.into(),
        detail: detail.into(),
    }
}

fn dur(src: &str, key: &str, v: &str) -> Result<Duration, ConfigError> {
    parse_duration(v).map_err(|e| err(src, key, e))
}

fn positive(src: &str, key: &str, v: &str) -> Result<Duration, ConfigError> {
    let d = dur(src, key, v)?;
    if d.is_zero() {
        return Err(err(src, key, "must be more than 0"));
    }
    Ok(d)
}

/// A token is sent in headers, query strings and a cookie: at least 16
/// characters from a set that needs no escaping in any of them.
fn check_token(src: &str, key: &str, v: &str) -> Result<String, ConfigError> {
    let ok = v.len() >= 16
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'));
    if ok {
        Ok(v.to_string())
    } else {
        Err(err(
            src,
            key,
            "expected at least 16 characters from A-Z a-z 0-9 - _ . ~",
        ))
    }
}

impl Config {
    /// Loads config.toml (if present) and the process environment.
    pub fn load(root: &Path) -> Result<Config, ConfigError> {
        let vars: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("RUNNER_"))
            .collect();
        let file = root.join("config.toml");
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(err(&file.display().to_string(), "(file)", e.to_string())),
        };
        Config::from_parts(text.as_deref(), &file.display().to_string(), &vars)
    }

    pub fn from_parts(
        toml_text: Option<&str>,
        file_name: &str,
        vars: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        if let Some(text) = toml_text {
            let raw: RawFile = toml::from_str(text).map_err(|e| {
                let key = e.span().map(|s| text[s].to_string()).unwrap_or_default();
                err(file_name, &key, e.message())
            })?;
            c.apply_file(raw, file_name)?;
        }
        c.apply_env(vars)?;
        Ok(c)
    }

    /// Sets the store URL from `source` (a file key, a variable, `--store`),
    /// with the configured schema.
    pub fn set_store_url(&mut self, url: &str, source: &str) -> Result<(), ConfigError> {
        self.store =
            Backend::parse(url, &self.store_schema).map_err(|e| err(source, "store.url", e))?;
        Ok(())
    }

    /// Sets the schema, for the URL set now or later.
    fn set_store_schema(&mut self, schema: &str, source: &str) -> Result<(), ConfigError> {
        crate::store::pg::check_schema_name(schema).map_err(|e| err(source, "store.schema", e))?;
        self.store_schema = schema.into();
        if let Backend::Postgres { schema: s, .. } = &mut self.store {
            *s = self.store_schema.clone();
        }
        Ok(())
    }

    fn apply_file(&mut self, raw: RawFile, f: &str) -> Result<(), ConfigError> {
        if let Some(t) = raw.turn {
            if let Some(v) = t.stall_timeout {
                self.stall_timeout_file = Some(dur(f, "turn.stall_timeout", &v)?);
            }
            if let Some(v) = t.grace {
                self.grace = dur(f, "turn.grace", &v)?;
            }
            if let Some(v) = t.deadline {
                self.deadline = dur(f, "turn.deadline", &v)?;
            }
            if let Some(v) = t.leak_timeout {
                self.leak_timeout = dur(f, "turn.leak_timeout", &v)?;
            }
            if let Some(v) = t.result_exit_timeout {
                self.result_exit_timeout = dur(f, "turn.result_exit_timeout", &v)?;
            }
            if let Some(v) = t.max_line {
                self.max_line = parse_size(&v).map_err(|e| err(f, "turn.max_line", e))? as usize;
            }
        }
        if let Some(r) = raw.retry {
            if let Some(v) = r.max_tries {
                if v == 0 {
                    return Err(err(f, "retry.max_tries", "must be at least 1"));
                }
                self.max_tries = v;
            }
            if let Some(v) = r.backoff_base {
                self.backoff_base = dur(f, "retry.backoff_base", &v)?;
            }
        }
        if let Some(s) = raw.sweep {
            if let Some(v) = s.every {
                self.sweep_every = dur(f, "sweep.every", &v)?;
            }
            if let Some(v) = s.ceiling {
                self.sweep_ceiling = dur(f, "sweep.ceiling", &v)?;
            }
        }
        if let Some(s) = raw.store {
            if let Some(v) = s.schema {
                self.set_store_schema(&v, f)?;
            }
            if let Some(v) = s.url {
                self.set_store_url(&v, f)?;
            }
        }
        if let Some(s) = raw.serve {
            if let Some(v) = s.poll {
                self.serve_poll = dur(f, "serve.poll", &v)?;
            }
            if let Some(v) = s.max_concurrent {
                if v == 0 {
                    return Err(err(f, "serve.max_concurrent", "must be at least 1"));
                }
                self.serve_max_concurrent = v;
            }
            if let Some(v) = s.http {
                self.serve_http = Some(v);
            }
        }
        if let Some(h) = raw.host
            && let Some(v) = h.id
        {
            self.host_id = host_id(f, &v)?;
        }
        if let Some(fl) = raw.fleet {
            if let Some(v) = fl.heartbeat {
                self.fleet.heartbeat = positive(f, "fleet.heartbeat", &v)?;
            }
            if let Some(v) = fl.lease_ttl {
                self.fleet.lease_ttl = positive(f, "fleet.lease_ttl", &v)?;
            }
            if let Some(v) = fl.grace {
                self.fleet.grace = dur(f, "fleet.grace", &v)?;
            }
            if let Some(v) = fl.host_stale {
                self.fleet.host_stale = positive(f, "fleet.host_stale", &v)?;
            }
        }
        if let Some(h) = raw.http
            && let Some(v) = h.token
        {
            self.http_token = Some(check_token(f, "http.token", &v)?);
        }
        for (name, r) in raw.runtime.unwrap_or_default() {
            let rc = match name.as_str() {
                "claude" => &mut self.claude,
                "codex" => &mut self.codex,
                "gemini" => &mut self.gemini,
                other => {
                    return Err(err(
                        f,
                        &format!("runtime.{other}"),
                        "unknown runtime (claude, codex, gemini)",
                    ));
                }
            };
            if let Some(v) = r.bin {
                rc.bin = v;
            }
            if let Some(v) = r.args {
                rc.args = v;
            }
            if let Some(v) = r.env {
                rc.env = v;
            }
            if let Some(v) = r.unattended {
                rc.unattended = v;
            }
            rc.permission_mode_file = r.permission_mode;
        }
        Ok(())
    }

    fn apply_env(&mut self, vars: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        for (k, v) in vars {
            let src = format!("environment variable {k}");
            let d = |key: &str| dur(&src, key, v);
            match k.as_str() {
                "RUNNER_TURN_STALL_TIMEOUT" => {
                    self.stall_timeout_env = Some(d("turn.stall_timeout")?)
                }
                "RUNNER_TURN_GRACE" => self.grace = d("turn.grace")?,
                "RUNNER_TURN_DEADLINE" => self.deadline = d("turn.deadline")?,
                "RUNNER_TURN_LEAK_TIMEOUT" => self.leak_timeout = d("turn.leak_timeout")?,
                "RUNNER_TURN_RESULT_EXIT_TIMEOUT" => {
                    self.result_exit_timeout = d("turn.result_exit_timeout")?
                }
                "RUNNER_TURN_MAX_LINE" => {
                    self.max_line =
                        parse_size(v).map_err(|e| err(&src, "turn.max_line", e))? as usize
                }
                "RUNNER_RETRY_MAX_TRIES" => {
                    self.max_tries = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                        err(&src, "retry.max_tries", "expected a whole number ≥ 1")
                    })?
                }
                "RUNNER_RETRY_BACKOFF_BASE" => self.backoff_base = d("retry.backoff_base")?,
                // Applied after the loop, the schema before the URL.
                "RUNNER_STORE_URL" | "RUNNER_STORE_SCHEMA" => {}
                "RUNNER_SWEEP_EVERY" => self.sweep_every = d("sweep.every")?,
                "RUNNER_SWEEP_CEILING" => self.sweep_ceiling = d("sweep.ceiling")?,
                "RUNNER_SERVE_POLL" => self.serve_poll = d("serve.poll")?,
                "RUNNER_SERVE_MAX_CONCURRENT" => {
                    self.serve_max_concurrent =
                        v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                            err(&src, "serve.max_concurrent", "expected a whole number ≥ 1")
                        })?
                }
                "RUNNER_SERVE_HTTP" => self.serve_http = Some(v.clone()),
                "RUNNER_HTTP_TOKEN" => self.http_token = Some(check_token(&src, "http.token", v)?),
                "RUNNER_HOST_ID" => self.host_id = host_id(&src, v)?,
                "RUNNER_FLEET_HEARTBEAT" => {
                    self.fleet.heartbeat = positive(&src, "fleet.heartbeat", v)?
                }
                "RUNNER_FLEET_LEASE_TTL" => {
                    self.fleet.lease_ttl = positive(&src, "fleet.lease_ttl", v)?
                }
                "RUNNER_FLEET_GRACE" => self.fleet.grace = d("fleet.grace")?,
                "RUNNER_FLEET_HOST_STALE" => {
                    self.fleet.host_stale = positive(&src, "fleet.host_stale", v)?
                }
                _ => {
                    if let Some(rest) = k.strip_prefix("RUNNER_RUNTIME_") {
                        self.apply_runtime_env(rest, v, &src)?;
                    }
                }
            }
        }
        if let Some(v) = vars.get("RUNNER_STORE_SCHEMA") {
            self.set_store_schema(v, "environment variable RUNNER_STORE_SCHEMA")?;
        }
        if let Some(v) = vars.get("RUNNER_STORE_URL") {
            self.set_store_url(v, "environment variable RUNNER_STORE_URL")?;
        }
        if self.host_id.is_empty() {
            self.host_id = default_host_id();
        }
        Ok(())
    }

    fn apply_runtime_env(&mut self, rest: &str, v: &str, src: &str) -> Result<(), ConfigError> {
        let (rt, key) = match rest.split_once('_') {
            Some(p) => p,
            None => return Ok(()),
        };
        let rc = match rt {
            "CLAUDE" => &mut self.claude,
            "CODEX" => &mut self.codex,
            "GEMINI" => &mut self.gemini,
            _ => return Ok(()),
        };
        match key {
            "BIN" => rc.bin = v.to_string(),
            "ARGS" => {
                rc.args = serde_json::from_str(v)
                    .map_err(|_| err(src, "args", "expected a JSON array of strings"))?
            }
            "ENV" => {
                rc.env = serde_json::from_str(v)
                    .map_err(|_| err(src, "env", "expected a JSON object of strings"))?
            }
            "PERMISSION_MODE" => rc.permission_mode_env = Some(v.to_string()),
            "UNATTENDED" => {
                rc.unattended = match v {
                    "1" | "true" | "yes" => true,
                    "0" | "false" | "no" => false,
                    _ => return Err(err(src, "unattended", "expected true or false")),
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The stall timeout for a turn: flag > env > capability > file > default.
    pub fn stall_for(&self, flag: Option<Duration>, capability: Option<Duration>) -> Duration {
        flag.or(self.stall_timeout_env)
            .or(capability)
            .or(self.stall_timeout_file)
            .unwrap_or(DEFAULT_STALL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn precedence() {
        let file = "[turn]\nstall_timeout = \"1m\"\ngrace = \"2s\"\n";
        let c = Config::from_parts(Some(file), "config.toml", &vars(&[])).unwrap();
        assert_eq!(c.grace, Duration::from_secs(2));
        assert_eq!(c.stall_for(None, None), Duration::from_secs(60));
        assert_eq!(
            c.stall_for(None, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        let c = Config::from_parts(
            Some(file),
            "config.toml",
            &vars(&[("RUNNER_TURN_STALL_TIMEOUT", "30s")]),
        )
        .unwrap();
        assert_eq!(
            c.stall_for(None, Some(Duration::from_secs(5))),
            Duration::from_secs(30)
        );
        assert_eq!(
            c.stall_for(Some(Duration::from_millis(300)), None),
            Duration::from_millis(300)
        );
        assert_eq!(Config::default().stall_for(None, None), DEFAULT_STALL);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Config::from_parts(Some("[turn]\ngrace = \"soon\"\n"), "c.toml", &vars(&[]))
            .unwrap_err();
        assert!(e.to_string().contains("turn.grace"), "{e}");
        let e = Config::from_parts(
            None,
            "c.toml",
            &vars(&[("RUNNER_SERVE_MAX_CONCURRENT", "many")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("RUNNER_SERVE_MAX_CONCURRENT"), "{e}");
        let e = Config::from_parts(Some("[turn]\nbogus = 1\n"), "c.toml", &vars(&[])).unwrap_err();
        assert!(e.to_string().contains("c.toml"), "{e}");
    }

    #[test]
    fn every_known_key_is_accepted_and_a_typo_names_the_closest() {
        for key in known_keys() {
            let (table, leaf) = key.rsplit_once('.').unwrap();
            let value = match leaf {
                "max_tries" | "max_concurrent" => "1",
                "args" => "[]",
                "env" => "{}",
                "unattended" => "true",
                "max_line" => "\"1MiB\"",
                "bin" | "permission_mode" => "\"x\"",
                "http" => "\"127.0.0.1:9000\"",
                "token" => "\"abcdefghijklmnop\"",
                "url" => "\"sqlite\"",
                "schema" => "\"runner\"",
                "id" => "\"host-a\"",
                _ => "\"1s\"",
            };
            let text = format!("[{table}]\n{leaf} = {value}\n");
            Config::from_parts(Some(&text), "c.toml", &vars(&[]))
                .unwrap_or_else(|e| panic!("{key}: {e}"));
            let t: toml::Table = toml::from_str(&text).unwrap();
            assert!(unknown_keys(&t).is_empty(), "{key}");
        }
        let t: toml::Table = toml::from_str(
            "[turn]\nstall_timout = \"1m\"\n[runtime.claude]\nbinn = \"x\"\nenv = { ANY = \"1\" }\n[bogus]\nzzzzzzzzzzzz = 1\n",
        )
        .unwrap();
        let u = unknown_keys(&t);
        assert!(u.contains(&UnknownKey {
            key: "turn.stall_timout".into(),
            closest: Some("turn.stall_timeout".into())
        }));
        assert!(u.contains(&UnknownKey {
            key: "runtime.claude.binn".into(),
            closest: Some("runtime.claude.bin".into())
        }));
        assert!(u.iter().any(|k| k.key == "bogus"), "{u:?}");
        assert_eq!(u.len(), 3, "{u:?}");
    }

    #[test]
    fn http_settings() {
        let file = "[serve]\nhttp = \"127.0.0.1:9000\"\n[http]\ntoken = \"abcdefghijklmnop\"\n";
        let c = Config::from_parts(Some(file), "c", &vars(&[])).unwrap();
        assert_eq!(c.serve_http.as_deref(), Some("127.0.0.1:9000"));
        assert_eq!(c.http_token.as_deref(), Some("abcdefghijklmnop"));
        let e =
            Config::from_parts(Some("[http]\ntoken = \"short\"\n"), "c", &vars(&[])).unwrap_err();
        assert!(e.to_string().contains("http.token"), "{e}");
        let e = Config::from_parts(
            None,
            "c",
            &vars(&[("RUNNER_HTTP_TOKEN", "has space in it!!")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("RUNNER_HTTP_TOKEN"), "{e}");
        assert_eq!(Config::default().serve_http, None);
    }

    #[test]
    fn host_and_fleet_settings() {
        let file = "[host]\nid = \"web-1\"\n[fleet]\nheartbeat = \"2s\"\nlease_ttl = \"9s\"\n";
        let c = Config::from_parts(
            Some(file),
            "c",
            &vars(&[("RUNNER_FLEET_GRACE", "3s"), ("RUNNER_HOST_ID", "b-2")]),
        )
        .unwrap();
        assert_eq!(c.host_id, "b-2");
        assert_eq!(c.fleet.heartbeat, Duration::from_secs(2));
        assert_eq!(c.fleet.lease_ttl, Duration::from_secs(9));
        assert_eq!(c.fleet.grace, Duration::from_secs(3));
        assert_eq!(c.fleet.host_stale, Duration::from_secs(60));
        let c = Config::from_parts(None, "c", &vars(&[])).unwrap();
        assert!(crate::root::valid_name(&c.host_id), "{}", c.host_id);
        let e = Config::from_parts(Some("[host]\nid = \"a b\"\n"), "c", &vars(&[])).unwrap_err();
        assert!(e.to_string().contains("host.id"), "{e}");
        let e =
            Config::from_parts(None, "c", &vars(&[("RUNNER_FLEET_LEASE_TTL", "0s")])).unwrap_err();
        assert!(e.to_string().contains("RUNNER_FLEET_LEASE_TTL"), "{e}");
    }

    #[test]
    fn runtime_settings() {
        let file = "[runtime.claude]\nbin = \"/opt/claude\"\nargs = [\"--x\"]\nenv = { IS_SANDBOX = \"1\" }\n";
        let c = Config::from_parts(
            Some(file),
            "c",
            &vars(&[("RUNNER_RUNTIME_CODEX_BIN", "/opt/codex")]),
        )
        .unwrap();
        assert_eq!(c.claude.bin, "/opt/claude");
        assert_eq!(c.claude.args, vec!["--x"]);
        assert_eq!(
            c.claude.env.get("IS_SANDBOX").map(String::as_str),
            Some("1")
        );
        assert_eq!(c.codex.bin, "/opt/codex");
    }
}
