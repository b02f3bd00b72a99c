#!/usr/bin/env bash
# The cells behind docs/FINDINGS.md (issue 17), in the order they answer its questions. The store
# is committed: a rerun runs only the cells it does not hold yet, so the grid grows across sessions.
#   scripts/findings_grid.sh [RESULTS] [PART...]   (default results/reference, every part)
# Parts: captions (does RoCLIP's cost come from templated captions? corner patch), seeds (the
# default triggers, with survival and curves, and blended's fresh key to 5 seeds), pool-k (RoCLIP's
# pool size and K), random-patch (does augmentation alone defend against the literature's
# random-location fresh-noise patch?), implant (which patch styles implant into clip at all),
# captions-random (the caption styles under the random patch).
set -euo pipefail
RESULTS=${1:-results/reference}
case $RESULTS in
  captions|seeds|pool-k|random-patch|implant|captions-random)
    echo "the first argument is the results folder, not a part: scripts/findings_grid.sh results/reference $*" >&2
    exit 2 ;;
esac
shift || true
PARTS=${*:-captions seeds pool-k random-patch implant captions-random}
BENCH=${BENCH:-bench}
DEF=clip,aug-only,roclip
RANDOM_PATCH='badnet[location=random,pattern=fresh]'
run() { $BENCH run -p cpu-small --jobs "${JOBS:-2}" -q -r "$RESULTS" "$@"; }
for part in $PARTS; do
  case $part in
    captions)     run -a badnet -d $DEF -s 0-2 --dataset-param captions=attributes,web ;;
    pool-k)       run -a badnet -d roclip -s 0-2 -D pool_size=256,8192
                  run -a badnet -d roclip -s 0-2 -D match_every=2,5 ;;
    random-patch) run -a "$RANDOM_PATCH" -d $DEF -s 0-4 ;;
    implant)      run -a 'badnet[location=random],badnet[pattern=fresh]' -d clip -s 0
                  run -a "$RANDOM_PATCH" -d clip -s 0 -A n_poison=300,1000 ;;
    captions-random) run -a "$RANDOM_PATCH" -d $DEF -s 0-2 --dataset-param captions=attributes,web ;;
    seeds)        run -a badnet,blended -d $DEF -s 0-4
                  run -a targeted -d $DEF -s 0-4
                  run -a 'blended[key=fresh]' -d $DEF -s 0-4 ;;
    *) echo "unknown part $part (captions, pool-k, random-patch, implant, captions-random, seeds)" >&2; exit 2 ;;
  esac
done
