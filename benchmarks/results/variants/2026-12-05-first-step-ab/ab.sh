#!/bin/bash
# A/B: aclsum, loraflow at ebcf111 (the 4-bit copy, the model folder hashed once per process, datasets imported beside the pre-flight, the gpu tag only where a limit exists) vs 8d838bb (/tmp/oldtree, a git worktree), alternating, and the script, in one hour; each /tmp/ab3/<side>-<seed>/2026-12-05.json is kept here as <side>-<seed>.json
set -x
for seed in 0 1 2; do
  cd /work/main && timeout 900 .venv/bin/python -m benchmarks.run --sides loraflow --datasets aclsum --seeds $seed --like-for-like 0 --results /tmp/ab3/new-$seed > /tmp/ab3/new-$seed.log 2>&1
  cd /tmp/oldtree && timeout 900 /work/main/.venv/bin/python -m benchmarks.run --sides loraflow --datasets aclsum --seeds $seed --like-for-like 0 --results /tmp/ab3/old-$seed > /tmp/ab3/old-$seed.log 2>&1
  cd /work/main && timeout 900 .venv/bin/python -m benchmarks.run --sides baseline --datasets aclsum --seeds $seed --like-for-like 0 --results /tmp/ab3/script-$seed > /tmp/ab3/script-$seed.log 2>&1
done
