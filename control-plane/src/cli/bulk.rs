//! The `keys` commands that work on many keys at once, directly on the database: `seed`
//! (many keys for benchmarks), `kv-resync` (rebuild Workers KV), `kv-reconcile`
//! (compare KV with the database and fix it) and `leaked-check` (which keys in some text
//! are ours). Progress goes to stderr: a bar on a
//! terminal, a summary line otherwise; `--json` prints the summary as JSON on stdout.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use metlo_shared::KeyType;
use serde_json::json;

use crate::config::Config;
use crate::kv_sync::client::KvClient;
use crate::kv_sync::reconcile::reconcile;
use crate::kv_sync::resync::{resync, Progress};
use crate::service::audit::Actor;
use crate::service::leaks::check_text;
use crate::service::seed::{seed_keys, SeedRequest};

#[derive(Debug, Args)]
pub struct SeedArgs {
    /// How many keys.
    #[arg(long)]
    pub count: u64,
    /// Keys are named PREFIX-N.
    #[arg(long, default_value = "seed")]
    pub prefix: String,
    /// The first N (to add to an earlier seed with the same prefix).
    #[arg(long, default_value_t = 1)]
    pub start: u64,
    /// GENERIC, ONBOARDING, GCP or AWS.
    #[arg(long = "type", default_value = "GENERIC")]
    pub key_type: String,
    /// Write every full key to this new file (one per line, readable by you only), for a
    /// load generator. Without it, the keys are never shown.
    #[arg(long)]
    pub keys_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ResyncArgs {
    /// Start again from the first key instead of resuming an interrupted run.
    #[arg(long)]
    pub restart: bool,
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Only count what differs; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also read every entry's value (one API call each) and compare it with the record,
    /// not only the digest in its metadata: after a suspected write to KV by someone else.
    #[arg(long)]
    pub verify_values: bool,
}

pub async fn seed(config: &Config, args: &SeedArgs, json_out: bool) -> anyhow::Result<()> {
    let key_type: KeyType = args
        .key_type
        .parse()
        .map_err(|e| anyhow::anyhow!("--type: {e}"))?;
    let mut file = match &args.keys_file {
        Some(path) => Some(std::io::BufWriter::new(private_new_file(path)?)),
        None => None,
    };
    let store = config.open_store().await?;
    let bar = bar(args.count, "seeding");
    let started = Instant::now();
    let request = SeedRequest {
        prefix: args.prefix.clone(),
        count: args.count,
        start: args.start,
        key_type,
    };
    let result = seed_keys(
        &store,
        &request,
        config.max_api_keys,
        &Actor::cli(),
        file.as_mut().map(|f| f as &mut dyn std::io::Write),
        &mut |n| {
            if let Some(b) = &bar {
                b.set_position(n)
            }
        },
    )
    .await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    store.close().await;
    let stored = result?;
    let secs = started.elapsed().as_secs_f64();
    if json_out {
        println!("{}", json!({"seeded": stored, "seconds": secs}));
    } else {
        eprintln!(
            "Seeded {stored} keys ({p}-{a} … {p}-{b}) in {secs:.1} s ({:.0} keys/s).",
            stored as f64 / secs.max(1e-9),
            p = args.prefix,
            a = args.start,
            b = args.start + stored.saturating_sub(1),
        );
        if config.kv.target()?.is_some() {
            eprintln!("KV sync is on: run `keys kv-resync` to push them to Workers KV now (the edge otherwise looks each one up on first use).");
        }
    }
    Ok(())
}

pub async fn kv_resync(config: &Config, args: &ResyncArgs, json_out: bool) -> anyhow::Result<()> {
    let client = kv_client(config)?;
    let store = config.open_store().await?;
    let mut progress = BarProgress { bar: None };
    let result = resync(&store, &client, args.restart, &mut progress).await;
    if let Some(b) = &progress.bar {
        b.finish_and_clear();
    }
    store.close().await;
    let report = result.map_err(|e| {
        anyhow::anyhow!("KV resync stopped: {e}. Run it again to resume where it stopped.")
    })?;
    let secs = report.elapsed.as_secs_f64();
    let rate = report.written as f64 / secs.max(1e-9);
    if json_out {
        println!(
            "{}",
            json!({"written": report.written, "resumedAfter": report.resumed_after,
                   "rateLimited": report.sent.rate_limited, "seconds": secs, "keysPerSecond": rate})
        );
    } else {
        let resumed = if report.resumed_after > 0 {
            format!(", resuming after {} written earlier", report.resumed_after)
        } else {
            String::new()
        };
        eprintln!(
            "KV resync done: {} records written in {secs:.1} s ({rate:.0} keys/s){resumed}; {} rate-limited calls waited out.",
            report.written, report.sent.rate_limited
        );
    }
    Ok(())
}

pub async fn kv_reconcile(
    config: &Config,
    args: &ReconcileArgs,
    json_out: bool,
) -> anyhow::Result<()> {
    let client = kv_client(config)?;
    let store = config.open_store().await?;
    let result = reconcile(&store, &client, args.dry_run, args.verify_values).await;
    store.close().await;
    let report = result.map_err(|e| anyhow::anyhow!("KV reconcile stopped: {e}"))?;
    let d = report.drift;
    if json_out {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let verb = if args.dry_run { "would fix" } else { "fixed" };
        eprintln!(
            "KV reconcile: {} entries listed, {} expected; {} strays, {} missing, {} stale, {} wrong values{} ({verb}); {} writes; {:.1} s.",
            report.listed,
            report.expected,
            d.strays,
            d.missing,
            d.stale,
            d.wrong_values,
            if args.verify_values { "" } else { " (values not read: --verify-values)" },
            report.writes,
            report.elapsed.as_secs_f64()
        );
    }
    Ok(())
}

pub async fn leaked_check(config: &Config, json_out: bool) -> anyhow::Result<()> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
        .map_err(|e| anyhow::anyhow!("reading stdin: {e}"))?;
    let store = config.open_store().await?;
    let result = check_text(&store, &text).await;
    store.close().await;
    let found = result?;
    if json_out {
        println!("{}", serde_json::to_string(&found)?);
        return Ok(());
    }
    let live = found
        .iter()
        .filter(|f| f.status == "live" || f.status == "rolled-away")
        .count();
    if !found.is_empty() {
        let mut table = comfy_table::Table::new();
        table
            .load_preset(comfy_table::presets::NOTHING)
            .set_header(["IDENTIFIER", "STATUS", "KEY"]);
        for f in &found {
            table.add_row([
                f.identifier.as_str(),
                f.status,
                f.name.as_deref().unwrap_or("-"),
            ]);
        }
        println!("{table}");
    }
    eprintln!(
        "{} key-shaped strings with a valid checksum; {live} of them work here{}",
        found.len(),
        if live > 0 {
            ": revoke them (keys delete NAME, or keys roll NAME for a rolled-away secret's key)"
        } else {
            ""
        }
    );
    Ok(())
}

fn kv_client(config: &Config) -> anyhow::Result<KvClient> {
    let target = config.kv.target()?.ok_or_else(|| {
        anyhow::anyhow!(
            "KV sync is not configured: set CLOUDFLARE_ACCOUNT_ID, KV_NAMESPACE_ID and CLOUDFLARE_API_TOKEN"
        )
    })?;
    KvClient::new(target)
}

/// A progress bar on stderr when it is a terminal.
fn bar(total: u64, what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = bar_style() {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    Some(bar)
}

fn bar_style() -> Result<ProgressStyle, indicatif::style::TemplateError> {
    Ok(ProgressStyle::with_template(
        "{msg} [{bar:40}] {human_pos}/{human_len} ({per_sec}, {eta} left)",
    )?
    .progress_chars("=> "))
}

struct BarProgress {
    bar: Option<ProgressBar>,
}

impl Progress for BarProgress {
    fn start(&mut self, total: u64, done: u64) {
        self.bar = bar(total, "KV resync");
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
    }

    fn advance(&mut self, done: u64, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(done);
        }
    }
}

/// A new file only its owner can read (keys are secrets); never overwrites one.
fn private_new_file(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .map_err(|e| anyhow::anyhow!("--keys-file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_progress_bar_template_is_valid() {
        assert!(super::bar_style().is_ok());
    }
}
