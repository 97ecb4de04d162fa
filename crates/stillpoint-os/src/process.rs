//! Whether a process lives.

/// Whether process `pid` lives. A zombie (or a dead task, state `X`) counts as dead: it has
/// exited and holds nothing any more — not a freeze, not a repository lock — it only waits
/// for its parent to read its status, which may never happen (a guardian's parent is gone).
/// A process of another user counts as alive.
///
/// Reads `/proc/PID/stat` (Linux), since `kill(pid, 0)` reports zombies as alive. When that
/// entry cannot be read (a `/proc` mounted with `hidepid` hides other users' processes),
/// `kill(pid, 0)` decides: only "no such process" is dead — a repository lock of another
/// user's live backup must never look stale.
pub fn process_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false; // no such pid on Linux
    };
    if raw == 0 {
        return false; // not a process: kill(0, …) would mean "my process group"
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name, which may itself hold
        // spaces and parentheses: hence the last `)`.
        Ok(stat) => match stat.rfind(')') {
            Some(end) => !matches!(stat[end + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None),
            Err(nix::errno::Errno::ESRCH)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_lives_and_a_reaped_one_does_not() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(!process_alive(pid));
        assert!(!process_alive(0));
        assert!(!process_alive(u32::MAX));
    }

    #[test]
    fn a_zombie_is_dead() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        // Not reaped yet: it becomes a zombie once it exits. Wait (without reaping) until the
        // kernel shows it as one, bounded by a retry count rather than a clock.
        let mut zombie = false;
        for _ in 0..10_000 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
            if stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            {
                zombie = true;
                break;
            }
            std::thread::yield_now();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(zombie, "the child never became a zombie");
        assert!(!process_alive(pid));
        child.wait().expect("reap");
    }
}
