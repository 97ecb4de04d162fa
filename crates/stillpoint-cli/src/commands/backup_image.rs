//! `stillpoint backup-image FILE --name NAME [--parent SNAPSHOT] [--changed-ranges FILE]`.
//!
//! `--changed-ranges` is a text file of `OFFSET LENGTH` lines (decimal or 0x-hex bytes; `#`
//! starts a comment): with `--parent`, only the chunks those ranges touch are read, the others
//! keep the parent's digests — what the VM capture path does with a dirty bitmap.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Args;
use stillpoint_repo::{BackupOptions, DiskInput, Extent, FileSource, SnapshotInfo};

use crate::commands::repo::progress_bar;
use crate::context::Context;
use crate::output::{EXIT_OK, print_json};
use crate::password::open_repository;

#[derive(Debug, Args)]
pub struct BackupImageArgs {
    /// The disk image file to back up.
    pub file: PathBuf,
    /// The name the snapshot is filed under (as a VM name).
    #[arg(long)]
    pub name: String,
    /// Disk name inside the snapshot (default: the file's name).
    #[arg(long)]
    pub disk_name: Option<String>,
    /// Parent snapshot for an incremental: an id, a prefix, or `latest` (this name's newest).
    #[arg(long)]
    pub parent: Option<String>,
    /// File of changed byte ranges since the parent (`OFFSET LENGTH` per line).
    #[arg(long, requires = "parent")]
    pub changed_ranges: Option<PathBuf>,
}

/// Parses a changed-ranges file; errors name the file and line.
pub fn parse_changed_ranges(path: &Path, text: &str) -> anyhow::Result<Vec<Extent>> {
    let number = |s: &str| -> Option<u64> {
        match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        }
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (offset, len) = match fields.as_slice() {
            [o, l] => (number(o), number(l)),
            _ => (None, None),
        };
        match (offset, len) {
            (Some(offset), Some(len)) if offset.checked_add(len).is_some() => {
                out.push(Extent { offset, len })
            }
            _ => bail!(
                "{}:{}: expected `OFFSET LENGTH` (bytes, decimal or 0x-hex), found `{line}`",
                path.display(),
                n + 1
            ),
        }
    }
    Ok(out)
}

pub async fn run(ctx: &Context, args: BackupImageArgs) -> anyhow::Result<ExitCode> {
    // The name is the snapshot's VM name (the one rule for names, checked before anything).
    stillpoint_os::names::validate_name("--name", &args.name)?;
    let repo = open_repository(ctx)?;
    let source = FileSource::open(&args.file)?;
    let parent = match args.parent.as_deref() {
        None => None,
        Some("latest") => Some(
            repo.latest_snapshot(&args.name)?
                .with_context(|| format!("`--parent latest`: `{}` has no snapshot yet", args.name))?
                .id,
        ),
        Some(spec) => Some(repo.find_snapshot(spec)?.id),
    };
    let changed = match &args.changed_ranges {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Some(parse_changed_ranges(path, &text)?)
        }
    };
    let disk_name = args.disk_name.clone().unwrap_or_else(|| {
        args.file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into())
    });
    let started = std::time::Instant::now();
    let mut session = repo.begin_backup(BackupOptions {
        vm: args.name.clone(),
        parent,
        workers: None,
    })?;
    let bar = progress_bar(ctx, stillpoint_repo::DiskSource::size(&source), "backup");
    let progress = |n: u64| {
        if let Some(bar) = &bar {
            bar.inc(n);
        }
    };
    let stats = session.write_disk(
        DiskInput {
            name: disk_name.clone(),
            source: &source,
            changed,
        },
        Some(&progress),
    )?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let elapsed = started.elapsed();
    let manifest = session.publish(SnapshotInfo {
        platform: Some(format!("image:{}", args.file.display())),
        report: serde_json::json!({ "seconds": elapsed.as_secs_f64() }),
        ..Default::default()
    })?;
    if ctx.global.json {
        print_json(&serde_json::json!({
            "snapshot": manifest.id,
            "vm": manifest.vm,
            "disk": disk_name,
            "size": manifest.total_size(),
            "seconds": elapsed.as_secs_f64(),
            "stats": stats,
        }))?;
    } else {
        let b = bytesize::ByteSize;
        println!(
            "snapshot {} of {}: {} read, {} chunks new, {} reused ({} unchanged unread), {} zero, {} stored, {:.1}s",
            manifest.id,
            manifest.vm,
            b(stats.bytes_read),
            stats.chunks_new,
            stats.chunks_reused,
            stats.chunks_unchanged,
            stats.chunks_zero,
            b(stats.bytes_stored),
            elapsed.as_secs_f64()
        );
    }
    Ok(ExitCode::from(EXIT_OK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_ranges_parse_and_errors_name_file_and_line() {
        let p = Path::new("ranges.txt");
        let ranges = parse_changed_ranges(p, "# dirty\n0 4096\n\n0x10000 0x200 # tail\n").unwrap();
        assert_eq!(
            ranges,
            vec![
                Extent {
                    offset: 0,
                    len: 4096
                },
                Extent {
                    offset: 0x10000,
                    len: 0x200
                }
            ]
        );
        let err = parse_changed_ranges(p, "0 1\n12\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("ranges.txt:2:"), "{err}");
    }
}
