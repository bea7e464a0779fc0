#!/usr/bin/env bash
# Reproduces the shipped drafters from nothing: data, self-distillation, shared token map, DeepSpeed
# training as Ray jobs on a local Ray cluster, weight averaging, model cards. Every step resumes or
# skips when its output exists, so rerunning after a kill goes on where it stopped.
#
#   bash scripts/train_drafters.sh [CONFIG ...]       # default: the shipped set (see CONFIGS below)
#
# Environment: MATH_N / CHAT_N / CODE_N (conversations distilled; MATH_MORE_N / CODE_MORE_N more after them, for
# the math and code drafters only); TRAIN_LOCAL=0 to train as Ray jobs, with
# NUM_CPUS (the Ray cluster started here) or RAY_ADDRESS (a running cluster's job server).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
MATH_N=${MATH_N:-512}
CHAT_N=${CHAT_N:-320}
CODE_N=${CODE_N:-128}
MATH_MORE_N=${MATH_MORE_N:-768}
CODE_MORE_N=${CODE_MORE_N:-192}
CONFIGS=("$@")
[ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(math_eagle2 chat_eagle2 code_eagle2 math_hass chat_hass mixed_eagle2 mixed_hass
                                     math_text_eagle2)
restore() {  # restore COMMIT NAME DIR: drafters/NAME as committed in COMMIT
  [ -f "$3/drafter.json" ] && return
  mkdir -p "$3"
  for f in drafter.json model.safetensors; do git show "$1:drafters/$2/$f" > "$3/$f"; done
}
features() {  # features NAME...: runs/data/NAME_distilled.jsonl -> runs/features/NAME, one process per core;
  local n p pids=()  # a failed extraction stops the script, as a foreground one would
  for n in "$@"; do
    python -m training.prepare --conversations "runs/data/${n}_distilled.jsonl" --features "runs/features/$n" \
      --max-len 384 --threads 1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
}
big_first() {  # big_first DOMAIN: every training conversation of DOMAIN (14,000 asked), cut to its first exchange
  [ -f "runs/data/$1_big_first.jsonl" ] && return
  [ -f "runs/data/$1_big.jsonl" ] || python -m training.data.build --domain "$1" --n 14000 --out "runs/data/$1_big.jsonl"
  python -m training.data.first_turns "runs/data/$1_big.jsonl" "runs/data/$1_big_first.jsonl" --max-prompt-chars 2000
}

# 1. conversations from the data builders (held-out split: training/data/sources.py)
[ -f runs/data/math.jsonl ] || python -m training.data.build --domain math --n 1600 --out runs/data/math.jsonl
if [ ! -f runs/data/chat_first.jsonl ]; then
  [ -f runs/data/chat.jsonl ] || python -m training.data.build --domain chat --n 800 --out runs/data/chat.jsonl
  python -m training.data.first_turns runs/data/chat.jsonl runs/data/chat_first.jsonl --max-prompt-chars 2000
fi
if [ ! -f runs/data/code_first.jsonl ]; then
  [ -f runs/data/code.jsonl ] || python -m training.data.build --domain code --n 500 --out runs/data/code.jsonl
  python -m training.data.first_turns runs/data/code.jsonl runs/data/code_first.jsonl --max-prompt-chars 2000
fi
# 2. self-distillation: the verifier answers every prompt (greedy, bf16, batched on the taps Llama)
python -m training.distill --input runs/data/math.jsonl --output runs/data/math_distilled.jsonl \
  --max-new-tokens 256 --batch-size 16 --threads 1 --limit "$MATH_N"
python -m training.distill --input runs/data/chat_first.jsonl --output runs/data/chat_distilled.jsonl \
  --max-new-tokens 192 --batch-size 16 --threads 1 --limit "$CHAT_N"
python -m training.distill --input runs/data/code_first.jsonl --output runs/data/code_distilled.jsonl \
  --max-new-tokens 192 --batch-size 16 --threads 1 --limit "$CODE_N"
# more data for the math and code drafters (mixed and the HASS drafters keep the first MATH_N / CODE_N)
python -m training.distill --input runs/data/math.jsonl --output runs/data/math_more_distilled.jsonl \
  --max-new-tokens 256 --batch-size 16 --threads 1 --offset "$MATH_N" --limit "$MATH_MORE_N"
python -m training.distill --input runs/data/code_first.jsonl --output runs/data/code_more_distilled.jsonl \
  --max-new-tokens 192 --batch-size 16 --threads 1 --offset "$CODE_N" --limit "$CODE_MORE_N"
# the big recipe (math_big_eagle2, chat_big_eagle2; issue 18): math conversations and non-code ShareGPT training
# conversations' first exchanges, distilled at batch 64 (1 thread: 1.3-2.3 math and 0.75-1.05 chat conversations/s on
# the 2-core EPYC while the other core worked). A first file each holds what the shipped drafters were trained on
# (BIG_MATH_N=3840, BIG_CHAT_N=2304); a second file each (*_big2_*, and chat_big3) continues toward 12,000 math and
# all 9,023 chat exchanges. Rerunning resumes a distillation where it stopped (OUTPUT.partial, 256 conversations a chunk).
# {chat,math}_big2_eagle2, the two-layer math heads and math_more_greedy train on the second files (math_big_b
# and math_big2_part1); the T=0.7 runs need math_big
if [[ " ${CONFIGS[*]} " =~ _big2_|_2layer|more_greedy|_anneal ]]; then BIG_MORE=${BIG_MORE:-1}; fi
if [[ " ${CONFIGS[*]} " =~ (math|chat)_big_|_big2_|_2layer|math_t07|more_greedy|_anneal ]]; then
  [ -f runs/data/math_big.jsonl ] || python -m training.data.build --domain math --n 14000 --out runs/data/math_big.jsonl
  big_first chat
  BIG_MATH_N=${BIG_MATH_N:-3840}
  BIG_CHAT_N=${BIG_CHAT_N:-2304}
  python -m training.distill --input runs/data/math_big.jsonl --output runs/data/math_big_distilled.jsonl \
    --max-new-tokens 256 --batch-size 64 --chunk 256 --threads 1 --limit "$BIG_MATH_N" &
  python -m training.distill --input runs/data/chat_big_first.jsonl --output runs/data/chat_big_distilled.jsonl \
    --max-new-tokens 192 --batch-size 64 --chunk 256 --threads 1 --limit "$BIG_CHAT_N" &
  wait
  if [ "${BIG_MORE:-0}" = 1 ]; then  # the second files: BIG_MORE=1 bash scripts/train_drafters.sh math_big_eagle2 ...
    python -m training.distill --input runs/data/math_big.jsonl --output runs/data/math_big2_distilled.jsonl \
      --max-new-tokens 256 --batch-size 64 --chunk 256 --threads 1 --offset "$BIG_MATH_N" --limit $((12000 - BIG_MATH_N)) &
    # chat, the slower one, in two ranges (exchanges BIG_CHAT_N..5999 and 6000..9022) so both cores can work on it
    python -m training.distill --input runs/data/chat_big_first.jsonl --output runs/data/chat_big2_distilled.jsonl \
      --max-new-tokens 192 --batch-size 64 --chunk 256 --threads 1 --offset "$BIG_CHAT_N" --limit $((6000 - BIG_CHAT_N)) &
    python -m training.distill --input runs/data/chat_big_first.jsonl --output runs/data/chat_big3_distilled.jsonl \
      --max-new-tokens 192 --batch-size 64 --chunk 256 --threads 1 --offset 6000 --limit 3023 &
    wait
    # math_big2_eagle2's files: the 1,280 math conversations past math_big's features, the first 2,560 of the second
    [ -f runs/data/math_big_b.jsonl ] || sed -n 2561,3840p runs/data/math_big_distilled.jsonl > runs/data/math_big_b.jsonl
    [ -f runs/data/math_big2_part1.jsonl ] || head -2560 runs/data/math_big2_distilled.jsonl > runs/data/math_big2_part1.jsonl
    # their features, one file per core (chat_big2_eagle2 / math_big2_eagle2 name these directories; done ones are skipped)
    for f in chat_big2_distilled:chat_big2 chat_big3_distilled:chat_big3 math_big_b:math_big_b math_big2_part1:math_big2_part1; do
      python -m training.prepare --conversations "runs/data/${f%%:*}.jsonl" --features "runs/features/${f##*:}" \
        --max-len 384 --threads 1 &
      if [ "$f" = chat_big3_distilled:chat_big3 ]; then wait; fi  # two at a time
    done
    wait
  fi
  if [[ " ${CONFIGS[*]} " =~ math_t07|2layer_t07|more_greedy ]]; then  # sampled answers beside the greedy ones (math_t07_eagle2)
    python -m training.distill --input runs/data/math_big.jsonl --output runs/data/math_t07_distilled.jsonl \
      --max-new-tokens 256 --batch-size 64 --chunk 256 --threads 1 --temperature 0.7 --seed 7 --limit 1280
    features math_t07   # math_more_greedy's math_big_b features come from the BIG_MORE block above
  fi
  if [[ " ${CONFIGS[*]} " =~ _t07b ]]; then  # more sampled answers (prompts 1,280-3,839, seed 8) and 1,760 more greedy
    python -m training.distill --input runs/data/math_big.jsonl --output runs/data/math_t07b_distilled.jsonl \
      --max-new-tokens 256 --batch-size 64 --chunk 256 --threads 1 --temperature 0.7 --seed 8 --offset 1280 --limit 2560
    [ -f runs/data/math_big2_part2.jsonl ] || sed -n 2561,4320p runs/data/math_big2_distilled.jsonl > runs/data/math_big2_part2.jsonl
    for f in math_t07b_distilled:math_t07b math_big2_part2:math_big2_part2; do
      python -m training.prepare --conversations "runs/data/${f%%:*}.jsonl" --features "runs/features/${f##*:}" \
        --max-len 384 --threads 1
    done
  fi
  [ -f runs/vocab/big-8192.json ] || python -m training.reduce_vocab --size 8192 \
    --data runs/data/math_big_distilled.jsonl runs/data/chat_big_distilled.jsonl --map-out runs/vocab/big-8192.json
fi
# the third round (issue 18, 2026-12-03): chat_t07 / chat_g3k continue the shipped annealed chat drafter on 3,000
# sampled (T=0.7) and 3,000 greedy chat answers; code_big continues the 320-conversation code drafter on 2,560;
# mixed_big continues the shipped mixed drafter on 1,536 math + 1,536 chat. Each starts from a drafter of an
# earlier commit (restored here) and keeps that drafter's token map (training.reduce_vocab --map-from).
if [[ " ${CONFIGS[*]} " =~ chat_t07|chat_g3k|mixed_big ]]; then
  big_first chat
  python -m training.distill --input runs/data/chat_big_first.jsonl --output runs/data/chat_t07_distilled.jsonl \
    --max-new-tokens 192 --batch-size 64 --chunk 256 --threads 1 --temperature 0.7 --seed 9 --limit 3000 &
  python -m training.distill --input runs/data/chat_big_first.jsonl --output runs/data/chat_g3k_distilled.jsonl \
    --max-new-tokens 192 --batch-size 64 --chunk 256 --threads 1 --offset 3000 --limit 3000 &
  wait
  features chat_t07 chat_g3k
  [ -f runs/vocab/big-8192.json ] || python -m training.reduce_vocab --map-from drafters/chat --map-out runs/vocab/big-8192.json
  restore a0b1bc2 chat runs/drafters/chat_anneal
fi
if [[ " ${CONFIGS[*]} " =~ code_big ]]; then
  big_first code
  python -m training.distill --input runs/data/code_big_first.jsonl --output runs/data/code_big_distilled.jsonl \
    --max-new-tokens 192 --batch-size 64 --chunk 256 --threads 1 --limit 2560
  features code_big
  restore 9e25147 code runs/drafters/code_320
  [ -f runs/vocab/code-8192.json ] || python -m training.reduce_vocab --map-from runs/drafters/code_320 --map-out runs/vocab/code-8192.json
fi
if [[ " ${CONFIGS[*]} " =~ mixed_big ]]; then
  [ -f runs/data/math_big.jsonl ] || python -m training.data.build --domain math --n 14000 --out runs/data/math_big.jsonl
  python -m training.distill --input runs/data/math_big.jsonl --output runs/data/math_m1536_distilled.jsonl \
    --max-new-tokens 256 --batch-size 64 --chunk 256 --threads 1 --limit 1536
  [ -f runs/data/chat_g3k_1536.jsonl ] || head -1536 runs/data/chat_g3k_distilled.jsonl > runs/data/chat_g3k_1536.jsonl
  features math_m1536
  python -m training.prepare --conversations runs/data/chat_g3k_1536.jsonl --features runs/features/chat_g3k_1536 \
    --max-len 384 --threads 1
  restore 9e25147 mixed runs/drafters/mixed_825
  [ -f runs/vocab/shared-8192.json ] || python -m training.reduce_vocab --map-from runs/drafters/mixed_825 --map-out runs/vocab/shared-8192.json
fi
# 3. one draft vocabulary for math, chat and mixed (weight averaging needs identical token maps)
[ -f runs/vocab/shared-8192.json ] || python -m training.reduce_vocab --size 8192 \
  --data runs/data/math_distilled.jsonl runs/data/chat_distilled.jsonl --map-out runs/vocab/shared-8192.json
# 4. training. TRAIN_LOCAL=0: jobs on a local Ray cluster (Ray Train TorchTrainer, 2 DeepSpeed workers,
#    gloo). Default TRAIN_LOCAL=1: one process per job (DeepSpeed, 1 thread): on this shared 2-core machine
#    the two-worker Ray job ran 6.3 s a step (effective batch 8) against 1.0-1.4 s (batch 4) in one process.
# Client and cluster must agree on RAY_AUTH_MODE: token authentication by default, with a token made
# here when there is none (~/.ray/auth_token); RAY_AUTH_MODE=disabled for an existing open cluster.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "${TRAIN_LOCAL:-1}" = 0 ] && [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
  ray get-auth-token --generate >/dev/null
fi
if [ "${TRAIN_LOCAL:-1}" = 0 ] && [ -z "${RAY_ADDRESS:-}" ]; then
  ray status >/dev/null 2>&1 || ray start --head --num-cpus "${NUM_CPUS:-2}" --include-dashboard=true
  RAY_ADDRESS=http://127.0.0.1:8265
fi
submit() {  # submit CONFIG [extra train_drafter args]: a DeepSpeed job on Ray Train, or one process
  local c=$1; shift
  if [ "${TRAIN_LOCAL:-1}" = 1 ]; then
    python training/train_drafter.py --config "training/configs/$c.yaml" --root "$PWD" --no-ray "$@"
  else
    ray job submit --address "$RAY_ADDRESS" --working-dir . -- \
      python training/train_drafter.py --config "training/configs/$c.yaml" --root "$PWD" "$@"
  fi
}
for c in "${CONFIGS[@]}"; do
  out=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['output_dir'])" "training/configs/$c.yaml")
  if [ -f "$out/drafter.json" ]; then echo "== $c: $out exists, skipped"; continue; fi
  echo "== $c"
  case $c in
    chat_eagle2)  # a first 420 s session (its drafter is where chat_hass starts), then resumed to 2,520 s in all
      [ -f runs/drafters/chat_420/drafter.json ] || submit "$c" --set time_budget_s=420 --output runs/drafters/chat_420
      submit "$c" ;;
    math_eagle2)  # math_hass starts from 420 s on the first MATH_N conversations (as mixed); math: 2,520 s on all
      [ -f runs/drafters/math_420/drafter.json ] || submit "$c" --set time_budget_s=420 \
        --set checkpoint_dir=runs/train_420 --output runs/drafters/math_420 \
        --set 'data={conversations: [runs/data/math_distilled.jsonl], features: [runs/features/math]}'
      submit "$c" ;;
    mixed_hass)  # 420 s of the mixed EAGLE-2 recipe, then 420 s HASS from there (as math_hass / chat_hass)
      [ -f runs/drafters/mixed_420/drafter.json ] || submit mixed_eagle2 --set name=mixed_420 \
        --set time_budget_s=420 --output runs/drafters/mixed_420
      submit "$c" ;;
    *) submit "$c" ;;
  esac
done
# 5. weight-averaged drafters (the paper's lambda = 0.5)
[ -f drafters/averaged/drafter.json ] || python -m training.average --inputs drafters/math drafters/chat \
  --weights 0.5 0.5 --out drafters/averaged --name averaged
if [ -f drafters/math_hass/drafter.json ] && [ -f drafters/chat_hass/drafter.json ] && [ ! -f drafters/averaged_hass/drafter.json ]; then
  python -m training.average --inputs drafters/math_hass drafters/chat_hass --weights 0.5 0.5 \
    --out drafters/averaged_hass --name averaged_hass
fi
