#!/usr/bin/env bash
# many_domains.sh -- bulk mail to many domains found through MX, behind provider shaping,
# beside the single-destination figure in the same run (loopback only).
#
# Usage (from the repo root, as root, with Debian's postfix package for smtp-sink):
#   benches/many_domains.sh [messages] [domains] [sessions]     # default 100000 10000 50
#
# 1. Builds `tern` and the examples `bench_dns` and `smtp_load` (release).
# 2. Starts examples/bench_dns.rs: an authoritative DNS server on 127.0.0.1 with MX records for
#    d0..d{domains-1}.bench.test; the MX hosts sit under the suffixes of tern's four built-in
#    providers (google, microsoft, yahoo, apple), a few shared hosts each, resolving to
#    127.0.0.2 .. 127.0.0.5.
# 3. Starts Postfix's smtp-sink on 127.0.0.2:25 .. 127.0.0.5:25 (one per provider) and on
#    127.0.0.6:25 (the single destination).
# 4. Runs tern on config/tern.toml with: delivery.nameservers = the bench DNS server,
#    delivery.allow_local_mx = true (the MX hosts are loopback addresses), the built-in
#    providers on with their limits raised so they do not bind (16 connections each like a
#    static route's default, 1000 messages per connection, 1,000,000/min), and a static route
#    single.bench.test -> 127.0.0.6:25. Everything else is the example config (MTA-STS on,
#    delivery log on).
# 5. Two phases, each from an empty spool, `messages` x 5 KB over `sessions` SMTP sessions
#    (examples/smtp_load.rs, a connection per message like smtp-source):
#      single: every recipient at single.bench.test (one static route, one sink);
#      many:   each message to one recipient at a random one of the domains (by MX).
#    Reports per phase: accept and end-to-end msgs/s, the daemon's CPU per message
#    (utime+stime from /proc), peak RSS (VmHWM); for many-domains also messages per provider
#    sink and their rates, connections the sinks accepted vs messages (reuse), DNS queries by
#    type and per domain used, and tern_deliveries_total by destination from /metrics.
#
# Postfix is not run beside it: its SMTP client resolves MX through the libc resolver, which
# takes nameservers from /etc/resolv.conf on port 53 only; pointing it at this server would
# mean changing the machine's resolver (see docs/ARCHITECTURE.md, "Many domains").
set -euo pipefail
MESSAGES=${1:-100000}
DOMAINS=${2:-10000}
SESSIONS=${3:-50}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
(cd "$ROOT" && cargo build --release --bin tern --example bench_dns --example smtp_load)
exec python3 - "$ROOT" "$MESSAGES" "$DOMAINS" "$SESSIONS" <<'PY'
import os, re, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request

root, messages, domains, sessions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
release = os.path.join(root, "target", "release")
tern = os.path.join(release, "tern")
work = tempfile.mkdtemp(prefix="tern-many-domains-")
procs = []

def cleanup():
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()

def die(msg):
    cleanup()
    sys.exit(f"many_domains: {msg} (work dir kept: {work})")

# --- DNS -------------------------------------------------------------------------------------
dns = subprocess.Popen([os.path.join(release, "examples", "bench_dns"), str(domains)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
procs.append(dns)
line = dns.stdout.readline()
m = re.match(r"dns_server=(127\.0\.0\.1:\d+)", line)
if not m:
    die(f"bench_dns said {line!r}")
dns_addr = m.group(1)

# --- sinks -----------------------------------------------------------------------------------
sink_bin = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SINKS = {"google": "127.0.0.2", "microsoft": "127.0.0.3", "yahoo": "127.0.0.4",
         "apple": "127.0.0.5", "single": "127.0.0.6"}
sink_out = {}
for name, ip in SINKS.items():
    out = os.path.join(work, f"sink-{name}.out")
    sink_out[name] = out
    args = [sink_bin, "-c", "-m", "2048"] + (["-u", "nobody"] if os.getuid() == 0 else [])
    procs.append(subprocess.Popen(args + [f"{ip}:25", "4096"], stdout=open(out, "w"),
                                  stderr=open(out + ".err", "w")))
for name, ip in SINKS.items():
    for _ in range(100):
        try:
            socket.create_connection((ip, 25), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        die(f"smtp-sink did not come up on {ip}:25: " + open(sink_out[name] + ".err").read())

def sink_counts(name):
    """(sessions, messages) from smtp-sink -c's last "sess=A quit=B mesg=C" line."""
    text = open(sink_out[name], "rb").read()[-400:].decode(errors="replace")
    found = re.findall(r"sess=(\d+) quit=\d+ mesg=(\d+)", text)
    return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)

# --- tern config -----------------------------------------------------------------------------
base = open(os.path.join(root, "config", "tern.toml")).read()
for old, new in (("nameservers = []", f'nameservers = ["{dns_addr}"]'),
                 ("allow_local_mx = false", "allow_local_mx = true"),
                 ("check_dkim_records = true", "check_dkim_records = false")):
    if old not in base:
        die(f"config/tern.toml has no line {old!r}")
    base = base.replace(old, new)
base += """
[[routes]]
domain = "single.bench.test"
hosts = ["127.0.0.6:25"]
"""
for name, mx in (("google", '[".google.com", ".googlemail.com"]'),
                 ("microsoft", '[".protection.outlook.com", ".outlook.com", ".hotmail.com"]'),
                 ("yahoo", '[".yahoodns.net"]'), ("apple", '[".icloud.com", ".me.com"]')):
    base += f"""
[[shaping.providers]]
name = "{name}"
mx = {mx}
max_connections = 16
max_messages_per_connection = 1000
rate = "1000000/min"
"""

def proc_stat(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime, seconds

def vm_hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0

def phase(label, load_env, sinks):
    run = os.path.join(work, label)
    os.makedirs(os.path.join(run, "config"))
    config = os.path.join(run, "config", "tern.toml")
    open(config, "w").write(base)
    log = open(os.path.join(run, "tern.log"), "w")
    p = subprocess.Popen([tern, "serve", "--config", config], cwd=run, stdout=log,
                         stderr=subprocess.STDOUT)
    procs.append(p)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", 2525), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        die(f"{label}: tern did not listen on 127.0.0.1:2525")
    before = {s: sink_counts(s) for s in sinks}
    cpu0 = proc_stat(p.pid)
    t0 = time.monotonic()
    env = dict(os.environ, **load_env)
    out = subprocess.run([os.path.join(release, "examples", "smtp_load"), "127.0.0.1:2525",
                          str(messages), str(sessions), "5120"], env=env, capture_output=True,
                         text=True)
    t_accept = time.monotonic() - t0
    if out.returncode != 0:
        die(f"{label}: smtp_load failed: {out.stdout} {out.stderr}")
    delivered = 0
    deadline = time.monotonic() + 1200
    while True:
        now = {s: sink_counts(s) for s in sinks}
        delivered = sum(now[s][1] - before[s][1] for s in sinks)
        if delivered >= messages or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    t_e2e = time.monotonic() - t0
    cpu = proc_stat(p.pid) - cpu0
    rss = vm_hwm(p.pid)
    metrics = urllib.request.urlopen("http://127.0.0.1:8025/metrics", timeout=10).read().decode()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    after = {s: sink_counts(s) for s in sinks}
    print(f"== {label}: {messages} x 5 KB, {sessions} sessions")
    print(f"   accept {messages / t_accept:8.0f} msgs/s   e2e {delivered / t_e2e:8.0f} msgs/s"
          f"   delivered {delivered} lost {messages - delivered}")
    print(f"   daemon CPU {cpu:.1f} s = {cpu / max(delivered, 1) * 1000:.3f} ms/message"
          f"   peak RSS (VmHWM) {rss} MB")
    conns = sum(after[s][0] - before[s][0] for s in sinks)
    for s in sinks:
        n = after[s][1] - before[s][1]
        c = after[s][0] - before[s][0]
        print(f"   sink {s:10} {n:7} messages ({n / t_e2e:7.0f}/s) over {c:6} connections")
    print(f"   connections opened {conns} for {delivered} messages"
          f" ({delivered / max(conns, 1):.1f} messages per connection)")
    for line in metrics.splitlines():
        if line.startswith("tern_deliveries_total{"):
            print("   " + line)
    return delivered / t_e2e

single = phase("single", {"RCPT_DOMAIN": "single.bench.test"}, ["single"])
many = phase("many", {"RCPT_DOMAINS": str(domains)}, ["google", "microsoft", "yahoo", "apple"])
dns.stdin.close()
queries = dns.stdout.read()
dns.wait(timeout=10)
total = 0
for line in queries.splitlines():
    m = re.match(r"dns_queries type=(\S+) n=(\d+)", line)
    if m:
        total += int(m.group(2))
        print(f"   DNS {m.group(1):6} queries {int(m.group(2)):7}")
used = min(domains, messages)
print(f"   DNS queries in all {total}: {total / used:.2f} per domain (about {used} domains used)")
print(f"many-domains e2e / single-destination e2e = {many / single:.2f}")
cleanup()
shutil.rmtree(work)
PY
