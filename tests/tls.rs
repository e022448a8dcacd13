//! NBD over TLS (tls-creds-x509, tls-authz) with real clients (nbdinfo, nbdcopy, qemu-img,
//! qemu-io), each scenario also run against qemu-storage-daemon to compare outcomes.
//! Certificates are made at test time with certtool (GnuTLS), in QEMU's directory layout.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{run, Daemon, Impl};
use serde_json::{json, Value};

/// Python with the system's ssl module (not a pyenv one).
const PY: &str = "/usr/bin/python3";

const TOOLS: &[&str] = &["certtool", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io"];

fn skip() -> bool {
    let tools: Vec<&str> = TOOLS
        .iter()
        .chain(&["qemu-storage-daemon"])
        .copied()
        .collect();
    common::missing_tools(&tools)
}

fn certtool(args: &[&str]) {
    let out = run("certtool", args);
    assert!(
        out.status.success(),
        "certtool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Client certificate directories (each with `ca-cert.pem` of the server's CA, plus
/// `client-cert.pem`/`client-key.pem` except for `noclient`).
const GOOD: &str = "client";
const OTHER_DN: &str = "other";
const OTHER_CA: &str = "wrongca";
const EXPIRED: &str = "expired";
const NO_CERT: &str = "noclient";

/// A CA, a server certificate, and client certificates for every scenario under `root`.
struct Certs {
    root: PathBuf,
}

impl Certs {
    fn make(root: &Path) -> Certs {
        let p = |name: &str| root.join(name).to_string_lossy().into_owned();
        let template = |name: &str, text: &str| {
            std::fs::write(root.join(name), text).unwrap();
            p(name)
        };
        let key = |path: &str| {
            certtool(&[
                "--generate-privkey",
                "--key-type=rsa",
                "--bits=2048",
                "--outfile",
                path,
            ])
        };
        for (ca, cn) in [("ca", "blkd test CA"), ("ca2", "unrelated CA")] {
            key(&p(&format!("{ca}-key.pem")));
            let info = template(
                &format!("{ca}.info"),
                &format!("cn = {cn}\nca\ncert_signing_key\nexpiration_days = 30\n"),
            );
            certtool(&[
                "--generate-self-signed",
                "--load-privkey",
                &p(&format!("{ca}-key.pem")),
                "--template",
                &info,
                "--outfile",
                &p(&format!("{ca}-cert.pem")),
            ]);
        }
        let issue = |dir: &str, ca: &str, file: &str, info: &str| {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            std::fs::copy(root.join("ca-cert.pem"), root.join(dir).join("ca-cert.pem")).unwrap();
            key(&p(&format!("{dir}/{file}-key.pem")));
            let info = template(&format!("{dir}.info"), info);
            certtool(&[
                "--generate-certificate",
                "--load-privkey",
                &p(&format!("{dir}/{file}-key.pem")),
                "--load-ca-certificate",
                &p(&format!("{ca}-cert.pem")),
                "--load-ca-privkey",
                &p(&format!("{ca}-key.pem")),
                "--template",
                &info,
                "--outfile",
                &p(&format!("{dir}/{file}-cert.pem")),
            ]);
        };
        issue(
            "server",
            "ca",
            "server",
            "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\n\
             encryption_key\nsigning_key\nexpiration_days = 30\n",
        );
        let client = |org: &str, cn: &str, validity: &str| {
            format!(
                "country = GB\norganization = {org}\ncn = {cn}\ntls_www_client\n\
                 encryption_key\nsigning_key\n{validity}\n"
            )
        };
        let valid = "expiration_days = 30";
        issue(
            GOOD,
            "ca",
            "client",
            &client("QSD Test", "qsd-client", valid),
        );
        issue(
            OTHER_DN,
            "ca",
            "client",
            &client("Other Org", "other-client", valid),
        );
        issue(
            OTHER_CA,
            "ca2",
            "client",
            &client("QSD Test", "qsd-client", valid),
        );
        issue(
            EXPIRED,
            "ca",
            "client",
            &client(
                "QSD Test",
                "qsd-client",
                "activation_date = \"2020-01-01 00:00:00 UTC\"\n\
                 expiration_date = \"2020-06-01 00:00:00 UTC\"",
            ),
        );
        std::fs::create_dir_all(root.join(NO_CERT)).unwrap();
        std::fs::copy(
            root.join("ca-cert.pem"),
            root.join(NO_CERT).join("ca-cert.pem"),
        )
        .unwrap();
        Certs {
            root: root.to_path_buf(),
        }
    }

    fn dir(&self, name: &str) -> String {
        self.root.join(name).to_string_lossy().into_owned()
    }
}

/// Deterministic pseudo-random bytes, so that a misplaced block cannot go unnoticed.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

const SIZE: usize = 8 << 20;

/// How a client reaches the export.
#[derive(Clone)]
enum Addr {
    Unix(PathBuf),
    Tcp(u16),
}

impl Addr {
    fn nbd_server(&self) -> String {
        match self {
            Addr::Unix(path) => format!("addr.type=unix,addr.path={}", path.display()),
            Addr::Tcp(port) => format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        }
    }

    /// libnbd URI; `certs` None means plaintext.
    fn uri(&self, certs: Option<&str>) -> String {
        let (scheme, tls) = match certs {
            Some(dir) => ("nbds", format!("tls-certificates={dir}")),
            None => ("nbd", String::new()),
        };
        match self {
            Addr::Unix(path) => {
                let sep = if tls.is_empty() { "" } else { "&" };
                format!("{scheme}+unix:///disk?socket={}{sep}{tls}", path.display())
            }
            Addr::Tcp(port) => {
                let q = if tls.is_empty() {
                    String::new()
                } else {
                    format!("?{tls}")
                };
                format!("{scheme}://127.0.0.1:{port}/disk{q}")
            }
        }
    }

    /// QEMU `--image-opts` for the export through client credentials `tls0`.
    fn qemu_opts(&self) -> String {
        match self {
            Addr::Unix(path) => format!(
                "driver=nbd,server.type=unix,server.path={},export=disk,tls-creds=tls0,\
                 tls-hostname=localhost",
                path.display()
            ),
            Addr::Tcp(port) => format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},\
                 export=disk,tls-creds=tls0"
            ),
        }
    }

    /// Waits until the daemon listens (it creates its QMP socket first).
    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listening = || match self {
            Addr::Unix(path) => path.exists(),
            Addr::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).is_ok(),
        };
        while !listening() {
            assert!(Instant::now() < deadline, "the NBD server does not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Starts `which` with TLS credentials `tls0` from `server_dir`, `authz` objects, and an
/// NBD server with `server_extra` serving `img.raw` writable as export `disk`.
fn start(
    which: Impl,
    dir: tempfile::TempDir,
    certs: &Certs,
    addr: &Addr,
    objects: &[&str],
    server_extra: &str,
) -> Daemon {
    let img = dir.path().join("img.raw");
    common::make_image(&img, SIZE, 0x11);
    let mut args = vec![format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={}",
        certs.dir("server")
    )];
    args.extend(objects.iter().map(|o| o.to_string()));
    let mut argv: Vec<String> = args
        .into_iter()
        .flat_map(|o| ["--object".to_string(), o])
        .collect();
    argv.extend([
        "--blockdev".into(),
        format!("file,node-name=file0,filename={}", img.display()),
        "--nbd-server".into(),
        format!("{},tls-creds=tls0{server_extra}", addr.nbd_server()),
        "--export".into(),
        "nbd,id=e0,node-name=file0,name=disk,writable=on".into(),
    ]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let d = Daemon::start_in(which, dir, &argv);
    // Port 0 has no number to probe yet: the caller finds the daemon's.
    if !matches!(addr, Addr::Tcp(0)) {
        addr.wait_listening();
    }
    d
}

fn nbdinfo_ok(addr: &Addr, certs: Option<&str>) -> bool {
    let out = run("timeout", &["20", "nbdinfo", "--json", &addr.uri(certs)]);
    if !out.status.success() {
        eprintln!(
            "nbdinfo {}: {}",
            addr.uri(certs),
            String::from_utf8_lossy(&out.stderr)
        );
        return false;
    }
    let info: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo --json output");
    assert_eq!(info["TLS"], json!(certs.is_some()), "{info}");
    assert_eq!(info["exports"][0]["export-size"], json!(SIZE), "{info}");
    true
}

/// Stderr of a daemon after it stopped.
fn stop_and_stderr(mut d: Daemon) -> String {
    let mut stderr = d.child.stderr.take().expect("stderr is piped");
    d.terminate();
    let mut text = String::new();
    stderr.read_to_string(&mut text).unwrap();
    text
}

/// Writes and reads back data over TLS with nbdcopy, qemu-img and qemu-io; checks the image.
fn check_data_path(addr: &Addr, certs: &Certs, work: &Path, image: &Path) {
    let client = certs.dir(GOOD);
    let data = random_bytes(SIZE, 0x5eed);
    let src = work.join("src.bin");
    std::fs::write(&src, &data).unwrap();
    let uri = addr.uri(Some(&client));
    let copy = run("timeout", &["60", "nbdcopy", src.to_str().unwrap(), &uri]);
    assert!(
        copy.status.success(),
        "nbdcopy write: {}",
        String::from_utf8_lossy(&copy.stderr)
    );
    let back = work.join("back.bin");
    let copy = run("timeout", &["60", "nbdcopy", &uri, back.to_str().unwrap()]);
    assert!(
        copy.status.success(),
        "nbdcopy read: {}",
        String::from_utf8_lossy(&copy.stderr)
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy read back other data"
    );
    assert!(
        std::fs::read(image).unwrap() == data,
        "the image does not hold what was written"
    );

    let creds = format!("tls-creds-x509,id=tls0,endpoint=client,dir={client}");
    let opts = addr.qemu_opts();
    let io = run(
        "timeout",
        &[
            "60",
            "qemu-io",
            "--object",
            &creds,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x5a 1M 192k",
            "-c",
            "aio_write -P 0x6b 3M 1M",
            "-c",
            "aio_write -P 0x7c 5M 1M",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x5a 1M 192k",
            "-c",
            "read -P 0x6b 3M 1M",
            "-c",
            "read -P 0x7c 5M 1M",
        ],
    );
    let io_out = String::from_utf8_lossy(&io.stdout);
    assert!(
        io.status.success() && !io_out.contains("Pattern verification failed"),
        "qemu-io: {io_out}{}",
        String::from_utf8_lossy(&io.stderr)
    );
    let mut expected = data;
    expected[1 << 20..(1 << 20) + (192 << 10)].fill(0x5a);
    expected[3 << 20..4 << 20].fill(0x6b);
    expected[5 << 20..6 << 20].fill(0x7c);
    let converted = work.join("converted.bin");
    let img = run(
        "timeout",
        &[
            "60",
            "qemu-img",
            "convert",
            "-O",
            "raw",
            "--object",
            &creds,
            "--image-opts",
            &opts,
            converted.to_str().unwrap(),
        ],
    );
    assert!(
        img.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&img.stderr)
    );
    assert!(
        std::fs::read(&converted).unwrap() == expected,
        "qemu-img read other data"
    );
    assert!(
        std::fs::read(image).unwrap() == expected,
        "the image misses qemu-io's writes"
    );
}

/// Which clients get in, as (client, allowed) in a fixed order.
fn refusal_matrix(addr: &Addr, certs: &Certs) -> Vec<(&'static str, bool)> {
    let mut seen = Vec::new();
    for client in [GOOD, "plaintext", OTHER_DN, OTHER_CA, EXPIRED, NO_CERT] {
        let allowed = if client == "plaintext" {
            nbdinfo_ok(addr, None)
        } else {
            nbdinfo_ok(addr, Some(&certs.dir(client)))
        };
        seen.push((client, allowed));
        // A refused client must not disturb the server.
        assert!(
            nbdinfo_ok(addr, Some(&certs.dir(GOOD))),
            "good client refused after {client}"
        );
    }
    seen
}

#[test]
fn tls_authz_simple_serves_good_clients_and_refuses_the_rest() {
    if skip() {
        return;
    }
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(certs_dir.path());
    let expected = vec![
        (GOOD, true),
        ("plaintext", false),
        (OTHER_DN, false),
        (OTHER_CA, false),
        (EXPIRED, false),
        (NO_CERT, false),
    ];
    for which in [Impl::Blkd, Impl::Qsd] {
        let dir = tempfile::tempdir().unwrap();
        let addr = Addr::Unix(dir.path().join("nbd.sock"));
        let image = dir.path().join("img.raw");
        let work = tempfile::tempdir().unwrap();
        // The QEMU command-line escaping of commas in the identity.
        let d = start(
            which,
            dir,
            &certs,
            &addr,
            &["authz-simple,id=auth0,identity=C=GB,,O=QSD Test,,CN=qsd-client"],
            ",tls-authz=auth0",
        );
        assert_eq!(refusal_matrix(&addr, &certs), expected, "{which:?}");
        check_data_path(&addr, &certs, work.path(), &image);
        let stderr = stop_and_stderr(d);
        assert!(
            stderr.contains("TLS x509 authz check for C=GB,O=Other Org,CN=other-client is denied"),
            "{which:?} did not log the refused DN: {stderr}"
        );
    }
}

#[test]
fn tls_over_tcp_without_authz_and_verify_peer_off() {
    if skip() {
        return;
    }
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(certs_dir.path());
    for which in [Impl::Blkd, Impl::Qsd] {
        // verify-peer on, no authz: any certificate from the CA, over TCP.
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img.raw");
        let work = tempfile::tempdir().unwrap();
        // Port 0: the daemon keeps the port it gets, where one probed here
        // and released could be taken before the daemon binds it.
        let d = start(which, dir, &certs, &Addr::Tcp(0), &[], "");
        let addr = Addr::Tcp(common::tcp_listen_port(d.child.id()));
        addr.wait_listening();
        assert!(nbdinfo_ok(&addr, Some(&certs.dir(GOOD))), "{which:?}");
        assert!(nbdinfo_ok(&addr, Some(&certs.dir(OTHER_DN))), "{which:?}");
        assert!(!nbdinfo_ok(&addr, Some(&certs.dir(NO_CERT))), "{which:?}");
        assert!(!nbdinfo_ok(&addr, Some(&certs.dir(EXPIRED))), "{which:?}");
        assert!(!nbdinfo_ok(&addr, None), "{which:?}");
        let list_uri = addr.uri(Some(&certs.dir(GOOD))).replace("/disk?", "?");
        let list = run("timeout", &["20", "nbdinfo", "--list", &list_uri]);
        assert!(
            list.status.success()
                && String::from_utf8_lossy(&list.stdout).contains("export=\"disk\""),
            "{which:?} list: {}",
            String::from_utf8_lossy(&list.stderr)
        );
        check_data_path(&addr, &certs, work.path(), &image);
        drop(d);

        // verify-peer off: a client with only the CA certificate gets in.
        let dir = tempfile::tempdir().unwrap();
        let addr = Addr::Unix(dir.path().join("nbd.sock"));
        let img = dir.path().join("img.raw");
        common::make_image(&img, SIZE, 0x22);
        let d = Daemon::start_in(
            which,
            dir,
            &[
                "--object",
                &format!(
                    "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer=off",
                    certs.dir("server")
                ),
                "--blockdev",
                &format!("file,node-name=file0,filename={}", img.display()),
                "--nbd-server",
                &format!("{},tls-creds=tls0", addr.nbd_server()),
                "--export",
                "nbd,id=e0,node-name=file0,name=disk",
            ],
        );
        addr.wait_listening();
        assert!(nbdinfo_ok(&addr, Some(&certs.dir(NO_CERT))), "{which:?}");
        assert!(!nbdinfo_ok(&addr, None), "{which:?}");
        drop(d);
    }
}

/// `tls-authz` naming an object created later, TLS object errors over QMP, object-del.
#[test]
fn qmp_tls_objects_and_late_authz() {
    if skip() {
        return;
    }
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(certs_dir.path());
    let mut errors = Vec::new();
    for which in [Impl::Blkd, Impl::Qsd] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.raw");
        common::make_image(&img, SIZE, 0x33);
        let sock = dir.path().join("nbd.sock");
        let missing = certs_dir.path().join("nonexistent");
        let d = Daemon::start_in(
            which,
            dir,
            &[
                "--blockdev",
                &format!("file,node-name=file0,filename={}", img.display()),
            ],
        );
        let mut qmp = d.qmp();
        let mut seen = Vec::new();
        seen.push(qmp.err(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "bad", "endpoint": "server",
                   "dir": missing.to_str().unwrap()}),
        ));
        qmp.ok(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server",
                   "dir": certs.dir("server"), "verify-peer": true}),
        );
        qmp.ok(
            "object-add",
            json!({"qom-type": "tls-creds-x509", "id": "tlsc", "endpoint": "client",
                   "dir": certs.dir(GOOD)}),
        );
        qmp.ok(
            "object-add",
            json!({"qom-type": "authz-simple", "id": "authS", "identity": "CN=x"}),
        );
        seen.push(qmp.err(
            "object-add",
            json!({"qom-type": "authz-simple", "id": "authS", "identity": "CN=x"}),
        ));
        let addr = json!({"type": "unix", "data": {"path": sock.to_str().unwrap()}});
        seen.push(qmp.err(
            "nbd-server-start",
            json!({"addr": addr, "tls-creds": "tlsc"}),
        ));
        seen.push(qmp.err(
            "nbd-server-start",
            json!({"addr": addr, "tls-creds": "authS"}),
        ));
        seen.push(qmp.err(
            "nbd-server-start",
            json!({"addr": addr, "tls-creds": "nope"}),
        ));
        seen.push(qmp.err("object-del", json!({"id": "nope"})));
        qmp.ok(
            "nbd-server-start",
            json!({"addr": addr, "tls-creds": "tls0", "tls-authz": "authX"}),
        );
        qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e0", "node-name": "file0", "name": "disk"}),
        );
        let addr = Addr::Unix(sock);
        // The authorization object does not exist yet: everyone is refused.
        assert!(!nbdinfo_ok(&addr, Some(&certs.dir(GOOD))), "{which:?}");
        qmp.ok(
            "object-add",
            json!({"qom-type": "authz-list", "id": "authX", "policy": "deny",
                   "rules": [{"match": "*CN=qsd-client*", "policy": "allow", "format": "glob"}]}),
        );
        assert!(nbdinfo_ok(&addr, Some(&certs.dir(GOOD))), "{which:?}");
        assert!(!nbdinfo_ok(&addr, Some(&certs.dir(OTHER_DN))), "{which:?}");
        // Deleting the authz object in use: QSD allows it and then refuses every client;
        // blkd may instead refuse the deletion. Either way nobody gets in unchecked.
        let del = qmp.cmd("object-del", json!({"id": "authX"}));
        if del.get("return").is_some() {
            assert!(!nbdinfo_ok(&addr, Some(&certs.dir(GOOD))), "{which:?}");
            assert!(!nbdinfo_ok(&addr, Some(&certs.dir(OTHER_DN))), "{which:?}");
        } else {
            assert_eq!(which, Impl::Blkd, "QSD refused object-del: {del}");
            assert!(
                del["error"]["desc"]
                    .as_str()
                    .unwrap_or("")
                    .contains("in use"),
                "{del}"
            );
            assert!(nbdinfo_ok(&addr, Some(&certs.dir(GOOD))));
            assert!(!nbdinfo_ok(&addr, Some(&certs.dir(OTHER_DN))));
        }
        if which == Impl::Blkd {
            let (_, psk) = qmp.err(
                "object-add",
                json!({"qom-type": "tls-creds-psk", "id": "psk0", "endpoint": "server",
                       "dir": certs.dir("server")}),
            );
            assert!(psk.contains("tls-creds-psk is not supported"), "{psk}");
        }
        let stderr = stop_and_stderr(d);
        assert!(
            stderr.contains("Cannot find QAuthZ object ID authX"),
            "{which:?}: {stderr}"
        );
        errors.push(seen);
    }
    assert_eq!(errors[0], errors[1], "blkd and QSD disagree on QMP errors");
    let missing_ca = &errors[1][0].1;
    assert!(
        missing_ca.starts_with("Unable to access credentials ")
            && missing_ca.ends_with("/nonexistent/ca-cert.pem: No such file or directory"),
        "{missing_ca}"
    );
}

/// blkd refuses a tls-authz it could not enforce (QEMU silently lets everyone in).
#[test]
fn blkd_refuses_authz_without_verify_peer() {
    if common::missing_tools(&["certtool"]) {
        return;
    }
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(certs_dir.path());
    let d = Daemon::start(Impl::Blkd, &[]);
    let mut qmp = d.qmp();
    qmp.ok(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server",
               "dir": certs.dir("server"), "verify-peer": false}),
    );
    let sock = d.path("nbd.sock");
    let (_, desc) = qmp.err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}},
               "tls-creds": "tls0", "tls-authz": "auth0"}),
    );
    assert!(desc.contains("verify-peer=off"), "{desc}");
    // Never serve plaintext in place of TLS: the server did not start at all.
    assert!(!sock.exists());
}

/// A raw NBD client (Python's ssl module) that presents its certificate whatever CAs the
/// server names, which GnuTLS clients do not: exercises the server's own issuer and
/// validity checks. Prints `ok` when the server answers an option after the handshake.
const STARTTLS_CLIENT: &str = r#"
import socket, ssl, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("server closed")
        b += c
    return b
assert recv(18)[:16] == b"NBDMAGICIHAVEOPT"
s.sendall(struct.pack(">I", 3))
s.sendall(b"IHAVEOPT" + struct.pack(">II", 5, 0))
magic, opt, typ, ln = struct.unpack(">QIII", recv(20))
assert (opt, typ, ln) == (5, 1, 0), (opt, typ, ln)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(sys.argv[2] + "/ca-cert.pem")
ctx.load_cert_chain(sys.argv[2] + "/client-cert.pem", sys.argv[2] + "/client-key.pem")
try:
    t = ctx.wrap_socket(s, server_hostname="localhost")
    t.sendall(b"IHAVEOPT" + struct.pack(">II", 3, 0))
    reply = t.recv(20)
    print("ok" if len(reply) == 20 else "refused")
    t.sendall(b"IHAVEOPT" + struct.pack(">II", 2, 0))
except (ssl.SSLError, OSError, EOFError) as e:
    print("refused:", e)
"#;

#[test]
fn certificates_from_another_ca_or_expired_are_refused() {
    if skip() || common::missing_tools(&[PY]) {
        return;
    }
    let certs_dir = tempfile::tempdir().unwrap();
    let certs = Certs::make(certs_dir.path());
    let script = certs_dir.path().join("starttls.py");
    std::fs::write(&script, STARTTLS_CLIENT).unwrap();
    let attempt = |sock: &Path, client: &str| {
        let out = run(
            "timeout",
            &[
                "30",
                PY,
                script.to_str().unwrap(),
                sock.to_str().unwrap(),
                &certs.dir(client),
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "client script failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout.trim() == "ok"
    };
    for which in [Impl::Blkd, Impl::Qsd] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let addr = Addr::Unix(sock.clone());
        let d = start(which, dir, &certs, &addr, &[], "");
        assert!(attempt(&sock, GOOD), "{which:?} refused the good client");
        assert!(
            !attempt(&sock, OTHER_CA),
            "{which:?} let in another CA's client"
        );
        assert!(
            !attempt(&sock, EXPIRED),
            "{which:?} let in an expired certificate"
        );
        assert!(attempt(&sock, GOOD), "{which:?} stopped serving");
        let stderr = stop_and_stderr(d);
        assert!(
            stderr.contains("The certificate hasn't got a known issuer"),
            "{which:?}: {stderr}"
        );
        // QSD reports GnuTLS's generic "The certificate is not trusted" for an expired one.
        let expired = match which {
            Impl::Blkd => "The certificate has expired",
            Impl::Qsd => "The certificate is not trusted",
        };
        assert!(stderr.contains(expired), "{which:?}: {stderr}");
    }
}
