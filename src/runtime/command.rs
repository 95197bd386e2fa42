//! The `command` runtime: any program speaking Claude's stream-json
//! protocol, started with the session's `runtime_command` argv exactly
//! (SPEC §8). The envelope goes to stdin and stdin closes right after; the
//! session id to resume is in `RUNNER_RESUME_SESSION_ID`. It has no
//! graceful stop (SIGTERM comes first) and no unknown-resume detection.

use super::claude::{ClaudeParser, envelope};
use super::{Graceful, Parser, Runtime, SpawnSpec, StdinPolicy, TurnInput, with_instructions};

pub struct Command;

impl Runtime for Command {
    fn name(&self) -> &'static str {
        "command"
    }

    fn spawn_spec(&self, input: &TurnInput<'_>) -> Result<SpawnSpec, String> {
        let argv = input
            .session
            .runtime_command
            .as_ref()
            .filter(|a| !a.is_empty())
            .ok_or(
                "the agent has runtime 'command' but no command (agent add --command PROG ...)",
            )?;
        let mut spec = SpawnSpec {
            program: argv[0].clone(),
            args: argv[1..].to_vec(),
            ..Default::default()
        };
        if let Some(id) = input.resume_id {
            spec.env
                .insert("RUNNER_RESUME_SESSION_ID".into(), id.to_string());
        }
        Ok(spec)
    }

    fn stdin_bytes(&self, input: &TurnInput<'_>) -> Vec<u8> {
        envelope(&with_instructions(input))
    }

    fn stdin_policy(&self) -> StdinPolicy {
        StdinPolicy::CloseAfterWrite
    }

    fn parser(&self) -> Box<dyn Parser> {
        Box::new(ClaudeParser::default())
    }

    fn graceful_stop(&self) -> Graceful {
        Graceful::None
    }

    fn unknown_resume(&self, _: &str, _: Option<i32>, _: Option<&str>) -> Option<String> {
        None
    }
}
