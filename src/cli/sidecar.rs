//! `tern sidecar ...`: `simulate`, the send-time policies evaluated on a seeded simulated
//! audience ([`crate::sendtime::simulate`]), or with `--lifecycle` the engagement model and
//! the re-engagement lifecycle against sunset-only ([`crate::sendtime::lifecycle_sim`]); no
//! daemon, no spool.

use clap::Subcommand;
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum SidecarCommand {
    /// Evaluate send-time policies on a seeded simulated audience and print the expected
    /// human open rate of each, per history bucket. Needs no daemon and no spool.
    Simulate {
        /// Seed of the simulated audience: the same seed gives the same numbers.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Simulated recipients (100 to 1,000,000).
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
        users: u64,
        /// Simulate 78 weeks of a newsletter to an audience that goes dormant instead: the
        /// engagement model's Brier score and AUC, and the lifecycle (win-back series, then
        /// sunset) against the sunset-only policy.
        #[arg(long)]
        lifecycle: bool,
    },
}

pub fn run(command: SidecarCommand) -> ExitCode {
    match command {
        SidecarCommand::Simulate {
            seed,
            users,
            lifecycle,
        } => {
            if lifecycle {
                print!(
                    "{}",
                    crate::sendtime::lifecycle_sim::run(seed, users as usize)
                );
            } else {
                print!("{}", crate::sendtime::simulate::run(seed, users as usize));
            }
            ExitCode::SUCCESS
        }
    }
}
