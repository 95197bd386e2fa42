//! PostgreSQL, for fleet mode (SPEC §12): connecting (libpq URL or
//! key=value syntax, passwords never printed), the versioned schema and its
//! migrations, and `runner store migrate --to URL`, which copies a SQLite
//! root's tables into an empty schema.
//!
//! Invariants: every message that names a URL names it through [`redact`];
//! migrations run in one transaction under an advisory lock, so hosts that
//! open at once migrate once; a schema that holds tables but no
//! `runner_meta` is not ours and is never written; a schema from a newer
//! runner is refused; a server out of connection slots is retried briefly,
//! then reported as busy. Queries go through the store seam
//! ([`super::db::Db`]); this module only connects, migrates, copies,
//! listens for mail notifications ([`listen`], SPEC §12.4), and runs the
//! events writer's loop ([`writer`]), which drives the client directly to
//! spend fewer round trips per commit.
//!
//! TLS follows libpq's `sslmode` (every connection of runner goes through
//! [`connect`], so all share these rules): `disable` is plaintext; `prefer`
//! (the default) is TLS when the server offers it, else plaintext;
//! `require` is TLS or fail; `verify-ca` also checks the server's
//! certificate chain, `verify-full` the chain and the host name. Without a
//! root certificate `prefer` and `require` do not check the certificate;
//! with one (`sslrootcert=PATH`, else `~/.postgresql/root.crt` if it
//! exists) they check the chain as `verify-ca` does, and `verify-*` without
//! one is refused. Any other `sslmode` (libpq's `allow` too) is a bad URL.
//! TLS is rustls (ring): no system library, and no CA bundle read unless
//! asked. Connections carry `application_name=runner` unless the URL names
//! one, so operators can pick them out of `pg_stat_activity`.

pub mod copy;
pub mod listen;
pub mod schema;
pub mod writer;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use postgres::config::SslMode;
use postgres::error::SqlState;
use postgres::{Client, Config, NoTls};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Errors of the PostgreSQL layer. Exit codes: see `error::exit_code`.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid store URL {url}: {detail}")]
    BadUrl { url: String, detail: String },
    #[error("cannot reach PostgreSQL at {url}: {detail} (is the server running? try again later)")]
    Unreachable { url: String, detail: String },
    #[error("PostgreSQL at {url} refused the connection: {detail}")]
    Refused { url: String, detail: String },
    #[error(
        "schema {schema} at {url} is not a runner store ({detail}); pick another with --schema"
    )]
    NotOurs {
        url: String,
        schema: String,
        detail: String,
    },
    #[error(
        "schema {schema} at {url} is at version {found}, newer than this runner's {ours}: upgrade runner"
    )]
    Newer {
        url: String,
        schema: String,
        found: i64,
        ours: i64,
    },
    #[error("schema {schema} at {url} already holds data ({detail}); migrate into an empty schema")]
    NotEmpty {
        url: String,
        schema: String,
        detail: String,
    },
    #[error("PostgreSQL error while {context}: {detail}")]
    Query { context: String, detail: String },
}

pub type Result<T> = std::result::Result<T, PgError>;

/// Is this store URL a PostgreSQL one?
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `url` with any password replaced by `***`: the URL's userinfo password,
/// a `password=` query parameter, or a `password=` key of the key=value form.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?'])
            .map(|i| rest_start + i)
            .unwrap_or(out.len());
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                let start = rest_start + colon + 1;
                out.replace_range(start..rest_start + at, "***");
            }
        }
    }
    // `password=…` as a query parameter or a key=value pair.
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("password=") {
        let boundary_ok = i == 0 || matches!(rest.as_bytes()[i - 1], b'?' | b'&' | b' ');
        result.push_str(&rest[..i + "password=".len()]);
        rest = &rest[i + "password=".len()..];
        if boundary_ok {
            let end = rest.find(['&', ' ']).unwrap_or(rest.len());
            result.push_str("***");
            rest = &rest[end..];
        }
    }
    result.push_str(rest);
    result
}

/// Checks a schema name: letters, digits and `_`, starting with a letter,
/// at most 63 bytes (PostgreSQL's identifier limit).
pub fn check_schema_name(schema: &str) -> std::result::Result<(), String> {
    let b = schema.as_bytes();
    if !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
    {
        Ok(())
    } else {
        Err(format!(
            "invalid schema name '{}': use letters, digits and _, starting with a letter",
            schema.escape_debug()
        ))
    }
}

/// Connects to `url` (connect timeout 5 s unless the URL sets one; TCP
/// keepalives on) and sets the session's `search_path` to `schema`.
pub fn connect(url: &str, schema: &str) -> Result<Client> {
    let shown = redact(url);
    let bad = |detail: String| PgError::BadUrl {
        url: shown.clone(),
        detail,
    };
    check_schema_name(schema).map_err(bad)?;
    if !is_postgres(url) {
        return Err(bad("use postgres://USER@HOST[:PORT]/DATABASE".into()));
    }
    let (rest, tls) = split_tls(url).map_err(bad)?;
    let mut config = Config::from_str(&rest).map_err(|e| bad(e.to_string()))?;
    let connector = tls.connector(&mut config).map_err(bad)?;
    if config.get_application_name().is_none() {
        config.application_name("runner");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    let mut client = connect_retrying(&config, &connector).map_err(|e| match e.as_db_error() {
        // Out of connection slots: busy, like a server that does not answer.
        Some(db) if *db.code() == SqlState::TOO_MANY_CONNECTIONS => PgError::Unreachable {
            url: shown.clone(),
            detail: db.message().to_string(),
        },
        // The server answered: bad credentials, an unknown database…
        Some(db) => PgError::Refused {
            url: shown.clone(),
            detail: db.message().to_string(),
        },
        // No TLS where the URL requires it, or a certificate that fails the
        // check: trying again will not help.
        None if e.to_string() == TLS_HANDSHAKE => PgError::Refused {
            url: shown.clone(),
            detail: error_detail(&e),
        },
        None => PgError::Unreachable {
            url: shown.clone(),
            detail: error_detail(&e),
        },
    })?;
    // A frozen host must not hold row locks the fleet sweep's SKIP LOCKED
    // would skip forever (SPEC §12.3): idle transactions end below `grace`.
    client
        .batch_execute(&format!(
            "SET search_path TO \"{schema}\"; SET idle_in_transaction_session_timeout = {}",
            IDLE_TX_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed)
        ))
        .map_err(|e| query_error("setting the search path", &e))?;
    Ok(client)
}

/// `idle_in_transaction_session_timeout` of every connection, in ms.
static IDLE_TX_TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(10_000);

/// Sets the idle-in-transaction timeout of later connections: half the
/// fleet's `grace`, between 200 ms and 30 s.
pub fn set_idle_in_transaction_timeout(grace: Duration) {
    let ms = (grace.as_millis() as u64 / 2).clamp(200, 30_000);
    IDLE_TX_TIMEOUT_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// The events writer's `statement_timeout` in ms: a COPY of at most 512
/// rows takes milliseconds, so a statement still running after this long
/// belongs to a frozen host — but at least 5 s, for a loaded machine.
pub fn writer_statement_timeout_ms() -> u64 {
    IDLE_TX_TIMEOUT_MS
        .load(std::sync::atomic::Ordering::Relaxed)
        .max(5_000)
}

/// How long a connection is retried while the server is out of connection
/// slots (a burst of short-lived commands) before giving up as busy.
const SLOTS_WAIT: Duration = Duration::from_secs(20);

/// How rust-postgres shows a TLS error (its error kinds are private).
const TLS_HANDSHAKE: &str = "error performing TLS handshake";

/// Connects, retrying with backoff while the server has no free slot.
fn connect_retrying(
    config: &Config,
    connector: &Connector,
) -> std::result::Result<Client, postgres::Error> {
    let until = std::time::Instant::now() + SLOTS_WAIT;
    let mut pause = Duration::from_millis(20);
    loop {
        let attempt = match connector {
            Connector::Plain => config.connect(NoTls),
            Connector::Tls(tls) => config.connect(tls.clone()),
        };
        match attempt {
            Err(e)
                if e.code() == Some(&SqlState::TOO_MANY_CONNECTIONS)
                    && std::time::Instant::now() + pause < until =>
            {
                // Jitter, so a burst of waiting commands does not retry in step.
                let jitter = u64::from(crate::os::random_alnum(1).as_bytes()[0] % 16);
                std::thread::sleep(
                    pause + Duration::from_millis(jitter * pause.as_millis() as u64 / 16),
                );
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

/// A store URL's `sslmode`, libpq's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS settings of a store URL, which rust-postgres does not all parse
/// (it knows neither `verify-ca`/`verify-full` nor `sslrootcert`).
#[derive(Debug, PartialEq, Eq)]
struct Tls {
    mode: TlsMode,
    root_cert: Option<String>,
}

enum Connector {
    Plain,
    Tls(MakeRustlsConnect),
}

/// Splits `sslmode` and `sslrootcert` out of a `postgres://` URL's query:
/// the URL without them, and the settings (the last of each wins, as in
/// libpq).
fn split_tls(url: &str) -> std::result::Result<(String, Tls), String> {
    let mut tls = Tls {
        mode: TlsMode::Prefer,
        root_cert: None,
    };
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), tls));
    };
    let mut kept = Vec::new();
    for param in query.split('&') {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match key {
            "sslmode" => {
                tls.mode = match percent_decode(value)?.as_str() {
                    "disable" => TlsMode::Disable,
                    "prefer" => TlsMode::Prefer,
                    "require" => TlsMode::Require,
                    "verify-ca" => TlsMode::VerifyCa,
                    "verify-full" => TlsMode::VerifyFull,
                    other => {
                        return Err(format!(
                            "sslmode={} is not supported; use disable, prefer, require, verify-ca or verify-full",
                            other.escape_debug()
                        ));
                    }
                }
            }
            "sslrootcert" => tls.root_cert = Some(percent_decode(value)?),
            _ => kept.push(param),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, tls))
}

/// `%XX` escapes decoded (a URL's query value).
fn percent_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad %-escape in '{}'", s.escape_debug()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{}' is not UTF-8", s.escape_debug()))
}

impl Tls {
    /// Sets `config`'s TLS mode and builds the connector for it.
    fn connector(&self, config: &mut Config) -> std::result::Result<Connector, String> {
        config.ssl_mode(match self.mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
        if self.mode == TlsMode::Disable {
            return Ok(Connector::Plain);
        }
        let verify = matches!(self.mode, TlsMode::VerifyCa | TlsMode::VerifyFull);
        // libpq's default root certificate, used when it exists.
        let default_root = std::env::var_os("HOME")
            .map(|h| std::path::Path::new(&h).join(".postgresql/root.crt"))
            .filter(|p| p.is_file())
            .map(|p| p.to_string_lossy().into_owned());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self.root_cert.clone().or(default_root) {
            None if verify => {
                return Err(format!(
                    "sslmode={} needs a root certificate: add sslrootcert=PATH",
                    if self.mode == TlsMode::VerifyCa {
                        "verify-ca"
                    } else {
                        "verify-full"
                    }
                ));
            }
            // No root certificate: encrypted, the certificate not checked.
            None => Arc::new(Unchecked(provider.clone())),
            Some(path) => {
                use rustls::pki_types::pem::PemObject;
                let pem = std::fs::read(&path)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.escape_debug()))?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem).flatten() {
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(format!(
                        "sslrootcert {}: no PEM certificate in it",
                        path.escape_debug()
                    ));
                }
                let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| format!("sslrootcert {}: {e}", path.escape_debug()))?;
                Arc::new(ChainChecked {
                    chain,
                    host_name: self.mode == TlsMode::VerifyFull,
                })
            }
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("setting up TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Connector::Tls(MakeRustlsConnect::new(config)))
    }
}

/// A certificate taken unchecked (`prefer`/`require` without a root
/// certificate, as libpq); the handshake's signatures are still verified.
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

/// The chain checked against the root certificates; the host name only
/// for `verify-full`.
#[derive(Debug)]
struct ChainChecked {
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    host_name: bool,
}

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for ChainChecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        use rustls::{CertificateError, Error};
        match self
            .chain
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // The chain is good; only the name differs (verify-ca).
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.host_name => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The most specific message of a `postgres::Error` (its source chain).
pub fn error_detail(e: &postgres::Error) -> String {
    use std::error::Error as _;
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    match e.source() {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

pub fn query_error(context: &str, e: &postgres::Error) -> PgError {
    PgError::Query {
        context: context.into(),
        detail: error_detail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_never_shown() {
        for (url, want) in [
            ("postgres://u:secret@h/db", "postgres://u:***@h/db"),
            (
                "postgresql://u:s%40c@h:5432/db?x=1",
                "postgresql://u:***@h:5432/db?x=1",
            ),
            (
                "postgres://u@h/db?password=secret&sslmode=disable",
                "postgres://u@h/db?password=***&sslmode=disable",
            ),
            (
                "host=h user=u password=secret dbname=d",
                "host=h user=u password=*** dbname=d",
            ),
            ("postgres://h/db", "postgres://h/db"),
            (
                "postgres://u:p@h/db?password=q",
                "postgres://u:***@h/db?password=***",
            ),
        ] {
            assert_eq!(redact(url), want, "{url}");
            assert!(!redact(url).contains("secret"));
        }
    }

    #[test]
    fn schema_names_are_identifiers() {
        assert!(check_schema_name("runner").is_ok());
        assert!(check_schema_name("t_123").is_ok());
        for bad in ["", "1x", "a-b", "a\"b", "a b", &"x".repeat(64)] {
            assert!(check_schema_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_url_is_an_input_error_naming_it_without_the_password() {
        let e = connect("mysql://u:pw@h/db", "runner").err().unwrap();
        assert!(matches!(e, PgError::BadUrl { .. }));
        assert!(!e.to_string().contains("pw@"), "{e}");
        for (url, says) in [
            (
                "postgres://u:pw@h/db?sslmode=allow",
                "sslmode=allow is not supported",
            ),
            (
                "postgres://u:pw@h/db?sslmode=bogus",
                "sslmode=bogus is not supported",
            ),
            (
                "postgres://u:pw@h/db?sslmode=verify-full&sslrootcert=/nonexistent/root.crt",
                "sslrootcert /nonexistent/root.crt",
            ),
        ] {
            let e = connect(url, "runner").err().unwrap();
            assert!(matches!(e, PgError::BadUrl { .. }), "{e}");
            assert!(e.to_string().contains(says), "{e}");
            assert!(!e.to_string().contains("pw@"), "{e}");
            assert_eq!(e.to_string().lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn tls_settings_are_split_out_of_the_url() {
        let (rest, tls) =
            split_tls("postgres://u@h/db?sslmode=verify-ca&connect_timeout=3&sslrootcert=%2Fa%20b")
                .unwrap();
        assert_eq!(rest, "postgres://u@h/db?connect_timeout=3");
        assert_eq!(
            tls,
            Tls {
                mode: TlsMode::VerifyCa,
                root_cert: Some("/a b".into())
            }
        );
        let (rest, tls) = split_tls("postgres://u@h/db?sslmode=disable").unwrap();
        assert_eq!(rest, "postgres://u@h/db");
        assert_eq!(tls.mode, TlsMode::Disable);
        let (rest, tls) = split_tls("postgres://u@h/db").unwrap();
        assert_eq!(rest, "postgres://u@h/db");
        assert_eq!(tls.mode, TlsMode::Prefer);
        assert!(split_tls("postgres://u@h/db?sslrootcert=%zz").is_err());
    }
}
