//! `cargo run -p ubtrfs-race --example race -- ARGS`: the `ubtrfs race` command without
//! building the FUSE daemon.

use clap::Parser;

#[derive(Parser)]
#[command(name = "race", about = "ubtrfs race explorer")]
struct Cli {
    #[command(flatten)]
    args: ubtrfs_race::cli::RaceArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match ubtrfs_race::cli::run(&cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ubtrfs race: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
