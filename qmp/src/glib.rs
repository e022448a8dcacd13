//! Just enough of GLib's `GHashTable` (2.74) to know which key it would
//! return first.
//!
//! QEMU's input visitor records the members of each input object in a
//! `GHashTable` (`g_str_hash`), removes each one as the schema consumes it, and
//! reports the first key left over: `Parameter 'x' is unexpected`. When more
//! than one member is unexpected, which one is named depends on the table's
//! layout: open addressing with quadratic probing over a power-of-two array,
//! `(hash * 11) % prime` as the home slot, tombstones on removal, and an
//! in-place rehash when the table grows or shrinks. This reproduces it.

const MIN_SHIFT: u32 = 3;
const UNUSED: u32 = 0;
const TOMBSTONE: u32 = 1;

const PRIME_MOD: [u32; 32] = [
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
    262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393, 67108859, 134217689,
    268435399, 536870909, 1073741789, 2147483647,
];

/// `g_str_hash()` (djb2 over *signed* chars).
fn str_hash(key: &str) -> u32 {
    let mut h: u32 = 5381;
    for &b in key.as_bytes() {
        h = (h << 5).wrapping_add(h).wrapping_add(b as i8 as i32 as u32);
    }
    h
}

fn is_real(h: u32) -> bool {
    h >= 2
}

/// A set of strings laid out as a `GHashTable` would lay them out.
pub(crate) struct StrSet {
    size: usize,
    modulo: u32,
    mask: usize,
    nnodes: usize,
    noccupied: usize,
    hashes: Vec<u32>,
    keys: Vec<Option<String>>,
}

impl StrSet {
    pub fn new() -> Self {
        let mut s = StrSet {
            size: 0,
            modulo: 0,
            mask: 0,
            nnodes: 0,
            noccupied: 0,
            hashes: Vec::new(),
            keys: Vec::new(),
        };
        s.set_shift(MIN_SHIFT);
        s.hashes = vec![UNUSED; s.size];
        s.keys = vec![None; s.size];
        s
    }

    fn set_shift(&mut self, shift: u32) {
        self.size = 1 << shift;
        self.modulo = PRIME_MOD[shift as usize];
        self.mask = self.size - 1;
    }

    fn hash_to_index(&self, hash: u32) -> usize {
        (hash.wrapping_mul(11) % self.modulo) as usize
    }

    fn lookup(&self, key: &str) -> (usize, u32) {
        let mut hash = str_hash(key);
        if !is_real(hash) {
            hash = 2;
        }
        let mut index = self.hash_to_index(hash);
        let mut first_tombstone = None;
        let mut step = 0;
        while self.hashes[index] != UNUSED {
            let h = self.hashes[index];
            if h == hash && self.keys[index].as_deref() == Some(key) {
                return (index, hash);
            } else if h == TOMBSTONE && first_tombstone.is_none() {
                first_tombstone = Some(index);
            }
            step += 1;
            index = (index + step) & self.mask;
        }
        (first_tombstone.unwrap_or(index), hash)
    }

    pub fn insert(&mut self, key: &str) {
        let (index, hash) = self.lookup(key);
        let old = self.hashes[index];
        if is_real(old) {
            return;
        }
        self.hashes[index] = hash;
        self.keys[index] = Some(key.to_string());
        self.nnodes += 1;
        if old == UNUSED {
            self.noccupied += 1;
            self.maybe_resize();
        }
    }

    pub fn remove(&mut self, key: &str) {
        let (index, _) = self.lookup(key);
        if !is_real(self.hashes[index]) {
            return;
        }
        self.hashes[index] = TOMBSTONE;
        self.keys[index] = None;
        self.nnodes -= 1;
        self.maybe_resize();
    }

    /// The key `g_hash_table_iter_next()` returns first.
    pub fn first(&self) -> Option<&str> {
        (0..self.size)
            .find(|&i| is_real(self.hashes[i]))
            .and_then(|i| self.keys[i].as_deref())
    }

    fn maybe_resize(&mut self) {
        let size = self.size;
        let noccupied = self.noccupied;
        if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT) || size <= noccupied + noccupied / 16 {
            self.resize();
        }
    }

    fn resize(&mut self) {
        let old_size = self.size;
        // g_hash_table_set_shift_from_size(nnodes * 1.333)
        let mut n = (self.nnodes as f64 * 1.333) as i64;
        let mut shift = 0;
        while n != 0 {
            n >>= 1;
            shift += 1;
        }
        self.set_shift(shift.max(MIN_SHIFT));
        if self.size > old_size {
            self.hashes.resize(self.size, UNUSED);
            self.keys.resize(self.size, None);
        }
        let mut relocated = vec![false; self.size.max(old_size)];
        for i in 0..old_size {
            let mut node_hash = self.hashes[i];
            if !is_real(node_hash) {
                self.hashes[i] = UNUSED;
                continue;
            }
            if relocated[i] {
                continue;
            }
            self.hashes[i] = UNUSED;
            let mut key = self.keys[i].take();
            loop {
                let mut idx = self.hash_to_index(node_hash);
                let mut step = 0;
                while relocated[idx] {
                    step += 1;
                    idx = (idx + step) & self.mask;
                }
                relocated[idx] = true;
                let replaced = self.hashes[idx];
                self.hashes[idx] = node_hash;
                if !is_real(replaced) {
                    self.keys[idx] = key;
                    break;
                }
                node_hash = replaced;
                std::mem::swap(&mut key, &mut self.keys[idx]);
            }
        }
        if self.size < old_size {
            self.hashes.truncate(self.size);
            self.keys.truncate(self.size);
        }
        self.noccupied = self.nnodes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases checked against qemu-storage-daemon 10.0.2 (members of
    /// `block-dirty-bitmap-remove` plus unexpected ones, inserted in QDict
    /// order, `node` and `name` then removed).
    #[test]
    fn first_leftover_matches_qsd() {
        let mut s = StrSet::new();
        for k in ["name", "klaoka", "node", "kmbodnm"] {
            s.insert(k);
        }
        s.remove("node");
        s.remove("name");
        assert_eq!(s.first(), Some("kmbodnm"));
    }

    #[test]
    fn grows_and_shrinks() {
        let mut s = StrSet::new();
        let keys: Vec<String> = (0..100).map(|i| format!("key{i}")).collect();
        for k in &keys {
            s.insert(k);
        }
        for k in &keys[..99] {
            s.remove(k);
        }
        assert_eq!(s.first(), Some("key99"));
        assert!(s.size <= 16);
        s.remove("key99");
        assert_eq!(s.first(), None);
    }
}
