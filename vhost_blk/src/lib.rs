//! A virtio-blk device served over vhost-user (vhost-user-backend 0.24).
//!
//! The daemon implements [`BlockDisk`] for its block nodes and runs one
//! [`BlkExport`] per vhost-user-blk export. The export serves front-ends one
//! after another on its listening socket; each connection gets a fresh
//! device (clean state), as QEMU's `reconnect=` and guest reboots expect.

use std::io::{self, IoSlice, IoSliceMut};

mod config;
mod device;
mod export;
mod proxy;
mod request;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

#[cfg(test)]
mod request_tests;
#[cfg(test)]
mod socket_tests;

pub use config::{
    BlkConfig, ConfigSpace, QueueGroup, WorkerStartHook, CONFIG_SPACE_SIZE, CONFIG_WCE_OFFSET,
    DEFAULT_MAX_MEM_SLOTS, DEFAULT_POLL_MAX, MAX_DISCARD_WZ_SECTORS, MAX_NUM_QUEUES,
    MAX_QUEUE_SIZE, SEG_MAX,
};
pub use device::{device_features, PROTOCOL_FEATURES};
pub use export::BlkExport;

/// What the device needs from a disk. Offsets and lengths are in bytes;
/// requests are validated (aligned to the logical block size, inside
/// `size()`) before they get here.
///
/// The I/O buffers are guest memory: pass them to the kernel (or copy them)
/// but do not keep references after returning.
pub trait BlockDisk: Send + Sync {
    /// Current size in bytes; may change on resize.
    fn size(&self) -> u64;
    /// Fills all of `bufs` from `offset`.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()>;
    /// Writes all of `bufs` at `offset`.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

/// Errors of export setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid vhost-user-blk export '{serial}': {reason}")]
    InvalidConfig { serial: String, reason: String },
    #[error("vhost-user-blk export '{serial}': cannot {what}: {source}")]
    Io {
        serial: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}
