//! `stillpoint restore SNAPSHOT --to DIR [--format raw|qcow2] [--disk NAME]`.
//!
//! Restores image snapshots' disks (the VM-specific parts, boot test and VM definition, come
//! with the engine). The disk restore itself is `Repository::restore_disk`, reusable there.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use stillpoint_repo::{ImageFormat, RestoreOptions};

use crate::commands::repo::progress_bar;
use crate::context::Context;
use crate::output::{EXIT_OK, print_json};
use crate::password::open_repository;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot: an id, a unique id prefix, or VM:latest.
    pub snapshot: String,
    /// Directory to write the disks into (created if missing).
    #[arg(long)]
    pub to: PathBuf,
    /// Image format of the restored disks.
    #[arg(long, value_enum, default_value_t = Format::Raw)]
    pub format: Format,
    /// Only this disk (default: every disk of the snapshot).
    #[arg(long)]
    pub disk: Option<String>,
    /// Fill damaged or missing chunks with zeros and report their offsets instead of failing.
    #[arg(long)]
    pub zero_fill_damaged: bool,
}

/// A file name for a disk name (disk names may contain `/`).
fn file_name(disk: &str, format: Format) -> String {
    let safe: String = disk
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    let ext = match format {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
    };
    // `disk.raw` restores to `disk.raw`, not `disk.raw.raw`.
    let stem = [".raw", ".img", ".qcow2"]
        .iter()
        .find_map(|suffix| safe.strip_suffix(suffix))
        .filter(|stem| !stem.is_empty())
        .unwrap_or(&safe);
    format!("{stem}.{ext}")
}

pub async fn run(ctx: &Context, args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let repo = open_repository(ctx)?;
    let manifest = repo.find_snapshot(&args.snapshot)?;
    let disks: Vec<String> = match &args.disk {
        Some(name) => vec![manifest.disk(name)?.name.clone()],
        None => manifest.disks.iter().map(|d| d.name.clone()).collect(),
    };
    std::fs::create_dir_all(&args.to)
        .with_context(|| format!("cannot create {}", args.to.display()))?;
    let format = match args.format {
        Format::Raw => ImageFormat::Raw,
        Format::Qcow2 => ImageFormat::Qcow2,
    };
    let mut results = Vec::new();
    let mut damaged_total = 0;
    for disk in &disks {
        let dest = args.to.join(file_name(disk, args.format));
        let size = manifest.disk(disk)?.size;
        let bar = progress_bar(ctx, size, &format!("restore {disk}"));
        let progress = |n: u64| {
            if let Some(bar) = &bar {
                bar.inc(n);
            }
        };
        let started = std::time::Instant::now();
        let stats = repo.restore_disk(
            &manifest,
            disk,
            &dest,
            format,
            RestoreOptions {
                zero_fill_damaged: args.zero_fill_damaged,
                ..Default::default()
            },
            Some(&progress),
        )?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        damaged_total += stats.damaged_offsets.len();
        if !ctx.global.json {
            for offset in &stats.damaged_offsets {
                eprintln!(
                    "warning: snapshot {} disk {disk}: damaged chunk at offset {offset} was zero-filled",
                    manifest.id
                );
            }
            println!(
                "restored disk {disk} of snapshot {} to {} ({}, {:.1}s)",
                manifest.id,
                dest.display(),
                bytesize::ByteSize(stats.size),
                started.elapsed().as_secs_f64()
            );
        }
        results.push(serde_json::json!({ "disk": disk, "path": dest, "stats": stats }));
    }
    if ctx.global.json {
        print_json(&serde_json::json!({ "snapshot": manifest.id, "disks": results }))?;
    }
    // Zero-filled damage is a degraded restore: exit 3, so scripts notice.
    Ok(ExitCode::from(if damaged_total > 0 {
        crate::output::EXIT_DEGRADED
    } else {
        EXIT_OK
    }))
}
