//! `drover-bench-chaos`: the chaos suite as a long run (see `drover_bench::chaos`).
//!
//! Starts the real `drover server` and `drover agent` as child processes, drives containers
//! through the REST API with a few workers, and meanwhile kills the server and the agent with
//! SIGKILL (restarting each on the same data), restarts PostgreSQL (on PostgreSQL) and arms the
//! agent's fault points, at random moments from `--seed`. Then it waits for the system to settle
//! and prints the faults by kind, the acknowledged operations and what was lost, stuck or run
//! twice; it exits 1 if any of those is not 0 (or nothing was acknowledged).
//!
//! ```text
//! cargo build --release -p drover -p drover-bench
//! target/release/drover-bench-chaos --faults 1000 --seed 1
//! target/release/drover-bench-chaos --backend postgres --faults 200 --seed 2
//! target/release/drover-bench-chaos --backend postgres --nodes 3 --faults 40 --seed 3
//! ```
//!
//! `--nodes 3` is cluster mode (issue 14): three nodes on the database and the bench's own
//! nats-server, and the faults add node kills (restarted after up to `--max-node-down-ms`) and
//! nats-server restarts (kill -9, then the same port and store directory).
//!
//! A PostgreSQL run restarts the whole local cluster: run it when nothing else uses it.

use clap::Parser;
use drover_bench::chaos::{self, ChaosArgs};

#[derive(Debug, Parser)]
#[command(
    name = "drover-bench-chaos",
    about = "Fault injection (kill -9 of server and agent, PostgreSQL restarts) under a container workload: lost / stuck / run twice"
)]
struct Args {
    #[command(flatten)]
    chaos: ChaosArgs,
}

fn main() {
    let args = Args::parse();
    drover_bench::harness::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: tokio runtime: {error}");
            std::process::exit(2);
        }
    };
    // Ctrl-C and SIGTERM drop the run, whose cluster kills everything it started.
    let result = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            report = chaos::run(&args.chaos) => report,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated")),
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(report) if report.passed() => {}
        Ok(_) => std::process::exit(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(2);
        }
    }
}
