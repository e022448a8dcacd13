//! The `raw` format driver: its `file` child's bytes, optionally limited to
//! the window `[offset, offset + size)`.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use nbd::QueuedWrite;
use serde_json::{Map, Value};

use super::{
    round_up_to_sector, unsigned_option, BlockDriver, BlockNode, CacheMode, Extent, OpenContext,
    ZeroFlags,
};

pub struct RawDriver {
    child: Arc<BlockNode>,
    offset: u64,
    /// The `size` option; without it the window runs to the child's end.
    fixed_size: Option<u64>,
    read_only: bool,
}

/// Opens a `raw` node. The `file` member must name an existing node (the
/// caller opens inline child definitions first and passes their names).
pub fn open(opts: &Map<String, Value>, ctx: &OpenContext) -> Result<Box<dyn BlockDriver>, String> {
    let offset = unsigned_option(opts, "offset")?.unwrap_or(0);
    let fixed_size = unsigned_option(opts, "size")?;
    let child_name = match opts.get("file") {
        Some(Value::String(name)) => name,
        Some(_) => return Err("raw: the 'file' child must be given as a node name".into()),
        None => return Err("Parameter 'file' is missing".into()),
    };
    let child = ctx.child(child_name)?;
    let real_size = child.driver().size();
    if offset > real_size {
        return Err(format!(
            "Offset ({offset}) cannot be greater than size of the containing file ({real_size})"
        ));
    }
    if let Some(size) = fixed_size {
        if real_size - offset < size {
            // The double space is QEMU's.
            return Err(format!(
                "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({real_size})"
            ));
        }
        // A whole number of sectors, so that rounding cannot leak past the window.
        if !size.is_multiple_of(512) {
            return Err("Specified size is not multiple of 512".into());
        }
    }
    let read_only = ctx.read_only || child.driver().read_only();
    Ok(Box::new(RawDriver {
        child,
        offset,
        fixed_size,
        read_only,
    }))
}

fn no_space() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl RawDriver {
    /// Checks a request against the window and returns the child's offset.
    fn translate(&self, offset: u64, len: u64) -> io::Result<u64> {
        let end = offset.checked_add(len).ok_or_else(no_space)?;
        if end > self.size() {
            return Err(no_space());
        }
        offset.checked_add(self.offset).ok_or_else(no_space)
    }

    fn refuse_if_read_only(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }
}

impl BlockDriver for RawDriver {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        match self.fixed_size {
            Some(size) => size,
            None => round_up_to_sector(self.child.driver().size().saturating_sub(self.offset)),
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn request_alignment(&self) -> u32 {
        self.child.driver().request_alignment()
    }

    fn allocated_size(&self) -> Option<u64> {
        self.child.driver().allocated_size()
    }

    fn fills_read_buffers(&self) -> bool {
        self.child.driver().fills_read_buffers()
    }

    fn cache_mode(&self) -> CacheMode {
        self.child.driver().cache_mode()
    }

    /// The child's filename when the node shows all of it.
    fn filename(&self) -> Option<String> {
        if self.offset == 0 && self.fixed_size.is_none() {
            self.child.driver().filename()
        } else {
            None
        }
    }

    fn has_info(&self) -> bool {
        self.child.driver().has_info()
    }

    fn open_options(&self) -> Map<String, Value> {
        let mut opts = Map::new();
        opts.insert("driver".into(), Value::from("raw"));
        opts.insert(
            "file".into(),
            Value::Object(self.child.driver().open_options()),
        );
        if self.offset != 0 {
            opts.insert("offset".into(), Value::from(self.offset));
        }
        if let Some(size) = self.fixed_size {
            opts.insert("size".into(), Value::from(size));
        }
        opts
    }

    fn children(&self) -> Vec<Arc<BlockNode>> {
        vec![Arc::clone(&self.child)]
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        let at = self.translate(offset, len)?;
        self.child.driver().read_vectored(at, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.refuse_if_read_only()?;
        let len = bufs.iter().map(|b| b.len() as u64).sum();
        let at = self.translate(offset, len)?;
        // Through the child node, so that its detect-zeroes and bitmaps apply.
        self.child.write_vectored(at, bufs)
    }

    fn can_splice(&self) -> bool {
        self.child.driver().can_splice()
    }

    fn splice_read(&self, pipe: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        let at = self.translate(offset, len as u64)?;
        self.child.driver().splice_read(pipe, at, len)
    }

    fn send_file(&self, socket: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        let at = self.translate(offset, len as u64)?;
        self.child.driver().send_file(socket, at, len)
    }

    fn splice_write(&self, pipe: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<()> {
        self.refuse_if_read_only()?;
        let at = self.translate(offset, len as u64)?;
        // Through the child node, as write_vectored.
        self.child.splice_write(pipe, at, len)
    }

    fn receive_writes(
        &self,
        socket: BorrowedFd<'_>,
        writes: &[QueuedWrite],
        wait_all: bool,
    ) -> io::Result<usize> {
        // Never on this node: the write path gives the EPERM.
        if self.read_only {
            return Err(io::ErrorKind::Unsupported.into());
        }
        // Up to the first write out of range, which the write path refuses.
        let mut translated = Vec::with_capacity(writes.len());
        for w in writes {
            match self.translate(w.offset, w.len as u64) {
                Ok(offset) => translated.push(QueuedWrite { offset, ..*w }),
                Err(e) if translated.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        // Through the child node, as write_vectored.
        self.child.receive_writes(socket, &translated, wait_all)
    }

    fn flush(&self) -> io::Result<()> {
        self.child.driver().flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.refuse_if_read_only()?;
        let at = self.translate(offset, len)?;
        self.child.discard(at, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.refuse_if_read_only()?;
        let at = self.translate(offset, len)?;
        self.child.write_zeroes(at, len, flags)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let len = len.min(self.size().saturating_sub(offset));
        if len == 0 {
            return Ok(Extent {
                length: 0,
                data: true,
                zero: false,
                depth: 1,
            });
        }
        let at = self.translate(offset, len)?;
        let mut extent = self.child.driver().block_status(at, len)?;
        extent.length = extent.length.min(len);
        Ok(extent)
    }

    fn resize(&self, new_size: u64) -> io::Result<()> {
        self.refuse_if_read_only()?;
        if self.fixed_size.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "Cannot resize fixed-size raw disks",
            ));
        }
        let child_size = new_size.checked_add(self.offset).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "Disk size too large for the chosen offset",
            )
        })?;
        // Through the child node, so that its bitmaps grow with it.
        self.child.resize(child_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::WritePolicy;
    use serde_json::json;

    struct Graph {
        nodes: Vec<Arc<BlockNode>>,
    }

    impl Graph {
        fn lookup(&self, name: &str) -> Option<Arc<BlockNode>> {
            self.nodes.iter().find(|n| n.name() == name).cloned()
        }

        fn open(&self, opts: Value) -> Result<(Box<dyn BlockDriver>, WritePolicy), String> {
            let opts = opts.as_object().cloned().unwrap_or_default();
            let lookup = |name: &str| self.lookup(name);
            let ctx = OpenContext::from_options(&opts, &lookup)?;
            let driver = opts
                .get("driver")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            crate::block::open(&driver, &opts, &ctx).map(|d| (d, ctx.write_policy()))
        }

        fn add(&mut self, name: &str, opts: Value) -> Arc<BlockNode> {
            let (driver, policy) = self.open(opts).unwrap();
            let node = Arc::new(BlockNode::new(name.to_string(), driver).with_policy(policy));
            self.nodes.push(Arc::clone(&node));
            node
        }
    }

    /// A graph with node `f0`: a 64 KiB file whose byte i is i*7 mod 256.
    fn graph_with_file(extra: Value) -> (Graph, tempfile::NamedTempFile) {
        let img = tempfile::NamedTempFile::new().unwrap();
        let bytes: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(img.path(), &bytes).unwrap();
        let mut graph = Graph { nodes: Vec::new() };
        let mut opts = json!({"driver": "file", "filename": img.path().to_str().unwrap()});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            opts[k] = v;
        }
        graph.add("f0", opts);
        (graph, img)
    }

    #[test]
    fn whole_file_passes_through() {
        let (mut graph, img) = graph_with_file(json!({}));
        let raw = graph.add("r0", json!({"driver": "raw", "file": "f0"}));
        let drv = raw.driver();
        assert_eq!(drv.size(), 65536);
        assert_eq!(drv.filename().as_deref(), img.path().to_str());
        assert_eq!(drv.children().len(), 1);
        assert_eq!(drv.children()[0].name(), "f0");
        let mut buf = [0u8; 4];
        drv.read_vectored(10, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
        assert_eq!(buf, [70, 77, 84, 91]);
        drv.resize(131072).unwrap();
        assert_eq!(drv.size(), 131072);
    }

    #[test]
    fn window_translates_and_bounds_checks() {
        let (mut graph, img) = graph_with_file(json!({}));
        let raw = graph.add(
            "r0",
            json!({"driver": "raw", "file": "f0", "offset": 1024, "size": 4096}),
        );
        let drv = raw.driver();
        assert_eq!(drv.size(), 4096);
        assert_eq!(drv.filename(), None);
        let (mut a, mut b) = ([0u8; 2], [0u8; 3]);
        drv.read_vectored(1, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)])
            .unwrap();
        let expect = |i: u32| (i * 7) as u8;
        assert_eq!(a, [expect(1025), expect(1026)]);
        assert_eq!(b, [expect(1027), expect(1028), expect(1029)]);

        drv.write_vectored(4095, &[IoSlice::new(&[0xaa])]).unwrap();
        assert_eq!(std::fs::read(img.path()).unwrap()[1024 + 4095], 0xaa);
        let enospc = Some(libc::ENOSPC);
        assert_eq!(
            drv.write_vectored(4095, &[IoSlice::new(&[1, 2])])
                .unwrap_err()
                .raw_os_error(),
            enospc
        );
        let mut big = [0u8; 2];
        assert_eq!(
            drv.read_vectored(4095, &mut [IoSliceMut::new(&mut big)])
                .unwrap_err()
                .raw_os_error(),
            enospc
        );
        assert_eq!(drv.discard(4096, 1).unwrap_err().raw_os_error(), enospc);
        assert_eq!(
            drv.write_zeroes(u64::MAX, 2, ZeroFlags::default())
                .unwrap_err()
                .raw_os_error(),
            enospc
        );

        drv.write_zeroes(0, 512, ZeroFlags::default()).unwrap();
        let on_disk = std::fs::read(img.path()).unwrap();
        assert!(on_disk[1024..1536].iter().all(|&x| x == 0));
        assert_eq!(
            on_disk[1023],
            expect(1023),
            "bytes before the window are untouched"
        );
        assert_eq!(on_disk[1536], expect(1536));
        assert_eq!(drv.block_status(0, 1 << 20).unwrap().length, 4096);
        assert_eq!(
            drv.resize(8192).unwrap_err().to_string(),
            "Cannot resize fixed-size raw disks"
        );
        drv.flush().unwrap();
    }

    /// A graph with `f0` (see [`graph_with_file`]) and `r0`, a raw 16 KiB window of it at
    /// 1024, each with a dirty bitmap of 512-byte granularity.
    fn window_with_bitmaps() -> (
        Graph,
        tempfile::NamedTempFile,
        Arc<BlockNode>,
        Arc<BlockNode>,
    ) {
        use crate::block::bitmap::DirtyBitmap;
        let (mut graph, img) = graph_with_file(json!({}));
        let file = graph.lookup("f0").unwrap();
        let raw = graph.add(
            "r0",
            json!({"driver": "raw", "file": "f0", "offset": 1024, "size": 16384}),
        );
        raw.add_bitmap(DirtyBitmap::new("b0", 512, 16384));
        file.add_bitmap(DirtyBitmap::new("b1", 512, 65536));
        (graph, img, file, raw)
    }

    /// 3000 bytes of 0xab written at 4096 of the window landed there in the file, with
    /// the bytes around them untouched, and both nodes' bitmaps mark them.
    fn check_landed_at_4096(img: &tempfile::NamedTempFile, file: &BlockNode, raw: &BlockNode) {
        let on_disk = std::fs::read(img.path()).unwrap();
        assert!(on_disk[1024 + 4096..][..3000].iter().all(|&b| b == 0xab));
        assert_eq!(on_disk[1024 + 4095], ((1024 + 4095) * 7) as u8);
        assert_eq!(on_disk[1024 + 7096], ((1024 + 7096) * 7) as u8);
        let dirty = |node: &BlockNode| node.bitmaps_info()[0]["count"].as_u64().unwrap();
        assert_eq!(dirty(raw), 3072, "the raw node's bitmap");
        assert_eq!(dirty(file), 3072, "the file node's bitmap");
    }

    /// `f1`: a 4 KiB file node with `detect-zeroes=on`, which must see what it writes.
    fn detect_zeroes_node(graph: &mut Graph) -> (tempfile::NamedTempFile, Arc<BlockNode>) {
        let other = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(other.path(), [1; 4096]).unwrap();
        let zeroes = graph.add(
            "f1",
            json!({"driver": "file", "filename": other.path().to_str().unwrap(),
                   "detect-zeroes": "on"}),
        );
        (other, zeroes)
    }

    /// Spliced writes take the same path as copied ones: through the window, into the file,
    /// marking the bitmaps of both nodes. A node that must see the data refuses them and
    /// leaves the pipe as it was.
    #[test]
    fn spliced_writes_go_where_copied_ones_go() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;

        let (mut graph, img, file, raw) = window_with_bitmaps();
        let (mut from, mut to) = std::io::pipe().unwrap();
        to.write_all(&[0xab; 3000]).unwrap();
        raw.splice_write(from.as_fd(), 4096, 3000).unwrap();
        check_landed_at_4096(&img, &file, &raw);

        // Past the window: refused before anything leaves the pipe.
        to.write_all(&[0xcd; 512]).unwrap();
        let err = raw
            .splice_write(from.as_fd(), 16384 - 256, 512)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        let mut left = [0u8; 512];
        from.read_exact(&mut left).unwrap();

        let (_other, zeroes) = detect_zeroes_node(&mut graph);
        to.write_all(&[0; 512]).unwrap();
        let err = zeroes.splice_write(from.as_fd(), 0, 512).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        from.read_exact(&mut left).unwrap();
        assert_eq!(left, [0; 512], "the pipe is as it was");
    }

    /// Writes received straight from a socket take the same path too, and a refused one
    /// leaves its bytes in the socket. A run of them has its headers dropped and stops
    /// before a write out of the window, and before one over a probed image's first
    /// sector, which the write path must check.
    #[test]
    fn received_writes_go_where_copied_ones_go() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;

        let (mut graph, img, file, raw) = window_with_bitmaps();
        // The image was just written, so its pages are in the page cache.
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let run = [(4096, 3000, 0xab), (16384 - 256, 512, 0xcd)];
        for (_, len, fill) in run {
            client.write_all(&[0xee; 28]).unwrap();
            client.write_all(&vec![fill; len]).unwrap();
        }
        let writes = run.map(|(offset, len, _)| QueuedWrite {
            header: 28,
            offset,
            len,
        });
        let taken = raw.receive_writes(server.as_fd(), &writes, true).unwrap();
        assert_eq!(taken, 28 + 3000, "up to the write out of the window");
        check_landed_at_4096(&img, &file, &raw);
        let mut server_side = server.try_clone().unwrap();
        let mut rest = [0u8; 28 + 512];
        server_side.read_exact(&mut rest).unwrap();
        assert_eq!(rest[28..], [0xcd; 512], "the socket holds the rest");

        raw.set_probed_raw();
        client.write_all(&[0x5a; 2 * (28 + 512)]).unwrap();
        let at = |offset| QueuedWrite {
            header: 28,
            offset,
            len: 512,
        };
        let taken = raw
            .receive_writes(server.as_fd(), &[at(8192), at(0)], true)
            .unwrap();
        assert_eq!(taken, 28 + 512, "up to the write over the first sector");
        let err = raw
            .receive_writes(server.as_fd(), &[at(0)], true)
            .unwrap_err();
        assert_eq!(err.to_string(), "a write to the first sector is checked");
        server_side.read_exact(&mut rest).unwrap();
        assert_eq!(rest, [0x5a; 28 + 512], "the socket is as it was");

        let mut left = [0u8; 512];
        // Past the window: refused before anything leaves the socket.
        client.write_all(&[0xcd; 512]).unwrap();
        let err = raw
            .receive_writes(
                server.as_fd(),
                &[QueuedWrite::payload_only(16384 - 256, 512)],
                true,
            )
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        server_side.read_exact(&mut left).unwrap();
        assert_eq!(left, [0xcd; 512], "the socket is as it was");

        let (_other, zeroes) = detect_zeroes_node(&mut graph);
        client.write_all(&[0; 512]).unwrap();
        let err = zeroes
            .receive_writes(server.as_fd(), &[QueuedWrite::payload_only(0, 512)], true)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        server_side.read_exact(&mut left).unwrap();
        assert_eq!(left, [0; 512], "the socket is as it was");
    }

    #[test]
    fn reads_sent_from_the_file_come_from_the_window() {
        use std::io::Read;
        use std::os::fd::AsFd;
        let (mut graph, _img) = graph_with_file(json!({}));
        let raw = graph.add(
            "r0",
            json!({"driver": "raw", "file": "f0", "offset": 1024, "size": 4096}),
        );
        let drv = raw.driver();
        assert!(drv.can_splice());
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(drv.send_file(ours.as_fd(), 4000, 96).unwrap(), 96);
        let mut got = [0u8; 96];
        theirs.read_exact(&mut got).unwrap();
        let want: Vec<u8> = (5024..5120u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(got[..], want[..]);
        // Past the window's end: refused as a copied read is, nothing sent.
        let err = drv.send_file(ours.as_fd(), 4000, 97).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        theirs.set_nonblocking(true).unwrap();
        let unsent = theirs.read(&mut got).unwrap_err();
        assert_eq!(unsent.kind(), std::io::ErrorKind::WouldBlock);
    }

    #[test]
    fn block_status_follows_the_child() {
        let (mut graph, _img) = graph_with_file(json!({"discard": "unmap"}));
        let file = graph.lookup("f0").unwrap();
        file.driver().discard(16384, 16384).unwrap();
        let raw = graph.add("r0", json!({"driver": "raw", "file": "f0", "offset": 8192}));
        let drv = raw.driver();
        assert_eq!(drv.size(), 65536 - 8192);
        assert_eq!(
            drv.block_status(0, 65536).unwrap(),
            Extent {
                length: 8192,
                data: true,
                zero: false,
                depth: 1
            }
        );
        assert_eq!(
            drv.block_status(8192, 65536).unwrap(),
            Extent {
                length: 16384,
                data: false,
                zero: true,
                depth: 1
            }
        );
        assert_eq!(drv.block_status(drv.size(), 512).unwrap().length, 0);
    }

    #[test]
    fn open_errors_have_qemu_text() {
        let (graph, _img) = graph_with_file(json!({}));
        let err = |opts| graph.open(opts).err().unwrap();
        assert_eq!(
            err(json!({"driver": "raw", "file": "nope"})),
            "Cannot find device='nope' nor node-name='nope'"
        );
        assert_eq!(
            err(json!({"driver": "raw", "file": "f0", "offset": 65537})),
            "Offset (65537) cannot be greater than size of the containing file (65536)"
        );
        assert_eq!(
            err(json!({"driver": "raw", "file": "f0", "offset": 512, "size": 65536})),
            "The sum of offset (512) and size (65536) has to be smaller or equal to the  actual size of the containing file (65536)"
        );
        assert_eq!(
            err(json!({"driver": "raw", "file": "f0", "size": 1000})),
            "Specified size is not multiple of 512"
        );
        assert_eq!(
            err(json!({"driver": "raw", "file": "f0", "offset": -1})),
            "Value '-1' is out of range for parameter 'offset'"
        );
    }

    #[test]
    fn read_only_child_makes_a_read_only_node() {
        let (mut graph, _img) = graph_with_file(json!({"read-only": true}));
        let raw = graph.add("r0", json!({"driver": "raw", "file": "f0"}));
        assert!(raw.driver().read_only());
        let err = raw
            .driver()
            .write_vectored(0, &[IoSlice::new(&[1])])
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn over_null_co() {
        let mut graph = Graph { nodes: Vec::new() };
        graph.add(
            "n0",
            json!({"driver": "null-co", "size": 1048576, "read-zeroes": true}),
        );
        let raw = graph.add(
            "r0",
            json!({"driver": "raw", "file": "n0", "offset": 4096, "size": 8192}),
        );
        let mut buf = [7u8; 512];
        raw.driver()
            .read_vectored(512, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
        assert_eq!(buf, [0u8; 512]);
        let e = raw.driver().block_status(0, 1 << 20).unwrap();
        assert_eq!(
            e,
            Extent {
                length: 8192,
                data: false,
                zero: true,
                depth: 1
            }
        );
    }
}
