#!/bin/sh
# Build-time only: run a command trusting an extra CA bundle passed as the BuildKit secret
# `cacert` (`docker build --secret id=cacert,src=/path/to/ca.crt`), for builds behind a TLS
# proxy. The bundle is appended to the image's own CAs in a tmpfs file that exists only
# while the command runs; nothing is left in any layer. Without the secret it just runs
# the command.
#   RUN --mount=type=secret,id=cacert --mount=type=bind,source=docker/with-build-ca.sh,target=/tmp/with-build-ca.sh \
#       sh /tmp/with-build-ca.sh pip install ...
set -eu
secret=/run/secrets/cacert
if [ -s "$secret" ]; then
    dir=$(mktemp -d /dev/shm/build-ca.XXXXXX 2>/dev/null || mktemp -d)
    trap 'rm -rf "$dir"' EXIT INT TERM
    cat /etc/ssl/certs/ca-certificates.crt "$secret" > "$dir/ca.pem" 2>/dev/null || cat "$secret" > "$dir/ca.pem"
    export PIP_CERT="$dir/ca.pem" SSL_CERT_FILE="$dir/ca.pem" REQUESTS_CA_BUNDLE="$dir/ca.pem" CURL_CA_BUNDLE="$dir/ca.pem"
    "$@"
else
    exec "$@"
fi
