//! `blkd nbd`: one image over NBD in one command, for tools that would
//! otherwise spawn qemu-nbd. It takes qemu-nbd's common options and builds the
//! same daemon the long command line would.

use std::process::ExitCode;

use clap::{Arg, ArgAction, Command};

use crate::cli::{CliOption, OptionKind};

fn command() -> Command {
    Command::new("blkd nbd")
        .about("Export one disk image over NBD (qemu-nbd style)")
        .no_binary_name(true)
        .arg(
            Arg::new("read-only")
                .short('r')
                .long("read-only")
                .action(ArgAction::SetTrue)
                .help("export read-only"),
        )
        .arg(
            Arg::new("allocation-depth")
                .short('A')
                .long("allocation-depth")
                .action(ArgAction::SetTrue)
                .help("expose the qemu:allocation-depth metadata context"),
        )
        .arg(
            Arg::new("bitmap")
                .short('B')
                .long("bitmap")
                .action(ArgAction::Append)
                .help("expose a dirty bitmap as qemu:dirty-bitmap:NAME"),
        )
        .arg(
            Arg::new("export-name")
                .short('x')
                .long("export-name")
                .help("export name (default: the empty name)"),
        )
        .arg(
            Arg::new("description")
                .short('D')
                .long("description")
                .help("export description"),
        )
        .arg(
            Arg::new("format")
                .short('f')
                .long("format")
                .help("image format: raw or qcow2 (default: probed)"),
        )
        .arg(
            Arg::new("socket")
                .short('k')
                .long("socket")
                .help("serve on this unix socket"),
        )
        .arg(
            Arg::new("bind")
                .short('b')
                .long("bind")
                .help("TCP address to bind (default 0.0.0.0)"),
        )
        .arg(
            Arg::new("port")
                .short('p')
                .long("port")
                .help("TCP port (default 10809)"),
        )
        .arg(
            Arg::new("shared")
                .short('e')
                .long("shared")
                .help("most clients at once (default 1; 0 for no limit)"),
        )
        .arg(
            Arg::new("persistent")
                .short('t')
                .long("persistent")
                .action(ArgAction::SetTrue)
                .help("keep serving after the last client disconnects"),
        )
        .arg(
            Arg::new("pid-file")
                .long("pid-file")
                .help("write the PID to this file"),
        )
        .arg(
            Arg::new("fork")
                .long("fork")
                .action(ArgAction::SetTrue)
                .help("go to the background once the server is ready"),
        )
        .arg(Arg::new("image").required(true).help("the image file"))
}

/// `,` is keyval's separator: double it inside values.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// qcow2 images start with "QFI\xfb"; anything else is raw.
fn probe_format(path: &str) -> String {
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && magic == *b"QFI\xfb";
    if is_qcow2 { "qcow2" } else { "raw" }.to_string()
}

/// Translates the one-line form into the daemon's options.
pub fn options(args: &[String]) -> Result<(Vec<CliOption>, bool), String> {
    let m = command()
        .try_get_matches_from(args)
        .map_err(|e| e.to_string())?;
    let get = |k: &str| m.get_one::<String>(k).cloned();
    let image = get("image").unwrap_or_default();
    let read_only = m.get_flag("read-only");
    let format = get("format").unwrap_or_else(|| probe_format(&image));
    let mut opts = Vec::new();
    let mut push = |kind, value: String| opts.push(CliOption { kind, value });
    push(
        OptionKind::Blockdev,
        format!(
            "driver=file,node-name=file0,filename={},read-only={}",
            escape(&image),
            if read_only { "on" } else { "off" }
        ),
    );
    push(
        OptionKind::Blockdev,
        format!(
            "driver={},node-name=disk0,file=file0,read-only={}",
            escape(&format),
            if read_only { "on" } else { "off" }
        ),
    );
    let shared: u32 = get("shared")
        .map(|s| {
            s.parse()
                .map_err(|_| format!("Invalid shared device number '{s}'"))
        })
        .transpose()?
        .unwrap_or(1);
    let addr = if let Some(sock) = get("socket") {
        format!("addr.type=unix,addr.path={}", escape(&sock))
    } else if get("bind").is_none() && get("port").is_none() && socket_activated() {
        // systemd-style socket activation, as libnbd's `[ qemu-nbd ... ]` uses.
        "addr.type=fd,addr.str=3".to_string()
    } else {
        format!(
            "addr.type=inet,addr.host={},addr.port={}",
            escape(&get("bind").unwrap_or_else(|| "0.0.0.0".into())),
            escape(&get("port").unwrap_or_else(|| "10809".into()))
        )
    };
    push(
        OptionKind::NbdServer,
        format!("{addr},max-connections={shared}"),
    );
    let mut export = format!(
        "type=nbd,id=export0,node-name=disk0,name={},writable={}",
        escape(&get("export-name").unwrap_or_default()),
        if read_only { "off" } else { "on" }
    );
    if let Some(d) = get("description") {
        export.push_str(&format!(",description={}", escape(&d)));
    }
    if m.get_flag("allocation-depth") {
        export.push_str(",allocation-depth=on");
    }
    if let Some(bitmaps) = m.get_many::<String>("bitmap") {
        for (i, b) in bitmaps.enumerate() {
            export.push_str(&format!(",bitmaps.{i}={}", escape(b)));
        }
    }
    push(OptionKind::Export, export);
    if let Some(p) = get("pid-file") {
        push(OptionKind::Pidfile, p);
    }
    Ok((opts, m.get_flag("persistent")))
}

fn socket_activated() -> bool {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let fds_ok = std::env::var("LISTEN_FDS").ok().as_deref() == Some("1");
    pid_ok && fds_ok
}

pub fn run(args: &[String]) -> ExitCode {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        let _ = command().print_help();
        return ExitCode::SUCCESS;
    }
    match options(args) {
        Ok((opts, persistent)) => {
            let fork = args.iter().any(|a| a == "--fork");
            crate::startup::run_with(opts, fork, !persistent)
        }
        Err(msg) => {
            eprintln!("blkd nbd: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_qemu_nbd_style_arguments() {
        let args: Vec<String> = [
            "-r",
            "-A",
            "-B",
            "b0",
            "-x",
            "e,x",
            "-f",
            "raw",
            "-k",
            "/t/s.sock",
            "/img,1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (opts, persistent) = options(&args).unwrap();
        assert!(!persistent);
        let values: Vec<_> = opts.iter().map(|o| o.as_typed()).collect();
        assert_eq!(
            values,
            [
                "--blockdev driver=file,node-name=file0,filename=/img,,1,read-only=on",
                "--blockdev driver=raw,node-name=disk0,file=file0,read-only=on",
                "--nbd-server addr.type=unix,addr.path=/t/s.sock,max-connections=1",
                "--export type=nbd,id=export0,node-name=disk0,name=e,,x,writable=off,allocation-depth=on,bitmaps.0=b0",
            ]
        );
    }
}
