//! The block layer: nodes, the driver trait they are built on, and the graph
//! that names them.
//!
//! Every driver implements [`BlockDriver`]. I/O is synchronous and vectored:
//! callers pass their own buffers (NBD request buffers, guest memory slices) and
//! drivers read or write straight into them, with no bounce copy.

pub mod file;
pub mod null;
pub mod raw;

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Arc;

/// The state of one extent, as [`BlockDriver::block_status`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, at least 1 unless the query started at end of disk.
    pub length: u64,
    /// The extent holds data (it is not a hole).
    pub data: bool,
    /// The extent reads as zeroes.
    pub zero: bool,
    /// Which layer of a backing chain holds the extent: 0 unallocated,
    /// 1 this node, 2 and more for backing layers.
    pub depth: u32,
}

/// Flags for [`BlockDriver::write_zeroes`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated (punched) rather than written.
    pub may_unmap: bool,
    /// Fail with `ENOTSUP` instead of falling back to writing zero buffers.
    pub fast_only: bool,
}

/// What a block driver does. Offsets and lengths are in bytes; callers check
/// ranges against [`BlockDriver::size`] before calling.
pub trait BlockDriver: Send + Sync {
    /// The driver's name as `blockdev-add` takes it (`file`, `null-co`, ...).
    fn driver_name(&self) -> &'static str;
    /// The current size of the node in bytes.
    fn size(&self) -> u64;
    /// Whether the node was opened read-only.
    fn read_only(&self) -> bool;
    /// The smallest I/O unit the driver accepts, a power of two (1 for buffered files).
    fn request_alignment(&self) -> u32 {
        1
    }
    /// A filename for `query-named-block-nodes` (`file`), if the driver has one.
    fn filename(&self) -> Option<String> {
        None
    }
    /// The children of this node (a format node's `file` child), for the
    /// graph's reference counting.
    fn children(&self) -> Vec<Arc<BlockNode>> {
        Vec::new()
    }
    /// Fills `bufs` from `offset`. Bytes past the end of the backing storage read
    /// as zeroes.
    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()>;
    /// Writes all of `bufs` at `offset`.
    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Hints that a range is no longer needed; it may read back as anything
    /// afterwards. Drivers that cannot discard succeed and do nothing.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes a range read back as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()>;
    /// Describes the extent that starts at `offset`, at most `len` bytes long.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent>;
    /// Changes the size of the node.
    fn resize(&self, new_size: u64) -> io::Result<()>;
}

/// A named node in the block graph.
pub struct BlockNode {
    name: String,
    driver: Box<dyn BlockDriver>,
}

impl BlockNode {
    pub fn new(name: String, driver: Box<dyn BlockDriver>) -> Self {
        BlockNode { name, driver }
    }

    /// The node's `node-name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn driver(&self) -> &dyn BlockDriver {
        self.driver.as_ref()
    }
}
