//! Secrets never reach a child process: with `STILLPOINT_PASSWORD`, `AWS_SECRET_ACCESS_KEY` and
//! `AWS_SESSION_TOKEN` in the environment of `stillpoint`, the environment of each kind of child
//! it starts — the QEMU of `vm run` (lives as long as the VM), the freeze guardian (lives up to
//! the unfreeze timeout), a recipe's host hook (a third-party script) and qemu-img (the
//! capture's scratch image) — holds none of them, while an ordinary variable passes through
//! (so the check reads real environments). The passphrase still opens the repository.
//!
//! QEMU's and the guardian's environments are read from `/proc/PID/environ` while they live.
//! The hook and qemu-img are short-lived: the hook copies its own `/proc/$$/environ`, and a
//! `qemu-img` shim first on `PATH` copies its `/proc/$$/environ` and then execs the real
//! `/usr/bin/qemu-img` (the shim only records; the real tool does the work).
#![cfg(feature = "vm-tests")]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{stillpoint_command, text};
use tempfile::TempDir;

const SECRETS: &[(&str, &str)] = &[
    ("STILLPOINT_PASSWORD", "vm secrets test passphrase"),
    ("AWS_SECRET_ACCESS_KEY", "aws-secret-canary-value"),
    ("AWS_SESSION_TOKEN", "aws-session-canary-value"),
];
/// Not a secret: must pass through, or the environment read is not the child's.
const ORDINARY: (&str, &str) = ("STILLPOINT_TEST_ORDINARY", "passes-through");

struct Sandbox {
    dir: TempDir,
    qemu_pid: Option<u32>,
}

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("sp-secrets-")
            .tempdir()
            .expect("tempdir");
        let shims = dir.path().join("shims");
        std::fs::create_dir(&shims).unwrap();
        let shim = shims.join("qemu-img");
        std::fs::write(
            &shim,
            format!(
                "#!/bin/sh\ntr '\\0' '\\n' < /proc/$$/environ > {}/qemu-img.env.$$\n\
                 exec /usr/bin/qemu-img \"$@\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        Self {
            dir,
            qemu_pid: None,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn stillpoint(&self, args: &[&str]) -> Output {
        let path = format!(
            "{}:{}",
            self.path("shims").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = stillpoint_command();
        command
            .args(["--repo", "repo"])
            .args(args)
            .env("STILLPOINT_RUNTIME_DIR", self.path("run"))
            .env("PATH", path)
            .env(ORDINARY.0, ORDINARY.1)
            .current_dir(self.dir.path());
        for (name, value) in SECRETS {
            command.env(name, value);
        }
        command.output().expect("run stillpoint")
    }

    fn ok(&self, args: &[&str]) -> Output {
        let output = self.stillpoint(args);
        assert!(
            output.status.success(),
            "stillpoint {args:?}: {}",
            text(&output)
        );
        output
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.stillpoint(&["unfreeze", "--name", "sec"]);
        let _ = self.stillpoint(&["vm", "stop", "sec"]);
        if let Some(pid) = self.qemu_pid
            && Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// `NAME=VALUE` lines of an environment (NUL- or newline-separated).
fn parse_env(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == 0 || b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .collect()
}

/// Asserts that `env` (of `child`) holds the ordinary variable and no secret, name or value.
fn assert_no_secrets(child: &str, env: &[String]) {
    let ordinary = format!("{}={}", ORDINARY.0, ORDINARY.1);
    assert!(
        env.contains(&ordinary),
        "{child}: the ordinary variable is missing, so this is not its environment: {env:?}"
    );
    for (name, value) in SECRETS {
        for line in env {
            assert!(
                !line.starts_with(&format!("{name}=")) && !line.contains(value),
                "{child} has the secret {name} in its environment: {line}"
            );
        }
    }
}

fn proc_environ(child: &str, pid: u32) -> Vec<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("{child} (pid {pid}): cannot read its environment: {e}"));
    parse_env(&bytes)
}

const RECIPE: &str = r#"apiVersion: ramendr.openshift.io/v1alpha1
kind: Recipe
metadata:
  name: host-hook-environment
spec:
  groups:
  - name: vm-disks
    type: volume
  hooks:
  - name: probe
    type: exec
    target: host
    timeout: 20
    ops:
    - name: record-environment
      timeout: 10
      command: [/bin/sh, -c, "tr '\\0' '\\n' < /proc/$$/environ > OUT"]
  workflows:
  - name: backup
    failOn: any-error
    sequence:
    - hook: probe/record-environment
    - group: vm-disks
"#;

#[test]
fn no_child_inherits_a_secret() {
    let mut sandbox = Sandbox::new();

    // QEMU started by `vm run`, for the VM's whole life.
    let output = sandbox.ok(&["--json", "vm", "run", "sec", "--wait"]);
    let record: serde_json::Value = serde_json::from_slice(&output.stdout).expect("vm.json");
    let qemu_pid = u32::try_from(record["pid"].as_u64().expect("pid")).unwrap();
    sandbox.qemu_pid = Some(qemu_pid);
    assert_no_secrets("QEMU of `vm run`", &proc_environ("QEMU", qemu_pid));

    // The guardian of a freeze, while it watches.
    sandbox.ok(&["freeze", "--name", "sec", "--unfreezeTimeoutSeconds", "600"]);
    let lease: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sandbox.path("run/leases/sec.json")).expect("the freeze lease"),
    )
    .expect("lease JSON");
    let guardian = u32::try_from(lease["guardian_pid"].as_u64().expect("guardian pid")).unwrap();
    assert_no_secrets("guardian", &proc_environ("guardian", guardian));
    sandbox.ok(&["unfreeze", "--name", "sec"]);

    // A recipe's host hook and qemu-img, in a backup; the passphrase from the environment
    // still initialises and opens the repository.
    sandbox.ok(&["repo", "init"]);
    let hook_env = sandbox.path("hook.env");
    std::fs::write(
        sandbox.path("recipe.yaml"),
        RECIPE.replace("OUT", hook_env.to_str().unwrap()),
    )
    .unwrap();
    sandbox.ok(&[
        "backup",
        "sec",
        "--consistency",
        "application",
        "--recipe",
        "recipe.yaml",
    ]);
    let hook = std::fs::read(&hook_env).expect("the host hook ran and recorded its environment");
    assert_no_secrets("recipe host hook", &parse_env(&hook));
    let mut qemu_img_runs = 0;
    for entry in std::fs::read_dir(sandbox.dir.path()).unwrap() {
        let entry = entry.unwrap();
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("qemu-img.env.")
        {
            qemu_img_runs += 1;
            assert_no_secrets(
                "qemu-img",
                &parse_env(&std::fs::read(entry.path()).unwrap()),
            );
        }
    }
    assert!(
        qemu_img_runs > 0,
        "the backup never ran qemu-img (the scratch image)"
    );
    let snapshots = sandbox.ok(&["--json", "snapshots"]);
    let listed: serde_json::Value = serde_json::from_slice(&snapshots.stdout).unwrap();
    assert!(
        listed.to_string().contains("\"sec\""),
        "the snapshot is listed: {listed}"
    );
}
