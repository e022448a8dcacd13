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
        // As qemu-nbd: a repeated option's last value wins.
        .args_override_self(true)
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
        .arg(
            Arg::new("offset")
                .short('o')
                .long("offset")
                .help("export the image from this byte offset on"),
        )
        .arg(
            Arg::new("snapshot")
                .short('s')
                .long("snapshot")
                .action(ArgAction::SetTrue)
                .help("write to a temporary qcow2 overlay on the image, deleted on exit"),
        )
        .arg(
            Arg::new("image-opts")
                .long("image-opts")
                .action(ArgAction::SetTrue)
                .help("the image argument is a --blockdev option string, not a file name"),
        )
        .arg(
            Arg::new("handshake-limit")
                .long("handshake-limit")
                .help("drop clients that have not finished the handshake after N seconds (default 10; 0 for never)"),
        )
        .arg(
            Arg::new("cache")
                .long("cache")
                .action(ArgAction::Append)
                .help("cache mode: none, writeback (default), writethrough, directsync or unsafe"),
        )
        .arg(
            Arg::new("nocache")
                .short('n')
                .long("nocache")
                .action(ArgAction::Count)
                .help("bypass the host page cache (--cache=none)"),
        )
        .arg(
            Arg::new("aio")
                .long("aio")
                .action(ArgAction::Append)
                .help("AIO mode: threads (native and io_uring are refused, as by --blockdev)"),
        )
        .arg(
            Arg::new("discard")
                .long("discard")
                .action(ArgAction::Append)
                .help("discard mode: ignore (default) or unmap"),
        )
        .arg(
            Arg::new("detect-zeroes")
                .long("detect-zeroes")
                .help("write all-zero data as zeroes: off (default), on or unmap"),
        )
        .arg(
            Arg::new("object")
                .long("object")
                .action(ArgAction::Append)
                .help("define an object, such as tls-creds-x509 or authz-simple"),
        )
        .arg(
            Arg::new("tls-creds")
                .long("tls-creds")
                .help("require TLS, with the credentials object of this id"),
        )
        .arg(
            Arg::new("tls-authz")
                .long("tls-authz")
                .help("authorise TLS clients with the authz object of this id"),
        )
        .arg(
            Arg::new("verbose")
                .short('v')
                .long("verbose")
                .action(ArgAction::SetTrue)
                .help("log at info level, client connections among it (as RUST_LOG=info)"),
        )
        .arg(
            Arg::new("version")
                .short('V')
                .long("version")
                .action(ArgAction::SetTrue)
                .help("print the version and exit"),
        )
        .arg(Arg::new("image").required_unless_present("version").help("the image file"))
        // As getopt: an option's value may start with '-' (`-x -v`, `-o -1`).
        .mut_args(|a| {
            if a.get_action().takes_values() && !a.is_positional() {
                a.allow_hyphen_values(true)
            } else {
                a
            }
        })
}

/// What qemu-nbd's `--cache` modes mean for the file node and the export.
struct CacheChoice {
    direct: bool,
    no_flush: bool,
    writethrough: bool,
}

fn cache_choice(mode: &str) -> Result<CacheChoice, String> {
    let (direct, no_flush, writethrough) = match mode {
        "none" | "off" => (true, false, false),
        "writeback" => (false, false, false),
        "writethrough" => (false, false, true),
        "directsync" => (true, false, true),
        "unsafe" => (false, true, false),
        _ => return Err(format!("Invalid cache mode `{mode}'")),
    };
    Ok(CacheChoice {
        direct,
        no_flush,
        writethrough,
    })
}

/// `value` if it is one of `allowed`, else the error `invalid` makes of it.
fn one_of(
    value: Option<String>,
    allowed: &[&str],
    invalid: impl Fn(&str) -> String,
) -> Result<Option<String>, String> {
    match value {
        Some(v) if !allowed.contains(&v.as_str()) => Err(invalid(&v)),
        v => Ok(v),
    }
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

/// What a `blkd nbd` command line asks for.
pub enum Invocation {
    Help,
    Version,
    Serve {
        options: Vec<CliOption>,
        /// Keep serving after the last client leaves.
        persistent: bool,
        fork: bool,
        verbose: bool,
        /// `-s`: the overlay `options` open, to create before serving.
        snapshot: Option<Snapshot>,
    },
}

/// A temporary qcow2 overlay over the image (`-s`), as qemu-nbd's.
pub struct Snapshot {
    overlay: std::path::PathBuf,
    base: std::path::PathBuf,
    base_format: String,
}

impl Snapshot {
    /// Creates the overlay file, the size of the image it lies over.
    fn create(&self) -> Result<(), String> {
        let base = &self.base;
        let size = if self.base_format == "qcow2" {
            // The virtual size: header bytes 24..32, big-endian.
            let mut size = [0u8; 8];
            std::fs::File::open(base)
                .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut size, 24))
                .map_err(|e| format!("Could not open '{}': {e}", base.display()))?;
            u64::from_be_bytes(size)
        } else {
            std::fs::metadata(base)
                .map_err(|e| format!("Could not open '{}': {e}", base.display()))?
                .len()
        };
        crate::block::qcow2::create(&self.overlay, size, base.to_str())
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.overlay);
    }
}

/// Parses the one-line form.
pub fn parse(args: &[String]) -> Result<Invocation, String> {
    let m = match command().try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => return Ok(Invocation::Help),
        Err(e) => return Err(e.to_string()),
    };
    if m.get_flag("version") {
        return Ok(Invocation::Version);
    }
    let snapshot = snapshot_plan(&m)?;
    Ok(Invocation::Serve {
        options: options(&m, snapshot.as_ref())?,
        snapshot,
        persistent: m.get_flag("persistent"),
        fork: m.get_flag("fork"),
        verbose: m.get_flag("verbose"),
    })
}

/// The value of an option qemu-nbd takes only once.
fn once(m: &clap::ArgMatches, key: &str, error: &str) -> Result<Option<String>, String> {
    let mut values = m.get_many::<String>(key).into_iter().flatten();
    let first = values.next().cloned();
    match values.next() {
        Some(_) => Err(error.to_string()),
        None => Ok(first),
    }
}

/// A C `int` as qemu-nbd reads it (strtol base 0: decimal, 0x hex or 0 octal).
fn parse_c_int(text: &str) -> Option<i32> {
    parse_c_integer(text).and_then(|v| i32::try_from(v).ok())
}

fn parse_c_integer(text: &str) -> Option<i128> {
    let t = text.trim_start();
    let (negative, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if t.starts_with(['+', '-']) {
        return None;
    }
    let value = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i128::from_str_radix(hex, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        i128::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse::<i128>().ok()?
    };
    Some(if negative { -value } else { value })
}

/// Translates the one-line form into the daemon's options.
/// Where `-s` puts its overlay, and what lies under it.
fn snapshot_plan(m: &clap::ArgMatches) -> Result<Option<Snapshot>, String> {
    if !m.get_flag("snapshot") {
        return Ok(None);
    }
    if m.get_flag("image-opts") {
        return Err("--snapshot with --image-opts is not supported".into());
    }
    let image = m.get_one::<String>("image").cloned().unwrap_or_default();
    let base = std::path::absolute(&image).map_err(|e| format!("Could not open '{image}': {e}"))?;
    let base_format = m
        .get_one::<String>("format")
        .cloned()
        .unwrap_or_else(|| probe_format(&image));
    if !matches!(base_format.as_str(), "raw" | "qcow2") {
        return Err(format!("Unknown driver '{base_format}'"));
    }
    let overlay = std::env::temp_dir().join(format!("blkd-nbd-{}.qcow2", std::process::id()));
    Ok(Some(Snapshot {
        overlay,
        base,
        base_format,
    }))
}

/// Translates the one-line form into the daemon's options; with `-s`, the
/// image node is `snapshot`'s overlay.
fn options(m: &clap::ArgMatches, snapshot: Option<&Snapshot>) -> Result<Vec<CliOption>, String> {
    let get = |k: &str| m.get_one::<String>(k).cloned();
    let image = get("image").unwrap_or_default();
    let read_only = m.get_flag("read-only");
    const CACHE_TWICE: &str = "-n and --cache can only be specified once";
    let cache = match (once(m, "cache", CACHE_TWICE)?, m.get_count("nocache")) {
        (Some(_), 1..) | (None, 2..) => return Err(CACHE_TWICE.into()),
        (Some(mode), 0) => cache_choice(&mode)?,
        (None, 1) => cache_choice("none")?,
        (None, 0) => cache_choice("writeback")?,
    };
    let on_off = |b: bool| if b { "on" } else { "off" };
    let aio = once(m, "aio", "--aio can only be specified once")?;
    let aio = one_of(aio, &["threads", "native", "io_uring"], |v| {
        format!("Invalid aio mode '{v}'")
    })?;
    let discard = once(m, "discard", "--discard can only be specified once")?;
    let discard = one_of(discard, &["ignore", "off", "unmap", "on"], |v| {
        format!("Invalid discard mode `{v}'")
    })?
    .map(|d| match d.as_str() {
        "on" | "unmap" => "unmap",
        _ => "ignore",
    });
    let detect_zeroes = one_of(get("detect-zeroes"), &["off", "on", "unmap"], |v| {
        format!("Failed to parse detect_zeroes mode: invalid parameter value: {v}")
    })?;
    if detect_zeroes.as_deref() == Some("unmap") && discard != Some("unmap") {
        return Err(
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
                .into(),
        );
    }
    if get("tls-authz").is_some() && get("tls-creds").is_none() {
        return Err("--tls-authz is not permitted without --tls-creds".into());
    }
    let mut opts = Vec::new();
    let mut push = |kind, value: String| opts.push(CliOption { kind, value });
    if let Some(objects) = m.get_many::<String>("object") {
        for o in objects {
            push(OptionKind::Object, o.clone());
        }
    }
    // Both nodes get the mode: the top node's decides whether discards reach
    // the file, and the file node's whether they unmap there.
    let discard = discard.map(|d| format!(",discard={d}")).unwrap_or_default();
    let detect_zeroes = detect_zeroes
        .map(|d| format!(",detect-zeroes={d}"))
        .unwrap_or_default();
    let offset = match get("offset") {
        Some(o) => Some(
            parse_c_integer(&o)
                .and_then(|v| u64::try_from(v).ok())
                .ok_or_else(|| format!("Invalid offset '{o}'"))?,
        ),
        None => None,
    };
    // The exported node takes detect-zeroes, as qemu-nbd's root node does.
    let (image_zeroes, offset_zeroes) = match offset {
        Some(_) => (String::new(), detect_zeroes),
        None => (detect_zeroes, String::new()),
    };
    let mut image_node = if m.get_flag("image-opts") {
        if get("format").is_some() {
            return Err("--image-opts and -f are mutually exclusive".into());
        }
        let mut cache_opts = String::new();
        if cache.direct {
            cache_opts.push_str(",cache.direct=on");
        }
        if cache.no_flush {
            cache_opts.push_str(",cache.no-flush=on");
        }
        image_opts_node(
            &image,
            read_only,
            &[discard.as_str(), &image_zeroes, &cache_opts],
        )?
    } else {
        let (path, format) = match snapshot {
            Some(s) => (s.overlay.display().to_string(), "qcow2".to_string()),
            None => (
                image.clone(),
                get("format").unwrap_or_else(|| probe_format(&image)),
            ),
        };
        let mut file = format!(
            "driver=file,node-name=file0,filename={},read-only={}{discard}",
            escape(&path),
            on_off(read_only),
        );
        if cache.direct {
            file.push_str(",cache.direct=on");
        }
        if cache.no_flush {
            file.push_str(",cache.no-flush=on");
        }
        if let Some(aio) = aio {
            file.push_str(&format!(",aio={aio}"));
        }
        push(OptionKind::Blockdev, file);
        (
            format!(
                "driver={},node-name=disk0,file=file0,read-only={}{discard}{image_zeroes}",
                escape(&format),
                on_off(read_only),
            ),
            "disk0".to_string(),
        )
    };
    push(OptionKind::Blockdev, image_node.0.clone());
    if let Some(offset) = offset {
        // As qemu-nbd: a raw node with the offset on top of the image.
        push(
            OptionKind::Blockdev,
            format!(
                "driver=raw,node-name=offset0,file={},offset={offset},read-only={}{discard}{offset_zeroes}",
                escape(&image_node.1),
                on_off(read_only),
            ),
        );
        image_node.1 = "offset0".into();
    }
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
    let mut server = format!("{addr},max-connections={shared}");
    if let Some(limit) = get("handshake-limit") {
        let secs = parse_c_int(&limit)
            .filter(|s| *s >= 0)
            .ok_or_else(|| format!("Invalid handshake limit '{limit}'"))?;
        server.push_str(&format!(",handshake-max-seconds={secs}"));
    }
    for key in ["tls-creds", "tls-authz"] {
        if let Some(id) = get(key) {
            server.push_str(&format!(",{key}={}", escape(&id)));
        }
    }
    push(OptionKind::NbdServer, server);
    let mut export = format!(
        "type=nbd,id=export0,node-name={},name={},writable={}",
        escape(&image_node.1),
        escape(&get("export-name").unwrap_or_default()),
        on_off(!read_only)
    );
    if cache.writethrough {
        export.push_str(",writethrough=on");
    }
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
    Ok(opts)
}

/// The image node from an `--image-opts` string: its options, plus the
/// command line's where the string does not set them; and its node name.
fn image_opts_node(
    image: &str,
    read_only: bool,
    extra: &[&str],
) -> Result<(String, String), String> {
    let given = crate::keyval::parse(image, None)?;
    let mut opts = image.to_string();
    let name = match given.get("node-name").and_then(serde_json::Value::as_str) {
        Some(name) => name.to_string(),
        None => {
            opts.push_str(",node-name=disk0");
            "disk0".to_string()
        }
    };
    if read_only && !given.contains_key("read-only") {
        opts.push_str(",read-only=on");
    }
    // Each extra is empty or ",key=value" (keys under "cache." count as "cache").
    for option in extra {
        let key = option
            .trim_start_matches(',')
            .split(['=', '.'])
            .next()
            .unwrap_or_default();
        if !key.is_empty() && !given.contains_key(key) {
            opts.push_str(option);
        }
    }
    Ok((opts, name))
}

fn socket_activated() -> bool {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let fds_ok = std::env::var("LISTEN_FDS").ok().as_deref() == Some("1");
    pid_ok && fds_ok
}

/// Whether the command line asks for `-v` (read before logging starts).
pub fn verbose(args: &[String]) -> bool {
    matches!(parse(args), Ok(Invocation::Serve { verbose: true, .. }))
}

pub fn run(args: &[String]) -> ExitCode {
    match parse(args) {
        Ok(Invocation::Help) => {
            let _ = command().print_help();
            ExitCode::SUCCESS
        }
        Ok(Invocation::Version) => {
            println!("blkd nbd {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Invocation::Serve {
            options,
            persistent,
            fork,
            snapshot,
            ..
        }) => {
            if let Some(s) = &snapshot {
                if let Err(msg) = s.create() {
                    eprintln!("blkd nbd: {msg}");
                    return ExitCode::FAILURE;
                }
            }
            // As qemu-nbd: the overlay's name goes once it is open, so
            // nothing is left behind however the server ends.
            let remove = || {
                if let Some(s) = &snapshot {
                    s.remove();
                }
            };
            crate::startup::run_with(options, fork, !persistent, true, remove)
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

    fn serve(args: &[&str]) -> Result<(Vec<CliOption>, bool), String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match parse(&args)? {
            Invocation::Serve {
                options,
                persistent,
                ..
            } => Ok((options, persistent)),
            _ => Err("not a serving command line".into()),
        }
    }

    fn translate(args: &[&str]) -> Result<Vec<String>, String> {
        serve(args).map(|(opts, _)| opts.iter().map(|o| o.as_typed()).collect())
    }

    #[test]
    fn translates_cache_discard_zeroes_tls_and_handshake_options() {
        let values = translate(&[
            "--object",
            "tls-creds-x509,id=t0,dir=/c,endpoint=server",
            "--object",
            "authz-simple,id=a0,identity=CN=x",
            "--tls-creds",
            "t0",
            "--tls-authz",
            "a0",
            "--cache=directsync",
            "--aio=threads",
            "--discard=on",
            "--detect-zeroes=unmap",
            "--handshake-limit=3",
            "-p",
            "10810",
            "-f",
            "raw",
            "/img",
        ])
        .unwrap();
        assert_eq!(
            values,
            [
                "--object tls-creds-x509,id=t0,dir=/c,endpoint=server",
                "--object authz-simple,id=a0,identity=CN=x",
                "--blockdev driver=file,node-name=file0,filename=/img,read-only=off,discard=unmap,cache.direct=on,aio=threads",
                "--blockdev driver=raw,node-name=disk0,file=file0,read-only=off,discard=unmap,detect-zeroes=unmap",
                "--nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10810,max-connections=1,handshake-max-seconds=3,tls-creds=t0,tls-authz=a0",
                "--export type=nbd,id=export0,node-name=disk0,name=,writable=on,writethrough=on",
            ]
        );
        let file_node = |args: &[&str]| translate(args).unwrap()[0].clone();
        assert!(file_node(&["-n", "-f", "raw", "/i"]).ends_with(",cache.direct=on"));
        assert!(file_node(&["--cache=unsafe", "-f", "raw", "/i"]).ends_with(",cache.no-flush=on"));
        let export = translate(&["--cache=writethrough", "-f", "raw", "/i"]).unwrap()[3].clone();
        assert!(export.ends_with(",writethrough=on"), "{export}");
    }

    #[test]
    fn version_verbose_and_repeats_as_qemu_nbd() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Short options cluster; -V needs no image.
        assert!(matches!(parse(&args(&["-tV"])), Ok(Invocation::Version)));
        assert!(matches!(parse(&args(&["--help"])), Ok(Invocation::Help)));
        assert!(verbose(&args(&["-vt", "-f", "raw", "/i"])));
        // An export named "-v" is not a request for verbosity.
        assert!(!verbose(&args(&["-x", "-v", "-f", "raw", "/i"])));
        let values = translate(&["-x", "-v", "-f", "raw", "/i"]).unwrap();
        assert!(values[3].contains(",name=-v,"), "{values:?}");
        // Most options may repeat; the last value wins.
        let values = translate(&["-x", "a", "-x", "b", "-f", "raw", "/i"]).unwrap();
        assert!(values[3].contains(",name=b,"), "{values:?}");
        assert_eq!(
            translate(&["--handshake-limit=0x10", "-f", "raw", "/i"]).unwrap()[2],
            "--nbd-server addr.type=inet,addr.host=0.0.0.0,addr.port=10809,max-connections=1,handshake-max-seconds=16"
        );
        assert!(
            translate(&["--handshake-limit= 010", "-f", "raw", "/i"]).unwrap()[2]
                .ends_with("handshake-max-seconds=8")
        );
        for (args, error) in [
            (
                &["--aio=threads", "--aio=threads"][..],
                "--aio can only be specified once",
            ),
            (
                &["--discard=on", "--discard=on"][..],
                "--discard can only be specified once",
            ),
            (
                &["--cache=none", "--cache=none"][..],
                "-n and --cache can only be specified once",
            ),
            (
                &["-n", "-n"][..],
                "-n and --cache can only be specified once",
            ),
            (
                &["--handshake-limit=99999999999"][..],
                "Invalid handshake limit '99999999999'",
            ),
            (
                &["--handshake-limit=-1"][..],
                "Invalid handshake limit '-1'",
            ),
        ] {
            let mut args = args.to_vec();
            args.extend(["-f", "raw", "/i"]);
            assert_eq!(translate(&args).unwrap_err(), error, "{args:?}");
        }
    }

    #[test]
    fn image_opts_keep_their_own_settings_and_offsets_stack_a_raw_node() {
        let values = translate(&[
            "-r",
            "--discard=unmap",
            "--detect-zeroes=on",
            "-n",
            "--image-opts",
            "driver=qcow2,node-name=img,file.filename=/i,discard=ignore",
        ])
        .unwrap();
        assert_eq!(
            values[0],
            "--blockdev driver=qcow2,node-name=img,file.filename=/i,discard=ignore,read-only=on,detect-zeroes=on,cache.direct=on"
        );
        assert!(values[2].contains(",node-name=img,"), "{values:?}");
        let values = translate(&["-o", "0x200", "--detect-zeroes=on", "-f", "raw", "/i"]).unwrap();
        assert_eq!(
            values[2],
            "--blockdev driver=raw,node-name=offset0,file=disk0,offset=512,read-only=off,detect-zeroes=on"
        );
        assert!(!values[1].contains("detect-zeroes"), "{values:?}");
        assert!(values[4].contains(",node-name=offset0,"), "{values:?}");
        for (args, error) in [
            (
                &["--image-opts", "-f", "raw", "driver=raw"][..],
                "--image-opts and -f are mutually exclusive",
            ),
            (&["-o", "x", "/i"][..], "Invalid offset 'x'"),
            (&["-o", "-1", "/i"][..], "Invalid offset '-1'"),
        ] {
            assert_eq!(translate(args).unwrap_err(), error, "{args:?}");
        }
    }

    #[test]
    fn refuses_what_qemu_nbd_refuses_with_its_texts() {
        let cases: [(&[&str], &str); 7] = [
            (&["--cache=bad"], "Invalid cache mode `bad'"),
            (&["-n", "--cache=none"], "-n and --cache can only be specified once"),
            (&["--aio=bad"], "Invalid aio mode 'bad'"),
            (&["--discard=bad"], "Invalid discard mode `bad'"),
            (
                &["--detect-zeroes=bad"],
                "Failed to parse detect_zeroes mode: invalid parameter value: bad",
            ),
            (
                &["--detect-zeroes=unmap"],
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
            ),
            (&["--tls-authz=a0"], "--tls-authz is not permitted without --tls-creds"),
        ];
        for (args, error) in cases {
            let mut args = args.to_vec();
            args.extend(["-f", "raw", "/i"]);
            assert_eq!(translate(&args).unwrap_err(), error, "{args:?}");
        }
        assert_eq!(
            translate(&["--handshake-limit=x", "-f", "raw", "/i"]).unwrap_err(),
            "Invalid handshake limit 'x'"
        );
    }

    #[test]
    fn translates_qemu_nbd_style_arguments() {
        let (opts, persistent) = serve(&[
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
        ])
        .unwrap();
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
