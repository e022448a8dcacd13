//! The PyPI `qemu.qmp` client (what qmp-shell and QEMU's Python tooling use)
//! driving blkd: negotiation, commands, error classes and events.

mod common;

use common::{Daemon, Impl};

const SCRIPT: &str = r#"
import asyncio, sys
from qemu.qmp import QMPClient, ExecuteError

async def main(path, nbd_path):
    qmp = QMPClient('blkd-test')
    await qmp.connect(path)
    version = await qmp.execute('query-version')
    assert version['qemu']['major'] == 10, version
    names = [c['name'] for c in await qmp.execute('query-commands')]
    assert 'block-export-add' in names, names
    await qmp.execute('blockdev-add', {'driver': 'null-co', 'node-name': 'n0', 'size': 1048576})
    try:
        await qmp.execute('blockdev-add', {'driver': 'null-co', 'node-name': 'n0'})
        sys.exit('duplicate node accepted')
    except ExecuteError as e:
        assert e.error_class == 'GenericError', e.error_class
        assert e.error.error.desc == "Duplicate nodes with node-name='n0'", str(e)
    try:
        await qmp.execute('no-such-command')
        sys.exit('unknown command accepted')
    except ExecuteError as e:
        assert e.error_class == 'CommandNotFound', e.error_class
    await qmp.execute('nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': nbd_path}}})
    await qmp.execute('block-export-add', {'type': 'nbd', 'id': 'e0', 'node-name': 'n0'})
    await qmp.execute('block-export-del', {'id': 'e0'})
    event = await asyncio.wait_for(qmp.events.get(), 10)
    assert event['event'] == 'BLOCK_EXPORT_DELETED', event
    assert event['data'] == {'id': 'e0'}, event
    schema = await qmp.execute('query-qmp-schema')
    assert any(e['meta-type'] == 'command' and e['name'] == 'query-iothreads' for e in schema)
    await qmp.disconnect()
    print('ok')

asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;

#[test]
fn qemu_qmp_client_drives_blkd() {
    let python = ["python3", "/usr/bin/python3"].into_iter().find(|p| {
        std::process::Command::new(p)
            .args(["-c", "import qemu.qmp"])
            .status()
            .is_ok_and(|s| s.success())
    });
    let Some(python) = python else {
        assert!(
            std::env::var_os("BLKD_TESTS_NEED_TOOLS").is_none(),
            "no python3 with qemu.qmp, though scripts/install-deps.sh should have installed it"
        );
        eprintln!("skipping: no python3 with qemu.qmp (scripts/install-deps.sh installs it)");
        return;
    };
    let d = Daemon::start(Impl::Blkd, &[]);
    let out = common::run_ok(
        python,
        &[
            "-c",
            SCRIPT,
            d.path("qmp.sock").to_str().unwrap(),
            d.path("nbd.sock").to_str().unwrap(),
        ],
    );
    assert_eq!(out.trim(), "ok");
}
