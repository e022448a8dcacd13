//! Large READ payloads spliced from a file to the socket, large WRITE payloads from the
//! socket to the file: the data is right in every reply mode, over unix and TCP sockets,
//! mixed with small requests, and what the backend cannot splice is copied. WRITEs under
//! 256 KiB land whole or not at all, larger ones piece by piece as they arrive.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nbd::client::{Client, Handshake};
use nbd::proto;
use nbd::test_utils::{FileBackend, Receive};
use nbd::{ExportConfig, Server, ServerConfig, Stream};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 8 * MIB;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

struct Setup {
    _dir: tempfile::TempDir,
    file: File,
    backend: Arc<FileBackend>,
    server: Arc<Server>,
}

/// A server exporting a file of `file_len` bytes as an export of [`SIZE`] bytes.
fn setup(file_len: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all_at(&pattern(file_len as usize, 1), 0)
        .unwrap();
    let backend = Arc::new(FileBackend::new(file.try_clone().unwrap(), SIZE));
    let server = Server::new(ServerConfig::default());
    let config = ExportConfig {
        name: "e".into(),
        multi_conn: true,
        ..ExportConfig::default()
    };
    server.add_export(config, backend.clone()).unwrap();
    Setup {
        _dir: dir,
        file,
        backend,
        server,
    }
}

impl Setup {
    fn unix(&self) -> Box<dyn Stream> {
        let (ours, theirs) = UnixStream::pair().unwrap();
        self.server.serve_client(Box::new(theirs), Box::new(|| {}));
        Box::new(ours)
    }

    fn tcp(&self) -> Box<dyn Stream> {
        self.tcp_watched().0
    }

    /// A TCP connection, with the server's end of it to look at.
    fn tcp_watched(&self) -> (Box<dyn Stream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        theirs.set_nodelay(true).unwrap();
        let watched = theirs.try_clone().unwrap();
        self.server.serve_client(Box::new(theirs), Box::new(|| {}));
        (Box::new(ours), watched)
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.file.read_exact_at(&mut buf, offset).unwrap();
        buf
    }
}

/// Writes and reads large payloads at awkward offsets and checks them against the file.
fn round_trips(s: &Setup, c: &mut Client, seed: u8) {
    let cases: [(u64, usize); 4] = [
        (0, MIB as usize),
        (MIB + 512, 512 * 1024),
        (3 * MIB + 4095, 128 * 1024 + 7),
        (SIZE - MIB, MIB as usize),
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        let data = pattern(len, seed.wrapping_add(i as u8));
        c.write(offset, &data, 0).unwrap();
        assert_eq!(s.file_bytes(offset, len), data, "file after write {i}");
        // DF: one data chunk, whatever the allocation.
        let flags = if c.structured() {
            proto::CMD_FLAG_DF
        } else {
            0
        };
        assert_eq!(c.read(offset, len as u32, flags).unwrap(), data, "read {i}");
    }
}

#[test]
fn every_reply_mode_over_unix_and_tcp() {
    let s = setup(SIZE);
    for (transport, seed) in [("unix", 10u8), ("tcp", 50)] {
        let stream = || {
            if transport == "unix" {
                s.unix()
            } else {
                s.tcp()
            }
        };
        let before = s.backend.spliced_out();
        let before_in = s.backend.spliced_in();
        let mut simple = Handshake::start(stream()).unwrap().go("e").unwrap();
        assert!(!simple.structured());
        round_trips(&s, &mut simple, seed);
        let mut structured = Client::connect(stream(), "e", false, &[]).unwrap();
        round_trips(&s, &mut structured, seed + 10);
        let mut extended = Client::connect(stream(), "e", true, &[]).unwrap();
        assert!(extended.extended());
        round_trips(&s, &mut extended, seed + 20);
        // Each of the 12 reads went through a pipe.
        assert_eq!(s.backend.spliced_out() - before, 12, "{transport} reads");
        // And so did the 9 of 256 KiB or more, each in one piece or more.
        assert!(
            s.backend.spliced_in() - before_in >= 9,
            "{transport} writes"
        );
    }
}

#[test]
fn spliced_and_batched_replies_do_not_interleave() {
    let s = setup(SIZE);
    let mut c = Client::connect(s.unix(), "e", false, &[]).unwrap();
    let expected =
        |offset: u64, len: usize| pattern(SIZE as usize, 1)[offset as usize..][..len].to_vec();
    // Small reads (served in the reader's batch) around large ones (spliced) and large
    // writes, all in flight at once.
    let mut pending = Vec::new();
    for i in 0..40u64 {
        let (offset, len) = if i % 5 == 0 {
            (i * 131072, 256 * 1024)
        } else {
            (i * 4096, 4096)
        };
        let cookie = c
            .send_request(proto::CMD_FLAG_DF, proto::CMD_READ, offset, len as u64, &[])
            .unwrap();
        pending.push((cookie, offset, len));
    }
    for _ in 0..pending.len() {
        let r = c.receive_reply().unwrap();
        assert_eq!(r.error, None);
        let &(_, offset, len) = pending.iter().find(|p| p.0 == r.cookie).unwrap();
        assert_eq!(r.data, expected(offset, len), "read at {offset}");
    }
    assert!(s.backend.spliced_out() >= 8);
}

#[test]
fn reads_past_the_end_of_a_short_file_fall_back_to_copying() {
    // The export is larger than the file: its tail reads as zeroes.
    let s = setup(SIZE - MIB / 2);
    let mut c = Client::connect(s.unix(), "e", false, &[]).unwrap();
    let got = c.read(SIZE - MIB, MIB as u32, proto::CMD_FLAG_DF).unwrap();
    let mut expected = pattern((SIZE - MIB / 2) as usize, 1)[(SIZE - MIB) as usize..].to_vec();
    expected.resize(MIB as usize, 0);
    assert_eq!(got, expected);
    assert_eq!(s.backend.spliced_out(), 0);
    // The connection goes on splicing where the file has the data.
    let got = c.read(0, MIB as u32, proto::CMD_FLAG_DF).unwrap();
    assert_eq!(got, pattern(MIB as usize, 1));
    assert_eq!(s.backend.spliced_out(), 1);
}

/// Send a WRITE of `len` bytes at offset 0 but only `sent` bytes of its payload, then vanish.
fn vanish_mid_write(s: &Setup, len: u64, sent: usize) {
    for stream in [s.unix(), s.tcp()] {
        let mut c = Client::connect(stream, "e", false, &[]).unwrap();
        let h = proto::RequestHeader {
            flags: 0,
            command: proto::CMD_WRITE,
            cookie: 1,
            offset: 0,
            length: len,
        };
        let s2 = c.stream_mut();
        s2.write_all(&h.encode_compact()).unwrap();
        s2.write_all(&vec![0xee; sent]).unwrap();
        s2.flush().unwrap();
        drop(c);
    }
    // The server has seen both connections end once it has no client left.
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.server.client_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.server.client_count(), 0);
}

#[test]
fn a_client_vanishing_mid_payload_of_a_small_write_writes_nothing() {
    let s = setup(SIZE);
    vanish_mid_write(&s, 200 * 1024, 150 * 1024);
    assert_eq!(s.file_bytes(0, MIB as usize), pattern(MIB as usize, 1));
    // And the server still serves.
    let mut c = Client::connect(s.unix(), "e", false, &[]).unwrap();
    round_trips(&s, &mut c, 99);
}

/// Large WRITEs are written while their payload arrives: what arrived before the client
/// vanished may have landed (a torn, never acknowledged write), nothing beyond it has.
#[test]
fn a_client_vanishing_mid_payload_of_a_large_write_tears_only_what_it_sent() {
    let s = setup(SIZE);
    let sent = 700 * 1024;
    vanish_mid_write(&s, MIB, sent);
    let now = s.file_bytes(0, MIB as usize);
    let before = pattern(MIB as usize, 1);
    assert_eq!(now[sent..], before[sent..]);
    assert!(now[..sent]
        .iter()
        .zip(&before[..sent])
        .all(|(n, b)| *n == 0xee || n == b));
    let mut c = Client::connect(s.unix(), "e", false, &[]).unwrap();
    round_trips(&s, &mut c, 99);
}

/// The first part of a large WRITE reaches the file before the rest has been sent.
#[test]
fn large_writes_land_while_their_payload_arrives() {
    let s = setup(SIZE);
    for (i, stream) in [s.unix(), s.tcp()].into_iter().enumerate() {
        // Simple replies, read by hand below: the client does not know the raw request.
        let mut c = Handshake::start(stream).unwrap().go("e").unwrap();
        let offset = (i as u64 + 1) * 2 * MIB;
        let data = pattern(MIB as usize, 40 + i as u8);
        let half = data.len() / 2;
        let h = proto::RequestHeader {
            flags: 0,
            command: proto::CMD_WRITE,
            cookie: 7,
            offset,
            length: MIB,
        };
        let s2 = c.stream_mut();
        s2.write_all(&h.encode_compact()).unwrap();
        s2.write_all(&data[..half]).unwrap();
        s2.flush().unwrap();
        // Over TCP the payload goes in whole 128 KiB pieces, so the tail of the half sent
        // may wait for the rest; the first 256 KiB cannot.
        let landed = if i == 0 { half } else { 256 * 1024 };
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.file_bytes(offset, landed) != data[..landed] && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            s.file_bytes(offset, landed),
            data[..landed],
            "first half not written yet"
        );
        let s2 = c.stream_mut();
        s2.write_all(&data[half..]).unwrap();
        s2.flush().unwrap();
        let mut reply = [0u8; 16];
        std::io::Read::read_exact(c.stream_mut(), &mut reply).unwrap();
        assert_eq!(
            reply[..8],
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0],
            "a simple reply, no error"
        );
        assert_eq!(reply[8..], 7u64.to_be_bytes());
        assert_eq!(s.file_bytes(offset, data.len()), data);
        round_trips(&s, &mut c, 50 + i as u8);
    }
}

/// Sends a WRITE of `data` at `offset` in 16 KiB pieces with pauses; returns the simple
/// reply's error field.
fn dribble_write(c: &mut Client, offset: u64, data: &[u8]) -> [u8; 4] {
    let h = proto::RequestHeader {
        flags: 0,
        command: proto::CMD_WRITE,
        cookie: 9,
        offset,
        length: data.len() as u64,
    };
    let sock = c.stream_mut();
    sock.write_all(&h.encode_compact()).unwrap();
    sock.flush().unwrap();
    // The header alone, as a rule: then no payload is read ahead with it.
    std::thread::sleep(Duration::from_millis(20));
    for piece in data.chunks(16 * 1024) {
        sock.write_all(piece).unwrap();
        sock.flush().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut reply = [0u8; 16];
    std::io::Read::read_exact(c.stream_mut(), &mut reply).unwrap();
    assert_eq!(reply[8..], 9u64.to_be_bytes());
    [reply[4], reply[5], reply[6], reply[7]]
}

/// Bytes the kernel holds for `socket` that it has not sent yet.
fn unsent(socket: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one c_int to a valid pointer.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCOUTQNSD, &mut n) };
    assert_eq!(rc, 0, "SIOCOUTQNSD: {}", std::io::Error::last_os_error());
    n as usize
}

/// Over TCP, spliced replies that the client's window cannot take yet wait in the server,
/// not in the socket: bytes queued there would be sent by the CPU that handles the next
/// ACK, and over loopback two sending CPUs reorder the stream. Once the client reads again
/// every reply comes, intact.
#[test]
fn tcp_replies_wait_in_the_server_until_the_client_has_room() {
    let s = setup(SIZE);
    let (stream, server_end) = s.tcp_watched();
    let mut c = Handshake::start(stream).unwrap().go("e").unwrap();
    let cookies: Vec<u64> = (0..8)
        .map(|i| {
            c.send_request(0, proto::CMD_READ, i * MIB, MIB, &[])
                .unwrap()
        })
        .collect();
    // The server fills what the client's window takes, then waits; give it the time.
    let mut most = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(500) {
        most = most.max(unsent(&server_end));
        std::thread::sleep(Duration::from_millis(10));
    }
    // What waits in the socket: the limit, and at most one segment that went past it.
    let limit = nbd::TCP_UNSENT_MAX as usize + 64 * 1024;
    assert!(most <= limit, "{most} bytes unsent (limit {limit})");
    for _ in &cookies {
        let reply = c.receive_reply().unwrap();
        assert_eq!(reply.error, None);
        let offset = (reply.cookie - cookies[0]) * MIB;
        assert!(
            reply.data == s.file_bytes(offset, MIB as usize),
            "read at {offset}"
        );
    }
    assert!(s.backend.spliced_out() >= 8);
}

/// Over TCP a copied payload dribbling in goes to the file in whole 128 KiB pieces, not in
/// whatever each segment brought.
#[test]
fn copied_tcp_writes_go_in_whole_pieces() {
    let s = setup(SIZE);
    s.backend.refuse_splice_in();
    let mut c = Handshake::start(s.tcp()).unwrap().go("e").unwrap();
    let data = pattern(MIB as usize, 60);
    s.backend.take_write_sizes();
    assert_eq!(dribble_write(&mut c, MIB, &data), [0; 4], "no error");
    // The first piece may be what came with the header; the last, what is left after it.
    let sizes = s.backend.take_write_sizes();
    assert_eq!(sizes.iter().sum::<usize>(), data.len());
    assert!(sizes.len() <= 9, "{} pieces: {sizes:?}", sizes.len());
    assert!(
        sizes[1..sizes.len() - 1].iter().all(|&n| n == 128 * 1024),
        "{sizes:?}"
    );
    assert_eq!(s.file_bytes(MIB, data.len()), data);
}

/// Large WRITEs written while they arrive, pipelined with other requests so that headers
/// and payloads straddle the reader's buffer, with compact and with extended headers; one
/// past the end is refused whole and the connection goes on.
#[test]
fn pipelined_streamed_writes_land_intact() {
    let s = setup(SIZE);
    for extended in [false, true] {
        let mut c = Client::connect(s.unix(), "e", extended, &[]).unwrap();
        let sizes = [
            300 * 1024,
            3,
            MIB as usize + 5,
            256 * 1024,
            100,
            2 * MIB as usize,
        ];
        let mut expected = s.file_bytes(0, SIZE as usize);
        let mut offset = 0;
        let mut sent = 0;
        for (i, &len) in sizes.iter().enumerate() {
            let data = pattern(len, i as u8 + 10 + u8::from(extended));
            expected[offset..offset + len].copy_from_slice(&data);
            c.send_request(0, proto::CMD_WRITE, offset as u64, len as u64, &data)
                .unwrap();
            c.send_request(0, proto::CMD_READ, 0, 512, &[]).unwrap();
            sent += 2;
            offset += len + 4096 + 7;
        }
        let too_far = c
            .send_request(
                0,
                proto::CMD_WRITE,
                SIZE - 4096,
                512 * 1024,
                &[1; 512 * 1024],
            )
            .unwrap();
        sent += 1;
        for _ in 0..sent {
            let r = c.receive_reply().unwrap();
            if r.cookie == too_far {
                assert!(r.error.is_some(), "a write past the end was accepted");
            } else {
                assert_eq!(r.error, None, "extended {extended}");
            }
        }
        assert!(
            s.file_bytes(0, SIZE as usize) == expected,
            "extended {extended}"
        );
        round_trips(&s, &mut c, 77);
    }
}

/// A spliced payload goes to the file in what each splice brought, all of it, in order.
#[test]
fn spliced_writes_take_the_payload_as_it_comes() {
    let s = setup(SIZE);
    for (i, stream) in [s.unix(), s.tcp()].into_iter().enumerate() {
        let mut c = Handshake::start(stream).unwrap().go("e").unwrap();
        let data = pattern(MIB as usize, 70 + i as u8);
        s.backend.take_write_sizes();
        let before = s.backend.spliced_in();
        assert_eq!(dribble_write(&mut c, MIB, &data), [0; 4], "no error");
        let sizes = s.backend.take_write_sizes();
        assert_eq!(sizes.iter().sum::<usize>(), data.len());
        // Only what came with the header is copied.
        assert!(s.backend.spliced_in() - before >= sizes.len() - 1);
        assert!(sizes.len() >= 2, "the payload did not come all at once");
        assert_eq!(s.file_bytes(MIB, data.len()), data);
        round_trips(&s, &mut c, 80 + i as u8);
    }
}

/// A backend that takes payloads from the socket itself gets every piece of a large WRITE
/// that is not already read (over TCP the rest of the payload at once, over a unix socket
/// what has come), and nothing is spliced. When it cannot take a piece now, the rest of
/// that payload is spliced without asking again, and the next WRITE is offered again;
/// once it says it never can, it is not asked again on that connection. The data lands
/// every way.
#[test]
fn backends_that_can_take_payloads_from_the_socket_get_them() {
    let s = setup(SIZE);
    for (i, transport) in ["unix", "tcp"].into_iter().enumerate() {
        let stream = if transport == "unix" {
            s.unix()
        } else {
            s.tcp()
        };
        let mut c = Handshake::start(stream).unwrap().go("e").unwrap();
        let seed = 110 + 10 * i as u8;

        s.backend.set_receive(Receive::Take);
        let data = pattern(MIB as usize, seed);
        s.backend.take_write_sizes();
        let (spliced, received) = (s.backend.spliced_in(), s.backend.received());
        assert_eq!(dribble_write(&mut c, MIB, &data), [0; 4], "{transport}");
        let sizes = s.backend.take_write_sizes();
        assert_eq!(sizes.iter().sum::<usize>(), data.len(), "{transport}");
        let taken = s.backend.received() - received;
        assert!(taken >= sizes.len() - 1, "{transport}: {sizes:?}");
        if transport == "tcp" {
            assert_eq!(
                taken, 1,
                "{transport}: waited for the whole rest: {sizes:?}"
            );
        } else {
            assert!(taken >= 2, "{transport}: took what had come: {sizes:?}");
        }
        assert_eq!(
            s.backend.spliced_in(),
            spliced,
            "{transport}: nothing spliced"
        );
        assert_eq!(s.file_bytes(MIB, data.len()), data, "{transport}");

        s.backend.set_receive(Receive::NotNow);
        let offers = s.backend.receive_offers();
        let data = pattern(MIB as usize, seed + 1);
        assert_eq!(dribble_write(&mut c, 2 * MIB, &data), [0; 4], "{transport}");
        assert_eq!(
            s.backend.receive_offers() - offers,
            1,
            "{transport}: asked once"
        );
        let spliced_now = s.backend.spliced_in();
        assert!(spliced_now >= spliced + 2, "{transport}: spliced instead");
        assert_eq!(s.file_bytes(2 * MIB, data.len()), data, "{transport}");

        s.backend.set_receive(Receive::Take);
        let received = s.backend.received();
        let data = pattern(MIB as usize, seed + 4);
        assert_eq!(dribble_write(&mut c, 3 * MIB, &data), [0; 4], "{transport}");
        assert!(
            s.backend.received() > received,
            "{transport}: offered again"
        );
        assert_eq!(
            s.backend.spliced_in(),
            spliced_now,
            "{transport}: nothing spliced"
        );
        assert_eq!(s.file_bytes(3 * MIB, data.len()), data, "{transport}");

        s.backend.set_receive(Receive::Never);
        round_trips(&s, &mut c, seed + 2);
        let offers = s.backend.receive_offers();
        s.backend.set_receive(Receive::Take);
        round_trips(&s, &mut c, seed + 3);
        assert_eq!(
            s.backend.receive_offers(),
            offers,
            "{transport}: not asked again"
        );
        s.backend.set_receive(Receive::Never);
    }
}

/// A backend that must see what it writes refuses the splice: that piece and the rest of
/// the connection's writes are copied, and land all the same.
#[test]
fn writes_the_backend_refuses_to_splice_are_copied() {
    let s = setup(SIZE);
    for (i, stream) in [s.unix(), s.tcp()].into_iter().enumerate() {
        let mut c = Client::connect(stream, "e", false, &[]).unwrap();
        round_trips(&s, &mut c, 90 + i as u8);
        let spliced = s.backend.spliced_in();
        assert!(spliced > 0);
        s.backend.refuse_splice_in();
        round_trips(&s, &mut c, 100 + i as u8);
        assert_eq!(s.backend.spliced_in(), spliced, "nothing more spliced");
        s.backend.accept_splice_in();
    }
}

/// A WRITE the file refuses (opened read-only) gets an error reply; the rest of its payload
/// is read and dropped, so the connection stays in step.
#[test]
fn a_failing_spliced_write_keeps_the_connection_in_step() {
    let s = setup(SIZE);
    let read_only = File::open(s._dir.path().join("disk.img")).unwrap();
    let backend = Arc::new(FileBackend::new(read_only, SIZE));
    let config = ExportConfig {
        name: "ro-file".into(),
        ..ExportConfig::default()
    };
    s.server.add_export(config, backend.clone()).unwrap();
    for stream in [s.unix(), s.tcp()] {
        let mut c = Handshake::start(stream).unwrap().go("ro-file").unwrap();
        let data = pattern(MIB as usize, 3);
        let error = u32::from_be_bytes(dribble_write(&mut c, 0, &data));
        // EBADF, which NBD has no code for.
        assert_eq!(error, proto::EINVAL, "the file cannot be written");
        assert_eq!(c.read(0, 4096, 0).unwrap(), pattern(4096, 1));
    }
    assert_eq!(s.file_bytes(0, MIB as usize), pattern(MIB as usize, 1));
}

/// A client stream whose writes can be held back and then sent in one go, so that the
/// server finds a whole run of requests queued on its socket.
struct Corked {
    inner: Box<dyn Stream>,
    held: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Read for Corked {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Write for Corked {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match lock(&self.held).as_mut() {
            Some(held) => {
                held.extend_from_slice(buf);
                Ok(buf.len())
            }
            None => self.inner.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Stream for Corked {
    fn try_clone(&self) -> io::Result<Box<dyn Stream>> {
        self.inner.try_clone()
    }

    fn shutdown(&self) -> io::Result<()> {
        self.inner.shutdown()
    }

    fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.inner.set_timeout(timeout)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap()
}

/// A client on `stream` whose requests [`send_corked`] sends together.
fn corked_client(stream: Box<dyn Stream>, extended: bool) -> (Client, CorkedSender) {
    let sender = stream.try_clone().unwrap();
    let held = Arc::new(Mutex::new(None));
    let corked = Corked {
        inner: stream,
        held: held.clone(),
    };
    let c = Client::connect(Box::new(corked), "e", extended, &[]).unwrap();
    (c, CorkedSender { sender, held })
}

struct CorkedSender {
    sender: Box<dyn Stream>,
    held: Arc<Mutex<Option<Vec<u8>>>>,
}

impl CorkedSender {
    /// Runs `send` with the client's writes held back, then sends them in one write.
    fn send_corked(&mut self, send: impl FnOnce()) {
        self.send_split(send, 0, false);
    }

    /// As [`CorkedSender::send_corked`], but the first `at` bytes first and, unless
    /// `vanish`, the rest a little later.
    fn send_split(&mut self, send: impl FnOnce(), at: usize, vanish: bool) {
        *lock(&self.held) = Some(Vec::new());
        send();
        let bytes = lock(&self.held).take().unwrap();
        self.sender.write_all(&bytes[..at]).unwrap();
        if vanish {
            self.sender.shutdown().unwrap();
            return;
        }
        if at > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.sender.write_all(&bytes[at..]).unwrap();
    }
}

/// Sends small WRITEs in one go, with a FUA one, a READ and one past the end among them,
/// then checks that every request got exactly one reply, each a success but the one past
/// the end, and that the data landed. Returns how many WRITEs were sent.
fn queued_writes_land(s: &Setup, c: &mut Client, cork: &mut CorkedSender, seed: u8) -> usize {
    let lens = [4096, 512, 32 * 1024, 1, 4095, 8192, 100, 20000];
    let mut writes = Vec::new();
    let mut offset = 5 * MIB;
    for i in 0..40 {
        let len = lens[i % lens.len()];
        writes.push((offset, pattern(len, seed.wrapping_add(i as u8))));
        offset += len as u64 + 512;
    }
    let mut unanswered = std::collections::BTreeSet::new();
    let mut past_the_end = 0;
    cork.send_corked(|| {
        for (i, (offset, data)) in writes.iter().enumerate() {
            // They end a run and are served the ordinary way.
            let flags = if i == 17 { proto::CMD_FLAG_FUA } else { 0 };
            let cookie = c
                .send_request(flags, proto::CMD_WRITE, *offset, 0, data)
                .unwrap();
            unanswered.insert(cookie);
            if i == 25 {
                let cookie = c
                    .send_request(0, proto::CMD_READ, writes[3].0, 4096, &[])
                    .unwrap();
                unanswered.insert(cookie);
            }
            if i == 30 {
                past_the_end = c
                    .send_request(0, proto::CMD_WRITE, SIZE - 100, 0, &[7; 4096])
                    .unwrap();
                unanswered.insert(past_the_end);
            }
        }
    });
    while !unanswered.is_empty() {
        let r = c.receive_reply().unwrap();
        assert!(
            unanswered.remove(&r.cookie),
            "cookie {} answered again",
            r.cookie
        );
        assert_eq!(
            r.error.is_some(),
            r.cookie == past_the_end,
            "cookie {}: {:?}",
            r.cookie,
            r.error
        );
    }
    for (offset, data) in &writes {
        assert_eq!(&s.file_bytes(*offset, data.len()), data, "at {offset}");
    }
    // Nothing more comes: the next reply is this READ's.
    assert_eq!(c.read(0, 512, 0).unwrap(), s.file_bytes(0, 512));
    writes.len()
}

/// Small WRITEs queued on the socket behind one another are given to a backend that takes
/// payloads from the socket itself in runs, several per call, headers and all; a run ends
/// at a request that is not such a WRITE (FUA, READ, past the end of the export). Where
/// the backend takes only part of a run, ending inside a header or a payload, the server
/// finishes that WRITE itself and goes on. A WRITE whose payload is still arriving is read
/// whole the ordinary way, so that a client vanishing halfway tears nothing. Runs are
/// taken even while the ordinary writes are slow enough for the pool to serve them. A
/// backend that cannot take them now gets them the ordinary way and is not asked again for
/// a while, and reads alone never ask it. Over unix and TCP, with compact and extended
/// headers, the data lands and every reply is right.
#[test]
fn queued_small_writes_are_received_by_the_backend_in_runs() {
    let s = setup(SIZE);
    for transport in ["unix", "tcp"] {
        for extended in [false, true] {
            let what = format!("{transport}, extended {extended}");
            let stream = if transport == "unix" {
                s.unix()
            } else {
                s.tcp()
            };
            let (mut c, mut cork) = corked_client(stream, extended);
            let header = if extended { 32 } else { 28 };

            s.backend.set_receive(Receive::Take);
            let (offers, received) = (s.backend.receive_offers(), s.backend.received());
            let sent = queued_writes_land(&s, &mut c, &mut cork, 1);
            let calls = s.backend.received() - received;
            assert!(calls > 0, "{what}: the backend took them");
            assert!(calls < sent, "{what}: {calls} calls for {sent} writes");
            assert!(s.backend.longest_run() > 1, "{what}: runs of several");
            assert_eq!(s.backend.receive_offers() - offers, calls, "{what}");

            // One whose payload is still arriving when it is looked at (after a first
            // WRITE, read the ordinary way) is read whole first, the ordinary way.
            c.write(0, &[1; 512], 0).unwrap();
            let received = s.backend.received();
            cork.send_split(
                || {
                    c.send_request(0, proto::CMD_WRITE, 4096, 0, &[9; 8192])
                        .unwrap();
                },
                header + 100,
                false,
            );
            assert_eq!(c.receive_reply().unwrap().error, None, "{what}");
            assert_eq!(s.backend.received(), received, "{what}: arriving");
            assert_eq!(s.file_bytes(4096, 8192), [9; 8192], "{what}");

            for cut in [10, header + 100, header + 4096 + 5] {
                s.backend.set_receive(Receive::Upto(cut));
                let (offers, received) = (s.backend.receive_offers(), s.backend.received());
                queued_writes_land(&s, &mut c, &mut cork, cut as u8);
                assert!(
                    s.backend.received() > received,
                    "{what}: cut at {cut}: {} offers",
                    s.backend.receive_offers() - offers
                );
            }

            // Ordinary writes so slow that the pool serves them: queued ones still go
            // straight to the backend, which spares that slow path.
            s.backend.set_write_delay(Duration::from_millis(15));
            c.write(0, &[1; 4096], 0).unwrap();
            // The next request read the ordinary way sees the slow one: the pool takes over.
            c.read(0, 512, 0).unwrap();
            let received = s.backend.received();
            queued_writes_land(&s, &mut c, &mut cork, 40);
            s.backend.set_write_delay(Duration::ZERO);
            assert!(s.backend.received() > received, "{what}: slow writes");

            s.backend.set_receive(Receive::NotNow);
            let (offers, received) = (s.backend.receive_offers(), s.backend.received());
            queued_writes_land(&s, &mut c, &mut cork, 50);
            assert_eq!(s.backend.received(), received, "{what}: not now");
            // After a refused run the reader stops peeking for a while.
            let asked = s.backend.receive_offers() - offers;
            assert!(asked <= 2, "{what}: asked {asked} times");

            s.backend.set_receive(Receive::Take);
            let offers = s.backend.receive_offers();
            let mut cookies = 0;
            cork.send_corked(|| {
                for i in 0..20 {
                    c.send_request(0, proto::CMD_READ, i * 8192, 4096, &[])
                        .unwrap();
                    cookies += 1;
                }
            });
            for _ in 0..cookies {
                assert_eq!(c.receive_reply().unwrap().error, None, "{what}");
            }
            assert_eq!(s.backend.receive_offers(), offers, "{what}: reads alone");

            // A client that vanishes inside a small WRITE's payload, queued behind another
            // WRITE, leaves the file as it was.
            c.write(0, &[1; 512], 0).unwrap();
            let before = s.file_bytes(4096, 8192);
            cork.send_split(
                || {
                    c.send_request(0, proto::CMD_WRITE, 4096, 0, &[0x77; 8192])
                        .unwrap();
                },
                header + 100,
                true,
            );
            drop(c);
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(s.file_bytes(4096, 8192), before, "{what}: nothing torn");
        }
    }
    s.backend.set_receive(Receive::Never);
}

/// At QD1 a FLUSH read after a small WRITE (while the reader looks out for queued WRITEs)
/// has nothing behind it, so the reader serves it itself: no worker thread starts.
#[test]
fn a_lone_flush_after_a_small_write_starts_no_worker() {
    let s = setup(SIZE);
    let threads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = threads.clone();
    let server = Server::new(ServerConfig::default());
    let config = ExportConfig {
        name: "e".into(),
        on_serve: Some(Arc::new(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })),
        ..ExportConfig::default()
    };
    server.add_export(config, s.backend.clone()).unwrap();
    s.backend.set_receive(Receive::Take);
    let (ours, theirs) = UnixStream::pair().unwrap();
    server.serve_client(Box::new(theirs), Box::new(|| {}));
    let mut c = Client::connect(Box::new(ours), "e", false, &[]).unwrap();
    for i in 0..3u8 {
        c.write(u64::from(i) * 4096, &[i; 4096], 0).unwrap();
        c.flush().unwrap();
    }
    assert_eq!(
        threads.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the reader served"
    );
    s.backend.set_receive(Receive::Never);
}
