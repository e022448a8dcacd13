//! The `qcow2` format driver, on a `file` child node, through imago.
//!
//! imago does the qcow2 work (mappings, allocation, COW, refcounts). It sees
//! the daemon's nodes through [`NodeStorage`], so the image file goes through
//! the `file` node (O_DIRECT, locking) and the backing node can be any driver:
//! imago reads it as a raw layer and never learns it is itself a qcow2 image.
//!
//! imago ignores some header fields (encryption), so the header is checked
//! here before imago sees it. It also clears the autoclear bits on a writable
//! open, which makes QEMU drop its persistent bitmaps: they are loaded before
//! imago opens the image and stored back after it has closed it
//! ([`super::qcow2_bitmaps`]).

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::storage::drivers::CommonStorageHelper;
use imago::{FormatAccess, FormatCreateBuilder, ShallowMapping, Storage, StorageCreateOptions};
use serde_json::{json, Map, Value};

use super::bitmap::DirtyBitmap;
use super::qcow2_bitmaps::{self, be32, be64, ImageBitmaps};
use super::{
    write_zeroes_as_data, BlockDriver, BlockNode, CacheMode, DiscardMode, Extent, OpenContext,
    ZeroFlags, ZERO_CHUNK,
};

const QCOW2_MAGIC: u32 = 0x5146_49fb;
const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Longest backing chain opened from image headers, a bound on the files
/// a crafted chain can make the daemon open.
const MAX_HEADER_CHAIN: usize = 64;

/// A node of the graph as imago's storage: every access goes to the node's driver.
pub struct NodeStorage {
    node: Arc<BlockNode>,
    helper: CommonStorageHelper,
}

impl NodeStorage {
    fn new(node: Arc<BlockNode>) -> Self {
        NodeStorage {
            node,
            helper: CommonStorageHelper::default(),
        }
    }
}

impl fmt::Debug for NodeStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeStorage")
            .field("node", &self.node.name())
            .finish()
    }
}

impl fmt::Display for NodeStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node '{}'", self.node.name())
    }
}

impl Storage for NodeStorage {
    fn mem_align(&self) -> usize {
        self.req_align()
    }

    fn req_align(&self) -> usize {
        (self.node.driver().request_alignment() as usize).max(1)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.node.driver().size())
    }

    fn get_filename(&self) -> Option<PathBuf> {
        self.node.driver().filename().map(PathBuf::from)
    }

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let mut bufs = bufv.into_inner();
        self.node.driver().read_vectored(offset, &mut bufs)
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        // Through the file node, so that its detect-zeroes, discard and bitmaps apply.
        self.node.write_vectored(offset, &bufv.into_inner())
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.node.write_zeroes(offset, length, ZeroFlags::default())
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.node.write_zeroes(offset, length, ZeroFlags::default())
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        self.node.discard(offset, length)
    }

    fn flush(&self) -> io::Result<()> {
        // The node keeps no buffers of its own; durability is `sync`'s job.
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.node.driver().flush()
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }

    fn resize(&self, new_size: u64, _prealloc: imago::storage::PreallocateMode) -> io::Result<()> {
        self.node.driver().resize(new_size)
    }
}

/// Largest L1 or refcount table accepted (QEMU's limit for the L1 table).
const MAX_TABLE_BYTES: u64 = 32 << 20;
/// The host offset bits of L1 and refcount table entries.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Where a table of 64-bit cluster offsets lies in the image file.
struct TableRef {
    offset: u64,
    entries: u64,
}

/// What the image header says, read before imago opens the image.
struct HeaderInfo {
    version: u32,
    cluster_size: u64,
    incompatible: u64,
    compatible: u64,
    refcount_bits: u64,
    compression_type: u8,
    crypt_method: u32,
    snapshots: u32,
}

fn read_at(node: &BlockNode, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    node.driver()
        .read_vectored(offset, &mut [IoSliceMut::new(&mut buf)])
        .map_err(|e| format!("Could not read qcow2 header of '{}': {e}", node.name()))?;
    Ok(buf)
}

impl HeaderInfo {
    fn read(file: &BlockNode) -> Result<Self, String> {
        let what = file
            .driver()
            .filename()
            .unwrap_or_else(|| file.name().to_string());
        let invalid = |cause: &str| format!("Image '{what}' is not a valid qcow2 image: {cause}");
        if file.driver().size() < 72 {
            return Err(invalid("the file is shorter than a qcow2 header"));
        }
        let head = read_at(file, 0, 112)?;
        let field32 = |at| be32(&head, at).ok_or_else(|| invalid("truncated header"));
        let field64 = |at| be64(&head, at).ok_or_else(|| invalid("truncated header"));
        if field32(0)? != QCOW2_MAGIC {
            return Err(invalid("bad magic"));
        }
        let version = field32(4)?;
        let cluster_bits = field32(20)?;
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(&format!(
                "cluster_bits {cluster_bits} out of range"
            )));
        }
        let mut info = HeaderInfo {
            version,
            cluster_size: 1 << cluster_bits,
            incompatible: 0,
            compatible: 0,
            refcount_bits: 16,
            compression_type: 0,
            crypt_method: field32(32)?,
            snapshots: field32(60)?,
        };
        match version {
            2 => {}
            3 => {
                info.incompatible = field64(72)?;
                info.compatible = field64(80)?;
                info.refcount_bits = 1u64.checked_shl(field32(96)?).unwrap_or(0);
                if field32(100)? > 104 {
                    info.compression_type = head.get(104).copied().unwrap_or(0);
                }
            }
            v => return Err(format!("Image '{what}' has unsupported qcow2 version {v}")),
        }
        let l1 = TableRef {
            offset: field64(40)?,
            entries: u64::from(field32(36)?),
        };
        let refcount_table = TableRef {
            offset: field64(48)?,
            entries: u64::from(field32(56)?) * info.cluster_size / 8,
        };
        info.check_table(file, "L1 table", l1)
            .map_err(|cause| invalid(&cause))?;
        info.check_table(file, "refcount table", refcount_table)
            .map_err(|cause| invalid(&cause))?;
        Ok(info)
    }

    /// Checks that a table and every cluster it points to lie inside the
    /// image file. imago reads past the end as zeroes and would later write
    /// metadata there, outside what the refcounts cover.
    fn check_table(&self, file: &BlockNode, name: &str, table: TableRef) -> Result<(), String> {
        let file_size = file.driver().size();
        let bytes = table
            .entries
            .checked_mul(8)
            .filter(|&b| b <= MAX_TABLE_BYTES);
        let Some(bytes) = bytes else {
            return Err(format!("{name} is too large ({} entries)", table.entries));
        };
        if bytes == 0 {
            return Ok(());
        }
        if !table.offset.is_multiple_of(self.cluster_size)
            || table.offset.saturating_add(bytes) > file_size
        {
            return Err(format!(
                "{name} at offset {} lies outside the file",
                table.offset
            ));
        }
        let data = read_at(file, table.offset, bytes as usize)?;
        for (index, entry) in data.chunks_exact(8).enumerate() {
            let target = be64(entry, 0).unwrap_or(0) & TABLE_OFFSET_MASK;
            if target != 0 && (!target.is_multiple_of(self.cluster_size) || target >= file_size) {
                return Err(format!(
                    "{name} entry {index} points to offset {target}, outside the file"
                ));
            }
        }
        Ok(())
    }

    /// Refuses what imago would misread or what a writable open would damage.
    fn check(&self, what: &str) -> Result<(), String> {
        let refuse = |feature: &str| {
            Err(format!(
                "Image '{what}' uses {feature}, which blkd does not support"
            ))
        };
        if self.crypt_method != 0 {
            return refuse("encryption");
        }
        if self.incompatible & INCOMPAT_DIRTY != 0 {
            return Err(format!(
                "Image '{what}' has the dirty bit set (lazy refcounts after an unclean shutdown); \
                 repair it with 'qemu-img check -r all' first"
            ));
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(format!(
                "Image '{what}' is marked corrupt; repair it with 'qemu-img check -r all' first"
            ));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return refuse("an external data file");
        }
        if self.incompatible & INCOMPAT_COMPRESSION != 0 || self.compression_type != 0 {
            let name = match self.compression_type {
                1 => "zstd".to_string(),
                other => format!("type {other}"),
            };
            return refuse(&format!("compression type {name}"));
        }
        if self.incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            return refuse("extended L2 entries (extended_l2)");
        }
        let unknown = self.incompatible
            & !(INCOMPAT_DIRTY
                | INCOMPAT_CORRUPT
                | INCOMPAT_DATA_FILE
                | INCOMPAT_COMPRESSION
                | INCOMPAT_EXTENDED_L2);
        if unknown != 0 {
            return refuse(&format!(
                "unknown incompatible features (bits {unknown:#x})"
            ));
        }
        Ok(())
    }
}

/// Where an image's backing layer comes from.
enum BackingChoice {
    /// `backing: null`: no backing layer.
    None,
    /// `backing: "node-name"`.
    Node(Arc<BlockNode>),
    /// No `backing` option: the file named in the image header, if any.
    FromHeader,
}

/// The options a header-opened backing chain inherits, and the files it has
/// visited, to detect loops.
struct ChainEnv<'a> {
    cache: Option<Value>,
    ctx: &'a OpenContext<'a>,
    visited: Vec<PathBuf>,
}

pub struct Qcow2Driver {
    /// Shared for I/O; exclusive for discard and resize, which may free
    /// clusters that in-flight requests still map. Dropped by hand in
    /// `drop`, before the bitmaps are stored.
    image: ManuallyDrop<RwLock<FormatAccess<NodeStorage>>>,
    file: Arc<BlockNode>,
    backing: Option<Arc<BlockNode>>,
    /// The backing file the image header names, whichever node is used.
    header_backing: Option<HeaderBacking>,
    /// The backing node was opened from the header's reference.
    backing_from_header: bool,
    read_only: bool,
    discard: DiscardMode,
    header: HeaderInfo,
    /// The persistent bitmaps the image held at open.
    stored_bitmaps: ImageBitmaps,
    /// What the node hands over at close, to be stored.
    bitmaps_at_close: Mutex<Option<Vec<DirtyBitmap>>>,
}

/// Opens a `qcow2` node: `file` names the image's file node, `backing` a
/// node name, `null`, or is absent (then the header's backing file is opened).
pub fn open(opts: &Map<String, Value>, ctx: &OpenContext) -> Result<Box<dyn BlockDriver>, String> {
    let file = match opts.get("file") {
        Some(Value::String(name)) => ctx.child(name)?,
        Some(_) => return Err("Parameter 'file' expects a node name".into()),
        None => return Err("Parameter 'file' is missing".into()),
    };
    let backing = match opts.get("backing") {
        None => BackingChoice::FromHeader,
        Some(Value::Null) => BackingChoice::None,
        Some(Value::String(name)) if name.is_empty() => {
            log::warn!("Use of \"backing\": \"\" is deprecated; use \"backing\": null instead");
            BackingChoice::None
        }
        Some(Value::String(name)) => BackingChoice::Node(ctx.child(name)?),
        Some(_) => return Err("Parameter 'backing' expects a node name or null".into()),
    };
    let mut env = ChainEnv {
        cache: opts.get("cache").cloned(),
        ctx,
        visited: Vec::new(),
    };
    // auto-read-only: the file node fell back to read-only, so do we.
    let read_only = ctx.read_only || (ctx.auto_read_only && file.driver().read_only());
    let driver = open_image(file, backing, read_only, ctx.discard, &mut env)?;
    Ok(Box::new(driver))
}

fn open_image(
    file: Arc<BlockNode>,
    backing: BackingChoice,
    read_only: bool,
    discard: DiscardMode,
    env: &mut ChainEnv,
) -> Result<Qcow2Driver, String> {
    let what = file
        .driver()
        .filename()
        .unwrap_or_else(|| file.name().to_string());
    if !read_only && file.driver().read_only() {
        return Err(format!(
            "Cannot open '{what}' writable: its file node '{}' is read-only",
            file.name()
        ));
    }
    let header = HeaderInfo::read(&file)?;
    header.check(&what)?;
    // Before imago opens it: a writable open clears the autoclear bits.
    let stored_bitmaps = qcow2_bitmaps::load(&file, &what, !read_only)?;
    if let Ok(path) = Path::new(&what).canonicalize() {
        env.visited.push(path);
    }

    let mut qcow2 =
        Qcow2::<NodeStorage>::open_image(NodeStorage::new(Arc::clone(&file)), !read_only)
            .map_err(|e| format!("Could not open qcow2 image '{what}': {e}"))?;
    let header_backing = qcow2.implicit_backing_file().map(|name| HeaderBacking {
        name: name.clone(),
        format: qcow2.implicit_backing_format().cloned(),
        path: backing_path(Path::new(&what), name),
    });
    let backing_from_header = matches!(backing, BackingChoice::FromHeader);
    let backing = match (backing, &header_backing) {
        (BackingChoice::None, _) | (BackingChoice::FromHeader, None) => None,
        (BackingChoice::Node(node), _) => Some(node),
        (BackingChoice::FromHeader, Some(named)) => Some(open_header_backing(&what, named, env)?),
    };
    let backing_layer = match &backing {
        Some(node) => {
            let raw = Raw::open_image(NodeStorage::new(Arc::clone(node)), false).map_err(|e| {
                format!(
                    "Could not use node '{}' as backing of '{what}': {e}",
                    node.name()
                )
            })?;
            Some(FormatAccess::new(raw))
        }
        None => None,
    };
    qcow2.set_backing(backing_layer);
    qcow2.set_data_file(None);

    Ok(Qcow2Driver {
        image: ManuallyDrop::new(RwLock::new(FormatAccess::new(qcow2))),
        file,
        backing,
        header_backing,
        backing_from_header,
        read_only,
        discard,
        header,
        stored_bitmaps,
        bitmaps_at_close: Mutex::new(None),
    })
}

/// The backing file reference in an image header.
struct HeaderBacking {
    /// As written in the header.
    name: String,
    /// The backing format the header records, if any.
    format: Option<String>,
    /// `name` taken relative to the image's directory.
    path: PathBuf,
}

/// Where the backing file `name` of `image` is: relative names are taken
/// from the image's directory (not `json:` or protocol names).
fn backing_path(image: &Path, name: &str) -> PathBuf {
    let plain = !name.starts_with("json:") && !name.contains("://");
    match image.parent() {
        Some(dir) if plain && Path::new(name).is_relative() => dir.join(name),
        _ => PathBuf::from(name),
    }
}

/// Opens the backing file an image header names, read-only, as QEMU does
/// when `backing` is not given: a `file` node, with a `qcow2` or `raw`
/// node on it.
fn open_header_backing(
    image: &str,
    backing: &HeaderBacking,
    env: &mut ChainEnv,
) -> Result<Arc<BlockNode>, String> {
    let HeaderBacking { name, format, path } = backing;
    let format = format.as_deref();
    if name.starts_with("json:") || name.contains("://") {
        return Err(format!(
            "Backing file '{name}' of '{image}' is not a plain file name, which blkd does not support; \
             give the backing node explicitly"
        ));
    }
    let canonical = path.canonicalize().map_err(|e| {
        format!(
            "Could not open backing file '{}' of '{image}': {e}",
            path.display()
        )
    })?;
    if env.visited.contains(&canonical) {
        return Err(format!(
            "Backing file chain loop: '{}' (backing file of '{image}') is already in the chain",
            canonical.display()
        ));
    }
    if env.visited.len() >= MAX_HEADER_CHAIN {
        return Err(format!(
            "Backing chain of '{image}' is longer than {MAX_HEADER_CHAIN} images"
        ));
    }

    let mut file_opts = Map::new();
    file_opts.insert("driver".into(), Value::from("file"));
    file_opts.insert(
        "filename".into(),
        Value::from(path.to_string_lossy().into_owned()),
    );
    file_opts.insert("read-only".into(), Value::Bool(true));
    if let Some(cache) = &env.cache {
        file_opts.insert("cache".into(), cache.clone());
    }
    let file_ctx = OpenContext::from_options(&file_opts, env.ctx.lookup)?;
    let file_driver = super::open("file", &file_opts, &file_ctx)?;
    let file = Arc::new(BlockNode::new(super::auto_node_name(), file_driver));

    let is_qcow2 = match format {
        Some("qcow2") => true,
        Some("raw") | Some("file") => false,
        Some(other) => {
            return Err(format!(
                "Backing file '{}' of '{image}' has format '{other}', which blkd does not support",
                path.display()
            ))
        }
        // QEMU probes too; only the magic matters for the two formats we know.
        None => read_at(&file, 0, 4)? == QCOW2_MAGIC.to_be_bytes(),
    };
    if !is_qcow2 {
        let mut raw_opts = Map::new();
        raw_opts.insert("file".into(), Value::from(file.name()));
        raw_opts.insert("read-only".into(), Value::Bool(true));
        let lookup = |n: &str| (n == file.name()).then(|| Arc::clone(&file));
        let raw_ctx = OpenContext::from_options(&raw_opts, &lookup)?;
        let raw = super::raw::open(&raw_opts, &raw_ctx)?;
        return Ok(Arc::new(BlockNode::new(super::auto_node_name(), raw)));
    }
    let driver = open_image(
        file,
        BackingChoice::FromHeader,
        true,
        DiscardMode::Ignore,
        env,
    )?;
    Ok(Arc::new(BlockNode::new(
        super::auto_node_name(),
        Box::new(driver),
    )))
}

/// Creates a qcow2 image file at `path` (64 KiB clusters), optionally on a
/// backing file, whose format is probed and recorded in the header.
pub fn create(path: &Path, size: u64, backing: Option<&str>) -> Result<(), String> {
    let what = path.display();
    let opts = StorageCreateOptions::new()
        .filename(path)
        .size(0)
        .overwrite(false);
    let file = imago::file::File::create_open(opts)
        .map_err(|e| format!("Could not create '{what}': {e}"))?;
    let mut builder = Qcow2::<imago::file::File>::create_builder(file).size(size);
    if let Some(backing) = backing {
        let backing_path = backing_path(path, backing);
        let mut magic = [0u8; 4];
        let format = match std::fs::File::open(&backing_path)
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut magic, 0))
        {
            Ok(()) if magic == QCOW2_MAGIC.to_be_bytes() => "qcow2",
            Ok(()) => "raw",
            Err(e) => {
                return Err(format!(
                    "Could not open backing file '{}': {e}",
                    backing_path.display()
                ))
            }
        };
        builder = builder.backing(backing.to_string(), format.to_string());
    }
    builder
        .create()
        .map_err(|e| format!("Could not create qcow2 image '{what}': {e}"))
}

impl Qcow2Driver {
    fn image(&self) -> RwLockReadGuard<'_, FormatAccess<NodeStorage>> {
        self.image.read().unwrap_or_else(|p| p.into_inner())
    }

    fn image_mut(&self) -> RwLockWriteGuard<'_, FormatAccess<NodeStorage>> {
        self.image.write().unwrap_or_else(|p| p.into_inner())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }

    /// The state of the one mapping that starts at `offset`.
    fn extent_at(
        &self,
        image: &FormatAccess<NodeStorage>,
        offset: u64,
        len: u64,
    ) -> io::Result<Extent> {
        let (mapping, length) = image.get_shallow_mapping(offset, len)?;
        let length = length.min(len);
        let local = |data, zero| Extent {
            length,
            data,
            zero,
            depth: 1,
        };
        Ok(match mapping {
            ShallowMapping::Raw { offset: host, .. } => {
                // A data cluster that is a hole in the image file reads as
                // zeroes; QEMU reports it as data+zero, so do we.
                match self.file.driver().block_status(host, length) {
                    Ok(st) if st.length == 0 => local(true, true),
                    Ok(st) => Extent {
                        length: st.length.min(length),
                        ..local(true, st.zero)
                    },
                    Err(e) => {
                        log::debug!("block status of '{}' at {host}: {e}", self.file.name());
                        local(true, false)
                    }
                }
            }
            ShallowMapping::Indirect {
                offset: backing_offset,
                ..
            } => match &self.backing {
                Some(backing) => {
                    let st = backing.driver().block_status(backing_offset, length)?;
                    if st.length == 0 {
                        // Past the end of a short backing layer: zeroes that
                        // QEMU counts as allocated in that layer.
                        Extent {
                            length,
                            data: false,
                            zero: true,
                            depth: 2,
                        }
                    } else {
                        Extent {
                            length: st.length.min(length),
                            depth: if st.depth == 0 { 0 } else { st.depth + 1 },
                            ..st
                        }
                    }
                }
                None => Extent {
                    length,
                    data: false,
                    zero: true,
                    depth: 0,
                },
            },
            ShallowMapping::Zero { explicit, .. } => Extent {
                length,
                data: false,
                zero: true,
                depth: u32::from(explicit),
            },
            ShallowMapping::Special { .. } => local(true, false),
            _ => Extent {
                length: 0,
                data: false,
                zero: true,
                depth: 0,
            },
        })
    }

    /// Refuses requests over data clusters that the L2 tables place past the
    /// end of the image file (a corrupt image): imago would write or free
    /// clusters there, outside the area the refcounts cover.
    fn check_mappings(
        &self,
        image: &FormatAccess<NodeStorage>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let file_end = self
            .file
            .driver()
            .size()
            .next_multiple_of(self.header.cluster_size);
        let end = offset.saturating_add(len).min(image.size());
        let mut pos = offset;
        while pos < end {
            let (mapping, length) = image.get_shallow_mapping(pos, end - pos)?;
            if length == 0 {
                break;
            }
            if let ShallowMapping::Raw { offset: host, .. } = mapping {
                if host.saturating_add(length) > file_end {
                    let what = self.image_name();
                    log::error!("qcow2 image '{what}' is corrupt: offset {pos} maps to host offset {host}, past the end of the file");
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("qcow2 image '{what}' is corrupt: offset {pos} maps past the end of the file"),
                    ));
                }
            }
            pos += length;
        }
        Ok(())
    }

    fn zero_v2(&self, offset: u64, len: u64) -> io::Result<()> {
        let cluster = self.header.cluster_size;
        let end = offset + len;
        let inner_start = offset.next_multiple_of(cluster);
        let inner_end = if end == self.size() {
            end
        } else {
            end - end % cluster
        };
        if self.backing.is_some() || inner_start >= inner_end {
            return self.write_zero_buffers(offset, len);
        }
        self.write_zero_buffers(offset, inner_start - offset)?;
        {
            let mut image = self.image_mut();
            self.check_mappings(&image, inner_start, inner_end - inner_start)?;
            image.discard_to_backing(inner_start, inner_end - inner_start)?;
        }
        self.write_zero_buffers(inner_end, end - inner_end)
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
        write_zeroes_as_data(self, offset, len, &zeroes)
    }

    /// The image file's name (or its node's), for messages.
    fn image_name(&self) -> String {
        self.file
            .driver()
            .filename()
            .unwrap_or_else(|| self.file.name().to_string())
    }

    /// Whether the backing is not what the header names, as QEMU's
    /// bdrv_backing_overridden: a backing chosen by the options counts as
    /// the header's only when the header names its very filename.
    fn backing_overridden(&self) -> bool {
        match (&self.backing, &self.header_backing) {
            (None, named) => named.is_some(),
            (Some(_), _) if self.backing_from_header => false,
            (Some(node), Some(named)) => node.driver().filename().as_deref() != Some(&named.name),
            (Some(_), None) => true,
        }
    }

    fn cluster_aligned(&self, offset: u64, len: u64, size: u64) -> bool {
        let end = offset.saturating_add(len);
        offset.is_multiple_of(self.header.cluster_size)
            && (end.is_multiple_of(self.header.cluster_size) || end == size)
    }
}

impl BlockDriver for Qcow2Driver {
    fn driver_name(&self) -> &'static str {
        "qcow2"
    }

    /// Whole sectors: QEMU rounds a (crafted) size in the header down.
    fn size(&self) -> u64 {
        self.image().size() & !511
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    /// Unallocated clusters are read from the backing node, which may leave them as they
    /// were (null-co without read-zeroes).
    fn fills_read_buffers(&self) -> bool {
        self.backing
            .as_ref()
            .is_none_or(|b| b.driver().fills_read_buffers())
    }

    /// The file's name, unless the backing is not the one the header names:
    /// then the options say more than a filename can.
    fn filename(&self) -> Option<String> {
        if self.backing_overridden() {
            return None;
        }
        self.file.driver().filename()
    }

    fn open_options(&self) -> Map<String, Value> {
        let mut opts = Map::new();
        opts.insert("driver".into(), Value::from("qcow2"));
        opts.insert(
            "file".into(),
            Value::Object(self.file.driver().open_options()),
        );
        if self.backing_overridden() {
            let backing = match &self.backing {
                Some(node) => Value::Object(node.driver().open_options()),
                None => Value::Null,
            };
            opts.insert("backing".into(), backing);
        }
        opts
    }

    fn children(&self) -> Vec<Arc<BlockNode>> {
        let mut children = vec![Arc::clone(&self.file)];
        children.extend(self.backing.iter().cloned());
        children
    }

    fn backing(&self) -> Option<Arc<BlockNode>> {
        self.backing.clone()
    }

    fn describe_image(&self, image: &mut Map<String, Value>) {
        let header = &self.header;
        image.insert("cluster-size".into(), Value::from(header.cluster_size));
        // As QEMU's qcow2_get_specific_info. Corrupt images, extended L2
        // entries and zstd are refused at open, so those members are fixed.
        let data = if header.version == 2 {
            json!({"compat": "0.10", "compression-type": "zlib", "refcount-bits": header.refcount_bits})
        } else {
            let mut data = json!({
                "compat": "1.1",
                "compression-type": "zlib",
                "corrupt": false,
                "extended-l2": false,
                "lazy-refcounts": header.compatible & COMPAT_LAZY_REFCOUNTS != 0,
                "refcount-bits": header.refcount_bits,
            });
            // The bitmaps stored in the image; a writable open has them in use.
            let bitmaps: Vec<Value> = self
                .stored_bitmaps
                .bitmaps
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if !self.read_only {
                        flags.push("in-use");
                    }
                    if b.recording {
                        flags.push("auto");
                    }
                    json!({"flags": flags, "granularity": b.granularity, "name": b.name})
                })
                .collect();
            if !bitmaps.is_empty() {
                data["bitmaps"] = Value::Array(bitmaps);
            }
            data
        };
        image.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": data}),
        );
        if let Some(backing) = &self.header_backing {
            image.insert("backing-filename".into(), Value::from(backing.name.clone()));
            image.insert(
                "full-backing-filename".into(),
                Value::from(backing.path.to_string_lossy().into_owned()),
            );
            if let Some(format) = &backing.format {
                image.insert(
                    "backing-filename-format".into(),
                    Value::from(format.clone()),
                );
            }
        }
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        self.image().readv(IoVectorMut::from(slices), offset)
    }

    fn write_vectored(&self, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.check_writable()?;
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let len = slices.iter().map(|b| b.len() as u64).sum();
        let image = self.image();
        self.check_mappings(&image, offset, len)?;
        image.writev(IoVector::from(slices), offset)
    }

    fn flush(&self) -> io::Result<()> {
        let image = self.image();
        image.flush()?;
        image.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        if self.discard == DiscardMode::Ignore {
            return Ok(());
        }
        let mut image = self.image_mut();
        self.check_mappings(&image, offset, len)?;
        match image.discard_to_any(offset, len) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            other => other,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        self.check_writable()?;
        if flags.fast_only {
            // Zero clusters need qcow2 v3 and whole clusters; anything else
            // would mean writing zero data.
            let size = self.size();
            if self.header.version < 3 || !self.cluster_aligned(offset, len, size) {
                return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
            }
        }
        // Zero clusters need v3. On v2, as QEMU: without a backing file,
        // whole clusters are deallocated (they read as zeroes); the rest is
        // written as zero data.
        if self.header.version < 3 {
            return self.zero_v2(offset, len);
        }
        // Like QEMU, only a node opened with discard=unmap frees clusters.
        if flags.may_unmap && self.discard == DiscardMode::Unmap {
            let mut image = self.image_mut();
            self.check_mappings(&image, offset, len)?;
            image.discard_to_zero(offset, len)
        } else {
            let image = self.image();
            self.check_mappings(&image, offset, len)?;
            image.write_zeroes(offset, len)
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let image = self.image();
        let size = image.size();
        if offset >= size {
            return Ok(Extent {
                length: 0,
                data: false,
                zero: true,
                depth: 0,
            });
        }
        let len = len.min(size - offset);
        let first = self.extent_at(&image, offset, len)?;
        let mut total = first.length;
        // Merge following mappings in the same state into one extent.
        while first.length > 0 && total < len {
            let next = self.extent_at(&image, offset + total, len - total)?;
            if next.length == 0
                || (next.data, next.zero, next.depth) != (first.data, first.zero, first.depth)
            {
                break;
            }
            total += next.length;
        }
        Ok(Extent {
            length: total,
            ..first
        })
    }

    fn allocated_size(&self) -> Option<u64> {
        self.file.driver().allocated_size()
    }

    fn cache_mode(&self) -> CacheMode {
        self.file.driver().cache_mode()
    }

    fn resize(&self, new_size: u64) -> io::Result<()> {
        self.check_writable()?;
        if !new_size.is_multiple_of(512) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "The new size must be a multiple of 512",
            ));
        }
        if self.header.snapshots > 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "Cannot resize '{}': it has internal snapshots",
                    self.image_name()
                ),
            ));
        }
        let mut image = self.image_mut();
        let old_size = image.size();
        image.resize(new_size, imago::format::PreallocateMode::None)?;
        // As QEMU does: a longer backing layer must not show through the
        // area that growing has just added.
        let backing_end = self.backing.as_ref().map_or(0, |b| b.driver().size());
        let zero_end = new_size.min(backing_end);
        if zero_end > old_size {
            image.write_zeroes(old_size, zero_end - old_size)?;
        }
        Ok(())
    }

    fn persistent_bitmaps(&self) -> Vec<DirtyBitmap> {
        self.stored_bitmaps.bitmaps.clone()
    }

    fn stores_bitmaps(&self) -> bool {
        true
    }

    fn check_new_persistent_bitmap(&self, name: &str, granularity: u64) -> Result<(), String> {
        if self.header.version < 3 {
            return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
        }
        if self.read_only {
            return Err("the node is read-only".into());
        }
        qcow2_bitmaps::check_new(name, granularity, self.size(), self.header.cluster_size)
    }

    fn store_bitmaps_on_close(&self, bitmaps: Vec<DirtyBitmap>) {
        *self
            .bitmaps_at_close
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(bitmaps);
    }
}

impl Drop for Qcow2Driver {
    fn drop(&mut self) {
        let what = self.image_name();
        if !self.read_only {
            if let Err(e) = self.image().flush() {
                log::error!("Could not write qcow2 metadata of '{what}' on close: {e}");
            }
        }
        // SAFETY: `image` is not used after this; the bitmaps below change
        // the refcounts, so imago must be gone first.
        unsafe { ManuallyDrop::drop(&mut self.image) };
        if self.read_only {
            return;
        }
        let handed = self
            .bitmaps_at_close
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match handed {
            Some(bitmaps) if !bitmaps.is_empty() || self.stored_bitmaps.present => {
                if let Err(e) =
                    qcow2_bitmaps::store(&self.file, &self.stored_bitmaps.clusters, &bitmaps)
                {
                    log::error!(
                        "Could not store the persistent dirty bitmaps of '{what}': {e}; \
                         QEMU will consider them inconsistent"
                    );
                }
            }
            Some(_) => {}
            None if self.stored_bitmaps.present => log::warn!(
                "The persistent dirty bitmaps of '{what}' were not stored: \
                 QEMU will consider them inconsistent"
            ),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// `qemu-img check` finds `top` clean and `compare` finds it equal to
    /// `expected` (written to the raw file `raw`).
    fn assert_image_equals(top: &Path, raw: &Path, expected: &[u8]) {
        std::fs::write(raw, expected).unwrap();
        run("qemu-img", &["check", "-q", top.to_str().unwrap()]);
        run(
            "qemu-img",
            &[
                "compare",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                top.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
    }

    fn run(program: &str, args: &[&str]) -> String {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn qemu_io(image: &Path, commands: &[&str]) {
        let mut args = vec!["-f", "qcow2"];
        for c in commands {
            args.extend(["-c", c]);
        }
        args.push(image.to_str().unwrap());
        run("qemu-io", &args);
    }

    fn create_qcow2(path: &Path, backing: Option<&str>, extra: &[&str]) {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if let Some(b) = backing {
            args.extend(["-b", b, "-F", "qcow2"]);
        }
        args.extend(extra);
        args.push(path.to_str().unwrap());
        if backing.is_none() {
            args.push("1M");
        }
        run("qemu-img", &args);
    }

    fn no_nodes(_: &str) -> Option<Arc<BlockNode>> {
        None
    }

    fn file_node(path: &Path, read_only: bool) -> Arc<BlockNode> {
        let opts = serde_json::json!({
            "driver": "file",
            "filename": path.to_str().unwrap(),
            "read-only": read_only,
        });
        let opts = opts.as_object().unwrap();
        let ctx = OpenContext::from_options(opts, &no_nodes).unwrap();
        let driver = super::super::open("file", opts, &ctx)
            .unwrap_or_else(|e| panic!("file node on {}: {e}", path.display()));
        Arc::new(BlockNode::new(format!("file-{}", path.display()), driver))
    }

    /// Opens `path` as a qcow2 node; `extra` adds options such as `backing`.
    fn try_open(
        path: &Path,
        read_only: bool,
        extra: Value,
        nodes: &[Arc<BlockNode>],
    ) -> Result<Box<dyn BlockDriver>, String> {
        let file = file_node(path, read_only);
        let mut opts = serde_json::json!({
            "driver": "qcow2",
            "file": file.name(),
            "read-only": read_only,
            "discard": "unmap",
        });
        if let (Value::Object(o), Value::Object(e)) = (&mut opts, extra) {
            o.extend(e);
        }
        let opts = opts.as_object().unwrap();
        let lookup = |name: &str| {
            nodes
                .iter()
                .chain(std::iter::once(&file))
                .find(|n| n.name() == name)
                .cloned()
        };
        let ctx = OpenContext::from_options(opts, &lookup)?;
        open(opts, &ctx)
    }

    fn open_qcow2(path: &Path, read_only: bool) -> Box<dyn BlockDriver> {
        try_open(path, read_only, serde_json::json!({}), &[]).unwrap()
    }

    fn read(drv: &dyn BlockDriver, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xaa; len];
        drv.read_vectored(offset, &mut [IoSliceMut::new(&mut buf)])
            .unwrap();
        buf
    }

    fn raw_copy(image: &Path, raw: &Path) -> Vec<u8> {
        run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                image.to_str().unwrap(),
                raw.to_str().unwrap(),
            ],
        );
        std::fs::read(raw).unwrap()
    }

    /// The 3-layer chain of observed-nbd.md's test image (base, mid, top).
    fn make_chain(dir: &Path) -> PathBuf {
        let (base, mid, top) = (
            dir.join("base.qcow2"),
            dir.join("mid.qcow2"),
            dir.join("top.qcow2"),
        );
        create_qcow2(&base, None, &[]);
        qemu_io(
            &base,
            &[
                "write -P 0x11 0 128k",
                "write -z 192k 64k",
                "write -P 0x44 256k 64k",
            ],
        );
        create_qcow2(&mid, Some("base.qcow2"), &[]);
        qemu_io(&mid, &["write -P 0x22 64k 64k"]);
        create_qcow2(&top, Some("mid.qcow2"), &[]);
        qemu_io(
            &top,
            &[
                "write -P 0x33 128k 64k",
                "write -z 256k 64k",
                "write -z 320k 64k",
                "write -P 0x55 512k 4k",
            ],
        );
        top
    }

    fn all_extents(drv: &dyn BlockDriver) -> Vec<(u64, Extent)> {
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < drv.size() {
            let e = drv.block_status(offset, drv.size() - offset).unwrap();
            assert!(e.length > 0, "empty extent at {offset}");
            out.push((offset, e));
            offset += e.length;
        }
        out
    }

    /// Our depth for every byte range, as `qemu-img map` gives it
    /// (its depth counts from 0 at the top; `present: false` is our 0).
    fn assert_depths_match_qemu_img(image: &Path, drv: &dyn BlockDriver) {
        let map = run(
            "qemu-img",
            &["map", "--output=json", image.to_str().unwrap()],
        );
        let map: Vec<Value> = serde_json::from_str(&map).unwrap();
        let extents = all_extents(drv);
        for entry in map {
            let start = entry["start"].as_u64().unwrap();
            let end = start + entry["length"].as_u64().unwrap();
            let expected = if entry["present"] == Value::Bool(true) {
                entry["depth"].as_u64().unwrap() as u32 + 1
            } else {
                0
            };
            for (offset, e) in &extents {
                if *offset < end && offset + e.length > start {
                    assert_eq!(
                        e.depth, expected,
                        "depth at {offset} (qemu-img map entry at {start})"
                    );
                }
            }
        }
    }

    #[test]
    fn reads_through_header_backing_chain() {
        let dir = tempfile::tempdir().unwrap();
        let top = make_chain(dir.path());
        let expected = raw_copy(&top, &dir.path().join("top.raw"));
        let drv = open_qcow2(&top, true);
        assert_eq!(drv.size(), 1 << 20);
        assert_eq!(read(drv.as_ref(), 0, 1 << 20), expected);
        assert_eq!(read(drv.as_ref(), 0, 4), [0x11; 4]);
        assert_eq!(read(drv.as_ref(), 65536 + 7, 3), [0x22; 3]);
        // Vectored read across the base/mid/top boundary.
        let (mut a, mut b) = (vec![0u8; 65536 + 10], vec![0u8; 65536]);
        drv.read_vectored(
            65536 - 10,
            &mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)],
        )
        .unwrap();
        assert_eq!([a, b].concat(), expected[65536 - 10..196608].to_vec());
        // The chain: top -> mid (qcow2 node) -> its file and base.
        let children = drv.children();
        assert_eq!(children.len(), 2);
        let mid = &children[1];
        assert_eq!(mid.driver().driver_name(), "qcow2");
        assert_eq!(mid.driver().children().len(), 2);
        assert!(mid.driver().read_only());
    }

    #[test]
    fn allocation_depth_matches_qemu_img_map() {
        let dir = tempfile::tempdir().unwrap();
        let top = make_chain(dir.path());
        let drv = open_qcow2(&top, true);
        assert_depths_match_qemu_img(&top, drv.as_ref());
        // The middle layer on its own, too.
        let mid = dir.path().join("mid.qcow2");
        let mid_drv = open_qcow2(&mid, true);
        assert_depths_match_qemu_img(&mid, mid_drv.as_ref());
    }

    #[test]
    fn base_allocation_matches_qsd() {
        // observed-nbd.md's nbdinfo --map of this layout on QSD.
        let dir = tempfile::tempdir().unwrap();
        let top = make_chain(dir.path());
        let drv = open_qcow2(&top, true);
        let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
        for (offset, e) in all_extents(drv.as_ref()) {
            match runs.last_mut() {
                Some(last) if (last.2, last.3) == (e.data, e.zero) => last.1 += e.length,
                _ => runs.push((offset, e.length, e.data, e.zero)),
            }
        }
        assert_eq!(
            runs,
            vec![
                (0, 196608, true, false),
                (196608, 327680, false, true),
                (524288, 4096, true, false),
                (528384, 61440, true, true),
                (589824, 458752, false, true),
            ]
        );
    }

    #[test]
    fn explicit_backing_node_and_null_backing() {
        let dir = tempfile::tempdir().unwrap();
        let top = make_chain(dir.path());
        let mid_file = file_node(&dir.path().join("mid.qcow2"), true);
        // mid's own backing (base) comes from its header.
        let mid = try_open(
            &dir.path().join("mid.qcow2"),
            true,
            serde_json::json!({}),
            &[],
        )
        .unwrap();
        let mid = Arc::new(BlockNode::new("mid".into(), mid));
        let drv = try_open(
            &top,
            true,
            serde_json::json!({"backing": "mid"}),
            &[Arc::clone(&mid)],
        )
        .unwrap();
        assert_eq!(read(drv.as_ref(), 0, 2), [0x11, 0x11]);
        assert!(Arc::ptr_eq(&drv.children()[1], &mid));
        let e = drv.block_status(0, 65536).unwrap();
        assert_eq!((e.depth, e.data), (3, true));
        drop(mid_file);

        let alone = try_open(&top, true, serde_json::json!({"backing": null}), &[]).unwrap();
        assert_eq!(alone.children().len(), 1);
        assert_eq!(read(alone.as_ref(), 0, 4), [0; 4]);
        assert_eq!(read(alone.as_ref(), 131072, 2), [0x33, 0x33]);
        let e = alone.block_status(0, 1 << 20).unwrap();
        assert_eq!(
            e,
            Extent {
                length: 131072,
                data: false,
                zero: true,
                depth: 0
            }
        );

        let err = try_open(&top, true, serde_json::json!({"backing": "nope"}), &[])
            .err()
            .unwrap();
        assert_eq!(err, "Cannot find device='nope' nor node-name='nope'");
    }

    #[test]
    fn fills_read_buffers_only_when_its_backing_does() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().join("top.qcow2");
        create_qcow2(&top, None, &[]);
        for read_zeroes in [false, true] {
            let opts = serde_json::json!({
                "driver": "null-co",
                "size": 1 << 20,
                "read-zeroes": read_zeroes,
            });
            let opts = opts.as_object().unwrap();
            let ctx = OpenContext::from_options(opts, &no_nodes).unwrap();
            let null = super::super::open("null-co", opts, &ctx).unwrap();
            let base = Arc::new(BlockNode::new("base".into(), null));
            let drv =
                try_open(&top, true, serde_json::json!({"backing": "base"}), &[base]).unwrap();
            assert_eq!(drv.fills_read_buffers(), read_zeroes);
        }
        let alone = try_open(&top, true, serde_json::json!({}), &[]).unwrap();
        assert!(alone.fills_read_buffers());
    }

    #[test]
    fn writes_keep_image_consistent_and_equal_to_raw() {
        let dir = tempfile::tempdir().unwrap();
        let top = make_chain(dir.path());
        let raw = dir.path().join("ref.raw");
        let mut expected = raw_copy(&top, &raw);
        {
            let drv = open_qcow2(&top, false);
            // Unaligned writes into clusters that live in the backing layers (COW).
            let (a, b) = (vec![0x77u8; 5000], vec![0x78u8; 70000]);
            drv.write_vectored(4096 + 3, &[IoSlice::new(&a), IoSlice::new(&b)])
                .unwrap();
            expected[4099..4099 + 5000].copy_from_slice(&a);
            expected[9099..9099 + 70000].copy_from_slice(&b);
            // Into unallocated space and at the very end.
            drv.write_vectored(700_000, &[IoSlice::new(&[0x99; 1000])])
                .unwrap();
            expected[700_000..701_000].fill(0x99);
            drv.write_vectored((1 << 20) - 512, &[IoSlice::new(&[0x5a; 512])])
                .unwrap();
            expected[(1 << 20) - 512..].fill(0x5a);
            drv.flush().unwrap();
            assert_eq!(read(drv.as_ref(), 0, 1 << 20), expected);
            let e = drv.block_status(700_000, 1).unwrap();
            assert_eq!((e.depth, e.data), (1, true));
        }
        assert_image_equals(&top, &raw, &expected);
    }

    #[test]
    fn write_zeroes_and_discard() {
        let dir = tempfile::tempdir().unwrap();
        let top = make_chain(dir.path());
        let raw = dir.path().join("ref.raw");
        let mut expected = raw_copy(&top, &raw);
        {
            let drv = open_qcow2(&top, false);
            // Whole clusters over backing data: zero clusters, local.
            drv.write_zeroes(0, 65536, ZeroFlags::default()).unwrap();
            expected[..65536].fill(0);
            let e = drv.block_status(0, 65536).unwrap();
            assert_eq!(
                e,
                Extent {
                    length: 65536,
                    data: false,
                    zero: true,
                    depth: 1
                }
            );
            // Unaligned: head and tail are written as data.
            drv.write_zeroes(65536 + 100, 3000, ZeroFlags::default())
                .unwrap();
            expected[65636..68636].fill(0);
            let fast = ZeroFlags {
                may_unmap: true,
                fast_only: true,
            };
            let err = drv.write_zeroes(100, 10, fast).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ENOTSUP));
            drv.write_zeroes(131072, 65536, fast).unwrap();
            expected[131072..196608].fill(0);
            // Discard on a node with discard=unmap: backing data must not reappear.
            drv.discard(512 * 1024, 65536).unwrap();
            expected[512 * 1024..576 * 1024].fill(0);
            assert_eq!(read(drv.as_ref(), 0, 1 << 20), expected);
        }
        assert_image_equals(&top, &raw, &expected);
    }

    #[test]
    fn read_only_node_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let top = make_chain(dir.path());
        let drv = open_qcow2(&top, true);
        let err = drv.write_vectored(0, &[IoSlice::new(&[1])]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        assert!(drv.write_zeroes(0, 512, ZeroFlags::default()).is_err());
        assert!(drv.resize(2 << 20).is_err());
    }

    #[test]
    fn resize_grow_and_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("r.qcow2");
        create_qcow2(&img, None, &[]);
        {
            let drv = open_qcow2(&img, false);
            drv.resize(3 << 20).unwrap();
            assert_eq!(drv.size(), 3 << 20);
            drv.write_vectored((2 << 20) + 5, &[IoSlice::new(&[0x42; 100])])
                .unwrap();
            assert_eq!(read(drv.as_ref(), (2 << 20) + 5, 100), [0x42; 100]);
        }
        let info = run(
            "qemu-img",
            &["info", "--output=json", img.to_str().unwrap()],
        );
        let info: Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["virtual-size"], 3 << 20);
        run("qemu-img", &["check", "-q", img.to_str().unwrap()]);
        {
            let drv = open_qcow2(&img, false);
            drv.resize(1 << 20).unwrap();
            assert_eq!(drv.size(), 1 << 20);
        }
        run("qemu-img", &["check", "-q", img.to_str().unwrap()]);
    }

    #[test]
    fn a_size_between_sectors_rounds_down_as_in_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.qcow2");
        create_qcow2(&img, None, &[]);
        // The virtual size field of the header.
        patch(&img, 24, &1000u64.to_be_bytes());
        assert_eq!(open_qcow2(&img, true).size(), 512);
    }

    fn patch(path: &Path, offset: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, offset).unwrap();
    }

    fn open_error(path: &Path, read_only: bool) -> String {
        try_open(path, read_only, serde_json::json!({}), &[])
            .err()
            .expect("open should fail")
    }

    #[test]
    fn refuses_features_it_cannot_handle() {
        let dir = tempfile::tempdir().unwrap();
        let zstd = dir.path().join("zstd.qcow2");
        create_qcow2(&zstd, None, &["-o", "compression_type=zstd"]);
        assert!(
            open_error(&zstd, true).contains("compression type zstd"),
            "{}",
            open_error(&zstd, true)
        );

        let ext = dir.path().join("ext.qcow2");
        create_qcow2(&ext, None, &["-o", "extended_l2=on"]);
        assert!(open_error(&ext, false).contains("extended_l2"));

        let dirty = dir.path().join("dirty.qcow2");
        create_qcow2(&dirty, None, &["-o", "lazy_refcounts=on"]);
        patch(&dirty, 79, &[1]); // incompatible_features, bit 0
        assert!(open_error(&dirty, false).contains("dirty bit"));

        let corrupt = dir.path().join("corrupt.qcow2");
        create_qcow2(&corrupt, None, &[]);
        patch(&corrupt, 79, &[2]);
        assert!(open_error(&corrupt, true).contains("marked corrupt"));

        let crypt = dir.path().join("crypt.qcow2");
        create_qcow2(&crypt, None, &[]);
        patch(&crypt, 35, &[2]);
        assert!(open_error(&crypt, true).contains("encryption"));
    }

    fn node(path: &Path, read_only: bool) -> BlockNode {
        BlockNode::new("n0".into(), open_qcow2(path, read_only))
    }

    /// `qemu-img info`'s bitmaps: (name, granularity, flags).
    fn qemu_bitmaps(image: &Path) -> Vec<(String, u64, Vec<String>)> {
        let info = run(
            "qemu-img",
            &["info", "--output=json", image.to_str().unwrap()],
        );
        let info: Value = serde_json::from_str(&info).unwrap();
        let Some(list) = info["format-specific"]["data"]["bitmaps"].as_array() else {
            return Vec::new();
        };
        list.iter()
            .map(|b| {
                let flags = b["flags"].as_array().unwrap();
                (
                    b["name"].as_str().unwrap().to_string(),
                    b["granularity"].as_u64().unwrap(),
                    flags
                        .iter()
                        .map(|f| f.as_str().unwrap().to_string())
                        .collect(),
                )
            })
            .collect()
    }

    /// QEMU's view of a bitmap's bits: `nbdinfo --map` over qemu-nbd, as
    /// (offset, length, dirty) runs. qemu-nbd is writable unless the bitmap
    /// is disabled, so an enabled bitmap is rewritten by QEMU on exit.
    fn qemu_bitmap_map(image: &Path, bitmap: &str, writable: bool) -> Vec<(u64, u64, bool)> {
        let sock = image.with_extension(format!("{bitmap}.sock"));
        // qemu-nbd writes its pid file once it listens (the socket file comes
        // at bind(), before listen()); a probe connection would be the one
        // client it serves before exiting.
        let pidfile = image.with_extension(format!("{bitmap}.pid"));
        let _ = std::fs::remove_file(&pidfile);
        let pidfile_arg = format!("--pid-file={}", pidfile.display());
        let mut args = vec![
            "-f",
            "qcow2",
            "-k",
            sock.to_str().unwrap(),
            "-B",
            bitmap,
            &pidfile_arg,
        ];
        if !writable {
            args.push("-r");
        }
        args.push(image.to_str().unwrap());
        let mut server = Command::new("qemu-nbd").args(&args).spawn().unwrap();
        // Up to 30 s: a loaded machine is slow.
        for _ in 0..600 {
            if pidfile.exists() || matches!(server.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let map = run(
            "nbdinfo",
            &[&format!("--map=qemu:dirty-bitmap:{bitmap}"), "--json", &uri],
        );
        assert!(server.wait().unwrap().success());
        let map: Vec<Value> = serde_json::from_str(&map).unwrap();
        map.iter()
            .map(|e| {
                (
                    e["offset"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["type"].as_u64().unwrap() & 1 == 1,
                )
            })
            .collect()
    }

    /// Our runs of bitmap `name`, in `qemu_bitmap_map`'s form.
    fn our_bitmap_map(node: &BlockNode, name: &str) -> Vec<(u64, u64, bool)> {
        let size = node.driver().size();
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut offset = 0;
        while offset < size {
            let (len, dirty) = node.bitmap_extent(name, offset, size - offset).unwrap();
            match runs.last_mut() {
                Some(last) if last.2 == dirty => last.1 += len,
                _ => runs.push((offset, len, dirty)),
            }
            offset += len;
        }
        runs
    }

    fn bitmap_info(node: &BlockNode, name: &str) -> Value {
        node.bitmaps_info()
            .into_iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no bitmap {name}"))
    }

    #[test]
    fn loads_the_bitmaps_qemu_stored() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("bm.qcow2");
        create_qcow2(&img, None, &[]);
        let name = img.to_str().unwrap();
        run("qemu-img", &["bitmap", "--add", name, "b0"]);
        run("qemu-img", &["bitmap", "--add", "-g", "4096", name, "b1"]);
        // QEMU records these writes in both enabled bitmaps.
        qemu_io(&img, &["write 65536 4096", "write -z 1040384 8192"]);
        run("qemu-img", &["bitmap", "--disable", name, "b1"]);
        run(
            "qemu-img",
            &["bitmap", "--add", "-g", "512", "--disable", name, "b2"],
        );
        let header_before = std::fs::read(&img).unwrap()[..4096].to_vec();
        {
            let n = node(&img, true);
            let b0 = bitmap_info(&n, "b0");
            assert_eq!(
                (
                    &b0["recording"],
                    &b0["persistent"],
                    &b0["granularity"],
                    &b0["count"]
                ),
                (
                    &Value::Bool(true),
                    &Value::Bool(true),
                    &Value::from(65536),
                    &Value::from(131072)
                )
            );
            let b1 = bitmap_info(&n, "b1");
            assert_eq!(
                (&b1["recording"], &b1["count"]),
                (&Value::Bool(false), &Value::from(12288))
            );
            assert_eq!(bitmap_info(&n, "b2")["count"], 0);
            assert_eq!(our_bitmap_map(&n, "b1"), qemu_bitmap_map(&img, "b1", false));
        }
        // A read-only open leaves the image alone.
        assert_eq!(std::fs::read(&img).unwrap()[..4096], header_before[..]);
        run("qemu-img", &["check", "-q", name]);
    }

    #[test]
    fn stores_bitmaps_that_qemu_reads() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("st.qcow2");
        create_qcow2(&img, None, &[]);
        let name = img.to_str().unwrap();
        // An existing bitmap of QEMU's, kept and recorded into.
        run("qemu-img", &["bitmap", "--add", name, "old"]);
        let expected = {
            let n = node(&img, false);
            let size = n.driver().size();
            let mut b0 = DirtyBitmap::new("b0", 65536, size);
            b0.persistent = true;
            n.add_bitmap(b0);
            let mut b1 = DirtyBitmap::new("b1", 512, size);
            b1.persistent = true;
            n.add_bitmap(b1);
            n.add_bitmap(DirtyBitmap::new("transient", 65536, size));
            n.write_vectored(3 * 65536 + 10, &[IoSlice::new(&[7; 70000])])
                .unwrap();
            n.with_bitmap("b1", |b| {
                b.recording = false;
                Ok(())
            })
            .unwrap();
            n.write_zeroes(size - 512, 512, ZeroFlags::default())
                .unwrap();
            (
                our_bitmap_map(&n, "b0"),
                our_bitmap_map(&n, "b1"),
                our_bitmap_map(&n, "old"),
            )
        };
        assert_eq!(
            qemu_bitmaps(&img),
            vec![
                ("old".to_string(), 65536, vec!["auto".to_string()]),
                ("b0".to_string(), 65536, vec!["auto".to_string()]),
                ("b1".to_string(), 512, vec![]),
            ]
        );
        run("qemu-img", &["check", "-q", name]);
        assert_eq!(qemu_bitmap_map(&img, "b1", false), expected.1);
        assert_eq!(expected.1[1], (3 * 65536 + 10 - 10, 70144, true));
        // Enabled bitmaps go through a writable qemu-nbd, which stores them again.
        assert_eq!(qemu_bitmap_map(&img, "b0", true), expected.0);
        assert_eq!(qemu_bitmap_map(&img, "old", true), expected.2);
        run("qemu-img", &["check", "-q", name]);
        // And blkd reads back what QEMU rewrote.
        let n = node(&img, true);
        assert_eq!(our_bitmap_map(&n, "b0"), expected.0);
        assert_eq!(our_bitmap_map(&n, "b1"), expected.1);
        assert!(n.bitmap("transient").is_none());
    }

    #[test]
    fn removed_bitmaps_leave_the_image_and_free_their_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("rm.qcow2");
        create_qcow2(&img, None, &[]);
        let name = img.to_str().unwrap();
        run("qemu-img", &["bitmap", "--add", name, "b0"]);
        run("qemu-img", &["bitmap", "--add", name, "b1"]);
        qemu_io(&img, &["write 0 1M"]);
        {
            let n = node(&img, false);
            n.remove_bitmap("b0");
        }
        assert_eq!(
            qemu_bitmaps(&img),
            vec![("b1".to_string(), 65536, vec!["auto".to_string()])]
        );
        run("qemu-img", &["check", "-q", name]);
        {
            let n = node(&img, false);
            n.remove_bitmap("b1");
        }
        assert!(qemu_bitmaps(&img).is_empty());
        run("qemu-img", &["check", "-q", name]);
        let header = std::fs::read(&img).unwrap();
        assert_eq!(header[88..96], [0; 8], "autoclear bit cleared");
    }

    #[test]
    fn many_bitmaps_grow_the_refcount_blocks() {
        let dir = tempfile::tempdir().unwrap();
        for (refcount_bits, count) in [("16", 200), ("4", 600), ("64", 150)] {
            let img = dir.path().join(format!("many{refcount_bits}.qcow2"));
            let opts = format!("cluster_size=512,refcount_bits={refcount_bits}");
            create_qcow2(&img, None, &["-o", &opts]);
            {
                let n = node(&img, false);
                let size = n.driver().size();
                for i in 0..count {
                    let mut bm = DirtyBitmap::new(&format!("bitmap{i}"), 512, size);
                    bm.persistent = true;
                    bm.mark(i * 512, 512);
                    n.add_bitmap(bm);
                }
            }
            run("qemu-img", &["check", "-q", img.to_str().unwrap()]);
            let stored = qemu_bitmaps(&img);
            assert_eq!(
                stored.len(),
                count as usize,
                "refcount_bits {refcount_bits}"
            );
            let n = node(&img, true);
            for i in [0, count / 2, count - 1] {
                let bm = n.bitmap(&format!("bitmap{i}")).unwrap();
                assert_eq!(bm.dirty_bytes(n.driver().size()), 512);
                assert_eq!(bm.extent(i * 512, 512), (512, true));
            }
        }
    }

    /// Sets flag bits of the first bitmap directory entry.
    fn set_first_bitmap_flags(img: &Path, flags: u8) {
        let bytes = std::fs::read(img).unwrap();
        let at = bytes
            .windows(4)
            .position(|w| w == 0x2385_2875u32.to_be_bytes())
            .unwrap();
        let dir_offset = u64::from_be_bytes(bytes[at + 24..at + 32].try_into().unwrap());
        patch(
            img,
            dir_offset + 15,
            &[bytes[dir_offset as usize + 15] | flags],
        );
    }

    #[test]
    fn inconsistent_bitmaps_are_refused_writable_and_skipped_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("inuse.qcow2");
        create_qcow2(&img, None, &[]);
        let name = img.to_str().unwrap();
        run("qemu-img", &["bitmap", "--add", name, "b0"]);
        run("qemu-img", &["bitmap", "--add", name, "b1"]);
        set_first_bitmap_flags(&img, 1);
        let err = open_error(&img, false);
        assert!(err.contains("bitmap 'b0' is inconsistent"), "{err}");
        let n = node(&img, true);
        assert!(n.bitmap("b0").is_none());
        assert!(n.bitmap("b1").is_some());
        drop(n);

        // Bitmaps a program without bitmap support left behind (autoclear clear).
        let stale = dir.path().join("stale.qcow2");
        create_qcow2(&stale, None, &[]);
        run(
            "qemu-img",
            &["bitmap", "--add", stale.to_str().unwrap(), "b0"],
        );
        patch(&stale, 95, &[0]);
        let err = open_error(&stale, false);
        assert!(err.contains("qemu-img check -r all"), "{err}");
        assert!(node(&stale, true).bitmap("b0").is_none());

        // Damage in the bitmap structures is an error, not a panic.
        let bad = dir.path().join("bad.qcow2");
        create_qcow2(&bad, None, &[]);
        run(
            "qemu-img",
            &["bitmap", "--add", bad.to_str().unwrap(), "b0"],
        );
        set_first_bitmap_flags(&bad, 0x80);
        let err = open_error(&bad, true);
        assert!(err.contains("reserved flags"), "{err}");

        // A bitmap table that claims the L1 table: freeing it would overwrite it.
        let overlap = dir.path().join("overlap.qcow2");
        create_qcow2(&overlap, None, &[]);
        run(
            "qemu-img",
            &["bitmap", "--add", overlap.to_str().unwrap(), "b0"],
        );
        let bytes = std::fs::read(&overlap).unwrap();
        let at = bytes
            .windows(4)
            .position(|w| w == 0x2385_2875u32.to_be_bytes())
            .unwrap();
        let dir_offset = u64::from_be_bytes(bytes[at + 24..at + 32].try_into().unwrap());
        patch(&overlap, dir_offset, &bytes[40..48]);
        let err = open_error(&overlap, false);
        assert!(err.contains("also holds other metadata"), "{err}");
    }

    #[test]
    fn persistent_bitmaps_need_qcow2_v3_and_a_writable_node() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = dir.path().join("v2.qcow2");
        create_qcow2(&v2, None, &["-o", "compat=0.10"]);
        let drv = open_qcow2(&v2, false);
        assert!(drv.stores_bitmaps());
        assert_eq!(
            drv.check_new_persistent_bitmap("b0", 65536).unwrap_err(),
            "Cannot store dirty bitmaps in qcow2 v2 files"
        );
        let v3 = dir.path().join("v3.qcow2");
        create_qcow2(&v3, None, &[]);
        assert!(open_qcow2(&v3, true)
            .check_new_persistent_bitmap("b0", 65536)
            .is_err());
        open_qcow2(&v3, false)
            .check_new_persistent_bitmap("b0", 65536)
            .unwrap();
    }

    #[test]
    fn corrupt_images_give_errors() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("c.qcow2");
        create_qcow2(&base, None, &[]);
        qemu_io(&base, &["write -P 0x11 0 64k"]);
        let image = std::fs::read(&base).unwrap();
        let l1_offset = u64::from_be_bytes(image[40..48].try_into().unwrap());

        let short = dir.path().join("short.qcow2");
        std::fs::write(&short, &image[..50]).unwrap();
        let err = open_error(&short, true);
        assert!(err.contains("not a valid qcow2 image"), "{err}");

        let no_tables = dir.path().join("notables.qcow2");
        std::fs::write(&no_tables, &image[..65536]).unwrap();
        let err = open_error(&no_tables, true);
        assert!(err.contains("outside the file"), "{err}");

        let bad_l2 = dir.path().join("badl2.qcow2");
        std::fs::write(&bad_l2, &image).unwrap();
        patch(
            &bad_l2,
            l1_offset,
            &(0x8000_0000_0100_0000u64).to_be_bytes(),
        );
        let err = open_error(&bad_l2, false);
        assert!(
            err.contains("L1 table entry 0 points to offset 16777216"),
            "{err}"
        );

        let bad_magic = dir.path().join("magic.qcow2");
        std::fs::write(&bad_magic, &image).unwrap();
        patch(&bad_magic, 0, b"QFI\0");
        assert!(open_error(&bad_magic, true).contains("bad magic"));

        let bad_cluster = dir.path().join("cluster.qcow2");
        std::fs::write(&bad_cluster, &image).unwrap();
        patch(&bad_cluster, 20, &40u32.to_be_bytes());
        assert!(open_error(&bad_cluster, true).contains("cluster_bits 40"));
    }

    #[test]
    fn backing_loop_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
        create_qcow2(&a, None, &[]);
        create_qcow2(&b, Some("a.qcow2"), &[]);
        run(
            "qemu-img",
            &[
                "rebase",
                "-u",
                "-F",
                "qcow2",
                "-b",
                "b.qcow2",
                a.to_str().unwrap(),
            ],
        );
        let err = open_error(&b, true);
        assert!(err.contains("Backing file chain loop"), "{err}");
    }

    #[test]
    fn writable_open_needs_a_writable_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("w.qcow2");
        create_qcow2(&img, None, &[]);
        let file = file_node(&img, true);
        let opts = serde_json::json!({"driver": "qcow2", "file": file.name()});
        let opts = opts.as_object().unwrap();
        let lookup = |_: &str| Some(Arc::clone(&file));
        let ctx = OpenContext::from_options(opts, &lookup).unwrap();
        let err = open(opts, &ctx).err().unwrap();
        assert!(err.contains("is read-only"), "{err}");
    }

    #[test]
    fn create_makes_images_qemu_img_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("cb.qcow2");
        let top = dir.path().join("ct.qcow2");
        create(&base, 2 << 20, None).unwrap();
        create(&top, 2 << 20, Some("cb.qcow2")).unwrap();
        run("qemu-img", &["check", "-q", top.to_str().unwrap()]);
        let info = run(
            "qemu-img",
            &["info", "--output=json", top.to_str().unwrap()],
        );
        let info: Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["virtual-size"], 2 << 20);
        assert_eq!(info["backing-filename"], "cb.qcow2");
        assert_eq!(info["backing-filename-format"], "qcow2");
        qemu_io(&base, &["write -P 0x61 0 4k"]);
        let drv = open_qcow2(&top, true);
        assert_eq!(read(drv.as_ref(), 0, 2), [0x61, 0x61]);
        assert_eq!(drv.block_status(0, 4096).unwrap().depth, 2);
    }

    #[test]
    fn data_cluster_past_end_of_file_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("far.qcow2");
        create_qcow2(&img, None, &[]);
        qemu_io(&img, &["write -P 0x11 0 64k"]);
        let bytes = std::fs::read(&img).unwrap();
        let l1_offset = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
        let l2_offset = u64::from_be_bytes(bytes[l1_offset..l1_offset + 8].try_into().unwrap())
            & TABLE_OFFSET_MASK;
        // Guest cluster 0 now claims to live at 1 TiB (COPIED, so writable in place).
        patch(&img, l2_offset, &(0x8000_0100_0000_0000u64).to_be_bytes());
        let size_before = std::fs::metadata(&img).unwrap().len();
        {
            let drv = open_qcow2(&img, false);
            let err = drv
                .write_vectored(100, &[IoSlice::new(&[1; 10])])
                .unwrap_err();
            assert!(
                err.to_string().contains("maps past the end of the file"),
                "{err}"
            );
            assert!(drv.write_zeroes(0, 100, ZeroFlags::default()).is_err());
            assert!(drv.discard(0, 65536).is_err());
            // Other clusters still work.
            drv.write_vectored(65536, &[IoSlice::new(&[2; 10])])
                .unwrap();
        }
        assert!(std::fs::metadata(&img).unwrap().len() < size_before + (1 << 20));
    }

    /// Random byte damage to the metadata clusters: every open either fails
    /// or serves requests (successfully or with errors) without a panic or
    /// a write far past the image.
    #[test]
    fn damaged_metadata_never_panics_or_writes_past_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let top = make_chain(dir.path());
        let pristine = std::fs::read(&top).unwrap();
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..600 {
            let mut image = pristine.clone();
            for _ in 0..1 + random() % 8 {
                // Clusters 0-4 hold the header, refcounts, L1 and L2 tables.
                let at = (random() % (5 * 65536)) as usize % image.len();
                image[at] = random() as u8;
            }
            // A new file each round: a child that another test forks may
            // still hold the previous file's lock for a moment.
            let damaged = dir.path().join(format!("damaged{round}.qcow2"));
            std::fs::write(&damaged, &image).unwrap();
            let read_only = round % 3 == 0;
            let outcome = std::panic::catch_unwind(|| {
                let Ok(drv) = try_open(&damaged, read_only, serde_json::json!({}), &[]) else {
                    return;
                };
                let size = drv.size().min(16 << 20);
                for offset in (0..size).step_by(65536) {
                    let _ = drv.block_status(offset, 65536);
                    let mut buf = vec![0u8; 4096];
                    let _ = drv.read_vectored(offset, &mut [IoSliceMut::new(&mut buf)]);
                    if !read_only {
                        let _ = drv.write_vectored(offset + 100, &[IoSlice::new(&[1; 5000])]);
                    }
                }
                if !read_only {
                    let _ = drv.write_zeroes(0, 2 * 65536, ZeroFlags::default());
                    let _ = drv.discard(65536, 3 * 65536);
                }
            });
            assert!(outcome.is_ok(), "panic in round {round}");
            let len = std::fs::metadata(&damaged).unwrap().len();
            assert!(len < 64 << 20, "round {round}: image grew to {len}");
            std::fs::remove_file(&damaged).unwrap();
        }
    }

    #[test]
    fn short_backing_layer_counts_as_allocated_past_its_end() {
        // What qemu-nbd -A reports for this chain (qemu-img map differs:
        // it calls the tail absent).
        let dir = tempfile::tempdir().unwrap();
        let (base, top) = (dir.path().join("sb.qcow2"), dir.path().join("st.qcow2"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                base.to_str().unwrap(),
                "512k",
            ],
        );
        qemu_io(&base, &["write -P 1 0 64k"]);
        let top_name = top.to_str().unwrap();
        run(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", "sb.qcow2", "-F", "qcow2", top_name, "1M",
            ],
        );
        let drv = open_qcow2(&top, true);
        let extents: Vec<(u64, u64, u32, bool)> = all_extents(drv.as_ref())
            .into_iter()
            .map(|(offset, e)| (offset, e.length, e.depth, e.data))
            .collect();
        assert_eq!(
            extents,
            vec![
                (0, 65536, 2, true),
                (65536, 458752, 0, false),
                (524288, 524288, 2, false)
            ]
        );
        assert_eq!(read(drv.as_ref(), 524288 - 2, 4), [0; 4]);
    }

    #[test]
    fn growing_over_a_longer_backing_reads_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let (base, top) = (dir.path().join("lb.qcow2"), dir.path().join("lt.qcow2"));
        create_qcow2(&base, None, &[]);
        qemu_io(&base, &["write -P 0x66 0 1M"]);
        let top_name = top.to_str().unwrap();
        run(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", "lb.qcow2", "-F", "qcow2", top_name, "512k",
            ],
        );
        {
            let drv = open_qcow2(&top, false);
            assert_eq!(read(drv.as_ref(), 0, 2), [0x66, 0x66]);
            drv.resize(2 << 20).unwrap();
            assert_eq!(read(drv.as_ref(), 512 * 1024 - 1, 2), [0x66, 0]);
            assert_eq!(read(drv.as_ref(), 1 << 20, 2), [0, 0]);
            let e = drv.block_status(512 * 1024, 1 << 20).unwrap();
            assert_eq!((e.depth, e.zero, e.data), (1, true, false));
        }
        run("qemu-img", &["check", "-q", top_name]);
        assert!(
            create(&top, 1 << 20, None).is_err(),
            "create must not overwrite"
        );
    }
}
