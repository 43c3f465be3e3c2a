#!/bin/bash
# rankwatch Slurm Prolog (slurm.conf: Prolog=/etc/slurm/prolog.d/*, PrologFlags=Alloc), run as
# root on every node of a job before it starts. It writes
#   1. the dcgm-exporter-style job mapping: one file per GPU index in $RANKWATCH_JOB_MAPPING_DIR
#      holding the ids of the jobs using that GPU, one per line (the node exporter adds them as
#      the `hpc_job` label; dcgm-exporter reads the same directory with --hpc-job-mapping-dir);
#   2. a Prometheus file_sd target list for the job's probes on this node (port
#      $RANKWATCH_PROBE_BASE_PORT + LOCAL_RANK, one per GPU) in $RANKWATCH_FILE_SD_DIR, a
#      directory the Prometheus host reads (shared storage such as /fsx on HyperPod).
# It always exits 0: a failing Prolog sets the node DOWN and requeues the job, which is far
# worse than a missing label. Problems are logged to syslog (tag rankwatch-prolog).
set -u
trap 'exit 0' EXIT

[ -r /etc/default/rankwatch ] && . /etc/default/rankwatch
MAP_DIR=${RANKWATCH_JOB_MAPPING_DIR:-/run/rankwatch/job-mapping}
SD_DIR=${RANKWATCH_FILE_SD_DIR:-/fsx/rankwatch/file_sd}
PROBE_BASE=${RANKWATCH_PROBE_BASE_PORT:-9420}
TAG=rankwatch-prolog

log() { logger -t "$TAG" -- "$*" 2>/dev/null || echo "$TAG: $*" >&2; }

# GPU indices of this job on this node, one per line. SLURM_JOB_GPUS holds indices ("0,1,3";
# ranges are expanded too). CUDA_VISIBLE_DEVICES is only a fallback: since Slurm 25.11 it may
# hold GPU UUIDs, which are skipped.
gpu_indices() {
    local list=${SLURM_JOB_GPUS:-${GPU_DEVICE_ORDINAL:-${CUDA_VISIBLE_DEVICES:-}}}
    local item lo hi i
    IFS=',' read -ra items <<< "$list"
    for item in "${items[@]}"; do
        item=${item// /}
        if [[ $item =~ ^[0-9]+$ ]]; then
            echo "$item"
        elif [[ $item =~ ^([0-9]+)-([0-9]+)$ ]]; then
            lo=${BASH_REMATCH[1]}; hi=${BASH_REMATCH[2]}
            for ((i = lo; i <= hi; i++)); do echo "$i"; done
        elif [ -n "$item" ]; then
            log "job ${SLURM_JOB_ID}: skipping GPU '$item' (not an index)"
        fi
    done | sort -n -u
}

add_job_to_gpu() {  # $1 = GPU index; rewrite the file atomically, keeping other jobs' ids
    local file="$MAP_DIR/$1" tmp
    tmp=$(mktemp "$MAP_DIR/.$1.XXXXXX") || return 1
    { [ -f "$file" ] && grep -vx -- "$SLURM_JOB_ID" "$file"; echo "$SLURM_JOB_ID"; } > "$tmp"
    chmod 0644 "$tmp" && mv -f "$tmp" "$file"
}

write_targets() {  # $1 = number of probes on this node
    local host=${SLURMD_NODENAME:-$(hostname -s)} file tmp targets="" i
    for ((i = 0; i < $1; i++)); do
        targets+="${targets:+, }\"$host:$((PROBE_BASE + i))\""
    done
    mkdir -p "$SD_DIR" || return 1
    file="$SD_DIR/probes-${SLURM_JOB_ID}-${host}.json"
    tmp=$(mktemp "$SD_DIR/.probes-${SLURM_JOB_ID}-${host}.XXXXXX") || return 1
    printf '[{"targets": [%s], "labels": {"slurm_job_id": "%s", "slurm_partition": "%s"}}]\n' \
        "$targets" "$SLURM_JOB_ID" "${SLURM_JOB_PARTITION:-}" > "$tmp"
    # Prometheus (its own user, maybe another host) must read it; rename = atomic for file_sd.
    chmod 0644 "$tmp" && mv -f "$tmp" "$file"
}

main() {
    if [[ ! ${SLURM_JOB_ID:-} =~ ^[0-9]+(_[0-9]+)?$ ]]; then
        log "SLURM_JOB_ID '${SLURM_JOB_ID:-}' missing or malformed; nothing written"
        return
    fi
    local gpus count=0 g
    gpus=$(gpu_indices)
    if [ -n "$gpus" ]; then
        if mkdir -p "$MAP_DIR" 2>/dev/null; then
            exec 9>"$MAP_DIR/.lock" && flock -w 10 9  # jobs sharing a node start concurrently
            for g in $gpus; do
                add_job_to_gpu "$g" || log "job $SLURM_JOB_ID: cannot write $MAP_DIR/$g"
                count=$((count + 1))
            done
            exec 9>&-
        else
            log "job $SLURM_JOB_ID: cannot create $MAP_DIR"
            count=$(wc -w <<< "$gpus")
        fi
    fi
    if [ "$count" -eq 0 ]; then
        log "job $SLURM_JOB_ID: no GPUs allocated on this node; no probe targets"
        return
    fi
    write_targets "$count" || log "job $SLURM_JOB_ID: cannot write probe targets under $SD_DIR"
}

main
