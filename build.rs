//! Build script: links the `runner` binary as a fixed-address (non-PIE)
//! executable on Linux. Why: every `runner` process (one per turn, one per
//! `mail send` from inside a turn) otherwise has ld.so apply ~13,000
//! relative relocations at start and copy-on-write the ~190 KiB of
//! `.data.rel.ro` they touch — ~180K instructions and ~45 page faults of a
//! 2.4 ms process start on a VM (BENCHMARKS.md). Only the binaries' link
//! changes (the objects stay position-independent), so no dependency is
//! rebuilt for it and proc-macro libraries are untouched (a `rustflags`
//! link argument would reach their `-shared` link too). Non-goal: anything
//! else at build time.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
