#!/usr/bin/env python3
"""CPU used by each group of processes over a window, in % of one core, and their context
switches per second (voluntary and involuntary, every thread).

    bench/cpu.py SECONDS

Prints `group  cpu%  switches/s` per line, then the same for the marketplace's own threads by
thread name, summed over its processes (`thread:lapin-io-loop`, `thread:tokio-rt-worker`, ...):
where the services' context switches go.

Groups: each `ldt serve <role>`, `ldt up`, `ldt bench`, the hop probe, PostgreSQL, RabbitMQ
(the Erlang VM), and everything else by command name. Reads /proc twice: no tool needed.
"""
import os
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def snapshot():
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        procs[pid] = (comm, args, int(fields[11]) + int(fields[12]), switches(pid))
    return procs


def threads(procs):
    """CPU ticks and context switches of each thread of the marketplace's processes, by
    (pid, tid): (thread name, ticks, switches)."""
    out = {}
    for pid, (comm, args, _, _) in procs.items():
        if not group(comm, args).startswith("ldt ") or group(comm, args) in ("ldt bench", "ldt chaos"):
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            out[(pid, tid)] = (name, int(fields[11]) + int(fields[12]), thread_switches(pid, tid))
    return out


def thread_switches(pid, tid):
    """Context switches of one thread so far, voluntary and involuntary."""
    total = 0
    try:
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        pass
    return total


def switches(pid):
    """Context switches of every thread of a process so far."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    return sum(thread_switches(pid, tid) for tid in tasks)


def group(comm, args):
    words = args.split()
    if "ldt" in (os.path.basename(words[0]) if words else "") or comm == "ldt":
        for role in ("serve", "up", "bench", "chaos"):
            if role in words:
                i = words.index(role)
                return "ldt " + " ".join(words[i : i + 2]) if role == "serve" else "ldt " + role
        return "ldt"
    if comm.startswith("postgres") or "postgres" in words[:1]:
        return "postgresql"
    if "beam" in comm or comm in ("epmd", "erl_child_setup", "inet_gethost") or "rabbit" in args:
        return "rabbitmq"
    if "hop_probe" in args:
        return "hop_probe"
    return comm


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    before = snapshot()
    threads_before = threads(before)
    time.sleep(seconds)
    after = snapshot()
    threads_after = threads(after)
    usage = {}
    switched = {}
    for pid, (comm, args, ticks, cs) in after.items():
        # A process that started during the window counts from its start.
        _, _, start, cs_start = before.get(pid, (comm, args, 0, 0))
        name = group(comm, args)
        usage[name] = usage.get(name, 0.0) + (ticks - start) / HZ / seconds * 100
        switched[name] = switched.get(name, 0.0) + max(cs - cs_start, 0) / seconds
    total = sum(usage.values())
    for name, pct in sorted(usage.items(), key=lambda kv: -kv[1]):
        if pct >= 1.0:
            print(f"{name:28s} {pct:6.1f} {switched[name]:9.0f}")
    print(f"{'total':28s} {total:6.1f} {sum(switched.values()):9.0f}")
    by_name = {}
    for key, (name, ticks, cs) in threads_after.items():
        _, start, cs_start = threads_before.get(key, (name, 0, 0))
        pct, rate = by_name.get(name, (0.0, 0.0))
        by_name[name] = (pct + (ticks - start) / HZ / seconds * 100, rate + max(cs - cs_start, 0) / seconds)
    for name, (pct, rate) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        if rate >= 1.0:
            print(f"{'thread:' + name:28s} {pct:6.1f} {rate:9.0f}")


if __name__ == "__main__":
    main()
