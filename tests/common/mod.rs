//! Shared helpers for the black-box tests: start blkd (or qemu-storage-daemon,
//! the oracle) with a QMP monitor in a temporary directory, and talk QMP to it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BLKD: &str = env!("CARGO_BIN_EXE_blkd");
pub const QSD: &str = "qemu-storage-daemon";

/// Which daemon a scenario runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    Blkd,
    Qsd,
}

impl Impl {
    pub fn program(self) -> &'static str {
        match self {
            Impl::Blkd => BLKD,
            Impl::Qsd => QSD,
        }
    }
}

/// Whether a test must skip because some of `tools` (programs on PATH, or paths) are not
/// installed. Under `scripts/test.sh`, which installs them all and sets
/// `BLKD_TESTS_NEED_TOOLS`, a missing tool fails the test instead: a broken install must not
/// pass as a green run.
pub fn missing_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    if missing.is_empty() {
        return false;
    }
    if std::env::var_os("BLKD_TESTS_NEED_TOOLS").is_some() {
        panic!(
            "{missing:?} not installed, though scripts/install-deps.sh should have installed them"
        );
    }
    eprintln!("skipping: {missing:?} not installed");
    true
}

/// Whether an external program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn wait_for_path(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// A running daemon with a QMP socket at `dir/qmp.sock`.
pub struct Daemon {
    pub which: Impl,
    pub dir: tempfile::TempDir,
    pub child: Child,
}

impl Daemon {
    /// Starts `which` with a monitor plus `args`.
    pub fn start(which: Impl, args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(which, dir, args)
    }

    pub fn start_in(which: Impl, dir: tempfile::TempDir, args: &[&str]) -> Daemon {
        let qmp = dir.path().join("qmp.sock");
        let mut cmd = Command::new(which.program());
        cmd.arg("--chardev")
            .arg(format!(
                "socket,id=m0,path={},server=on,wait=off",
                qmp.display()
            ))
            .arg("--monitor")
            .arg("chardev=m0")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("spawn daemon");
        // Generous: QSD starts slowly on a loaded machine.
        assert!(
            wait_for_path(&qmp, Duration::from_secs(30)),
            "{which:?} did not create its QMP socket"
        );
        // The monitor answers only once every option has been applied, so a
        // reply means every socket of the command line is listening.
        Qmp::connect(&qmp).ok("query-version", json!({}));
        Daemon { which, dir, child }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.path("qmp.sock"))
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(30))
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "{:?} did not exit", self.which);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A QMP client on a unix socket.
pub struct Qmp {
    pub reader: BufReader<UnixStream>,
    pub writer: UnixStream,
    pub greeting: Value,
    /// Events received while waiting for replies.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects and reads the greeting, without negotiating.
    pub fn connect_raw(path: &Path) -> Qmp {
        // The socket file appears at bind(), a moment before listen().
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("connect QMP {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let writer = stream.try_clone().expect("clone");
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
            events: Vec::new(),
        };
        qmp.greeting = qmp.read_value().expect("greeting");
        qmp
    }

    /// Connects and negotiates capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let mut qmp = Self::connect_raw(path);
        let r = qmp.cmd("qmp_capabilities", json!({}));
        assert_eq!(r, json!({"return": {}}), "negotiation failed");
        qmp
    }

    /// Reads one line as JSON; None on EOF.
    pub fn read_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line),
        }
    }

    pub fn read_value(&mut self) -> Option<Value> {
        let line = self.read_line()?;
        assert!(line.ends_with("\r\n"), "QMP line without CRLF: {line:?}");
        Some(serde_json::from_str(&line).expect("QMP sent invalid JSON"))
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write QMP");
    }

    /// Reads until a reply (return or error), keeping events.
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self.read_value().expect("QMP connection closed");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Runs a command; returns the whole reply object.
    pub fn cmd(&mut self, name: &str, args: Value) -> Value {
        let msg = if args.as_object().is_some_and(|o| o.is_empty()) {
            json!({"execute": name})
        } else {
            json!({"execute": name, "arguments": args})
        };
        self.send_raw(format!("{msg}\n").as_bytes());
        self.reply()
    }

    /// Runs a command that must succeed; returns its `return` value.
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.cmd(name, args.clone());
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("{name} {args} failed: {r}"),
        }
    }

    /// Runs a command that must fail; returns (class, desc).
    pub fn err(&mut self, name: &str, args: Value) -> (String, String) {
        let r = self.cmd(name, args.clone());
        let e = r
            .get("error")
            .unwrap_or_else(|| panic!("{name} {args} succeeded: {r}"));
        (
            e["class"].as_str().unwrap_or_default().to_string(),
            e["desc"].as_str().unwrap_or_default().to_string(),
        )
    }

    /// Waits for an event named `name` (already received ones first).
    pub fn event(&mut self, name: &str) -> Value {
        if let Some(pos) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(pos);
        }
        loop {
            let v = self.read_value().expect("QMP connection closed");
            if v["event"] == name {
                return v;
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }
}

/// Runs a program and returns its output.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs a program that must succeed; returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes a raw image of `size` bytes filled with a repeating byte pattern.
pub fn make_image(path: &Path, size: usize, seed: u8) {
    let data: Vec<u8> = (0..size).map(|i| (i / 4096) as u8 ^ seed).collect();
    std::fs::write(path, data).expect("write image");
}

/// Makes `fd` the child's descriptor 3, as a service manager hands over a
/// listening socket.
pub fn pass_fd_as_3(cmd: &mut Command, fd: i32) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            // dup2 onto itself keeps close-on-exec: clear it then.
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The threads of process `pid`: each one's name and `Cpus_allowed_list`.
pub fn threads(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read /proc/PID/task")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            let status = std::fs::read_to_string(path.join("status")).ok()?;
            let cpus = status
                .lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("")
                .to_string();
            Some((name.trim().to_string(), cpus))
        })
        .collect()
}

/// The one TCP port process `pid` listens on. Daemons told to bind port 0
/// keep the port the kernel picked, where a port probed here and released
/// could be taken by another process before the daemon binds it.
pub fn tcp_listen_port(pid: u32) -> u16 {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_str()?;
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            // local_address (hex ADDR:PORT), st (0A: LISTEN), inode.
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = f[1].rsplit(':').next().unwrap_or_default();
                ports.push(u16::from_str_radix(port, 16).expect("port in hex"));
            }
        }
    }
    assert_eq!(
        ports.len(),
        1,
        "TCP ports process {pid} listens on: {ports:?}"
    );
    ports[0]
}
