//! qemu-storage-daemon's command line: options taken in the order given.
//!
//! clap splits the arguments; each option's value is then parsed by the keyval
//! parser and checked against the schema when it is applied (see `daemon.rs`).

use clap::{Arg, ArgAction, Command};

/// One option of the daemon's command line, in the order it was typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CliOption {
    pub kind: OptionKind,
    pub value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionKind {
    Blockdev,
    Chardev,
    Export,
    Monitor,
    NbdServer,
    Object,
    Pidfile,
    Trace,
}

impl OptionKind {
    const ALL: [OptionKind; 8] = [
        OptionKind::Blockdev,
        OptionKind::Chardev,
        OptionKind::Export,
        OptionKind::Monitor,
        OptionKind::NbdServer,
        OptionKind::Object,
        OptionKind::Pidfile,
        OptionKind::Trace,
    ];

    pub fn long(self) -> &'static str {
        match self {
            OptionKind::Blockdev => "blockdev",
            OptionKind::Chardev => "chardev",
            OptionKind::Export => "export",
            OptionKind::Monitor => "monitor",
            OptionKind::NbdServer => "nbd-server",
            OptionKind::Object => "object",
            OptionKind::Pidfile => "pidfile",
            OptionKind::Trace => "trace",
        }
    }
}

impl CliOption {
    /// The option as QSD reprints it in error messages: `--export type=nbd,...`.
    pub fn as_typed(&self) -> String {
        format!("--{} {}", self.kind.long(), self.value)
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    Run {
        options: Vec<CliOption>,
        daemonize: bool,
    },
    Help,
    Version,
}

pub const USAGE: &str = "\
Usage: blkd [options]
       blkd demo
       blkd nbd [--read-only] [--allocation-depth] [--bitmap NAME] [--export-name NAME]
                [--format FMT] [--socket PATH | --bind HOST --port PORT] IMAGE
blkd: a block storage daemon exporting block nodes over vhost-user-blk and NBD

  -h, --help             display this help and exit
  -V, --version          output version information and exit
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                         accepted for compatibility; use RUST_LOG for logging

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,driver specific parameters...]
                         configure a block backend (drivers: file, host_device,
                         null-co, raw, qcow2)
  --chardev socket,id=<id>,path=<path>,server=on,wait=off
                         a unix socket for --monitor
  --daemonize            daemonize the process, and have the parent exit
                         once startup is complete
  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmaps.0=<name>][,allocation-depth=on|off]
  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=unix,addr.path=<socket-path>[,writable=on|off]
           [,logical-block-size=<block-size>][,num-queues=<num-queues>]
           [,iothread=<id>][,iothread-vq-mapping.0.iothread=<id>...]
  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=fd,addr.str=<fd>[,...]
  --monitor [chardev=]name[,mode=control][,pretty[=on|off]]
                         configure a QMP monitor
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
  --object iothread,id=<id>   --object tls-creds-x509,id=<id>,dir=<dir>,endpoint=server
  --object authz-simple,id=<id>,identity=<dn>   (and other objects)
  --pidfile <path>       write process ID to a file after startup
";

fn command() -> Command {
    let mut cmd = Command::new("blkd")
        .disable_help_flag(true)
        .disable_version_flag(true)
        .no_binary_name(true)
        .arg(
            Arg::new("help")
                .short('h')
                .long("help")
                .action(ArgAction::SetTrue),
        )
        .arg(
            Arg::new("version")
                .short('V')
                .long("version")
                .action(ArgAction::SetTrue),
        )
        .arg(
            Arg::new("daemonize")
                .long("daemonize")
                .action(ArgAction::SetTrue),
        )
        .arg(
            Arg::new("positional")
                .action(ArgAction::Append)
                .num_args(1)
                .allow_hyphen_values(false),
        );
    for kind in OptionKind::ALL {
        let mut arg = Arg::new(kind.long())
            .long(kind.long())
            .action(ArgAction::Append)
            .num_args(1)
            .allow_hyphen_values(true);
        if kind == OptionKind::Trace {
            arg = arg.short('T');
        }
        cmd = cmd.arg(arg);
    }
    cmd
}

/// Parses the arguments after the program name. Errors carry QSD's texts.
pub fn parse(args: &[String]) -> Result<Invocation, String> {
    let matches = command()
        .try_get_matches_from(args)
        .map_err(|e| clap_error(&e, args))?;
    if let Some(mut extra) = matches.get_many::<String>("positional") {
        if let Some(first) = extra.next() {
            return Err(format!("{first}: Unexpected argument"));
        }
    }
    if matches.get_flag("help") {
        return Ok(Invocation::Help);
    }
    if matches.get_flag("version") {
        return Ok(Invocation::Version);
    }
    let mut ordered = Vec::new();
    for kind in OptionKind::ALL {
        let (Some(indices), Some(values)) = (
            matches.indices_of(kind.long()),
            matches.get_many::<String>(kind.long()),
        ) else {
            continue;
        };
        for (index, value) in indices.zip(values) {
            ordered.push((
                index,
                CliOption {
                    kind,
                    value: value.clone(),
                },
            ));
        }
    }
    ordered.sort_by_key(|(index, _)| *index);
    Ok(Invocation::Run {
        options: ordered.into_iter().map(|(_, o)| o).collect(),
        daemonize: matches.get_flag("daemonize"),
    })
}

/// Maps clap's errors to getopt's wording, as QSD prints them.
fn clap_error(err: &clap::Error, args: &[String]) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let arg = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.split_whitespace().next().unwrap_or("").to_string(),
        _ => String::new(),
    };
    match err.kind() {
        ErrorKind::InvalidValue | ErrorKind::WrongNumberOfValues | ErrorKind::TooFewValues
            if !arg.is_empty() =>
        {
            format!("option '{arg}' requires an argument")
        }
        ErrorKind::UnknownArgument => {
            let typed = args
                .iter()
                .find(|a| a.starts_with(&arg) && !arg.is_empty())
                .cloned()
                .unwrap_or(arg);
            let name = typed.split('=').next().unwrap_or(&typed).to_string();
            if name.starts_with("--") || !name.starts_with('-') {
                format!("unrecognized option '{name}'")
            } else {
                format!("invalid option -- '{}'", name.trim_start_matches('-'))
            }
        }
        _ => err
            .to_string()
            .lines()
            .next()
            .unwrap_or("invalid arguments")
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_keep_their_order_across_kinds() {
        let inv = parse(&args(&[
            "--nbd-server",
            "addr.type=unix,addr.path=/x",
            "--blockdev",
            "null-co,node-name=n0",
            "--export=nbd,id=e0,node-name=n0",
            "--blockdev",
            "null-co,node-name=n1",
            "--daemonize",
        ]))
        .unwrap();
        let Invocation::Run { options, daemonize } = inv else {
            panic!("not a run")
        };
        assert!(daemonize);
        let kinds: Vec<_> = options.iter().map(|o| o.kind).collect();
        assert_eq!(
            kinds,
            [
                OptionKind::NbdServer,
                OptionKind::Blockdev,
                OptionKind::Export,
                OptionKind::Blockdev
            ]
        );
        assert_eq!(options[2].as_typed(), "--export nbd,id=e0,node-name=n0");
        assert_eq!(options[3].value, "null-co,node-name=n1");
    }

    #[test]
    fn errors_use_getopt_wording() {
        assert_eq!(
            parse(&args(&["foo"])).unwrap_err(),
            "foo: Unexpected argument"
        );
        assert_eq!(
            parse(&args(&["--foo"])).unwrap_err(),
            "unrecognized option '--foo'"
        );
        assert_eq!(
            parse(&args(&["--blockdev"])).unwrap_err(),
            "option '--blockdev' requires an argument"
        );
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(&args(&["-h"])).unwrap(), Invocation::Help);
        assert_eq!(parse(&args(&["--version"])).unwrap(), Invocation::Version);
        assert_eq!(
            parse(&args(&[])).unwrap(),
            Invocation::Run {
                options: vec![],
                daemonize: false
            }
        );
    }
}
