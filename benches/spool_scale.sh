#!/usr/bin/env bash
# Start-up time and memory of tern with a large deferred spool.
#
#   benches/spool_scale.sh [spool_dir] [count] [body_size]
#
# Defaults: /tmp/tern-spool-scale-<count>, 1000000 messages, 5120-byte bodies. Run from
# anywhere; it builds what it needs (`cargo build --release`, and the spool_fill example).
#
# 1. If spool_dir does not exist, fills it with `count` deferred messages
#    (examples/spool_fill.rs: next attempt DUE_IN_S from now, default 2 days, so nothing
#    falls due during the measurement; refill if the spool is older than that).
# 2. Writes a config next to the spool: [spool] path, a listener on a free 127.0.0.1 port,
#    delivery not suspended (the scheduler runs; nothing is due), delivery log off, and one
#    route "*" -> a closed 127.0.0.1 port, so the test message is deferred and nothing
#    leaves the host.
# 3. Starts `tern serve` and measures from process start: the time until a connection gets
#    the 220 greeting (connects are retried every 5 ms), and until one 5 KB message sent on
#    that connection is accepted ("250 ... queued"); VmRSS/VmHWM (/proc/<pid>/status) at
#    both points and the peak VmRSS during the next SETTLE_S seconds (default 20; background
#    work such as the orphan-body sweep runs then).
# 4. SIGTERMs tern and reports the shutdown time and the spool size on disk.
#
# Note: a clean close (spool_fill's, and tern's on SIGTERM) leaves a record that lets the next
# open skip the recovery scan, and a sled snapshot so it skips the log replay (the start logs
# after_clean_close=true). CRASH=1 measures the start after a crash instead: it starts tern
# once, SIGKILLs it as soon as it greets, then measures the next start, whose open finds no
# record and recovers: the daemon takes mail at once and scans every envelope and due key in
# the background; the report says when that scan ended ("spool recovery done") and the peak
# VmRSS until then. The first tern is killed once its sled is open ("spool opened" in its log):
# it greets before that (mail goes to the intake journal while sled opens), and a kill before
# the open has taken the clean-close record would leave the spool as cleanly closed as it was.
#
# Environment:
#   TERN=path        tern binary (default: target/release/tern, built first)
#   CACHE_SIZE=256MiB  write spool.cache_size into the config (default: not written: 128MiB)
#   DUE_IN_S=172800  when filling: how far in the future messages are due
#   WRITERS=256      when filling: concurrent commits
#   SETTLE_S=20      how long to watch memory after the first accepted message
#   CRASH=1          SIGKILL a first tern on the spool, then measure the start after that crash
#   DROP_CACHES=1    drop the kernel page cache before starting tern (root only): a cold start,
#                    as after a reboot (after the crash, with CRASH=1)
#   WARM=1           read the spool files once right before starting tern: a warm start, as when
#                    tern restarts on a host that keeps the files cached (without either, the start
#                    is as warm as the page cache happens to be, which varies between runs)
#   DELIVER=1        "all mail still delivered afterwards": the spool is filled with mail due at
#                    once (DUE_IN_S=0; default spool dir /tmp/tern-spool-scale-<count>-due, filled
#                    anew for each run since delivery empties it), route "*" goes to Postfix's
#                    smtp-sink on a free 127.0.0.1 port instead of a closed one, and the delivery
#                    log is on. After the measurement the script waits until the recovery scan
#                    has ended and the spool is empty (tern_spool_messages on /metrics), then
#                    reports the delivery time and rate, the sink's message count, the distinct
#                    recipients the delivery log says were delivered (every user<n> of the fill
#                    must be there), bounces, and the peak VmRSS over the whole delivery; after
#                    SIGTERM, `tern queue list` on the spool must count 0 messages.
set -euo pipefail

COUNT=${2:-1000000}
if [[ ${DELIVER:-0} == 1 ]]; then
    SPOOL=${1:-/tmp/tern-spool-scale-$COUNT-due}
    DUE_IN_S=${DUE_IN_S:-0}
    if [[ -e $SPOOL && -z ${1:-} ]]; then
        rm -rf "$SPOOL"  # delivered by the last run: fill it again
    fi
else
    SPOOL=${1:-/tmp/tern-spool-scale-$COUNT}
fi
BODY=${3:-5120}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if [[ -z ${TERN:-} ]]; then
    (cd "$ROOT" && cargo build --release --bin tern --example spool_fill)
    TERN=$ROOT/target/release/tern
fi

if [[ ! -e $SPOOL ]]; then
    echo "== filling $SPOOL with $COUNT messages of $BODY bytes"
    (cd "$ROOT" && cargo build --release --example spool_fill)
    "$ROOT/target/release/examples/spool_fill" "$SPOOL" "$COUNT" "$BODY" \
        "${WRITERS:-256}" "${DUE_IN_S:-172800}"
fi
echo "== spool on disk: $(du -sh "$SPOOL" | cut -f1) ($SPOOL)"

if [[ ${WARM:-0} == 1 ]]; then
    cat "$SPOOL"/db "$SPOOL"/snap.* >/dev/null 2>&1 || true
    echo "== read the spool files into the page cache (warm start)"
fi
exec python3 - "$TERN" "$SPOOL" "${CACHE_SIZE:-}" "${SETTLE_S:-20}" "${CRASH:-0}" "${DROP_CACHES:-0}" "${DELIVER:-0}" "$COUNT" <<'PY'
import json, os, re, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request

tern, spool, cache_size, settle = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
crash, drop_caches, deliver = sys.argv[5] == "1", sys.argv[6] == "1", sys.argv[7] == "1"
count = int(sys.argv[8])

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port

smtp_port, admin_port, dead_port = free_port(), free_port(), free_port()
workdir = tempfile.mkdtemp(prefix="tern-scale-")
config = os.path.join(workdir, "tern.toml")
delivery_log = os.path.join(workdir, "delivery.log")
sink = None
if deliver:
    smtp_sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not os.path.exists(smtp_sink):
        sys.exit("DELIVER=1 needs Postfix's smtp-sink (apt-get install postfix)")
    sink_out = os.path.join(workdir, "sink.out")
    args = [smtp_sink, "-c", "-m", "2048"]
    if os.getuid() == 0:
        args += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
    sink = subprocess.Popen(args + [f"127.0.0.1:{dead_port}", "4096"],
                            stdout=open(sink_out, "w"), stderr=subprocess.STDOUT)
    time.sleep(0.5)

def sink_count():
    """Messages smtp-sink counted (its -c output: "sess=A quit=B mesg=C\\r")."""
    found = re.findall(rb"mesg=(\d+)", open(sink_out, "rb").read()[-400:])
    return int(found[-1]) if found else 0
with open(config, "w") as f:
    f.write(f"""
[server]
hostname = "tern.localhost"
shutdown_grace = "5s"
[[listeners]]
address = "127.0.0.1:{smtp_port}"
[relay]
networks = ["127.0.0.0/8"]
[spool]
path = "{spool}"
{f'cache_size = "{cache_size}"' if cache_size else ''}
[admin]
address = "127.0.0.1:{admin_port}"
[[routes]]
domain = "*"
hosts = ["127.0.0.1:{dead_port}"]
[delivery]
suspended = false
log_path = "{delivery_log if deliver else 'off'}"
[log]
level = "info"
""")

def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) // 1024
    return out

def mem(pid):
    s = status(pid)
    return f"VmRSS {s['VmRSS']} MB, VmHWM {s['VmHWM']} MB"

if crash:
    crashed_log = os.path.join(workdir, "crashed.log")
    first = subprocess.Popen([tern, "serve", "--config", config],
                             stdout=open(crashed_log, "w"),
                             stderr=subprocess.STDOUT)
    while "spool opened" not in open(crashed_log).read():
        if first.poll() is not None:
            sys.exit(f"the tern to crash exited with {first.returncode}")
        time.sleep(0.05)
    first.kill()
    first.wait()
    print("== SIGKILLed a running tern on the spool (the next start recovers)")
if drop_caches:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    print("== dropped the page cache (cold start)")

log_path = os.path.join(workdir, "tern.log")
log = open(log_path, "w")
t0 = time.monotonic()
proc = subprocess.Popen([tern, "serve", "--config", config], stdout=log, stderr=subprocess.STDOUT)
elapsed = lambda: time.monotonic() - t0

def fail(msg):
    proc.kill()
    sys.exit(f"{msg}\n--- tern log ({log_path}):\n" + open(log_path).read()[-4000:])

while True:
    if proc.poll() is not None:
        fail(f"tern exited with {proc.returncode} before accepting connections")
    try:
        sock = socket.create_connection(("127.0.0.1", smtp_port), timeout=60)
        break
    except ConnectionRefusedError:
        time.sleep(0.005)
reader = sock.makefile("rb")

def reply():
    while True:
        line = reader.readline().decode()
        if len(line) < 4 or line[3] != "-":
            return line.strip()

greeting = reply()
t_220 = elapsed()
if not greeting.startswith("220"):
    fail(f"unexpected greeting {greeting!r}")
mem_220 = mem(proc.pid)

body = (b"From: <bench@example.com>\r\nTo: <someone@example.net>\r\nSubject: scale\r\n\r\n"
        + b"x" * 70 + b"\r\n") * 1
while len(body) < 5120:
    body += b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\r\n"
for cmd, code in ((b"EHLO bench.test", "250"), (b"MAIL FROM:<bench@example.com>", "250"),
                  (b"RCPT TO:<someone@example.net>", "250"), (b"DATA", "354")):
    sock.sendall(cmd + b"\r\n")
    r = reply()
    if not r.startswith(code):
        fail(f"{cmd!r}: {r!r}")
sock.sendall(body + b".\r\n")
accepted = reply()
t_250 = elapsed()
if not (accepted.startswith("250") and "queued" in accepted):
    fail(f"message not accepted: {accepted!r}")
mem_250 = mem(proc.pid)
sock.sendall(b"QUIT\r\n")
reply()
sock.close()

peak = 0
end = time.monotonic() + settle
recovered_at = None
# Watches at least `settle` seconds, and with a crash until the recovery scan has ended.
while proc.poll() is None and (time.monotonic() < end or (crash and recovered_at is None)):
    peak = max(peak, status(proc.pid)["VmRSS"])
    if recovered_at is None and "spool recovery done" in open(log_path).read():
        recovered_at = elapsed()
    if elapsed() > 900:
        fail("recovery did not end within 900 s")
    time.sleep(0.2)
mem_settled = mem(proc.pid)

def metrics():
    """tern_spool_messages, tern_spool_recovering, and tern_deliveries_total summed by outcome
    (keys "outcome=<name>")."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        m = re.match(r"^(tern_spool_messages|tern_spool_recovering|tern_deliveries_total)(\{[^}]*\})? (\S+)$", line)
        if not m:
            continue
        key = m.group(1)
        if key == "tern_deliveries_total":
            outcome = re.search(r'outcome="([^"]*)"', m.group(2) or "")
            key = "outcome=" + (outcome.group(1) if outcome else "?")
        values[key] = values.get(key, 0) + float(m.group(3))
    return values

if deliver:
    # Until the scan is over (the gauge is exact) and nothing is left in the spool.
    deliver_peak = peak
    while True:
        if proc.poll() is not None:
            fail(f"tern exited with {proc.returncode} while delivering")
        deliver_peak = max(deliver_peak, status(proc.pid)["VmRSS"])
        m = metrics()
        if m.get("tern_spool_recovering", 1) == 0 and m.get("tern_spool_messages", 1) == 0:
            break
        if elapsed() > 3600:
            fail(f"the spool was not empty within an hour: {m}")
        time.sleep(0.5)
    delivered_at = elapsed()
    final_metrics = metrics()
    time.sleep(1)  # the delivery log's writer lingers a few ms

t_stop = time.monotonic()
proc.send_signal(signal.SIGTERM)
try:
    proc.wait(timeout=120)
except subprocess.TimeoutExpired:
    fail("tern did not stop within 120 s of SIGTERM")
t_stop = time.monotonic() - t_stop
log.close()

print(f"time to 220 greeting:        {t_220:7.2f} s   ({mem_220})")
print(f"time to first 250 queued:    {t_250:7.2f} s   ({mem_250})   {accepted}")
for line in open(log_path):
    m = re.search(r"spool opened.*?sled_ms=(\d+).*?total_ms=(\d+)", line)
    if m:
        print(f"sled open (in its thread):   {int(m.group(1)) / 1000:7.2f} s   "
              f"(journal moved, spool ready: {int(m.group(2)) / 1000:.2f} s after the open began)")
if recovered_at is not None:
    print(f"recovery scan over after:    {recovered_at:7.2f} s   (from process start)")
print(f"after {settle:.0f} s more:              peak VmRSS {peak} MB; now {mem_settled}")
print(f"shutdown after SIGTERM:      {t_stop:7.2f} s   (exit {proc.returncode})")
if deliver:
    sink.terminate()
    recipients, bounced = set(), 0
    for line in open(delivery_log):
        record = json.loads(line)
        status_ = record.get("status") or record.get("outcome")
        if status_ == "delivered":
            recipients.add(record["recipient"])
        elif status_ in ("bounced", "expired"):
            bounced += 1
    wanted = {f"user{n}@customer{n % 1000}.example" for n in range(count)}
    missing = len(wanted - recipients)
    outcomes = {k: int(v) for k, v in final_metrics.items() if k.startswith("outcome=")}
    # `queue list` reads the stopped daemon's spool itself; its last line counts what is left.
    listing = subprocess.run([tern, "queue", "list", "--config", config],
                             capture_output=True, text=True)
    left = (listing.stdout.strip().splitlines() or [listing.stderr.strip()])[-1]
    print(f"all delivered after:         {delivered_at:7.2f} s   (from process start; "
          f"{count / max(delivered_at - t_250, 0.001):.0f} msgs/s after the first 250)")
    print(f"peak VmRSS while delivering: {deliver_peak} MB")
    print(f"sink counted:                {sink_count()} messages (this run and the crashed one's, "
          f"which may repeat what it delivered but had not removed when killed)")
    print(f"delivery log:                {len(recipients & wanted)} of {count} filled recipients delivered, "
          f"{missing} missing, {bounced} bounce lines; this run's deliveries by outcome {outcomes}")
    print(f"spool after stop:            {left}   (tern queue list)")
    if missing or bounced or left != "-- 0 messages, 0 bytes":
        sys.exit("DELIVER=1: not every message was delivered")
print("--- spool lines from the tern log:")
for line in open(log_path):
    if "spool" in line or "orphan" in line or "ERROR" in line or "WARN" in line:
        print("  " + re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip()))
shutil.rmtree(workdir)  # kept when a step failed, for its tern.log
PY
