#!/usr/bin/env bash
# The seed notebook's node-local scenario: the producer and the consumer each have their own
# managed directory (on a cluster: the same path on two nodes). The consumer's open of a frame
# waits for its publication, then dyadfs pulls the bytes (UCX by default) into the consumer's
# own directory. The consumer starts first.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ns=${NS:-dyad_md_example}
frames=${FRAMES:-10}
atoms=${ATOMS:-200}
prod=${PROD_DIR:-/tmp/md_prod}
cons=${CONS_DIR:-/tmp/md_cons}
dyadfs=${DYADFS:-$(command -v dyadfs || echo "python3 -m dyadfs")}
transport=${TRANSPORT:-ucx}

for d in "$prod" "$cons"; do rm -rf "$d" && mkdir -p "$d"; done
trap '$dyadfs umount "$cons" 2>/dev/null || true; $dyadfs umount "$prod" 2>/dev/null || true' EXIT
$dyadfs namespace remove "$ns"
$dyadfs mount "$prod" --role producer --namespace "$ns" --transport "$transport"
$dyadfs mount "$cons" --role consumer --namespace "$ns" --transport "$transport" --wait-timeout 120

echo "== node-local storage ($transport): consumer first, then producer, $frames frames of $atoms atoms"
python3 "$here/consumer.py" "$cons" --frames "$frames" > "$cons.consumer.out" &
consumer=$!
python3 "$here/producer.py" "$prod" --frames "$frames" --atoms "$atoms"
wait "$consumer"
cat "$cons.consumer.out"
echo "== ls -lah $prod/group0"
ls -lah "$prod/group0"
echo "== ls -lah $cons/group0"
ls -lah "$cons/group0"
$dyadfs status "$prod"
$dyadfs status "$cons"
$dyadfs umount "$cons"
$dyadfs umount "$prod"
trap - EXIT
echo "== after dyadfs umount, the pulled frames are in $cons/group0 itself:"
ls -lah "$cons/group0"
cmp_ok=0
for ((i = 0; i < frames; i++)); do
  cmp -s "$prod/group0/a4md_chunk$i.dat" "$cons/group0/a4md_chunk$i.dat" && cmp_ok=$((cmp_ok + 1))
done
n=$(grep -c '^consumer: frame' "$cons.consumer.out")
echo "== node-local storage: consumer read $n of $frames frames; $cmp_ok of $frames byte-identical"
[ "$n" -eq "$frames" ] && [ "$cmp_ok" -eq "$frames" ]
