#!/bin/bash
# rankwatch Slurm Epilog: undoes prolog.sh for the finished job on this node — removes its id
# from every GPU mapping file (SLURM_JOB_GPUS is not set in the Epilog of every Slurm version,
# so all files are scanned), deletes files left empty, and removes the job's probe target file.
# Always exits 0: a failing Epilog sets the node DOWN.
set -u
trap 'exit 0' EXIT

[ -r /etc/default/rankwatch ] && . /etc/default/rankwatch
MAP_DIR=${RANKWATCH_JOB_MAPPING_DIR:-/run/rankwatch/job-mapping}
SD_DIR=${RANKWATCH_FILE_SD_DIR:-/fsx/rankwatch/file_sd}
TAG=rankwatch-epilog

log() { logger -t "$TAG" -- "$*" 2>/dev/null || echo "$TAG: $*" >&2; }

main() {
    if [[ ! ${SLURM_JOB_ID:-} =~ ^[0-9]+(_[0-9]+)?$ ]]; then
        log "SLURM_JOB_ID '${SLURM_JOB_ID:-}' missing or malformed; nothing removed"
        return
    fi
    local host=${SLURMD_NODENAME:-$(hostname -s)} file tmp
    rm -f -- "$SD_DIR/probes-${SLURM_JOB_ID}-${host}.json" || log "cannot remove probe targets of job $SLURM_JOB_ID"
    [ -d "$MAP_DIR" ] || return
    exec 9>"$MAP_DIR/.lock" && flock -w 10 9
    for file in "$MAP_DIR"/*; do
        [ -f "$file" ] && grep -qx -- "$SLURM_JOB_ID" "$file" || continue
        tmp=$(mktemp "$MAP_DIR/.${file##*/}.XXXXXX") || { log "cannot update $file"; continue; }
        grep -vx -- "$SLURM_JOB_ID" "$file" > "$tmp"
        if [ -s "$tmp" ]; then
            chmod 0644 "$tmp" && mv -f "$tmp" "$file"
        else
            rm -f -- "$tmp" "$file"
        fi
    done
    exec 9>&-
}

main
