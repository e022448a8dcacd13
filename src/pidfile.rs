//! `--pidfile`: a locked file holding our PID, removed on exit, as QEMU does it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// A pidfile we hold locked for the life of the process.
pub struct Pidfile {
    path: PathBuf,
    // Keeping the file open keeps the lock.
    _file: File,
}

impl Pidfile {
    /// Creates and locks `path` and writes the PID. The error text is QEMU's.
    pub fn create(path: &str) -> Result<Pidfile, String> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(|e| {
                format!(
                    "cannot create PID file: Could not create '{path}': {}",
                    crate::errno_text(&e)
                )
            })?;
        // SAFETY: a plain lock call on a file descriptor we own.
        if unsafe { libc::lockf(file.as_raw_fd(), libc::F_TLOCK, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(format!(
                "cannot create PID file: Cannot lock pid file: {}",
                crate::errno_text(&e)
            ));
        }
        file.set_len(0)
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(|e| {
                format!(
                    "cannot create PID file: Failed to write pid file: {}",
                    crate::errno_text(&e)
                )
            })?;
        Ok(Pidfile {
            path: PathBuf::from(path),
            _file: file,
        })
    }

    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_pid_and_refuses_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.pid");
        let p = path.to_str().unwrap();
        let pidfile = Pidfile::create(p).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        pidfile.remove();
        assert!(!path.exists());
        let missing = dir.path().join("nodir/x.pid");
        let err = Pidfile::create(missing.to_str().unwrap()).err().unwrap();
        assert_eq!(
            err,
            format!(
                "cannot create PID file: Could not create '{}': No such file or directory",
                missing.display()
            )
        );
    }
}
