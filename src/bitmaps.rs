//! `block-dirty-bitmap-*` commands, with QEMU's rules on busy and recording
//! bitmaps.

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::block::bitmap::DirtyBitmap;
use crate::block::BlockNode;
use crate::daemon::Daemon;

/// The granularity QEMU picks when none is given.
const DEFAULT_GRANULARITY: u64 = 65536;

fn in_use(name: &str) -> String {
    format!("Bitmap '{name}' is currently in use by another operation and cannot be used")
}

fn not_found(name: &str) -> String {
    format!("Dirty bitmap '{name}' not found")
}

impl Daemon {
    pub fn bitmap_command(
        &mut self,
        command: &str,
        args: &Map<String, Value>,
    ) -> Result<(), String> {
        let node_name = args.get("node").and_then(Value::as_str).unwrap_or("");
        let node = self.graph.get(node_name).cloned().ok_or_else(|| {
            format!("Cannot find device='{node_name}' nor node-name='{node_name}'")
        })?;
        let name = args
            .get("name")
            .or_else(|| args.get("target"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match command {
            "block-dirty-bitmap-add" => self.bitmap_add(&node, &name, args),
            "block-dirty-bitmap-merge" => self.bitmap_merge(&node, &name, args),
            _ => {
                node.with_bitmap(&name, |bm| {
                    // Every one of these commands is refused on a busy bitmap.
                    if bm.busy {
                        return Err(in_use(&name));
                    }
                    match command {
                        "block-dirty-bitmap-clear" => bm.clear(),
                        "block-dirty-bitmap-enable" => bm.recording = true,
                        "block-dirty-bitmap-disable" => bm.recording = false,
                        _ => {}
                    }
                    Ok(())
                })?;
                if command == "block-dirty-bitmap-remove" {
                    node.remove_bitmap(&name);
                }
                Ok(())
            }
        }
    }

    fn bitmap_add(
        &mut self,
        node: &Arc<BlockNode>,
        name: &str,
        args: &Map<String, Value>,
    ) -> Result<(), String> {
        if node.has_bitmap(name) {
            return Err(format!("Bitmap already exists: {name}"));
        }
        let granularity = args
            .get("granularity")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_GRANULARITY);
        if granularity < 512 || !granularity.is_power_of_two() {
            return Err("Granularity must be power of 2 and at least 512".into());
        }
        let persistent = args.get("persistent").and_then(Value::as_bool) == Some(true);
        if persistent {
            // Only drivers that write QEMU's on-disk format (qcow2) take them.
            if !node.driver().stores_bitmaps() {
                return Err(format!(
                    "Can't store persistent bitmaps to {}: Operation not supported",
                    node.name()
                ));
            }
            node.driver()
                .check_new_persistent_bitmap(name, granularity)
                .map_err(|cause| {
                    format!(
                        "Can't make bitmap '{name}' persistent in '{}': {cause}",
                        node.name()
                    )
                })?;
        }
        let mut bm = DirtyBitmap::new(name, granularity, node.driver().size());
        bm.recording = args.get("disabled").and_then(Value::as_bool) != Some(true);
        bm.persistent = persistent;
        node.add_bitmap(bm);
        Ok(())
    }

    fn bitmap_merge(
        &mut self,
        node: &Arc<BlockNode>,
        target: &str,
        args: &Map<String, Value>,
    ) -> Result<(), String> {
        if !node.has_bitmap(target) {
            return Err(not_found(target));
        }
        if node.bitmap_busy(target) {
            return Err(in_use(target));
        }
        let mut sources = Vec::new();
        if let Some(Value::Array(list)) = args.get("bitmaps") {
            for item in list {
                let (src_node, src_name) = match item {
                    Value::String(s) => (Arc::clone(node), s.clone()),
                    Value::Object(o) => {
                        let n = o.get("node").and_then(Value::as_str).unwrap_or("");
                        let src = self.graph.lookup(n)?.clone();
                        (
                            src,
                            o.get("name")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                        )
                    }
                    _ => continue,
                };
                let bm = src_node
                    .bitmap(&src_name)
                    .ok_or_else(|| not_found(&src_name))?;
                if bm.busy {
                    return Err(in_use(&src_name));
                }
                sources.push(bm);
            }
        }
        let size = node.driver().size();
        node.with_bitmap(target, |bm| {
            for src in &sources {
                bm.merge_from(src, size);
            }
            Ok(())
        })
    }

    /// Checks that an NBD export may use bitmap `name` of `node`.
    pub fn check_export_bitmap(
        &self,
        node: &Arc<BlockNode>,
        name: &str,
        writable: bool,
    ) -> Result<(), String> {
        let bm = node
            .bitmap(name)
            .ok_or_else(|| format!("Bitmap '{name}' is not found"))?;
        if bm.busy {
            return Err(in_use(name));
        }
        // A read-only node cannot change, so its recording bitmaps stay exact.
        if bm.recording && !writable && !node.driver().read_only() {
            return Err(format!(
                "Enabled bitmap '{name}' incompatible with readonly export"
            ));
        }
        Ok(())
    }
}
