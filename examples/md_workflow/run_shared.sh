#!/usr/bin/env bash
# The seed notebook's shared-storage scenario: one managed directory on storage every "node"
# sees. dyadfs only makes the consumer's open wait until the producer has closed the frame.
# The consumer starts first. Programs are the plain producer/consumer: they know nothing of dyadfs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ns=${NS:-dyad_md_example}
frames=${FRAMES:-10}
atoms=${ATOMS:-200}
shared=${SHARED_DIR:-/tmp/md_shared}
dyadfs=${DYADFS:-$(command -v dyadfs || echo "python3 -m dyadfs")}

rm -rf "$shared" && mkdir -p "$shared"
trap '$dyadfs umount "$shared" 2>/dev/null || true' EXIT
$dyadfs namespace remove "$ns-shared"
$dyadfs mount "$shared" --shared-storage --namespace "$ns-shared" --wait-timeout 120

echo "== shared storage: consumer first, then producer, $frames frames of $atoms atoms"
python3 "$here/consumer.py" "$shared" --frames "$frames" > "$shared.consumer.out" &
consumer=$!
python3 "$here/producer.py" "$shared" --frames "$frames" --atoms "$atoms"
wait "$consumer"
cat "$shared.consumer.out"
echo "== ls -lah $shared/group0"
ls -lah "$shared/group0"
$dyadfs status "$shared"
$dyadfs umount "$shared"
trap - EXIT
n=$(grep -c '^consumer: frame' "$shared.consumer.out")
echo "== shared storage: consumer read $n of $frames frames"
[ "$n" -eq "$frames" ]
