#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 for the tests, the demo and the
# daemon's defaults: starts the local cluster if it is down, installs PostgreSQL if it is
# missing (Debian), and on a fresh install allows the passwordless local TCP logins the
# defaults use. With DATABASE_URL set, the server it names is assumed to be managed elsewhere.
set -euo pipefail

if [ -n "${DATABASE_URL:-}" ]; then
  exit 0
fi

ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if command -v pg_isready >/dev/null && ready; then
  exit 0
fi

fresh=no
if [ ! -d /etc/postgresql ] || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  echo "PostgreSQL is not installed; installing it" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fresh=yes
fi

version=$(ls /etc/postgresql | sort -V | tail -n 1)
if [ "$fresh" = yes ]; then
  hba=/etc/postgresql/$version/main/pg_hba.conf
  # Local development only: trust TCP logins from this machine, as the defaults expect.
  sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
fi

pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null || true
for _ in $(seq 1 60); do
  if ready; then
    exit 0
  fi
  sleep 0.5
done
echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2
exit 1
