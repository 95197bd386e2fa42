//! `runner` runs coding agents (Claude Code, Codex, Gemini CLI, or anything
//! speaking their NDJSON protocol) one turn at a time, and leaves a durable,
//! queryable record of every turn. See `SPEC.md` in the shared folder and
//! `README.md` for the contract; each module's first paragraph says what it
//! owns.

pub mod app;
pub mod capability;
pub mod claim;
pub mod cli;
pub mod clock;
pub mod config;
pub mod ctx;
pub mod demo;
pub mod doctor;
pub mod error;
pub mod fake_agent;
pub mod fault;
pub mod fleet;
pub mod hosts;
pub mod lease;
pub mod mail;
pub mod manual;
pub mod ops;
pub mod os;
pub mod progress;
pub mod report;
pub mod root;
pub mod runtime;
pub mod serve;
pub mod spawn;
pub mod state;
pub mod stop;
pub mod store;
pub mod stream;
pub mod sweep;
pub mod turn;
pub mod watchdog;
pub mod web;
