#!/usr/bin/env python3
"""Renders bench/run.sh's results (one `ldt bench --json` report per rate, RSS samples) as a
section of BENCHMARKS.md, newest first. Usage: render.py WORKDIR MODE OUT RATE..."""
import json, os, subprocess, sys, platform, datetime
work, mode, out, rates = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def sh(cmd):
    try: return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception: return "?"
cores = os.cpu_count()
mem = sh("awk '/MemTotal/ {printf \"%.0f GiB\", $2/1048576}' /proc/meminfo")
cpu = sh("awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo").strip()
rustc = sh("rustc --version")
import re
pg_match = re.search(r"\d+\.\d+", sh("psql --version") or "")
pg = pg_match.group(0) if pg_match else "?"
rabbit = sh("rabbitmqctl version 2>/dev/null")
commit = os.environ.get("BENCH_LABEL") or sh("git rev-parse --short HEAD")
rows = []
for rate in rates:
    try: r = json.load(open(f"{work}/bench-{rate}.json"))
    except Exception as e:
        rows.append((rate, None, {})); continue
    rss = {}
    for line in open(f"{work}/rss-{rate}"):
        name, kb = line.split()
        rss[name] = max(rss.get(name, 0), int(kb))
    try: ckpt = open(f"{work}/checkpoints-{rate}").read().strip()
    except OSError: ckpt = "–"
    r["checkpoints"] = ckpt
    rows.append((rate, r, rss))
def label(rate):
    """A rate's row label: orders offered a second, or a closed loop's clients."""
    return f"closed, {rate[1:]} clients" if rate.startswith("c") else rate
def per_second(rate, r):
    """Orders a second the per-order figures divide by: offered, or (closed loop) final."""
    if not rate.startswith("c"):
        return float(rate)
    return float(r["throughput"]) if r and r.get("throughput") else float("nan")
lines = []
lines.append(f"## {datetime.date.today()} — mode `{mode}`, commit `{commit}`\n")
if mode == "embedded":
    lines.append(f"Machine: {cores} cores ({cpu}), {mem}; {rustc}. Release build, `ldt up` embedded: a SQLite file per service and the in-process bus's journal (WAL, synchronous=NORMAL: survives a killed process, not a power cut).\n")
else:
    lines.append(f"Machine: {cores} cores ({cpu}), {mem}; {rustc}; PostgreSQL {pg}; RabbitMQ {rabbit}. Release build, persistent messages, publisher confirms, fsync on.\n")
lines.append("| offered/s | sent | accepted | shed | lost | final/s | not SUCCESS | saga p50 | p90 | p99 | p99.9 | max | HTTP p50 | p99 | invariants | peak RSS MiB | machine: compute ms, wake-up µs | PG checkpoints |")
lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for rate, r, rss in rows:
    if r is None:
        lines.append(f"| {label(rate)} | run failed | | | | | | | | | | | | | | | | |"); continue
    s, h = r["saga_ms"], r["http_ms"]
    m = r.get("machine") or {}
    machine = f"{m['compute_ms']:.0f}, {m['wake_us']:.0f}" if m else "–"
    peak = ", ".join(f"{k} {v/1024:.0f}" for k, v in sorted(rss.items()))
    # With no fault injected every accepted order should succeed: any other final status
    # (TIMEOUT from queueing past the step timeout, most of all) is a failure of the run.
    other = ", ".join(f"{k} {v}" for k, v in sorted((r.get("statuses") or {}).items()) if k != "SUCCESS") or "0"
    lines.append(f"| {label(rate)} | {r['sent']} | {r['accepted']} | {r['shed']} | {r['lost']} | {r['throughput']:.0f} | {other} | {s['p50']:.0f} ms | {s['p90']:.0f} | {s['p99']:.0f} | {s['p999']:.0f} | {s['max']:.0f} | {h['p50']:.1f} ms | {h['p99']:.1f} | {'ok' if r['invariants_ok'] else 'FAIL'} | {peak} | {machine} | {r['checkpoints']} |")
lines.append("")
# CPU of every process over the middle of each run (bench/cpu.py), per order.
reports = {rate: r for rate, r, _ in rows if r}
cpu_ms = {}
cpu_lines = []
for rate in rates:
    path = f"{work}/cpu-{rate}"
    if not os.path.exists(path):
        continue
    usage = {}
    switched = {}
    by_thread = {}
    for line in open(path):
        words = line.split()
        # `group cpu% switches/s` (the group may have spaces in it); `thread:<name> ...` for
        # the marketplace's threads by name.
        try:
            if words[0].startswith("thread:"):
                by_thread[words[0][len("thread:"):]] = float(words[-1])
                continue
            usage[" ".join(words[:-2])] = float(words[-2])
            switched[" ".join(words[:-2])] = float(words[-1])
        except (ValueError, IndexError):
            pass
    total = usage.get("total", 0.0) - usage.get("ldt bench", 0.0)
    services = sum(v for k, v in usage.items() if k.startswith("ldt ") and k != "ldt bench")
    per_s = per_second(rate, reports.get(rate))
    ms = total / 100 * 1000 / per_s
    cs = (switched.get("total", 0.0) - switched.get("ldt bench", 0.0)) / per_s
    cs_services = sum(v for k, v in switched.items() if k.startswith("ldt ") and k != "ldt bench") / per_s
    threads = ", ".join(f"{name} {n / per_s:.0f}" for name, n in sorted(by_thread.items(), key=lambda kv: -kv[1]) if n / per_s >= 0.5) or "–"

    def per_order(name):
        path = f"{work}/{name}-{rate}"
        r = reports.get(rate)
        if not os.path.exists(path) or not r or not r.get("accepted"):
            return "–"
        try:
            return f"{float(open(path).read().strip()) / r['accepted']:.1f}"
        except ValueError:
            return "–"

    cpu_ms[rate] = ms
    cpu_lines.append(f"| {label(rate)} | {ms:.2f} ms | {total:.0f} % | {services:.0f} % | {usage.get('postgresql', 0):.0f} % | {usage.get('rabbitmq', 0):.0f} % | {usage.get('ldt bench', 0):.0f} % | {cs:.0f} ({cs_services:.0f}) | {threads} | {per_order('messages')} ({per_order('broker')}) | {per_order('batches')} | {per_order('commits')} | {per_order('walsyncs')} | {per_order('brokersyncs')} |")
if cpu_lines:
    lines.append("CPU per order (`bench/cpu.py` over each run's middle; every process but the load generator, in % of one core); context switches per order (every thread of those processes, the services' own in brackets), and the services' by thread (their threads' names, summed over the processes: `tokio-rt-worker` is the runtime's; `lapin-io-loop` the AMQP client's I/O thread, one per connection, with `--amqp-io-loop thread` or before it); messages per order (the services' `ldt_messages_published_total`; in brackets the broker messages they went in, `ldt_bus_messages_published_total`, a bundle counting once), the services' consumer batches per order (`ldt_consumer_batches_total`, each a transaction and a round of acks: six an order when every batch is one message, fewer as batches form), PostgreSQL transactions committed per order (`pg_stat_database.xact_commit`, reads included), WAL flushes per order (`pg_stat_wal.wal_sync`) and the broker's fsyncs per order (RabbitMQ's `io_sync` count, read with `rabbitmqctl` when the broker is on this machine: a persistent message is synced to disk before it is confirmed), each over the whole run:\n")
    lines.append("| offered/s | CPU per order | all | services | PostgreSQL | RabbitMQ | load generator | context switches per order | the services' by thread | messages (broker messages) per order | consumer batches per order | transactions per order | WAL flushes per order | broker fsyncs per order |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines.extend(cpu_lines)
    lines.append("")
floor = open(f"{work}/floor.md").read().strip() if os.path.exists(f"{work}/floor.md") else ""
if floor:
    lines.append("The machine's floor in the same sitting, just before (`bench/limits.sh` at 300/s: pgbench at an order's seven durable commits, and six persistent, confirmed broker hops without and with a durable insert each; CPU in % of one core):\n")
    lines.append(floor)
    lines.append("")
    # The floor's CPU a chain (machine % at 300 chains/s), and the 300/s order's CPU against
    # it: hosts of this type differ by a fifth and more in both, the ratio much less.
    chain = None
    for row in floor.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) >= 8 and "durable insert each" in cells[0] and cells[1] == "300 chains/s":
            try: chain = float(cells[-1]) / 100 * 1000 / 300
            except ValueError: pass
    if chain and cpu_ms.get("300", 0) > 0:
        lines.append(f"Against the floor: at 300/s an order took {cpu_ms['300']:.2f} ms of CPU, {cpu_ms['300'] / chain:.2f} times the floor's {chain:.2f} ms a chain of six hops with a durable insert each. Hosts of this type, and one host within the hour, differ by a fifth and more in both figures; the ratio moves much less.\n")
text = "\n".join(lines) + "\n"
header = "# Benchmarks\n\nWritten by `bench/run.sh` (newest first). Saga latency is POST → final status from the orders' own timestamps; HTTP latency counts from when each request was due (open loop, no coordinated omission). Figures are for this machine; see the notes at the end for what each change bought.\n\n"
old = open(out).read() if os.path.exists(out) else header
if old.startswith("# Benchmarks"):
    head, _, rest = old.partition("\n## ")
    new = head.rstrip("\n") + "\n\n" + text + ("\n## " + rest if rest else "")
else:
    new = header + text
open(out, "w").write(new)
print(text)
