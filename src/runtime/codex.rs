//! The `codex` runtime (SPEC §8). Being written: see issue 7.

use super::{Graceful, Parser, Runtime, SpawnSpec, StdinPolicy, TurnInput};

pub struct Codex;

impl Runtime for Codex {
    fn name(&self) -> &'static str {
        "codex"
    }

    fn spawn_spec(&self, _input: &TurnInput<'_>) -> Result<SpawnSpec, String> {
        Err("the codex runtime is not available in this build yet".into())
    }

    fn stdin_bytes(&self, input: &TurnInput<'_>) -> Vec<u8> {
        input.text.as_bytes().to_vec()
    }

    fn stdin_policy(&self) -> StdinPolicy {
        StdinPolicy::CloseAfterWrite
    }

    fn parser(&self) -> Box<dyn Parser> {
        Box::new(super::claude::ClaudeParser::default())
    }

    fn graceful_stop(&self) -> Graceful {
        Graceful::None
    }

    fn unknown_resume(&self, _: &str, _: Option<i32>, _: Option<&str>) -> Option<String> {
        None
    }
}
