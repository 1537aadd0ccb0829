#!/usr/bin/env bash
# N local sweep processes sharing one Optuna study (one storage, one study name).
#
#   launchers/local_workers.sh N [hydra overrides...]
#   launchers/local_workers.sh 2 experiment=optuna_kp_ki_target hydra.sweeper.n_trials=10
#
# Each worker is an independent `python -m scu_sweep -m hydra/sweeper=optuna` with the
# basic launcher (one job at a time, one BLAS thread: DESIGN §4 measured 2 single-thread
# processes at 1.7x one 2-thread process). hydra.sweeper.n_trials counts per worker.
# All workers write into one sweep dir; job subdirs are trial numbers, so none collide.
# Each is hydra.sweeper.worker=i: rerun after a kill, worker i counts only its own finished
# trials (not those of a sibling that finished before it started).
#
# Environment (all optional):
#   SWEEP_DIR  sweep dir shared by the workers   (default outputs/multirun/workers-<time>)
#   STORAGE    Optuna storage                    (default journal:$SWEEP_DIR/optuna.journal;
#              use postgresql://user:pw@host/db when workers run on several machines)
#   STUDY      study name                        (default workers-<time>)
#   SCU_APP    the command that runs the app     (default "python -m scu_sweep")
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 N [hydra overrides...]" >&2
  exit 2
fi
n=$1; shift
stamp=$(date +%Y-%m-%d_%H-%M-%S)
sweep_dir=${SWEEP_DIR:-outputs/multirun/workers-$stamp}
storage=${STORAGE:-journal:$sweep_dir/optuna.journal}
study=${STUDY:-workers-$stamp}
read -r -a app <<< "${SCU_APP:-python -m scu_sweep}"
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$sweep_dir"

pids=()
for ((i = 0; i < n; i++)); do
  "${app[@]}" -m hydra/sweeper=optuna hydra/launcher=basic "hydra.sweep.dir=$sweep_dir" \
    "hydra.sweeper.storage='$storage'" "hydra.sweeper.study_name=$study" \
    hydra.sweeper.load_if_exists=true hydra.sweeper.n_jobs=1 "hydra.sweeper.worker=$i" "$@" \
    > "$sweep_dir/worker_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $n workers on study $study in $storage (logs: $sweep_dir/worker_*.log)"

status=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { echo "worker $i failed: see $sweep_dir/worker_$i.log" >&2; status=1; }
done
n_trials=$(ls "$sweep_dir"/*/trial.json 2>/dev/null | wc -l)
echo "done: $n_trials trials in $sweep_dir; results: $sweep_dir/optimization_results.yaml"
echo "dashboard: optuna-dashboard ${storage#journal:}"
exit $status
