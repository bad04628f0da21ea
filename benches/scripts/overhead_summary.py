#!/usr/bin/env python3
"""Summarises the runs of benches/scripts/overhead.sh.

usage: overhead_summary.py OUT_DIR

Reads OUT_DIR/runs/manifest.tsv and, for every run NAME listed there, NAME.txt (the
client's output), NAME.log (h2load's per-request log) and NAME.before.prom /
NAME.after.prom (kiln's /metrics scraped around the run). Writes OUT_DIR/results.json
and OUT_DIR/results.md and prints the markdown to stdout.

Server-side columns come from the differences of the /metrics counters over the run:
  server mean  = delta kiln_request_duration_seconds_sum / delta _count   (handler time:
                 from hyper handing kiln the parsed request head to the response value;
                 includes reading the body, decoding, batcher queue, ONNX Runtime, encoding)
  server ~p50  = histogram_quantile(0.5) over the bucket deltas; the first bucket is
                 0-100 us, so anything under 100 us is a linear guess inside that bucket
  queue        = delta kiln_queue_duration_seconds_sum / _count (per request)
  compute      = delta kiln_compute_duration_seconds_sum / _count (per executed batch)
  CPU/req      = delta kiln_process_cpu_seconds_total / requests completed by the client
                 (all server threads, user + system, 10 ms tick resolution)
"""

import json
import re
import statistics
import sys
from pathlib import Path

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prom(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        if not line or line.startswith('#'):
            continue
        m = LINE.match(line)
        if not m:
            continue
        labels = tuple(sorted(LABEL.findall(m.group(2) or '')))
        try:
            out[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            pass
    return out


def delta(before, after, name, **labels):
    want = set(labels.items())
    total = 0.0
    found = False
    for (n, ls), v in after.items():
        if n == name and want <= set(ls):
            total += v - before.get((n, ls), 0.0)
            found = True
    return total if found else None


def buckets(before, after, name, **labels):
    want = set(labels.items())
    acc = {}
    for (n, ls), v in after.items():
        if n == name and want <= set(ls):
            le = dict(ls)['le']
            bound = float('inf') if le == '+Inf' else float(le)
            acc[bound] = acc.get(bound, 0.0) + v - before.get((n, ls), 0.0)
    return sorted(acc.items())


def hist_quantile(q, bks):
    if not bks or bks[-1][1] <= 0:
        return None
    rank = q * bks[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in bks:
        if count >= rank:
            if bound == float('inf'):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return None


def frac_le(bound, bks):
    total = bks[-1][1] if bks else 0
    for b, c in bks:
        if abs(b - bound) < 1e-12:
            return c / total if total else None
    return None


def to_us(text):
    m = re.match(r'([\d.]+)(us|ms|s)$', text)
    if not m:
        return None
    return float(m.group(1)) * {'us': 1, 'ms': 1e3, 's': 1e6}[m.group(2)]


def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def client_wrk(text):
    m = re.search(r'^WRK_JSON (.*)$', text, re.M)
    if not m:
        raise SystemExit('no WRK_JSON line in wrk output')
    j = json.loads(m.group(1))
    secs = j['duration_us'] / 1e6
    errs = j['errors']
    lat = j['latency_us']
    return {
        'requests': j['requests'],
        'rps': j['requests'] / secs if secs else None,
        'mean_us': lat['mean'], 'p50_us': lat['p50'], 'p90_us': lat['p90'], 'p99_us': lat['p99'],
        'p999_us': lat['p999'], 'max_us': lat['max'],
        'non_2xx': errs['status'],
        'socket_errors': errs['connect'] + errs['read'] + errs['write'] + errs['timeout'],
    }


def client_h2load(text, log_path):
    rps = re.search(r'finished in [\d.]+\w*, ([\d.]+) req/s', text)
    req = re.search(r'requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, '
                    r'(\d+) errored, (\d+) timeout', text)
    codes = re.search(r'status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx', text)
    tfr = re.search(r'time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)', text)
    if not (rps and req and codes):
        raise SystemExit('could not parse h2load output')
    elapsed = []
    if Path(log_path).exists():
        for line in Path(log_path).read_text().splitlines():
            parts = line.split('\t')
            if len(parts) >= 3:
                elapsed.append(int(parts[2]))
    elapsed.sort()
    out = {
        'requests': int(req.group(3)),
        'rps': float(rps.group(1)),
        'non_2xx': int(codes.group(2)) + int(codes.group(3)) + int(codes.group(4)),
        'socket_errors': int(req.group(6)) + int(req.group(7)),
        'h2load_mean_us': to_us(tfr.group(3)) if tfr else None,
        'h2load_sd_us': to_us(tfr.group(4)) if tfr else None,
    }
    if elapsed:
        out.update({
            'mean_us': statistics.fmean(elapsed), 'p50_us': pct(elapsed, 0.5), 'p90_us': pct(elapsed, 0.9),
            'p99_us': pct(elapsed, 0.99), 'p999_us': pct(elapsed, 0.999), 'max_us': elapsed[-1],
            'logged_requests': len(elapsed),
        })
    else:
        out['mean_us'] = out['h2load_mean_us']
    return out


def wire(path):
    """Server and client time per round trip from loopback packet timestamps (HTTP/1.1, one
    connection): server = first response segment - last request segment before it; client =
    next request segment - last response segment."""
    server, client = [], []
    last_c = last_s = None
    state = None
    for line in Path(path).read_text().splitlines():
        ts, who = line.split()
        t = float(ts)
        if who == 'C':
            if state == 'S' and last_s is not None:
                client.append((t - last_s) * 1e6)
            last_c, state = t, 'C'
        else:
            if state == 'C' and last_c is not None:
                server.append((t - last_c) * 1e6)
            last_s, state = t, 'S'
    out = {}
    for key, vals in (('server', server), ('client', client)):
        vals.sort()
        if vals:
            out[key] = {'n': len(vals), 'mean_us': statistics.fmean(vals), 'p50_us': pct(vals, 0.5),
                        'p90_us': pct(vals, 0.9), 'p99_us': pct(vals, 0.99)}
    return out


def server_side(before, after, endpoint, model, requests):
    out = {}
    cpu = delta(before, after, 'kiln_process_cpu_seconds_total')
    if cpu is not None and requests:
        out['cpu_us_per_req'] = cpu * 1e6 / requests
        out['cpu_seconds'] = cpu
    if endpoint in ('', '-'):
        return out
    lab = {'endpoint': endpoint, 'model': model}
    s = delta(before, after, 'kiln_request_duration_seconds_sum', **lab)
    c = delta(before, after, 'kiln_request_duration_seconds_count', **lab)
    if c:
        out['server_requests'] = int(c)
        out['server_mean_us'] = s * 1e6 / c
        bks = buckets(before, after, 'kiln_request_duration_seconds_bucket', **lab)
        q = hist_quantile(0.5, bks)
        out['server_p50_hist_us'] = q * 1e6 if q is not None else None
        # Inside the first bucket (0-100 us) the interpolation says nothing: report "< 100".
        out['server_p50_hist_text'] = ('< 100' if q is not None and q <= 0.0001
                                       else fmt(out['server_p50_hist_us']))
        q = hist_quantile(0.99, bks)
        out['server_p99_hist_us'] = q * 1e6 if q is not None else None
        out['server_frac_le_100us'] = frac_le(0.0001, bks)
        out['server_frac_le_250us'] = frac_le(0.00025, bks)
    if endpoint == 'infer':
        m = {'model': model}
        qs = delta(before, after, 'kiln_queue_duration_seconds_sum', **m)
        qc = delta(before, after, 'kiln_queue_duration_seconds_count', **m)
        cs = delta(before, after, 'kiln_compute_duration_seconds_sum', **m)
        cc = delta(before, after, 'kiln_compute_duration_seconds_count', **m)
        bs = delta(before, after, 'kiln_batch_size_sum', **m)
        bc = delta(before, after, 'kiln_batch_size_count', **m)
        if qc:
            out['queue_us_per_req'] = qs * 1e6 / qc
        if cc:
            out['compute_us_per_batch'] = cs * 1e6 / cc
        if bc:
            out['mean_batch'] = bs / bc
    return out


def fmt(v, digits=0):
    if v is None:
        return '—'
    if isinstance(v, float):
        return f'{v:,.{digits}f}'
    return f'{v:,}'


def main():
    out_dir = Path(sys.argv[1])
    runs_dir = out_dir / 'runs'
    rows = []
    for line in (runs_dir / 'manifest.tsv').read_text().splitlines():
        if not line.strip() or line.startswith('#'):
            continue
        name, group, case, proto, conc, endpoint, model, expect, dur = line.split('\t')
        text = (runs_dir / f'{name}.txt').read_text()
        client = client_wrk(text) if proto.startswith('HTTP/1.1') else client_h2load(text, runs_dir / f'{name}.log')
        before = parse_prom(runs_dir / f'{name}.before.prom')
        after = parse_prom(runs_dir / f'{name}.after.prom')
        server = server_side(before, after, endpoint, model, client['requests'])
        if (runs_dir / f'{name}.pkts').exists():
            server['wire'] = wire(runs_dir / f'{name}.pkts')
        rows.append({'name': name, 'group': group, 'case': case, 'proto': proto, 'concurrency': conc,
                     'expected_status': expect, 'duration_s': float(dur), 'client': client, 'server': server})

    env = (out_dir / 'env.txt').read_text() if (out_dir / 'env.txt').exists() else ''
    (out_dir / 'results.json').write_text(json.dumps({'env': env, 'runs': rows}, indent=2) + '\n')

    groups = {
        'main': '### Main table: `identity_fp32` as configured (max batch 64, max_queue_delay_us 100)',
        'delay0': '### Side: a copy of `identity_fp32` with max_queue_delay_us = 0 (same ONNX file)',
        'multipart': '### Side: multipart parsing on /predict (efficientnet_lite0; the request fails before any image work)',
    }
    md = []
    head = ('| case | client (protocol) | conc | req/s | client mean µs | p50 µs | p99 µs | server mean µs '
            '| server ≈p50 µs (hist) | ≤100 µs | queue µs/req | compute µs/batch | mean batch '
            '| server CPU µs/req | status / errors |')
    sep = '|' + '---|' * 15
    for g, title in groups.items():
        grp = [r for r in rows if r['group'] == g]
        if not grp:
            continue
        md += [title, '', head, sep]
        for r in grp:
            c, s = r['client'], r['server']
            frac = s.get('server_frac_le_100us')
            status = (f"{c['non_2xx']} non-2xx" if r['expected_status'] == '200'
                      else f"expected {r['expected_status']}: {c['non_2xx']} non-2xx")
            status += f", {c['socket_errors']} socket errors"
            md.append('| ' + ' | '.join([
                r['case'], r['proto'], r['concurrency'], fmt(c['rps']), fmt(c.get('mean_us')), fmt(c.get('p50_us')),
                fmt(c.get('p99_us')), fmt(s.get('server_mean_us'), 1), s.get('server_p50_hist_text', '—'),
                '—' if frac is None else f'{100 * frac:.0f}%', fmt(s.get('queue_us_per_req'), 1),
                fmt(s.get('compute_us_per_batch'), 1), fmt(s.get('mean_batch'), 2),
                fmt(s.get('cpu_us_per_req'), 1), status]) + ' |')
        md.append('')
    wired = [r for r in rows if 'wire' in r['server']]
    if wired:
        md += ['### Packet-timed wrk -c1 runs (tcpdump on lo): where one round trip goes', '',
               '| config | case | req/s | client-measured p50 µs | wire: server p50 µs | server p90 | server p99 '
               '| server mean | wire: client p50 µs | /metrics server mean µs |',
               '|' + '---|' * 10]
        for r in wired:
            w, c, s = r['server']['wire'], r['client'], r['server']
            ws, wc = w.get('server', {}), w.get('client', {})
            md.append('| ' + ' | '.join([
                r['group'].replace('-wire', ''), r['case'], fmt(c['rps']), fmt(c.get('p50_us')),
                fmt(ws.get('p50_us')), fmt(ws.get('p90_us')), fmt(ws.get('p99_us')), fmt(ws.get('mean_us')),
                fmt(wc.get('p50_us')), fmt(s.get('server_mean_us'), 1)]) + ' |')
        md.append('')
    text = '\n'.join(md)
    (out_dir / 'results.md').write_text(env + '\n' + text + '\n')
    print(text)


if __name__ == '__main__':
    main()
