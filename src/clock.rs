//! Time as `runner` writes and reads it.
//!
//! Owns the one timestamp format of the project (RFC 3339, UTC, milliseconds,
//! `Z`: `2026-11-22T01:17:19.123Z`), duration and size parsing for flags and
//! configuration. Invariant: every timestamp we write comes from [`format_ts`],
//! so strings of ours compare correctly as strings. Non-goal: time zones.

use std::time::{Duration, SystemTime};

/// Now, in the project's timestamp format.
pub fn now() -> String {
    format_ts(SystemTime::now())
}

/// Formats a time as RFC 3339 UTC with milliseconds and `Z`.
pub fn format_ts(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses an RFC 3339 timestamp; a timestamp without a zone is read as UTC
/// (never local time, LESSONS 19).
pub fn parse_ts(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
        .ok()
        .or_else(|| humantime::parse_rfc3339(s).ok())
}

/// Milliseconds since the Unix epoch.
pub fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Parses `500ms`, `30s`, `10m`, `2h` (and combinations such as `1h 30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration (write e.g. 500ms, 30s, 10m, 2h)".into());
    }
    if t.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "duration '{s}' has no unit (write e.g. {t}s or {t}ms)"
        ));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("bad duration '{s}': {e} (write e.g. 500ms, 30s, 10m, 2h)"))
}

/// Formats a duration compactly for humans (`1.2s`, `350ms`, `4m05s`).
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

/// Parses a byte size: `16MiB`, `512KiB`, `1GiB`, `4096`, `10MB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size '{s}' (write e.g. 16MiB, 512KiB, 4096)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "bad size unit '{other}' in '{s}' (use B, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_fixed_width_utc_millis() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        let s = format_ts(t);
        assert_eq!(s.len(), 24);
        assert!(s.ends_with('Z'));
        assert!(s.contains(".123"));
        assert_eq!(parse_ts(&s), Some(t));
    }

    #[test]
    fn zone_less_timestamps_read_as_utc() {
        let a = parse_ts("2026-11-22T01:17:19.123").unwrap();
        let b = parse_ts("2026-11-22T01:17:19.123Z").unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("10parsecs").is_err());
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("3 parsecs").is_err());
    }
}
