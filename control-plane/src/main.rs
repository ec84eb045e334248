use clap::Parser;
use metlo_control_plane::cli::{keys, Cli, Command};
use metlo_control_plane::{app, telemetry};

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
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
