//! Export configuration and the virtio-blk configuration space.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::Error;

/// Sector unit of virtio-blk, independent of the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Largest number of data segments in one request (`seg_max`, as QSD).
pub const SEG_MAX: u32 = 126;
/// Largest discard / write-zeroes request in sectors (as QSD).
pub const MAX_DISCARD_WZ_SECTORS: u32 = 32768;
/// Only one discard / write-zeroes segment per request (as QSD).
pub const MAX_DISCARD_WZ_SEG: u32 = 1;
/// Longest serial returned by GET_ID (VIRTIO_BLK_ID_BYTES).
pub const SERIAL_MAX_LEN: usize = 20;
/// What vhost-user-backend 0.24 answers to GET_MAX_MEM_SLOTS (a constant there).
pub const DEFAULT_MAX_MEM_SLOTS: usize = 509;
/// Largest virtqueue a front-end may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Largest number of queues of one export.
pub const MAX_NUM_QUEUES: u16 = 64;

/// Callback run on a worker thread before it serves any queue, once per
/// front-end connection (each connection gets fresh worker threads).
pub type WorkerStartHook = Arc<dyn Fn() + Send + Sync>;

/// A set of queues served by one worker thread.
#[derive(Clone)]
pub struct QueueGroup {
    /// Name given to the worker thread (e.g. the iothread id); the OS name is
    /// truncated to 15 bytes.
    pub name: String,
    /// Queue indexes served by this worker.
    pub queues: Vec<u16>,
    /// Run on the worker thread before it serves any queue, e.g. to apply
    /// the iothread's CPU affinity.
    pub on_worker_start: Option<WorkerStartHook>,
    /// How long the worker may poll a queue for new requests before it
    /// sleeps (QEMU's iothread `poll-max-ns`); zero never polls.
    pub poll_max: Duration,
}

/// Polling limit of workers of their own (not an iothread's): twice QEMU's
/// default `poll-max-ns`. With one queue at QD32 a driver's turnaround often
/// takes longer than 32 us here, and every miss costs a kick and a wake-up
/// (scripts/bench.sh: 1.2-1.9x QSD's single-queue IOPS with 64 us, 0.4-1.1x
/// with 32 us).
pub const DEFAULT_POLL_MAX: Duration = Duration::from_micros(64);

impl fmt::Debug for QueueGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueGroup")
            .field("name", &self.name)
            .field("queues", &self.queues)
            .field("on_worker_start", &self.on_worker_start.is_some())
            .field("poll_max", &self.poll_max)
            .finish()
    }
}

/// Configuration of one vhost-user-blk export.
#[derive(Clone, Debug)]
pub struct BlkConfig {
    /// Export id; returned by GET_ID (truncated to 20 bytes).
    pub serial: String,
    /// Number of virtqueues, 1..=64.
    pub num_queues: u16,
    /// Logical block size in bytes: a power of two in 512..=2 MiB.
    pub logical_block_size: u32,
    /// Whether the guest may write (RO feature bit otherwise).
    pub writable: bool,
    /// Start with the write cache off (config `wce` = 0): flush after every write.
    pub writethrough: bool,
    /// Worker threads and the queues each one serves; empty means one worker
    /// named after the serial serving all queues.
    pub thread_groups: Vec<QueueGroup>,
    /// Most memory regions a front-end may map (ADD_MEM_REG beyond it fails
    /// and ends the connection). At most 509, the value GET_MAX_MEM_SLOTS reports.
    pub max_mem_slots: usize,
}

impl BlkConfig {
    /// A configuration with QSD's defaults: one queue, 512-byte blocks,
    /// read-only, write cache on, one worker thread.
    pub fn new(serial: impl Into<String>) -> Self {
        BlkConfig {
            serial: serial.into(),
            num_queues: 1,
            logical_block_size: 512,
            writable: false,
            writethrough: false,
            thread_groups: Vec::new(),
            max_mem_slots: DEFAULT_MAX_MEM_SLOTS,
        }
    }

    fn invalid(&self, reason: String) -> Error {
        Error::InvalidConfig {
            serial: self.serial.clone(),
            reason,
        }
    }

    /// Checks the values and returns the worker thread groups to use.
    pub(crate) fn validated_groups(&self) -> Result<Vec<QueueGroup>, Error> {
        if self.num_queues == 0 || self.num_queues > MAX_NUM_QUEUES {
            return Err(self.invalid(format!(
                "num-queues {} is not in 1..={MAX_NUM_QUEUES}",
                self.num_queues
            )));
        }
        let lbs = self.logical_block_size;
        if !lbs.is_power_of_two() || !(512..=2 * 1024 * 1024).contains(&lbs) {
            return Err(self.invalid(format!(
                "logical-block-size {lbs} is not a power of two in 512..=2097152"
            )));
        }
        if self.max_mem_slots == 0 || self.max_mem_slots > DEFAULT_MAX_MEM_SLOTS {
            return Err(self.invalid(format!(
                "max-mem-slots {} is not in 1..={DEFAULT_MAX_MEM_SLOTS}",
                self.max_mem_slots
            )));
        }
        if self.thread_groups.is_empty() {
            return Ok(vec![QueueGroup {
                name: self.serial.clone(),
                queues: (0..self.num_queues).collect(),
                on_worker_start: None,
                poll_max: DEFAULT_POLL_MAX,
            }]);
        }
        let mut seen = 0u64;
        for group in &self.thread_groups {
            if group.queues.is_empty() {
                return Err(self.invalid(format!("thread group '{}' has no queue", group.name)));
            }
            for &q in &group.queues {
                if q >= self.num_queues {
                    return Err(self.invalid(format!(
                        "thread group '{}' names queue {q} but the export has {} queues",
                        group.name, self.num_queues
                    )));
                }
                if seen & (1 << q) != 0 {
                    return Err(self.invalid(format!("queue {q} is in more than one thread group")));
                }
                seen |= 1 << q;
            }
        }
        let missing: Vec<u16> = (0..self.num_queues)
            .filter(|q| seen & (1 << q) == 0)
            .collect();
        if !missing.is_empty() {
            return Err(self.invalid(format!("queues {missing:?} are in no thread group")));
        }
        Ok(self.thread_groups.clone())
    }
}

/// Bitmask of the queues of a group, as `queues_per_thread()` wants it.
pub(crate) fn queue_mask(group: &QueueGroup) -> u64 {
    group
        .queues
        .iter()
        .fold(0u64, |mask, &q| mask | (1u64 << q))
}

/// Size of the config space we serve (up to `write_zeroes_may_unmap` and its padding).
pub const CONFIG_SPACE_SIZE: usize = 60;
/// Offset of the `wce` byte, the only field the guest may write.
pub const CONFIG_WCE_OFFSET: usize = 32;

/// The fields of `struct virtio_blk_config` that we fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigSpace {
    pub capacity: u64,
    pub seg_max: u32,
    pub blk_size: u32,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub wce: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl ConfigSpace {
    /// Little-endian layout of the virtio spec (offsets of `struct virtio_blk_config`).
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut b = [0u8; CONFIG_SPACE_SIZE];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        // 8: size_max stays 0 (SIZE_MAX not offered)
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16: geometry stays 0 (GEOMETRY not offered)
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        // 24, 25: physical_block_exp, alignment_offset = 0
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        b[CONFIG_WCE_OFFSET] = self.wce;
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b
    }

    /// Parses the layout written by [`ConfigSpace::to_bytes`] (used by front-end tests).
    pub fn from_bytes(b: &[u8]) -> Option<ConfigSpace> {
        let u16_at = |o: usize| Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?));
        let u32_at = |o: usize| Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?));
        Some(ConfigSpace {
            capacity: u64::from_le_bytes(b.get(0..8)?.try_into().ok()?),
            seg_max: u32_at(12)?,
            blk_size: u32_at(20)?,
            min_io_size: u16_at(26)?,
            opt_io_size: u32_at(28)?,
            wce: *b.get(CONFIG_WCE_OFFSET)?,
            num_queues: u16_at(34)?,
            max_discard_sectors: u32_at(36)?,
            max_discard_seg: u32_at(40)?,
            discard_sector_alignment: u32_at(44)?,
            max_write_zeroes_sectors: u32_at(48)?,
            max_write_zeroes_seg: u32_at(52)?,
            write_zeroes_may_unmap: *b.get(56)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_groups_cover_all_queues() {
        let mut c = BlkConfig::new("disk0");
        c.num_queues = 4;
        let groups = c.validated_groups().unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(queue_mask(&groups[0]), 0b1111);
        assert_eq!(groups[0].name, "disk0");
    }

    #[test]
    fn rejects_bad_values() {
        let group = |name: &str, queues: Vec<u16>| QueueGroup {
            name: name.into(),
            queues,
            on_worker_start: None,
            poll_max: DEFAULT_POLL_MAX,
        };
        let mut c = BlkConfig::new("d");
        c.num_queues = 0;
        assert!(c.validated_groups().is_err());
        c.num_queues = 65;
        assert!(c.validated_groups().is_err());
        c.num_queues = 2;
        c.logical_block_size = 1000;
        assert!(c.validated_groups().is_err());
        c.logical_block_size = 4096;
        c.thread_groups = vec![group("io0", vec![0])];
        let err = c.validated_groups().unwrap_err().to_string();
        assert!(err.contains("[1]") && err.contains("'d'"), "{err}");
        c.thread_groups = vec![group("io0", vec![0, 1]), group("io1", vec![1])];
        assert!(c.validated_groups().is_err());
        c.thread_groups = vec![group("io0", vec![0, 2])];
        assert!(c.validated_groups().is_err());
        c.thread_groups = vec![group("io0", vec![1]), group("io1", vec![0])];
        let groups = c.validated_groups().unwrap();
        assert_eq!(queue_mask(&groups[0]), 0b10);
        c.max_mem_slots = 510;
        assert!(c.validated_groups().is_err());
    }

    #[test]
    fn config_space_round_trip() {
        let cs = ConfigSpace {
            capacity: 131072,
            seg_max: 126,
            blk_size: 4096,
            min_io_size: 1,
            opt_io_size: 1,
            wce: 1,
            num_queues: 4,
            max_discard_sectors: 32768,
            max_discard_seg: 1,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 32768,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: 1,
        };
        let b = cs.to_bytes();
        assert_eq!(&b[0..8], &131072u64.to_le_bytes());
        assert_eq!(&b[20..24], &4096u32.to_le_bytes());
        assert_eq!(b[32], 1);
        assert_eq!(&b[34..36], &4u16.to_le_bytes());
        assert_eq!(ConfigSpace::from_bytes(&b), Some(cs));
    }
}
