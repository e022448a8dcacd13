//! `blkd demo`: a working daemon on a built-in default, with the exact
//! commands to try it from NBD clients, QMP and QEMU.

use std::process::ExitCode;

use crate::cli::{CliOption, OptionKind};

const DEMO_SIZE: u64 = 1 << 30;

pub fn run(args: &[String]) -> ExitCode {
    if !args.is_empty() {
        eprintln!("blkd demo: takes no arguments");
        return ExitCode::FAILURE;
    }
    let dir = std::env::temp_dir().join(format!("blkd-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("blkd demo: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let image = dir.join("disk.qcow2");
    if let Err(e) = crate::block::qcow2::create(&image, DEMO_SIZE, None) {
        eprintln!("blkd demo: cannot create {}: {e}", image.display());
        return ExitCode::FAILURE;
    }
    let d = dir.display().to_string();
    let opt = |kind, value: String| CliOption { kind, value };
    let options = vec![
        opt(OptionKind::Chardev, format!("socket,id=qmp0,path={d}/qmp.sock,server=on,wait=off")),
        opt(OptionKind::Monitor, "chardev=qmp0".into()),
        opt(OptionKind::Object, "iothread,id=io0".into()),
        opt(OptionKind::Blockdev, format!("file,node-name=file0,filename={d}/disk.qcow2")),
        opt(OptionKind::Blockdev, "qcow2,node-name=disk0,file=file0".into()),
        opt(OptionKind::NbdServer, format!("addr.type=unix,addr.path={d}/nbd.sock")),
        opt(
            OptionKind::Export,
            "nbd,id=nbd0,node-name=disk0,name=disk0,writable=on,allocation-depth=on".into(),
        ),
        opt(
            OptionKind::Export,
            format!(
                "vhost-user-blk,id=vhost0,node-name=disk0,addr.type=unix,addr.path={d}/vhost.sock,writable=on,num-queues=2,iothread=io0"
            ),
        ),
    ];
    println!(
        "blkd demo: a 1 GiB qcow2 image {d}/disk.qcow2, exported as node 'disk0'.

  NBD:
    nbdinfo 'nbd+unix:///disk0?socket={d}/nbd.sock'
    nbdinfo --map=qemu:allocation-depth 'nbd+unix:///disk0?socket={d}/nbd.sock'
    qemu-img info 'nbd+unix:///disk0?socket={d}/nbd.sock'
    qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' 'nbd+unix:///disk0?socket={d}/nbd.sock'

  QMP (qmp-shell comes with the PyPI package qemu.qmp):
    qmp-shell {d}/qmp.sock
    echo '{{\"execute\":\"qmp_capabilities\"}}{{\"execute\":\"query-block-exports\"}}' | socat - UNIX-CONNECT:{d}/qmp.sock

  vhost-user-blk (2 queues) for a QEMU guest:
    qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
        -chardev socket,id=c0,path={d}/vhost.sock -device vhost-user-blk-pci,chardev=c0,num-queues=2 ...

Press Ctrl-C to stop; {d} is removed on exit."
    );
    let code = crate::startup::run(options, false);
    let _ = std::fs::remove_dir_all(&dir);
    code
}
