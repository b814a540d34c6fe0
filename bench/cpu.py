#!/usr/bin/env python3
"""CPU used by each group of processes over a window, in % of one core.

    bench/cpu.py SECONDS

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
        procs[pid] = (comm, args, int(fields[11]) + int(fields[12]))
    return procs


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
    time.sleep(seconds)
    after = snapshot()
    usage = {}
    for pid, (comm, args, ticks) in after.items():
        # A process that started during the window counts from its start.
        start = before.get(pid, (comm, args, 0))[2]
        usage[group(comm, args)] = usage.get(group(comm, args), 0.0) + (ticks - start) / HZ / seconds * 100
    total = sum(usage.values())
    for name, pct in sorted(usage.items(), key=lambda kv: -kv[1]):
        if pct >= 1.0:
            print(f"{name:28s} {pct:6.1f}")
    print(f"{'total':28s} {total:6.1f}")


if __name__ == "__main__":
    main()
