#!/usr/bin/env bash
# Builds a Postgres image for the testkit's Docker provider from the Postgres binaries already
# on this machine, with no registry: `docker import` of a small root filesystem holding the
# server, its shared libraries, the time zone data, a pre-initialised data directory and an
# unprivileged `postgres` user. TCP connections need a password (scram-sha-256): the entry
# point sets the superuser's from POSTGRES_PASSWORD at every start and refuses to start
# without one (the testkit passes a random one per test process); only the socket inside the
# container trusts its users.
#
#   testkit/docker/build-local-image.sh [--force] [TAG]      (default tag postbox/postgres-local:15)
#
# Then: POSTBOX_TEST_PG=docker POSTBOX_TEST_PG_IMAGE=postbox/postgres-local:15 cargo test --workspace
#
# Idempotent: does nothing when the image exists (pass --force to rebuild). Needs root (to run
# initdb as the `postgres` user) and a running Docker engine.
set -euo pipefail

force=0
if [ "${1:-}" = "--force" ]; then force=1; shift; fi
tag="${1:-postbox/postgres-local:15}"

# An image of an older build of this script (which trusted every TCP connection) is rebuilt.
auth=$(docker image inspect --format '{{ index .Config.Labels "postbox.auth" }}' "$tag" 2>/dev/null || true)
if [ "$force" = 0 ] && [ "$auth" = "scram-sha-256" ]; then
  echo "image $tag exists"
  exit 0
fi

bindir=$(dirname "$(readlink -f "$(command -v initdb 2>/dev/null || ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")")
pgroot=$(dirname "$bindir")                       # /usr/lib/postgresql/15
version=$(basename "$pgroot")
share="/usr/share/postgresql/$version"
pguser=postgres
id "$pguser" >/dev/null 2>&1 || { echo "no '$pguser' user to own the data directory" >&2; exit 1; }
uid=$(id -u "$pguser"); gid=$(id -g "$pguser")

stage=$(mktemp -d /tmp/postbox-image.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root="$stage/rootfs"
mkdir -p "$root"/{bin,etc,tmp,usr/share,var/lib/postgresql,var/run/postgresql}
chmod 1777 "$root/tmp"

# Server, extensions and shared data.
mkdir -p "$root$(dirname "$pgroot")" "$root/usr/share/postgresql"
cp -a "$pgroot" "$root$pgroot"
cp -a "$share" "$root$share"
cp -a /usr/share/zoneinfo "$root/usr/share/zoneinfo"
cp -L /bin/sh "$root/bin/sh"

# Every shared library the binaries and modules load (including the dynamic loader).
{
  ldd "$pgroot"/bin/* "$pgroot"/lib/*.so /bin/sh 2>/dev/null || true
} | grep -oE '/[^ ]+\.so[^ ]*' | sort -u | while read -r lib; do
  [ -e "$lib" ] || continue
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

# Users: root and the unprivileged server user, with the host's ids (the data dir keeps them).
printf 'root:x:0:0:root:/root:/bin/sh\n%s:x:%s:%s:PostgreSQL:/var/lib/postgresql:/bin/sh\n' \
  "$pguser" "$uid" "$gid" > "$root/etc/passwd"
printf 'root:x:0:\n%s:x:%s:\n' "$pguser" "$gid" > "$root/etc/group"

# A pre-initialised cluster: the container prints its readiness line once and is ready.
data="$root/var/lib/postgresql/data"
chown -R "$uid:$gid" "$root/var/lib/postgresql" "$root/var/run/postgresql" "$stage"
chmod 755 "$stage"
runuser -u "$pguser" -- "$bindir/initdb" -D "$data" -U postgres --auth-local=trust \
  --auth-host=scram-sha-256 --no-sync -E UTF8 --locale=C >/dev/null
echo "host all all all scram-sha-256" >> "$data/pg_hba.conf"

# The entry point: the password from the environment, then the server. The image has /bin/sh
# and nothing else, so this uses shell builtins only.
cat > "$root/entrypoint.sh" <<'ENTRY'
#!/bin/sh
set -e
if [ -z "$POSTGRES_PASSWORD" ]; then
  echo "postbox/postgres-local: set POSTGRES_PASSWORD (TCP connections need it)" >&2
  exit 1
fi
case "$POSTGRES_PASSWORD" in
  *'$postbox$'*) echo 'postbox/postgres-local: the password may not contain $postbox$' >&2; exit 1 ;;
esac
if ! printf 'ALTER ROLE postgres PASSWORD $postbox$%s$postbox$\n' "$POSTGRES_PASSWORD" \
    | "$PGBIN/postgres" --single -D "$PGDATA" postgres >/tmp/password.log 2>&1; then
  while IFS= read -r line; do printf '%s\n' "$line" >&2; done </tmp/password.log
  exit 1
fi
exec "$PGBIN/postgres" -D "$PGDATA"
ENTRY
chmod 755 "$root/entrypoint.sh"
cat >> "$data/postgresql.conf" <<CONF
listen_addresses = '*'
unix_socket_directories = '/tmp'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 300
CONF

tar -C "$root" -c . | docker import \
  --change "USER $pguser" \
  --change "EXPOSE 5432" \
  --change "ENV PGDATA=/var/lib/postgresql/data" \
  --change "ENV PGBIN=$bindir" \
  --change "LABEL postbox.auth=scram-sha-256" \
  --change "ENTRYPOINT [\"/entrypoint.sh\"]" \
  - "$tag" >/dev/null
echo "built $tag from $pgroot ($(du -sh "$root" | cut -f1))"
