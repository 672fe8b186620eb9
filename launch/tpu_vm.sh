#!/usr/bin/env bash
# A TPU VM or pod slice: the same command on every worker; jax.distributed finds the topology.
#   launch/tpu_vm.sh my-tpu us-central2-b gs://bucket/ker3b /mnt/ct-rate /mnt/Llama-3.2-3B-Instruct
# Data and the LLM folder must be readable at the same path on every worker (e.g. a mounted disk);
# the workdir should be a path all workers share (gs:// works with Orbax).
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; WORKDIR=${3:?workdir}; DATA=${4:?CT-RATE root}; LLM=${5:?LLM folder}
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd ~/kervljepa_jax && pip install -q -e . 'jax[tpu]' &&
  python -m kervljepa_jax.train --distributed --phase=all --workdir=$WORKDIR \
    --config=configs/phase1.py:paper --config.data.root=$DATA --config.model.llm_path=$LLM \
    --config.data.tokenizer_path=$LLM ${*:6}"
