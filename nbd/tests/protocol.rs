//! The server driven by the in-crate client and by raw bytes.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Fixture;
use nbd::client::{Client, Handshake};
use nbd::proto::{self, Extent};
use nbd::test_utils::{MemBackend, BLOCK};
use nbd::{Error, ExportConfig, RemoveMode, ServerConfig, Stream, TlsUpgrade};

const MIB: u64 = 1024 * 1024;

fn errno(r: Result<impl std::fmt::Debug, Error>) -> u32 {
    match r {
        Err(Error::Command { errno, .. }) => errno,
        other => panic!("expected a command error, got {other:?}"),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn flags_block_sizes_and_info() {
    let (f, _) = Fixture::with_export("rw", false, 4 * MIB);
    f.add("ro", true, Arc::new(MemBackend::new(MIB)), &[]);
    let mut h = Handshake::start(f.connect()).unwrap();
    assert_eq!(
        h.list().unwrap(),
        vec![
            ("rw".to_string(), "test export rw".to_string()),
            ("ro".to_string(), "test export ro".to_string())
        ]
    );
    let ro = h
        .info(
            "ro",
            &[
                proto::INFO_NAME,
                proto::INFO_DESCRIPTION,
                proto::INFO_BLOCK_SIZE,
            ],
        )
        .unwrap();
    assert_eq!(ro.flags, 0x50f, "QSD's read-only flags");
    assert_eq!(ro.size, MIB);
    assert_eq!(ro.name.as_deref(), Some("ro"));
    assert_eq!(ro.description.as_deref(), Some("test export ro"));
    assert_eq!(ro.block_sizes, Some((1, 4096, 32 * 1024 * 1024)));
    let rw = h.info("rw", &[]).unwrap();
    assert_eq!(rw.flags, 0xd6d, "QSD's writable flags");
    assert_eq!(rw.name, None);
    assert!(
        rw.block_sizes.is_some(),
        "block sizes are sent even when not asked for"
    );
    h.structured_replies().unwrap();
    assert_eq!(
        h.info("rw", &[]).unwrap().flags,
        0xded,
        "SEND_DF once structured"
    );
    let c = h.go("rw").unwrap();
    assert_eq!(c.info().size, 4 * MIB);
    c.disconnect().unwrap();
}

fn option_reply(h: &mut Handshake, option: u32, payload: &[u8]) -> (u32, String) {
    let replies = h.option(option, payload).unwrap();
    let last = replies.last().unwrap();
    (last.reply_type, last.text())
}

fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut p = Vec::new();
    proto::put_string32(&mut p, name);
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        proto::put_string32(&mut p, q);
    }
    p
}

#[test]
fn option_errors_carry_qsd_texts() {
    let (f, _) = Fixture::with_export("e", false, MIB);
    let mut h = Handshake::start(f.connect()).unwrap();
    assert_eq!(
        option_reply(&mut h, 99, b"junk"),
        (
            proto::REP_ERR_UNSUP,
            "Unsupported option 99 (<unknown>)".into()
        )
    );
    assert_eq!(
        option_reply(&mut h, proto::OPT_PEEK_EXPORT, &[]),
        (
            proto::REP_ERR_UNSUP,
            "Unsupported option 4 (peek export)".into()
        )
    );
    assert_eq!(
        option_reply(&mut h, proto::OPT_STARTTLS, &[]),
        (proto::REP_ERR_POLICY, "TLS not configured".into())
    );
    assert_eq!(
        option_reply(&mut h, proto::OPT_LIST, b"x"),
        (
            proto::REP_ERR_INVALID,
            "option 'list' has unexpected length".into()
        )
    );
    let mut info = Vec::new();
    proto::put_string32(&mut info, "nosuch");
    info.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(
        option_reply(&mut h, proto::OPT_GO, &info),
        (proto::REP_ERR_UNKNOWN, "export 'nosuch' not present".into())
    );
    assert_eq!(
        option_reply(&mut h, proto::OPT_INFO, &info[..5]),
        (
            proto::REP_ERR_INVALID,
            "Inconsistent lengths in option info".into()
        )
    );
    assert_eq!(
        option_reply(
            &mut h,
            proto::OPT_SET_META_CONTEXT,
            &meta("e", &["base:allocation"])
        ),
        (
            proto::REP_ERR_INVALID,
            "request option 'set meta context' when structured reply is not negotiated".into()
        )
    );
    assert_eq!(
        option_reply(&mut h, proto::OPT_STRUCTURED_REPLY, b"x"),
        (
            proto::REP_ERR_INVALID,
            "option 'structured reply' has unexpected length".into()
        )
    );
    h.structured_replies().unwrap();
    assert_eq!(
        option_reply(&mut h, proto::OPT_STRUCTURED_REPLY, &[]),
        (
            proto::REP_ERR_INVALID,
            "structured reply already negotiated".into()
        )
    );
    h.extended_headers().unwrap();
    assert_eq!(
        option_reply(&mut h, proto::OPT_EXTENDED_HEADERS, &[]),
        (
            proto::REP_ERR_INVALID,
            "extended headers already negotiated".into()
        )
    );
    assert_eq!(
        option_reply(&mut h, proto::OPT_STRUCTURED_REPLY, &[]),
        (
            proto::REP_ERR_EXT_HEADER_REQD,
            "extended headers already negotiated".into()
        )
    );
    // Still usable after all those errors.
    let mut c = h.go("e").unwrap();
    c.write(0, b"ok", 0).unwrap();
    assert_eq!(c.read(0, 2, 0).unwrap(), b"ok");
}

#[test]
fn meta_context_queries_like_qemu() {
    let f = Fixture::new(ServerConfig::default());
    let backend = MemBackend::new(MIB)
        .with_context_map(vec![Extent {
            length: MIB,
            flags: 1,
        }])
        .with_context_map(vec![
            Extent {
                length: 65536,
                flags: 0,
            },
            Extent {
                length: MIB - 65536,
                flags: 1,
            },
        ]);
    f.add(
        "e",
        false,
        Arc::new(backend),
        &["qemu:allocation-depth", "qemu:dirty-bitmap:b0"],
    );
    let mut h = Handshake::start(f.connect()).unwrap();
    let names = |v: Vec<(u32, String)>| v.into_iter().map(|(_, n)| n).collect::<Vec<_>>();
    let all = [
        "base:allocation",
        "qemu:allocation-depth",
        "qemu:dirty-bitmap:b0",
    ];
    assert_eq!(names(h.list_meta_contexts("e", &[]).unwrap()), all);
    assert_eq!(
        names(h.list_meta_contexts("e", &["base:"]).unwrap()),
        ["base:allocation"]
    );
    assert_eq!(
        names(h.list_meta_contexts("e", &["qemu:"]).unwrap()),
        &all[1..]
    );
    assert_eq!(
        names(h.list_meta_contexts("e", &["qemu:dirty-bitmap:"]).unwrap()),
        ["qemu:dirty-bitmap:b0"]
    );
    assert!(h
        .list_meta_contexts("e", &["qemu:nope", "x-unknown:"])
        .unwrap()
        .is_empty());
    assert!(h
        .list_meta_contexts("e", &[])
        .unwrap()
        .iter()
        .all(|(id, _)| *id == 0));
    match h.list_meta_contexts("nosuch", &[]) {
        Err(Error::OptionRefused {
            reply_type,
            message,
            ..
        }) => {
            assert_eq!(reply_type, proto::REP_ERR_UNKNOWN);
            assert_eq!(message, "export 'nosuch' not present");
        }
        other => panic!("unexpected {other:?}"),
    }
    h.structured_replies().unwrap();
    assert!(
        h.set_meta_contexts("e", &["qemu:"]).unwrap().is_empty(),
        "no wildcards in SET"
    );
    let set = h
        .set_meta_contexts(
            "e",
            &[
                "qemu:dirty-bitmap:b0",
                "base:allocation",
                "qemu:nope",
                "qemu:allocation-depth",
                "foo:bar",
            ],
        )
        .unwrap();
    assert_eq!(
        set,
        vec![
            (0, "base:allocation".to_string()),
            (1, "qemu:allocation-depth".to_string()),
            (2, "qemu:dirty-bitmap:b0".to_string())
        ]
    );
    let mut c = h.go("e").unwrap();
    c.write(4096, &[1; 4096], 0).unwrap();
    let status = c.block_status(0, 3 * 65536, 0).unwrap();
    assert_eq!(
        status,
        vec![
            (
                0,
                vec![
                    Extent {
                        length: 4096,
                        flags: 3
                    },
                    Extent {
                        length: 4096,
                        flags: 0
                    },
                    Extent {
                        length: 3 * 65536 - 8192,
                        flags: 3
                    }
                ]
            ),
            (
                1,
                vec![Extent {
                    length: 3 * 65536,
                    flags: 1
                }]
            ),
            (
                2,
                vec![
                    Extent {
                        length: 65536,
                        flags: 0
                    },
                    Extent {
                        length: 2 * 65536,
                        flags: 1
                    }
                ]
            ),
        ]
    );
    let one = c
        .block_status(0, 3 * 65536, proto::CMD_FLAG_REQ_ONE)
        .unwrap();
    assert_eq!(
        one[0].1,
        vec![Extent {
            length: 4096,
            flags: 3
        }]
    );
    assert_eq!(
        one[2].1,
        vec![Extent {
            length: 65536,
            flags: 0
        }]
    );
    assert_eq!(errno(c.block_status(0, 0, 0)), proto::EINVAL);
    assert_eq!(errno(c.block_status(MIB - 512, 1024, 0)), proto::EINVAL);
}

#[test]
fn contexts_dropped_when_go_names_another_export() {
    let (f, _) = Fixture::with_export("a", false, MIB);
    f.add("b", false, Arc::new(MemBackend::new(MIB)), &[]);
    let mut h = Handshake::start(f.connect()).unwrap();
    h.structured_replies().unwrap();
    h.set_meta_contexts("a", &["base:allocation"]).unwrap();
    let mut c = h.go("b").unwrap();
    match c.block_status(0, 4096, 0) {
        Err(Error::Command { errno, message, .. }) => {
            assert_eq!(errno, proto::EINVAL);
            assert_eq!(message, "CMD_BLOCK_STATUS not negotiated");
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn io_suite(c: &mut Client, backend: &MemBackend) {
    let size = c.info().size;
    let data = pattern(256 * 1024, 7);
    c.write(8192, &data, 0).unwrap();
    assert_eq!(c.read(8192, data.len() as u32, 0).unwrap(), data);
    assert_eq!(&backend.contents()[8192..8192 + data.len()], &data[..]);
    // FUA reaches the backend.
    c.write(0, b"fua", proto::CMD_FLAG_FUA).unwrap();
    assert_eq!(backend.fua_writes(), 1);
    let flushes = backend.flushes();
    c.flush().unwrap();
    assert_eq!(backend.flushes(), flushes + 1);
    // Unaligned one-byte read works (minimum block size 1).
    assert_eq!(c.read(1, 1, 0).unwrap(), b"u");
    // Trim and write zeroes read back as zeroes and become holes.
    c.trim(8192, 65536, 0).unwrap();
    assert_eq!(c.read(8192, 65536, 0).unwrap(), vec![0; 65536]);
    c.write_zeroes(8192 + 65536, 65536, proto::CMD_FLAG_FAST_ZERO)
        .unwrap();
    assert_eq!(c.read(8192 + 65536, 65536, 0).unwrap(), vec![0; 65536]);
    // Fast zero that would not be fast: ENOTSUP and nothing changed.
    let before = c.read(8192 + 131072, 4096, 0).unwrap();
    assert_eq!(
        errno(c.write_zeroes(
            8192 + 131072,
            4096,
            proto::CMD_FLAG_NO_HOLE | proto::CMD_FLAG_FAST_ZERO
        )),
        proto::ENOTSUP
    );
    assert_eq!(c.read(8192 + 131072, 4096, 0).unwrap(), before);
    c.write_zeroes(8192 + 131072, 4096, proto::CMD_FLAG_NO_HOLE)
        .unwrap();
    assert_eq!(c.read(8192 + 131072, 4096, 0).unwrap(), vec![0; 4096]);
    c.cache(0, 65536).unwrap();
    // Bounds.
    assert_eq!(errno(c.write(size - 1, b"xy", 0)), proto::ENOSPC);
    assert_eq!(errno(c.write_zeroes(size, 1, 0)), proto::ENOSPC);
    assert_eq!(errno(c.read(size - 1, 2, 0)), proto::EINVAL);
    assert_eq!(errno(c.trim(size + 4096, 1, 0)), proto::EINVAL);
    assert_eq!(errno(c.cache(u64::MAX, 2)), proto::EINVAL);
    assert_eq!(errno(c.read(0, 32 * 1024 * 1024 + 1, 0)), proto::EINVAL);
    // Bad flags and unknown commands: EINVAL, connection goes on.
    assert_eq!(errno(c.read(0, 4, proto::CMD_FLAG_NO_HOLE)), proto::EINVAL);
    let cookie = c.send_request(0, 42, 0, 0, &[]).unwrap();
    let r = c.receive_reply().unwrap();
    assert_eq!(r.cookie, cookie);
    assert_eq!(r.error.as_ref().map(|e| e.0), Some(proto::EINVAL));
    assert_eq!(c.read(size - 4096, 4096, 0).unwrap().len(), 4096);
}

#[test]
fn structured_io() {
    let (f, backend) = Fixture::with_export("e", false, 4 * MIB);
    let mut c = Client::connect(f.connect(), "e", false, &["base:allocation"]).unwrap();
    assert!(c.structured() && !c.extended());
    io_suite(&mut c, &backend);
    // Sparse read: hole chunks where the disk is unallocated, one data chunk with DF.
    let (a, b) = (2 * MIB, 2 * MIB + 3 * BLOCK);
    c.write(a, &[0xaa; 4096], 0).unwrap();
    c.write(b, &[0xbb; 4096], 0).unwrap();
    let r = c.read_reply(a, 4 * 4096, 0).unwrap();
    assert_eq!(
        r.chunk_types,
        vec![
            proto::REPLY_TYPE_OFFSET_DATA,
            proto::REPLY_TYPE_OFFSET_HOLE,
            proto::REPLY_TYPE_OFFSET_DATA
        ]
    );
    let mut expect = vec![0xaa; 4096];
    expect.extend(vec![0; 8192]);
    expect.extend(vec![0xbb; 4096]);
    assert_eq!(r.data, expect);
    let df = c.read_reply(a, 4 * 4096, proto::CMD_FLAG_DF).unwrap();
    assert_eq!(df.chunk_types, vec![proto::REPLY_TYPE_OFFSET_DATA]);
    assert_eq!(df.data, expect);
    let status = c.block_status(a, 4 * 4096, 0).unwrap();
    assert_eq!(
        status,
        vec![(
            0,
            vec![
                Extent {
                    length: 4096,
                    flags: 0
                },
                Extent {
                    length: 8192,
                    flags: 3
                },
                Extent {
                    length: 4096,
                    flags: 0
                }
            ]
        )]
    );
    // Errors in structured mode come with QEMU's messages.
    match c.write(4 * MIB, b"x", 0) {
        Err(Error::Command { errno, message, .. }) => {
            assert_eq!(errno, proto::ENOSPC);
            assert_eq!(
                message,
                format!(
                    "operation past EOF; From: {}, Len: 1, Size: {}",
                    4 * MIB,
                    4 * MIB
                )
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn simple_replies_io() {
    let (f, backend) = Fixture::with_export("", false, 4 * MIB);
    let c = Handshake::start(f.connect()).unwrap();
    let mut c = c.go("").unwrap();
    assert!(!c.structured());
    io_suite(&mut c, &backend);
    let r = c.read_reply(0, 4096, 0).unwrap();
    assert!(r.chunk_types.is_empty(), "simple reply");
    assert_eq!(
        errno(c.read(0, 4, proto::CMD_FLAG_DF)),
        proto::EINVAL,
        "DF needs structured replies"
    );
}

#[test]
fn extended_headers_io() {
    let (f, backend) = Fixture::with_export("e", false, 4 * MIB);
    let mut c = Client::connect(f.connect(), "e", true, &["base:allocation"]).unwrap();
    assert!(c.extended());
    io_suite(&mut c, &backend);
    c.write(MIB, &[5; 4096], 0).unwrap();
    let cookie = c
        .send_request(0, proto::CMD_BLOCK_STATUS, MIB - 8192, 3 * 4096, &[])
        .unwrap();
    let r = c.receive_reply().unwrap();
    assert_eq!(r.cookie, cookie);
    assert_eq!(r.chunk_types, vec![proto::REPLY_TYPE_BLOCK_STATUS_EXT]);
    assert_eq!(
        r.block_status,
        vec![(
            0,
            vec![
                Extent {
                    length: 8192,
                    flags: 3
                },
                Extent {
                    length: 4096,
                    flags: 0
                }
            ]
        )]
    );
    assert_eq!(
        c.info().flags,
        0x1ded,
        "QSD's flags with extended headers and contexts"
    );
    // BLOCK_STATUS with a payload: effect length, then the wanted context ids.
    let mut payload = (3 * 4096u64).to_be_bytes().to_vec();
    payload.extend_from_slice(&0u32.to_be_bytes());
    c.send_request(0, proto::CMD_BLOCK_STATUS, MIB - 8192, 0, &payload)
        .unwrap();
    let r = c.receive_reply().unwrap();
    assert_eq!(r.error, None);
    assert_eq!(
        r.block_status,
        vec![(
            0,
            vec![
                Extent {
                    length: 8192,
                    flags: 3
                },
                Extent {
                    length: 4096,
                    flags: 0
                }
            ]
        )]
    );
    payload.extend_from_slice(&7u32.to_be_bytes());
    c.send_request(0, proto::CMD_BLOCK_STATUS, MIB - 8192, 0, &payload)
        .unwrap();
    assert_eq!(
        c.receive_reply().unwrap().error.map(|e| e.0),
        Some(proto::EINVAL)
    );
    let cookie = c.send_request(0, proto::CMD_FLUSH, 0, 0, &[]).unwrap();
    let r = c.receive_reply().unwrap();
    assert_eq!(
        (r.cookie, r.chunk_types.clone()),
        (cookie, vec![proto::REPLY_TYPE_NONE])
    );
    let r = c.read_reply(MIB, 4096, 0).unwrap();
    assert_eq!(r.data, vec![5; 4096]);
    // A payload on a command that takes none is consumed and refused.
    let cookie = c
        .send_request(0, proto::CMD_FLUSH, 0, 0, b"payload")
        .unwrap();
    let r = c.receive_reply().unwrap();
    assert_eq!(
        (r.cookie, r.error.map(|e| e.0)),
        (cookie, Some(proto::EINVAL))
    );
    assert_eq!(c.read(MIB, 4, 0).unwrap(), vec![5; 4]);
    // A 64-bit effect length beyond the export is refused, not truncated.
    assert_eq!(errno(c.trim(0, (1 << 32) + 4096, 0)), proto::EINVAL);
}

#[test]
fn read_only_export_refuses_writes() {
    let (f, _) = Fixture::with_export("ro", true, MIB);
    for extended in [false, true] {
        let mut c = Client::connect(f.connect(), "ro", extended, &[]).unwrap();
        assert_eq!(errno(c.write(0, b"x", 0)), proto::EPERM);
        assert_eq!(errno(c.trim(0, 4096, 0)), proto::EPERM);
        assert_eq!(errno(c.write_zeroes(0, 4096, 0)), proto::EPERM);
        assert_eq!(c.read(0, 4, 0).unwrap(), vec![0; 4]);
    }
}

#[test]
fn export_name_option_with_and_without_zeroes() {
    let (f, _) = Fixture::with_export("e", true, MIB);
    let h = Handshake::start_with_flags(f.connect(), proto::FLAG_C_FIXED_NEWSTYLE).unwrap();
    let mut c = h.export_name("e").unwrap();
    assert_eq!((c.info().size, c.info().flags), (MIB, 0x50f));
    assert_eq!(c.read(0, 8, 0).unwrap(), vec![0; 8]);
    let h = Handshake::start(f.connect()).unwrap();
    let mut c = h.export_name("e").unwrap();
    assert_eq!(c.read(0, 8, 0).unwrap(), vec![0; 8]);
    // Unknown name: the only possible answer is closing.
    let h = Handshake::start(f.connect()).unwrap();
    assert!(h.export_name("nosuch").is_err());
    // After extended headers EXPORT_NAME is a protocol violation.
    let mut h = Handshake::start(f.connect()).unwrap();
    h.extended_headers().unwrap();
    assert!(h.export_name("e").is_err());
}

fn read_to_end_within(s: &mut UnixStream, limit: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn malformed_handshakes_close_cleanly() {
    let (f, _) = Fixture::with_export("e", false, MIB);
    // Unknown client flags.
    let mut s = f.raw();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(greeting, proto::greeting());
    s.write_all(&0xffu32.to_be_bytes()).unwrap();
    assert!(read_to_end_within(&mut s, Duration::from_secs(5)).is_empty());
    // Non-fixed newstyle client asking for LIST.
    let mut s = f.raw();
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&0u32.to_be_bytes()).unwrap();
    s.write_all(&proto::option_request(proto::OPT_LIST, &[]))
        .unwrap();
    assert!(read_to_end_within(&mut s, Duration::from_secs(5)).is_empty());
    // Bad option magic.
    let mut s = f.raw();
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&[0x55; 16]).unwrap();
    assert!(read_to_end_within(&mut s, Duration::from_secs(5)).is_empty());
    // Oversized option length: disconnect without reading 4 GiB.
    let mut s = f.raw();
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = proto::option_request(proto::OPT_GO, &[]);
    opt[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&opt).unwrap();
    assert!(read_to_end_within(&mut s, Duration::from_secs(5)).is_empty());
    // Truncated option, then the client goes away.
    let mut s = f.raw();
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&proto::option_request(proto::OPT_GO, b"\0\0\0\x09abc")[..20])
        .unwrap();
    drop(s);
    // ABORT is acknowledged, then closed.
    let mut h = Handshake::start(f.connect()).unwrap();
    let ack = h.option(proto::OPT_ABORT, &[]).unwrap();
    assert_eq!(ack[0].reply_type, proto::REP_ACK);
    // The server still serves others.
    let mut c = Client::connect(f.connect(), "e", false, &[]).unwrap();
    c.write(0, b"alive", 0).unwrap();
    assert_eq!(c.read(0, 5, 0).unwrap(), b"alive");
}

#[test]
fn handshake_timeout_drops_silent_clients() {
    // Long enough for the negotiating client below to finish on a loaded machine.
    let timeout = Duration::from_secs(1);
    let f = Fixture::new(ServerConfig {
        handshake_timeout: Some(timeout),
        ..ServerConfig::default()
    });
    f.add("e", false, Arc::new(MemBackend::new(MIB)), &[]);
    // Started before connecting, so that the server's clock starts later.
    let start = Instant::now();
    let mut s = f.raw();
    let got = read_to_end_within(&mut s, Duration::from_secs(20));
    assert_eq!(got, proto::greeting(), "greeting, then closed");
    let took = start.elapsed();
    assert!(
        took >= timeout && took < Duration::from_secs(10),
        "{took:?}"
    );
    // A client that sends options and never reads the replies: once the socket buffers
    // are full the server's replies block, and the deadline must still drop it.
    let mut s = f.raw();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let list = proto::option_request(proto::OPT_LIST, &[]);
    let mut sent = 0;
    while sent < 64 * MIB as usize && s.write_all(&list).is_ok() {
        sent += list.len();
    }
    assert!(sent < 64 * MIB as usize, "the server kept reading options");
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.server.client_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        f.server.client_count(),
        0,
        "a client not reading replies stayed"
    );
    drop(s);
    // A client that finished negotiating is not affected by the timeout.
    let mut c = Client::connect(f.connect(), "e", false, &[]).unwrap();
    std::thread::sleep(timeout + Duration::from_millis(500));
    assert_eq!(c.read(0, 4, 0).unwrap(), vec![0; 4]);
}

#[test]
fn bad_transmission_input() {
    let (f, backend) = Fixture::with_export("e", false, MIB);
    // Client vanishing in the middle of a WRITE payload: nothing written, server fine.
    let mut c = Client::connect(f.connect(), "e", false, &[]).unwrap();
    let h = proto::RequestHeader {
        flags: 0,
        command: proto::CMD_WRITE,
        cookie: 1,
        offset: 0,
        length: 4096,
    };
    c.stream_mut().write_all(&h.encode_compact()).unwrap();
    c.stream_mut().write_all(&[0xee; 100]).unwrap();
    drop(c);
    // A truncated request header.
    let mut c = Client::connect(f.connect(), "e", false, &[]).unwrap();
    c.stream_mut().write_all(&h.encode_compact()[..10]).unwrap();
    drop(c);
    // Wrong request magic (the extended one without negotiating it): QEMU's EINVAL under
    // the cookie the bytes carry, then closed.
    let mut c = Client::connect(f.connect(), "e", false, &[]).unwrap();
    c.stream_mut().write_all(&h.encode_extended()).unwrap();
    let mut buf = Vec::new();
    let _ = c.stream_mut().read_to_end(&mut buf);
    let msg = b"invalid magic (got 0x21e41c71, expected 0x25609513)";
    let mut want = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    want.extend_from_slice(&proto::REPLY_FLAG_DONE.to_be_bytes());
    want.extend_from_slice(&proto::REPLY_TYPE_ERROR.to_be_bytes());
    want.extend_from_slice(&1u64.to_be_bytes());
    want.extend_from_slice(&(6 + msg.len() as u32).to_be_bytes());
    want.extend_from_slice(&proto::EINVAL.to_be_bytes());
    want.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    want.extend_from_slice(msg);
    assert_eq!(
        String::from_utf8_lossy(&buf),
        String::from_utf8_lossy(&want)
    );
    // Oversized WRITE: an error reply, then the server hangs up.
    let mut c = Client::connect(f.connect(), "e", false, &[]).unwrap();
    let big = proto::RequestHeader {
        length: 64 * MIB,
        ..h
    };
    c.stream_mut().write_all(&big.encode_compact()).unwrap();
    let mut reply = [0u8; 20];
    c.stream_mut().read_exact(&mut reply).unwrap();
    assert_eq!(&reply[0..4], &proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
    let mut rest = Vec::new();
    let _ = c.stream_mut().read_to_end(&mut rest);
    assert_eq!(&rest[0..4], &proto::EINVAL.to_be_bytes());
    // Requests in flight when the client disappears are dropped quietly.
    let mut c = Client::connect(f.connect(), "e", false, &[]).unwrap();
    for i in 0..8 {
        // DF: a hole would otherwise be answered without reading.
        c.send_request(proto::CMD_FLAG_DF, proto::CMD_READ, i * 4096, 4096, &[])
            .unwrap();
    }
    drop(c);
    let mut c = Client::connect(f.connect(), "e", false, &[]).unwrap();
    assert_eq!(c.read(0, 4096, 0).unwrap(), vec![0; 4096]);
    assert_eq!(backend.contents()[..4096], [0; 4096]);
    // Wait for the server to notice every closed connection. A connection
    // leaves the client table before it detaches from its export: wait for both.
    let deadline = Instant::now() + Duration::from_secs(20);
    while (f.server.client_count() > 1 || f.server.export_client_count("e") > 1)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(f.server.client_count(), 1);
    assert_eq!(f.server.export_client_count("e"), 1);
}

#[test]
fn requests_are_served_concurrently_and_out_of_order() {
    let f = Fixture::new(ServerConfig {
        max_in_flight: 32,
        ..ServerConfig::default()
    });
    // Long reads give the flush and the overlapped reads room on a loaded machine.
    let backend = Arc::new(MemBackend::new(MIB).with_read_delay(Duration::from_millis(200)));
    f.add("e", false, Arc::clone(&backend), &[]);
    for extended in [false, true] {
        let mut c = Client::connect(f.connect(), "e", extended, &[]).unwrap();
        c.write(0, &pattern(16 * 4096, 3), 0).unwrap();
        let start = Instant::now();
        let cookies: Vec<u64> = (0..16)
            .map(|i| {
                c.send_request(proto::CMD_FLAG_DF, proto::CMD_READ, i * 4096, 4096, &[])
                    .unwrap()
            })
            .collect();
        // Sent after the slow reads, answered before them.
        let flush = c.send_request(0, proto::CMD_FLUSH, 0, 0, &[]).unwrap();
        let expect = pattern(16 * 4096, 3);
        let mut flush_position = None;
        for n in 0..17 {
            let r = c.receive_reply().unwrap();
            if r.cookie == flush {
                flush_position = Some(n);
                continue;
            }
            let i = cookies.iter().position(|&k| k == r.cookie).unwrap();
            assert_eq!(r.data, &expect[i * 4096..(i + 1) * 4096]);
        }
        // The first read may be served inline by the reader (the idle fast path); the flush
        // must overtake most of the others (slack for a loaded 2-core machine).
        assert!(
            flush_position.is_some_and(|p| p < 8),
            "flush answered at {flush_position:?}"
        );
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(1600),
            "16 reads of 200 ms took {took:?}"
        );
    }
}

/// Small WRITEs pipelined so that many wait in the server's read buffer at once: those
/// served on the reader thread straight from that buffer and those (with FUA) handed to
/// the pool each land whole at their own offset, in every header mode.
#[test]
fn pipelined_small_writes_land_whole() {
    for extended in [false, true] {
        let (f, backend) = Fixture::with_export("e", false, 8 * MIB);
        let mut c = Client::connect(f.connect(), "e", extended, &[]).unwrap();
        let mut expected = vec![0u8; 8 * MIB as usize];
        let mut offset = 0usize;
        let mut fua = 0;
        let mut cookies = Vec::new();
        for i in 0..96usize {
            let len = [1, 512, 4096, 4097, 20_000, 65_536][i % 6];
            let data = pattern(len, i as u8);
            expected[offset..offset + len].copy_from_slice(&data);
            let flags = if i % 5 == 0 {
                fua += 1;
                proto::CMD_FLAG_FUA
            } else {
                0
            };
            cookies.push(
                c.send_request(flags, proto::CMD_WRITE, offset as u64, len as u64, &data)
                    .unwrap(),
            );
            offset += len + 3;
        }
        for _ in &cookies {
            let r = c.receive_reply().unwrap();
            assert_eq!(r.error, None, "write {}", r.cookie);
        }
        assert!(backend.contents() == expected, "extended={extended}");
        assert_eq!(backend.fua_writes(), fua);
    }
}

/// Small READs pipelined so that their replies share a batch, some of them failing on a
/// bad spot of the disk: each failure is an EIO reply of its own and every other reply
/// carries its own data, in every reply mode.
#[test]
fn failed_reads_among_batched_replies_stay_in_step() {
    for (structured, extended) in [(false, false), (true, false), (true, true)] {
        let f = Fixture::new(ServerConfig::default());
        let backend = Arc::new(MemBackend::new(MIB).with_bad_range(64 * 1024..68 * 1024));
        f.add("e", false, Arc::clone(&backend), &[]);
        let mut c = if structured {
            Client::connect(f.connect(), "e", extended, &[]).unwrap()
        } else {
            Handshake::start(f.connect())
                .unwrap()
                .export_name("e")
                .unwrap()
        };
        c.write(0, &pattern(MIB as usize, 9), 0).unwrap();
        let expect = pattern(MIB as usize, 9);
        let mut sent = Vec::new();
        for i in 0..64u64 {
            let offset = i * 2048;
            let len = 512 + (i % 4) * 1024;
            let flags = if structured { proto::CMD_FLAG_DF } else { 0 };
            let cookie = c
                .send_request(flags, proto::CMD_READ, offset, len, &[])
                .unwrap();
            sent.push((cookie, offset, len));
        }
        let mut failed = 0;
        for _ in &sent {
            let r = c.receive_reply().unwrap();
            let &(_, offset, len) = sent.iter().find(|s| s.0 == r.cookie).unwrap();
            let bad = offset < 68 * 1024 && offset + len > 64 * 1024;
            if bad {
                failed += 1;
                assert_eq!(r.error.map(|e| e.0), Some(proto::EIO), "read at {offset}");
            } else {
                assert_eq!(r.error, None, "read at {offset}");
                let (o, l) = (offset as usize, len as usize);
                assert!(r.data == expect[o..o + l], "data at {offset}");
            }
        }
        assert!(failed >= 2, "{failed} reads touched the bad range");
        c.disconnect().unwrap();
    }
}

#[test]
fn many_clients_in_parallel() {
    let (f, _) = Fixture::with_export("e", false, 8 * MIB);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let stream = f.connect();
            std::thread::spawn(move || {
                let mut c = Client::connect(stream, "e", t % 2 == 0, &[]).unwrap();
                for i in 0..32u64 {
                    let off = (t * 32 + i) * 8192;
                    let data = pattern(8192, (t * 32 + i) as u8);
                    c.write(off, &data, 0).unwrap();
                }
                for i in 0..32u64 {
                    let off = (t * 32 + i) * 8192;
                    assert_eq!(
                        c.read(off, 8192, 0).unwrap(),
                        pattern(8192, (t * 32 + i) as u8)
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn export_management() {
    let (f, _) = Fixture::with_export("e", false, MIB);
    let dup = f.server.add_export(
        ExportConfig {
            name: "e".into(),
            ..ExportConfig::default()
        },
        Arc::new(MemBackend::new(MIB)),
    );
    assert_eq!(
        dup.unwrap_err().to_string(),
        "NBD server already has export named 'e'"
    );
    let mut c = Client::connect(f.connect(), "e", false, &[]).unwrap();
    assert_eq!(f.server.export_client_count("e"), 1);
    let err = f
        .server
        .remove_export("e", RemoveMode::Safe, Box::new(|| {}))
        .unwrap_err();
    assert_eq!(err.to_string(), "export 'e' still in use");
    let (tx, rx) = std::sync::mpsc::channel();
    f.server
        .remove_export(
            "e",
            RemoveMode::Hard,
            Box::new(move || tx.send(()).unwrap()),
        )
        .unwrap();
    rx.recv_timeout(Duration::from_secs(20))
        .expect("export gone after its client");
    assert!(c.read(0, 4, 0).is_err(), "client was disconnected");
    assert!(f.server.export_names().is_empty());
    assert_eq!(
        f.server
            .remove_export("e", RemoveMode::Safe, Box::new(|| {}))
            .unwrap_err()
            .to_string(),
        "Export 'e' is not found"
    );
    // Name reusable; safe removal without clients is immediate.
    f.add("e", false, Arc::new(MemBackend::new(MIB)), &[]);
    let (tx, rx) = std::sync::mpsc::channel();
    f.server
        .remove_export(
            "e",
            RemoveMode::Safe,
            Box::new(move || tx.send(()).unwrap()),
        )
        .unwrap();
    rx.try_recv().expect("called at once");
    // Server shutdown drops everyone and refuses newcomers.
    f.add("e", false, Arc::new(MemBackend::new(MIB)), &[]);
    let mut c = Client::connect(f.connect(), "e", false, &[]).unwrap();
    f.server.shutdown();
    assert!(c.read(0, 4, 0).is_err());
    assert!(Handshake::start(f.connect()).is_err());
}

/// Stands in for a TLS library: the upgrade is a no-op, but the negotiation around it is real.
struct NullTls;

impl TlsUpgrade for NullTls {
    fn upgrade(&self, plain: Box<dyn Stream>) -> std::io::Result<Box<dyn Stream>> {
        Ok(plain)
    }
}

#[test]
fn tls_required_mode() {
    let f = Fixture::new(ServerConfig {
        tls: Some(Arc::new(NullTls)),
        ..ServerConfig::default()
    });
    f.add("e0", false, Arc::new(MemBackend::new(MIB)), &[]);
    let mut h = Handshake::start(f.connect()).unwrap();
    let mut go = Vec::new();
    proto::put_string32(&mut go, "e0");
    go.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(
        option_reply(&mut h, proto::OPT_GO, &go),
        (
            proto::REP_ERR_TLS_REQD,
            "Option 0x7 not permitted before TLS".into()
        )
    );
    assert_eq!(
        option_reply(&mut h, proto::OPT_LIST, &[]),
        (
            proto::REP_ERR_TLS_REQD,
            "Option 0x3 not permitted before TLS".into()
        )
    );
    assert_eq!(
        option_reply(&mut h, proto::OPT_STARTTLS, &[]).0,
        proto::REP_ACK
    );
    assert_eq!(
        option_reply(&mut h, proto::OPT_STARTTLS, &[]),
        (proto::REP_ERR_INVALID, "TLS already enabled".into())
    );
    assert_eq!(h.list().unwrap().len(), 1);
    h.structured_replies().unwrap();
    let mut c = h.go("e0").unwrap();
    c.write(0, b"tls", 0).unwrap();
    assert_eq!(c.read(0, 3, 0).unwrap(), b"tls");
    // EXPORT_NAME before TLS: hard disconnect.
    let h = Handshake::start(f.connect()).unwrap();
    assert!(h.export_name("e0").is_err());
}

#[test]
fn in_flight_requests_are_bounded() {
    let f = Fixture::new(ServerConfig {
        max_in_flight: 2,
        ..ServerConfig::default()
    });
    let backend = Arc::new(MemBackend::new(MIB).with_read_delay(Duration::from_millis(100)));
    f.add("e", false, backend, &[]);
    let mut c = Client::connect(f.connect(), "e", false, &[]).unwrap();
    let start = Instant::now();
    for i in 0..6 {
        // DF: a hole would otherwise be answered without reading.
        c.send_request(proto::CMD_FLAG_DF, proto::CMD_READ, i * 4096, 4096, &[])
            .unwrap();
    }
    for _ in 0..6 {
        assert_eq!(c.receive_reply().unwrap().error, None);
    }
    // At most 2 in the pool plus 1 inline: 6 reads need at least 2 rounds of 100 ms.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(200), "{took:?}");
}

#[test]
fn polling_connections_serve_every_request() {
    let f = Fixture::new(ServerConfig::default());
    let backend = Arc::new(MemBackend::new(4 * MIB));
    let config = ExportConfig {
        name: "p".into(),
        poll_max: Duration::from_micros(64),
        ..ExportConfig::default()
    };
    f.server.add_export(config, backend.clone()).unwrap();
    let mut c = Client::connect(f.connect(), "p", false, &["base:allocation"]).unwrap();
    io_suite(&mut c, &backend);
    // One request at a time, with pauses both shorter and longer than the poll window:
    // the reader polls, sleeps, and always wakes for the next one.
    for i in 0..200u64 {
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
        let data = [i as u8; 512];
        c.write(i * 512, &data, 0).unwrap();
        assert_eq!(c.read(i * 512, 512, proto::CMD_FLAG_DF).unwrap(), data);
    }
    // Its end is seen promptly too.
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(20);
    while f.server.client_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(f.server.client_count(), 0);
}
