//! `bench repo`: the repository against restic and borg.
//!
//! It generates an image of realistic mixed content (zeros, binaries and text from /usr,
//! random data), then runs stillpoint (`backup-image` as a subprocess), restic and borg, all
//! encrypted, through: full backup, second backup of the unchanged image, an incremental with
//! 1 % of the chunks changed (stillpoint gets the changed-ranges list; restic and borg back up
//! the modified file), and a restore. Every command runs under the hidden `bench measure`
//! helper ([`crate::measure`]), which reports wall time and the peak RSS of exactly that
//! command, so all three tools are measured the same way.

use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

use crate::measure::{MEASURE_ARGS, Measurement};
use crate::stats::mb_per_s;
use crate::targets::{Bound, Target, Targets};
use crate::{PASSWORD, Progress};

/// What `bench repo` runs.
#[derive(Debug, Clone)]
pub struct RepoBench {
    /// Image size in bytes.
    pub size: u64,
    /// Working directory (None: a fresh directory under /var/tmp, removed after).
    pub workdir: Option<PathBuf>,
    /// Skip restic and borg.
    pub only_ours: bool,
}

struct Runner<'a> {
    exe: PathBuf,
    work: PathBuf,
    step: usize,
    progress: &'a dyn Progress,
}

impl Runner<'_> {
    fn run(
        &mut self,
        label: &str,
        cmd: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Measurement> {
        self.step += 1;
        // Write back what earlier steps left dirty, so that no step pays for another's I/O.
        nix::unistd::sync();
        let log = self.work.join(format!(
            "log-{:02}-{}.txt",
            self.step,
            label.replace(' ', "-")
        ));
        let output = Command::new(&self.exe)
            .args(MEASURE_ARGS)
            .arg("--log")
            .arg(&log)
            .arg("--cwd")
            .arg(&self.work)
            // Restores are timed until the data is on disk, for every tool alike (stillpoint
            // fsyncs its output; restic and borg leave it to the kernel's writeback).
            .args(label.starts_with("restore").then_some("--sync-after"))
            .arg("--")
            .args(cmd)
            .envs(env.iter().copied())
            .stderr(Stdio::inherit())
            .output()?;
        let m: Measurement = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("`{label}`: the measuring helper failed"))?;
        if !m.success {
            let tail = fs::read_to_string(&log).unwrap_or_default();
            bail!(
                "`{label}` failed ({}):\n{}",
                cmd.join(" "),
                tail.lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        self.progress.line(&format!(
            "  {label:<34} {:>8.2} s  {:>7} MiB peak RSS",
            m.seconds,
            m.max_rss_kib / 1024
        ));
        Ok(m)
    }
}

/// Streams file contents from /usr, split into ELF binaries and text.
struct UsrPool {
    files: Vec<PathBuf>,
    next: usize,
}

impl UsrPool {
    fn new() -> Self {
        let mut files = Vec::new();
        let mut stack = vec![PathBuf::from("/usr")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() {
                    stack.push(e.path());
                } else if ft.is_file() {
                    files.push(e.path());
                }
            }
        }
        files.sort();
        Self { files, next: 0 }
    }

    /// Fills `buf` with content of the wanted kind (binary: ELF files; text: no NUL bytes).
    fn fill(&mut self, buf: &mut [u8], binary: bool) {
        let mut filled = 0;
        let mut scanned = 0;
        while filled < buf.len() && scanned < self.files.len() * 2 {
            let path = &self.files[self.next % self.files.len()];
            self.next += 1;
            scanned += 1;
            let Ok(mut f) = File::open(path) else {
                continue;
            };
            let mut head = [0u8; 512];
            let n = f.read(&mut head).unwrap_or(0);
            let is_elf = n >= 4 && head[..4] == *b"\x7fELF";
            let is_text = n > 0
                && !head[..n].contains(&0)
                && !is_elf
                && !head[..n.min(4)].starts_with(&[0x1f, 0x8b]);
            if (binary && !is_elf) || (!binary && !is_text) {
                continue;
            }
            let mut data = head[..n].to_vec();
            let _ = f.take((buf.len() - filled) as u64).read_to_end(&mut data);
            let take = data.len().min(buf.len() - filled);
            buf[filled..filled + take].copy_from_slice(&data[..take]);
            filled += take;
        }
        // /usr ran out (tiny system): what is left becomes text-like filler.
        for (i, b) in buf[filled..].iter_mut().enumerate() {
            *b = b"filler text "[i % 12];
        }
    }
}

/// Writes the benchmark image: 16 MiB segments of zeros, binaries, text and random data in
/// a shuffled order (25 % each).
fn generate_image(path: &Path, size: u64) -> anyhow::Result<()> {
    const SEG: u64 = 16 << 20;
    let file = File::create(path)?;
    file.set_len(size)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut pool = UsrPool::new();
    let mut buf = vec![0u8; SEG as usize];
    let mut off = 0;
    let mut kinds: Vec<u8> = (0..size.div_ceil(SEG)).map(|i| (i % 4) as u8).collect();
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.random_range(0..=i));
    }
    for kind in kinds {
        let len = (size - off).min(SEG) as usize;
        match kind {
            0 => {} // zeros: a hole
            1 => pool.fill(&mut buf[..len], true),
            2 => pool.fill(&mut buf[..len], false),
            _ => rng.fill_bytes(&mut buf[..len]),
        }
        if kind != 0 {
            file.write_all_at(&buf[..len], off)?;
        }
        off += len as u64;
    }
    file.sync_all()?;
    Ok(())
}

/// Changes 4 KiB in 1 % of the 4 MiB chunks (at least one) and returns the changed ranges.
fn change_one_percent(path: &Path, size: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    const CHUNK: u64 = 4 << 20;
    let chunks = size.div_ceil(CHUNK);
    let count = (chunks / 100).max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let file = fs::OpenOptions::new().write(true).open(path)?;
    let mut picked: Vec<u64> = Vec::new();
    while (picked.len() as u64) < count {
        let c = rng.random_range(0..chunks);
        if !picked.contains(&c) {
            picked.push(c);
        }
    }
    let mut ranges = Vec::new();
    let mut data = vec![0u8; 4096];
    for c in picked {
        let room = (size - c * CHUNK).min(CHUNK).saturating_sub(4096);
        let off = c * CHUNK + rng.random_range(0..=room) / 4096 * 4096;
        let len = 4096.min(size - off);
        rng.fill_bytes(&mut data);
        file.write_all_at(&data[..len as usize], off)?;
        ranges.push((off, len));
    }
    file.sync_all()?;
    Ok(ranges)
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn files_equal(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct ToolResult {
    full: Option<Measurement>,
    unchanged: Option<Measurement>,
    incremental: Option<Measurement>,
    restore: Option<Measurement>,
    /// Opening the repository and listing snapshots: the fixed per-process cost (KDF).
    open: Option<Measurement>,
    repo_bytes: u64,
    peak_rss_kib: u64,
}

impl ToolResult {
    fn finish(&mut self, repo: &Path) {
        self.repo_bytes = dir_size(repo);
        self.peak_rss_kib = [self.full, self.unchanged, self.incremental, self.restore]
            .iter()
            .flatten()
            .map(|m| m.max_rss_kib)
            .max()
            .unwrap_or(0);
    }
}

/// Runs the benchmark; `progress` hears every step as it completes.
pub fn run(args: &RepoBench, progress: &dyn Progress) -> anyhow::Result<RepoReport> {
    let targets = Targets::load()?;
    struct RemoveOnDrop(Option<PathBuf>);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            if let Some(dir) = &self.0 {
                let _ = fs::remove_dir_all(dir);
            }
        }
    }
    let (work, _cleanup) = match &args.workdir {
        Some(dir) => (dir.clone(), RemoveOnDrop(None)),
        None => {
            let dir = PathBuf::from(format!("/var/tmp/stillpoint-bench-{}", std::process::id()));
            (dir.clone(), RemoveOnDrop(Some(dir)))
        }
    };
    fs::create_dir_all(&work)?;
    let image = work.join("image.raw");
    let image_name = "image.raw";
    progress.line(&format!(
        "generating a {} image of zeros, /usr binaries, /usr text and random data in {}",
        bytesize::ByteSize(args.size),
        work.display()
    ));
    generate_image(&image, args.size)?;
    let pristine = work.join("image.pristine");
    let size = args.size;
    let mut runner = Runner {
        exe: std::env::current_exe().context("cannot find the stillpoint executable")?,
        work: work.clone(),
        step: 0,
        progress,
    };
    let password_file = work.join("password");
    fs::File::create(&password_file)?.write_all(PASSWORD.as_bytes())?;
    let exe = runner.exe.to_string_lossy().into_owned();
    let ours_repo = work.join("repo-stillpoint");
    let restic_repo = work.join("repo-restic");
    let borg_repo = work.join("repo-borg");
    for dir in [&ours_repo, &restic_repo, &borg_repo] {
        let _ = fs::remove_dir_all(dir);
    }
    let _ = fs::remove_file(&pristine);
    fs::copy(&image, &pristine)?;

    // Phase 1 + 2 for every tool on the pristine image, then modify, then phase 3 + 4.
    let pw = password_file.to_string_lossy().into_owned();
    let ours_repo_s = ours_repo.to_string_lossy().into_owned();
    let ours = |sub: &[&str]| -> Vec<String> {
        let mut v = vec![
            exe.clone(),
            "--repo".into(),
            ours_repo_s.clone(),
            "--password-file".into(),
            pw.clone(),
        ];
        v.extend(sub.iter().map(|s| s.to_string()));
        v
    };
    let run_owned = |runner: &mut Runner, label: &str, v: Vec<String>, env: &[(&str, &str)]| {
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        runner.run(label, &refs, env)
    };
    let restic_env = [
        ("RESTIC_PASSWORD", PASSWORD),
        ("RESTIC_REPOSITORY", "repo-restic"),
    ];
    let borg_env = [
        ("BORG_PASSPHRASE", PASSWORD),
        ("BORG_REPO", "repo-borg"),
        ("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes"),
        ("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes"),
    ];

    let mut us = ToolResult::default();
    let mut restic = ToolResult::default();
    let mut borg = ToolResult::default();

    progress.line("stillpoint:");
    run_owned(&mut runner, "init", ours(&["repo", "init"]), &[])?;
    us.full = Some(run_owned(
        &mut runner,
        "full backup",
        ours(&["backup-image", image_name, "--name", "bench"]),
        &[],
    )?);
    // A VM backup knows from its dirty bitmap that nothing changed (restic and borg know it
    // from the file's metadata): that is the "unchanged" row. The re-read is reported too.
    fs::write(work.join("ranges-empty.txt"), "# nothing changed\n")?;
    us.unchanged = Some(run_owned(
        &mut runner,
        "unchanged backup (empty dirty map)",
        ours(&[
            "backup-image",
            image_name,
            "--name",
            "bench",
            "--parent",
            "latest",
            "--changed-ranges",
            "ranges-empty.txt",
        ]),
        &[],
    )?);
    let reread = Some(run_owned(
        &mut runner,
        "unchanged backup (re-read, no map)",
        ours(&["backup-image", image_name, "--name", "bench-reread"]),
        &[],
    )?);
    us.open = Some(run_owned(
        &mut runner,
        "open + list snapshots",
        ours(&["snapshots"]),
        &[],
    )?);

    if !args.only_ours {
        progress.line("restic:");
        runner.run("init", &["restic", "init"], &restic_env)?;
        restic.full = Some(runner.run(
            "full backup",
            &["restic", "backup", image_name],
            &restic_env,
        )?);
        restic.unchanged = Some(runner.run(
            "unchanged backup",
            &["restic", "backup", image_name],
            &restic_env,
        )?);
        restic.open = Some(runner.run(
            "open + list snapshots",
            &["restic", "snapshots"],
            &restic_env,
        )?);
        progress.line("borg:");
        runner.run("init", &["borg", "init", "--encryption=repokey"], &borg_env)?;
        borg.full = Some(runner.run(
            "full backup",
            &["borg", "create", "::a1", image_name],
            &borg_env,
        )?);
        borg.unchanged = Some(runner.run(
            "unchanged backup",
            &["borg", "create", "::a2", image_name],
            &borg_env,
        )?);
    }

    let ranges = change_one_percent(&image, size)?;
    let ranges_text: String = ranges.iter().map(|(o, l)| format!("{o} {l}\n")).collect();
    fs::write(work.join("ranges.txt"), ranges_text)?;
    progress.line(&format!(
        "changed {} ranges of 4 KiB (1 % of the 4 MiB chunks)",
        ranges.len()
    ));

    progress.line("stillpoint:");
    us.incremental = Some(run_owned(
        &mut runner,
        "1% incremental (changed ranges)",
        ours(&[
            "backup-image",
            image_name,
            "--name",
            "bench",
            "--parent",
            "latest",
            "--changed-ranges",
            "ranges.txt",
        ]),
        &[],
    )?);
    let out_ours = work.join("out-stillpoint");
    let _ = fs::remove_dir_all(&out_ours);
    us.restore = Some(run_owned(
        &mut runner,
        "restore",
        ours(&[
            "restore",
            "bench:latest",
            "--to",
            "out-stillpoint",
            "--format",
            "raw",
        ]),
        &[],
    )?);
    let restored = out_ours.join(image_name);
    if !files_equal(&image, &restored)? {
        bail!("stillpoint's restore differs from the image");
    }
    fs::remove_dir_all(&out_ours)?;
    us.finish(&ours_repo);

    if !args.only_ours {
        progress.line("restic:");
        restic.incremental = Some(runner.run(
            "1% incremental",
            &["restic", "backup", image_name],
            &restic_env,
        )?);
        let out = work.join("out-restic");
        let _ = fs::remove_dir_all(&out);
        restic.restore = Some(runner.run(
            "restore",
            &["restic", "restore", "latest", "--target", "out-restic"],
            &restic_env,
        )?);
        let _ = fs::remove_dir_all(&out);
        restic.finish(&restic_repo);
        progress.line("borg:");
        borg.incremental = Some(runner.run(
            "1% incremental",
            &["borg", "create", "::a3", image_name],
            &borg_env,
        )?);
        let out = work.join("out-borg");
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out)?;
        let borg_repo_abs = borg_repo.to_string_lossy().into_owned();
        let abs_env = [
            ("BORG_PASSPHRASE", PASSWORD),
            ("BORG_REPO", borg_repo_abs.as_str()),
        ];
        let mut borg_runner = Runner {
            exe: runner.exe.clone(),
            work: out.clone(),
            step: runner.step,
            progress,
        };
        borg.restore = Some(borg_runner.run("restore", &["borg", "extract", "::a3"], &abs_env)?);
        let _ = fs::remove_dir_all(&out);
        borg.finish(&borg_repo);
    }
    let _ = fs::remove_file(&pristine);

    let (rows, extra) = rows(size, &us, reread, &restic, &borg, args.only_ours, &targets);
    Ok(RepoReport {
        image_bytes: size,
        stillpoint: us,
        stillpoint_unchanged_reread: reread,
        restic,
        borg,
        rows,
        extra,
        peak_rss_target: targets.bound(Target::RepoPeakRss),
    })
}

/// What `bench repo` measured. Its JSON is the whole result; `Display` is the human report.
#[derive(Debug)]
pub struct RepoReport {
    borg: ToolResult,
    image_bytes: u64,
    restic: ToolResult,
    rows: Vec<Row>,
    stillpoint: ToolResult,
    stillpoint_unchanged_reread: Option<Measurement>,
    extra: Vec<String>,
    peak_rss_target: Bound,
}

/// Through a JSON value, as this report has always been printed: its keys come out sorted at
/// every level.
impl Serialize for RepoReport {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Fields<'a> {
            image_bytes: u64,
            stillpoint: &'a ToolResult,
            stillpoint_unchanged_reread: Option<Measurement>,
            restic: &'a ToolResult,
            borg: &'a ToolResult,
            rows: &'a [Row],
        }
        let fields = Fields {
            image_bytes: self.image_bytes,
            stillpoint: &self.stillpoint,
            stillpoint_unchanged_reread: self.stillpoint_unchanged_reread,
            restic: &self.restic,
            borg: &self.borg,
            rows: &self.rows,
        };
        serde_json::to_value(fields)
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

#[derive(Debug, Serialize)]
struct Row {
    phase: String,
    ours_mb_s: f64,
    restic_mb_s: Option<f64>,
    borg_mb_s: Option<f64>,
    vs_restic: Option<f64>,
    vs_borg: Option<f64>,
    target_vs_restic: Option<f64>,
    #[serde(skip)]
    target: Bound,
}

/// Picks one phase's measurement out of a tool's results.
type PhaseOf = fn(&ToolResult) -> &Option<Measurement>;

/// The per-phase rows (MB/s of image, ratios, the target against restic) and the extra lines.
fn rows(
    size: u64,
    us: &ToolResult,
    reread: Option<Measurement>,
    restic: &ToolResult,
    borg: &ToolResult,
    only_ours: bool,
    targets: &Targets,
) -> (Vec<Row>, Vec<String>) {
    let mbs = |m: &Option<Measurement>| m.map(|m| mb_per_s(size, m.seconds));
    let mut rows = Vec::new();
    let phases: [(&str, PhaseOf, Target); 4] = [
        ("full backup", |t| &t.full, Target::RepoFull),
        (
            "unchanged 2nd backup",
            |t| &t.unchanged,
            Target::RepoUnchanged,
        ),
        (
            "1% incremental",
            |t| &t.incremental,
            Target::RepoIncremental,
        ),
        ("restore", |t| &t.restore, Target::RepoRestore),
    ];
    for (phase, get, target) in phases {
        let target = targets.bound(target);
        let ours = mbs(get(us)).unwrap_or(0.0);
        let (r, b) = if only_ours {
            (None, None)
        } else {
            (mbs(get(restic)), mbs(get(borg)))
        };
        rows.push(Row {
            phase: phase.into(),
            ours_mb_s: ours,
            restic_mb_s: r,
            borg_mb_s: b,
            vs_restic: r.map(|r| ours / r),
            vs_borg: b.map(|b| ours / b),
            target_vs_restic: Some(target.limit()),
            target,
        });
    }
    let mut extra = Vec::new();
    if let Some(d) = reread {
        let ours = mb_per_s(size, d.seconds);
        let r = mbs(&restic.unchanged);
        extra.push(format!(
            "unchanged 2nd backup without a dirty map (re-reads and hashes the image): {ours:.0} MB/s{}",
            r.map(|r| format!(", {:.1}x restic", ours / r)).unwrap_or_default()
        ));
    }
    (rows, extra)
}

impl fmt::Display for RepoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f)?;
        writeln!(
            f,
            "{:<22} {:>12} {:>12} {:>12} {:>10} {:>10} {:>8}  verdict",
            "phase (MB/s of image)",
            "stillpoint",
            "restic",
            "borg",
            "vs restic",
            "vs borg",
            "target"
        )?;
        for r in &self.rows {
            let opt = |v: Option<f64>, unit: &str| {
                v.map(|v| format!("{v:.1}{unit}"))
                    .unwrap_or_else(|| "-".into())
            };
            let verdict = match r.vs_restic {
                Some(v) if r.target.is_met(v) => "met".to_string(),
                Some(v) => format!("MISSED by {:.0}%", r.target.shortfall_percent(v)),
                None => "-".into(),
            };
            writeln!(
                f,
                "{:<22} {:>12.1} {:>12} {:>12} {:>10} {:>10} {:>8}  {verdict}",
                r.phase,
                r.ours_mb_s,
                opt(r.restic_mb_s, ""),
                opt(r.borg_mb_s, ""),
                opt(r.vs_restic, "x"),
                opt(r.vs_borg, "x"),
                opt(r.target_vs_restic, "x")
            )?;
        }
        for line in &self.extra {
            writeln!(f, "{line}")?;
        }
        let (us, restic, borg) = (&self.stillpoint, &self.restic, &self.borg);
        let mib = |k: u64| k / 1024;
        writeln!(f)?;
        writeln!(
            f,
            "peak RSS: stillpoint {} MiB (target {} {}), restic {} MiB, borg {} MiB",
            mib(us.peak_rss_kib),
            self.peak_rss_target.relation,
            self.peak_rss_target.limit(),
            mib(restic.peak_rss_kib),
            mib(borg.peak_rss_kib)
        )?;
        if let (Some(o), Some(r)) = (us.open, restic.open) {
            writeln!(
                f,
                "fixed cost per process (open the repository, derive the key, list snapshots): stillpoint {:.2} s (Argon2id 64 MiB x 3), restic {:.2} s (scrypt)",
                o.seconds, r.seconds
            )?;
        }
        let b = |n: u64| bytesize::ByteSize(n).to_string();
        let ratio = |n: u64| {
            if n > 0 {
                format!(" ({:.2}x ours)", n as f64 / us.repo_bytes.max(1) as f64)
            } else {
                String::new()
            }
        };
        writeln!(
            f,
            "repository size after 3 backups: stillpoint {}, restic {}{}, borg {}{}",
            b(us.repo_bytes),
            b(restic.repo_bytes),
            ratio(restic.repo_bytes),
            b(borg.repo_bytes),
            ratio(borg.repo_bytes)
        )
    }
}
