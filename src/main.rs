//! blkd: a block storage daemon that exports block nodes over vhost-user-blk and
//! NBD and is managed over QMP, with qemu-storage-daemon's command line.

mod bitmaps;
mod block;
mod cli;
mod commands;
mod daemon;
mod demo;
mod export;
mod graph;
mod iothread;
mod keyval;
mod nbd_mode;
mod nbd_server;
mod pidfile;
mod startup;
mod tls;

use std::process::ExitCode;

use serde_json::{json, Value};

/// What `query-version` and the QMP greeting report. blkd speaks the QMP of
/// the qemu-storage-daemon release it is compatible with.
pub fn version_info() -> Value {
    json!({
        "qemu": {"micro": 2, "minor": 0, "major": 10},
        "package": concat!("blkd ", env!("CARGO_PKG_VERSION")),
    })
}

/// An error's text as C's strerror prints it (QEMU's messages embed it).
pub fn errno_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => {
            // SAFETY: strerror returns a pointer to a static, NUL-terminated string.
            let text = unsafe { std::ffi::CStr::from_ptr(libc::strerror(errno)) };
            text.to_string_lossy().into_owned()
        }
        None => e.to_string(),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `blkd nbd -v`: log at info level (client connections among it) unless RUST_LOG says otherwise.
    let verbose = args.first().is_some_and(|a| a == "nbd") && nbd_mode::verbose(&args[1..]);
    let default_level = if verbose { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
        .format_timestamp_micros()
        .init();
    match args.first().map(String::as_str) {
        Some("demo") => return demo::run(&args[1..]),
        Some("nbd") => return nbd_mode::run(&args[1..]),
        _ => {}
    }
    match cli::parse(&args) {
        Ok(cli::Invocation::Help) => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Ok(cli::Invocation::Version) => {
            println!(
                "blkd version {} (qemu-storage-daemon 10.0.2 compatible)",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::SUCCESS
        }
        Ok(cli::Invocation::Run { options, daemonize }) => startup::run(options, daemonize),
        Err(msg) => {
            eprintln!("blkd: {msg}");
            ExitCode::FAILURE
        }
    }
}
