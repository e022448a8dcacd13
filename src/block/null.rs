//! The `null-co` driver: a disk of a given size that stores nothing. Writes
//! are discarded; reads return zeroes only with `read-zeroes=on`.

use std::io::{self, IoSlice, IoSliceMut};
use std::time::Duration;

use serde_json::{Map, Value};

use super::{round_up_to_sector, unsigned_option, BlockDriver, Extent, OpenContext, ZeroFlags};

/// QEMU's default size for `null-co`: 1 GiB.
const DEFAULT_SIZE: u64 = 1 << 30;

pub struct NullDriver {
    size: u64,
    read_only: bool,
    read_zeroes: bool,
    latency: Option<Duration>,
    /// `size` and `read-zeroes` as given, which name the node (QEMU's
    /// strong options).
    given: Map<String, Value>,
}

/// Opens a `null-co` node from schema-checked `blockdev-add` arguments.
pub fn open(opts: &Map<String, Value>, ctx: &OpenContext) -> Result<Box<dyn BlockDriver>, String> {
    let given_size = unsigned_option(opts, "size")?;
    let size = given_size.unwrap_or(DEFAULT_SIZE);
    let read_zeroes = opts.get("read-zeroes").and_then(Value::as_bool);
    let mut given = Map::new();
    if let Some(size) = given_size {
        given.insert("size".into(), Value::from(size));
    }
    if let Some(read_zeroes) = read_zeroes {
        given.insert("read-zeroes".into(), Value::Bool(read_zeroes));
    }
    let latency_ns = match opts.get("latency-ns") {
        None => 0,
        Some(v) => v.as_u64().ok_or("latency-ns is invalid")?,
    };
    Ok(Box::new(NullDriver {
        // QEMU reports every node's length in whole sectors.
        size: round_up_to_sector(size),
        read_only: ctx.read_only,
        read_zeroes: read_zeroes.unwrap_or(false),
        latency: (latency_ns > 0).then(|| Duration::from_nanos(latency_ns)),
        given,
    }))
}

impl NullDriver {
    /// Simulates the configured per-request latency, as QEMU does for reads,
    /// writes and flushes.
    fn wait(&self) {
        if let Some(latency) = self.latency {
            std::thread::sleep(latency);
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }
}

impl BlockDriver for NullDriver {
    fn driver_name(&self) -> &'static str {
        "null-co"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn has_info(&self) -> bool {
        false
    }

    /// `null-co://` when no option that names the node was given.
    fn filename(&self) -> Option<String> {
        self.given.is_empty().then(|| "null-co://".to_string())
    }

    fn open_options(&self) -> Map<String, Value> {
        let mut opts = self.given.clone();
        opts.insert("driver".into(), Value::from("null-co"));
        opts
    }

    /// Without `read-zeroes` the buffers are left as they are, like QEMU:
    /// callers must not hand in buffers that hold data another client may not see.
    fn read_vectored(&self, _offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        self.wait();
        // As QEMU: without read-zeroes the buffers are left as they are
        // (callers that reuse buffers across clients see
        // `fills_read_buffers` and clear them).
        if self.read_zeroes {
            for buf in bufs.iter_mut() {
                buf.fill(0);
            }
        }
        Ok(())
    }

    fn fills_read_buffers(&self) -> bool {
        self.read_zeroes
    }

    fn write_vectored(&self, _offset: u64, _bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.check_writable()?;
        self.wait();
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.wait();
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.check_writable()
    }

    /// QEMU's null-co has no zero-write operation: the generic layer writes
    /// zero buffers (one slow write), or fails a fast-only request.
    fn write_zeroes(&self, _offset: u64, _len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.check_writable()?;
        if flags.fast_only {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        self.wait();
        Ok(())
    }

    /// Like QEMU: with `read-zeroes` the whole disk is allocated zeroes,
    /// otherwise it is unallocated and neither data nor zero.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let length = len.min(self.size.saturating_sub(offset));
        Ok(Extent {
            length,
            data: false,
            zero: self.read_zeroes,
            depth: u32::from(self.read_zeroes),
        })
    }

    fn resize(&self, _new_size: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "Image format driver does not support resize",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockNode;
    use serde_json::json;
    use std::sync::Arc;

    fn no_nodes(_: &str) -> Option<Arc<BlockNode>> {
        None
    }

    fn open_null(opts: Value, read_only: bool) -> Result<Box<dyn BlockDriver>, String> {
        let opts = opts.as_object().cloned().unwrap_or_default();
        let mut ctx = OpenContext::from_options(&opts, &no_nodes)?;
        ctx.read_only = read_only;
        open(&opts, &ctx)
    }

    #[test]
    fn defaults_and_size_rounding() {
        let drv = open_null(json!({"driver": "null-co"}), false).unwrap();
        assert_eq!(drv.size(), 1 << 30);
        assert_eq!(drv.filename().as_deref(), Some("null-co://"));
        let drv = open_null(json!({"size": 1000}), false).unwrap();
        assert_eq!(drv.size(), 1024);
    }

    #[test]
    fn option_errors_have_qemu_text() {
        let err = open_null(json!({"size": -1}), false).err().unwrap();
        assert_eq!(err, "Value '-1' is out of range for parameter 'size'");
        let err = open_null(json!({"latency-ns": -1}), false).err().unwrap();
        assert_eq!(err, "latency-ns is invalid");
    }

    #[test]
    fn reads_leave_buffers_alone_unless_read_zeroes() {
        let drv = open_null(json!({"size": 4096}), false).unwrap();
        assert!(!drv.fills_read_buffers());
        let mut a = [0xabu8; 100];
        let mut b = [0xcdu8; 7];
        drv.read_vectored(0, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)])
            .unwrap();
        assert!(a.iter().all(|&x| x == 0xab) && b.iter().all(|&x| x == 0xcd));

        let drv = open_null(json!({"size": 4096, "read-zeroes": true}), false).unwrap();
        assert!(drv.fills_read_buffers());
        drv.read_vectored(0, &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)])
            .unwrap();
        assert!(a.iter().all(|&x| x == 0) && b.iter().all(|&x| x == 0));
    }

    #[test]
    fn block_status_matches_qemu() {
        let drv = open_null(json!({"size": 4096}), false).unwrap();
        let e = drv.block_status(1024, 1 << 20).unwrap();
        assert_eq!(
            e,
            Extent {
                length: 3072,
                data: false,
                zero: false,
                depth: 0
            }
        );
        let drv = open_null(json!({"size": 4096, "read-zeroes": true}), false).unwrap();
        let e = drv.block_status(0, 512).unwrap();
        assert_eq!(
            e,
            Extent {
                length: 512,
                data: false,
                zero: true,
                depth: 1
            }
        );
    }

    #[test]
    fn writes_are_discarded_and_read_only_refuses() {
        let drv = open_null(json!({"size": 4096, "read-zeroes": true}), false).unwrap();
        drv.write_vectored(0, &[IoSlice::new(&[1u8; 512])]).unwrap();
        let mut buf = [9u8; 512];
        drv.read_vectored(0, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        drv.write_zeroes(0, 512, ZeroFlags::default()).unwrap();
        let fast = ZeroFlags {
            may_unmap: false,
            fast_only: true,
        };
        assert_eq!(
            drv.write_zeroes(0, 512, fast).unwrap_err().raw_os_error(),
            Some(libc::ENOTSUP)
        );
        drv.flush().unwrap();
        assert!(drv.resize(8192).is_err());

        let ro = open_null(json!({"size": 4096}), true).unwrap();
        assert!(ro.read_only());
        let err = ro
            .write_vectored(0, &[IoSlice::new(&[1u8; 512])])
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        assert_eq!(
            ro.discard(0, 512).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
    }

    #[test]
    fn latency_is_applied() {
        let drv = open_null(json!({"size": 4096, "latency-ns": 20_000_000}), false).unwrap();
        let start = std::time::Instant::now();
        drv.flush().unwrap();
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn named_by_the_strong_options_given_as_qemu() {
        let name = |opts| super::super::display_filename(&*open_null(opts, false).unwrap());
        assert_eq!(name(json!({})), "null-co://");
        assert_eq!(name(json!({"latency-ns": 5})), "null-co://");
        assert_eq!(
            name(json!({"size": 1000})),
            "json:{\"driver\": \"null-co\", \"size\": 1000}"
        );
        assert_eq!(
            name(json!({"read-zeroes": false})),
            "json:{\"read-zeroes\": false, \"driver\": \"null-co\"}"
        );
    }
}
