use clap::Parser;
use metlo_control_plane::cli::{identities, keys, Cli, Command};
use metlo_control_plane::{app, telemetry};

// glibc's malloc was a sixth of the verify path's CPU (many small, short-lived
// allocations across two worker threads); mimalloc's thread-local free lists are cheaper.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(cli.config.log_format);
    let result = match cli.command {
        Command::Serve {
            listen_addr,
            ops_listen_addr,
        } => app::serve(cli.config, &listen_addr, &ops_listen_addr).await,
        Command::Migrate => app::migrate(cli.config).await,
        Command::Keys(args) => keys::run(&cli.config, args).await,
        Command::Identities(args) => identities::run(&cli.config, args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
