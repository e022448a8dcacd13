#!/usr/bin/env python3
"""Benchmarks blkd against its peers in one run; started by scripts/bench.sh.

NBD: blkd, qemu-storage-daemon, qemu-nbd and nbdkit (file plugin) serve
identical copies of one raw image, driven by fio's nbd engine over a unix
socket and over TCP.
vhost-user-blk: blkd and qemu-storage-daemon, driven by the vublk example
(a virtio-driver based userspace driver), on null-co and on a raw file.

The machine is noisy (two shared cores, throughput drifting over minutes), so
servers are interleaved run by run within each case (the order rotates each
round), results are medians over rounds, and each server is compared with the
best peer of the same case. Server CPU time (utime+stime of the whole process,
from /proc/PID/stat) is sampled around every run, giving work per server
CPU-second: I/Os for 4k cases, MiB for 1M cases.

Standard library only. This is a benchmark, never a test.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20

NBD_SERVERS = ["blkd", "qsd", "qemu-nbd", "nbdkit"]
# Only when asked for by --servers: nbdkit serving each connection on one
# thread, as blkd serves QD1 clients, to tell design from scheduling.
OPT_IN_SERVERS = ["nbdkit-1thread"]
VHOST_SERVERS = ["blkd", "qsd"]
PROGRAMS = {
    "qsd": "qemu-storage-daemon",
    "qemu-nbd": "qemu-nbd",
    "nbdkit": "nbdkit",
    "nbdkit-1thread": "nbdkit",
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def cpu_seconds(pid):
    """utime + stime of all threads of process `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # The command name may contain spaces; fields resume after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warm(path):
    """Reads the image so it is in the page cache (idle cache is reclaimed
    after about a minute on these machines)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MIB)
        while f.readinto(buf):
            pass


def make_image(path, size):
    """A raw image full of random data, so nothing is sparse or zero."""
    chunk = os.urandom(16 * MIB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


class Server:
    """A server process; `ready` is ("unix", path) or ("tcp", port)."""

    def __init__(self, name, argv, ready, logdir, tag):
        self.name = name
        self.argv = argv
        self.ready = ready
        self.log_path = os.path.join(logdir, f"{tag}-{name}.log")
        self.proc = None

    def start(self):
        if self.ready[0] == "unix" and os.path.exists(self.ready[1]):
            os.unlink(self.ready[1])
        logf = open(self.log_path, "ab")
        logf.write(("$ " + " ".join(self.argv) + "\n").encode())
        logf.flush()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf
        )
        logf.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} at startup; see {self.log_path}"
                )
            if self.is_listening():
                return
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} is not listening after 15 s; see {self.log_path}")

    def is_listening(self):
        kind, where = self.ready
        if kind == "unix":
            return os.path.exists(where)
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", where)) == 0

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def qsd_like_argv(program, blockdevs, tail):
    argv = [program]
    for b in blockdevs:
        argv += ["--blockdev", b]
    return argv + tail


def file_blockdevs(image):
    return [f"file,node-name=f0,filename={image},cache.direct=off", "raw,node-name=n0,file=f0"]


def nbd_server(name, transport, image, rundir, logdir, blkd):
    """The server `name` exporting `image` as "disk"; returns it with the
    fio URI that reaches it."""
    if transport == "unix":
        sock = os.path.join(rundir, f"nbd-{name}.sock")
        ready = ("unix", sock)
        uri = f"nbd+unix:///disk?socket={sock}"
        addr = f"addr.type=unix,addr.path={sock}"
    else:
        port = free_tcp_port()
        ready = ("tcp", port)
        uri = f"nbd://127.0.0.1:{port}/disk"
        addr = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
    if name in ("blkd", "qsd"):
        program = blkd if name == "blkd" else PROGRAMS["qsd"]
        argv = qsd_like_argv(
            program,
            file_blockdevs(image),
            ["--nbd-server", addr, "--export", "nbd,id=e0,node-name=n0,name=disk,writable=on"],
        )
    elif name == "qemu-nbd":
        # Writeback cache and thread pool AIO, as QSD's file node above.
        argv = ["qemu-nbd", "-f", "raw", "-x", "disk", "-t", "-e", "8", "--cache=writeback"]
        argv += ["-k", ready[1]] if transport == "unix" else ["-b", "127.0.0.1", "-p", str(ready[1])]
        argv.append(image)
    elif name in ("nbdkit", "nbdkit-1thread"):
        argv = ["nbdkit", "-f", "--exit-with-parent"]
        if name == "nbdkit-1thread":
            argv += ["--threads", "1"]
        argv += ["-U", ready[1]] if transport == "unix" else ["-i", "127.0.0.1", "-p", str(ready[1])]
        argv += ["file", image]
    else:
        raise ValueError(name)
    return Server(name, argv, ready, logdir, f"nbd-{transport}"), uri


def vhost_server(name, backend, image, null_size, rundir, logdir, blkd):
    sock = os.path.join(rundir, f"vhost-{backend}-{name}.sock")
    if backend == "null":
        blockdevs = [f"null-co,node-name=n0,size={null_size}"]
    else:
        blockdevs = file_blockdevs(image)
    program = blkd if name == "blkd" else PROGRAMS["qsd"]
    argv = qsd_like_argv(
        program,
        blockdevs,
        [
            "--export",
            f"vhost-user-blk,id=v0,node-name=n0,addr.type=unix,addr.path={sock},writable=on,num-queues=2",
        ],
    )
    return Server(name, argv, ("unix", sock), logdir, f"vhost-{backend}"), sock


def start_all(servers):
    """Starts the servers; one that fails is retried before each of its
    runs, and those runs are recorded as failed."""
    for s in servers:
        try:
            s.start()
        except RuntimeError as e:
            log(f"  {e}")


class Case:
    def __init__(self, group, name, rw, bs, iodepth, queues=1, pin_cpu=None):
        self.group = group  # e.g. "nbd-unix", "vhost-null"
        self.name = name
        self.rw = rw
        self.bs = bs
        self.iodepth = iodepth
        self.queues = queues
        # Run the server's threads and the client on this one CPU.
        self.pin_cpu = pin_cpu

    @property
    def id(self):
        return f"{self.group}/{self.name}"

    @property
    def unit(self):
        """What counts as work per CPU-second: I/Os for small blocks, MiB for
        large ones."""
        return "MiB" if self.bs >= MIB else "IO"


def nbd_cases(transport):
    g = f"nbd-{transport}"
    return [
        Case(g, "randread-4k-qd1", "randread", 4096, 1),
        # At QD1 the scheduler's placement dominates: on these VMs a wake-up
        # across CPUs costs several times the request itself, and whether a
        # server's thread happens to share the client's CPU swings results by
        # 2-3x. Pinned, every server gets the same placement.
        Case(g, "randread-4k-qd1-cpu0", "randread", 4096, 1, pin_cpu=0),
        Case(g, "randread-4k-qd32", "randread", 4096, 32),
        Case(g, "randwrite-4k-qd32", "randwrite", 4096, 32),
        Case(g, "read-1m-qd8", "read", MIB, 8),
        Case(g, "write-1m-qd8", "write", MIB, 8),
    ]


def vhost_cases(backend):
    g = f"vhost-{backend}"
    cases = []
    for qd in (1, 32, 128):
        for q in (1, 2):
            cases.append(Case(g, f"randread-4k-qd{qd}-q{q}", "randread", 4096, qd, q))
    for q in (1, 2):
        cases.append(Case(g, f"randwrite-4k-qd32-q{q}", "randwrite", 4096, 32, q))
    cases.append(Case(g, "read-1m-qd8-q1", "read", MIB, 8, 1))
    return cases


def run_fio(case, uri, runtime, outdir, tag):
    out = os.path.join(outdir, f"fio-{tag}.json")
    argv = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={case.rw}",
        f"--bs={case.bs}", f"--iodepth={case.iodepth}", "--numjobs=1", "--time_based",
        f"--runtime={runtime}", "--output-format=json", f"--output={out}",
    ]
    pin = None
    if case.pin_cpu is not None:
        pin = lambda: os.sched_setaffinity(0, {case.pin_cpu})  # noqa: E731
    p = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=runtime + 60, preexec_fn=pin
    )
    if p.returncode != 0:
        raise RuntimeError(f"fio exited with {p.returncode}: {p.stderr.decode(errors='replace').strip()}")
    with open(out) as f:
        text = f.read()
    # fio may print notes before the JSON object.
    job = json.loads(text[text.index("{") :])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    d = job["write"] if "write" in case.rw else job["read"]
    runtime_s = job["job_runtime"] / 1000.0
    pct = d.get("clat_ns", {}).get("percentile", {})
    return {
        "ios": d["total_ios"],
        "runtime_s": runtime_s,
        "iops": d["iops"],
        "mib_s": d["bw_bytes"] / MIB,
        "lat_mean_us": d["lat_ns"]["mean"] / 1000.0,
        "lat_p99_us": pct.get("99.000000", 0) / 1000.0,
    }


def run_vublk(case, vublk, sock, runtime):
    argv = [
        vublk, "bench", "--socket", sock, "--rw", case.rw, "--bs", str(case.bs),
        "--iodepth", str(case.iodepth), "--queues", str(case.queues), "--runtime", str(runtime),
    ]
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=runtime + 60)
    if p.returncode != 0:
        raise RuntimeError(f"vublk exited with {p.returncode}: {p.stderr.decode(errors='replace').strip()}")
    r = json.loads(p.stdout)
    return {k: r[k] for k in ("ios", "runtime_s", "iops", "mib_s", "lat_mean_us", "lat_p99_us")}


def set_affinity(pid, cpus):
    """Every thread of process `pid` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass


def measure(server, case, client, image):
    """One run: warm the image, sample server CPU around the client."""
    if not server.alive():
        log(f"  {server.name} is not running; restarting it")
        server.start()
    os.sync()
    if image:
        warm(image)
    if case.pin_cpu is not None:
        set_affinity(server.proc.pid, {case.pin_cpu})
    cpu0 = cpu_seconds(server.proc.pid)
    try:
        result = client()
    finally:
        if case.pin_cpu is not None and server.alive():
            set_affinity(server.proc.pid, os.sched_getaffinity(0))
    cpu1 = cpu_seconds(server.proc.pid)
    cpu = cpu1 - cpu0
    work = result["ios"] * case.bs / MIB if case.unit == "MiB" else result["ios"]
    result["server_cpu_s"] = cpu
    result["server_cpu_pct"] = 100.0 * cpu / result["runtime_s"] if result["runtime_s"] else 0.0
    # CPU time is counted in 1/CLK_TCK steps; avoid dividing by zero.
    result["work_per_cpu_s"] = work / max(cpu, 1.0 / CLK_TCK)
    # The inverse, in readable units: CPU microseconds per I/O, or CPU
    # seconds per GiB.
    scale = 1024.0 if case.unit == "MiB" else 1e6
    result["cpu_cost"] = scale * cpu / work if work else None
    return result


def run_group(cases, servers, client_for, images, rounds, results):
    """Runs every case `rounds` times, interleaving the servers. `images`
    maps a server name to the image file to warm before its runs."""
    for case in cases:
        for rnd in range(rounds):
            # Rotate the order each round so no server always runs first.
            order = servers[rnd % len(servers) :] + servers[: rnd % len(servers)]
            for server in order:
                entry = {"case": case.id, "server": server.name, "round": rnd}
                try:
                    client = client_for(server, case, rnd)
                    entry.update(measure(server, case, client, images.get(server.name)))
                    log(
                        f"  {case.id:34} {server.name:9} round {rnd}: "
                        f"{entry['iops']:>10.0f} IOPS {entry['mib_s']:>8.1f} MiB/s "
                        f"cpu {entry['server_cpu_s']:.2f}s"
                    )
                except (RuntimeError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                    entry["error"] = str(e)
                    log(f"  {case.id:34} {server.name:9} round {rnd}: FAILED: {e}")
                results.append(entry)


METRICS = [
    "iops", "mib_s", "lat_mean_us", "lat_p99_us", "server_cpu_s", "server_cpu_pct",
    "work_per_cpu_s", "cpu_cost",
]


def peers_of(items, server_of):
    """The items a ratio compares blkd with: those of servers other than
    blkd, or all of them when blkd ran alone."""
    return [i for i in items if server_of(i) != "blkd"] or list(items)


def summarise(cases, runs):
    """Medians per case and server, and ratios to the best peer (the best
    server other than blkd; with blkd alone, blkd itself)."""
    summary = []
    for case in cases:
        rows = []
        servers = []
        for r in runs:
            if r["case"] == case.id and r["server"] not in servers:
                servers.append(r["server"])
        for name in servers:
            ok = [r for r in runs if r["case"] == case.id and r["server"] == name and "error" not in r]
            failed = sum(1 for r in runs if r["case"] == case.id and r["server"] == name and "error" in r)
            row = {"case": case.id, "server": name, "unit": case.unit, "runs": len(ok), "failed": failed}
            for m in METRICS:
                vals = [r[m] for r in ok if r.get(m) is not None]
                row[m] = statistics.median(vals) if vals else None
            rows.append(row)
        peers = peers_of([r for r in rows if r["iops"] is not None], lambda r: r["server"])
        for row in rows:
            for m, higher_is_better in (("iops", True), ("work_per_cpu_s", True), ("lat_mean_us", False)):
                vals = [p[m] for p in peers if p[m]]
                best = (max if higher_is_better else min)(vals) if vals else None
                if row[m] is None or not best:
                    row[f"{m}_ratio"] = None
                elif higher_is_better:
                    row[f"{m}_ratio"] = row[m] / best
                else:
                    # >1 means faster than the best peer.
                    row[f"{m}_ratio"] = best / row[m] if row[m] else None
            row["best_peer"] = max(peers, key=lambda p: p["iops"])["server"] if peers else None
            for m in ("iops", "work_per_cpu_s"):
                row[f"{m}_ratio_range"] = round_ratio_range(runs, case.id, row["server"], m)
        summary.extend(rows)
    return summary


def round_ratio_range(runs, case_id, server, metric):
    """The lowest and highest of `server`'s per-round ratios to the best
    peer of the same round (runs of one round are back to back, so each
    ratio sees the machine in one state): how far a median ratio can be
    trusted on a noisy host. None without two such rounds."""
    by_round = {}
    for r in runs:
        if r["case"] == case_id and "error" not in r and r.get(metric):
            by_round.setdefault(r["round"], {})[r["server"]] = r[metric]
    ratios = []
    for values in by_round.values():
        peers = [v for _, v in peers_of(list(values.items()), lambda item: item[0])]
        if server in values and peers:
            ratios.append(values[server] / max(peers))
    return [min(ratios), max(ratios)] if len(ratios) >= 2 else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def fmt_range(r):
    return "-" if r is None else f"{r[0]:.2f}-{r[1]:.2f}"


def tsv_cell(v):
    if v is None:
        return ""
    return fmt_range(v) if isinstance(v, list) else str(v)


def table(summary):
    width = max([9] + [len(r["server"]) for r in summary])
    head = (
        f"{'case':34} {'server':{width}} {'IOPS':>9} {'MiB/s':>8} {'lat us':>8} {'p99 us':>8} "
        f"{'srv CPU%':>8} {'work/CPU-s':>12} {'CPU cost':>12} {'xIOPS':>6} {'xLAT':>6} {'xWORK':>6} "
        f"{'xIOPS range':>11} {'xWORK range':>11}"
    )
    lines = [head, "-" * len(head)]
    last = None
    for r in summary:
        if last is not None and r["case"] != last:
            lines.append("")
        last = r["case"]
        work = "-" if r["work_per_cpu_s"] is None else f"{r['work_per_cpu_s']:.0f} {r['unit']}"
        cost_unit = "s/GiB" if r["unit"] == "MiB" else "us/IO"
        cost = "-" if r["cpu_cost"] is None else f"{r['cpu_cost']:.2f} {cost_unit}"
        note = f"  ({r['failed']} failed)" if r["failed"] else ""
        lines.append(
            f"{r['case']:34} {r['server']:{width}} {fmt(r['iops'], '9.0f')} {fmt(r['mib_s'], '8.1f')} "
            f"{fmt(r['lat_mean_us'], '8.1f')} {fmt(r['lat_p99_us'], '8.1f')} "
            f"{fmt(r['server_cpu_pct'], '8.1f')} {work:>12} {cost:>12} {fmt(r['iops_ratio'], '6.2f')} "
            f"{fmt(r['lat_mean_us_ratio'], '6.2f')} {fmt(r['work_per_cpu_s_ratio'], '6.2f')} "
            f"{fmt_range(r['iops_ratio_range']):>11} {fmt_range(r['work_per_cpu_s_ratio_range']):>11}{note}"
        )
    lines.append("")
    lines.append(
        "Medians over rounds. xIOPS, xWORK: value / best peer's (best non-blkd server); "
        "xLAT: best peer's mean latency / value. >1 is better than the best peer."
    )
    lines.append(
        "xIOPS range, xWORK range: lowest and highest ratio of one round to the best peer "
        "in that round (each round runs every server back to back)."
    )
    lines.append(
        "work/CPU-s: I/Os (4k cases) or MiB (1M cases) per second of server CPU (utime+stime); "
        "CPU cost: its inverse, server CPU us per I/O or CPU s per GiB."
    )
    return "\n".join(lines)


def tool_version(argv):
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10)
        return p.stdout.decode(errors="replace").splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blkd", required=True, help="the blkd binary")
    ap.add_argument("--vublk", required=True, help="the vublk example binary")
    ap.add_argument("--quick", action="store_true", help="2 s per run, 3 rounds, 256 MiB image")
    ap.add_argument("--nbd-only", action="store_true")
    ap.add_argument("--vhost-only", action="store_true")
    ap.add_argument("--runtime", type=float, help="seconds per run (default 10, 2 with --quick)")
    ap.add_argument("--rounds", type=int, help="runs per case and server (default 5, 3 with --quick)")
    ap.add_argument("--image-size", type=int, help="image bytes (default 1 GiB, 256 MiB with --quick)")
    ap.add_argument(
        "--servers",
        help="comma-separated subset of blkd,qsd,qemu-nbd,nbdkit; also nbdkit-1thread (nbdkit --threads 1)",
    )
    ap.add_argument("--filter", help="only cases whose id (e.g. nbd-unix/randread-4k-qd1) matches this regex")
    ap.add_argument("--out", help="results directory (default: a new one under $TMPDIR)")
    args = ap.parse_args()
    if args.nbd_only and args.vhost_only:
        ap.error("--nbd-only and --vhost-only exclude each other")

    runtime = args.runtime or (2 if args.quick else 10)
    rounds = args.rounds or (3 if args.quick else 5)
    image_size = args.image_size or ((256 if args.quick else 1024) * MIB)
    if runtime <= 0 or rounds <= 0 or image_size < 64 * MIB or image_size % MIB:
        ap.error("--runtime and --rounds must be positive; --image-size a multiple of 1 MiB, at least 64 MiB")
    fio_runtime = max(1, round(runtime))
    wanted = args.servers.split(",") if args.servers else NBD_SERVERS
    unknown = [s for s in wanted if s not in NBD_SERVERS + OPT_IN_SERVERS]
    if unknown:
        ap.error(f"unknown servers: {', '.join(unknown)}")
    for s in wanted:
        program = args.blkd if s == "blkd" else PROGRAMS[s]
        if shutil.which(program) is None:
            ap.error(f"{s}: {program} is not installed or not executable")
    case_filter = re.compile(args.filter) if args.filter else None

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = args.out or os.path.join(tempfile.gettempdir(), f"blkd-bench-{stamp}")
    os.makedirs(outdir, exist_ok=True)
    rundir = tempfile.mkdtemp(prefix="blkd-bench-run-")
    # One identical copy per server: servers lock their images differently
    # (blkd and QSD refuse each other's writable image), and separate files
    # keep one server's dirty pages out of another's runs.
    log(f"results in {outdir}; creating {len(wanted)} {image_size // MIB} MiB images")
    images = {name: os.path.join(rundir, f"img-{name}.raw") for name in wanted}
    # Every server gets a copy of one template: writes to a freshly written
    # file cost about twice the CPU of writes to a copy, whatever the server,
    # so no server may get the original.
    template = os.path.join(rundir, "template.raw")
    make_image(template, image_size)
    for name in wanted:
        shutil.copyfile(template, images[name])
    os.unlink(template)

    runs = []
    all_cases = []

    def selected(cases):
        return [c for c in cases if case_filter is None or case_filter.search(c.id)]

    try:
        if not args.vhost_only:
            for transport in ("unix", "tcp"):
                cases = selected(nbd_cases(transport))
                if not cases:
                    continue
                all_cases += cases
                servers, uris = [], {}
                for name in wanted:
                    s, uri = nbd_server(name, transport, images[name], rundir, outdir, args.blkd)
                    servers.append(s)
                    uris[name] = uri
                log(f"NBD over {transport}: {', '.join(s.name for s in servers)}")
                try:
                    start_all(servers)

                    def fio_client(server, case, rnd, uris=uris):
                        tag = f"{case.group}-{case.name}-{server.name}-{rnd}"
                        return lambda: run_fio(case, uris[server.name], fio_runtime, outdir, tag)

                    run_group(cases, servers, fio_client, images, rounds, runs)
                finally:
                    for s in servers:
                        s.stop()

        vhost_wanted = [s for s in wanted if s in VHOST_SERVERS]
        if not args.nbd_only and vhost_wanted:
            for backend in ("null", "file"):
                cases = selected(vhost_cases(backend))
                if not cases:
                    continue
                all_cases += cases
                servers, socks = [], {}
                for name in vhost_wanted:
                    s, sock = vhost_server(name, backend, images[name], image_size, rundir, outdir, args.blkd)
                    servers.append(s)
                    socks[name] = sock
                log(f"vhost-user-blk on {backend}: {', '.join(s.name for s in servers)}")
                try:
                    start_all(servers)

                    def vublk_client(server, case, rnd, socks=socks):
                        return lambda: run_vublk(case, args.vublk, socks[server.name], runtime)

                    warm_images = images if backend == "file" else {}
                    run_group(cases, servers, vublk_client, warm_images, rounds, runs)
                finally:
                    for s in servers:
                        s.stop()
    finally:
        shutil.rmtree(rundir, ignore_errors=True)

    summary = summarise(all_cases, runs)
    text = table(summary)
    meta = {
        "date": stamp,
        "runtime_s": runtime,
        "fio_runtime_s": fio_runtime,
        "rounds": rounds,
        "image_size": image_size,
        "nproc": os.cpu_count(),
        "kernel": os.uname().release,
        "versions": {
            "blkd": tool_version([args.blkd, "--version"]),
            "qsd": tool_version(["qemu-storage-daemon", "--version"]),
            "qemu-nbd": tool_version(["qemu-nbd", "--version"]),
            "nbdkit": tool_version(["nbdkit", "--version"]),
            "fio": tool_version(["fio", "--version"]),
        },
    }
    with open(os.path.join(outdir, "results.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)
    cols = ["case", "server", "unit", "runs", "failed"] + METRICS + [
        "iops_ratio", "lat_mean_us_ratio", "work_per_cpu_s_ratio", "best_peer",
        "iops_ratio_range", "work_per_cpu_s_ratio_range",
    ]
    with open(os.path.join(outdir, "results.tsv"), "w") as f:
        f.write("\t".join(cols) + "\n")
        for r in summary:
            cells = (tsv_cell(r.get(c)) for c in cols)
            f.write("\t".join(cells) + "\n")
    with open(os.path.join(outdir, "table.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nresults: {outdir}/results.json, results.tsv, table.txt")
    failed = sum(1 for r in runs if "error" in r)
    if failed:
        log(f"{failed} of {len(runs)} runs failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
