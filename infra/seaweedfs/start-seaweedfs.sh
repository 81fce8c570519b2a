#!/bin/sh
# Start SeaweedFS with an identities file rendered from the committed example
# (seaweedfs/s3.json.example, placeholders only) and keys taken from the environment, so no
# secret is ever written to the repository. Usage: start-seaweedfs.sh server -dir=/data ...
# Without an identities file SeaweedFS lets anyone read and write: refuse to start instead.
set -eu
template="${S3_CONFIG_TEMPLATE:-/etc/gstalker/s3.json.example}"
rendered="${S3_CONFIG:-/tmp/gstalker-s3.json}"
umask 077
cp "$template" "$rendered"
for name in GSTALKER_S3_ACCESS_KEY_ID GSTALKER_S3_SECRET_ACCESS_KEY \
            GSTALKER_S3_ADMIN_ACCESS_KEY_ID GSTALKER_S3_ADMIN_SECRET_ACCESS_KEY; do
  eval "value=\${$name:-}"
  case "$value" in
    "" | *[!A-Za-z0-9]*)
      echo "error: $name is unset or not alphanumeric" >&2
      echo "fix: set it in infra/.env to the output of: openssl rand -hex 20" >&2
      exit 2 ;;
  esac
  sed -i "s|__${name}__|${value}|g" "$rendered"
done
if grep -q '__[A-Z0-9_]*__' "$rendered"; then
  echo "error: $template has a placeholder this script does not fill" >&2
  echo "fix: name it after one of the GSTALKER_S3_* variables above" >&2
  exit 2
fi
exec weed "$@" -s3.config="$rendered"
