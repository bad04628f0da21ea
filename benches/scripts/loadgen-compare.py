#!/usr/bin/env python3
"""Is `kiln bench` ever the bottleneck? Its maximum request rate and CPU cost next to wrk
(HTTP/1.1) and h2load (HTTP/2), against a trivial local endpoint, at the same connection
counts, one client thread each.

usage: benches/scripts/loadgen-compare.py [--duration 5] [--reps 2] [--out out/loadgen-compare.json]

Builds nothing: expects target/release/kiln and target/release/kiln-trivial-server
(cargo build --release -p kiln-cli -p kiln-bench). Needs wrk and h2load on PATH (Debian:
apt-get install wrk nghttp2-client) and, for pinning, taskset (util-linux).

The server (kiln-trivial-server: hyper 1, HTTP/1.1 and h2c on one port, 200 "ok" to
everything, 1 tokio worker) runs pinned to CPU --server-cpu (0); every client runs pinned
to CPU --client-cpu (1) with one thread, for --duration seconds:

  HTTP/1.1, N = 16 and 64 connections:
    wrk -t1 -cN -dDs --latency URL
    kiln bench URL --concurrency N --threads 1 --warmup 0s --window 1s --max-windows D
               --stability 0 -q --json FILE
  HTTP/2, 16 connections x 10 streams:
    h2load -t1 -c16 -m10 -D D URL
    kiln bench URL --http2 --connections 16 --concurrency 160 --threads 1 (same timing flags)

Each pair runs --reps times in alternating order (A B A B ...); the table shows medians.

Client CPU is user + system time of the client process (os.wait4 rusage, all its threads),
from exec to exit, so it includes start-up and connection set-up; CPU % is that over the
process's wall time (100 % = one core busy); CPU us/req is that over the requests the tool
says it completed. Server CPU % (from /proc/PID/stat across the client's run) shows which
side was saturated: with the server near 100 % the request rate is the server's limit and
the client comparison rests on CPU per request. Request rates are as each tool reports
them (wrk: "Requests/sec:", h2load: "finished in Xs, Y req/s", kiln bench: requests over
duration_s summed over its JSON levels). Latency: wrk and kiln bench print p50/p99;
h2load prints only min/mean/max per request, so its mean stands in the table.

Writes JSON (--out) with the machine, the tools' versions, every run (command line, raw
output, rusage) and the medians; prints a markdown table.
"""

import argparse
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf('SC_CLK_TCK')


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# machine


def machine_info(server_cpu, client_cpu):
    model = 'unknown'
    virtual = None
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name') and model == 'unknown':
                model = line.split(':', 1)[1].strip()
            if line.startswith('flags') and virtual is None:
                virtual = 'hypervisor' in line.split(':', 1)[1].split()
    except OSError:
        pass
    siblings = {}
    for cpu in sorted({server_cpu, client_cpu}):
        try:
            path = f'/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list'
            siblings[str(cpu)] = Path(path).read_text().strip()
        except OSError:
            siblings[str(cpu)] = None
    try:
        nproc = int(subprocess.run(['nproc'], capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        nproc = os.cpu_count()
    return {
        'nproc': nproc,
        'cpu_count': os.cpu_count(),
        'cpu_model': model,
        'virtual_machine': virtual,
        # SMT siblings of the server's and the client's CPUs: sharing a core would skew both.
        'thread_siblings': siblings,
        'kernel': platform.release(),
        'python': platform.python_version(),
        'loadavg_at_start': loadavg(),
    }


def loadavg():
    try:
        return [float(x) for x in Path('/proc/loadavg').read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def tool_version(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError) as e:
        return f'unknown ({e})'
    text = (p.stdout + p.stderr).strip().splitlines()
    return text[0].strip() if text else 'unknown'


def proc_cpu_s(pid):
    """user + system seconds of a live process (all its threads), from /proc/PID/stat."""
    try:
        stat = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(')') + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_times(cpus):
    """Seconds of busy, idle and steal time of the given CPUs so far, from /proc/stat."""
    out = {}
    try:
        lines = Path('/proc/stat').read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *vals = line.split()
        if not name.startswith('cpu') or name == 'cpu' or int(name[3:]) not in cpus:
            continue
        v = [int(x) / CLK_TCK for x in vals]
        # user nice system idle iowait irq softirq steal guest guest_nice
        idle = v[3] + v[4]
        steal = v[7] if len(v) > 7 else 0.0
        busy = v[0] + v[1] + v[2] + v[5] + v[6]
        out[int(name[3:])] = {'busy': busy, 'idle': idle, 'steal': steal}
    return out


def cpu_delta(before, after):
    if not before or not after:
        return None
    return {
        str(cpu): {k: after[cpu][k] - before[cpu][k] for k in after[cpu]}
        for cpu in after
        if cpu in before
    }


# ---------------------------------------------------------------------------------------
# processes


def pin(cpu, cmd, taskset):
    return [taskset, '-c', str(cpu), *cmd] if taskset else cmd


def start_server(cmd, timeout):
    log('$ ' + ' '.join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    buf = ''
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            buf += line
            m = re.search(r'listening on (http://\S+)', line)
            if m:
                return proc, m.group(1)
        elif proc.poll() is not None:
            break
    err = ''
    if proc.poll() is not None:
        err = proc.stderr.read()
    stop(proc)
    sys.exit(f'loadgen-compare: the server did not report its address within {timeout}s\n{buf}{err}')


def stop(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def run_client(cmd, timeout, server_pid, cpus):
    """Runs cmd to its end (killing it past timeout); returns output, rusage, wall and server CPU."""
    log('$ ' + ' '.join(cmd))
    with tempfile.TemporaryFile(mode='w+') as out:
        load = loadavg()
        server_before = proc_cpu_s(server_pid)
        stat_before = cpu_times(cpus)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        timed_out = False
        try:
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    proc.kill()
                    pid, status, ru = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.02)
        except BaseException:
            # ctrl-c and the like: leave no client behind.
            proc.kill()
            proc.wait(timeout=5)
            raise
        wall = time.monotonic() - t0
        server_after = proc_cpu_s(server_pid)
        stat_after = cpu_times(cpus)
        # Popen must not reap it again.
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    server_cpu = None if server_before is None or server_after is None else server_after - server_before
    cpus_used = cpu_delta(stat_before, stat_after)
    client_cpu = ru.ru_utime + ru.ru_stime
    other = None
    if cpus_used is not None and server_cpu is not None:
        # Busy time on the two pinned CPUs that neither the client nor the server used:
        # other processes, or the kernel's work on their behalf (softirqs are partly here).
        other = sum(c['busy'] for c in cpus_used.values()) - client_cpu - server_cpu
    return {
        'pinned_cpus': cpus_used,
        'other_busy_s': other,
        'steal_s': sum(c['steal'] for c in cpus_used.values()) if cpus_used else None,
        'idle_s': sum(c['idle'] for c in cpus_used.values()) if cpus_used else None,
        'cmd': cmd,
        'returncode': proc.returncode,
        'timed_out': timed_out,
        'wall_s': wall,
        'user_s': ru.ru_utime,
        'sys_s': ru.ru_stime,
        'cpu_s': ru.ru_utime + ru.ru_stime,
        'voluntary_ctx_switches': ru.ru_nvcsw,
        'involuntary_ctx_switches': ru.ru_nivcsw,
        'server_cpu_s': server_cpu,
        'loadavg_before': load,
        'output': text,
    }


# ---------------------------------------------------------------------------------------
# parsing the tools' output

UNITS = {'us': 1e-3, 'µs': 1e-3, 'ms': 1.0, 's': 1e3, 'm': 60e3, 'h': 3600e3}


def to_ms(value, unit):
    return float(value) * UNITS[unit]


def parse_wrk(text):
    m = re.search(r'Requests/sec:\s+([\d.]+)', text)
    n = re.search(r'(\d+) requests in ([\d.]+)(\w+),', text)
    res = {
        'rps': float(m.group(1)) if m else None,
        'requests': int(n.group(1)) if n else None,
        'duration_s': to_ms(n.group(2), n.group(3)) / 1e3 if n else None,
    }
    for pct, key in (('50', 'p50_ms'), ('99', 'p99_ms')):
        p = re.search(rf'^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$', text, re.M)
        res[key] = to_ms(p.group(1), p.group(2)) if p else None
    lat = re.search(r'Latency\s+([\d.]+)(us|ms|s|m)\s+\S+\s+([\d.]+)(us|ms|s|m)', text)
    res['mean_ms'] = to_ms(lat.group(1), lat.group(2)) if lat else None
    res['max_ms'] = to_ms(lat.group(3), lat.group(4)) if lat else None
    errors = 0
    s = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)', text)
    if s:
        errors += sum(int(x) for x in s.groups())
    b = re.search(r'Non-2xx or 3xx responses: (\d+)', text)
    if b:
        errors += int(b.group(1))
    res['errors'] = errors
    return res


def parse_h2load(text):
    m = re.search(r'finished in ([\d.]+)(\w+), ([\d.]+) req/s', text)
    r = re.search(r'requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored', text)
    res = {
        'rps': float(m.group(3)) if m else None,
        'duration_s': to_ms(m.group(1), m.group(2)) / 1e3 if m else None,
        'requests': int(r.group(4)) if r else None,
        'errors': int(r.group(5)) + int(r.group(6)) if r else None,
        'p50_ms': None,
        'p99_ms': None,
    }
    t = re.search(
        r'time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)', text
    )
    res['mean_ms'] = to_ms(t.group(5), t.group(6)) if t else None
    res['max_ms'] = to_ms(t.group(3), t.group(4)) if t else None
    return res


def parse_kiln(json_path):
    try:
        report = json.loads(Path(json_path).read_text())
    except (OSError, ValueError):
        return {'rps': None, 'requests': None, 'errors': None, 'p50_ms': None, 'p99_ms': None}
    levels = report.get('levels', [])
    requests = sum(level['requests'] for level in levels)
    duration = sum(level['duration_s'] for level in levels)
    res = {
        'rps': requests / duration if duration > 0 else None,
        'requests': requests,
        'duration_s': duration,
        'errors': sum(level['error_count'] for level in levels),
    }
    # One level per run here; with several, the percentiles would be those of the first.
    lat = levels[0]['latency'] if levels else {}
    for key in ('p50_ms', 'p99_ms', 'mean_ms', 'max_ms'):
        res[key] = lat.get(key)
    return res


# ---------------------------------------------------------------------------------------
# the comparison


def scenarios(args):
    out = []
    for n in args.h1_connections:
        out.append(
            {
                'name': f'h1-c{n}',
                'http': '1.1',
                'connections': n,
                'streams': 1,
                'tools': ['wrk', 'kiln'],
            }
        )
    for n in args.h2_connections:
        out.append(
            {
                'name': f'h2-c{n}-m{args.h2_streams}',
                'http': '2',
                'connections': n,
                'streams': args.h2_streams,
                'tools': ['h2load', 'kiln'],
            }
        )
    return out


def client_cmd(tool, sc, args, url, json_path):
    d = args.duration
    if tool == 'wrk':
        return [args.wrk, '-t1', f'-c{sc["connections"]}', f'-d{d}s', '--latency', url]
    if tool == 'h2load':
        return [args.h2load, '-t1', f'-c{sc["connections"]}', f'-m{sc["streams"]}', '-D', str(d), url]
    cmd = [str(args.kiln), 'bench', url]
    if sc['http'] == '2':
        cmd += ['--http2', '--connections', str(sc['connections'])]
    cmd += [
        '--concurrency',
        str(sc['connections'] * sc['streams']),
        '--threads',
        '1',
        '--warmup',
        '0s',
        '--window',
        '1s',
        '--max-windows',
        str(d),
        '--stability',
        '0',
        '-q',
        '--json',
        str(json_path),
    ]
    return cmd


def measure(tool, sc, args, url, server_pid, workdir, index):
    json_path = Path(workdir) / f'{sc["name"]}-{tool}-{index}.json'
    cmd = pin(args.client_cpu, client_cmd(tool, sc, args, url, json_path), args.taskset)
    run = run_client(cmd, args.duration + args.slack, server_pid, {args.server_cpu, args.client_cpu})
    if tool == 'wrk':
        parsed = parse_wrk(run['output'])
    elif tool == 'h2load':
        parsed = parse_h2load(run['output'])
    else:
        parsed = parse_kiln(json_path)
        try:
            run['report'] = json.loads(json_path.read_text())
        except (OSError, ValueError):
            run['report'] = None
    run.update(parsed)
    n = run.get('requests') or 0
    run['cpu_pct'] = 100.0 * run['cpu_s'] / run['wall_s'] if run['wall_s'] > 0 else None
    run['cpu_us_per_req'] = 1e6 * run['cpu_s'] / n if n else None
    run['server_cpu_pct'] = 100.0 * run['server_cpu_s'] / run['wall_s'] if run['server_cpu_s'] is not None else None
    run['server_cpu_us_per_req'] = 1e6 * run['server_cpu_s'] / n if n and run['server_cpu_s'] is not None else None
    ok = run['returncode'] == 0 and not run['timed_out'] and run['rps'] is not None
    run['ok'] = ok
    if not ok:
        log(f'  !! {tool} failed (exit {run["returncode"]}, timed out: {run["timed_out"]}):\n{run["output"][-2000:]}')
    else:
        log(
            f'  {tool}: {run["rps"]:.0f} req/s, client CPU {run["cpu_s"]:.2f} s ({run["cpu_pct"]:.0f} %), '
            f'{run["cpu_us_per_req"]:.2f} us/req, server CPU {fmt(run["server_cpu_pct"], 0)} %; '
            f'pinned CPUs idle {fmt(run["idle_s"])} s, steal {fmt(run["steal_s"])} s, '
            f'busy with others {fmt(run["other_busy_s"])} s'
        )
    return run


KEYS = [
    'rps',
    'cpu_s',
    'cpu_pct',
    'cpu_us_per_req',
    'server_cpu_pct',
    'server_cpu_us_per_req',
    'p50_ms',
    'p99_ms',
    'mean_ms',
    'max_ms',
    'errors',
    'wall_s',
    'idle_s',
    'steal_s',
    'other_busy_s',
]


def summarize(runs):
    good = [r for r in runs if r['ok']]
    out = {'runs': len(runs), 'ok_runs': len(good)}
    for k in KEYS:
        vals = [r[k] for r in good if r.get(k) is not None]
        out[k] = statistics.median(vals) if vals else None
        out[k + '_range'] = [min(vals), max(vals)] if vals else None
    return out


def fmt(v, digits=2):
    return '–' if v is None else f'{v:,.{digits}f}'


TOOL_NAMES = {'wrk': 'wrk', 'h2load': 'h2load', 'kiln': 'kiln bench'}


def table(results, args):
    lines = [
        f'Medians of {args.reps} runs of {args.duration} s each; client pinned to CPU {args.client_cpu}, '
        f'server to CPU {args.server_cpu}' + ('' if args.taskset else ' (NOT pinned: see the warnings)') + '.',
        '',
        '| protocol | conns × streams | client | req/s | client CPU s | client CPU % | CPU µs/req '
        '| server CPU % | p50 ms | p99 ms | mean ms | errors |',
        '|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|',
    ]
    for res in results:
        sc = res['scenario']
        for tool in sc['tools']:
            s = res['summary'][tool]
            lines.append(
                f'| HTTP/{sc["http"]} | {sc["connections"]} × {sc["streams"]} | {TOOL_NAMES[tool]} '
                f'| {fmt(s["rps"], 0)} | {fmt(s["cpu_s"])} | {fmt(s["cpu_pct"], 0)} | {fmt(s["cpu_us_per_req"])} '
                f'| {fmt(s["server_cpu_pct"], 0)} | {fmt(s["p50_ms"], 3)} | {fmt(s["p99_ms"], 3)} '
                f'| {fmt(s["mean_ms"], 3)} | {fmt(s["errors"], 0)} |'
            )
    lines.append('')
    lines.append('| protocol | conns × streams | kiln bench / reference: req/s | CPU µs/req |')
    lines.append('|---|---|--:|--:|')
    for res in results:
        sc = res['scenario']
        ref, kiln = (res['summary'][t] for t in sc['tools'])
        ratio = lambda a, b: None if a is None or not b else a / b  # noqa: E731
        lines.append(
            f'| HTTP/{sc["http"]} | {sc["connections"]} × {sc["streams"]} | {fmt(ratio(kiln["rps"], ref["rps"]))} × '
            f'| {fmt(ratio(kiln["cpu_us_per_req"], ref["cpu_us_per_req"]))} × |'
        )
    return '\n'.join(lines) + '\n'


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--duration', type=int, default=5, help='seconds per run (whole seconds: kiln bench counts 1 s windows)')
    ap.add_argument('--reps', type=int, default=2, help='runs of each tool per scenario, in alternating order')
    ap.add_argument('--out', type=Path, default=ROOT / 'out' / 'loadgen-compare.json', help='JSON results')
    ap.add_argument('--server-cpu', type=int, default=0, help='CPU the server is pinned to')
    ap.add_argument('--client-cpu', type=int, default=1, help='CPU every client is pinned to')
    ap.add_argument('--h1-connections', type=lambda s: [int(x) for x in s.split(',')], default=[16, 64], help='HTTP/1.1 connection counts (comma list)')
    ap.add_argument('--h2-connections', type=lambda s: [int(x) for x in s.split(',')], default=[16], help='HTTP/2 connection counts (comma list)')
    ap.add_argument('--h2-streams', type=int, default=10, help='HTTP/2 streams per connection')
    ap.add_argument('--server-threads', type=int, default=1, help='tokio worker threads of the server')
    ap.add_argument('--bin-dir', type=Path, default=ROOT / 'target' / 'release', help='where kiln and kiln-trivial-server are')
    ap.add_argument('--slack', type=float, default=30.0, help='seconds a client may overrun --duration before it is killed')
    ap.add_argument('--pause', type=float, default=0.5, help='seconds between runs')
    ap.add_argument(
        '--wait-quiet',
        type=float,
        default=0.0,
        help='wait up to this many seconds for the 1-minute load average to fall below --quiet-load',
    )
    ap.add_argument('--quiet-load', type=float, default=0.5, help='see --wait-quiet')
    args = ap.parse_args()
    if args.duration < 1 or args.reps < 1:
        ap.error('--duration and --reps must be at least 1')

    args.kiln = args.bin_dir / 'kiln'
    server_bin = args.bin_dir / 'kiln-trivial-server'
    missing = [str(p) for p in (args.kiln, server_bin) if not os.access(p, os.X_OK)]
    if missing:
        sys.exit(
            f'loadgen-compare: missing {", ".join(missing)}; '
            'run `cargo build --release -p kiln-cli -p kiln-bench` first'
        )
    args.wrk = shutil.which('wrk')
    args.h2load = shutil.which('h2load')
    if not args.wrk or not args.h2load:
        sys.exit('loadgen-compare: wrk and h2load are needed (Debian: apt-get install wrk nghttp2-client)')
    args.taskset = shutil.which('taskset')
    ncpu = os.cpu_count() or 1
    if args.taskset and max(args.server_cpu, args.client_cpu) >= ncpu:
        log(f'warning: CPUs {args.server_cpu}/{args.client_cpu} do not exist here ({ncpu} CPUs); running unpinned')
        args.taskset = None
    elif not args.taskset:
        log('warning: taskset (util-linux) not found; server and clients run UNPINNED, numbers are less comparable')
    if args.server_cpu == args.client_cpu:
        log('warning: server and client share one CPU; the client CPU figures still hold, request rates do not')

    if args.wait_quiet > 0:
        deadline = time.monotonic() + args.wait_quiet
        while (load := loadavg()) and load[0] >= args.quiet_load and time.monotonic() < deadline:
            log(f'waiting for a quiet machine: load average {load[0]:.2f} >= {args.quiet_load}')
            time.sleep(10)
    machine = machine_info(args.server_cpu, args.client_cpu)
    if machine['loadavg_at_start'] and machine['loadavg_at_start'][0] > 1.0:
        log(f'warning: 1-minute load average is {machine["loadavg_at_start"][0]:.2f}; other work may skew the numbers')

    versions = {
        'wrk': tool_version([args.wrk, '--version']),
        'h2load': tool_version([args.h2load, '--version']),
        'kiln': tool_version([str(args.kiln), '--version']),
    }
    server_cmd = pin(
        args.server_cpu, [str(server_bin), '--port', '0', '--threads', str(args.server_threads)], args.taskset
    )
    server = None
    results = []
    try:
        server, url = start_server(server_cmd, timeout=10)
        log(f'server at {url} (pid {server.pid})')
        with tempfile.TemporaryDirectory(prefix='loadgen-compare-') as workdir:
            for sc in scenarios(args):
                log(f'== {sc["name"]}')
                runs = {t: [] for t in sc['tools']}
                for rep in range(args.reps):
                    for tool in sc['tools']:
                        if server.poll() is not None:
                            sys.exit(f'loadgen-compare: the server exited (code {server.returncode})')
                        runs[tool].append(measure(tool, sc, args, url, server.pid, workdir, rep))
                        time.sleep(args.pause)
                results.append(
                    {
                        'scenario': sc,
                        'summary': {t: summarize(r) for t, r in runs.items()},
                        'runs': runs,
                    }
                )
    finally:
        stop(server)

    md = table(results, args)
    print(md)
    doc = {
        'machine': machine,
        'versions': versions,
        'server_cmd': server_cmd,
        'settings': {
            'duration_s': args.duration,
            'reps': args.reps,
            'server_cpu': args.server_cpu,
            'client_cpu': args.client_cpu,
            'pinned': bool(args.taskset),
            'server_threads': args.server_threads,
        },
        'loadavg_at_end': loadavg(),
        'results': results,
        'markdown': md,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + '\n')
    log(f'wrote {args.out}')
    bad = sum(1 for res in results for rs in res['runs'].values() for r in rs if not r['ok'])
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
