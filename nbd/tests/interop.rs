//! The server driven by real NBD clients: nbdinfo, python3-libnbd, qemu-io, qemu-img, and
//! compared with a live qemu-storage-daemon. Each test is skipped (with a message) when its
//! tool is missing, except under `scripts/test.sh`, where that fails it.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{have, run, skip, Fixture};
use nbd::proto::Extent;
use nbd::test_utils::MemBackend;
use nbd::ExportBackend;
use serde_json::Value;

const MIB: u64 = 1024 * 1024;
const PYTHON: &str = "/usr/bin/python3";

fn nbdinfo_json(uri: &str) -> Value {
    let out = run(Command::new("nbdinfo").arg("--json").arg(uri));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad nbdinfo JSON ({e}): {out}"))
}

#[test]
fn nbdinfo_json_list_and_map() {
    if !have("nbdinfo") {
        return;
    }
    let f = Fixture::new(nbd::ServerConfig::default());
    let backend = Arc::new(MemBackend::new(MIB).with_context_map(vec![
        Extent {
            length: 65536,
            flags: 2,
        },
        Extent {
            length: MIB - 65536,
            flags: 0,
        },
    ]));
    backend.write_at(&[0x11; 196608], 0, false).unwrap();
    backend.write_at(&[0x55; 4096], 524288, false).unwrap();
    f.add(
        "top",
        false,
        Arc::clone(&backend),
        &["qemu:allocation-depth"],
    );
    f.add("ro", true, Arc::new(MemBackend::new(MIB)), &[]);

    let v = nbdinfo_json(&f.uri("top"));
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["TLS"], false);
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "top");
    assert_eq!(e["description"], "test export top");
    assert_eq!(e["export-size"], MIB);
    assert_eq!(
        e["contexts"],
        serde_json::json!(["base:allocation", "qemu:allocation-depth"])
    );
    for (key, want) in [
        ("is_rotational", false),
        ("is_read_only", false),
        ("can_cache", true),
        ("can_df", true),
        ("can_fast_zero", true),
        ("can_flush", true),
        ("can_fua", true),
        ("can_multi_conn", true),
        ("can_trim", true),
        ("can_zero", true),
    ] {
        assert_eq!(e[key], want, "{key}");
    }
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 33554432);

    let ro = nbdinfo_json(&f.uri("ro"));
    assert_eq!(ro["exports"][0]["is_read_only"], true);
    assert_eq!(ro["exports"][0]["can_trim"], false);

    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg("--json")
        .arg(f.uri("")));
    let list: Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["top", "ro"]);

    let map = run(Command::new("nbdinfo").arg("--map").arg(f.uri("top")));
    let rows: Vec<Vec<String>> = map
        .lines()
        .map(|l| l.split_whitespace().take(3).map(str::to_string).collect())
        .collect();
    assert_eq!(
        rows,
        [
            ["0", "196608", "0"],
            ["196608", "327680", "3"],
            ["524288", "4096", "0"],
            ["528384", "520192", "3"]
        ]
    );
    let depth = run(Command::new("nbdinfo")
        .arg("--map=qemu:allocation-depth")
        .arg(f.uri("top")));
    assert!(
        depth
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .eq(["0", "65536", "2", "backing", "depth", "2"]),
        "{depth}"
    );

    let content = run(Command::new("nbdinfo").arg("--content").arg(f.uri("top")));
    assert!(content.contains("content:"), "{content}");

    let missing = Command::new("nbdinfo")
        .arg(f.uri("nosuch"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    // What nbdinfo prints for QSD too (libnbd 1.14 maps ERR_UNKNOWN to ENOENT).
    assert!(
        stderr.contains("No such file or directory for export: nosuch"),
        "{stderr}"
    );
}

#[test]
fn python_libnbd() {
    if !std::path::Path::new(PYTHON).exists() {
        skip(&format!("{PYTHON} is not installed"));
        return;
    }
    let probe = Command::new(PYTHON)
        .args(["-c", "import nbd"])
        .output()
        .unwrap();
    if !probe.status.success() {
        skip("python3-libnbd is not installed");
        return;
    }
    let f = Fixture::new(nbd::ServerConfig::default());
    let backend = Arc::new(MemBackend::new(8 * MIB));
    f.add("e", false, Arc::clone(&backend), &[]);
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.get_size() == 8 << 20
assert not h.is_read_only() and h.can_flush() and h.can_fua() and h.can_trim()
assert h.can_zero() and h.can_fast_zero() and h.can_df() and h.can_multi_conn() and h.can_cache()
assert not h.is_rotational()
assert (h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED), h.get_block_size(nbd.SIZE_MAXIMUM)) == (1, 4096, 32 << 20)
h.pwrite(b"\xab" * 65536, 0, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 0) == b"\xab" * 65536
# 64 reads and writes in flight at once.
bufs = []
for i in range(64):
    data = bytes([i]) * 4096
    h.aio_pwrite(data, (1 << 20) + i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
cookies = []
for i in range(64):
    buf = nbd.Buffer(4096)
    cookies.append((i, buf, h.aio_pread(buf, (1 << 20) + i * 4096)))
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, buf, c in cookies:
    assert h.aio_command_completed(c)
    assert buf.to_bytearray() == bytes([i]) * 4096, i
entries = []
def cb(meta, off, ents, err):
    entries.append((meta, list(ents)))
    return 0
h.block_status(2 << 20, 0, cb)
assert entries[0][0] == "base:allocation", entries
assert entries[0][1][:4] == [65536, 0, (1 << 20) - 65536, 3], entries
h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(4096 * 2, 0) == b"\0" * 4096 + b"\xab" * 4096
# Let the server, not libnbd, judge the bounds.
h.set_strict_mode(0)
try:
    h.pread(2, (8 << 20) - 1)
    sys.exit("read past the end succeeded")
except nbd.Error as e:
    assert "out of bounds" not in str(e) and "Invalid argument" in str(e), str(e)
h.flush()
h.shutdown()
print("ok")
"#;
    let out = run(Command::new(PYTHON).args(["-c", script, &f.uri("e")]));
    assert_eq!(out.trim(), "ok");
    assert_eq!(
        &backend.contents()[(1 << 20) + 4096 * 5..(1 << 20) + 4096 * 6],
        &[5u8; 4096]
    );
}

#[test]
fn qemu_io_and_qemu_img() {
    if !have("qemu-io") || !have("qemu-img") {
        return;
    }
    let (f, backend) = Fixture::with_export("e", false, 4 * MIB);
    let uri = f.uri("e");
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "write -P 0xcd 1M 1M",
        "-c",
        "write -z 1536k 64k",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "read -P 0xcd 1M 512k",
        "-c",
        "read -P 0 1536k 64k",
        "-c",
        "discard 3M 64k",
        "-c",
        "flush",
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(&backend.contents()[..65536], &[0xab; 65536]);
    // The same writes on a local file: the images must compare equal.
    let file = f.dir.path().join("ref.raw");
    run(Command::new("qemu-img")
        .args(["create", "-f", "raw"])
        .arg(&file)
        .arg("4M"));
    run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(&file)
        .args([
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -P 0xcd 1M 1M",
            "-c",
            "write -z 1536k 64k",
        ]));
    let cmp = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&file)
        .arg(&uri));
    assert!(cmp.contains("Images are identical"), "{cmp}");
    // qemu-img map reads base:allocation (qemu 10 negotiates extended headers).
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let map: Value = serde_json::from_str(&map).unwrap();
    let first = &map[0];
    assert_eq!(
        (
            first["start"].as_u64(),
            first["length"].as_u64(),
            first["data"].as_bool()
        ),
        (Some(0), Some(65536), Some(true))
    );
    let second = &map[1];
    assert_eq!(
        (
            second["start"].as_u64(),
            second["zero"].as_bool(),
            second["data"].as_bool()
        ),
        (Some(65536), Some(true), Some(false))
    );
}

/// Start QSD with a null-co export like the brief's reference run; `None` if it cannot run.
fn start_qsd(dir: &std::path::Path) -> Option<(std::process::Child, String)> {
    let sock = dir.join("qsd.sock");
    let child = Command::new("qemu-storage-daemon")
        .args(["--blockdev", "null-co,node-name=n0,size=1073741824"])
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .args(["--export", "nbd,id=e0,node-name=n0,writable=on"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // The socket file appears at bind(), a moment before listen(): wait until
    // a connection goes through (QSD drops this one).
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((child, format!("nbd+unix:///n0?socket={}", sock.display())))
}

#[test]
fn same_nbdinfo_view_as_qemu_storage_daemon() {
    if !have("nbdinfo") || !have("qemu-storage-daemon") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some((mut qsd, qsd_uri)) = start_qsd(dir.path()) else {
        skip("qemu-storage-daemon did not start");
        return;
    };
    let theirs = nbdinfo_json(&qsd_uri);
    let _ = qsd.kill();
    let _ = qsd.wait();
    let f = Fixture::new(nbd::ServerConfig::default());
    f.add("n0", false, Arc::new(MemBackend::new(1 << 30)), &[]);
    let ours = nbdinfo_json(&f.uri("n0"));
    for key in ["protocol", "TLS", "structured"] {
        assert_eq!(ours[key], theirs[key], "{key}");
    }
    let (o, t) = (&ours["exports"][0], &theirs["exports"][0]);
    let mut compared = 0;
    for (key, value) in t.as_object().unwrap() {
        if ["uri", "description", "content"].contains(&key.as_str()) {
            continue;
        }
        assert_eq!(&o[key], value, "field {key}");
        compared += 1;
    }
    assert!(compared > 10, "only {compared} fields compared");
}
