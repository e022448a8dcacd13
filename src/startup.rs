//! Start-up: apply the command line in order, optionally daemonize, then run
//! the main loop.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;

use serde_json::{Map, Value};

use crate::cli::{CliOption, OptionKind};
use crate::daemon::Daemon;

/// Parses an option value: JSON when it starts with `{`, keyval otherwise, and
/// checks it against the schema type.
pub fn parse_option(
    daemon: &Daemon,
    value: &str,
    implied_key: Option<&str>,
    schema_type: Option<&str>,
) -> Result<Map<String, Value>, String> {
    // As QSD: JSON only when the very first character opens an object.
    let (parsed, mode) = if value.starts_with('{') {
        (qmp::json::from_str(value)?, qmp::InputMode::Json)
    } else {
        (
            Value::Object(crate::keyval::parse(value, implied_key)?),
            qmp::InputMode::Keyval,
        )
    };
    let checked = match schema_type {
        Some(t) => daemon.schema.visit_type(t, parsed, mode)?,
        None => parsed,
    };
    match checked {
        Value::Object(map) => Ok(map),
        _ => Err("Invalid parameter type, expected: object".into()),
    }
}

/// Applies one command-line option (everything but `--pidfile`).
pub fn apply_option(daemon: &mut Daemon, opt: &CliOption) -> Result<(), String> {
    match opt.kind {
        OptionKind::Blockdev => {
            let args = parse_option(daemon, &opt.value, Some("driver"), Some("BlockdevOptions"))?;
            daemon.blockdev_add(&args)
        }
        OptionKind::Export => {
            let args = parse_option(daemon, &opt.value, Some("type"), Some("BlockExportOptions"))?;
            daemon.block_export_add(&args)
        }
        OptionKind::NbdServer => {
            let args = parse_option(daemon, &opt.value, None, Some("NbdServerOptions"))?;
            daemon.nbd_server_start(&args)
        }
        OptionKind::Object => {
            let args = parse_option(daemon, &opt.value, Some("qom-type"), Some("ObjectOptions"))?;
            daemon.object_add(&args)
        }
        OptionKind::Chardev => {
            let args = parse_option(daemon, &opt.value, Some("backend"), None)?;
            daemon.add_chardev(&args)
        }
        OptionKind::Monitor => {
            let args = parse_option(daemon, &opt.value, Some("chardev"), None)?;
            daemon.add_monitor(&args)
        }
        OptionKind::Trace => {
            log::warn!("--trace is accepted but ignored; use RUST_LOG for logs");
            Ok(())
        }
        OptionKind::Pidfile => Ok(()),
    }
}

/// Builds the daemon from `options`, then serves until quit or a signal.
pub fn run(options: Vec<CliOption>, daemonize: bool) -> ExitCode {
    run_with(options, daemonize, false, false, |_| {})
}

/// [`run`], optionally exiting once the last NBD client has gone (qemu-nbd's
/// behaviour without `--persistent`).
/// `one_line`: the options were made by `blkd nbd`, so errors name the
/// cause alone, not the option string the user never wrote. `applied` runs
/// once the options have been applied, whether or not that succeeded (not
/// if the daemon could not even start).
pub fn run_with(
    options: Vec<CliOption>,
    daemonize: bool,
    exit_when_idle: bool,
    one_line: bool,
    applied: impl FnOnce(&Daemon),
) -> ExitCode {
    let status_pipe = if daemonize {
        match fork_into_background() {
            Background::Parent(code) => return code,
            Background::Child(pipe) => Some(pipe),
            Background::Failed(msg) => {
                eprintln!("blkd: {msg}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let report_failure = |msg: String, pipe: Option<OwnedFd>| -> ExitCode {
        match pipe {
            Some(fd) => {
                let mut f = std::fs::File::from(fd);
                let _ = f.write_all(msg.as_bytes());
            }
            None => eprintln!("{msg}"),
        }
        ExitCode::FAILURE
    };
    let mut daemon = match Daemon::new() {
        Ok(d) => d,
        Err(e) => return report_failure(format!("blkd: {e}"), status_pipe),
    };
    daemon.exit_when_nbd_idle = exit_when_idle;
    let mut failed = None;
    for opt in &options {
        if let Err(msg) = apply_option(&mut daemon, opt) {
            failed = Some((opt, msg));
            break;
        }
    }
    applied(&daemon);
    if let Some((opt, msg)) = failed {
        daemon.shutdown();
        let msg = if one_line {
            format!("blkd nbd: {msg}")
        } else {
            format!("blkd: {}: {msg}", opt.as_typed())
        };
        return report_failure(msg, status_pipe);
    }
    if let Some(opt) = options.iter().rev().find(|o| o.kind == OptionKind::Pidfile) {
        match crate::pidfile::Pidfile::create(&opt.value) {
            Ok(p) => daemon.pidfile = Some(p),
            Err(msg) => {
                daemon.shutdown();
                return report_failure(format!("blkd: {msg}"), status_pipe);
            }
        }
    }
    if let Some(fd) = status_pipe {
        finish_daemonizing(fd);
    }
    daemon.run();
    daemon.shutdown();
    ExitCode::SUCCESS
}

enum Background {
    Parent(ExitCode),
    Child(OwnedFd),
    Failed(String),
}

/// Forks; the parent waits until the child reports start-up done (an empty
/// message and a closed pipe) or failed (the error text), as QSD's
/// `--daemonize` does. Must run before any thread is started.
fn fork_into_background() -> Background {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array with two new fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Background::Failed(format!(
            "cannot create pipe: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: both fds were just created and are owned here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet, so the child is a complete copy.
    match unsafe { libc::fork() } {
        -1 => Background::Failed(format!("cannot fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop(read_end);
            // SAFETY: setsid has no preconditions in a fresh child.
            unsafe { libc::setsid() };
            Background::Child(write_end)
        }
        _ => {
            drop(write_end);
            let mut msg = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut msg);
            if msg.is_empty() {
                Background::Parent(ExitCode::SUCCESS)
            } else {
                eprintln!("{msg}");
                Background::Parent(ExitCode::FAILURE)
            }
        }
    }
}

/// Detaches from the terminal and tells the waiting parent start-up is done.
fn finish_daemonizing(status_pipe: OwnedFd) {
    let _ = std::env::set_current_dir("/");
    if let Ok(devnull) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for target in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors of this process.
            unsafe { libc::dup2(devnull.as_raw_fd(), target) };
        }
    }
    drop(status_pipe);
}
