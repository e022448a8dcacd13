//! Shared fixture: a `Server` on a unix socket in a temporary directory.
#![allow(dead_code)]

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use nbd::test_utils::MemBackend;
use nbd::{ExportConfig, MetaContextConfig, Server, ServerConfig, Stream};

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub server: Arc<Server>,
}

impl Fixture {
    pub fn new(config: ServerConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = Server::new(config);
        let s = Arc::clone(&server);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                s.serve_client(Box::new(conn), Box::new(|| {}));
            }
        });
        Self { dir, path, server }
    }

    pub fn with_export(name: &str, read_only: bool, size: u64) -> (Self, Arc<MemBackend>) {
        let f = Self::new(ServerConfig::default());
        let backend = Arc::new(MemBackend::new(size));
        f.add(name, read_only, Arc::clone(&backend), &[]);
        (f, backend)
    }

    pub fn add(&self, name: &str, read_only: bool, backend: Arc<MemBackend>, contexts: &[&str]) {
        let config = ExportConfig {
            name: name.to_string(),
            description: Some(format!("test export {name}")),
            read_only,
            multi_conn: true,
            meta_contexts: (1..)
                .zip(contexts)
                .map(|(id, c)| MetaContextConfig {
                    id,
                    name: c.to_string(),
                })
                .collect(),
            on_serve: None,
            poll_max: std::time::Duration::ZERO,
        };
        self.server.add_export(config, backend).expect("add_export");
    }

    pub fn connect(&self) -> Box<dyn Stream> {
        Box::new(UnixStream::connect(&self.path).expect("connect"))
    }

    pub fn raw(&self) -> UnixStream {
        UnixStream::connect(&self.path).expect("connect")
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.path.display())
    }
}

/// Whether an external program can be run; prints why a test is skipped when not. Under
/// `scripts/test.sh`, which installs every tool and sets `BLKD_TESTS_NEED_TOOLS`, a missing
/// one fails the test instead.
pub fn have(program: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        skip(&format!("{program} is not installed"));
    }
    ok
}

/// Says why a test is skipped, or fails it when every tool should be there.
pub fn skip(why: &str) {
    if std::env::var_os("BLKD_TESTS_NEED_TOOLS").is_some() {
        panic!("{why}: scripts/test.sh installs every tool the tests use");
    }
    eprintln!("SKIP: {why}");
}

/// Run a command, assert success, return stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
