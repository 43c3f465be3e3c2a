#!/bin/bash
# SageMaker HyperPod (Slurm) lifecycle-script snippet: installs rankwatch on every node.
# Call it from your on_create.sh after the base setup, on every instance group:
#   bash /fsx/rankwatch/deploy/slurm/hyperpod/install-rankwatch.sh \
#        --source /fsx/rankwatch --region us-west-2 --workspace ws-0123abcd-...
# Compute nodes (nvidia-smi answers) get the node exporter service and the Prolog/Epilog;
# the controller gets Prometheus remote-writing to AMP, the node target list and the detector.
# Secrets for the detector go to /etc/rankwatch/detector.env (root, 0600) afterwards.
set -euo pipefail

SOURCE=/fsx/rankwatch            # a checkout (or unpacked sdist) of rankwatch on shared storage
REGION=""
WORKSPACE=""
SLURM_ETC=/opt/slurm/etc         # HyperPod's Slurm configuration directory
while [ $# -gt 0 ]; do
    case "$1" in
        --source) SOURCE=$2; shift 2 ;;
        --region) REGION=$2; shift 2 ;;
        --workspace) WORKSPACE=$2; shift 2 ;;
        --slurm-etc) SLURM_ETC=$2; shift 2 ;;
        *) echo "install-rankwatch: unknown argument $1" >&2; exit 2 ;;
    esac
done
DEPLOY=$SOURCE/deploy/slurm

python3 -m venv /opt/rankwatch/venv
/opt/rankwatch/venv/bin/pip install --quiet "$SOURCE[aws]"
install -m 0644 "$DEPLOY/rankwatch.default" /etc/default/rankwatch

if nvidia-smi -L >/dev/null 2>&1; then
    # Compute node.
    install -m 0644 "$DEPLOY/rankwatch-node-exporter.service" /etc/systemd/system/
    # The job mapping directory under /run (a tmpfs): at every boot, and now.
    install -m 0644 "$DEPLOY/rankwatch.tmpfiles.conf" /etc/tmpfiles.d/rankwatch.conf
    systemd-tmpfiles --create /etc/tmpfiles.d/rankwatch.conf
    install -d "$SLURM_ETC/prolog.d" "$SLURM_ETC/epilog.d"
    install -m 0755 "$DEPLOY/prolog.sh" "$SLURM_ETC/prolog.d/50-rankwatch.sh"
    install -m 0755 "$DEPLOY/epilog.sh" "$SLURM_ETC/epilog.d/50-rankwatch.sh"
    systemctl daemon-reload
    systemctl enable --now rankwatch-node-exporter.service
else
    # Controller (head) node: Slurm runs every script matched by the Prolog/Epilog globs.
    if ! grep -q '^Prolog=' "$SLURM_ETC/slurm.conf"; then
        printf 'Prolog=%s/prolog.d/*\nEpilog=%s/epilog.d/*\n' "$SLURM_ETC" "$SLURM_ETC" >> "$SLURM_ETC/slurm.conf"
        grep -q '^PrologFlags=' "$SLURM_ETC/slurm.conf" || echo 'PrologFlags=Alloc' >> "$SLURM_ETC/slurm.conf"
        scontrol reconfigure || true
    else
        echo "install-rankwatch: slurm.conf already sets Prolog=; add $SLURM_ETC/prolog.d/* to it yourself" >&2
    fi
    install -d /etc/prometheus/rules /etc/prometheus/targets /fsx/rankwatch/file_sd
    chmod 1777 /fsx/rankwatch/file_sd
    install -m 0644 "$SOURCE"/alerts/rankwatch-*.yml /etc/prometheus/rules/
    sed -e "s/REGION/$REGION/g" -e "s/WORKSPACE_ID/$WORKSPACE/g" "$DEPLOY/prometheus-amp.yml" \
        > /etc/prometheus/prometheus.yml
    # One target per compute node; rerun (or cron) after the cluster is resized.
    sinfo -N -h -o '%N' | sort -u | awk 'BEGIN { printf "[{\"targets\": [" } \
        { printf "%s\"%s:9410\"", (NR > 1 ? ", " : ""), $1 } END { print "]}]" }' \
        > /etc/prometheus/targets/nodes.json
    install -m 0644 "$DEPLOY/rankwatch-detector.service" /etc/systemd/system/
    install -d -m 0700 /etc/rankwatch
    [ -f /etc/rankwatch/detector.env ] || install -m 0600 /dev/null /etc/rankwatch/detector.env
    systemctl daemon-reload
    systemctl reload prometheus 2>/dev/null || systemctl restart prometheus || true
    systemctl enable --now rankwatch-detector.service
fi
