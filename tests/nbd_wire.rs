//! NBD bad input on the wire, differentially: the same malformed options and requests are
//! sent to blkd and to qemu-storage-daemon, and every reply must be the same, apart from the
//! errnos blkd takes from the NBD spec where QEMU sends EINVAL for every refusal.

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Daemon, Impl};
use nbd::client::{Client, Handshake, OptionReply};
use nbd::proto;
use serde_json::json;

const MIB: u64 = 1 << 20;

/// `which` serving a 4 MiB raw image as `disk` (writable) and `bk` (read-only, with dirty
/// bitmap `b0`, disabled, and no allocation depth).
fn start(which: Impl) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.raw");
    common::make_image(&img, 4 * MIB as usize, 7);
    let sock = dir.path().join("nbd.sock");
    let d = Daemon::start_in(
        which,
        dir,
        &[
            "--blockdev",
            &format!("file,node-name=file0,filename={}", img.display()),
            "--blockdev",
            "raw,node-name=disk0,file=file0",
            "--nbd-server",
            &format!("addr.type=unix,addr.path={}", sock.display()),
        ],
    );
    let mut qmp = d.qmp();
    qmp.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "b0"}),
    );
    // A read-only export takes only a frozen bitmap.
    qmp.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "disk0", "name": "b0"}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "disk0", "name": "disk",
               "description": "test disk", "writable": true}),
    );
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e1", "node-name": "disk0", "name": "bk",
               "bitmaps": ["b0"]}),
    );
    d
}

fn connect(d: &Daemon) -> Box<UnixStream> {
    let s = UnixStream::connect(d.path("nbd.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    Box::new(s)
}

fn show_replies(replies: &[OptionReply]) -> String {
    replies
        .iter()
        .map(|r| format!("{:#x} {:?}", r.reply_type, r.text()))
        .collect::<Vec<_>>()
        .join(" | ")
}

fn string32(s: &[u8]) -> Vec<u8> {
    let mut b = (s.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(s);
    b
}

fn info_payload(name: &[u8], requests: &[u16]) -> Vec<u8> {
    let mut p = string32(name);
    p.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        p.extend_from_slice(&r.to_be_bytes());
    }
    p
}

fn meta_payload(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut p = string32(name);
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        p.extend_from_slice(&string32(q));
    }
    p
}

/// Malformed and edge-case options, each on a connection that must stay usable.
fn option_transcript(d: &Daemon) -> Vec<String> {
    let mut out = Vec::new();
    let mut h = Handshake::start(connect(d)).unwrap();
    let mut ask = |h: &mut Handshake, what: &str, option: u32, payload: &[u8]| {
        let replies = h.option(option, payload).expect(what);
        out.push(format!("{what}: {}", show_replies(&replies)));
    };
    let mut trailing = info_payload(b"disk", &[]);
    trailing.push(0);
    let mut truncated = info_payload(b"disk", &[proto::INFO_NAME]);
    truncated.pop();
    let (info, list) = (proto::OPT_INFO, proto::OPT_LIST_META_CONTEXT);
    let steps = [
        // The description comes unasked.
        ("info, no requests", info, info_payload(b"disk", &[])),
        (
            "info, 5000-byte name",
            info,
            info_payload(&[b'x'; 5000], &[]),
        ),
        ("info, NUL in name", info, info_payload(b"di\0sk", &[])),
        (
            "go, name not UTF-8",
            proto::OPT_GO,
            info_payload(&[0xff, 0xfe], &[]),
        ),
        ("info, trailing byte", info, trailing),
        ("info, truncated", info, truncated),
        ("starttls with payload", proto::OPT_STARTTLS, b"x".to_vec()),
        (
            "list contexts, NUL in query",
            list,
            meta_payload(b"bk", &[b"base:\0x"]),
        ),
        ("list contexts, all", list, meta_payload(b"bk", &[])),
        (
            "list contexts, namespaces",
            list,
            meta_payload(b"bk", &[b"qemu:", b"base:"]),
        ),
        (
            "list contexts, 5000-byte query",
            list,
            meta_payload(b"bk", &[&[b'q'; 5000], b"base:allocation"]),
        ),
        (
            "list contexts, unknown export",
            list,
            meta_payload(b"nosuch", &[b"base:allocation"]),
        ),
    ];
    for (what, option, payload) in &steps {
        ask(&mut h, what, *option, payload);
    }
    h.structured_replies().unwrap();
    // Ids are QEMU's fixed ones: a bitmap is 2 even without allocation depth.
    ask(
        &mut h,
        "set contexts, bitmap first",
        proto::OPT_SET_META_CONTEXT,
        &meta_payload(b"bk", &[b"qemu:dirty-bitmap:b0", b"base:allocation"]),
    );
    let mut c = h.go("bk").expect("GO after bad options");
    let cookie = c
        .send_request(0, proto::CMD_BLOCK_STATUS, 0, MIB, &[])
        .unwrap();
    let reply = c.receive_reply().unwrap();
    assert_eq!(reply.cookie, cookie);
    let ids: Vec<u32> = reply.block_status.iter().map(|(id, _)| *id).collect();
    out.push(format!("block status ids: {ids:?}"));
    out
}

/// QEMU refuses every bad request with EINVAL; blkd sends the spec's EPERM (read-only) and
/// ENOSPC (writing past the end) instead, as its README says. Compared as QEMU's.
fn as_qemu_errno(errno: u32) -> u32 {
    match errno {
        proto::EPERM | proto::ENOSPC => proto::EINVAL,
        e => e,
    }
}

fn request(c: &mut Client, flags: u16, command: u16, offset: u64, len: u64, pay: &[u8]) -> String {
    let cookie = c.send_request(flags, command, offset, len, pay).unwrap();
    let reply = c.receive_reply().unwrap();
    assert_eq!(reply.cookie, cookie);
    match reply.error {
        Some((errno, msg)) => format!("error {} {msg:?}", as_qemu_errno(errno)),
        None => format!("ok, status ids {:?}", {
            reply
                .block_status
                .iter()
                .map(|(id, _)| *id)
                .collect::<Vec<_>>()
        }),
    }
}

/// The rest of the connection after a request with a bad magic: the reply, then the end.
fn after_bad_magic(c: &mut Client, header: &[u8]) -> String {
    let s = c.stream_mut();
    s.write_all(header).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    format!("{rest:02x?}")
}

fn bad_header(magic: u32, cookie: u64, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    b[0..4].copy_from_slice(&magic.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// One request of a transcript: what it tests, flags, command, offset, length, payload.
type Step = (&'static str, u16, u16, u64, u64, &'static [u8]);

fn run_steps(c: &mut Client, prefix: &str, steps: &[Step], out: &mut Vec<String>) {
    for &(what, flags, command, offset, len, payload) in steps {
        let got = request(c, flags, command, offset, len, payload);
        out.push(format!("{prefix}{what}: {got}"));
    }
}

fn request_transcript(d: &Daemon) -> Vec<String> {
    const SIZE: u64 = 4 * MIB;
    let mut out = Vec::new();
    let mut c = Client::connect(connect(d), "disk", false, &["base:allocation"]).unwrap();
    let steps: &[Step] = &[
        ("flush past EOF", 0, proto::CMD_FLUSH, SIZE, 1, &[]),
        ("cache too long", 0, proto::CMD_CACHE, 0, 64 * MIB, &[]),
        ("read too long", 0, proto::CMD_READ, 0, 64 * MIB, &[]),
        ("unknown command", 0, 99, 0, 0, &[]),
        ("unknown command past EOF", 0, 99, SIZE + 1, 0, &[]),
        ("unknown command, a flag", 4, 99, 0, 0, &[]),
        ("read, unknown flag", 0x8000, proto::CMD_READ, 0, 8, &[]),
        (
            "read past EOF, unknown flag",
            0x8000,
            proto::CMD_READ,
            SIZE,
            8,
            &[],
        ),
        (
            "trim past EOF, unknown flag",
            0x8000,
            proto::CMD_TRIM,
            SIZE,
            8,
            &[],
        ),
        ("write past EOF", 0, proto::CMD_WRITE, SIZE - 2, 4, b"abcd"),
        (
            "write zeroes past EOF",
            0,
            proto::CMD_WRITE_ZEROES,
            SIZE,
            1,
            &[],
        ),
        (
            "block status, no length",
            0,
            proto::CMD_BLOCK_STATUS,
            0,
            0,
            &[],
        ),
        ("block status", 0, proto::CMD_BLOCK_STATUS, 0, MIB, &[]),
    ];
    run_steps(&mut c, "", steps, &mut out);
    out.push(format!(
        "bad magic: {}",
        after_bad_magic(&mut c, &bad_header(0xdead_beef, 77, 28))
    ));
    let mut c = Client::connect(connect(d), "bk", false, &[]).unwrap();
    let steps: &[Step] = &[
        ("write", 0, proto::CMD_WRITE, 0, 4, b"abcd"),
        (
            "write zeroes past EOF",
            0,
            proto::CMD_WRITE_ZEROES,
            SIZE,
            1,
            &[],
        ),
        ("trim, unknown flag", 0x8000, proto::CMD_TRIM, 0, 8, &[]),
        (
            "block status not negotiated",
            0,
            proto::CMD_BLOCK_STATUS,
            0,
            8,
            &[],
        ),
    ];
    run_steps(&mut c, "read-only ", steps, &mut out);
    out
}

/// Extended headers: BLOCK_STATUS payloads naming contexts, and the magic expected then.
fn extended_transcript(d: &Daemon) -> Vec<String> {
    let mut out = Vec::new();
    let contexts = ["base:allocation", "qemu:dirty-bitmap:b0"];
    let mut c = Client::connect(connect(d), "bk", true, &contexts).unwrap();
    out.push(format!("flags {:#x}", c.info().flags));
    let ids = |list: &[u32]| {
        let mut p = MIB.to_be_bytes().to_vec();
        for id in list {
            p.extend_from_slice(&id.to_be_bytes());
        }
        p
    };
    for (what, list) in [
        ("bitmap only", &[2][..]),
        ("both, reversed", &[2, 0]),
        ("twice", &[0, 0]),
        ("unselected", &[1]),
        ("more than selected", &[0, 2, 0]),
    ] {
        let got = request(&mut c, 0, proto::CMD_BLOCK_STATUS, 0, 0, &ids(list));
        out.push(format!("status payload {what}: {got}"));
    }
    let short = request(&mut c, 0, proto::CMD_BLOCK_STATUS, 0, 0, &[0; 6]);
    out.push(format!("status payload too short: {short}"));
    out.push(format!(
        "bad magic: {}",
        after_bad_magic(&mut c, &bad_header(proto::REQUEST_MAGIC, 5, 32))
    ));
    out
}

#[test]
fn malformed_options_and_requests_get_qsd_answers() {
    let transcript = |which| {
        let d = start(which);
        let mut t = option_transcript(&d);
        t.extend(request_transcript(&d));
        t.extend(extended_transcript(&d));
        // The daemon is still serving.
        let mut c = Client::connect(connect(&d), "disk", false, &[]).unwrap();
        c.write(0, b"alive", proto::CMD_FLAG_FUA).unwrap();
        assert_eq!(c.read(0, 5, 0).unwrap(), b"alive");
        t
    };
    let blkd = transcript(Impl::Blkd);
    let qsd = transcript(Impl::Qsd);
    for (b, q) in blkd.iter().zip(&qsd) {
        assert_eq!(b, q, "blkd, then QSD");
    }
    assert_eq!(blkd.len(), qsd.len());
}

/// One BLOCK_STATUS with a payload, on a connection that selected no context, makes QSD
/// 10.0.2 abort (an assertion in nbd_co_block_status_payload_read), taking every export
/// down. blkd refuses the request and carries on.
#[test]
fn block_status_payload_without_contexts_is_refused() {
    let d = start(Impl::Blkd);
    let mut c = Client::connect(connect(&d), "disk", true, &[]).unwrap();
    let mut payload = MIB.to_be_bytes().to_vec();
    payload.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(
        request(&mut c, 0, proto::CMD_BLOCK_STATUS, 0, 0, &payload),
        "error 22 \"CMD_BLOCK_STATUS payload not valid\""
    );
    c.write(0, b"alive", 0).unwrap();
    assert_eq!(c.read(0, 5, 0).unwrap(), b"alive");
    let mut other = Client::connect(connect(&d), "bk", false, &[]).unwrap();
    assert_eq!(other.read(0, 5, 0).unwrap(), b"alive");
}
