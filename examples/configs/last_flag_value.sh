# shellcheck shell=bash
# last_flag_value FLAG DEFAULT ARGS...: the value the trainer will see for FLAG in ARGS (its last occurrence wins, as
# in the trainer's parser; "--flag value" and "--flag=value" both count), or DEFAULT when ARGS do not set it.
# Sourced by examples/pretrain_grace.sh and smollm2-cpu-demo.sh.
last_flag_value() {
    local name=$1 value=$2
    shift 2
    while (( $# )); do
        case $1 in
            "$name") (( $# >= 2 )) && value=$2 ;;
            "$name"=*) value=${1#*=} ;;
        esac
        shift
    done
    echo "$value"
}
