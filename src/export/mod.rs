//! Block exports: `block-export-add`, `block-export-del`,
//! `query-block-exports`, and the legacy `nbd-server-add`/`-remove`.

pub mod disk;
pub mod vhost;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::block::BlockNode;
use crate::daemon::{Daemon, MainMsg};
use disk::{MetaContext, NodeDisk};

/// Longest NBD export name or description QEMU accepts.
const NBD_MAX_STRING: usize = 4096;

pub enum ExportKind {
    Nbd { name: String },
    VhostUserBlk(vhost::VhostExport),
}

pub struct Export {
    pub id: String,
    pub node: Arc<BlockNode>,
    pub kind: ExportKind,
    /// Deleted, but requests are still draining.
    pub shutting_down: bool,
    /// The iothreads the export runs on.
    pub iothreads: Vec<String>,
    /// Dirty bitmaps the export holds busy.
    pub bitmaps: Vec<String>,
}

impl Export {
    fn type_name(&self) -> &'static str {
        match self.kind {
            ExportKind::Nbd { .. } => "nbd",
            ExportKind::VhostUserBlk(_) => "vhost-user-blk",
        }
    }
}

/// How long `block-export-del` waits for hard-dropped clients that have no
/// request in flight, before it leaves the export shutting down.
const IDLE_CLIENT_DRAIN: Duration = Duration::from_millis(200);

/// The last client of a removed NBD export is gone: told to the waiting
/// command, or, once it stopped waiting, to the main loop.
#[derive(Default)]
struct Drain {
    state: Mutex<DrainState>,
    done: Condvar,
}

#[derive(Default, PartialEq)]
enum DrainState {
    #[default]
    Waiting,
    Drained,
    GaveUp,
}

impl Drain {
    /// Whether the waiting command took the news.
    fn signal(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == DrainState::GaveUp {
            return false;
        }
        *state = DrainState::Drained;
        self.done.notify_all();
        true
    }

    /// Whether the clients were gone within `timeout`.
    fn wait(&self, timeout: Duration) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (mut state, _) = self
            .done
            .wait_timeout_while(state, timeout, |s| *s == DrainState::Waiting)
            .unwrap_or_else(|e| e.into_inner());
        if *state == DrainState::Drained {
            return true;
        }
        *state = DrainState::GaveUp;
        false
    }
}

/// All exports, newest first.
#[derive(Default)]
pub struct Exports {
    list: Vec<Export>,
}

impl Exports {
    pub fn get(&self, id: &str) -> Option<&Export> {
        self.list.iter().find(|e| e.id == id)
    }

    /// Whether an export serves `node` itself (its children are the
    /// graph's business).
    pub fn uses_node(&self, node: &Arc<BlockNode>) -> bool {
        self.list.iter().any(|e| Arc::ptr_eq(&e.node, node))
    }

    pub fn iothread_user(&self, iothread: &str) -> Option<&str> {
        self.list
            .iter()
            .find(|e| e.iothreads.iter().any(|t| t == iothread))
            .map(|e| e.id.as_str())
    }

    pub fn nbd_export_ids(&self) -> Vec<String> {
        self.list
            .iter()
            .filter(|e| matches!(e.kind, ExportKind::Nbd { .. }))
            .map(|e| e.id.clone())
            .collect()
    }

    /// Takes an export out of the table, stopping a vhost-user-blk export.
    pub fn remove(&mut self, id: &str) -> Option<Export> {
        let pos = self.list.iter().position(|e| e.id == id)?;
        let export = self.list.remove(pos);
        Some(export)
    }

    /// A node changed size: tell the front-ends.
    pub fn node_resized(&self, node: &Arc<BlockNode>) {
        for e in &self.list {
            if let ExportKind::VhostUserBlk(v) = &e.kind {
                if Arc::ptr_eq(&e.node, node) {
                    v.resized();
                }
            }
        }
    }
}

fn str_arg<'a>(args: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    args.get(key).and_then(Value::as_str)
}

fn bool_arg(args: &Map<String, Value>, key: &str) -> bool {
    args.get(key).and_then(Value::as_bool).unwrap_or(false)
}

impl Daemon {
    /// `block-export-add` and `--export`, with QEMU's checks in QEMU's order.
    pub fn block_export_add(&mut self, args: &Map<String, Value>) -> Result<(), String> {
        let id = str_arg(args, "id").unwrap_or("").to_string();
        if id.is_empty() {
            return Err("Invalid block export id".into());
        }
        if self.exports.get(&id).is_some() {
            return Err(format!("Block export id '{id}' is already in use"));
        }
        let node_name = str_arg(args, "node-name").unwrap_or("");
        let node = self.graph.lookup(node_name)?.clone();
        let mut iothreads = Vec::new();
        if let Some(t) = str_arg(args, "iothread") {
            if !self.iothreads.contains_key(t) {
                return Err(format!("iothread \"{t}\" not found"));
            }
            iothreads.push(t.to_string());
        }
        let writable = bool_arg(args, "writable");
        if writable && node.driver().read_only() {
            return Err("Cannot export read-only node as writable".into());
        }
        let export = match str_arg(args, "type") {
            Some("nbd") => self.nbd_export_create(&id, &node, args, iothreads)?,
            Some("vhost-user-blk") => self.vhost_export_create(&id, &node, args, iothreads)?,
            Some(other) => return Err(format!("Parameter 'type' does not accept value '{other}'")),
            None => return Err("Parameter 'type' is missing".into()),
        };
        log::info!(
            "export '{id}' ({}) of node '{node_name}' added",
            export.type_name()
        );
        self.exports.list.insert(0, export);
        Ok(())
    }

    fn nbd_export_create(
        &mut self,
        id: &str,
        node: &Arc<BlockNode>,
        args: &Map<String, Value>,
        iothreads: Vec<String>,
    ) -> Result<Export, String> {
        let Some(nbd) = self.nbd.as_ref() else {
            return Err("NBD server not running".into());
        };
        let name = str_arg(args, "name").unwrap_or(node.name()).to_string();
        if name.len() > NBD_MAX_STRING {
            return Err(format!("export name '{name}' too long"));
        }
        let description = str_arg(args, "description").map(str::to_string);
        if let Some(d) = &description {
            if d.len() > NBD_MAX_STRING {
                return Err(format!("description '{d}' too long"));
            }
        }
        if nbd.server.export_names().contains(&name) {
            return Err(format!("NBD server already has export named '{name}'"));
        }
        let writable = bool_arg(args, "writable");
        let mut contexts = Vec::new();
        if bool_arg(args, "allocation-depth") {
            contexts.push(MetaContext::AllocationDepth);
        }
        let mut bitmaps = Vec::new();
        if let Some(Value::Array(list)) = args.get("bitmaps") {
            for item in list {
                let (bm_node, bm_name) = match item {
                    Value::String(s) => (Arc::clone(node), s.clone()),
                    Value::Object(o) => {
                        let n = o.get("node").and_then(Value::as_str).unwrap_or("");
                        let b = o.get("name").and_then(Value::as_str).unwrap_or("");
                        (self.graph.lookup(n)?.clone(), b.to_string())
                    }
                    _ => continue,
                };
                self.check_export_bitmap(&bm_node, &bm_name, writable)?;
                contexts.push(MetaContext::DirtyBitmap(bm_name.clone()));
                bitmaps.push(bm_name);
            }
        }
        let iothread = iothreads.first().and_then(|t| self.iothreads.get(t));
        let config = nbd::ExportConfig {
            name: name.clone(),
            description,
            read_only: !writable,
            multi_conn: nbd.multi_conn(),
            meta_contexts: MetaContext::nbd_configs(&contexts),
            // Connections serving an export that names an iothread run on
            // that iothread's CPUs, as its vhost-user-blk workers do, and
            // poll as it says. Without one they never poll, as exports in
            // QEMU's main loop.
            on_serve: iothread.map(|t| crate::iothread::affinity_follower(t.thread_id())),
            poll_max: iothread.map_or(Duration::ZERO, |t| t.params().poll_max()),
        };
        let disk = NodeDisk::new(Arc::clone(node), bool_arg(args, "writethrough"), contexts);
        nbd.server
            .add_export(config, Arc::new(disk))
            .map_err(|e| e.to_string())?;
        for b in &bitmaps {
            node.set_bitmap_busy(b, true);
        }
        Ok(Export {
            id: id.to_string(),
            node: Arc::clone(node),
            kind: ExportKind::Nbd { name },
            shutting_down: false,
            iothreads,
            bitmaps,
        })
    }

    /// `block-export-del`: QEMU's order of the reply and `BLOCK_EXPORT_DELETED`.
    pub fn block_export_del(&mut self, args: &Map<String, Value>) -> Result<(), String> {
        let id = str_arg(args, "id").unwrap_or("").to_string();
        let hard = str_arg(args, "mode") == Some("hard");
        let Some(export) = self.exports.get(&id) else {
            return Err(format!("Export '{id}' is not found"));
        };
        if export.shutting_down {
            return Err(format!("Export '{id}' is already shutting down"));
        }
        match &export.kind {
            ExportKind::Nbd { name } => {
                let name = name.clone();
                let server = self
                    .nbd
                    .as_ref()
                    .map(|s| Arc::clone(&s.server))
                    .ok_or("NBD server not running")?;
                let connected = server.export_client_count(&name) > 0;
                let mode = if hard {
                    nbd::RemoveMode::Hard
                } else {
                    nbd::RemoveMode::Safe
                };
                let drain = Arc::new(Drain::default());
                let on_gone = {
                    let drain = Arc::clone(&drain);
                    let waker = self.waker.clone();
                    let id = id.clone();
                    Box::new(move || {
                        if !drain.signal() {
                            waker.send(MainMsg::ExportDrained(id));
                        }
                    })
                };
                server
                    .remove_export(&name, mode, on_gone)
                    .map_err(|e| match e {
                        nbd::Error::ExportInUse(_) => format!("export '{id}' still in use"),
                        other => other.to_string(),
                    })?;
                if !connected {
                    self.finish_export_removal(&id, false);
                } else if drain.wait(IDLE_CLIENT_DRAIN) {
                    // Idle clients leave at once, so as with QSD the export
                    // is gone before the next command: a pipelined
                    // blockdev-del of its node succeeds.
                    self.finish_export_removal(&id, true);
                } else if let Some(e) = self.exports.list.iter_mut().find(|e| e.id == id) {
                    // Requests are still draining; the event follows later.
                    e.shutting_down = true;
                }
            }
            ExportKind::VhostUserBlk(_) => {
                // As QSD: safe mode does not wait for the front-end; it is
                // disconnected and the socket removed before the reply.
                self.finish_export_removal(&id, false);
            }
        }
        Ok(())
    }

    /// Drops a deleted export and raises `BLOCK_EXPORT_DELETED`.
    fn finish_export_removal(&mut self, id: &str, after_reply: bool) {
        let Some(export) = self.exports.remove(id) else {
            return;
        };
        for b in &export.bitmaps {
            export.node.set_bitmap_busy(b, false);
        }
        if let ExportKind::VhostUserBlk(v) = export.kind {
            v.stop();
        }
        drop(export.node);
        self.prune_graph();
        log::info!("export '{id}' deleted");
        let data = Some(json!({ "id": id }));
        if after_reply {
            self.emit_event_after_reply("BLOCK_EXPORT_DELETED", data);
        } else {
            self.emit_event("BLOCK_EXPORT_DELETED", data);
        }
    }

    /// Drops the nodes only a deleted export still held.
    pub fn prune_graph(&mut self) {
        let exports = &self.exports;
        self.graph.prune(&|n| exports.uses_node(n));
    }

    /// The clients of a hard-deleted NBD export are gone.
    pub fn export_drained(&mut self, id: &str) {
        if self.exports.get(id).is_some_and(|e| e.shutting_down) {
            self.finish_export_removal(id, true);
        }
    }

    pub fn query_block_exports(&self) -> Value {
        Value::Array(
            self.exports
                .list
                .iter()
                .map(|e| {
                    json!({
                        "node-name": e.node.name(),
                        "shutting-down": e.shutting_down,
                        "type": e.type_name(),
                        "id": e.id,
                    })
                })
                .collect(),
        )
    }

    /// Legacy `nbd-server-add {device, name, writable, bitmap}`: the device is
    /// both the node and the export id.
    pub fn nbd_server_add(&mut self, args: &Map<String, Value>) -> Result<(), String> {
        if self.nbd.is_none() {
            return Err("NBD server not running".into());
        }
        let device = str_arg(args, "device").unwrap_or("").to_string();
        let mut export_args = Map::new();
        export_args.insert("type".into(), json!("nbd"));
        export_args.insert("id".into(), json!(device));
        export_args.insert("node-name".into(), json!(device));
        for key in ["name", "description", "writable", "allocation-depth"] {
            if let Some(v) = args.get(key) {
                export_args.insert(key.into(), v.clone());
            }
        }
        if let Some(b) = args.get("bitmap") {
            export_args.insert("bitmaps".into(), json!([b]));
        }
        self.block_export_add(&export_args)
    }

    /// Legacy `nbd-server-remove {name, mode}`.
    pub fn nbd_server_remove(&mut self, args: &Map<String, Value>) -> Result<(), String> {
        let name = str_arg(args, "name").unwrap_or("");
        let id = self
            .exports
            .list
            .iter()
            .find(|e| matches!(&e.kind, ExportKind::Nbd { name: n } if n == name))
            .map(|e| e.id.clone())
            .ok_or_else(|| format!("Export '{name}' is not found"))?;
        let mut del = Map::new();
        del.insert("id".into(), json!(id));
        if let Some(m) = args.get("mode") {
            del.insert("mode".into(), m.clone());
        }
        self.block_export_del(&del)
    }

    /// Stops every export at exit.
    pub fn shutdown_exports(&mut self) {
        for export in std::mem::take(&mut self.exports.list) {
            if let ExportKind::VhostUserBlk(v) = export.kind {
                v.stop();
            }
        }
    }
}
