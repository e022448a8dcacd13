//! The block graph: nodes by `node-name`, their creation from `blockdev-add`
//! options, and the rules on who may delete what.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::block::{self, BlockNode, OpenContext};

/// All named nodes, newest first (the order `query-named-block-nodes` uses).
#[derive(Default)]
pub struct Graph {
    nodes: Vec<Arc<BlockNode>>,
}

static AUTO_NAME: AtomicU64 = AtomicU64::new(0);

impl Graph {
    pub fn get(&self, name: &str) -> Option<&Arc<BlockNode>> {
        self.nodes.iter().find(|n| n.name() == name)
    }

    /// Finds a node as QMP commands name it, with QEMU's error text.
    pub fn lookup(&self, name: &str) -> Result<&Arc<BlockNode>, String> {
        self.get(name)
            .ok_or_else(|| format!("Cannot find device='' nor node-name='{name}'"))
    }

    pub fn nodes(&self) -> &[Arc<BlockNode>] {
        &self.nodes
    }

    /// Opens a node from validated `blockdev-add` options and names it. Inline
    /// children are opened first and get automatic names (`#block<N>`).
    pub fn add(&mut self, opts: &Map<String, Value>) -> Result<Arc<BlockNode>, String> {
        let name = match opts.get("node-name").and_then(Value::as_str) {
            Some(name) => {
                if !is_valid_node_name(name) {
                    return Err(format!("Invalid node-name: '{name}'"));
                }
                if self.get(name).is_some() {
                    return Err(format!("Duplicate nodes with node-name='{name}'"));
                }
                name.to_string()
            }
            None => return Err("'node-name' must be specified for the root node".into()),
        };
        self.open_node(name, opts)
    }

    fn open_node(
        &mut self,
        name: String,
        opts: &Map<String, Value>,
    ) -> Result<Arc<BlockNode>, String> {
        let driver = opts
            .get("driver")
            .and_then(Value::as_str)
            .ok_or("Parameter 'driver' is missing")?
            .to_string();
        let mut opts = opts.clone();
        // Inline child definitions become nodes of their own, referenced by name.
        let mut inline_children = Vec::new();
        for child in ["file", "backing"] {
            if let Some(Value::Object(child_opts)) = opts.get(child).cloned() {
                let child_name = match child_opts.get("node-name").and_then(Value::as_str) {
                    Some(n) => n.to_string(),
                    None => format!("#block{}", AUTO_NAME.fetch_add(1, Ordering::Relaxed)),
                };
                if self.get(&child_name).is_some() {
                    return Err(format!("Duplicate nodes with node-name='{child_name}'"));
                }
                let mut child_opts = child_opts.clone();
                // As QEMU's inherited options: the parent's discard mode
                // decides, and its cache settings carry down.
                child_opts
                    .entry("discard")
                    .or_insert(Value::String("unmap".into()));
                if let Some(Value::Object(parent_cache)) = opts.get("cache") {
                    let cache = child_opts
                        .entry("cache")
                        .or_insert_with(|| Value::Object(Map::new()));
                    if let Value::Object(cache) = cache {
                        for (key, value) in parent_cache {
                            cache.entry(key.clone()).or_insert_with(|| value.clone());
                        }
                    }
                }
                // A child of a read-only node is read-only too.
                if opts.get("read-only") == Some(&Value::Bool(true)) {
                    child_opts.entry("read-only").or_insert(Value::Bool(true));
                }
                let node = self.open_node(child_name.clone(), &child_opts)?;
                inline_children.push(node);
                opts.insert(child.to_string(), Value::String(child_name));
            }
        }
        let lookup = |n: &str| self.get(n).cloned();
        let result = OpenContext::from_options(&opts, &lookup)
            .and_then(|ctx| block::open(&driver, &opts, &ctx).map(|drv| (drv, ctx.write_policy())));
        match result {
            Ok((drv, policy)) => {
                let node = Arc::new(BlockNode::new(name, drv).with_policy(policy));
                self.nodes.insert(0, Arc::clone(&node));
                Ok(node)
            }
            Err(e) => {
                for child in inline_children {
                    self.nodes.retain(|n| !Arc::ptr_eq(n, &child));
                }
                Err(e)
            }
        }
    }

    /// Whether another node holds `node` as a child.
    pub fn parent_of(&self, node: &Arc<BlockNode>) -> Option<&Arc<BlockNode>> {
        self.nodes
            .iter()
            .find(|n| n.driver().children().iter().any(|c| Arc::ptr_eq(c, node)))
    }

    /// Removes a node nobody uses; the caller has checked exports. Inline
    /// children that only this node used go with it.
    pub fn remove(&mut self, name: &str) -> Result<(), String> {
        let node = self
            .get(name)
            .cloned()
            .ok_or_else(|| format!("Failed to find node with node-name='{name}'"))?;
        if self.parent_of(&node).is_some() {
            return Err(format!("Block device {name} is in use"));
        }
        self.nodes.retain(|n| !Arc::ptr_eq(n, &node));
        let children = node.driver().children();
        drop(node);
        for child in children {
            if child.name().starts_with('#') && Arc::strong_count(&child) <= 2 {
                let child_name = child.name().to_string();
                drop(child);
                let _ = self.remove(&child_name);
            }
        }
        Ok(())
    }

    /// `query-named-block-nodes`' entry for one node (BlockDeviceInfo).
    pub fn node_info(node: &BlockNode) -> Value {
        let drv = node.driver();
        let filename = drv.filename().unwrap_or_else(|| {
            format!(
                "json:{{\"driver\": \"{}\", \"size\": {}}}",
                drv.driver_name(),
                drv.size()
            )
        });
        let mut image = json!({
            "virtual-size": drv.size(),
            "filename": filename,
            "format": drv.driver_name(),
            "actual-size": drv.allocated_size().unwrap_or(0),
        });
        if drv.filename().is_some() {
            image["dirty-flag"] = Value::Bool(false);
        }
        let cache = drv.cache_mode();
        json!({
            "iops_rd": 0,
            "detect_zeroes": node.detect_zeroes().as_str(),
            "active": true,
            "image": image,
            "iops_wr": 0,
            "ro": drv.read_only(),
            "node-name": node.name(),
            "backing_file_depth": 0,
            "drv": drv.driver_name(),
            "iops": 0,
            "bps_wr": 0,
            "write_threshold": 0,
            "encrypted": false,
            "bps": 0,
            "bps_rd": 0,
            "cache": {"no-flush": cache.no_flush, "direct": cache.direct, "writeback": true},
            "file": filename,
        })
    }
}

/// QEMU's rule for ids: a letter first, then letters, digits, `-`, `.`, `_`.
pub fn is_valid_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSlice;

    #[test]
    fn node_names_follow_qemu_rules() {
        assert!(is_valid_node_name("null0"));
        assert!(is_valid_node_name("a-b.c_d"));
        assert!(!is_valid_node_name("1bad"));
        assert!(!is_valid_node_name("#bad"));
        assert!(!is_valid_node_name(""));
    }

    fn null_opts(name: &str) -> Map<String, Value> {
        json!({"driver": "null-co", "node-name": name, "size": 1048576})
            .as_object()
            .cloned()
            .unwrap()
    }

    #[test]
    fn duplicate_and_missing_names_are_refused() {
        let mut g = Graph::default();
        g.add(&null_opts("n0")).unwrap();
        assert_eq!(
            g.add(&null_opts("n0")).err().unwrap(),
            "Duplicate nodes with node-name='n0'"
        );
        let mut nameless = null_opts("x");
        nameless.remove("node-name");
        assert_eq!(
            g.add(&nameless).err().unwrap(),
            "'node-name' must be specified for the root node"
        );
        assert_eq!(g.nodes().len(), 1);
    }

    /// A 1 MiB raw image of 0x55 bytes under a raw node (the file node
    /// takes `file_opts`), with the image's directory and path.
    fn raw_over_file(file_opts: Value) -> (Graph, tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.raw");
        std::fs::write(&path, vec![0x55u8; 1 << 20]).unwrap();
        let mut file = json!({"driver": "file", "node-name": "f0", "filename": path});
        for (k, v) in file_opts.as_object().unwrap() {
            file[k] = v.clone();
        }
        let mut g = Graph::default();
        g.add(file.as_object().unwrap()).unwrap();
        let raw = json!({"driver": "raw", "node-name": "r0", "file": "f0"});
        g.add(raw.as_object().unwrap()).unwrap();
        (g, dir, path)
    }

    fn allocated(path: &std::path::Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    fn read(node: &BlockNode, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xffu8; len];
        node.driver()
            .read_vectored(offset, &mut [std::io::IoSliceMut::new(&mut buf)])
            .unwrap();
        buf
    }

    #[test]
    fn detect_zeroes_unmap_deallocates_zero_writes() {
        let (g, _dir, path) = raw_over_file(json!({"detect-zeroes": "unmap", "discard": "unmap"}));
        let raw = g.get("r0").unwrap();
        let before = allocated(&path);
        assert!(before >= 1 << 20, "the image starts fully allocated");
        let zeroes = vec![0u8; 256 << 10];
        raw.write_vectored(
            0,
            &[
                IoSlice::new(&zeroes[..100 << 10]),
                IoSlice::new(&zeroes[100 << 10..]),
            ],
        )
        .unwrap();
        assert_eq!(read(raw, 0, 256 << 10), zeroes);
        assert_eq!(read(raw, 256 << 10, 4), [0x55; 4], "the rest is untouched");
        assert!(
            allocated(&path) <= before - (256 << 10),
            "256 KiB of zeroes were punched: {} -> {}",
            before,
            allocated(&path)
        );
        // Data that is not all zero is written as it is.
        let mut almost = vec![0u8; 64 << 10];
        almost[65535] = 1;
        raw.write_vectored(0, &[IoSlice::new(&almost)]).unwrap();
        assert_eq!(read(raw, 0, 64 << 10), almost);
        let info = Graph::node_info(g.get("f0").unwrap());
        assert_eq!(info["detect_zeroes"], "unmap");
        assert_eq!(Graph::node_info(raw)["detect_zeroes"], "off");
    }

    #[test]
    fn a_node_that_ignores_discards_neither_unmaps_nor_marks() {
        use crate::block::bitmap::DirtyBitmap;
        use crate::block::ZeroFlags;
        // The file node unmaps; the raw node on top keeps QEMU's default, ignore.
        let (g, _dir, path) = raw_over_file(json!({"discard": "unmap"}));
        let (raw, file) = (g.get("r0").unwrap(), g.get("f0").unwrap());
        for node in [raw, file] {
            node.add_bitmap(DirtyBitmap::new("b0", 65536, 1 << 20));
        }
        let before = allocated(&path);
        raw.discard(0, 256 << 10).unwrap();
        let unmap = ZeroFlags {
            may_unmap: true,
            fast_only: false,
        };
        raw.write_zeroes(512 << 10, 256 << 10, unmap).unwrap();
        assert_eq!(read(raw, 0, 4), [0x55; 4], "the discard was ignored");
        assert_eq!(read(raw, 512 << 10, 256 << 10), vec![0u8; 256 << 10]);
        assert_eq!(allocated(&path), before, "nothing was deallocated");
        let dirty = |node: &BlockNode| node.bitmap("b0").unwrap().dirty_bytes(1 << 20);
        assert_eq!(dirty(raw), 256 << 10, "only the zeroed range is dirty");
        assert_eq!(dirty(file), 256 << 10);
        // The file node itself unmaps what reaches it.
        file.discard(0, 256 << 10).unwrap();
        assert!(allocated(&path) <= before - (256 << 10));
    }

    #[test]
    fn resizing_through_raw_resizes_the_file_nodes_bitmaps() {
        use crate::block::bitmap::DirtyBitmap;
        let (g, _dir, _path) = raw_over_file(json!({}));
        let (raw, file) = (g.get("r0").unwrap(), g.get("f0").unwrap());
        // 4 KiB chunks: the 1 MiB bitmap ends exactly on a word of chunks.
        file.add_bitmap(DirtyBitmap::new("b0", 4096, 1 << 20));
        raw.resize(2 << 20).unwrap();
        raw.write_vectored(3 << 19, &[IoSlice::new(&[1u8; 4096])])
            .unwrap();
        let bitmap = file.bitmap("b0").unwrap();
        assert_eq!(
            bitmap.dirty_bytes(2 << 20),
            4096,
            "the write past the old end is recorded"
        );
    }

    #[test]
    fn detect_zeroes_unmap_needs_discard_unmap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img.raw");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let opts = json!({"driver": "file", "node-name": "f0", "filename": path,
                          "detect-zeroes": "unmap"});
        let mut g = Graph::default();
        assert_eq!(
            g.add(opts.as_object().unwrap()).err().unwrap(),
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
        );
        assert!(g.nodes().is_empty());
    }

    #[test]
    fn a_child_cannot_be_removed_before_its_parent() {
        let mut g = Graph::default();
        g.add(&null_opts("n0")).unwrap();
        let raw = json!({"driver": "raw", "node-name": "r0", "file": "n0"});
        g.add(raw.as_object().unwrap()).unwrap();
        assert_eq!(g.remove("n0").unwrap_err(), "Block device n0 is in use");
        g.remove("r0").unwrap();
        g.remove("n0").unwrap();
        assert!(g.nodes().is_empty());
        assert_eq!(
            g.remove("n0").unwrap_err(),
            "Failed to find node with node-name='n0'"
        );
    }
}
