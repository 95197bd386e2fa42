//! The `runner` binary: parse, set up logging, run, exit.

fn main() {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("runner: internal error: {info} (this is a bug in runner: please report it)");
    }));
    runner::os::cap_malloc_arenas();
    let cli = runner::cli::parse();
    if !matches!(cli.command, runner::cli::Command::FakeAgent(_)) {
        init_tracing(cli.verbose, cli.quiet);
        // Orphaned descendants of our agents re-parent to us, not init (SPEC §6.7).
        runner::os::become_subreaper();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runner: cannot start the async runtime: {e}");
            std::process::exit(70);
        }
    };
    // A bug that unwinds ends with exit 70 (SPEC §10.3), not a raw panic code.
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(runner::app::main(cli))
    }))
    .unwrap_or(70);
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    std::process::exit(code);
}

fn init_tracing(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
