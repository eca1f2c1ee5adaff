//! `drover logs`: a container's output, through the server's log socket.

use std::io::Write as _;

use drover_client::{Error, LogLine, LogOptions};

use crate::commands::{Connection, resolve};

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    #[command(flatten)]
    connection: Connection,
    /// Keep printing what the container writes until interrupted (or it is removed).
    #[arg(short, long)]
    follow: bool,
    /// How many of the last lines of stdout and of stderr to print first (0 to 10000).
    #[arg(long, value_name = "N", default_value_t = drover_client::LogOptions::default().lines,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    tail: u32,
    /// The container's id (1i5) or name.
    container: String,
}

/// Prints the container's stdout lines to stdout and its stderr lines to stderr; fails when
/// the stream ends other than normally (the agent went away, the container has no log).
pub async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let client = args.connection.client()?;
    let container = resolve(&client, &args.container).await?;
    let link = container["links"]["self"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let options = LogOptions {
        follow: args.follow,
        lines: args.tail,
    };
    let mut stream = client.logs(&link, options).await?;
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr());
    loop {
        match stream.next_line().await {
            Ok(Some(LogLine::Stdout(line))) => {
                // A closed pipe (`| head`) ends the command quietly.
                if writeln!(stdout, "{line}").is_err() {
                    return Ok(());
                }
                if args.follow {
                    let _ = stdout.flush();
                }
            }
            Ok(Some(LogLine::Stderr(line))) => {
                let _ = writeln!(stderr, "{line}");
            }
            Ok(None) => {
                let _ = stdout.flush();
                if args.follow
                    && let Some(reason) = stream.end_reason()
                {
                    eprintln!("({reason})");
                }
                return Ok(());
            }
            Err(Error::Closed { code, reason }) => {
                let _ = stdout.flush();
                anyhow::bail!("the log stream ended: {reason} (close code {code})");
            }
            Err(error) => return Err(error.into()),
        }
    }
}
