//! The block layer: nodes, the driver trait they are built on, and the graph
//! that names them.
//!
//! Every driver implements [`BlockDriver`]. I/O is synchronous and vectored:
//! callers pass their own buffers (NBD request buffers, guest memory slices) and
//! drivers read or write straight into them, with no bounce copy.

pub mod bitmap;
pub mod file;
mod node;
pub mod null;
mod page_map;
pub mod qcow2;
mod qcow2_bitmaps;
pub mod raw;

pub use node::BlockNode;

use bitmap::DirtyBitmap;

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use nbd::QueuedWrite;
use serde_json::{Map, Value};

/// The writes at the start of `writes` that `ok` accepts: a receive of queued writes goes
/// up to the first one a node must refuse, and fails with `refused` if that is the first.
fn leading_writes<'a>(
    writes: &'a [QueuedWrite],
    ok: impl FnMut(&&QueuedWrite) -> bool,
    refused: &str,
) -> io::Result<&'a [QueuedWrite]> {
    match writes.iter().take_while(ok).count() {
        0 => Err(io::Error::other(refused.to_string())),
        n => Ok(&writes[..n]),
    }
}

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

impl Extent {
    /// `length` bytes of data held at `depth`.
    pub fn data(length: u64, depth: u32) -> Extent {
        Extent {
            length,
            data: true,
            zero: false,
            depth,
        }
    }

    /// `length` bytes that read as zeroes and hold no data, at `depth`.
    pub fn hole(length: u64, depth: u32) -> Extent {
        Extent {
            length,
            data: false,
            zero: true,
            depth,
        }
    }
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
    /// A filename for `query-named-block-nodes` (`file`), if the node's
    /// options come down to one; see [`display_filename`] otherwise.
    fn filename(&self) -> Option<String> {
        None
    }
    /// The options that would open this node again, children included
    /// (QEMU's "full open options"), for its `json:` pseudo-filename.
    fn open_options(&self) -> Map<String, Value>;
    /// The children of this node (a format node's `file` child), for the
    /// graph's reference counting.
    fn children(&self) -> Vec<Arc<BlockNode>> {
        Vec::new()
    }
    /// The child whose data shows through where this node has none (a
    /// qcow2 image's backing node).
    fn backing(&self) -> Option<Arc<BlockNode>> {
        None
    }
    /// Whether the driver has what QEMU's bdrv_get_info asks (null-co has
    /// not); then ImageInfo carries a `dirty-flag`.
    fn has_info(&self) -> bool {
        true
    }
    /// Adds the driver's own members of QEMU's ImageInfo to `image`
    /// (`cluster-size`, `format-specific`, `backing-filename`, ...).
    fn describe_image(&self, _image: &mut Map<String, Value>) {}
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
    /// Whether reads always write every byte of the caller's buffers. A
    /// driver that may leave them as they were (null-co without
    /// read-zeroes) says no, so that callers reusing buffers across clients
    /// clear them first.
    fn fills_read_buffers(&self) -> bool {
        true
    }
    /// Whether [`BlockDriver::splice_read`] and [`BlockDriver::send_file`] work: the node's
    /// bytes are a plain range of a file in the page cache.
    fn can_splice(&self) -> bool {
        false
    }
    /// Moves `len` bytes at `offset` into `pipe`, which has room for them, without copying
    /// them through user memory (splice(2)).
    fn splice_read(&self, _pipe: BorrowedFd<'_>, _offset: u64, _len: usize) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Sends up to `len` bytes at `offset` to `socket` without copying them through user
    /// memory (sendfile(2)); returns how many went (see [`nbd::splice::file_to_socket`]).
    /// Works when [`BlockDriver::can_splice`] does.
    fn send_file(&self, _socket: BorrowedFd<'_>, _offset: u64, _len: usize) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Writes the `len` bytes waiting in `pipe` (its read end) at `offset`, as
    /// [`BlockDriver::write_vectored`] would, without copying them through user memory.
    /// `Unsupported` leaves the pipe as it was.
    fn splice_write(&self, _pipe: BorrowedFd<'_>, _offset: u64, _len: usize) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Receives the bytes of `writes` from `socket`, in order (each its header, dropped,
    /// then its payload), and writes every payload at its offset, as
    /// [`BlockDriver::write_vectored`] would, with no buffer in between (with `wait_all`,
    /// waiting for as many as it takes). Returns how many bytes were taken, headers
    /// included, maybe fewer than all (0: the peer has closed); see
    /// [`QueuedWrite::landed`]. An error means that nothing was taken: `Unsupported` if
    /// the driver never can, anything else if it cannot for the first write now.
    fn receive_writes(
        &self,
        _socket: BorrowedFd<'_>,
        _writes: &[QueuedWrite],
        _wait_all: bool,
    ) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Bytes the node takes on its storage (`actual-size`), if known.
    fn allocated_size(&self) -> Option<u64> {
        None
    }
    /// How the node caches, for `query-named-block-nodes`.
    fn cache_mode(&self) -> CacheMode {
        CacheMode::default()
    }
    /// Changes the size of the node.
    fn resize(&self, new_size: u64) -> io::Result<()>;
    /// The persistent dirty bitmaps stored in the image, as loaded at open;
    /// the node takes them when it is created.
    fn persistent_bitmaps(&self) -> Vec<DirtyBitmap> {
        Vec::new()
    }
    /// Whether the driver can store persistent bitmaps at all (QEMU refuses
    /// `persistent: true` elsewhere with "Operation not supported").
    fn stores_bitmaps(&self) -> bool {
        false
    }
    /// Checks that a new persistent bitmap can be stored; the error is the
    /// cause, without the bitmap and node names.
    fn check_new_persistent_bitmap(&self, _name: &str, _granularity: u64) -> Result<(), String> {
        Ok(())
    }
    /// The node's persistent bitmaps, handed over once when the node closes,
    /// just before the driver is dropped: a driver that stores bitmaps
    /// writes these (and drops the ones no longer there) at close.
    fn store_bitmaps_on_close(&self, _bitmaps: Vec<DirtyBitmap>) {}
}

/// The `cache` options of a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheMode {
    /// O_DIRECT.
    pub direct: bool,
    /// Flushes are not passed to the storage.
    pub no_flush: bool,
}

/// What a node does with discard requests (`blockdev-add`'s `discard`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiscardMode {
    /// Discard requests succeed and do nothing (QEMU's default).
    #[default]
    Ignore,
    /// Discard requests are passed down (hole punching on files).
    Unmap,
}

/// What a node does with writes whose data is all zero (`blockdev-add`'s
/// `detect-zeroes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Written as any other data (QEMU's default).
    #[default]
    Off,
    /// Written as write-zeroes requests, which may allocate nothing new.
    On,
    /// Written as write-zeroes requests that may deallocate the range.
    Unmap,
}

impl DetectZeroes {
    /// The QAPI name, as `query-named-block-nodes` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// What a node does with discards and with all-zero data, whatever its
/// driver: `blockdev-add`'s `discard` and `detect-zeroes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WritePolicy {
    pub discard: DiscardMode,
    pub detect_zeroes: DetectZeroes,
}

/// The node's filename as QEMU reports it: the plain one, or else
/// `json:` and its open options, written as QEMU writes a QDict.
pub fn display_filename(drv: &dyn BlockDriver) -> String {
    drv.filename().unwrap_or_else(|| {
        let options = Value::Object(drv.open_options());
        format!("json:{}", qmp::output::to_json(&options, false))
    })
}

/// A name for a node the user did not name, as QEMU gives them: `#block<N>`.
pub fn auto_node_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("#block{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Finds a node by name, for drivers that reference children.
pub type NodeLookup<'a> = &'a dyn Fn(&str) -> Option<Arc<BlockNode>>;

/// The options every driver shares, resolved from the `blockdev-add`
/// arguments, and the way to find the nodes a driver names as children.
pub struct OpenContext<'a> {
    pub read_only: bool,
    /// Fall back to read-only when the image cannot be opened writable.
    pub auto_read_only: bool,
    pub discard: DiscardMode,
    pub detect_zeroes: DetectZeroes,
    /// `cache.direct`: bypass the host page cache (O_DIRECT).
    pub cache_direct: bool,
    /// `cache.no-flush`: flush requests succeed without syncing.
    pub cache_no_flush: bool,
    pub lookup: NodeLookup<'a>,
}

impl<'a> OpenContext<'a> {
    /// Reads the common members of schema-checked `blockdev-add` arguments,
    /// applying QEMU's defaults to the ones that are absent.
    pub fn from_options(opts: &Map<String, Value>, lookup: NodeLookup<'a>) -> Result<Self, String> {
        let flag = |map: &Map<String, Value>, key: &str| {
            map.get(key).and_then(Value::as_bool).unwrap_or(false)
        };
        let cache = opts.get("cache").and_then(Value::as_object);
        // Read-only nodes share everything anyway, so force-share only needs checking.
        if flag(opts, "force-share") && !flag(opts, "read-only") {
            return Err("force-share=on can only be used with read-only images".into());
        }
        let discard = match opts.get("discard").and_then(Value::as_str) {
            Some("unmap") => DiscardMode::Unmap,
            _ => DiscardMode::Ignore,
        };
        let detect_zeroes = match opts.get("detect-zeroes").and_then(Value::as_str) {
            Some("on") => DetectZeroes::On,
            Some("unmap") => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        };
        // Unmapping zero writes would deallocate where discards may not.
        if detect_zeroes == DetectZeroes::Unmap && discard != DiscardMode::Unmap {
            return Err(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
                    .into(),
            );
        }
        let ctx = OpenContext {
            read_only: flag(opts, "read-only"),
            auto_read_only: flag(opts, "auto-read-only"),
            discard,
            detect_zeroes,
            cache_direct: cache.is_some_and(|c| flag(c, "direct")),
            cache_no_flush: cache.is_some_and(|c| flag(c, "no-flush")),
            lookup,
        };
        Ok(ctx)
    }

    pub fn write_policy(&self) -> WritePolicy {
        WritePolicy {
            discard: self.discard,
            detect_zeroes: self.detect_zeroes,
        }
    }

    /// Finds a child node named in the options, with QEMU's error text.
    pub fn child(&self, name: &str) -> Result<Arc<BlockNode>, String> {
        (self.lookup)(name)
            .ok_or_else(|| format!("Cannot find device='{name}' nor node-name='{name}'"))
    }
}

/// Opens a driver by its `blockdev-add` name. Errors are QEMU's texts.
pub fn open(
    driver: &str,
    opts: &Map<String, Value>,
    ctx: &OpenContext,
) -> Result<Box<dyn BlockDriver>, String> {
    match driver {
        "file" | "host_device" => file::open(opts, ctx),
        "null-co" => null::open(opts, ctx),
        "raw" => raw::open(opts, ctx),
        "qcow2" => qcow2::open(opts, ctx),
        other => Err(format!("Driver '{other}' is not supported by this build")),
    }
}

/// The most zero data written at a time when zeroes cannot be written
/// any cheaper way.
pub(crate) const ZERO_CHUNK: u64 = 1 << 20;

/// Writes `len` zero bytes from `offset` through `driver` as plain data,
/// `zeroes` (all zero, at least `min(len, ZERO_CHUNK)` long) at a time.
pub(crate) fn write_zeroes_as_data(
    driver: &dyn BlockDriver,
    mut offset: u64,
    len: u64,
    zeroes: &[u8],
) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(zeroes.len() as u64) as usize;
        driver.write_vectored(offset, &[IoSlice::new(&zeroes[..n])])?;
        offset += n as u64;
    }
    Ok(())
}

/// Rounds a byte length up to whole 512-byte sectors, as QEMU reports the
/// length of every node.
pub(crate) fn round_up_to_sector(len: u64) -> u64 {
    len.div_ceil(512).saturating_mul(512)
}

/// Reads a non-negative integer member, with QEMU's range error text.
pub(crate) fn unsigned_option(opts: &Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match opts.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("Value '{v}' is out of range for parameter '{key}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_filenames_are_written_as_qemu_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("é.img");
        std::fs::write(&path, [0u8; 16384]).unwrap();
        let file_opts = serde_json::json!({"driver": "file", "filename": path});
        let file_opts = file_opts.as_object().unwrap();
        let no_nodes = |_: &str| None;
        let ctx = OpenContext::from_options(file_opts, &no_nodes).unwrap();
        let file = Arc::new(BlockNode::new(
            "f0".into(),
            open("file", file_opts, &ctx).unwrap(),
        ));
        let raw_opts =
            serde_json::json!({"driver": "raw", "file": "f0", "offset": 4096, "size": 8192});
        let raw_opts = raw_opts.as_object().unwrap();
        let lookup = |n: &str| (n == "f0").then(|| Arc::clone(&file));
        let ctx = OpenContext::from_options(raw_opts, &lookup).unwrap();
        let raw = open("raw", raw_opts, &ctx).unwrap();
        // Member order and escaping as QSD 10.0.2 printed such a node's name.
        let dir = dir.path().to_str().unwrap();
        assert_eq!(
            display_filename(&*raw),
            format!(
                r#"json:{{"offset": 4096, "driver": "raw", "size": 8192, "file": {{"driver": "file", "filename": "{dir}/\u00E9.img"}}}}"#
            )
        );
    }
}
