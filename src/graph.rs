//! The block graph: nodes by `node-name`, their creation from `blockdev-add`
//! options, and the rules on who may delete what.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::block::{self, BlockNode, OpenContext};

/// All named nodes, newest first (the order `query-named-block-nodes` uses).
#[derive(Default)]
pub struct Graph {
    nodes: Vec<Arc<BlockNode>>,
    /// The nodes `blockdev-add` (or `--blockdev`) created as its root: the
    /// only ones `blockdev-del` removes. The rest go with their parent.
    owned: HashSet<String>,
}

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
        let node = self.open_node(name.clone(), opts)?;
        self.owned.insert(name);
        Ok(node)
    }

    /// Opens a node and its inline children; on failure none of them stay.
    fn open_node(
        &mut self,
        name: String,
        opts: &Map<String, Value>,
    ) -> Result<Arc<BlockNode>, String> {
        let existing = self.nodes.len();
        let result = self.open_tree(name, opts);
        if result.is_err() {
            // New nodes, inline children's children too, are always
            // inserted ahead of the older ones.
            self.nodes.drain(..self.nodes.len() - existing);
        }
        result
    }

    fn open_tree(
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
        // QEMU names an inline backing chain after its parent, so it is
        // listed before it.
        let mut backing_nodes = 0;
        for child in ["file", "backing"] {
            if let Some(Value::Object(child_opts)) = opts.get(child).cloned() {
                let child_name = match child_opts.get("node-name").and_then(Value::as_str) {
                    Some(n) => n.to_string(),
                    None => block::auto_node_name(),
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
                // A backing image is opened read-only unless it says
                // otherwise, as in QEMU; a child of a read-only node is
                // read-only too.
                if child == "backing" || opts.get("read-only") == Some(&Value::Bool(true)) {
                    child_opts.entry("read-only").or_insert(Value::Bool(true));
                }
                let before = self.nodes.len();
                self.open_tree(child_name.clone(), &child_opts)?;
                if child == "backing" {
                    backing_nodes = self.nodes.len() - before;
                }
                opts.insert(child.to_string(), Value::String(child_name));
            }
        }
        let lookup = |n: &str| self.get(n).cloned();
        let ctx = OpenContext::from_options(&opts, &lookup)?;
        let drv = block::open(&driver, &opts, &ctx)?;
        if self.get(&name).is_some() {
            // An inline child took the name.
            return Err(format!("Duplicate nodes with node-name='{name}'"));
        }
        let node = Arc::new(BlockNode::new(name, drv).with_policy(ctx.write_policy()));
        // The nodes its image header's backing chain opened are named too.
        let mut added = Vec::new();
        self.list_header_chain(&node, &mut added);
        added.push(Arc::clone(&node));
        self.nodes.splice(backing_nodes..backing_nodes, added);
        Ok(node)
    }

    /// Whether another node holds `node` as a child.
    pub fn parent_of(&self, node: &Arc<BlockNode>) -> Option<&Arc<BlockNode>> {
        self.nodes
            .iter()
            .find(|n| n.driver().children().iter().any(|c| Arc::ptr_eq(c, node)))
    }

    /// QEMU's refusal to change a node that is another's backing (its
    /// blockers): `Node 'X' is busy: ...`.
    pub fn check_not_backing(&self, node: &Arc<BlockNode>) -> Result<(), String> {
        let parent = self
            .nodes
            .iter()
            .find(|n| n.driver().backing().is_some_and(|b| Arc::ptr_eq(&b, node)));
        match parent {
            Some(parent) => Err(format!(
                "Node '{}' is busy: node is used as backing hd of '{}'",
                node.name(),
                parent.name()
            )),
            None => Ok(()),
        }
    }

    /// Removes a node `blockdev-add` created that nobody uses, with QEMU's
    /// checks and texts; the caller has checked exports, and `exported`
    /// says which nodes exports still hold.
    pub fn remove(
        &mut self,
        name: &str,
        exported: &dyn Fn(&Arc<BlockNode>) -> bool,
    ) -> Result<(), String> {
        let node = self
            .get(name)
            .cloned()
            .ok_or_else(|| format!("Failed to find node with node-name='{name}'"))?;
        self.check_not_backing(&node)?;
        if !self.owned.contains(name) {
            return Err(format!("Node {name} is not owned by the monitor"));
        }
        if self.parent_of(&node).is_some() {
            return Err(format!("Block device {name} is in use"));
        }
        self.owned.remove(name);
        self.nodes.retain(|n| !Arc::ptr_eq(n, &node));
        self.prune(exported);
        Ok(())
    }

    /// Drops the nodes nothing uses any more: not created by `blockdev-add`,
    /// no parent in the graph, no export (`exported`). These are children
    /// whose parent went, as QEMU frees a node when its last user goes.
    pub fn prune(&mut self, exported: &dyn Fn(&Arc<BlockNode>) -> bool) {
        loop {
            let orphan = self.nodes.iter().position(|n| {
                !self.owned.contains(n.name()) && self.parent_of(n).is_none() && !exported(n)
            });
            match orphan {
                Some(index) => drop(self.nodes.remove(index)),
                None => break,
            }
        }
    }

    /// The nodes under `node`'s backing that are not in the graph yet (those
    /// its image header named), in QEMU's order: the deepest first, each
    /// format node before its file node.
    fn list_header_chain(&self, node: &Arc<BlockNode>, listed: &mut Vec<Arc<BlockNode>>) {
        let Some(backing) = node.driver().backing() else {
            return;
        };
        if self.nodes.iter().any(|n| Arc::ptr_eq(n, &backing)) {
            return;
        }
        self.list_header_chain(&backing, listed);
        listed.push(Arc::clone(&backing));
        for child in backing.driver().children() {
            let is_backing = backing
                .driver()
                .backing()
                .is_some_and(|b| Arc::ptr_eq(&b, &child));
            if !is_backing && !self.nodes.iter().any(|n| Arc::ptr_eq(n, &child)) {
                listed.push(child);
            }
        }
    }

    /// QEMU's ImageInfo for `node`; unless `flat`, with its backing
    /// chain's as `backing-image`.
    fn image_info(node: &BlockNode, flat: bool) -> Value {
        let drv = node.driver();
        let filename = block::display_filename(drv);
        let mut image = Map::new();
        image.insert("virtual-size".into(), json!(drv.size()));
        image.insert("filename".into(), json!(filename));
        image.insert("format".into(), json!(drv.driver_name()));
        image.insert(
            "actual-size".into(),
            json!(drv.allocated_size().unwrap_or(0)),
        );
        if drv.has_info() {
            image.insert("dirty-flag".into(), Value::Bool(false));
        }
        drv.describe_image(&mut image);
        // QEMU reads the stored bitmaps from the image, where a bitmap
        // removed since the open is gone.
        let bitmaps = node.bitmaps_info();
        let stored = image
            .get_mut("format-specific")
            .and_then(|f| f.get_mut("data"))
            .and_then(Value::as_object_mut);
        if let Some(data) = stored {
            if let Some(Value::Array(list)) = data.get_mut("bitmaps") {
                list.retain(|b| {
                    bitmaps
                        .iter()
                        .any(|n| n["name"] == b["name"] && n["persistent"] == true)
                });
                if list.is_empty() {
                    data.remove("bitmaps");
                }
            }
        }
        if !flat {
            if let Some(backing) = drv.backing() {
                image.insert("backing-image".into(), Self::image_info(&backing, false));
            }
        }
        Value::Object(image)
    }

    /// `query-named-block-nodes`' entry for one node (BlockDeviceInfo).
    pub fn node_info(node: &BlockNode, flat: bool) -> Value {
        let drv = node.driver();
        let image = Self::image_info(node, flat);
        let filename = image["filename"].clone();
        let cache = drv.cache_mode();
        let mut info = json!({
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
        });
        if let Some(backing) = drv.backing() {
            info["backing_file"] = Value::from(block::display_filename(backing.driver()));
        }
        // QEMU counts the depth only while it gathers the backing images.
        if !flat {
            let mut depth = 0;
            let mut next = drv.backing();
            while let Some(layer) = next {
                depth += 1;
                next = layer.driver().backing();
            }
            info["backing_file_depth"] = Value::from(depth);
        }
        info
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
        let info = Graph::node_info(g.get("f0").unwrap(), false);
        assert_eq!(info["detect_zeroes"], "unmap");
        assert_eq!(Graph::node_info(raw, false)["detect_zeroes"], "off");
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
        assert_eq!(
            g.remove("n0", &|_| false).unwrap_err(),
            "Block device n0 is in use"
        );
        g.remove("r0", &|_| false).unwrap();
        g.remove("n0", &|_| false).unwrap();
        assert!(g.nodes().is_empty());
        assert_eq!(
            g.remove("n0", &|_| false).unwrap_err(),
            "Failed to find node with node-name='n0'"
        );
    }
    #[test]
    fn a_failed_open_leaves_none_of_its_inline_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.raw");
        std::fs::write(&plain, [0u8; 65536]).unwrap();
        let mut g = Graph::default();
        g.add(&null_opts("n0")).unwrap();
        // The children open, then the qcow2 node fails on a raw file.
        let opts = json!({"driver": "qcow2", "node-name": "q0",
            "file": {"driver": "file", "filename": plain},
            "backing": {"driver": "raw", "node-name": "b0",
                        "file": {"driver": "file", "node-name": "bf", "filename": plain}}});
        assert!(g.add(opts.as_object().unwrap()).is_err());
        // The file child opens, then the backing child fails.
        let opts = json!({"driver": "qcow2", "node-name": "q1",
            "file": {"driver": "file", "node-name": "qf", "filename": plain},
            "backing": {"driver": "raw", "file": "nope"}});
        assert!(g.add(opts.as_object().unwrap()).is_err());
        let names: Vec<&str> = g.nodes().iter().map(|n| n.name()).collect();
        assert_eq!(names, ["n0"]);
    }

    #[test]
    fn an_inline_backing_opens_read_only_and_is_listed_before_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        crate::block::qcow2::create(&base, 1 << 20, None).unwrap();
        let top = dir.path().join("top.qcow2");
        crate::block::qcow2::create(&top, 1 << 20, None).unwrap();
        let mut g = Graph::default();
        let opts = json!({"driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": top},
            "backing": {"driver": "qcow2", "node-name": "b0",
                        "file": {"driver": "file", "node-name": "bf", "filename": base}}});
        g.add(opts.as_object().unwrap()).unwrap();
        let ro = |name: &str| g.get(name).unwrap().driver().read_only();
        assert!(ro("b0") && ro("bf"));
        assert!(!ro("top"));
        let names: Vec<&str> = g.nodes().iter().map(|n| &n.name()[..2]).collect();
        assert_eq!(names, ["b0", "bf", "to", "#b"]);
    }

    #[test]
    fn nodes_a_header_opened_are_named_and_go_with_their_parent() {
        let dir = tempfile::tempdir().unwrap();
        let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
        crate::block::qcow2::create(&base, 1 << 20, None).unwrap();
        crate::block::qcow2::create(&top, 1 << 20, Some("base.qcow2")).unwrap();
        let mut g = Graph::default();
        let file = json!({"driver": "file", "node-name": "f0", "filename": top});
        g.add(file.as_object().unwrap()).unwrap();
        let qcow2 = json!({"driver": "qcow2", "node-name": "q0", "file": "f0"});
        g.add(qcow2.as_object().unwrap()).unwrap();
        let names: Vec<String> = g.nodes().iter().map(|n| n.name().to_string()).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(names[0].starts_with("#block") && names[1].starts_with("#block"));
        assert_eq!(names[2..], ["q0", "f0"]);
        assert!(g.get(&names[0]).unwrap().driver().read_only());
        assert_eq!(
            g.remove(&names[0], &|_| false).unwrap_err(),
            format!(
                "Node '{}' is busy: node is used as backing hd of 'q0'",
                names[0]
            )
        );
        assert_eq!(
            g.remove(&names[1], &|_| false).unwrap_err(),
            format!("Node {} is not owned by the monitor", names[1])
        );
        assert_eq!(
            g.remove("f0", &|_| false).unwrap_err(),
            "Block device f0 is in use"
        );
        g.remove("q0", &|_| false).unwrap();
        let names: Vec<&str> = g.nodes().iter().map(|n| n.name()).collect();
        assert_eq!(names, ["f0"]);
    }
}
