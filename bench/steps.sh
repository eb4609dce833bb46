# Sourced by bench/run.sh and bench/compare.sh: the timed and warm-up steps of each case,
# overridable with BENCH_<CASE>_STEPS / BENCH_<CASE>_WARMUP.
steps_args() { # case -> "--warmup W --steps N"
    local key="${1//-/_}" warmup steps
    key="${key^^}"
    case "$1" in
        A) warmup=5 steps=40 ;;
        B) warmup=1 steps=3 ;;
        C) warmup=2 steps=10 ;;
        *) warmup=1 steps=3 ;;
    esac
    local wv="BENCH_${key}_WARMUP" sv="BENCH_${key}_STEPS"
    echo "--warmup ${!wv:-${warmup}} --steps ${!sv:-${steps}}"
}
