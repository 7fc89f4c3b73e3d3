#!/bin/bash
# A/B: loraflow side only, aclsum, new (prestart) vs old (9e42514) alternating, same hour
set -x
for seed in 0 1; do
  cd /work/main && timeout 900 .venv/bin/python -m benchmarks.run --sides loraflow --datasets aclsum --seeds $seed --like-for-like 0 --results /tmp/ab/new-$seed > /tmp/ab/new-$seed.log 2>&1
  cd /tmp/oldtree && timeout 900 /work/main/.venv/bin/python -m benchmarks.run --sides loraflow --datasets aclsum --seeds $seed --like-for-like 0 --results /tmp/ab/old-$seed > /tmp/ab/old-$seed.log 2>&1
done
