//! Opt-in end-to-end tests against the real agent CLIs (`RUNNER_E2E=1 cargo
//! test --test e2e`). Skipped, with a printed reason, unless enabled.

#[test]
fn e2e_is_opt_in() {
    if std::env::var("RUNNER_E2E").as_deref() != Ok("1") {
        eprintln!("skipped: set RUNNER_E2E=1 to run the end-to-end tests against the real CLIs");
    }
}
