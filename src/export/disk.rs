//! The disk behind an export: a block node seen through the NBD and
//! vhost-user-blk crates' traits.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use nbd::QueuedWrite;

use crate::block::{BlockNode, ZeroFlags};

/// Which metadata a context of an NBD export reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaContext {
    /// `qemu:allocation-depth`: 0 unallocated, 1 local, 2+ backing layers.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME`.
    DirtyBitmap(String),
}

impl MetaContext {
    fn nbd_name(&self) -> String {
        match self {
            MetaContext::AllocationDepth => "qemu:allocation-depth".into(),
            MetaContext::DirtyBitmap(name) => format!("qemu:dirty-bitmap:{name}"),
        }
    }

    /// `contexts` as the NBD server offers them, with QEMU's fixed ids: 1 for
    /// `qemu:allocation-depth` (kept even when it is not offered) and 2 on for the bitmaps.
    pub fn nbd_configs(contexts: &[MetaContext]) -> Vec<nbd::MetaContextConfig> {
        let mut bitmap_ids = 2..;
        contexts
            .iter()
            .map(|c| nbd::MetaContextConfig {
                id: match c {
                    MetaContext::AllocationDepth => 1,
                    MetaContext::DirtyBitmap(_) => bitmap_ids.next().unwrap_or(u32::MAX),
                },
                name: c.nbd_name(),
            })
            .collect()
    }
}

/// A block node as an export uses it.
pub struct NodeDisk {
    node: Arc<BlockNode>,
    /// Flush after every write (`writethrough=on`).
    writethrough: bool,
    /// The NBD metadata contexts after `base:allocation`, in id order.
    contexts: Vec<MetaContext>,
}

impl NodeDisk {
    pub fn new(node: Arc<BlockNode>, writethrough: bool, contexts: Vec<MetaContext>) -> Self {
        NodeDisk {
            node,
            writethrough,
            contexts,
        }
    }

    fn after_write(&self, force_flush: bool) -> io::Result<()> {
        if force_flush || self.writethrough {
            self.node.driver().flush()?;
        }
        Ok(())
    }
}

impl nbd::ExportBackend for NodeDisk {
    fn size(&self) -> u64 {
        self.node.driver().size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let driver = self.node.driver();
        // The NBD server reuses its buffers across requests and clients:
        // never send one client what an earlier request left there.
        if !driver.fills_read_buffers() {
            buf.fill(0);
        }
        driver.read_vectored(offset, &mut [IoSliceMut::new(buf)])
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.node.write_vectored(offset, &[IoSlice::new(buf)])?;
        self.after_write(fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.node.driver().flush()
    }

    fn can_splice(&self) -> bool {
        self.node.driver().can_splice()
    }

    fn splice_out(&self, pipe: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        self.node.driver().splice_read(pipe, offset, len)
    }

    fn send_file(&self, socket: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        self.node.driver().send_file(socket, offset, len)
    }

    fn splice_in(&self, pipe: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        self.node.splice_write(pipe, offset, len)?;
        self.after_write(false)
    }

    fn receive_writes(
        &self,
        socket: BorrowedFd<'_>,
        writes: &[QueuedWrite],
        wait_all: bool,
    ) -> io::Result<usize> {
        // A flush after the bytes are taken could not fail the write without losing them.
        if self.writethrough {
            return Err(io::ErrorKind::Unsupported.into());
        }
        self.node.receive_writes(socket, writes, wait_all)
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.node.discard(offset, len)?;
        self.after_write(false)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        self.node.write_zeroes(
            offset,
            len,
            ZeroFlags {
                may_unmap: may_trim,
                fast_only,
            },
        )?;
        self.after_write(false)
    }

    fn block_status(&self, context: usize, offset: u64, len: u64) -> io::Result<Vec<nbd::Extent>> {
        let meta = match context {
            0 => None,
            n => Some(self.contexts.get(n - 1).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "unknown metadata context")
            })?),
        };
        if let Some(MetaContext::DirtyBitmap(name)) = meta {
            let (length, dirty) = self.node.bitmap_extent(name, offset, len)?;
            return Ok(vec![nbd::Extent {
                length,
                flags: u64::from(dirty),
            }]);
        }
        let extent = self.node.driver().block_status(offset, len)?;
        let flags = match meta {
            None => {
                let mut flags = 0;
                if !extent.data {
                    flags |= nbd::proto::STATE_HOLE;
                }
                if extent.zero {
                    flags |= nbd::proto::STATE_ZERO;
                }
                flags
            }
            Some(_) => u64::from(extent.depth),
        };
        Ok(vec![nbd::Extent {
            length: extent.length.clamp(1, len.max(1)),
            flags,
        }])
    }
}

impl vhost_blk::BlockDisk for NodeDisk {
    fn size(&self) -> u64 {
        self.node.driver().size()
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        self.node.driver().read_vectored(offset, bufs)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        self.node.write_vectored(offset, bufs)?;
        self.after_write(false)
    }

    fn flush(&self) -> io::Result<()> {
        self.node.driver().flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.node.discard(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.node.write_zeroes(
            offset,
            len,
            ZeroFlags {
                may_unmap: unmap,
                fast_only: false,
            },
        )?;
        self.after_write(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::OpenContext;
    use nbd::ExportBackend;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    /// With `writethrough`, a failed flush after a write must fail that write, which it
    /// cannot once the payload has left the socket: such exports leave payloads there for
    /// the paths that flush before they reply. Without it, the bytes go straight in.
    #[test]
    fn writethrough_exports_leave_write_payloads_in_the_socket() {
        let img = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(img.path(), [7u8; 65536]).unwrap();
        let opts = serde_json::json!({"driver": "file", "filename": img.path().to_str().unwrap()});
        let opts = opts.as_object().cloned().unwrap();
        let no_nodes = |_: &str| None;
        let ctx = OpenContext::from_options(&opts, &no_nodes).unwrap();
        let driver = crate::block::open("file", &opts, &ctx).unwrap();
        let node = Arc::new(BlockNode::new("f0".into(), driver));
        let (mut client, mut server) = UnixStream::pair().unwrap();
        client.write_all(&[1; 4096]).unwrap();

        let through = NodeDisk::new(Arc::clone(&node), true, Vec::new());
        let err = through
            .receive_writes(server.as_fd(), &[QueuedWrite::payload_only(0, 4096)], true)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        let mut left = [0u8; 4096];
        server.read_exact(&mut left).unwrap();
        assert_eq!(left, [1; 4096], "the socket is as it was");

        client.write_all(&[2; 4096]).unwrap();
        let back = NodeDisk::new(node, false, Vec::new());
        assert_eq!(
            back.receive_writes(server.as_fd(), &[QueuedWrite::payload_only(0, 4096)], true)
                .unwrap(),
            4096
        );
        assert_eq!(std::fs::read(img.path()).unwrap()[..4096], [2; 4096]);
    }
}
