//! A named node of the graph: a driver plus what the graph keeps per node
//! (dirty bitmaps). Writes go through the node so that every write path
//! (NBD, vhost-user-blk, discard, write-zeroes) marks the bitmaps.

use std::io::{self, IoSlice};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use nbd::QueuedWrite;
use serde_json::{json, Value};

use super::bitmap::DirtyBitmap;
use super::{leading_writes, BlockDriver, DetectZeroes, DiscardMode, WritePolicy, ZeroFlags};

pub struct BlockNode {
    name: String,
    driver: Box<dyn BlockDriver>,
    bitmaps: Mutex<Vec<DirtyBitmap>>,
    /// Whether `bitmaps` is non-empty, so that writes to a node without
    /// bitmaps (the common case) take no lock.
    has_bitmaps: AtomicBool,
    policy: WritePolicy,
    /// The node's format was probed as raw: refuse writes that would make
    /// the first sector probe as another format (QEMU's guard).
    probed_raw: AtomicBool,
}

/// The sector of a probed raw image that must not be given a format's header.
const PROBED_SECTOR: usize = 512;

/// Magic strings at offset 0 by which QEMU's probing would take an image
/// for something other than raw.
const FORMAT_MAGICS: &[&[u8]] = &[
    b"QFI\xfb",
    b"KDMV",
    b"COWD",
    b"# Disk DescriptorFile",
    b"conectix",
    b"vhdxfile",
    b"QED\0",
    b"LUKS\xba\xbe",
    b"WithoutFreeSpace",
    b"WithouFreSpacExt",
    b"Bochs Virtual HD Image",
    b"<<< Oracle VM VirtualBox Disk Image >>>",
    b"<<< Sun VirtualBox Disk Image >>>",
    b"<<< innotek VirtualBox Disk Image >>>",
    b"#!/bin/sh\n#V2.0 Format",
];

/// Whether every byte of `buf` is zero, a word at a time.
fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: any bit pattern is a valid u128; align_to only splits the slice.
    let (head, words, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

impl BlockNode {
    /// A node on `driver`, with the persistent bitmaps its image holds.
    pub fn new(name: String, driver: Box<dyn BlockDriver>) -> Self {
        let bitmaps = driver.persistent_bitmaps();
        BlockNode {
            name,
            driver,
            has_bitmaps: AtomicBool::new(!bitmaps.is_empty()),
            bitmaps: Mutex::new(bitmaps),
            policy: WritePolicy::default(),
            probed_raw: AtomicBool::new(false),
        }
    }

    /// Marks the node as raw by probing (see `probed_raw`).
    pub fn set_probed_raw(&self) {
        self.probed_raw.store(true, Ordering::Release);
    }

    /// Whether a write at `offset` reaches the first sector of a probed raw
    /// image, where its data must be checked by [`Self::forges_a_header`].
    fn writes_a_probed_header(&self, offset: u64) -> bool {
        offset < PROBED_SECTOR as u64 && self.probed_raw.load(Ordering::Acquire)
    }

    /// Whether writing `bufs` at `offset` would give the first sector a
    /// header that probes as a format other than raw.
    fn forges_a_header(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<bool> {
        if !self.writes_a_probed_header(offset) {
            return Ok(false);
        }
        let mut sector = vec![0u8; PROBED_SECTOR.min(self.driver.size() as usize)];
        self.driver
            .read_vectored(0, &mut [std::io::IoSliceMut::new(&mut sector)])?;
        let mut at = offset as usize;
        for b in bufs {
            for &byte in b.iter() {
                if at >= sector.len() {
                    break;
                }
                sector[at] = byte;
                at += 1;
            }
        }
        Ok(FORMAT_MAGICS.iter().any(|m| sector.starts_with(m)))
    }

    /// The node, treating discards and all-zero data as `policy` says
    /// (by default, as QEMU's: discards ignored, zeroes not detected).
    pub fn with_policy(mut self, policy: WritePolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn detect_zeroes(&self) -> DetectZeroes {
        self.policy.detect_zeroes
    }

    fn may_unmap(&self) -> bool {
        self.policy.discard == DiscardMode::Unmap
    }

    /// The node's `node-name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn driver(&self) -> &dyn BlockDriver {
        self.driver.as_ref()
    }

    fn bitmaps(&self) -> MutexGuard<'_, Vec<DirtyBitmap>> {
        self.bitmaps.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_dirty(&self, offset: u64, len: u64) {
        if !self.has_bitmaps.load(Ordering::Acquire) {
            return;
        }
        let mut bitmaps = self.bitmaps();
        for bm in bitmaps.iter_mut() {
            bm.mark(offset, len);
        }
    }

    /// Writes through the driver and marks the range dirty, even when the
    /// write fails: a failed write may have changed part of the range.
    /// With `detect-zeroes`, all-zero data becomes a write-zeroes request.
    pub fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        if self.forges_a_header(offset, bufs)? {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let detect = self.policy.detect_zeroes;
        let result = if detect != DetectZeroes::Off && len > 0 && bufs.iter().all(|b| is_zero(b)) {
            let flags = ZeroFlags {
                may_unmap: detect == DetectZeroes::Unmap && self.may_unmap(),
                fast_only: false,
            };
            self.driver.write_zeroes(offset, len, flags)
        } else {
            self.driver.write_vectored(offset, bufs)
        };
        self.mark_dirty(offset, len);
        result
    }

    /// Writes the `len` bytes waiting in `pipe` as [`BlockNode::write_vectored`] would, and
    /// marks the range dirty. `Unsupported`, with the pipe untouched, where the node must
    /// look at the data: with `detect-zeroes`, or over a probed raw image's first sector.
    pub fn splice_write(&self, pipe: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        if self.policy.detect_zeroes != DetectZeroes::Off || self.writes_a_probed_header(offset) {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let result = self.driver.splice_write(pipe, offset, len);
        if !matches!(&result, Err(e) if e.kind() == io::ErrorKind::Unsupported) {
            self.mark_dirty(offset, len as u64);
        }
        result
    }

    /// Receives the bytes of `writes` from `socket` and writes their payloads as
    /// [`BlockNode::write_vectored`] would (see [`BlockDriver::receive_writes`]), marking
    /// what landed dirty. `Unsupported` with `detect-zeroes`, which must look at the data;
    /// the receive stops before a write over a probed raw image's first sector, which is
    /// checked on the ordinary path.
    pub fn receive_writes(
        &self,
        socket: BorrowedFd<'_>,
        writes: &[QueuedWrite],
        wait_all: bool,
    ) -> io::Result<usize> {
        if self.policy.detect_zeroes != DetectZeroes::Off {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let writes = leading_writes(
            writes,
            |w| !self.writes_a_probed_header(w.offset),
            "a write to the first sector is checked",
        )?;
        let taken = self.driver.receive_writes(socket, writes, wait_all)?;
        for (offset, len) in QueuedWrite::landed(writes, taken) {
            self.mark_dirty(offset, len as u64);
        }
        Ok(taken)
    }

    /// Discards the range, unless the node ignores discards: then, as in
    /// QEMU, nothing happens and nothing is marked dirty.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.may_unmap() {
            return Ok(());
        }
        let result = self.driver.discard(offset, len);
        self.mark_dirty(offset, len);
        result
    }

    /// Zeroes the range; it may be deallocated only if the node unmaps.
    pub fn write_zeroes(&self, offset: u64, len: u64, mut flags: ZeroFlags) -> io::Result<()> {
        flags.may_unmap &= self.may_unmap();
        let result = self.driver.write_zeroes(offset, len, flags);
        if !(flags.fast_only && result.is_err()) {
            self.mark_dirty(offset, len);
        }
        result
    }

    /// Resizes the node and its bitmaps.
    pub fn resize(&self, new_size: u64) -> io::Result<()> {
        self.driver.resize(new_size)?;
        let size = self.driver.size();
        for bm in self.bitmaps().iter_mut() {
            bm.resize(size);
        }
        Ok(())
    }

    pub fn has_bitmap(&self, name: &str) -> bool {
        self.bitmaps().iter().any(|b| b.name == name)
    }

    pub fn add_bitmap(&self, bitmap: DirtyBitmap) {
        let mut bitmaps = self.bitmaps();
        bitmaps.push(bitmap);
        self.has_bitmaps.store(true, Ordering::Release);
    }

    pub fn remove_bitmap(&self, name: &str) {
        let mut bitmaps = self.bitmaps();
        bitmaps.retain(|b| b.name != name);
        self.has_bitmaps
            .store(!bitmaps.is_empty(), Ordering::Release);
    }

    /// A copy of bitmap `name`.
    pub fn bitmap(&self, name: &str) -> Option<DirtyBitmap> {
        self.bitmaps().iter().find(|b| b.name == name).cloned()
    }

    pub fn bitmap_busy(&self, name: &str) -> bool {
        self.bitmaps().iter().any(|b| b.name == name && b.busy)
    }

    pub fn set_bitmap_busy(&self, name: &str, busy: bool) {
        if let Some(b) = self.bitmaps().iter_mut().find(|b| b.name == name) {
            b.busy = busy;
        }
    }

    /// Runs `f` on bitmap `name`, or fails with QEMU's "not found" text.
    pub fn with_bitmap(
        &self,
        name: &str,
        f: impl FnOnce(&mut DirtyBitmap) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut bitmaps = self.bitmaps();
        let bm = bitmaps
            .iter_mut()
            .find(|b| b.name == name)
            .ok_or_else(|| format!("Dirty bitmap '{name}' not found"))?;
        f(bm)
    }

    /// `dirty-bitmaps` entries of `query-named-block-nodes`.
    pub fn bitmaps_info(&self) -> Vec<Value> {
        let size = self.driver.size();
        // Newest first, as QEMU lists them.
        self.bitmaps()
            .iter()
            .rev()
            .map(|b| {
                json!({
                    "name": b.name,
                    "recording": b.recording,
                    "persistent": b.persistent,
                    "busy": b.busy,
                    "granularity": b.granularity,
                    "count": b.dirty_bytes(size),
                })
            })
            .collect()
    }

    /// The dirty/clean run of bitmap `name` that starts at `offset`.
    pub fn bitmap_extent(&self, name: &str, offset: u64, len: u64) -> io::Result<(u64, bool)> {
        self.bitmaps()
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.extent(offset, len))
            .ok_or_else(|| io::Error::other(format!("dirty bitmap '{name}' was removed")))
    }
}

impl Drop for BlockNode {
    /// Hands the persistent bitmaps to the driver, which stores them when it
    /// is dropped right after this.
    fn drop(&mut self) {
        let bitmaps = self.bitmaps.get_mut().unwrap_or_else(|p| p.into_inner());
        let persistent = bitmaps.iter().filter(|b| b.persistent).cloned().collect();
        self.driver.store_bitmaps_on_close(persistent);
    }
}
