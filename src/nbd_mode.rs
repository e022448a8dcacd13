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
                .help("write to a temporary qcow2 overlay on the image (in $TMPDIR, else /var/tmp; unlinked once open)"),
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

/// Fills in the drivers an `--image-opts` string leaves out below its top
/// node, as QEMU's bdrv_open probes them: a `file` child's protocol from its
/// filename, a `backing` child's format from its file's first bytes.
fn default_child_drivers(node: &mut serde_json::Map<String, serde_json::Value>) {
    use serde_json::Value;
    let filename_of = |node: &serde_json::Map<String, Value>| {
        node.get("filename")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    if let Some(Value::Object(file)) = node.get_mut("file") {
        if !file.contains_key("driver") {
            let driver = protocol_driver(&filename_of(file));
            file.insert("driver".into(), Value::from(driver));
        }
        default_child_drivers(file);
    }
    // The image's header decides its backing's format when it records one;
    // only then is the backing file probed.
    let recorded = match node.get("file") {
        Some(Value::Object(file)) => recorded_backing_format(&filename_of(file)),
        _ => None,
    };
    if let Some(Value::Object(backing)) = node.get_mut("backing") {
        default_child_drivers(backing);
        if !backing.contains_key("driver") {
            let filename = match backing.get("file") {
                Some(Value::Object(file)) => filename_of(file),
                _ => String::new(),
            };
            let format = recorded.unwrap_or_else(|| probe_format(&filename));
            backing.insert("driver".into(), Value::from(format));
        }
    }
}

/// The backing format a qcow2 image's header records (the 0xe2792aca
/// header extension), if `path` is such an image and records one.
fn recorded_backing_format(path: &str) -> Option<String> {
    const BACKING_FORMAT: u32 = 0xe279_2aca;
    let mut head = Vec::new();
    let file = std::fs::File::open(path).ok()?;
    std::io::Read::read_to_end(&mut std::io::Read::take(file, 65536), &mut head).ok()?;
    let be32 = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(head.get(at..at + 4)?.try_into().ok()?))
    };
    if head.get(..4) != Some(b"QFI\xfb") {
        return None;
    }
    // Extensions follow the header: 72 bytes in version 2, header_length in 3.
    let mut at = if be32(4)? == 2 {
        72
    } else {
        be32(100)? as usize
    };
    loop {
        let (kind, len) = (be32(at)?, be32(at + 4)? as usize);
        let data = head.get(at + 8..at + 8 + len)?;
        match kind {
            0 => return None,
            BACKING_FORMAT => return String::from_utf8(data.to_vec()).ok(),
            _ => at += 8 + len.next_multiple_of(8),
        }
    }
}

/// The protocol driver for `path`, as QEMU probes it: `host_device` for a
/// block or character device, else `file`.
fn protocol_driver(path: &str) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() || m.file_type().is_char_device() => "host_device",
        _ => "file",
    }
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
        /// The node whose format was probed as raw, to guard its first sector.
        probed_raw: Option<String>,
        /// `-s`: the overlay `options` open, to create before serving.
        snapshot: Option<Snapshot>,
    },
}

/// A temporary qcow2 overlay over the image (`-s`), as qemu-nbd's. The
/// image stays its own read-only node (its format as given or probed), and
/// the overlay names it as its backing node, so nothing in the image's bytes
/// can choose what lies under the overlay.
pub struct Snapshot {
    overlay: std::path::PathBuf,
    base: String,
    base_format: String,
}

impl Snapshot {
    /// Creates the overlay file (mode 0600), the size of the image.
    fn create(&self) -> Result<(), String> {
        use std::io::{Seek, SeekFrom};
        let base = &self.base;
        let mut file =
            std::fs::File::open(base).map_err(|e| format!("Could not open '{base}': {e}"))?;
        let size = if self.base_format == "qcow2" {
            // The magic, then the virtual size at bytes 24..32, big-endian.
            let mut header = [0u8; 32];
            std::io::Read::read_exact(&mut file, &mut header)
                .ok()
                .filter(|()| header[..4] == *b"QFI\xfb")
                .ok_or("Image is not in qcow2 format")?;
            u64::from_be_bytes(header[24..32].try_into().unwrap_or_default())
        } else {
            // Seeking works for block devices too, where the length is 0.
            file.seek(SeekFrom::End(0))
                .map_err(|e| format!("Could not open '{base}': {e}"))?
        };
        // Whole sectors, as QEMU sizes the image node: a qcow2 size rounds
        // down, a file's length up.
        let size = if self.base_format == "qcow2" {
            size & !511
        } else {
            size.div_ceil(512).saturating_mul(512)
        };
        let created = crate::block::qcow2::create(&self.overlay, size, None).and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.overlay, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("Could not create '{}': {e}", self.overlay.display()))
        });
        if created.is_err() {
            self.remove();
        }
        created
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.overlay);
    }
}

/// Removes the overlay, if any, when dropped.
struct RemoveOnDrop<'a>(Option<&'a Snapshot>);

impl RemoveOnDrop<'_> {
    fn remove(&self) {
        if let Some(s) = self.0 {
            s.remove();
        }
    }
}

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        self.remove();
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
    let (options, probed_raw) = options(&m, snapshot.as_ref())?;
    Ok(Invocation::Serve {
        options,
        probed_raw,
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
    let (digits, radix) = if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (hex, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        (&t[1..], 8)
    } else {
        (t, 10)
    };
    // Digits only: no second sign, no trailing garbage (QEMU's strtol
    // wrappers refuse both).
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let value = i128::from_str_radix(digits, radix).ok()?;
    Some(if negative { -value } else { value })
}

/// Where `-s` puts its overlay (`$TMPDIR`, else /var/tmp, as QEMU), and
/// what lies under it.
fn snapshot_plan(m: &clap::ArgMatches) -> Result<Option<Snapshot>, String> {
    if !m.get_flag("snapshot") {
        return Ok(None);
    }
    if m.get_flag("image-opts") {
        return Err("--snapshot with --image-opts is not supported".into());
    }
    let base = m.get_one::<String>("image").cloned().unwrap_or_default();
    let base_format = m
        .get_one::<String>("format")
        .cloned()
        .unwrap_or_else(|| probe_format(&base));
    // QEMU also takes /tmp to mean /var/tmp (images can be large).
    let dir = std::env::var_os("TMPDIR")
        .filter(|d| !d.is_empty() && d != "/tmp")
        .map_or_else(|| std::path::PathBuf::from("/var/tmp"), Into::into);
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let overlay = dir.join(format!("blkd-nbd-{}-{unique:09}.qcow2", std::process::id()));
    Ok(Some(Snapshot {
        overlay,
        base,
        base_format,
    }))
}

/// Translates the one-line form into the daemon's options; with `-s`, the
/// image node is `snapshot`'s overlay.
/// Also returns the image node's name if its format was probed as raw
/// (without `-s`: with it, clients write to the overlay, never the image).
fn options(
    m: &clap::ArgMatches,
    snapshot: Option<&Snapshot>,
) -> Result<(Vec<CliOption>, Option<String>), String> {
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
    let discard_value = discard;
    let discard = discard.map(|d| format!(",discard={d}")).unwrap_or_default();
    let detect_zeroes_value = detect_zeroes.clone();
    let detect_zeroes = detect_zeroes
        .map(|d| format!(",detect-zeroes={d}"))
        .unwrap_or_default();
    // As qemu-nbd: read as an unsigned 64-bit C integer (a minus sign
    // wraps), then handed on as a signed one.
    let offset = match get("offset") {
        Some(o) => {
            let wrapped = parse_c_integer(&o)
                .filter(|v| v.unsigned_abs() <= u128::from(u64::MAX))
                .map(|v| v.rem_euclid(1 << 64) as u64)
                .ok_or_else(|| format!("Invalid offset '{o}'"))?;
            let signed = wrapped as i64;
            if signed < 0 {
                return Err(format!(
                    "Value '{signed}' is out of range for parameter 'offset'"
                ));
            }
            wrapped
        }
        None => 0,
    };
    // As qemu-nbd, offset 0 adds no node.
    let offset = (offset > 0).then_some(offset);
    // The exported node takes detect-zeroes, as qemu-nbd's root node does.
    let (image_zeroes, offset_zeroes) = match offset {
        Some(_) => (String::new(), detect_zeroes),
        None => (detect_zeroes, String::new()),
    };
    let mut image_node = if m.get_flag("image-opts") {
        if get("format").is_some() {
            return Err("--image-opts and -f are mutually exclusive".into());
        }
        let detect_zeroes = detect_zeroes_value.as_deref().unwrap_or("off");
        image_opts_node(
            &image,
            &ImageDefaults {
                read_only,
                discard: discard_value,
                // With -o, the offset node on top is the exported one.
                detect_zeroes: offset.is_none().then_some(detect_zeroes),
                cache: &cache,
                aio: aio.as_deref(),
            },
        )?
    } else {
        let probed = get("format").is_none();
        let format = get("format").unwrap_or_else(|| probe_format(&image));
        let probed_raw = probed && format == "raw" && snapshot.is_none();
        // With -s, the image is the overlay's read-only backing node.
        let image_read_only = read_only || snapshot.is_some();
        let mut file = format!(
            "driver={},node-name=file0,filename={},read-only={}{discard}",
            protocol_driver(&image),
            escape(&image),
            on_off(image_read_only),
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
        match snapshot {
            Some(s) => {
                push(
                    OptionKind::Blockdev,
                    format!(
                        "driver={},node-name=base0,file=file0,read-only=on",
                        escape(&format)
                    ),
                );
                // As qemu-nbd's temporary overlay: cached, never flushed.
                push(
                    OptionKind::Blockdev,
                    format!(
                        "driver=file,node-name=overlay0,filename={},cache.no-flush=on{discard}",
                        escape(&s.overlay.display().to_string()),
                    ),
                );
                (
                    format!(
                        "driver=qcow2,node-name=disk0,file=overlay0,backing=base0,read-only={}{discard}{image_zeroes}",
                        on_off(read_only),
                    ),
                    "disk0".to_string(),
                    probed_raw,
                )
            }
            None => (
                format!(
                    "driver={},node-name=disk0,file=file0,read-only={}{discard}{image_zeroes}",
                    escape(&format),
                    on_off(read_only),
                ),
                "disk0".to_string(),
                probed_raw,
            ),
        }
    };
    let probed_raw = image_node.2.then(|| image_node.1.clone());
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
    Ok((opts, probed_raw))
}

/// What the command line gives an `--image-opts` node.
struct ImageDefaults<'a> {
    read_only: bool,
    discard: Option<&'a str>,
    /// Set whatever the string says (qemu-nbd sets it on the node it exports).
    detect_zeroes: Option<&'a str>,
    cache: &'a CacheChoice,
    aio: Option<&'a str>,
}

/// The image node from an `--image-opts` string, with what the command line
/// adds where the string is silent, as qemu-nbd opens it: a missing format
/// is probed and an inline `file` is a file or host device. Returns the node's options, its
/// name, and whether its format was probed as raw.
fn image_opts_node(image: &str, d: &ImageDefaults) -> Result<(String, String, bool), String> {
    use serde_json::Value;
    let mut map = crate::keyval::parse(image, None)?;
    let text = |v: &str| Value::String(v.to_string());
    // --aio belongs to the protocol node that does the I/O.
    let is_file = |node: &serde_json::Map<String, Value>| {
        matches!(
            node.get("driver").and_then(Value::as_str),
            Some("file" | "host_device")
        )
    };
    default_child_drivers(&mut map);
    if let Some(Value::Object(file)) = map.get_mut("file") {
        if let (Some(aio), true) = (d.aio, is_file(file)) {
            file.entry("aio").or_insert_with(|| text(aio));
        }
    } else if let (Some(aio), true) = (d.aio, is_file(&map)) {
        map.entry("aio").or_insert_with(|| text(aio));
    }
    let mut probed_raw = false;
    if !map.contains_key("driver") {
        let filename = map
            .get("file")
            .and_then(|f| f.get("filename"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let format = probe_format(filename);
        probed_raw = format == "raw";
        map.insert("driver".into(), text(&format));
    }
    let name = map
        .entry("node-name")
        .or_insert_with(|| text("disk0"))
        .as_str()
        .unwrap_or("disk0")
        .to_string();
    if d.read_only {
        map.entry("read-only").or_insert_with(|| text("on"));
    }
    if let Some(discard) = d.discard {
        map.entry("discard").or_insert_with(|| text(discard));
    }
    if let Some(zeroes) = d.detect_zeroes {
        map.insert("detect-zeroes".into(), text(zeroes));
    }
    let cache = map
        .entry("cache")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Value::Object(cache) = cache {
        for (key, on) in [("direct", d.cache.direct), ("no-flush", d.cache.no_flush)] {
            if on {
                cache.entry(key).or_insert_with(|| text("on"));
            }
        }
        if cache.is_empty() {
            map.remove("cache");
        }
    }
    Ok((keyval_string(&map, ""), name, probed_raw))
}

/// Options back in keyval form (`a.b=v,c=w`), commas in values doubled.
fn keyval_string(map: &serde_json::Map<String, serde_json::Value>, prefix: &str) -> String {
    let mut parts = Vec::new();
    for (key, value) in map {
        let key = format!("{prefix}{key}");
        match value {
            serde_json::Value::Object(inner) => {
                parts.push(keyval_string(inner, &format!("{key}.")))
            }
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let mut one = serde_json::Map::new();
                    one.insert(i.to_string(), item.clone());
                    parts.push(keyval_string(&one, &format!("{key}.")));
                }
            }
            serde_json::Value::String(v) => parts.push(format!("{key}={}", escape(v))),
            other => parts.push(format!("{key}={other}")),
        }
    }
    parts.retain(|p| !p.is_empty());
    parts.join(",")
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
            probed_raw,
            ..
        }) => {
            if let Some(node) = &probed_raw {
                log::warn!(
                    "the format of node '{node}' was probed as raw: writes that would give its \
                     first sector another format's header are refused (pass -f to allow them)"
                );
            }
            if let Some(s) = &snapshot {
                if let Err(msg) = s.create() {
                    eprintln!("blkd nbd: {msg}");
                    return ExitCode::FAILURE;
                }
            }
            // As qemu-nbd: the overlay's name goes once it is open. And
            // again on the way out (a panic too), for a start that failed
            // before that.
            let overlay = RemoveOnDrop(snapshot.as_ref());
            let applied = |daemon: &crate::daemon::Daemon| {
                overlay.remove();
                if let Some(node) = probed_raw.as_deref().and_then(|n| daemon.graph.get(n)) {
                    node.set_probed_raw();
                }
            };
            crate::startup::run_with(options, fork, !persistent, true, applied)
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
            "--blockdev driver=qcow2,node-name=img,file.filename=/i,file.driver=file,discard=ignore,read-only=on,detect-zeroes=on,cache.direct=on"
        );
        // As qemu-nbd: the command line's detect-zeroes (default off) wins,
        // a trailing comma is fine, --aio goes to the file, the format is probed.
        let probed = translate(&[
            "--aio=threads",
            "--image-opts",
            "file.filename=/nonexistent,,x,detect-zeroes=on,",
        ])
        .unwrap();
        assert_eq!(
            probed[0],
            "--blockdev file.filename=/nonexistent,,x,file.driver=file,file.aio=threads,detect-zeroes=off,driver=raw,node-name=disk0"
        );
        assert!(values[2].contains(",node-name=img,"), "{values:?}");
        // Drivers a nested backing leaves out are probed too.
        let nested = translate(&[
            "--image-opts",
            "driver=qcow2,file.filename=/i,backing.file.filename=/b",
        ])
        .unwrap();
        assert!(
            nested[0]
                .contains("backing.file.filename=/b,backing.file.driver=file,backing.driver=raw"),
            "{nested:?}"
        );
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
            (
                &["-o", "-1", "/i"][..],
                "Value '-1' is out of range for parameter 'offset'",
            ),
            (&["-o", "0x+5", "/i"][..], "Invalid offset '0x+5'"),
            (
                &["-o", "-0x200", "/i"][..],
                "Value '-512' is out of range for parameter 'offset'",
            ),
            (
                &["-o", "18446744073709551615", "/i"][..],
                "Value '-1' is out of range for parameter 'offset'",
            ),
            (
                &["-o", "0x8000000000000000", "/i"][..],
                "Value '-9223372036854775808' is out of range for parameter 'offset'",
            ),
            (
                &["-o", "18446744073709551616", "/i"][..],
                "Invalid offset '18446744073709551616'",
            ),
        ] {
            assert_eq!(translate(args).unwrap_err(), error, "{args:?}");
        }
    }

    #[test]
    fn snapshot_puts_an_overlay_on_the_read_only_image_node() {
        let values = translate(&["-s", "-f", "raw", "-n", "/i"]).unwrap();
        assert_eq!(
            values[0],
            "--blockdev driver=file,node-name=file0,filename=/i,read-only=on,cache.direct=on"
        );
        assert_eq!(
            values[1],
            "--blockdev driver=raw,node-name=base0,file=file0,read-only=on"
        );
        assert!(
            values[2].starts_with("--blockdev driver=file,node-name=overlay0,filename=")
                && values[2].ends_with(".qcow2,cache.no-flush=on"),
            "{values:?}"
        );
        assert_eq!(
            values[3],
            "--blockdev driver=qcow2,node-name=disk0,file=overlay0,backing=base0,read-only=off"
        );
        assert_eq!(
            translate(&["-s", "--image-opts", "driver=raw"]).unwrap_err(),
            "--snapshot with --image-opts is not supported"
        );
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
