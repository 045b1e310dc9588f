#!/usr/bin/env bash
# The seed's shared-storage scenario under Flux: run inside an instance, e.g.
#   flux start --test-size=2 bash examples/flux/shared_storage.sh
# One directory on shared storage; a mount of it per rank (on one machine, two mount points over
# one backing directory); the consumer job (rank 1) waits until the producer job (rank 0) has
# closed each frame. No copy.
set -euo pipefail
here=$(cd "$(dirname "$0")/../md_workflow" && pwd)
ns=${NS:-dyad_md_example_shared}
frames=${FRAMES:-10}
shared=${SHARED_DIR:-/tmp/md_shared}
dyadfs=${DYADFS:-$(command -v dyadfs || echo "python3 -m dyadfs")}

flux kvs namespace remove "$ns" 2>/dev/null || true
flux kvs namespace create "$ns"
rm -rf "$shared" "$shared.r0" "$shared.r1" && mkdir -p "$shared" "$shared.r0" "$shared.r1"
cleanup() {
  flux exec -r 1 $dyadfs umount "$shared.r1" 2>/dev/null || true
  flux exec -r 0 $dyadfs umount "$shared.r0" 2>/dev/null || true
}
trap cleanup EXIT
flux exec -r 0 $dyadfs mount "$shared.r0" --backing "$shared" --shared-storage --role producer \
  --namespace "$ns" --kvs flux
flux exec -r 1 $dyadfs mount "$shared.r1" --backing "$shared" --shared-storage --role consumer \
  --namespace "$ns" --kvs flux --wait-timeout 120

echo "== shared storage under Flux: consumer job on rank 1 first, then the producer on rank 0"
consumer=$(flux submit --requires=rank:1 --output="$shared.consumer.out" \
           python3 "$here/consumer.py" "$shared.r1" --frames "$frames")
flux run --requires=rank:0 python3 "$here/producer.py" "$shared.r0" --frames "$frames"
flux job attach "$consumer"
cat "$shared.consumer.out"
ls -lah "$shared/group0"
n=$(grep -c '^consumer: frame' "$shared.consumer.out")
echo "== shared storage under Flux: consumer read $n of $frames frames"
[ "$n" -eq "$frames" ]
