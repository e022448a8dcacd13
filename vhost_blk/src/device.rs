//! The vhost-user backend: feature negotiation, config space, memory, queues.

use std::ffi::CString;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{
    queue_mask, BlkConfig, ConfigSpace, QueueGroup, CONFIG_SPACE_SIZE, CONFIG_WCE_OFFSET,
    MAX_DISCARD_WZ_SECTORS, MAX_DISCARD_WZ_SEG, MAX_QUEUE_SIZE, SECTOR_SIZE, SEG_MAX,
};
use crate::request::{process_chain, DeviceContext};
use crate::BlockDisk;

/// vhost-user protocol features we offer.
pub const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::BACKEND_REQ);

/// Virtio features offered for an export (RO when not writable).
pub fn device_features(writable: bool) -> u64 {
    let bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ];
    let mut features = bits.iter().fold(0u64, |f, &b| f | (1u64 << b))
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if !writable {
        features |= 1 << VIRTIO_BLK_F_RO;
    }
    features
}

/// Header of VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: request 2, version 1, no payload.
const CONFIG_CHANGE_MSG: [u8; 12] = [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];

/// Where polling starts once sleeping has been seen to be short (QEMU: 4 us).
const POLL_START: Duration = Duration::from_micros(4);

/// Adaptive polling of one queue, as QEMU's event loop does it: after serving the queue,
/// the worker watches it for new requests for a while before it re-enables kicks and
/// sleeps, which spares the front-end a kick and the worker a wake-up when requests come
/// close together. The window doubles while the worker keeps being woken within `max`
/// (the queue group's `poll_max`) of going to sleep, and halves (down to nothing) when the
/// sleeps are longer.
struct PollWindow {
    window: Duration,
    max: Duration,
    slept_at: Option<Instant>,
}

impl PollWindow {
    fn new(max: Duration) -> Self {
        PollWindow {
            window: Duration::ZERO,
            max,
            slept_at: None,
        }
    }

    /// The worker is awake again: adjust the window to how long it slept.
    fn woken(&mut self) {
        if let Some(slept_at) = self.slept_at.take() {
            self.adjust(slept_at.elapsed());
        }
    }

    fn adjust(&mut self, slept: Duration) {
        if slept > self.max {
            self.window /= 2;
            if self.window < POLL_START {
                self.window = Duration::ZERO;
            }
        } else if slept > self.window {
            self.window = (self.window * 2).max(POLL_START).min(self.max);
        }
    }
}

struct Worker {
    group: QueueGroup,
    exit: (EventConsumer, EventNotifier),
    start: (EventConsumer, EventNotifier),
}

/// One front-end connection's device. A new one is made per connection so
/// every front-end starts from a clean state.
pub(crate) struct BlkBackend {
    ctx: DeviceContext,
    num_queues: usize,
    max_mem_slots: usize,
    event_idx: AtomicBool,
    /// Memory accepted by `update_memory`; requests only use this one.
    mem: RwLock<Arc<GuestMemoryMmap>>,
    workers: Vec<Worker>,
    /// One per queue, used only by the worker that serves the queue.
    poll: Vec<Mutex<PollWindow>>,
    /// Our end of the back-end request channel, captured by the proxy.
    backend_req: Mutex<Option<UnixStream>>,
}

fn event_pair() -> io::Result<(EventConsumer, EventNotifier)> {
    new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
}

impl BlkBackend {
    pub fn new(
        disk: Arc<dyn BlockDisk>,
        config: &BlkConfig,
        groups: &[QueueGroup],
    ) -> io::Result<Self> {
        let workers = groups
            .iter()
            .map(|group| {
                Ok(Worker {
                    group: group.clone(),
                    exit: event_pair()?,
                    start: event_pair()?,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        // Before any worker runs (and perhaps pins itself): see `PollSlot::limit`.
        PollSlot::limit();
        Ok(BlkBackend {
            ctx: DeviceContext {
                disk,
                serial: config.serial.as_bytes().to_vec(),
                logical_block_size: u64::from(config.logical_block_size),
                writable: config.writable,
                writeback: AtomicBool::new(!config.writethrough),
            },
            num_queues: usize::from(config.num_queues),
            max_mem_slots: config.max_mem_slots,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(Arc::new(GuestMemoryMmap::new())),
            workers,
            poll: (0..config.num_queues)
                .map(|q| {
                    let max = groups
                        .iter()
                        .find(|g| g.queues.contains(&q))
                        .map_or(Duration::ZERO, |g| g.poll_max);
                    Mutex::new(PollWindow::new(max))
                })
                .collect(),
            backend_req: Mutex::new(None),
        })
    }

    fn name(&self) -> String {
        String::from_utf8_lossy(&self.ctx.serial).into_owned()
    }

    /// Epoll token of the worker-start event: above the queue and exit tokens.
    pub fn worker_start_token(&self) -> u64 {
        self.num_queues as u64 + 1
    }

    /// The fd to register with worker `index`'s epoll handler and trigger.
    pub fn worker_start_event(&self, index: usize) -> Option<(&EventConsumer, &EventNotifier)> {
        self.workers.get(index).map(|w| (&w.start.0, &w.start.1))
    }

    pub fn config_space(&self) -> ConfigSpace {
        let lbs = self.ctx.logical_block_size;
        ConfigSpace {
            capacity: self.ctx.disk.size() / SECTOR_SIZE,
            seg_max: SEG_MAX,
            blk_size: u32::try_from(lbs).unwrap_or(u32::MAX),
            min_io_size: 1,
            opt_io_size: 1,
            wce: u8::from(self.ctx.writeback.load(Ordering::Acquire)),
            num_queues: u16::try_from(self.num_queues).unwrap_or(u16::MAX),
            max_discard_sectors: MAX_DISCARD_WZ_SECTORS,
            max_discard_seg: MAX_DISCARD_WZ_SEG,
            discard_sector_alignment: u32::try_from(lbs / SECTOR_SIZE).unwrap_or(u32::MAX),
            max_write_zeroes_sectors: MAX_DISCARD_WZ_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_WZ_SEG,
            write_zeroes_may_unmap: 1,
        }
    }

    pub fn set_backend_req_stream(&self, stream: UnixStream) {
        if let Ok(mut slot) = self.backend_req.lock() {
            *slot = Some(stream);
        }
    }

    /// Sends CONFIG_CHANGE_MSG if the front-end gave us a back-end channel.
    pub fn notify_config_change(&self) -> io::Result<bool> {
        let Ok(mut slot) = self.backend_req.lock() else {
            return Ok(false);
        };
        let Some(stream) = slot.as_mut() else {
            return Ok(false);
        };
        stream.write_all(&CONFIG_CHANGE_MSG)?;
        Ok(true)
    }

    fn run_worker_start(&self, thread_id: usize) {
        let Some(worker) = self.workers.get(thread_id) else {
            return;
        };
        if worker.start.0.consume().is_err() {
            return;
        }
        set_os_thread_name(&worker.group.name);
        if let Some(hook) = &worker.group.on_worker_start {
            hook();
        }
        debug!(
            "vhost-user-blk export '{}': worker '{}' started",
            self.name(),
            worker.group.name
        );
    }

    /// Serves one queue until it has no more available chains.
    fn process_queue(&self, vring: &VringRwLock, index: usize) {
        let event_idx = self.event_idx.load(Ordering::Acquire);
        // Polling needs EVENT_IDX: without it, the front-end kicks for every request.
        let mut poll = match self.poll.get(index).map(Mutex::lock) {
            Some(Ok(poll)) if event_idx => Some(poll),
            _ => None,
        };
        if let Some(poll) = poll.as_mut() {
            poll.woken();
        }
        // Whether the ring said more chains were available when this pass began.
        let mut told_more = false;
        loop {
            // Each pass sees the latest memory table: with polling, one call may last as
            // long as requests keep coming.
            let mem = match self.mem.read() {
                Ok(m) => Arc::clone(&m),
                Err(_) => return,
            };
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    warn!(
                        "vhost-user-blk export '{}': cannot disable notifications: {e}",
                        self.name()
                    );
                    return;
                }
            }
            let mut completed = false;
            loop {
                // A separate statement so the vring lock is released before processing.
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                let used_len = process_chain(chain, &mem, &self.ctx);
                if let Err(e) = vring.add_used(head, used_len) {
                    warn!(
                        "vhost-user-blk export '{}': cannot complete request {head}: {e}",
                        self.name()
                    );
                    return;
                }
                completed = true;
            }
            if told_more && !completed {
                // The available index says there is more, yet nothing can be popped: a
                // queue being stopped, or an index the driver set beyond the ring. Going
                // round again would spin forever; the next kick tries again.
                debug!(
                    "vhost-user-blk export '{}': queue {index} announces requests it does not hold",
                    self.name()
                );
                return;
            }
            told_more = true;
            if completed {
                match vring.needs_notification() {
                    Ok(true) => {
                        if let Err(e) = vring.signal_used_queue() {
                            warn!(
                                "vhost-user-blk export '{}': cannot signal the guest: {e}",
                                self.name()
                            );
                        }
                    }
                    Ok(false) => {}
                    Err(e) => warn!(
                        "vhost-user-blk export '{}': used event check failed: {e}",
                        self.name()
                    ),
                }
            }
            if !event_idx {
                return;
            }
            if let Some(poll) = poll.as_ref() {
                if !poll.window.is_zero() && Self::poll_for_chains(vring, &mem, poll.window) {
                    continue;
                }
            }
            match vring.enable_notification() {
                // New chains arrived while notifications were off: go again.
                Ok(true) => continue,
                Ok(false) => {
                    if let Some(poll) = poll.as_mut() {
                        // Counted from here, not from the start of the poll as QEMU counts:
                        // counting the poll too kept the window at its cap, and one queue at
                        // QD1 measured 48k IOPS against 93-95k (scripts/bench.sh).
                        poll.slept_at = Some(Instant::now());
                    }
                    return;
                }
                Err(e) => {
                    warn!(
                        "vhost-user-blk export '{}': cannot enable notifications: {e}",
                        self.name()
                    );
                    return;
                }
            }
        }
    }

    /// Watch the queue for up to `window`; whether a new chain arrived. Gives up at once
    /// when enough other workers poll already (see [`PollSlot`]).
    fn poll_for_chains(vring: &VringRwLock, mem: &GuestMemoryMmap, window: Duration) -> bool {
        let Some(_slot) = PollSlot::take() else {
            return false;
        };
        let deadline = Instant::now() + window;
        loop {
            let arrived = {
                let state = vring.get_ref();
                let queue = state.get_queue();
                queue
                    .avail_idx(mem, Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != queue.next_avail())
            };
            if arrived {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // A driver thread may be waiting for this CPU.
            std::thread::yield_now();
        }
    }
}

/// Workers polling right now, in this process.
static POLLING: AtomicUsize = AtomicUsize::new(0);

/// The right to poll. Polling pays only while a CPU is free for it: workers that spin on
/// every CPU starve the front-end's threads (with two queues on two CPUs, that cost two
/// thirds of the IOPS in scripts/bench.sh). So at most half the CPUs (at least one) poll
/// at once; the other workers sleep until kicked.
struct PollSlot;

impl PollSlot {
    /// Half the CPUs the process may use. Fixed on first use, which must not be on a worker:
    /// `available_parallelism` counts the calling thread's CPUs, and a worker may be pinned to
    /// an iothread's one CPU (see [`BlkBackend::new`]).
    fn limit() -> usize {
        static LIMIT: OnceLock<usize> = OnceLock::new();
        *LIMIT.get_or_init(|| {
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        })
    }

    fn take() -> Option<PollSlot> {
        let limit = Self::limit();
        POLLING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| PollSlot)
    }
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        POLLING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Renames the calling thread as the OS sees it (vhost-user-backend names
/// all its workers "vring_worker" and offers no hook for it).
fn set_os_thread_name(name: &str) {
    let mut bytes: Vec<u8> = name.bytes().filter(|&b| b != 0).take(15).collect();
    // Don't cut a UTF-8 sequence in half.
    while !bytes.is_empty() && std::str::from_utf8(&bytes).is_err() {
        bytes.pop();
    }
    if let Ok(cname) = CString::new(bytes) {
        // SAFETY: pthread_self() is the calling thread and `cname` is a valid
        // NUL-terminated string of at most 16 bytes.
        unsafe { libc::pthread_setname_np(libc::pthread_self(), cname.as_ptr()) };
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        device_features(self.ctx.writable)
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        PROTOCOL_FEATURES
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Front-ends may ask for the whole (longer) spec struct; the rest reads as zero.
        let mut space = vec![0u8; std::mem::size_of::<virtio_blk_config>().max(CONFIG_SPACE_SIZE)];
        space[..CONFIG_SPACE_SIZE].copy_from_slice(&self.config_space().to_bytes());
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= space.len() => space[start..end].to_vec(),
            // An empty reply makes the front-end see an error.
            _ => Vec::new(),
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // As QSD: only the guest's write-cache toggle is writable.
        if offset as usize == CONFIG_WCE_OFFSET && buf.len() == 1 {
            let writeback = buf[0] != 0;
            self.ctx.writeback.store(writeback, Ordering::Release);
            info!(
                "vhost-user-blk export '{}': guest set write cache {}",
                self.name(),
                if writeback {
                    "on"
                } else {
                    "off (writethrough)"
                }
            );
        } else {
            debug!(
                "vhost-user-blk export '{}': ignoring config write of {} bytes at {offset}",
                self.name(),
                buf.len()
            );
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        let snapshot = mem.memory().into_inner();
        let regions = snapshot.num_regions();
        if regions > self.max_mem_slots {
            error!(
                "vhost-user-blk export '{}': front-end maps {regions} memory regions, the limit is {}",
                self.name(),
                self.max_mem_slots
            );
            return Err(io::Error::other(format!(
                "{regions} memory regions exceed the limit of {}",
                self.max_mem_slots
            )));
        }
        let mut slot = self
            .mem
            .write()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))?;
        *slot = snapshot;
        Ok(())
    }

    fn set_backend_req_fd(&self, _backend: Backend) {
        // vhost 0.18's Backend cannot send CONFIG_CHANGE_MSG; the proxy keeps
        // its own copy of this channel (see `proxy`).
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        self.workers.iter().map(|w| queue_mask(&w.group)).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let worker = self.workers.get(thread_index)?;
        match (worker.exit.0.try_clone(), worker.exit.1.try_clone()) {
            (Ok(c), Ok(n)) => Some((c, n)),
            (Err(e), _) | (_, Err(e)) => {
                error!(
                    "vhost-user-blk export '{}': cannot clone exit event: {e}",
                    self.name()
                );
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        // Errors are logged, never returned: an error would end the worker thread.
        if u64::from(device_event) == self.worker_start_token() {
            self.run_worker_start(thread_id);
            return Ok(());
        }
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(vring, usize::from(device_event)),
            None => warn!(
                "vhost-user-blk export '{}': event {device_event} for an unknown queue",
                self.name()
            ),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[test]
    fn poll_window_follows_how_long_the_worker_sleeps() {
        let us = Duration::from_micros;
        const POLL_MAX: Duration = Duration::from_micros(64);
        let mut w = PollWindow::new(POLL_MAX);
        let mut after = |slept: Duration| {
            w.adjust(slept);
            w.window
        };
        // Short sleeps: polling starts, then doubles while sleeps outlast it, up to the cap.
        assert_eq!(after(us(1)), POLL_START);
        assert_eq!(after(us(2)), POLL_START);
        assert_eq!(after(us(10)), us(8));
        assert_eq!(after(us(60)), us(16));
        assert_eq!(after(us(60)), us(32));
        assert_eq!(after(us(60)), POLL_MAX);
        assert_eq!(after(POLL_MAX), POLL_MAX);
        // Long sleeps: polling was wasted; it halves, then stops.
        assert_eq!(after(us(1000)), us(32));
        assert_eq!(after(us(1000)), us(16));
        assert_eq!(after(us(1000)), us(8));
        assert_eq!(after(us(1000)), us(4));
        assert_eq!(after(us(1000)), Duration::ZERO);
        assert_eq!(after(us(1000)), Duration::ZERO);
        // poll-max-ns=0: never polls.
        let mut off = PollWindow::new(Duration::ZERO);
        for slept in [us(0), us(1), us(10), us(1000)] {
            off.adjust(slept);
            assert_eq!(off.window, Duration::ZERO);
        }
    }

    /// A ready 16-entry vring on the rings `mock` laid out in `mem`.
    fn ready_vring(
        mem: &GuestMemoryMmap,
        mock: &MockSplitQueue<'_, GuestMemoryMmap>,
    ) -> VringRwLock {
        let vring = VringRwLock::new(GuestMemoryAtomic::new(mem.clone()), 16).unwrap();
        vring.set_queue_size(16);
        vring
            .set_queue_info(
                mock.desc_table_addr().0,
                mock.avail_addr().0,
                mock.used_addr().0,
            )
            .unwrap();
        vring.set_queue_ready(true);
        vring
    }

    #[test]
    fn an_available_index_beyond_the_ring_does_not_spin_the_worker() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let vring = ready_vring(&mem, &mock);
        vring.set_queue_event_idx(true);
        let mut config = BlkConfig::new("bad-index");
        config.num_queues = 1;
        let groups = config.validated_groups().unwrap();
        let disk = Arc::new(crate::test_utils::MemDisk::new(1 << 20));
        let backend = Arc::new(BlkBackend::new(disk, &config, &groups).unwrap());
        backend.set_event_idx(true);
        *backend.mem.write().unwrap() = Arc::new(mem.clone());
        // A driver claims 100 requests in a 16-entry ring.
        mock.avail().idx().store(100);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // Not scoped: a worker that spins must fail the test, not hang it.
        std::thread::spawn(move || {
            backend.process_queue(&vring, 0);
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(30)).is_ok(),
            "the worker kept spinning on a bogus available index"
        );
    }

    #[test]
    fn polling_sees_a_chain_that_arrives_within_the_window() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let vring = ready_vring(&mem, &mock);
        // Nothing arrives: the whole window passes.
        let start = Instant::now();
        assert!(!BlkBackend::poll_for_chains(
            &vring,
            &mem,
            Duration::from_millis(5)
        ));
        assert!(start.elapsed() >= Duration::from_millis(5));
        // A chain made available meanwhile ends the poll.
        std::thread::scope(|s| {
            let poller = s.spawn(|| {
                let start = Instant::now();
                let found = BlkBackend::poll_for_chains(&vring, &mem, Duration::from_secs(60));
                (found, start.elapsed())
            });
            std::thread::sleep(Duration::from_millis(20));
            mock.add_chain(1).unwrap();
            let (found, took) = poller.join().unwrap();
            assert!(found);
            assert!(took < Duration::from_secs(60));
        });
    }
}
