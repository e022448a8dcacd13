//! QEMU's persistent dirty bitmaps in qcow2 images: the bitmaps header
//! extension, its bitmap directory, bitmap tables and data clusters
//! (docs/interop/qcow2.rst, "Bitmaps").
//!
//! imago knows nothing of bitmaps: it clears the autoclear bits on a writable
//! open, which tells QEMU that the bitmaps are stale. So the bitmaps are read
//! before imago opens the image, and written back after imago has closed it,
//! with our own cluster allocation on the refcount structures, and the
//! autoclear bit set again.

use std::collections::{BTreeMap, HashSet};
use std::io::{IoSlice, IoSliceMut};

use super::bitmap::DirtyBitmap;
use super::BlockNode;

pub(super) const BITMAPS_EXTENSION: u32 = 0x2385_2875;
const QCOW2_MAGIC: u32 = 0x5146_49fb;
const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
const FLAG_IN_USE: u32 = 1 << 0;
const FLAG_AUTO: u32 = 1 << 1;
const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const TYPE_DIRTY_TRACKING: u8 = 1;
// QEMU's limits, so that QEMU can read what we write.
const MIN_GRANULARITY_BITS: u32 = 9;
const MAX_GRANULARITY_BITS: u32 = 31;
const MAX_NAME_BYTES: usize = 1023;
const MAX_BITMAPS: usize = 65535;
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
const MAX_DATA_BYTES: u64 = 0x2000_0000;
/// Host offset bits of bitmap table and refcount table entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry bit 0: an unallocated cluster reads as all ones.
const ENTRY_ALL_ONES: u64 = 1;
const DIRECTORY_ENTRY_HEADER: usize = 24;

fn be16(buf: &[u8], at: usize) -> Option<u16> {
    buf.get(at..at + 2)?.try_into().ok().map(u16::from_be_bytes)
}

pub(super) fn be32(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at + 4)?.try_into().ok().map(u32::from_be_bytes)
}

pub(super) fn be64(buf: &[u8], at: usize) -> Option<u64> {
    buf.get(at..at + 8)?.try_into().ok().map(u64::from_be_bytes)
}

fn put64(buf: &mut [u8], at: usize, value: u64) {
    if let Some(b) = buf.get_mut(at..at + 8) {
        b.copy_from_slice(&value.to_be_bytes());
    }
}

fn read(file: &BlockNode, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let len = usize::try_from(len).map_err(|_| format!("read of {len} bytes is too large"))?;
    let mut buf = vec![0u8; len];
    file.driver()
        .read_vectored(offset, &mut [IoSliceMut::new(&mut buf)])
        .map_err(|e| format!("could not read {len} bytes at offset {offset}: {e}"))?;
    Ok(buf)
}

fn write(file: &BlockNode, offset: u64, data: &[u8]) -> Result<(), String> {
    file.driver()
        .write_vectored(offset, &[IoSlice::new(data)])
        .map_err(|e| {
            format!(
                "could not write {} bytes at offset {offset}: {e}",
                data.len()
            )
        })
}

/// Bytes of bitmap data for a disk of `disk_size` bytes.
fn data_bytes(disk_size: u64, granularity: u64) -> u64 {
    disk_size.div_ceil(granularity).div_ceil(8)
}

/// The first cluster of the image: the header fields we need, the header
/// extensions and the backing file name, to rewrite them.
struct Header {
    raw: Vec<u8>,
    version: u32,
    cluster_size: u64,
    disk_size: u64,
    refcount_order: u32,
    refcount_table_offset: u64,
    refcount_table_clusters: u64,
    autoclear: u64,
    /// End of the fixed header, where the extensions start.
    header_length: usize,
    extensions: Vec<(u32, Vec<u8>)>,
    backing_name: Vec<u8>,
}

impl Header {
    fn read(file: &BlockNode) -> Result<Header, String> {
        let invalid = |cause: &str| format!("invalid qcow2 header: {cause}");
        let head = read(file, 0, 104)?;
        let field32 = |at| be32(&head, at).ok_or_else(|| invalid("truncated"));
        let field64 = |at| be64(&head, at).ok_or_else(|| invalid("truncated"));
        if field32(0)? != QCOW2_MAGIC {
            return Err(invalid("bad magic"));
        }
        let version = field32(4)?;
        let cluster_bits = field32(20)?;
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid("cluster_bits out of range"));
        }
        let cluster_size = 1u64 << cluster_bits;
        let (header_length, refcount_order, autoclear) = match version {
            2 => (72, 4, 0),
            _ => (field32(100)? as usize, field32(96)?, field64(88)?),
        };
        if refcount_order > 6 {
            return Err(invalid("refcount_order out of range"));
        }
        if header_length < 72 || header_length as u64 > cluster_size || header_length % 8 != 0 {
            return Err(invalid("bad header_length"));
        }
        let raw = read(file, 0, cluster_size)?;
        let mut extensions = Vec::new();
        if version >= 3 {
            let mut at = header_length;
            loop {
                let (Some(kind), Some(len)) = (be32(&raw, at), be32(&raw, at + 4)) else {
                    return Err(invalid("header extensions run past the first cluster"));
                };
                if kind == 0 {
                    break;
                }
                let len = len as usize;
                let data = raw
                    .get(at + 8..at + 8 + len)
                    .ok_or_else(|| invalid("header extensions run past the first cluster"))?;
                extensions.push((kind, data.to_vec()));
                at += 8 + len.next_multiple_of(8);
            }
        }
        let backing_offset = field64(8)? as usize;
        let backing_len = field32(16)? as usize;
        let backing_name = if backing_offset == 0 {
            Vec::new()
        } else {
            raw.get(backing_offset..backing_offset + backing_len)
                .ok_or_else(|| invalid("backing file name outside the first cluster"))?
                .to_vec()
        };
        Ok(Header {
            version,
            cluster_size,
            disk_size: field64(24)?,
            refcount_order,
            refcount_table_offset: field64(48)?,
            refcount_table_clusters: u64::from(field32(56)?),
            autoclear,
            header_length,
            extensions,
            backing_name,
            raw,
        })
    }

    /// nb_bitmaps, bitmap_directory_size, bitmap_directory_offset.
    fn bitmaps_extension(&self) -> Result<Option<(u32, u64, u64)>, String> {
        let Some((_, data)) = self
            .extensions
            .iter()
            .find(|(kind, _)| *kind == BITMAPS_EXTENSION)
        else {
            return Ok(None);
        };
        match (be32(data, 0), be64(data, 8), be64(data, 16)) {
            (Some(count), Some(size), Some(offset)) => Ok(Some((count, size, offset))),
            _ => Err("the bitmaps header extension is too short".into()),
        }
    }

    /// Writes the first cluster again with `bitmaps` as the bitmaps extension
    /// (none: the extension goes) and the autoclear bit to match.
    fn write(&self, file: &BlockNode, bitmaps: Option<[u8; 24]>) -> Result<(), String> {
        let mut out = self
            .raw
            .get(..self.header_length)
            .unwrap_or_default()
            .to_vec();
        let autoclear = match bitmaps {
            Some(_) => self.autoclear | AUTOCLEAR_BITMAPS,
            None => self.autoclear & !AUTOCLEAR_BITMAPS,
        };
        put64(&mut out, 88, autoclear);
        let mut extensions: Vec<(u32, &[u8])> = Vec::new();
        let mut placed = false;
        for (kind, data) in &self.extensions {
            if *kind == BITMAPS_EXTENSION {
                if let (Some(new), false) = (&bitmaps, placed) {
                    extensions.push((BITMAPS_EXTENSION, new));
                    placed = true;
                }
            } else {
                extensions.push((*kind, data));
            }
        }
        if let (Some(new), false) = (&bitmaps, placed) {
            extensions.push((BITMAPS_EXTENSION, new));
        }
        for (kind, data) in extensions {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out.extend_from_slice(&[0; 8]);
        if !self.backing_name.is_empty() {
            let backing_offset = out.len() as u64;
            put64(&mut out, 8, backing_offset);
            out.extend_from_slice(&self.backing_name);
        }
        if out.len() as u64 > self.cluster_size {
            return Err("the header extensions do not fit in the first cluster".into());
        }
        out.resize(self.cluster_size as usize, 0);
        write(file, 0, &out)
    }
}

/// The persistent bitmaps of an image, as loaded at open.
#[derive(Default)]
pub(super) struct ImageBitmaps {
    pub bitmaps: Vec<DirtyBitmap>,
    /// Every cluster the bitmaps extension takes (directory, tables, data),
    /// freed when the extension is rewritten.
    pub clusters: Vec<u64>,
    /// The image has a bitmaps extension.
    pub present: bool,
}

/// Reads the persistent bitmaps of the image on `file`. A writable open
/// fails on bitmaps that could not be stored back faithfully (QEMU's
/// "inconsistent" ones and those with extra data); a read-only open skips
/// them with a warning.
pub(super) fn load(file: &BlockNode, what: &str, writable: bool) -> Result<ImageBitmaps, String> {
    let header = Header::read(file).map_err(|e| format!("Image '{what}': {e}"))?;
    let Some((count, dir_size, dir_offset)) = header
        .bitmaps_extension()
        .map_err(|e| format!("Image '{what}': {e}"))?
    else {
        return Ok(ImageBitmaps::default());
    };
    if header.autoclear & AUTOCLEAR_BITMAPS == 0 {
        // What a program without bitmap support leaves: QEMU drops them.
        if writable {
            return Err(format!(
                "Image '{what}' has persistent dirty bitmaps that a program without bitmap support \
                 made inconsistent; repair it with 'qemu-img check -r all' first"
            ));
        }
        log::warn!("Image '{what}': its persistent dirty bitmaps are inconsistent, ignoring them");
        return Ok(ImageBitmaps::default());
    }
    let mut reader = Reader {
        file,
        cluster_size: header.cluster_size,
        file_size: file.driver().size(),
        disk_size: header.disk_size,
        loaded: ImageBitmaps {
            present: true,
            ..ImageBitmaps::default()
        },
    };
    reader
        .read_directory(count, dir_size, dir_offset, writable)
        .and_then(|()| check_overlaps(file, &header, &reader.loaded.clusters))
        .map_err(|e| format!("Image '{what}' has invalid persistent dirty bitmaps: {e}"))?;
    Ok(reader.loaded)
}

/// Refuses bitmap clusters that are claimed twice or that hold the header,
/// the refcount structures or the L1/L2 tables: freeing and reusing them at
/// close would overwrite that metadata.
fn check_overlaps(file: &BlockNode, header: &Header, claimed: &[u64]) -> Result<(), String> {
    let cluster = |offset: u64| offset / header.cluster_size;
    let mut seen = HashSet::new();
    for &offset in claimed {
        if !seen.insert(cluster(offset)) {
            return Err(format!("the cluster at offset {offset} is used twice"));
        }
    }
    let field32 = |at| be32(&header.raw, at).map(u64::from).unwrap_or(0);
    let field64 = |at| be64(&header.raw, at).unwrap_or(0);
    let mut metadata = vec![0u64];
    let table_clusters = |offset: u64, bytes: u64| {
        (0..bytes.div_ceil(header.cluster_size)).map(move |i| cluster(offset) + i)
    };
    let refcount_bytes = header.refcount_table_clusters * header.cluster_size;
    let (l1_offset, l1_bytes) = (field64(40), field32(36) * 8);
    metadata.extend(table_clusters(header.refcount_table_offset, refcount_bytes));
    metadata.extend(table_clusters(l1_offset, l1_bytes));
    for (table, bytes) in [
        (header.refcount_table_offset, refcount_bytes),
        (l1_offset, l1_bytes),
    ] {
        if bytes > 32 << 20 {
            return Err("the L1 or refcount table is too large".into());
        }
        let entries = read(file, table, bytes)?;
        metadata.extend(
            entries
                .chunks_exact(8)
                .map(|e| be64(e, 0).unwrap_or(0) & OFFSET_MASK)
                .filter(|&offset| offset != 0)
                .map(cluster),
        );
    }
    match metadata.iter().find(|c| seen.contains(c)) {
        Some(c) => Err(format!(
            "the cluster at offset {} also holds other metadata",
            c * header.cluster_size
        )),
        None => Ok(()),
    }
}

struct Reader<'a> {
    file: &'a BlockNode,
    cluster_size: u64,
    file_size: u64,
    disk_size: u64,
    loaded: ImageBitmaps,
}

impl Reader<'_> {
    /// Checks that `count` clusters at `offset` lie in the file, and notes them.
    fn claim(&mut self, what: &str, offset: u64, bytes: u64) -> Result<(), String> {
        let clusters = bytes.div_ceil(self.cluster_size);
        if offset == 0
            || !offset.is_multiple_of(self.cluster_size)
            || offset.saturating_add(clusters * self.cluster_size)
                > self.file_size.next_multiple_of(self.cluster_size)
        {
            return Err(format!("{what} at offset {offset} lies outside the file"));
        }
        self.loaded
            .clusters
            .extend((0..clusters).map(|i| offset + i * self.cluster_size));
        Ok(())
    }

    fn read_directory(
        &mut self,
        count: u32,
        dir_size: u64,
        dir_offset: u64,
        writable: bool,
    ) -> Result<(), String> {
        if count == 0 || count as usize > MAX_BITMAPS {
            return Err(format!("{count} bitmaps"));
        }
        if dir_size > MAX_DIRECTORY_BYTES
            || dir_size < DIRECTORY_ENTRY_HEADER as u64 * u64::from(count)
        {
            return Err(format!(
                "bitmap directory of {dir_size} bytes for {count} bitmaps"
            ));
        }
        self.claim("the bitmap directory", dir_offset, dir_size)?;
        let dir = read(self.file, dir_offset, dir_size)?;
        let mut names = HashSet::new();
        let mut at = 0usize;
        for _ in 0..count {
            let field = |rel: usize| at + rel;
            let short = || "the bitmap directory is truncated".to_string();
            let table_offset = be64(&dir, field(0)).ok_or_else(short)?;
            let table_size = be32(&dir, field(8)).ok_or_else(short)?;
            let flags = be32(&dir, field(12)).ok_or_else(short)?;
            let kind = *dir.get(field(16)).ok_or_else(short)?;
            let granularity_bits = u32::from(*dir.get(field(17)).ok_or_else(short)?);
            let name_size = be16(&dir, field(18)).ok_or_else(short)? as usize;
            let extra_size = be32(&dir, field(20)).ok_or_else(short)? as usize;
            let name_at = field(DIRECTORY_ENTRY_HEADER) + extra_size;
            let name = dir.get(name_at..name_at + name_size).ok_or_else(short)?;
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| "a bitmap name is not UTF-8".to_string())?;
            at = (name_at + name_size).next_multiple_of(8);

            if name.is_empty() || name.len() > MAX_NAME_BYTES {
                return Err(format!("bitmap name of {} bytes", name.len()));
            }
            if !names.insert(name.clone()) {
                return Err(format!("bitmap '{name}' appears twice"));
            }
            if kind != TYPE_DIRTY_TRACKING {
                return Err(format!("bitmap '{name}' has unknown type {kind}"));
            }
            if flags & !(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE) != 0 {
                return Err(format!("bitmap '{name}' has reserved flags {flags:#x}"));
            }
            if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
                return Err(format!(
                    "bitmap '{name}' has granularity_bits {granularity_bits}"
                ));
            }
            let granularity = 1u64 << granularity_bits;
            let needed = data_bytes(self.disk_size, granularity).div_ceil(self.cluster_size);
            if u64::from(table_size) < needed || u64::from(table_size) > MAX_TABLE_ENTRIES {
                return Err(format!(
                    "bitmap '{name}' has {table_size} table entries, {needed} expected"
                ));
            }
            if table_size > 0 {
                self.claim(
                    &format!("the table of bitmap '{name}'"),
                    table_offset,
                    u64::from(table_size) * 8,
                )?;
            }
            let table = read(self.file, table_offset, u64::from(table_size) * 8)?;
            let data = self.read_data(&name, &table, granularity)?;

            // Such bitmaps cannot be used; a rewrite would drop them.
            let unusable = if flags & FLAG_IN_USE != 0 {
                Some("it was not saved correctly (in use)")
            } else if extra_size != 0 {
                Some("it has extra data")
            } else {
                None
            };
            if let Some(cause) = unusable {
                if writable {
                    return Err(format!(
                        "bitmap '{name}' is inconsistent: {cause}; remove it with \
                         'qemu-img bitmap --remove' or open the image read-only"
                    ));
                }
                log::warn!("Bitmap '{name}' is inconsistent and cannot be used: {cause}");
                continue;
            }
            let mut bitmap = DirtyBitmap::from_bytes(&name, granularity, self.disk_size, &data);
            bitmap.persistent = true;
            bitmap.recording = flags & FLAG_AUTO != 0;
            self.loaded.bitmaps.push(bitmap);
        }
        Ok(())
    }

    /// The bitmap data the table describes.
    fn read_data(&mut self, name: &str, table: &[u8], granularity: u64) -> Result<Vec<u8>, String> {
        let total = data_bytes(self.disk_size, granularity);
        if total > MAX_DATA_BYTES {
            return Err(format!("bitmap '{name}' is too large ({total} bytes)"));
        }
        let mut data = Vec::with_capacity(total as usize);
        for (index, entry) in table.chunks_exact(8).enumerate() {
            let entry = be64(entry, 0).unwrap_or(0);
            let offset = entry & OFFSET_MASK;
            if entry & !(OFFSET_MASK | ENTRY_ALL_ONES) != 0
                || (offset != 0 && entry & ENTRY_ALL_ONES != 0)
            {
                return Err(format!(
                    "bitmap '{name}' table entry {index} has reserved bits set"
                ));
            }
            if offset != 0 {
                self.claim(
                    &format!("data of bitmap '{name}'"),
                    offset,
                    self.cluster_size,
                )?;
            }
            let want = (total - data.len() as u64).min(self.cluster_size);
            if want == 0 {
                continue;
            }
            match (offset, entry & ENTRY_ALL_ONES) {
                (0, 0) => data.resize(data.len() + want as usize, 0),
                (0, _) => data.resize(data.len() + want as usize, 0xff),
                _ => data.extend(read(self.file, offset, want)?),
            }
        }
        Ok(data)
    }
}

/// Checks QEMU's constraints on a new persistent bitmap; the error is the
/// cause QEMU gives.
pub(super) fn check_new(
    name: &str,
    granularity: u64,
    disk_size: u64,
    cluster_size: u64,
) -> Result<(), String> {
    if granularity > 1 << MAX_GRANULARITY_BITS {
        return Err(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        ));
    }
    if granularity < 1 << MIN_GRANULARITY_BITS {
        return Err(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        ));
    }
    let bytes = data_bytes(disk_size, granularity);
    if bytes > MAX_DATA_BYTES || bytes.div_ceil(cluster_size) > MAX_TABLE_ENTRIES {
        return Err("Too much space will be occupied by the bitmap. Use larger granularity".into());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "Name length exceeds maximum ({MAX_NAME_BYTES} characters)"
        ));
    }
    Ok(())
}

/// The refcount structures, read and changed in memory, then written back.
struct Refcounts<'a> {
    file: &'a BlockNode,
    cluster_size: u64,
    refcount_bits: u64,
    table_offset: u64,
    table: Vec<u64>,
    table_changed: bool,
    /// Refcount blocks by table index: contents and whether they changed.
    blocks: BTreeMap<u64, (Vec<u8>, bool)>,
    /// Where the search for free clusters resumes (a cluster index).
    next_free: u64,
}

impl<'a> Refcounts<'a> {
    fn load(file: &'a BlockNode, header: &Header) -> Result<Self, String> {
        let bytes = header.refcount_table_clusters * header.cluster_size;
        if bytes > 32 << 20 {
            return Err("the refcount table is too large".into());
        }
        let raw = read(file, header.refcount_table_offset, bytes)?;
        Ok(Refcounts {
            file,
            cluster_size: header.cluster_size,
            refcount_bits: 1 << header.refcount_order,
            table_offset: header.refcount_table_offset,
            table: raw
                .chunks_exact(8)
                .map(|e| be64(e, 0).unwrap_or(0))
                .collect(),
            table_changed: false,
            blocks: BTreeMap::new(),
            next_free: 0,
        })
    }

    fn entries_per_block(&self) -> u64 {
        self.cluster_size * 8 / self.refcount_bits
    }

    /// The refcount block for table index `index`, read on first use; `None`
    /// when the table has no block there (all its refcounts are 0).
    fn block(&mut self, index: u64) -> Result<Option<&mut (Vec<u8>, bool)>, String> {
        let entry = *self.table.get(index as usize).ok_or_else(|| {
            format!("the refcount table has no entry {index}; blkd cannot grow it")
        })?;
        let offset = entry & OFFSET_MASK;
        if offset == 0 && !self.blocks.contains_key(&index) {
            return Ok(None);
        }
        if !self.blocks.contains_key(&index) {
            let data = read(self.file, offset, self.cluster_size)?;
            self.blocks.insert(index, (data, false));
        }
        Ok(self.blocks.get_mut(&index))
    }

    /// Bit position and width of cluster `cluster`'s entry in its block.
    fn slot(&self, cluster: u64) -> (u64, u64) {
        (
            cluster / self.entries_per_block(),
            cluster % self.entries_per_block(),
        )
    }

    fn get(&mut self, cluster: u64) -> Result<u64, String> {
        let (index, slot) = self.slot(cluster);
        let bits = self.refcount_bits;
        let Some((data, _)) = self.block(index)? else {
            return Ok(0);
        };
        Ok(entry_get(data, slot, bits))
    }

    fn set(&mut self, cluster: u64, value: u64) -> Result<(), String> {
        let (index, slot) = self.slot(cluster);
        let bits = self.refcount_bits;
        match self.block(index)? {
            Some((data, changed)) => {
                entry_set(data, slot, bits, value);
                *changed = true;
                Ok(())
            }
            None => Err(format!("cluster {cluster} has no refcount block")),
        }
    }

    fn free(&mut self, offset: u64) -> Result<(), String> {
        let cluster = offset / self.cluster_size;
        match self.get(cluster)? {
            0 => {
                log::warn!("bitmap cluster at offset {offset} was already free");
                Ok(())
            }
            n => self.set(cluster, n - 1),
        }
    }

    /// Makes sure table index `index` has a refcount block. A new block goes
    /// in the first cluster of the range it covers, free since it had none.
    fn ensure_block(&mut self, index: u64) -> Result<(), String> {
        if self.block(index)?.is_some() {
            return Ok(());
        }
        let first = index * self.entries_per_block();
        let mut data = vec![0u8; self.cluster_size as usize];
        entry_set(&mut data, 0, self.refcount_bits, 1);
        self.blocks.insert(index, (data, true));
        if let Some(entry) = self.table.get_mut(index as usize) {
            *entry = first * self.cluster_size;
        }
        self.table_changed = true;
        Ok(())
    }

    /// Allocates `count` contiguous clusters, returns the offset of the first.
    fn allocate(&mut self, count: u64) -> Result<u64, String> {
        let mut start = self.next_free.max(1);
        let mut run = 0;
        while run < count {
            let cluster = start + run;
            self.ensure_block(cluster / self.entries_per_block())?;
            if self.get(cluster)? == 0 {
                run += 1;
            } else {
                start = cluster + 1;
                run = 0;
            }
        }
        for cluster in start..start + count {
            self.set(cluster, 1)?;
        }
        self.next_free = start + count;
        Ok(start * self.cluster_size)
    }

    /// Writes the changed blocks, then the table that points to new ones.
    fn write_back(&self) -> Result<(), String> {
        for (&index, (data, changed)) in &self.blocks {
            if *changed {
                let offset = self.table.get(index as usize).copied().unwrap_or(0) & OFFSET_MASK;
                write(self.file, offset, data)?;
            }
        }
        if self.table_changed {
            let raw: Vec<u8> = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
            write(self.file, self.table_offset, &raw)?;
        }
        Ok(())
    }
}

/// Refcount entry `slot` of a block of `bits`-wide entries (big endian; sub-byte
/// entries start at the least significant bit).
fn entry_get(data: &[u8], slot: u64, bits: u64) -> u64 {
    if bits >= 8 {
        let width = (bits / 8) as usize;
        let at = slot as usize * width;
        data.get(at..at + width).map_or(0, |b| {
            b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
        })
    } else {
        let per_byte = 8 / bits;
        let byte = data.get((slot / per_byte) as usize).copied().unwrap_or(0);
        (u64::from(byte) >> ((slot % per_byte) * bits)) & ((1 << bits) - 1)
    }
}

fn entry_set(data: &mut [u8], slot: u64, bits: u64, value: u64) {
    if bits >= 8 {
        let width = (bits / 8) as usize;
        let at = slot as usize * width;
        if let Some(b) = data.get_mut(at..at + width) {
            b.copy_from_slice(&value.to_be_bytes()[8 - width..]);
        }
    } else {
        let per_byte = 8 / bits;
        let shift = (slot % per_byte) * bits;
        let mask = ((1u64 << bits) - 1) as u8;
        if let Some(byte) = data.get_mut((slot / per_byte) as usize) {
            *byte = (*byte & !(mask << shift)) | (((value as u8) & mask) << shift);
        }
    }
}

/// Replaces the image's bitmaps extension with `bitmaps`: frees `old_clusters`
/// (the previous extension's), writes data clusters, tables and directory,
/// the refcounts, then the header with the autoclear bit set. imago must have
/// closed the image: this changes its refcounts behind its back.
pub(super) fn store(
    file: &BlockNode,
    old_clusters: &[u64],
    bitmaps: &[DirtyBitmap],
) -> Result<(), String> {
    let header = Header::read(file)?;
    if header.version < 3 {
        // v2 has no autoclear bits, so it never holds bitmaps.
        return match bitmaps.is_empty() {
            true => Ok(()),
            false => Err("Cannot store dirty bitmaps in qcow2 v2 files".into()),
        };
    }
    let cluster_size = header.cluster_size;
    let mut refcounts = Refcounts::load(file, &header)?;
    for &offset in old_clusters {
        refcounts.free(offset)?;
    }
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut directory = Vec::new();
    for bitmap in bitmaps {
        let granularity_bits = bitmap.granularity.trailing_zeros();
        check_new(
            &bitmap.name,
            bitmap.granularity,
            header.disk_size,
            cluster_size,
        )
        .map_err(|e| format!("bitmap '{}': {e}", bitmap.name))?;
        let mut bitmap = bitmap.clone();
        bitmap.resize(header.disk_size);
        let data = bitmap.to_bytes(header.disk_size);
        let mut table = Vec::new();
        for chunk in data.chunks(cluster_size as usize) {
            if chunk.iter().all(|&b| b == 0) {
                table.extend_from_slice(&0u64.to_be_bytes());
                continue;
            }
            let offset = refcounts.allocate(1)?;
            let mut cluster = chunk.to_vec();
            cluster.resize(cluster_size as usize, 0);
            writes.push((offset, cluster));
            table.extend_from_slice(&offset.to_be_bytes());
        }
        let table_offset = if table.is_empty() {
            0
        } else {
            let offset = refcounts.allocate((table.len() as u64).div_ceil(cluster_size))?;
            writes.push((offset, table.clone()));
            offset
        };
        let flags = if bitmap.recording { FLAG_AUTO } else { 0 };
        directory.extend_from_slice(&table_offset.to_be_bytes());
        directory.extend_from_slice(&((table.len() / 8) as u32).to_be_bytes());
        directory.extend_from_slice(&flags.to_be_bytes());
        directory.push(TYPE_DIRTY_TRACKING);
        directory.push(granularity_bits as u8);
        directory.extend_from_slice(&(bitmap.name.len() as u16).to_be_bytes());
        directory.extend_from_slice(&0u32.to_be_bytes());
        directory.extend_from_slice(bitmap.name.as_bytes());
        directory.resize(directory.len().next_multiple_of(8), 0);
    }
    let extension = if bitmaps.is_empty() {
        None
    } else {
        if bitmaps.len() > MAX_BITMAPS || directory.len() as u64 > MAX_DIRECTORY_BYTES {
            return Err(format!("too many bitmaps ({})", bitmaps.len()));
        }
        let offset = refcounts.allocate((directory.len() as u64).div_ceil(cluster_size))?;
        let mut ext = [0u8; 24];
        ext[..4].copy_from_slice(&(bitmaps.len() as u32).to_be_bytes());
        put64(&mut ext, 8, directory.len() as u64);
        put64(&mut ext, 16, offset);
        writes.push((offset, directory));
        Some(ext)
    };
    for (offset, data) in &writes {
        write(file, *offset, data)?;
    }
    refcounts.write_back()?;
    let sync = |file: &BlockNode| {
        file.driver()
            .flush()
            .map_err(|e| format!("could not flush: {e}"))
    };
    // Everything the header will point to is durable before the header.
    sync(file)?;
    header.write(file, extension)?;
    sync(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_of_every_width() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let slots = 512 * 8 / bits;
            for slot in 0..slots {
                entry_set(&mut block, slot, bits, slot % (max.min(1000) + 1));
            }
            for slot in 0..slots {
                assert_eq!(
                    entry_get(&block, slot, bits),
                    slot % (max.min(1000) + 1),
                    "order {order} slot {slot}"
                );
            }
            entry_set(&mut block, 3, bits, max);
            assert_eq!(entry_get(&block, 3, bits), max);
            assert_eq!(entry_get(&block, 4, bits), 4 % (max.min(1000) + 1));
        }
        // 16-bit refcounts are big endian.
        let mut block = vec![0u8; 8];
        entry_set(&mut block, 1, 16, 0x0102);
        assert_eq!(block[..4], [0, 0, 1, 2]);
        // 1-bit refcounts start at the least significant bit.
        let mut block = vec![0u8; 1];
        entry_set(&mut block, 0, 1, 1);
        entry_set(&mut block, 3, 1, 1);
        assert_eq!(block[0], 0b1001);
    }

    #[test]
    fn constraints_match_qemus_texts() {
        assert_eq!(
            check_new("b", 1 << 32, 1 << 20, 65536).unwrap_err(),
            "Granularity exceeds maximum (2147483648 bytes)"
        );
        assert!(check_new(&"x".repeat(1024), 65536, 1 << 20, 65536)
            .unwrap_err()
            .contains("Name length exceeds maximum (1023"));
        check_new("b", 512, 1 << 30, 65536).unwrap();
    }
}
