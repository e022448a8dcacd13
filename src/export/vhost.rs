//! vhost-user-blk exports: argument checks, queue-to-thread mapping, and the
//! running device from the `vhost_blk` crate.
//!
//! Queues and threads:
//! - no `iothread`: every queue gets a worker thread of its own
//!   (`<export-id>-q<N>`), so queues run truly in parallel;
//! - `iothread: X`: all queues share one worker that belongs to iothread X, as
//!   QSD runs them all in X;
//! - `iothread-vq-mapping: [{iothread, vqs?}, ...]` (QEMU's virtio-blk list
//!   form): each listed iothread gets one worker for its queues; entries with
//!   `vqs` take those queues, the rest are spread round-robin over the
//!   entries without `vqs`.
//!
//! A worker that belongs to an iothread is named after it and copies its CPU
//! affinity when it starts, so pinning the iothread (by the `thread-id` of
//! `query-iothreads`) and reconnecting pins the queue work too.

use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::disk::NodeDisk;
use super::{Export, ExportKind};
use crate::block::BlockNode;
use crate::daemon::Daemon;

const LBS_ERROR: &str = "parameter logical-block-size must be a power of 2 between 512 and 2097152";

/// A running vhost-user-blk export.
pub struct VhostExport {
    runner: vhost_blk::BlkExport,
    /// The socket file we created, removed when the export goes.
    socket: Option<PathBuf>,
}

impl VhostExport {
    pub fn resized(&self) {
        self.runner.resize();
    }

    /// Disconnects the front-end, stops the workers and removes the socket.
    pub fn stop(self) {
        self.runner.stop();
        if let Some(path) = self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The listening socket from `addr`.
fn listen(addr: &Map<String, Value>) -> Result<(UnixListener, Option<PathBuf>), String> {
    let get = |k: &str| addr.get(k).and_then(Value::as_str).unwrap_or("");
    match get("type") {
        "unix" => {
            let path = get("path");
            let listener = crate::daemon::bind_unix(path)?;
            Ok((listener, Some(PathBuf::from(path))))
        }
        "fd" => {
            let s = get("str");
            let fd: RawFd = s
                .parse()
                .map_err(|_| "only QEMU supports file descriptor passing".to_string())?;
            match crate::nbd_server::listener_from_fd(fd)? {
                crate::nbd_server::Listener::Unix { listener, .. } => Ok((listener, None)),
                _ => Err("Only socket address types 'unix' and 'fd' are supported".into()),
            }
        }
        _ => Err("Only socket address types 'unix' and 'fd' are supported".into()),
    }
}

impl Daemon {
    /// Works out which worker serves which queues.
    fn queue_groups(
        &self,
        id: &str,
        num_queues: u16,
        args: &Map<String, Value>,
    ) -> Result<(Vec<vhost_blk::QueueGroup>, Vec<String>), String> {
        let group = |name: &str, queues: Vec<u16>, iothread: Option<&str>| {
            let thread = iothread.and_then(|t| self.iothreads.get(t));
            vhost_blk::QueueGroup {
                name: name.to_string(),
                queues,
                on_worker_start: thread.map(|t| crate::iothread::affinity_follower(t.thread_id())),
                // An iothread's workers poll as the iothread says; workers of
                // their own poll as vhost_blk measured best.
                poll_max: thread.map_or(vhost_blk::DEFAULT_POLL_MAX, |t| t.params().poll_max()),
            }
        };
        let mapping = args.get("iothread-vq-mapping").and_then(Value::as_array);
        let iothread = args.get("iothread").and_then(Value::as_str);
        match (iothread, mapping) {
            (Some(_), Some(_)) => Err(
                "iothread and iothread-vq-mapping properties cannot be set at the same time".into(),
            ),
            (Some(t), None) => Ok((
                vec![group(t, (0..num_queues).collect(), Some(t))],
                vec![t.to_string()],
            )),
            (None, None) => Ok((
                (0..num_queues)
                    .map(|q| group(&format!("{id}-q{q}"), vec![q], None))
                    .collect(),
                Vec::new(),
            )),
            (None, Some(entries)) => {
                let mut names = Vec::new();
                let mut queues: Vec<Vec<u16>> = Vec::new();
                let mut owner: Vec<Option<usize>> = vec![None; usize::from(num_queues)];
                let mut spread = Vec::new();
                for (i, entry) in entries.iter().enumerate() {
                    let t = entry.get("iothread").and_then(Value::as_str).unwrap_or("");
                    if !self.iothreads.contains_key(t) {
                        return Err(format!("IOThread \"{t}\" object not found"));
                    }
                    if names.iter().any(|n| n == t) {
                        return Err(format!(
                            "duplicate IOThread name \"{t}\" in iothread-vq-mapping"
                        ));
                    }
                    names.push(t.to_string());
                    queues.push(Vec::new());
                    match entry.get("vqs").and_then(Value::as_array) {
                        Some(vqs) => {
                            for vq in vqs {
                                let q = vq.as_u64().unwrap_or(u64::MAX);
                                let slot = owner.get_mut(q as usize).ok_or_else(|| {
                                    format!("vq index {q} for IOThread \"{t}\" must be less than num_queues {num_queues} in iothread-vq-mapping")
                                })?;
                                if slot.is_some() {
                                    return Err(format!("cannot assign vq {q} to IOThread \"{t}\" because it is already assigned"));
                                }
                                *slot = Some(i);
                                queues[i].push(q as u16);
                            }
                        }
                        None => spread.push(i),
                    }
                }
                let unassigned: Vec<u16> = (0..num_queues)
                    .filter(|q| owner[usize::from(*q)].is_none())
                    .collect();
                if !unassigned.is_empty() && spread.is_empty() {
                    return Err(format!(
                        "missing vq {} IOThread assignment in iothread-vq-mapping",
                        unassigned[0]
                    ));
                }
                for (n, q) in unassigned.into_iter().enumerate() {
                    queues[spread[n % spread.len()]].push(q);
                }
                let groups = names
                    .iter()
                    .zip(queues)
                    .filter(|(_, q)| !q.is_empty())
                    .map(|(t, q)| group(t, q, Some(t)))
                    .collect();
                Ok((groups, names))
            }
        }
    }

    pub(super) fn vhost_export_create(
        &mut self,
        id: &str,
        node: &Arc<BlockNode>,
        args: &Map<String, Value>,
        mut iothreads: Vec<String>,
    ) -> Result<Export, String> {
        let lbs = args
            .get("logical-block-size")
            .and_then(Value::as_u64)
            .unwrap_or(512);
        // Unlike QSD, 0 is refused: a device with blk_size 0 confuses guests.
        if !lbs.is_power_of_two() || !(512..=2 * 1024 * 1024).contains(&lbs) {
            return Err(LBS_ERROR.into());
        }
        let num_queues = args.get("num-queues").and_then(Value::as_u64).unwrap_or(1);
        if num_queues == 0 {
            return Err("num-queues must be greater than 0".into());
        }
        if num_queues > u64::from(vhost_blk::MAX_NUM_QUEUES) {
            return Err(format!(
                "num-queues must be at most {} (queues are mapped to worker threads with 64-bit masks)",
                vhost_blk::MAX_NUM_QUEUES
            ));
        }
        let num_queues = num_queues as u16;
        let (groups, mapped) = self.queue_groups(id, num_queues, args)?;
        for t in mapped {
            if !iothreads.contains(&t) {
                iothreads.push(t);
            }
        }
        let addr = match args.get("addr") {
            Some(Value::Object(a)) => a.clone(),
            _ => return Err("Parameter 'addr' is missing".into()),
        };
        let (listener, socket) = listen(&addr)?;
        let writable = args
            .get("writable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let writethrough = args
            .get("writethrough")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let config = vhost_blk::BlkConfig {
            serial: id.to_string(),
            num_queues,
            logical_block_size: lbs as u32,
            writable,
            writethrough,
            thread_groups: groups,
            ..vhost_blk::BlkConfig::new(id)
        };
        // The device flushes itself while the guest runs in writethrough
        // mode, so the disk adapter must not flush a second time.
        let disk = Arc::new(NodeDisk::new(Arc::clone(node), false, Vec::new()));
        let listener = vhost::vhost_user::Listener::from(listener);
        let runner = vhost_blk::BlkExport::start(listener, disk, config).map_err(|e| {
            if let Some(path) = &socket {
                let _ = std::fs::remove_file(path);
            }
            e.to_string()
        })?;
        Ok(Export {
            id: id.to_string(),
            node: Arc::clone(node),
            kind: ExportKind::VhostUserBlk(VhostExport { runner, socket }),
            shutting_down: false,
            iothreads,
            bitmaps: Vec::new(),
        })
    }
}
