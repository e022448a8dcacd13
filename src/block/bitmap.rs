//! Dirty bitmaps: which parts of a node were written since a point in time,
//! at a fixed granularity, as `block-dirty-bitmap-*` manage them.

/// One dirty bitmap of a node.
#[derive(Clone, Debug)]
pub struct DirtyBitmap {
    pub name: String,
    /// Bytes covered by one bit; a power of two, at least 512.
    pub granularity: u64,
    /// Writes set bits only while recording (`block-dirty-bitmap-enable`).
    pub recording: bool,
    pub persistent: bool,
    /// Held by an export or another operation.
    pub busy: bool,
    bits: Vec<u64>,
}

impl DirtyBitmap {
    pub fn new(name: &str, granularity: u64, disk_size: u64) -> DirtyBitmap {
        let mut bm = DirtyBitmap {
            name: name.to_string(),
            granularity,
            recording: true,
            persistent: false,
            busy: false,
            bits: Vec::new(),
        };
        bm.resize(disk_size);
        bm
    }

    fn chunks(&self, disk_size: u64) -> u64 {
        disk_size.div_ceil(self.granularity)
    }

    /// Follows a resize of the node: new space starts clean.
    pub fn resize(&mut self, disk_size: u64) {
        let chunks = self.chunks(disk_size);
        self.bits.resize(chunks.div_ceil(64) as usize, 0);
        // Clear bits past the new end so a later grow starts clean.
        let tail = chunks % 64;
        if tail != 0 {
            if let Some(last) = self.bits.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    fn chunk_count(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    fn get(&self, chunk: u64) -> bool {
        self.bits
            .get((chunk / 64) as usize)
            .is_some_and(|w| w & (1 << (chunk % 64)) != 0)
    }

    /// Marks `[offset, offset + len)` dirty if recording.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if !self.recording || len == 0 {
            return;
        }
        self.set_range(offset, len);
    }

    fn set_range(&mut self, offset: u64, len: u64) {
        let first = offset / self.granularity;
        let last = (offset.saturating_add(len) - 1) / self.granularity;
        for chunk in first..=last.min(self.chunk_count().saturating_sub(1)) {
            if let Some(w) = self.bits.get_mut((chunk / 64) as usize) {
                *w |= 1 << (chunk % 64);
            }
        }
    }

    pub fn clear(&mut self) {
        self.bits.iter_mut().for_each(|w| *w = 0);
    }

    /// Adds every dirty chunk of `other` (same node) to this bitmap.
    pub fn merge_from(&mut self, other: &DirtyBitmap, disk_size: u64) {
        if other.granularity == self.granularity {
            for (a, b) in self.bits.iter_mut().zip(&other.bits) {
                *a |= *b;
            }
            return;
        }
        for chunk in 0..other.chunks(disk_size) {
            if other.get(chunk) {
                self.set_range(chunk * other.granularity, other.granularity);
            }
        }
    }

    /// Dirty bytes, counted in whole chunks, within a disk of `disk_size` bytes
    /// (what QEMU reports as `count`).
    pub fn dirty_bytes(&self, disk_size: u64) -> u64 {
        let mut total = 0;
        for chunk in 0..self.chunks(disk_size) {
            if self.get(chunk) {
                let start = chunk * self.granularity;
                total += self.granularity.min(disk_size - start);
            }
        }
        total
    }

    /// The bits as the qcow2 bitmap data holds them: chunk `n` is bit
    /// `n % 8` (least significant first) of byte `n / 8`; one byte per 8
    /// chunks of a disk of `disk_size` bytes, unused tail bits zero.
    pub fn to_bytes(&self, disk_size: u64) -> Vec<u8> {
        let chunks = self.chunks(disk_size);
        let mut bytes: Vec<u8> = self.bits.iter().flat_map(|w| w.to_le_bytes()).collect();
        bytes.resize(chunks.div_ceil(8) as usize, 0);
        if !chunks.is_multiple_of(8) {
            if let Some(last) = bytes.last_mut() {
                *last &= (1u8 << (chunks % 8)) - 1;
            }
        }
        bytes
    }

    /// A bitmap whose bits are `data` in [`DirtyBitmap::to_bytes`]'s layout;
    /// missing bytes are clean and bits past the disk end are dropped.
    pub fn from_bytes(name: &str, granularity: u64, disk_size: u64, data: &[u8]) -> DirtyBitmap {
        let mut bm = DirtyBitmap::new(name, granularity, disk_size);
        for (word, bytes) in bm.bits.iter_mut().zip(data.chunks(8)) {
            let mut le = [0u8; 8];
            le[..bytes.len()].copy_from_slice(bytes);
            *word = u64::from_le_bytes(le);
        }
        // Clears the tail past the last chunk.
        bm.resize(disk_size);
        bm
    }

    /// The run starting at `offset` (at most `len` bytes, at least 1 when
    /// `len > 0`): its length and whether it is dirty.
    pub fn extent(&self, offset: u64, len: u64) -> (u64, bool) {
        let chunk = offset / self.granularity;
        let dirty = self.get(chunk);
        let end = offset.saturating_add(len);
        let mut pos = (chunk + 1) * self.granularity;
        while pos < end && self.get(pos / self.granularity) == dirty {
            pos += self.granularity;
        }
        (pos.min(end) - offset, dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_whole_chunks_and_reports_runs() {
        let size = 1 << 20;
        let mut bm = DirtyBitmap::new("b0", 65536, size);
        assert_eq!(bm.dirty_bytes(size), 0);
        bm.mark(65536 + 10, 1);
        bm.mark(3 * 65536, 2 * 65536 + 1);
        assert_eq!(bm.dirty_bytes(size), 4 * 65536);
        assert_eq!(bm.extent(0, size), (65536, false));
        assert_eq!(bm.extent(65536, size), (65536, true));
        assert_eq!(bm.extent(131072, size), (65536, false));
        assert_eq!(bm.extent(3 * 65536, size), (3 * 65536, true));
        assert_eq!(bm.extent(3 * 65536 + 100, 50), (50, true));
        bm.recording = false;
        bm.mark(0, 1);
        assert_eq!(bm.extent(0, 10), (10, false));
        bm.clear();
        assert_eq!(bm.dirty_bytes(size), 0);
    }

    #[test]
    fn merge_across_granularities_and_partial_last_chunk() {
        let size = 65536 * 3 + 512;
        let mut a = DirtyBitmap::new("a", 65536, size);
        let mut b = DirtyBitmap::new("b", 512, size);
        b.mark(size - 1, 1);
        assert_eq!(b.dirty_bytes(size), 512);
        a.merge_from(&b, size);
        assert_eq!(a.dirty_bytes(size), 512);
        assert_eq!(a.extent(3 * 65536, 512), (512, true));
    }

    #[test]
    fn byte_layout_is_qemus() {
        let size = 65536 * 20 + 1;
        let mut bm = DirtyBitmap::new("b", 65536, size);
        bm.mark(0, 1);
        bm.mark(65536 * 9, 1);
        bm.mark(size - 1, 1);
        assert_eq!(
            bm.to_bytes(size),
            vec![0b0000_0001, 0b0000_0010, 0b0001_0000]
        );
        let back = DirtyBitmap::from_bytes("c", 65536, size, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(back.dirty_bytes(size), size);
        assert_eq!(back.to_bytes(size), vec![0xff, 0xff, 0x1f]);
        let again = DirtyBitmap::from_bytes("d", 65536, size, &bm.to_bytes(size));
        assert_eq!(again.dirty_bytes(size), bm.dirty_bytes(size));
        assert_eq!(again.extent(65536 * 9, size), (65536, true));
    }

    #[test]
    fn shrinking_forgets_the_tail() {
        let mut bm = DirtyBitmap::new("b", 512, 4096);
        bm.mark(3584, 512);
        bm.resize(2048);
        bm.resize(4096);
        assert_eq!(bm.dirty_bytes(4096), 0);
    }
}
