//! vublk: a userspace vhost-user-blk driver on the `virtio-driver` crate (the
//! Rust core of libblkio's virtio-blk-vhost-user driver). It connects to a
//! vhost-user-blk socket the way a VM does (shared memfd memory, split
//! virtqueues, eventfd kicks and calls) and either checks the device or
//! benchmarks it. Both commands print one JSON object on stdout.
//!
//! ```text
//! vublk check --socket PATH [--queues N]
//! vublk bench --socket PATH [--rw randread|randwrite|read|write] [--bs BYTES]
//!             [--iodepth N] [--queues N] [--runtime SECS] [--size BYTES]
//! ```
//!
//! `check` writes patterns on every queue, reads them back (also through
//! another queue), flushes, writes zeroes, discards, probes the end of the
//! device, and exits 1 on any mismatch. `bench` runs one thread per queue,
//! each keeping `iodepth` requests in flight, and reports IOPS, MiB/s and
//! latency; it exits 1 if any request failed.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::{value_parser, Arg, ArgMatches, Command};
use memmap2::MmapMut;
use serde_json::{json, Value};
use virtio_driver::{
    iovec, EventFd, QueueNotifier, VhostUser, VirtioBlkConfig, VirtioBlkFeatureFlags,
    VirtioBlkQueue, VirtioBlkTransport, VirtioFeatureFlags,
};

type Result<T> = std::result::Result<T, String>;

/// virtio-blk addresses the device in 512-byte sectors.
const SECTOR: u64 = 512;
/// How long a queue may stay silent with requests in flight before we give
/// up on the device.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(30);
/// Descriptors per read/write request: header, one data buffer, status.
const DESCRIPTORS_PER_REQUEST: usize = 3;
/// Largest virtqueue QEMU's libvhost-user accepts.
const MAX_QUEUE_SIZE: usize = 1024;

fn main() -> ExitCode {
    let matches = command().get_matches();
    let outcome = match matches.subcommand() {
        Some(("check", args)) => run_check(args),
        Some(("bench", args)) => run_bench(args),
        _ => Err("a subcommand is required: check or bench".to_string()),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vublk: {e}");
            ExitCode::FAILURE
        }
    }
}

fn command() -> Command {
    let socket = Arg::new("socket")
        .long("socket")
        .required(true)
        .help("vhost-user-blk unix socket");
    let queues = Arg::new("queues")
        .long("queues")
        .default_value("1")
        .value_parser(value_parser!(u16).range(1..))
        .help("number of virtqueues to use");
    Command::new("vublk")
        .about("A userspace vhost-user-blk driver: functional check and benchmark")
        .subcommand_required(true)
        .subcommand(
            Command::new("check")
                .about("Check reads, writes, flush, discard and write-zeroes on every queue")
                .arg(socket.clone())
                .arg(queues.clone()),
        )
        .subcommand(
            Command::new("bench")
                .about("Benchmark with one thread per queue; prints JSON")
                .arg(socket)
                .arg(queues)
                .arg(
                    Arg::new("rw")
                        .long("rw")
                        .default_value("randread")
                        .value_parser(["randread", "randwrite", "read", "write"])
                        .help("access pattern (read/write are sequential)"),
                )
                .arg(
                    Arg::new("bs")
                        .long("bs")
                        .default_value("4096")
                        .value_parser(value_parser!(u32).range(512..=(64 << 20)))
                        .help("request size in bytes, a multiple of 512"),
                )
                .arg(
                    Arg::new("iodepth")
                        .long("iodepth")
                        .default_value("1")
                        .value_parser(
                            value_parser!(u16)
                                .range(1..=(MAX_QUEUE_SIZE / DESCRIPTORS_PER_REQUEST) as i64),
                        )
                        .help("requests in flight per queue"),
                )
                .arg(
                    Arg::new("runtime")
                        .long("runtime")
                        .default_value("5")
                        .value_parser(value_parser!(f64))
                        .help("seconds to run"),
                )
                .arg(
                    Arg::new("size")
                        .long("size")
                        .value_parser(value_parser!(u64))
                        .help("bytes of the device to use (default: all)"),
                ),
        )
}

fn arg<T: Clone + Send + Sync + 'static>(args: &ArgMatches, name: &str) -> Result<T> {
    args.get_one::<T>(name)
        .cloned()
        .ok_or_else(|| format!("missing --{name}"))
}

/// The virtio features we accept if the device offers them.
fn wanted_features() -> u64 {
    (VirtioFeatureFlags::VERSION_1 | VirtioFeatureFlags::RING_EVENT_IDX).bits()
        | (VirtioBlkFeatureFlags::SIZE_MAX
            | VirtioBlkFeatureFlags::SEG_MAX
            | VirtioBlkFeatureFlags::BLK_SIZE
            | VirtioBlkFeatureFlags::RO
            | VirtioBlkFeatureFlags::FLUSH
            | VirtioBlkFeatureFlags::TOPOLOGY
            | VirtioBlkFeatureFlags::CONFIG_WCE
            | VirtioBlkFeatureFlags::MQ
            | VirtioBlkFeatureFlags::DISCARD
            | VirtioBlkFeatureFlags::WRITE_ZEROES)
            .bits()
}

/// A vhost-user connection with its data buffer memory mapped into the
/// device, ready to set up queues.
struct Connection {
    socket: String,
    transport: Box<VirtioBlkTransport>,
    config: VirtioBlkConfig,
    features: u64,
    buffers: MmapMut,
}

impl Connection {
    fn open(socket: &str, buffer_len: usize) -> Result<Self> {
        let vhost = VhostUser::new(socket, wanted_features())
            .map_err(|e| format!("connecting to vhost-user socket {socket}: {e}"))?;
        let mut transport: Box<VirtioBlkTransport> = Box::new(vhost);
        let config = transport
            .get_config()
            .map_err(|e| format!("{socket}: reading the virtio-blk config space: {e}"))?;
        let features = transport.get_features();
        if features & VirtioFeatureFlags::VERSION_1.bits() == 0 {
            return Err(format!("{socket}: the device does not offer VERSION_1"));
        }

        // SAFETY: memfd_create gets a NUL-terminated name and returns a new
        // descriptor that we own from here on.
        let fd = unsafe { libc::memfd_create(c"vublk-buffers".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("memfd_create: {}", io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(buffer_len as u64)
            .map_err(|e| format!("sizing the {buffer_len}-byte buffer memfd: {e}"))?;
        // SAFETY: the memfd is private to this process and the device; nobody
        // truncates it while mapped.
        let buffers = unsafe { MmapMut::map_mut(&file) }
            .map_err(|e| format!("mapping the {buffer_len}-byte buffer memfd: {e}"))?;
        transport
            .map_mem_region(
                buffers.as_ptr() as usize,
                buffers.len(),
                file.as_raw_fd(),
                0,
            )
            .map_err(|e| format!("{socket}: adding the buffer memory region: {e}"))?;
        Ok(Connection {
            socket: socket.to_string(),
            transport,
            config,
            features,
            buffers,
        })
    }

    fn has(&self, flag: VirtioBlkFeatureFlags) -> bool {
        self.features & flag.bits() != 0
    }

    fn capacity_bytes(&self) -> u64 {
        u64::from(self.config.capacity).saturating_mul(SECTOR)
    }

    fn config_json(&self) -> Value {
        let c = &self.config;
        json!({
            "capacity_sectors": u64::from(c.capacity),
            "capacity_bytes": self.capacity_bytes(),
            "blk_size": u32::from(c.blk_size),
            "num_queues": u16::from(c.num_queues),
            "seg_max": u32::from(c.seg_max),
            "size_max": u32::from(c.size_max),
            "writeback": c.writeback,
            "max_discard_sectors": u32::from(c.max_discard_sectors),
            "max_discard_seg": u32::from(c.max_discard_seg),
            "discard_sector_alignment": u32::from(c.discard_sector_alignment),
            "max_write_zeroes_sectors": u32::from(c.max_write_zeroes_sectors),
            "max_write_zeroes_seg": u32::from(c.max_write_zeroes_seg),
            "write_zeroes_may_unmap": c.write_zeroes_may_unmap,
        })
    }

    fn features_json(&self) -> Value {
        let names = [
            ("ro", VirtioBlkFeatureFlags::RO),
            ("flush", VirtioBlkFeatureFlags::FLUSH),
            ("discard", VirtioBlkFeatureFlags::DISCARD),
            ("write_zeroes", VirtioBlkFeatureFlags::WRITE_ZEROES),
            ("mq", VirtioBlkFeatureFlags::MQ),
            ("blk_size", VirtioBlkFeatureFlags::BLK_SIZE),
            ("seg_max", VirtioBlkFeatureFlags::SEG_MAX),
            ("config_wce", VirtioBlkFeatureFlags::CONFIG_WCE),
        ];
        let mut map = serde_json::Map::new();
        for (name, flag) in names {
            map.insert(name.to_string(), json!(self.has(flag)));
        }
        map.insert(
            "event_idx".to_string(),
            json!(self.features & VirtioFeatureFlags::RING_EVENT_IDX.bits() != 0),
        );
        map.insert("bits".to_string(), json!(format!("{:#x}", self.features)));
        Value::Object(map)
    }

    /// Sets up `num_queues` virtqueues; returns them with the buffer memory.
    fn start(
        &mut self,
        num_queues: usize,
        queue_size: u16,
    ) -> Result<(Vec<QueueHandle<'_>>, &mut [u8])> {
        let queues = VirtioBlkQueue::setup_queues(self.transport.as_mut(), num_queues, queue_size)
            .map_err(|e| {
                format!(
                    "{}: setting up {num_queues} queues of size {queue_size}: {e}",
                    self.socket
                )
            })?;
        let handles = queues
            .into_iter()
            .enumerate()
            .map(|(index, mut queue)| {
                queue.set_used_notif_enabled(true);
                QueueHandle {
                    index,
                    queue,
                    notifier: self.transport.get_submission_notifier(index),
                    call: self.transport.get_completion_fd(index),
                }
            })
            .collect();
        Ok((handles, &mut self.buffers[..]))
    }
}

/// One virtqueue with its kick and call eventfds. Request contexts are
/// caller-chosen slot numbers.
struct QueueHandle<'a> {
    index: usize,
    queue: VirtioBlkQueue<'a, usize>,
    notifier: Box<dyn QueueNotifier>,
    call: Arc<EventFd>,
}

impl QueueHandle<'_> {
    /// Notifies the device of newly queued requests, if it asked for that.
    fn kick(&mut self) -> Result<()> {
        if self.queue.avail_notif_needed() {
            self.notifier
                .notify()
                .map_err(|e| format!("queue {}: kick: {e}", self.index))?;
        }
        Ok(())
    }

    /// Waits until at least one request completes and appends every
    /// available completion as (slot, ret) to `done`.
    fn wait(&mut self, done: &mut Vec<(usize, i32)>) -> Result<()> {
        loop {
            let before = done.len();
            done.extend(self.queue.completions().map(|c| (c.context, c.ret)));
            if done.len() > before {
                return Ok(());
            }
            self.wait_call()?;
        }
    }

    /// Blocks on the call eventfd. The device may signal spuriously, so
    /// callers re-check the used ring afterwards.
    fn wait_call(&self) -> Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout_ms = COMPLETION_TIMEOUT.as_millis() as libc::c_int;
        loop {
            // SAFETY: pfd is a valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if n > 0 {
                break;
            }
            if n == 0 {
                return Err(format!(
                    "queue {}: no completion within {}s",
                    self.index,
                    COMPLETION_TIMEOUT.as_secs()
                ));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(format!(
                    "queue {}: polling the call eventfd: {err}",
                    self.index
                ));
            }
        }
        self.call
            .read()
            .map(|_| ())
            .map_err(|e| format!("queue {}: reading the call eventfd: {e}", self.index))
    }
}

// ---------------------------------------------------------------------------
// check

/// A piece of the buffer memory: byte offset and length.
#[derive(Clone, Copy)]
struct Seg {
    mem: usize,
    len: usize,
}

enum Op {
    Read { offset: u64, segs: Vec<Seg> },
    Write { offset: u64, segs: Vec<Seg> },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// Bytes of the device each queue's checks use, from `queue * SPAN`.
const SPAN: u64 = 4 << 20;
const BLOCK: usize = 4096;
/// Blocks written one by one, `BLOCK_STRIDE` apart.
const BLOCKS: usize = 16;
const BLOCK_STRIDE: u64 = 64 << 10;
/// A vectored request at `VEC_AT`, and a large one at `BIG_AT`.
const VEC_AT: u64 = 1 << 20;
const VEC_LEN: usize = 64 << 10;
const BIG_AT: u64 = 2 << 20;
const BIG_LEN: usize = 1 << 20;
/// Where requests stage data in buffer memory: writes from the first half,
/// reads into the second half.
const WRITE_AREA: usize = 0;
const READ_AREA: usize = 2 << 20;
const CHECK_BUFFER_LEN: usize = 4 << 20;
const BLOCK_MEM: usize = 0;
const VEC_MEM: usize = BLOCKS * BLOCK;
const BIG_MEM: usize = VEC_MEM + VEC_LEN + 2 * BLOCK;
/// Fills read buffers before each read so stale contents cannot pass.
const POISON: u8 = 0xa5;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The pattern generation `gen` puts at device offset `dev_offset`: every
/// 8-byte word depends on its own offset, so misplaced data is caught too.
fn fill_pattern(buf: &mut [u8], dev_offset: u64, gen: u64) {
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let v = splitmix64((dev_offset + 8 * i as u64) ^ (gen << 56)).to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
}

/// The first offset where `buf` differs from what `expected` describes.
fn first_mismatch(buf: &[u8], dev_offset: u64, expected: Expect) -> Option<u64> {
    let mut want = vec![0u8; buf.len()];
    if let Expect::Pattern(gen) = expected {
        fill_pattern(&mut want, dev_offset, gen);
    }
    buf.iter()
        .zip(&want)
        .position(|(a, b)| a != b)
        .map(|i| dev_offset + i as u64)
}

#[derive(Clone, Copy)]
enum Expect {
    Pattern(u64),
    Zeroes,
}

struct Checker<'a, 'q> {
    queues: Vec<QueueHandle<'q>>,
    mem: &'a mut [u8],
    steps: Vec<Value>,
    ok: bool,
}

impl Checker<'_, '_> {
    fn record(&mut self, queue: usize, step: &str, result: Result<()>) {
        let entry = match result {
            Ok(()) => json!({"queue": queue, "step": step, "ok": true}),
            Err(e) => {
                eprintln!("vublk: queue {queue}: {step}: {e}");
                self.ok = false;
                json!({"queue": queue, "step": step, "ok": false, "error": e})
            }
        };
        self.steps.push(entry);
    }

    fn iovecs(&mut self, segs: &[Seg]) -> Result<Vec<iovec>> {
        let base = self.mem.as_mut_ptr();
        segs.iter()
            .map(|s| {
                if s.mem + s.len > self.mem.len() {
                    return Err(format!(
                        "segment {}+{} is outside buffer memory",
                        s.mem, s.len
                    ));
                }
                Ok(iovec {
                    // SAFETY: the range was checked to lie within `mem`.
                    iov_base: unsafe { base.add(s.mem) }.cast(),
                    iov_len: s.len,
                })
            })
            .collect()
    }

    /// Submits `ops` at once on queue `q` and returns each one's result
    /// (0 or a negative errno).
    fn run(&mut self, q: usize, ops: &[Op]) -> Result<Vec<i32>> {
        let mut iovs = Vec::with_capacity(ops.len());
        for op in ops {
            iovs.push(match op {
                Op::Read { segs, .. } | Op::Write { segs, .. } => self.iovecs(segs)?,
                _ => Vec::new(),
            });
        }
        let queue = self
            .queues
            .get_mut(q)
            .ok_or_else(|| format!("no queue {q}"))?;
        for (slot, (op, iov)) in ops.iter().zip(&iovs).enumerate() {
            // SAFETY: every iovec points into the mapped buffer memory, which
            // outlives the request; we wait for all completions below.
            let queued = unsafe {
                match op {
                    Op::Read { offset, .. } => {
                        queue.queue.readv(*offset, iov.as_ptr(), iov.len(), slot)
                    }
                    Op::Write { offset, .. } => {
                        queue.queue.writev(*offset, iov.as_ptr(), iov.len(), slot)
                    }
                    Op::Flush => queue.queue.flush(slot),
                    Op::Discard { offset, len } => queue.queue.discard(*offset, *len, slot),
                    Op::WriteZeroes { offset, len, unmap } => {
                        queue.queue.write_zeroes(*offset, *len, *unmap, slot)
                    }
                }
            };
            queued.map_err(|e| format!("queue {q}: queueing request {slot}: {e}"))?;
        }
        queue.kick()?;
        let mut rets = vec![None; ops.len()];
        let mut done = Vec::new();
        while rets.iter().any(Option::is_none) {
            done.clear();
            queue.wait(&mut done)?;
            for &(slot, ret) in &done {
                match rets.get_mut(slot) {
                    Some(r @ None) => *r = Some(ret),
                    _ => return Err(format!("queue {q}: unexpected completion of slot {slot}")),
                }
            }
        }
        Ok(rets
            .into_iter()
            .map(|r| r.unwrap_or(-libc::EPROTO))
            .collect())
    }

    /// Runs `ops` and requires every one to succeed.
    fn run_ok(&mut self, q: usize, ops: &[Op], what: &[&str]) -> Result<()> {
        let rets = self.run(q, ops)?;
        for (ret, name) in rets.iter().zip(what) {
            if *ret != 0 {
                return Err(format!(
                    "{name} failed: {}",
                    io::Error::from_raw_os_error(-ret)
                ));
            }
        }
        Ok(())
    }

    fn stage(&mut self, mem: usize, len: usize, dev_offset: u64, gen: u64) -> Result<Seg> {
        let buf = self
            .mem
            .get_mut(mem..mem + len)
            .ok_or_else(|| format!("staging {len} bytes at {mem}: outside buffer memory"))?;
        fill_pattern(buf, dev_offset, gen);
        Ok(Seg { mem, len })
    }

    /// Reads the listed ranges (offset, length, read segmentation) on
    /// queue `q` and compares them with what is expected.
    fn read_verify(&mut self, q: usize, ranges: &[(u64, Vec<usize>, Expect)]) -> Result<()> {
        let mut ops = Vec::new();
        let mut mem = READ_AREA;
        let mut placed = Vec::new();
        for (offset, seg_lens, expect) in ranges {
            let total: usize = seg_lens.iter().sum();
            let start = mem;
            let mut segs = Vec::new();
            for &len in seg_lens {
                segs.push(Seg { mem, len });
                mem += len;
            }
            let poisoned = self
                .mem
                .get_mut(start..mem)
                .ok_or_else(|| format!("reading {total} bytes: outside buffer memory"))?;
            poisoned.fill(POISON);
            ops.push(Op::Read {
                offset: *offset,
                segs,
            });
            placed.push((start, total, *offset, *expect));
        }
        let rets = self.run(q, &ops)?;
        for (ret, (start, total, offset, expect)) in rets.iter().zip(placed) {
            if *ret != 0 {
                return Err(format!(
                    "read of {total} bytes at {offset} failed: {}",
                    io::Error::from_raw_os_error(-ret)
                ));
            }
            let got = self
                .mem
                .get(start..start + total)
                .ok_or_else(|| "read buffer outside buffer memory".to_string())?;
            if let Some(at) = first_mismatch(got, offset, expect) {
                let what = match expect {
                    Expect::Pattern(gen) => format!("pattern {gen}"),
                    Expect::Zeroes => "zeroes".to_string(),
                };
                return Err(format!(
                    "read of {total} bytes at {offset}: data differs from {what} at device offset {at}"
                ));
            }
        }
        Ok(())
    }

    fn block_offset(base: u64, k: usize) -> u64 {
        base + k as u64 * BLOCK_STRIDE
    }

    /// Writes generation 1 everywhere: single blocks, a vectored request
    /// and a large one, all in flight together.
    fn write_all(&mut self, q: usize, base: u64) -> Result<()> {
        let mut ops = Vec::new();
        for k in 0..BLOCKS {
            let offset = Self::block_offset(base, k);
            let seg = self.stage(WRITE_AREA + BLOCK_MEM + k * BLOCK, BLOCK, offset, 1)?;
            ops.push(Op::Write {
                offset,
                segs: vec![seg],
            });
        }
        // Three segments that are not adjacent in memory (gaps of one block).
        let mut segs = Vec::new();
        let mut dev = base + VEC_AT;
        let mut mem = WRITE_AREA + VEC_MEM;
        for len in [16 << 10, 32 << 10, 16 << 10] {
            segs.push(self.stage(mem, len, dev, 1)?);
            dev += len as u64;
            mem += len + BLOCK;
        }
        ops.push(Op::Write {
            offset: base + VEC_AT,
            segs,
        });
        let big = self.stage(WRITE_AREA + BIG_MEM, BIG_LEN, base + BIG_AT, 1)?;
        ops.push(Op::Write {
            offset: base + BIG_AT,
            segs: vec![big],
        });
        let names = vec!["write"; ops.len()];
        self.run_ok(q, &ops, &names)
    }

    fn read_all(&mut self, q: usize, base: u64) -> Result<()> {
        let mut ranges: Vec<(u64, Vec<usize>, Expect)> = (0..BLOCKS)
            .map(|k| (Self::block_offset(base, k), vec![BLOCK], Expect::Pattern(1)))
            .collect();
        // Split differently from the write to catch segment mix-ups.
        ranges.push((
            base + VEC_AT,
            vec![8 << 10, 48 << 10, 8 << 10],
            Expect::Pattern(1),
        ));
        ranges.push((base + BIG_AT, vec![BIG_LEN], Expect::Pattern(1)));
        self.read_verify(q, &ranges)
    }

    fn write_zeroes(&mut self, q: usize, base: u64) -> Result<()> {
        let half = (BIG_LEN / 2) as u64;
        let ops = [
            Op::WriteZeroes {
                offset: Self::block_offset(base, 2),
                len: BLOCK as u64,
                unmap: false,
            },
            Op::WriteZeroes {
                offset: Self::block_offset(base, 3),
                len: BLOCK as u64,
                unmap: true,
            },
            Op::WriteZeroes {
                offset: base + BIG_AT,
                len: half,
                unmap: false,
            },
        ];
        self.run_ok(
            q,
            &ops,
            &["write-zeroes", "write-zeroes (unmap)", "write-zeroes"],
        )?;
        let half = half as usize;
        self.read_verify(
            q,
            &[
                (Self::block_offset(base, 1), vec![BLOCK], Expect::Pattern(1)),
                (Self::block_offset(base, 2), vec![BLOCK], Expect::Zeroes),
                (Self::block_offset(base, 3), vec![BLOCK], Expect::Zeroes),
                (Self::block_offset(base, 4), vec![BLOCK], Expect::Pattern(1)),
                (base + BIG_AT, vec![half], Expect::Zeroes),
                (base + BIG_AT + half as u64, vec![half], Expect::Pattern(1)),
            ],
        )
    }

    /// Discard only has to succeed; what is read afterwards is undefined,
    /// so rewrite the range and check the new data sticks.
    fn discard(&mut self, q: usize, base: u64) -> Result<()> {
        let offset = Self::block_offset(base, 6);
        self.run_ok(
            q,
            &[Op::Discard {
                offset,
                len: BLOCK as u64,
            }],
            &["discard"],
        )?;
        let seg = self.stage(WRITE_AREA, BLOCK, offset, 2)?;
        self.run_ok(
            q,
            &[Op::Write {
                offset,
                segs: vec![seg],
            }],
            &["write after discard"],
        )?;
        self.read_verify(q, &[(offset, vec![BLOCK], Expect::Pattern(2))])
    }

    /// Requests past the end must fail, not wrap or succeed.
    fn out_of_range(&mut self, q: usize, capacity: u64) -> Result<()> {
        let seg = Seg {
            mem: READ_AREA,
            len: BLOCK,
        };
        let straddle = capacity.saturating_sub(2048);
        let ops = [
            Op::Read {
                offset: capacity,
                segs: vec![seg],
            },
            Op::Read {
                offset: straddle,
                segs: vec![seg],
            },
        ];
        let rets = self.run(q, &ops)?;
        for (ret, offset) in rets.iter().zip([capacity, straddle]) {
            if *ret == 0 {
                return Err(format!(
                    "a {BLOCK}-byte read at {offset} of a {capacity}-byte device succeeded"
                ));
            }
        }
        Ok(())
    }

    fn last_block(&mut self, q: usize, capacity: u64) -> Result<()> {
        let offset = capacity - BLOCK as u64;
        let seg = self.stage(WRITE_AREA, BLOCK, offset, 3)?;
        self.run_ok(
            q,
            &[Op::Write {
                offset,
                segs: vec![seg],
            }],
            &["write of the last block"],
        )?;
        self.read_verify(q, &[(offset, vec![BLOCK], Expect::Pattern(3))])
    }
}

fn run_check(args: &ArgMatches) -> Result<bool> {
    let socket: String = arg(args, "socket")?;
    let num_queues = usize::from(arg::<u16>(args, "queues")?);
    let mut conn = Connection::open(&socket, CHECK_BUFFER_LEN)?;
    let capacity = conn.capacity_bytes();
    let config = conn.config_json();
    let features = conn.features_json();
    let mut missing: Vec<&str> = Vec::new();
    for (name, flag) in [
        ("FLUSH", VirtioBlkFeatureFlags::FLUSH),
        ("DISCARD", VirtioBlkFeatureFlags::DISCARD),
        ("WRITE_ZEROES", VirtioBlkFeatureFlags::WRITE_ZEROES),
    ] {
        if !conn.has(flag) {
            missing.push(name);
        }
    }
    if conn.has(VirtioBlkFeatureFlags::RO) {
        missing.push("writability (RO is offered)");
    }
    if !missing.is_empty() {
        return Err(format!(
            "{socket}: the device lacks {}; check needs a writable device with flush, discard and write-zeroes",
            missing.join(", ")
        ));
    }
    let needed = SPAN * num_queues as u64;
    if capacity < needed {
        return Err(format!(
            "{socket}: the device has {capacity} bytes; checking {num_queues} queues needs {needed}"
        ));
    }

    let (queues, mem) = conn.start(num_queues, 256)?;
    let mut checker = Checker {
        queues,
        mem,
        steps: Vec::new(),
        ok: true,
    };
    for q in 0..num_queues {
        let base = SPAN * q as u64;
        let result = checker.write_all(q, base);
        checker.record(q, "write", result);
        let result = checker.read_all(q, base);
        checker.record(q, "read", result);
        if num_queues > 1 {
            let other = (q + 1) % num_queues;
            let result = checker.read_all(other, base);
            checker.record(q, "read-via-other-queue", result);
        }
        let result = checker.run_ok(q, &[Op::Flush], &["flush"]);
        checker.record(q, "flush", result);
        let result = checker.write_zeroes(q, base);
        checker.record(q, "write-zeroes", result);
        let result = checker.discard(q, base);
        checker.record(q, "discard", result);
        let result = checker.out_of_range(q, capacity);
        checker.record(q, "out-of-range", result);
    }
    let result = checker.last_block(0, capacity);
    checker.record(0, "last-block", result);

    let ok = checker.ok;
    let report = json!({
        "socket": socket,
        "config": config,
        "features": features,
        "queues_tested": num_queues,
        "steps": checker.steps,
        "ok": ok,
    });
    println!("{report}");
    Ok(ok)
}

// ---------------------------------------------------------------------------
// bench

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Pattern {
    fn parse(s: &str) -> Result<Self> {
        match s {
            "randread" => Ok(Pattern::RandRead),
            "randwrite" => Ok(Pattern::RandWrite),
            "read" => Ok(Pattern::SeqRead),
            "write" => Ok(Pattern::SeqWrite),
            _ => Err(format!("unknown --rw {s}")),
        }
    }

    fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::SeqWrite)
    }

    fn is_random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
}

#[derive(Clone, Copy)]
struct BenchSpec {
    pattern: Pattern,
    bs: u64,
    iodepth: usize,
    runtime: Duration,
    /// Bytes of the device in use, a multiple of `bs`.
    size: u64,
    num_queues: usize,
}

#[derive(Default)]
struct QueueStats {
    ios: u64,
    errors: u64,
    latencies_ns: Vec<u64>,
    elapsed: Duration,
}

/// Where the next request goes: random over the whole area, or sequential
/// within the queue's own stripe so each queue is one sequential stream.
struct Offsets {
    random: bool,
    rng: u64,
    stripe_start: u64,
    stripe_blocks: u64,
    next_block: u64,
    bs: u64,
    total_blocks: u64,
}

impl Offsets {
    fn new(spec: &BenchSpec, queue: usize) -> Self {
        let total_blocks = spec.size / spec.bs;
        let stripe_blocks = (total_blocks / spec.num_queues as u64).max(1);
        Offsets {
            random: spec.pattern.is_random(),
            rng: splitmix64(queue as u64 + 1),
            stripe_start: (queue as u64 * stripe_blocks).min(total_blocks - 1),
            stripe_blocks,
            next_block: 0,
            bs: spec.bs,
            total_blocks,
        }
    }

    fn next(&mut self) -> u64 {
        let block = if self.random {
            self.rng = splitmix64(self.rng);
            self.rng % self.total_blocks
        } else {
            let b = self.stripe_start + self.next_block;
            self.next_block = (self.next_block + 1) % self.stripe_blocks;
            b
        };
        block * self.bs
    }
}

fn bench_queue(
    queue: &mut QueueHandle,
    buffers: &mut [u8],
    spec: BenchSpec,
    start: &Barrier,
) -> Result<QueueStats> {
    let bs = spec.bs as usize;
    let mut offsets = Offsets::new(&spec, queue.index);
    let mut submitted_at = vec![Instant::now(); spec.iodepth];
    let mut stats = QueueStats {
        latencies_ns: Vec::with_capacity(1 << 16),
        ..QueueStats::default()
    };
    if spec.pattern.is_write() {
        fill_pattern(buffers, queue.index as u64, 7);
    }
    let base = buffers.as_mut_ptr();
    let mut submit = |queue: &mut QueueHandle, slot: usize, at: &mut Vec<Instant>| {
        // SAFETY: slot < iodepth and `buffers` holds iodepth * bs bytes.
        let buf = unsafe { base.add(slot * bs) };
        let offset = offsets.next();
        if let Some(t) = at.get_mut(slot) {
            *t = Instant::now();
        }
        // SAFETY: each slot's buffer is used by one request at a time and
        // stays mapped until all requests complete.
        let queued = unsafe {
            if spec.pattern.is_write() {
                queue.queue.write_raw(offset, buf, bs, slot)
            } else {
                queue.queue.read_raw(offset, buf, bs, slot)
            }
        };
        queued.map_err(|e| format!("queue {}: queueing a request: {e}", queue.index))
    };

    start.wait();
    let began = Instant::now();
    let deadline = began + spec.runtime;
    for slot in 0..spec.iodepth {
        submit(queue, slot, &mut submitted_at)?;
    }
    queue.kick()?;
    let mut in_flight = spec.iodepth;
    let mut done = Vec::with_capacity(spec.iodepth);
    while in_flight > 0 {
        done.clear();
        queue.wait(&mut done)?;
        let now = Instant::now();
        let more = now < deadline;
        for &(slot, ret) in &done {
            in_flight -= 1;
            stats.ios += 1;
            if ret != 0 {
                stats.errors += 1;
            }
            if let Some(t) = submitted_at.get(slot) {
                stats
                    .latencies_ns
                    .push(now.duration_since(*t).as_nanos() as u64);
            }
            if more {
                submit(queue, slot, &mut submitted_at)?;
                in_flight += 1;
            }
        }
        queue.kick()?;
    }
    stats.elapsed = began.elapsed();
    Ok(stats)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(idx).copied().unwrap_or(0) as f64
}

fn run_bench(args: &ArgMatches) -> Result<bool> {
    let socket: String = arg(args, "socket")?;
    let num_queues = usize::from(arg::<u16>(args, "queues")?);
    let pattern = Pattern::parse(&arg::<String>(args, "rw")?)?;
    let bs = u64::from(arg::<u32>(args, "bs")?);
    let iodepth = usize::from(arg::<u16>(args, "iodepth")?);
    let runtime_s: f64 = arg(args, "runtime")?;
    if bs % SECTOR != 0 {
        return Err(format!("--bs {bs} is not a multiple of {SECTOR}"));
    }
    if !(runtime_s > 0.0 && runtime_s < 86400.0) {
        return Err(format!("--runtime {runtime_s} is not in (0, 86400)"));
    }
    let per_queue = usize::try_from(bs)
        .ok()
        .and_then(|bs| bs.checked_mul(iodepth))
        .ok_or_else(|| "--bs * --iodepth is too large".to_string())?;
    let buffer_len = per_queue
        .checked_mul(num_queues)
        .ok_or_else(|| "--bs * --iodepth * --queues is too large".to_string())?;

    let mut conn = Connection::open(&socket, buffer_len)?;
    let capacity = conn.capacity_bytes();
    if pattern.is_write() && conn.has(VirtioBlkFeatureFlags::RO) {
        return Err(format!("{socket}: the device is read-only"));
    }
    let size = args
        .get_one::<u64>("size")
        .copied()
        .unwrap_or(capacity)
        .min(capacity)
        / bs
        * bs;
    if size == 0 {
        return Err(format!(
            "{socket}: the device ({capacity} bytes) is smaller than one {bs}-byte request"
        ));
    }
    let spec = BenchSpec {
        pattern,
        bs,
        iodepth,
        runtime: Duration::from_secs_f64(runtime_s),
        size,
        num_queues,
    };
    let queue_size = (iodepth * DESCRIPTORS_PER_REQUEST)
        .next_power_of_two()
        .clamp(64, MAX_QUEUE_SIZE) as u16;
    let (mut queues, mem) = conn.start(num_queues, queue_size)?;

    let start = Barrier::new(num_queues);
    let results: Vec<Result<QueueStats>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .zip(mem.chunks_mut(per_queue))
            .map(|(queue, buffers)| {
                let start = &start;
                s.spawn(move || bench_queue(queue, buffers, spec, start))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a queue thread panicked".to_string()))
            })
            .collect()
    });

    let mut ios = 0;
    let mut errors = 0;
    let mut elapsed = Duration::ZERO;
    let mut latencies = Vec::new();
    for r in results {
        let stats = r?;
        ios += stats.ios;
        errors += stats.errors;
        elapsed = elapsed.max(stats.elapsed);
        latencies.extend(stats.latencies_ns);
    }
    latencies.sort_unstable();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mean_ns = if latencies.is_empty() {
        0.0
    } else {
        latencies.iter().sum::<u64>() as f64 / latencies.len() as f64
    };
    let report = json!({
        "socket": socket,
        "rw": arg::<String>(args, "rw")?,
        "bs": bs,
        "iodepth": iodepth,
        "queues": num_queues,
        "size": size,
        "runtime_s": secs,
        "ios": ios,
        "errors": errors,
        "iops": ios as f64 / secs,
        "mib_s": (ios * bs) as f64 / secs / 1048576.0,
        "lat_mean_us": mean_ns / 1000.0,
        "lat_p50_us": percentile(&latencies, 0.50) / 1000.0,
        "lat_p99_us": percentile(&latencies, 0.99) / 1000.0,
    });
    println!("{report}");
    if errors > 0 {
        eprintln!("vublk: {errors} of {ios} requests failed");
    }
    Ok(errors == 0)
}
