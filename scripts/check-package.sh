#!/usr/bin/env bash
# Builds the Debian package (scripts/package.sh, dev profile: quick, same files) and checks it:
# its contents and conffiles with dpkg-deb; then, as root on a machine without tern installed,
# installs it with dpkg -i, checks the `tern` user and directories, runs `tern check-config`
# on /etc/tern/tern.toml, starts the daemon as `tern` with that config, and from an unrelated
# directory (no --config, no TERN_CONFIG) suspends delivery, injects a message and reads it
# back with `tern queue summary`; finally purges the package and checks it left nothing in
# /etc/tern, /var/lib/tern or /var/log/tern. Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "check-package: $*" >&2; exit 1; }

deb=$(scripts/package.sh --profile dev | tail -n 1)
[ -f "$deb" ] || fail "no package built ($deb)"
echo "check-package: built $deb"

contents=$(dpkg-deb -c "$deb" | awk '{print $6}')
for path in ./usr/bin/tern ./etc/tern/tern.toml ./etc/logrotate.d/tern \
  ./usr/lib/systemd/system/tern.service ./usr/share/man/man1/tern.1.gz \
  ./usr/share/man/man1/tern-queue-summary.1.gz \
  ./usr/share/bash-completion/completions/tern ./usr/share/zsh/vendor-completions/_tern \
  ./usr/share/fish/vendor_completions.d/tern.fish ./usr/share/doc/tern/OPERATIONS.md \
  ./usr/share/doc/tern/examples/tern.toml; do
  grep -qxF "$path" <<<"$contents" || fail "$path is not in the package"
done
conffiles=$(dpkg-deb -f "$deb" Package >/dev/null && dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)
grep -qxF /etc/tern/tern.toml <<<"$conffiles" || fail "/etc/tern/tern.toml is not a conffile"
[ "$(dpkg-deb -f "$deb" Section)" = mail ] || fail "section is not mail"
echo "check-package: contents ok"

if [ "$(id -u)" -ne 0 ]; then
  echo "check-package: not root, install test skipped"
  exit 0
fi
command -v curl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq curl; }
if dpkg -s tern >/dev/null 2>&1 || [ -e /etc/tern ]; then
  echo "check-package: tern is already installed here, install test skipped"
  exit 0
fi

daemon=
cleanup() {
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  dpkg --purge tern >/dev/null 2>&1 || true
}
trap cleanup EXIT

dpkg -i "$deb"
getent passwd tern >/dev/null || fail "no tern user"
[ "$(stat -c %U:%a /var/lib/tern)" = tern:750 ] || fail "/var/lib/tern: $(stat -c %U:%a /var/lib/tern)"
[ "$(stat -c %U /var/log/tern)" = tern ] || fail "/var/log/tern is not tern's"
tern check-config /etc/tern/tern.toml || fail "check-config refused the default config"

work=$(mktemp -d)
chmod 755 "$work"
log=$work/tern.log
(cd / && exec runuser -u tern -- env -u TERN_CONFIG /usr/bin/tern serve) >"$log" 2>&1 &
daemon=$!
for _ in $(seq 100); do
  curl -fsS http://127.0.0.1:8025/readyz >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || { cat "$log"; fail "the daemon exited"; }
  sleep 0.2
done
[ "$(curl -sS http://127.0.0.1:8025/healthz)" = '{"alive":true}' ] || { cat "$log"; fail "/healthz"; }
[ "$(curl -sS http://127.0.0.1:8025/readyz)" = '{"ready":true,"recovering":false}' ] || { cat "$log"; fail "/readyz"; }

cd "$work"
env -u TERN_CONFIG tern queue suspend --reason "package check" >/dev/null
printf 'Subject: package check\n\nhello\n' |
  env -u TERN_CONFIG tern inject --from app@localhost --to someone@example.invalid - >/dev/null
summary=$(env -u TERN_CONFIG tern queue summary)
echo "$summary"
grep -qE '^example\.invalid +1 ' <<<"$summary" || fail "queue summary does not show the message"
[ "$(stat -c %U /var/lib/tern/admin.token)" = tern ] || fail "admin.token is not tern's"
cd /

kill "$daemon"
wait "$daemon" || true
daemon=
dpkg --purge tern
for path in /etc/tern /var/lib/tern /var/log/tern /usr/bin/tern; do
  [ ! -e "$path" ] || fail "$path left after purge"
done
trap - EXIT
echo "check-package: install, check-config, serve, queue summary, purge ok"
