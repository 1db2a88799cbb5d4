#!/usr/bin/env bash
# many_domains.sh -- bulk mail to many domains found through MX, behind provider shaping,
# beside the single-destination figure and beside Postfix, in the same run (loopback only).
#
# Usage (from the repo root, as root, with Debian's postfix package for smtp-sink and the
# Postfix phase):
#   benches/many_domains.sh [messages] [domains] [sessions]     # default 100000 10000 50
# Environment: TERN_SMTP_PORT (3525) and TERN_ADMIN_PORT (9025): tern's listeners on
# 127.0.0.1; POSTFIX_PORT (3527): the Postfix instance's smtpd; BENCH_DNS_ADDR (127.0.0.53:53):
# where the DNS server listens when Postfix runs; POSTFIX=0 skips the Postfix phase;
# POSTFIX_MESSAGES (= messages): its message count; SKIP_BUILD=1 uses the release binaries
# already built.
#
# 1. Builds `tern` and the examples `bench_dns` and `smtp_load` (release).
# 2. Starts examples/bench_dns.rs: an authoritative DNS server with MX records for
#    d0..d{domains-1}.bench.test; the MX hosts sit under the suffixes of tern's four built-in
#    providers (google, microsoft, yahoo, apple), 4 shared hosts each, resolving to
#    127.0.0.2 .. 127.0.0.5. With the Postfix phase it listens on port 53 of BENCH_DNS_ADDR
#    (checked free first; the machine's resolver is never touched), else on 127.0.0.1:any.
# 3. Starts Postfix's smtp-sink on 127.0.0.2:25 .. 127.0.0.5:25 (one per provider) and on
#    127.0.0.6:25 (the single destination).
# 4. Runs tern on config/tern.toml with: delivery.nameservers = the bench DNS server,
#    delivery.allow_local_mx = true (the MX hosts are loopback addresses), the built-in
#    providers on with their limits raised so they do not bind (16 connections each like a
#    static route's default, 1000 messages per connection, 1,000,000/min), and a static route
#    single.bench.test -> 127.0.0.6:25. Everything else is the example config (MTA-STS on,
#    delivery log on).
# 5. Phases, each from an empty spool, `messages` x 5 KB over `sessions` SMTP sessions
#    (examples/smtp_load.rs, a connection per message like smtp-source):
#      single:  tern, every recipient at single.bench.test (one static route, one sink);
#      many:    tern, each message to one recipient at a random one of the domains (by MX);
#      postfix: the same many-domain load through a throwaway Postfix instance (own
#               config, queue and log in a temp dir, as ../shared/bench/postfix-baseline
#               builds it, chroot off) relaying by MX (smtp_dns_support_level = enabled)
#               to the same sinks. Its libc resolver reads /etc/resolv.conf and port 53
#               only, so it runs inside `unshare -m` with a private resolv.conf
#               ("nameserver <BENCH_DNS_ADDR's ip>") bind-mounted over /etc/resolv.conf in
#               that mount namespace alone.
#    Reports per phase: accept and end-to-end msgs/s, the daemon's CPU per message
#    (utime+stime from /proc; for Postfix the master's reaped children plus the live ones),
#    peak RSS (VmHWM; tern only), messages per provider sink and their rates, connections the
#    sinks accepted vs messages (reuse), DNS queries by type and per domain used in that
#    phase, and for tern tern_deliveries_total by destination from /metrics.
set -euo pipefail
MESSAGES=${1:-100000}
DOMAINS=${2:-10000}
SESSIONS=${3:-50}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# SKIP_BUILD=1: use the release binaries already built.
[ "${SKIP_BUILD:-0}" = 1 ] ||
  (cd "$ROOT" && cargo build --release --bin tern --example bench_dns --example smtp_load)
exec python3 - "$ROOT" "$MESSAGES" "$DOMAINS" "$SESSIONS" <<'PY'
import os, re, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request

root, messages, domains, sessions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
release = os.path.join(root, "target", "release")
tern = os.path.join(release, "tern")
smtp_port = int(os.environ.get("TERN_SMTP_PORT", "3525"))
admin_port = int(os.environ.get("TERN_ADMIN_PORT", "9025"))
postfix_port = int(os.environ.get("POSTFIX_PORT", "3527"))
postfix_messages = int(os.environ.get("POSTFIX_MESSAGES", str(messages)))
postfix_bin = shutil.which("postfix") or "/usr/sbin/postfix"
run_postfix = (os.environ.get("POSTFIX", "1") != "0" and os.getuid() == 0
               and os.path.exists(postfix_bin) and shutil.which("unshare") is not None)
work = tempfile.mkdtemp(prefix="tern-many-domains-")
os.chmod(work, 0o755)
procs = []
postfix_dir = None

def postfix_stop():
    global postfix_dir
    if postfix_dir:
        subprocess.run([postfix_bin, "-c", os.path.join(postfix_dir, "etc"), "stop"],
                       capture_output=True)
        pid_file = os.path.join(postfix_dir, "queue", "pid", "master.pid")
        try:
            pid = int(open(pid_file).read().split()[0])
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
        except (OSError, ValueError, IndexError):
            pass
        postfix_dir = None

def cleanup():
    postfix_stop()
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()

def die(msg):
    cleanup()
    sys.exit(f"many_domains: {msg} (work dir kept: {work})")

def port_free(ip, port, kind):
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind((ip, port))
        return True
    except OSError:
        return False
    finally:
        s.close()

# --- DNS -------------------------------------------------------------------------------------
dns_args = [os.path.join(release, "examples", "bench_dns"), str(domains)]
if run_postfix:
    dns_listen = os.environ.get("BENCH_DNS_ADDR", "127.0.0.53:53")
    dns_ip, dns_port = dns_listen.rsplit(":", 1)
    if not dns_ip.startswith("127."):
        die(f"BENCH_DNS_ADDR {dns_listen}: loopback only")
    if not (port_free(dns_ip, int(dns_port), socket.SOCK_DGRAM)
            and port_free(dns_ip, int(dns_port), socket.SOCK_STREAM)):
        die(f"{dns_listen} is taken (set BENCH_DNS_ADDR to a free loopback address, or POSTFIX=0)")
    dns_args.append(dns_listen)
dns = subprocess.Popen(dns_args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
procs.append(dns)
line = dns.stdout.readline()
m = re.match(r"dns_server=(127\.\d+\.\d+\.\d+:\d+)", line)
if not m:
    die(f"bench_dns said {line!r}")
dns_addr = m.group(1)

def dns_counts():
    """Queries so far by record type."""
    dns.stdin.write("\n")
    dns.stdin.flush()
    counts = {}
    while True:
        line = dns.stdout.readline()
        if not line or line.startswith("dns_queries end"):
            return counts
        m = re.match(r"dns_queries type=(\S+) n=(\d+)", line)
        if m:
            counts[m.group(1)] = int(m.group(2))

def report_dns(before, after, used):
    total = 0
    for t in sorted(after):
        n = after[t] - before.get(t, 0)
        total += n
        print(f"   DNS {t:6} queries {n:7}")
    mx = after.get("MX", 0) - before.get("MX", 0)
    print(f"   DNS MX queries {mx / max(used, 1):.2f} per domain; all queries {total}:"
          f" {total / max(used, 1):.2f} per domain (about {used} domains used)")

# --- sinks -----------------------------------------------------------------------------------
sink_bin = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SINKS = {"google": "127.0.0.2", "microsoft": "127.0.0.3", "yahoo": "127.0.0.4",
         "apple": "127.0.0.5", "single": "127.0.0.6"}
PROVIDERS = ["google", "microsoft", "yahoo", "apple"]
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
                 ("check_dkim_records = true", "check_dkim_records = false"),
                 ('address = "127.0.0.1:2525"', f'address = "127.0.0.1:{smtp_port}"'),
                 ('address = "127.0.0.1:8025"', f'address = "127.0.0.1:{admin_port}"'),
                 ('base_url = "http://127.0.0.1:8025"', f'base_url = "http://127.0.0.1:{admin_port}"')):
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

def proc_stat(pid, children=False):
    """utime + stime in seconds; with `children`, cutime + cstime as well."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    t = int(fields[11]) + int(fields[12])
    if children:
        t += int(fields[13]) + int(fields[14])
    return t / os.sysconf("SC_CLK_TCK")

def tree_cpu(master):
    """The master's CPU, its reaped children's, and that of its live children."""
    total = proc_stat(master, children=True)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            if int(stat[1]) == master:
                total += proc_stat(int(entry), children=True)
        except OSError:
            pass
    return total

def vm_hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0

def wait_listen(port, what):
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    die(f"{what} did not listen on 127.0.0.1:{port}")

def load_and_wait(label, port, count, load_env, sinks, cpu_of):
    """Runs smtp_load against `port` and waits for the sinks to see every message.
    Returns (t_accept, t_e2e, delivered, cpu, before, after)."""
    before = {s: sink_counts(s) for s in sinks}
    cpu0 = cpu_of()
    t0 = time.monotonic()
    env = dict(os.environ, **load_env)
    out = subprocess.run([os.path.join(release, "examples", "smtp_load"), f"127.0.0.1:{port}",
                          str(count), str(sessions), "5120"], env=env, capture_output=True,
                         text=True)
    t_accept = time.monotonic() - t0
    if out.returncode != 0:
        die(f"{label}: smtp_load failed: {out.stdout} {out.stderr}")
    delivered = 0
    deadline = time.monotonic() + 1800
    while True:
        now = {s: sink_counts(s) for s in sinks}
        delivered = sum(now[s][1] - before[s][1] for s in sinks)
        if delivered >= count or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    t_e2e = time.monotonic() - t0
    cpu = cpu_of() - cpu0
    return t_accept, t_e2e, delivered, cpu, before, now

def report(label, count, t_accept, t_e2e, delivered, cpu, rss, before, after, sinks):
    print(f"== {label}: {count} x 5 KB, {sessions} sessions")
    print(f"   accept {count / t_accept:8.0f} msgs/s   e2e {delivered / t_e2e:8.0f} msgs/s"
          f"   delivered {delivered} lost {count - delivered}")
    rss_text = f"   peak RSS (VmHWM) {rss} MB" if rss is not None else ""
    print(f"   CPU {cpu:.1f} s = {cpu / max(delivered, 1) * 1000:.3f} ms/message{rss_text}")
    conns = sum(after[s][0] - before[s][0] for s in sinks)
    for s in sinks:
        n = after[s][1] - before[s][1]
        c = after[s][0] - before[s][0]
        print(f"   sink {s:10} {n:7} messages ({n / t_e2e:7.0f}/s) over {c:6} connections")
    print(f"   connections opened {conns} for {delivered} messages"
          f" ({delivered / max(conns, 1):.1f} messages per connection)")

def phase(label, load_env, sinks):
    run = os.path.join(work, label)
    os.makedirs(os.path.join(run, "config"))
    config = os.path.join(run, "config", "tern.toml")
    open(config, "w").write(base)
    log = open(os.path.join(run, "tern.log"), "w")
    p = subprocess.Popen([tern, "serve", "--config", config], cwd=run, stdout=log,
                         stderr=subprocess.STDOUT)
    procs.append(p)
    wait_listen(smtp_port, f"{label}: tern")
    dns0 = dns_counts()
    t_accept, t_e2e, delivered, cpu, before, _ = load_and_wait(
        label, smtp_port, messages, load_env, sinks, lambda: proc_stat(p.pid))
    rss = vm_hwm(p.pid)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics",
                                     timeout=10).read().decode()
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    after = {s: sink_counts(s) for s in sinks}
    report(f"tern {label}", messages, t_accept, t_e2e, delivered, cpu, rss, before, after, sinks)
    for line in metrics.splitlines():
        if line.startswith("tern_deliveries_total{"):
            print("   " + line)
    if label == "many":
        report_dns(dns0, dns_counts(), min(domains, messages))
    return delivered / t_e2e

def postfix_phase():
    """The many-domain load through a throwaway Postfix instance resolving MX through the
    bench DNS server (private resolv.conf in a mount namespace of its own)."""
    global postfix_dir
    postconf = shutil.which("postconf") or "/usr/sbin/postconf"
    if not port_free("127.0.0.1", postfix_port, socket.SOCK_STREAM):
        die(f"127.0.0.1:{postfix_port} is taken (set POSTFIX_PORT)")
    d = os.path.join(work, "postfix")
    for sub in ("etc", "queue", "data"):
        os.makedirs(os.path.join(d, sub))
    shutil.chown(os.path.join(d, "data"), "postfix", "postfix")
    resolv = os.path.join(d, "resolv.conf")
    open(resolv, "w").write(f"nameserver {dns_addr.rsplit(':', 1)[0]}\noptions attempts:2 timeout:2\n")
    os.chmod(resolv, 0o644)
    open(os.path.join(d, "etc", "main.cf"), "w").write(f"""# generated by many_domains.sh
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
myhostname = relay.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
local_transport = error:5.1.1 local delivery disabled in benchmark
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# d*.bench.test by MX through the bench DNS server; nothing else leaves.
relay_domains = .bench.test
relay_transport = relay
transport_maps = inline:{{.bench.test=relay}}
default_transport = error:5.7.1 only bench.test is routed in this benchmark
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtp_dns_support_level = enabled
smtp_host_lookup = dns
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
# throughput, as ../shared/bench/postfix-baseline
default_destination_concurrency_limit = 50
initial_destination_concurrency = 10
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
""")
    services = """pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
    open(os.path.join(d, "etc", "master.cf"), "w").write(
        f"127.0.0.1:{postfix_port} inet n - n - - smtpd\n" + services)
    etc = os.path.join(d, "etc")
    if subprocess.run([postfix_bin, "-c", etc, "check"]).returncode != 0:
        die("postfix check failed: " + open(os.path.join(d, "maillog")).read()[-2000:])
    postfix_dir = d
    # Private resolv.conf for Postfix alone: a bind mount in a new mount namespace (private
    # propagation), which the master and every daemon it forks stay in.
    started = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f'mount --bind "{resolv}" /etc/resolv.conf && exec "{postfix_bin}" -c "{etc}" start'])
    if started.returncode != 0:
        die("postfix start failed")
    wait_listen(postfix_port, "postfix")
    master = int(open(os.path.join(d, "queue", "pid", "master.pid")).read().split()[0])
    dns0 = dns_counts()
    t_accept, t_e2e, delivered, cpu, before, _ = load_and_wait(
        "postfix", postfix_port, postfix_messages, {"RCPT_DOMAINS": str(domains)}, PROVIDERS,
        lambda: tree_cpu(master))
    dns1 = dns_counts()
    after = {s: sink_counts(s) for s in PROVIDERS}
    version = subprocess.run([postconf, "-c", etc, "-h", "mail_version"], capture_output=True,
                             text=True).stdout.strip()
    report(f"postfix {version} many", postfix_messages, t_accept, t_e2e, delivered, cpu, None,
           before, after, PROVIDERS)
    report_dns(dns0, dns1, min(domains, postfix_messages))
    problems = [l for l in open(os.path.join(d, "maillog"), errors="replace")
                if re.search(r"warning|fatal|panic|status=(deferred|bounced)", l)]
    print(f"   maillog warnings/deferrals: {len(problems)}")
    for l in problems[:3]:
        print("     " + l.rstrip())
    postfix_stop()
    return delivered / t_e2e

single = phase("single", {"RCPT_DOMAIN": "single.bench.test"}, ["single"])
many = phase("many", {"RCPT_DOMAINS": str(domains)}, PROVIDERS)
print(f"tern many-domains e2e / single-destination e2e = {many / single:.2f}")
if run_postfix:
    pf = postfix_phase()
    print(f"tern many-domains e2e / Postfix many-domains e2e = {many / pf:.2f}")
else:
    print("Postfix phase skipped (needs root, the postfix package and unshare; POSTFIX=0 skips it)")
dns.stdin.close()
cleanup()
shutil.rmtree(work)
PY
