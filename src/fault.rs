//! Fault injection for the crash-matrix tests (issue 9): with
//! `RUNNER_FAULT=<point>` in its environment the runner SIGKILLs itself when
//! it reaches that point, exactly as a crash would leave things. Points:
//! `before_spawn`, `after_spawn`, `mid_stream` (after 50 lines),
//! `after_exit`, `during_final_write`. Unset, it costs one cached lookup.

use std::sync::OnceLock;

static FAULT: OnceLock<Option<String>> = OnceLock::new();

fn point() -> Option<&'static str> {
    FAULT
        .get_or_init(|| std::env::var("RUNNER_FAULT").ok().filter(|s| !s.is_empty()))
        .as_deref()
}

/// Dies here if this is the configured fault point.
pub fn hit(at: &str) {
    if point() == Some(at) {
        crate::os::raise(crate::os::Sig::SIGKILL);
    }
}

/// Whether any fault is configured (lets hot paths skip the check).
pub fn armed() -> bool {
    point().is_some()
}
