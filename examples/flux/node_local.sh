#!/usr/bin/env bash
# The seed's node-local scenario under Flux: run inside an instance, e.g.
#   flux start --test-size=2 bash examples/flux/node_local.sh
# The producer mount is on rank 0, the consumer mount on rank 1 (on one machine they need two
# directories; on a cluster use one path on every node); the KVS is the instance's.
# The producer and the consumer are flux jobs on those ranks, the consumer submitted first.
set -euo pipefail
here=$(cd "$(dirname "$0")/../md_workflow" && pwd)
ns=${NS:-dyad_md_example}
frames=${FRAMES:-10}
prod=${PROD_DIR:-/tmp/md_prod}
cons=${CONS_DIR:-/tmp/md_cons}
dyadfs=${DYADFS:-$(command -v dyadfs || echo "python3 -m dyadfs")}

flux kvs namespace remove "$ns" 2>/dev/null || true
flux kvs namespace create "$ns"
for d in "$prod" "$cons"; do rm -rf "$d" && mkdir -p "$d"; done
cleanup() {
  flux exec -r 1 $dyadfs umount "$cons" 2>/dev/null || true
  flux exec -r 0 $dyadfs umount "$prod" 2>/dev/null || true
}
trap cleanup EXIT
flux exec -r 0 $dyadfs mount "$prod" --role producer --namespace "$ns" --kvs flux
flux exec -r 1 $dyadfs mount "$cons" --role consumer --namespace "$ns" --kvs flux --wait-timeout 120

echo "== node-local under Flux: consumer job on rank 1 first, then the producer job on rank 0"
consumer=$(flux submit --requires=rank:1 --output="$cons.consumer.out" \
           python3 "$here/consumer.py" "$cons" --frames "$frames")
flux run --requires=rank:0 python3 "$here/producer.py" "$prod" --frames "$frames"
flux job attach "$consumer"
cat "$cons.consumer.out"
ls -lah "$prod/group0" "$cons/group0"
echo "== DYAD's key for frame 0 holds the producer's rank:"
flux kvs get --namespace "$ns" 12d.d1.20d.group0/a4md_chunk0.dat
ok=0
for ((i = 0; i < frames; i++)); do
  cmp -s "$prod/group0/a4md_chunk$i.dat" "$cons/group0/a4md_chunk$i.dat" && ok=$((ok + 1))
done
echo "== node-local under Flux: $ok of $frames frames byte-identical"
[ "$ok" -eq "$frames" ]
