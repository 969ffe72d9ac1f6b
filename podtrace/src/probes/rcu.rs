//! Expedited RCU grace periods while TCX links are made and closed.
//!
//! The kernel waits for an RCU grace period, under the RTNL lock, for every TCX link it
//! attaches or detaches (the swap of a device's program list waits until no packet can still
//! be running the old one). A normal grace period takes ~12 ms on the bench machine and the
//! RTNL lock makes the links wait one after another: 20 links, a 10-hop path, took ~250 ms
//! to attach and ~170 ms to close. Expedited, the same 20 take under 1 ms each way. The
//! networking core expedites the grace periods it waits for under RTNL itself
//! (`synchronize_net`); the TCX code does not, so podtrace asks for it through
//! `/sys/kernel/rcu_expedited` for the moments it makes or closes TCX links, and puts the
//! earlier value back right after.
//!
//! Between processes: the one that sets the knob holds an exclusive lock on [`LOCK`] and
//! records the earlier value in [`RECORD`] until it has put it back; another waits for the
//! lock (up to a second, then goes on the slow way). A podtrace killed in between leaves the
//! record: the next one to start puts the value back ([`recover`]).
//! Where the knob cannot be written (no such file, a read-only `/sys`), links are made the
//! slow way.
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

/// The kernel's knob: "1" makes every RCU grace period an expedited one.
pub const KNOB: &str = "/sys/kernel/rcu_expedited";
/// Held (flock) by the process that has set the knob.
pub const LOCK: &str = "/run/podtrace/rcu_expedited.lock";
/// The knob's earlier value, while a process has it set.
pub const RECORD: &str = "/run/podtrace/rcu_expedited.prior";

/// How long to wait for another process's lock before making links the slow way.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What this process holds: how many guards are alive, and while it has the knob set, the
/// lock file and the value to put back.
struct Held {
    users: usize,
    taken: Option<(File, String)>,
}

static HELD: Mutex<Held> = Mutex::new(Held {
    users: 0,
    taken: None,
});

/// While alive, RCU grace periods are expedited (when the knob could be set).
#[must_use = "grace periods are expedited only while the guard lives"]
pub struct Expedited(());

/// Whether this process may set the knob: it exists and its file system is writable (a
/// container's `/sys` is often read-only).
pub fn can_expedite() -> bool {
    nix::unistd::access(KNOB, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Expedites RCU grace periods until the guard is dropped. Never fails: without the knob
/// the caller's links are made the slow way.
pub fn expedite() -> Expedited {
    let Ok(mut held) = HELD.lock() else {
        return Expedited(());
    };
    held.users += 1;
    if held.users == 1 {
        held.taken = take(Path::new(KNOB), Path::new(LOCK), Path::new(RECORD));
    }
    Expedited(())
}

impl Drop for Expedited {
    fn drop(&mut self) {
        let Ok(mut held) = HELD.lock() else { return };
        held.users = held.users.saturating_sub(1);
        if held.users == 0 {
            // Closing the file afterwards lets go of the lock.
            if let Some((_file, prior)) = held.taken.take() {
                put_back(Path::new(KNOB), Path::new(RECORD), &prior);
            }
        }
    }
}

/// Takes the lock and sets the knob: the lock file and the earlier value, or `None` when
/// the lock is taken, the knob is already set or cannot be written.
fn take(knob: &Path, lock: &Path, record: &Path) -> Option<(File, String)> {
    if let Some(dir) = lock.parent() {
        fs::create_dir_all(dir).ok()?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock)
        .ok()?;
    // Another podtrace making or closing links holds it for milliseconds: wait that long,
    // not for a podtrace stuck with it.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    while !try_lock(&file) {
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    recover_locked(knob, record);
    let prior = fs::read_to_string(knob).ok()?.trim().to_owned();
    if prior != "0" {
        return None;
    }
    fs::write(record, format!("{prior}\n")).ok()?;
    if write_knob(knob, "1").is_err() {
        let _ = fs::remove_file(record);
        return None;
    }
    Some((file, prior))
}

/// Takes the exclusive lock on `file` if it is free (released as the file closes).
fn try_lock(file: &File) -> bool {
    // SAFETY: flock on a file descriptor the caller holds open.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

fn write_knob(knob: &Path, value: &str) -> std::io::Result<()> {
    // sysfs: one write of the whole value, to the existing file.
    let mut f = OpenOptions::new().write(true).open(knob)?;
    f.write_all(value.as_bytes())
}

fn put_back(knob: &Path, record: &Path, prior: &str) {
    if write_knob(knob, prior).is_ok() {
        let _ = fs::remove_file(record);
    }
}

/// With the lock held: a record means its writer died before putting the value back.
fn recover_locked(knob: &Path, record: &Path) -> bool {
    let Ok(text) = fs::read_to_string(record) else {
        return false;
    };
    let prior = text.trim();
    if prior.is_empty() || !prior.bytes().all(|b| b.is_ascii_digit()) {
        let _ = fs::remove_file(record);
        return false;
    }
    put_back(knob, record, prior);
    true
}

/// Puts back the knob's value a killed podtrace left set. Returns one line saying so, or
/// `None` when there was nothing to do (or another process holds the lock: it is setting
/// the knob now and puts it back itself).
pub fn recover() -> Option<String> {
    recover_at(Path::new(KNOB), Path::new(LOCK), Path::new(RECORD))
}

fn recover_at(knob: &Path, lock: &Path, record: &Path) -> Option<String> {
    if !record.exists() {
        return None;
    }
    let held = HELD.lock().ok()?;
    if held.taken.is_some() {
        return None;
    }
    let file = OpenOptions::new().write(true).open(lock).ok()?;
    if !try_lock(&file) {
        return None;
    }
    recover_locked(knob, record).then(|| {
        format!(
            "put {} back as it was before a podtrace that was killed while attaching set it",
            knob.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The knob, lock and record as files of a scratch directory.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let d =
                std::env::temp_dir().join(format!("podtrace-rcu-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("knob"), "0\n").unwrap();
            Self(d)
        }
        fn knob(&self) -> std::path::PathBuf {
            self.0.join("knob")
        }
        fn lock(&self) -> std::path::PathBuf {
            self.0.join("lock")
        }
        fn record(&self) -> std::path::PathBuf {
            self.0.join("record")
        }
        fn value(&self) -> String {
            fs::read_to_string(self.knob()).unwrap().trim().to_owned()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_knob_is_set_while_taken_and_put_back_after() {
        let s = Scratch::new("take");
        let (file, prior) = take(&s.knob(), &s.lock(), &s.record()).expect("taken");
        assert_eq!(prior, "0");
        assert_eq!(s.value(), "1");
        assert_eq!(fs::read_to_string(s.record()).unwrap().trim(), "0");
        // A second taker (another process would be the same) finds the lock held, waits
        // for it and gives up.
        assert!(take(&s.knob(), &s.lock(), &s.record()).is_none());
        assert_eq!(s.value(), "1");
        put_back(&s.knob(), &s.record(), &prior);
        drop(file);
        assert_eq!(s.value(), "0");
        assert!(!s.record().exists());
    }

    #[test]
    fn a_knob_already_set_is_left_alone() {
        let s = Scratch::new("set");
        fs::write(s.knob(), "1\n").unwrap();
        assert!(take(&s.knob(), &s.lock(), &s.record()).is_none());
        assert_eq!(s.value(), "1");
        assert!(!s.record().exists());
    }

    #[test]
    fn a_killed_holders_value_is_put_back() {
        let s = Scratch::new("killed");
        // What a holder killed between setting the knob and putting it back leaves.
        fs::write(s.knob(), "1\n").unwrap();
        fs::write(s.record(), "0\n").unwrap();
        File::create(s.lock()).unwrap();
        let line = recover_at(&s.knob(), &s.lock(), &s.record());
        assert!(line.is_some_and(|l| l.contains("knob")));
        assert_eq!(s.value(), "0");
        assert!(!s.record().exists());
        // Nothing left to do.
        assert!(recover_at(&s.knob(), &s.lock(), &s.record()).is_none());
        // And a taker finding such a record puts it back before it records its own value.
        fs::write(s.knob(), "1\n").unwrap();
        fs::write(s.record(), "0\n").unwrap();
        let (file, prior) = take(&s.knob(), &s.lock(), &s.record()).expect("taken");
        assert_eq!(prior, "0");
        put_back(&s.knob(), &s.record(), &prior);
        drop(file);
        assert_eq!(s.value(), "0");
    }

    #[test]
    fn a_missing_knob_takes_nothing() {
        let s = Scratch::new("missing");
        fs::remove_file(s.knob()).unwrap();
        assert!(take(&s.knob(), &s.lock(), &s.record()).is_none());
        assert!(!s.record().exists());
    }
}
