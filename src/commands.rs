//! QMP command handlers. Arguments arrive checked against the schema
//! (`src/qapi/schema.json`), so handlers only apply QEMU's semantic rules.

use serde_json::{json, Map, Value};

use qmp::QmpError;

use crate::daemon::Daemon;
use crate::graph::Graph;
use crate::iothread::{IoThread, IoThreadParams};

type CmdResult = Result<Value, QmpError>;

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

fn str_arg<'a>(args: &'a Map<String, Value>, key: &str) -> &'a str {
    args.get(key).and_then(Value::as_str).unwrap_or("")
}

impl Daemon {
    /// Runs one command with validated arguments.
    pub fn execute(&mut self, name: &str, args: Map<String, Value>) -> CmdResult {
        log::debug!("qmp: {name} {}", Value::Object(args.clone()));
        match name {
            "query-version" => Ok(crate::version_info()),
            "query-commands" => Ok(Value::Array(
                self.schema
                    .command_names()
                    .into_iter()
                    .map(|n| json!({ "name": n }))
                    .collect(),
            )),
            "query-qmp-schema" => Ok(self.schema.introspect()),
            "quit" => {
                self.quit = true;
                Ok(json!({}))
            }
            "blockdev-add" => self.blockdev_add(&args).map(|_| json!({})).map_err(generic),
            "blockdev-del" => self.blockdev_del(str_arg(&args, "node-name")),
            "query-named-block-nodes" => {
                let flat = args.get("flat").and_then(Value::as_bool).unwrap_or(false);
                Ok(Value::Array(
                    self.graph
                        .nodes()
                        .iter()
                        .map(|n| self.node_info(n, flat))
                        .collect(),
                ))
            }
            "block_resize" => self.block_resize(&args),
            "object-add" => self.object_add(&args).map(|_| json!({})).map_err(generic),
            "object-del" => self.object_del(str_arg(&args, "id")),
            "query-iothreads" => Ok(Value::Array(
                self.iothreads
                    .values()
                    .map(|t| {
                        let p = t.params();
                        json!({
                            "id": t.id(),
                            "thread-id": t.thread_id(),
                            "poll-max-ns": p.poll_max_ns,
                            "poll-grow": p.poll_grow,
                            "poll-shrink": p.poll_shrink,
                            "aio-max-batch": p.aio_max_batch,
                        })
                    })
                    .collect(),
            )),
            "nbd-server-start" => self
                .nbd_server_start_qmp(&args)
                .map(|_| json!({}))
                .map_err(generic),
            "nbd-server-stop" => self.nbd_server_stop().map(|_| json!({})).map_err(generic),
            "nbd-server-add" => self
                .nbd_server_add(&args)
                .map(|_| json!({}))
                .map_err(generic),
            "nbd-server-remove" => self
                .nbd_server_remove(&args)
                .map(|_| json!({}))
                .map_err(generic),
            "block-export-add" => self
                .block_export_add(&args)
                .map(|_| json!({}))
                .map_err(generic),
            "block-export-del" => self
                .block_export_del(&args)
                .map(|_| json!({}))
                .map_err(generic),
            "query-block-exports" => Ok(self.query_block_exports()),
            "block-dirty-bitmap-add"
            | "block-dirty-bitmap-remove"
            | "block-dirty-bitmap-clear"
            | "block-dirty-bitmap-enable"
            | "block-dirty-bitmap-disable"
            | "block-dirty-bitmap-merge" => self
                .bitmap_command(name, &args)
                .map(|_| json!({}))
                .map_err(generic),
            _ => Err(QmpError::command_not_found(name)),
        }
    }

    pub fn blockdev_add(&mut self, args: &Map<String, Value>) -> Result<(), String> {
        self.graph.add(args).map(|_| ())
    }

    fn blockdev_del(&mut self, name: &str) -> CmdResult {
        let node = self
            .graph
            .get(name)
            .cloned()
            .ok_or_else(|| generic(format!("Failed to find node with node-name='{name}'")))?;
        if self.exports.uses_node(&node) {
            return Err(generic(format!("Node {name} is in use")));
        }
        drop(node);
        let exports = &self.exports;
        self.graph
            .remove(name, &|n| exports.uses_node(n))
            .map_err(generic)?;
        Ok(json!({}))
    }

    fn node_info(&self, node: &crate::block::BlockNode, flat: bool) -> Value {
        let mut info = Graph::node_info(node, flat);
        let bitmaps = node.bitmaps_info();
        if !bitmaps.is_empty() {
            info["dirty-bitmaps"] = Value::Array(bitmaps);
        }
        info
    }

    fn block_resize(&mut self, args: &Map<String, Value>) -> CmdResult {
        let size = args.get("size").and_then(Value::as_i64).unwrap_or(-1);
        let node = match (args.get("node-name"), args.get("device")) {
            (Some(Value::String(n)), _) => self.graph.lookup(n).map_err(generic)?.clone(),
            (_, Some(Value::String(d))) => self
                .graph
                .get(d)
                .cloned()
                .ok_or_else(|| generic(format!("Cannot find device='{d}' nor node-name=''")))?,
            _ => return Err(generic("Cannot find device='' nor node-name=''")),
        };
        if size < 0 {
            return Err(generic("Parameter 'size' expects a >0 size"));
        }
        self.graph.check_not_backing(&node).map_err(generic)?;
        if node.driver().read_only() {
            return Err(generic("Image is read-only"));
        }
        node.resize(size as u64)
            .map_err(|e| generic(resize_error_text(&e)))?;
        self.exports.node_resized(&node);
        Ok(json!({}))
    }

    pub fn object_add(&mut self, args: &Map<String, Value>) -> Result<(), String> {
        let id = str_arg(args, "id").to_string();
        let qom_type = str_arg(args, "qom-type").to_string();
        if !crate::graph::is_valid_node_name(&id) {
            return Err("Parameter 'id' expects an identifier".into());
        }
        if self.iothreads.contains_key(&id) || self.objects.contains_key(&id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        match qom_type.as_str() {
            "iothread" => {
                let params = IoThreadParams::from_props(args)?;
                let thread = IoThread::spawn(&id, params)
                    .map_err(|e| format!("Failed to start iothread '{id}': {e}"))?;
                self.iothreads.insert(id, thread);
            }
            _ => {
                let mut props = args.clone();
                props.remove("id");
                props.remove("qom-type");
                self.tls.add(&id, &qom_type, &props)?;
                self.objects.insert(id, qom_type);
            }
        }
        Ok(())
    }

    fn object_del(&mut self, id: &str) -> CmdResult {
        if self.iothreads.contains_key(id) {
            if let Some(user) = self.exports.iothread_user(id) {
                return Err(generic(format!(
                    "object '{id}' can't be deleted: it is in use by export '{user}'"
                )));
            }
            if let Some(thread) = self.iothreads.remove(id) {
                thread.stop();
            }
            return Ok(json!({}));
        }
        if self.objects.contains_key(id) {
            if let Some(user) = self.nbd_object_user(id) {
                return Err(generic(format!(
                    "object '{id}' can't be deleted: it is in use by {user}"
                )));
            }
            self.objects.remove(id);
            self.tls.remove(id);
            return Ok(json!({}));
        }
        Err(generic(format!("object '{id}' not found")))
    }
}

/// QEMU's texts for resize failures.
fn resize_error_text(e: &std::io::Error) -> String {
    match e.kind() {
        // A driver's own refusal, in QEMU's words.
        std::io::ErrorKind::InvalidInput if e.get_ref().is_some() => e.to_string(),
        std::io::ErrorKind::Unsupported => "Image format driver does not support resize".into(),
        _ => format!("Could not resize: {}", crate::errno_text(e)),
    }
}
